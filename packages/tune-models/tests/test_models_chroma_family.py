"""Chroma: the conformance suite, plus conventions checked against diffusers' ChromaPipeline."""

from __future__ import annotations

import pytest
import torch

from tune_models.testing import ModelFamilyTests
from tune_models.testing import load_tiny as load


class TestChromaConformance(ModelFamilyTests):
    family_name = "chroma"
    tiny_path_fixture = "chroma_path"  # the session's tiny model, built once

    def test_lora_target_presets_match_modules(self, family, tiny_path):
        """Flux's presets; ``tiny``/``nano`` name single blocks past the tiny model's one."""
        model = self.load(family, tiny_path)
        names = [name for name, _ in model.transformer.named_modules()]
        for preset, suffixes in family.lora_target_presets.items():
            for suffix in suffixes:
                if suffix.startswith("single_transformer_blocks."):
                    suffix = "single_transformer_blocks.0." + suffix.split(".", 2)[2]
                assert any(n == suffix or n.endswith("." + suffix) for n in names), (preset, suffix)


def test_flavours(chroma):
    assert chroma.flavour(None).pretrained == "lodestones/Chroma1-Base"
    assert chroma.flavour("hd").pretrained == "lodestones/Chroma1-HD"
    assert chroma.default_lora_target == "all"


def test_prompts_and_mask_match_the_pipeline(chroma, chroma_path):
    model = load(chroma, chroma_path)
    assert model.text_encoders == [model.text_encoder] and model.text_encoder_2 is None
    prompts = ["a cat", "a much longer prompt about a red square"]
    encoded = chroma.encode_prompts(model, prompts)
    embeds, _, mask, *_ = chroma.validation_pipeline(model).encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=64
    )
    for i in range(2):
        torch.testing.assert_close(encoded[i]["prompt_embeds"], embeds[i])
        assert torch.equal(encoded[i]["attention_mask"], mask[i].long())
    assert 0 < encoded[0]["attention_mask"].sum() < encoded[1]["attention_mask"].sum()


def test_predict_is_the_pipelines_velocity(chroma, chroma_path):
    model = load(chroma, chroma_path)
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    out = chroma.validation_pipeline(model)(
        prompt="a cat", height=64, width=64, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=64,
        latents=chroma.pack(noise), output_type="latent", sigmas=[1.0],
    ).images
    cond = chroma.collate_prompts(chroma.encode_prompts(model, ["a cat"]), "cpu", torch.float32)
    with torch.no_grad():
        masked = chroma.predict(model, noise, torch.tensor([1.0]), cond)
        model.extras["diffusers_float_mask"] = True
        velocity = chroma.predict(model, noise, torch.tensor([1.0]), cond)
    torch.testing.assert_close(chroma.unpack(out, 32, 32), noise - velocity, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(masked, velocity)  # the boolean mask really hides the padding


def _positional_checkpoint(block, *args):
    """A checkpoint function that, like tune-offload's, takes positional arguments only."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


@pytest.mark.parametrize("checkpoint", ["diffusers", "positional"])
def test_gradient_checkpointing_keeps_the_padding_mask(chroma, chroma_path, checkpoint):
    """diffusers' Chroma calls its checkpointed single blocks without the attention mask; the
    family puts it back, so a training forward with checkpointing is the forward without it, and
    so are the gradients."""
    model = load(chroma, chroma_path)
    transformer = model.transformer
    cond = chroma.collate_prompts(chroma.encode_prompts(model, ["a cat", "a much longer prompt with padding"]),
                                  "cpu", torch.float32)
    assert not cond["attention_mask"].all(), "the batch must have padding to show the mask"
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.4, 0.8])
    x = noise.clone().requires_grad_(True)
    expected = chroma.predict(model, x, sigmas, cond)
    expected.square().mean().backward()
    expected_grad = x.grad.clone()
    func = None if checkpoint == "diffusers" else _positional_checkpoint
    transformer.enable_gradient_checkpointing(func)
    for _ in range(2):  # the wrapper is put on once per forward, never stacked
        x.grad = None
        got = chroma.predict(model, x, sigmas, cond)
        got.square().mean().backward()
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(x.grad, expected_grad)
