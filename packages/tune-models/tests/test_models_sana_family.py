"""Sana: the conformance suite, plus conventions checked against diffusers' SanaPipeline.

One tiny Sana is built per session (``sana_path``) and shared by every test here; torch is pinned
to one thread while this module runs (tiny matrices on a shared CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.family import get_family
from tune_models.testing import ModelFamilyTests, assert_padding_is_masked
from tune_models.testing import load_tiny as load

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["a cat", "  A much LONGER prompt about a red square"]


class TestSanaConformance(ModelFamilyTests):
    family_name = "sana"
    image_size = 32
    tiny_path_fixture = "sana_path"  # the session's tiny model, built once


def test_names_and_flavours(sana):
    assert get_family("SANA") is sana
    default = sana.flavour(None)
    assert (default.name, default.pretrained, default.inference_steps, default.guidance, default.shift) == (
        "sana1.5-1.6b", "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", 20, 4.5, 3.0
    )
    assert {"sana1.5-1.6b", "sana1.5-4.8b", "sana-1.6b-1024", "tiny"} <= set(sana.flavours)
    assert set(sana.lora_target_presets["self-attention"]) < set(sana.lora_target_presets["all"])
    from tune_models.registry import model_families

    info = model_families.get("sana").info
    assert set(info["flavours"]) == set(sana.flavours) and info["default_flavour"] == "sana1.5-1.6b"
    assert set(info["lora_targets"]) == set(sana.lora_target_presets)


def _pipeline_prompts(pipe, prompts, instruction):
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, complex_human_instruction=instruction
    )
    return embeds, mask


def _check_against_pipeline(sana, model, instruction):
    encoded = sana.encode_prompts(model, PROMPTS)
    embeds, mask = _pipeline_prompts(sana.validation_pipeline(model), PROMPTS, instruction)
    batch = sana.collate_prompts(encoded, "cpu", torch.float32)
    length = batch["prompt_embeds"].shape[1]
    assert embeds.shape[1] == 300 and length < 300
    assert torch.equal(mask[:, :length], batch["prompt_attention_mask"]) and not mask[:, length:].any()
    valid = batch["prompt_attention_mask"].bool()
    torch.testing.assert_close(batch["prompt_embeds"][valid], embeds[:, :length][valid])
    return encoded


def test_prompts_and_masks_match_the_pipeline(sana, sana_path):
    """With the default complex human instruction: Sana's lower-casing, instruction prefix,
    ``select_index`` and mask, token for token."""
    from tune_models.families.sana.family import default_complex_human_instruction

    model = load(sana, sana_path)
    instruction = list(default_complex_human_instruction())
    assert instruction[0].startswith("Given a user prompt") and instruction[-1] == "User Prompt: "
    encoded = _check_against_pipeline(sana, model, instruction)
    assert encoded[0]["prompt_embeds"].shape[0] < encoded[1]["prompt_embeds"].shape[0]


def test_complex_human_instruction_option(sana, sana_path):
    """``sana_complex_human_instruction``: false drops the instruction, a list replaces it; the
    cached prompts and the validation pipeline follow; a wrong type is refused by name."""
    model = load(sana, sana_path)
    default = sana.encode_prompts(model, PROMPTS[:1])[0]["prompt_embeds"]
    sana.configure_training(model, {"sana_complex_human_instruction": False})
    assert sana.validation_pipeline(model).tune_complex_human_instruction == []
    off = _check_against_pipeline(sana, model, [])
    assert off[0]["prompt_embeds"].shape != default.shape
    sana.configure_training(model, {"sana_complex_human_instruction": ["Describe: "]})
    _check_against_pipeline(sana, model, ["Describe: "])
    sana.configure_training(model, {"unrelated": 1})  # other keys leave it alone
    assert sana.complex_human_instruction(model) == ["Describe: "]
    with pytest.raises(ValueError, match="sana_complex_human_instruction"):
        sana.configure_training(model, {"sana_complex_human_instruction": 3})


def test_predict_is_the_pipelines_velocity(sana, sana_path):
    """One Flow-DPM-Solver step of SanaPipeline (no CFG) calls the transformer at its first sigma
    ``s`` and returns ``x - s v``: ``predict`` at ``s`` must be that ``v`` and equal the
    pipeline's own transformer output (timestep ``1000 s``, no sign flip, the mask for two prompts
    of different lengths)."""
    model = load(sana, sana_path)
    latents = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = sana.validation_pipeline(model)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["timestep"], seen["out"] = kwargs["timestep"].clone(), output[0].clone()

    handle = model.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        out = pipe(
            prompt=PROMPTS, height=32, width=32, num_inference_steps=1, guidance_scale=1.0, latents=latents,
            output_type="latent", use_resolution_binning=False,
            complex_human_instruction=pipe.tune_complex_human_instruction,
        ).images
    finally:
        handle.remove()
    sigma = float(pipe.scheduler.sigmas[0])
    assert 0.5 < sigma <= 1
    # The scheduler hands the transformer an integer timestep: 1000 sigma rounded down.
    assert seen["timestep"].tolist() == [float(int(sigma * 1000))] * 2
    cond = sana.collate_prompts(sana.encode_prompts(model, PROMPTS), "cpu", torch.float32)
    with torch.no_grad():
        velocity = sana.predict(model, latents, seen["timestep"] / 1000, cond)
    torch.testing.assert_close(velocity, seen["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, latents - sigma * velocity, rtol=1e-4, atol=1e-5)


def test_mask_hides_padding(sana, sana_path):
    latents = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    assert_padding_is_masked(sana, load(sana, sana_path), PROMPTS, latents, mask_key="prompt_attention_mask")


def test_latents_use_the_dc_ae_scaling(sana, sana_path):
    model = load(sana, sana_path)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = sana.encode_images(model, pixels)
    torch.testing.assert_close(latents, model.vae.encode(pixels).latent * model.vae.config.scaling_factor)
    assert latents.shape == (1, 8, 8, 8)
    assert sana.decode_latents(model, latents).shape == pixels.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        sana.encode_images(model, torch.zeros(1, 3, 30, 32))


def test_negative_prompt_reaches_the_pipeline(sana, sana_path):
    model = load(sana, sana_path)
    pipe = sana.validation_pipeline(model)

    def image(negative, guidance):
        picture = sana.generate(pipe, "a cat", width=32, height=32, steps=2, guidance=guidance, seed=0, negative_prompt=negative)
        return np.asarray(picture).astype(np.int16)

    assert image(None, 4.5).shape == (32, 32, 3)  # the asked size: no resolution binning
    assert np.abs(image("blurry", 4.5) - image(None, 4.5)).max() > 0
    assert np.array_equal(image("blurry", 1.0), image(None, 1.0))


def test_lora_changes_pipeline_output_in_both_layouts(sana, sana_path, tmp_path):
    """A few LoRA steps, saved in diffusers layout and in the original-names layout (read back
    through ``lora_state_dict``), reproduce the trained model in SanaPipeline."""
    from safetensors.torch import save_file

    suite = TestSanaConformance()
    model = load(sana, sana_path)
    losses = suite.train(sana, model, alpha=8)
    assert losses[-1] < losses[0]
    expected = suite.image(sana, sana.validation_pipeline(model))
    plain = suite.image(sana, sana.validation_pipeline(load(sana, sana_path)))
    assert np.abs(expected - plain).max() > 2, "the trained LoRA does not change the image"

    state_dict = adapters.training_lora_state_dict(model)
    comfy = sana.to_comfyui(state_dict, alpha=8)
    for native, alpha in (("attn.qkv", 24.0), ("attn.proj", 8.0), ("cross_attn.q_linear", 8.0),
                          ("cross_attn.kv_linear", 16.0), ("cross_attn.proj", 8.0)):
        assert float(comfy[f"diffusion_model.blocks.1.{native}.alpha"]) == alpha, native
    assert all(k.startswith("diffusion_model.blocks.") for k in comfy)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = sana.lora_state_dict(tmp_path / "comfy.safetensors")
    assert set(back) == set(state_dict)
    pipe = sana.validation_pipeline(load(sana, sana_path))
    pipe.load_lora_weights(dict(back))
    assert np.abs(suite.image(sana, pipe) - expected).max() <= 1


def test_text_encoder_override(sana, sana_path, tmp_path):
    from tune_models.families import _gemma

    tokenizer = _gemma.gemma_tokenizer()
    torch.manual_seed(7)
    other = _gemma.tiny_gemma2(tokenizer)
    other.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    model = load(sana, sana_path, pretrained_text_encoder_model_name_or_path=str(tmp_path / "gemma"))
    assert all(torch.equal(a, b) for a, b in zip(model.text_encoder.parameters(), other.parameters()))
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_512_px_flavours(sana, sana_path, caplog, monkeypatch):
    """The published 512 px checkpoints: their repositories, Sana's sampling defaults (20 steps,
    CFG 4.5, fixed shift 3 used as is for training at any size) and their training size; loading a
    transformer made for another size than the flavour's warns."""
    from tune_models.families.sana import family as module
    from tune_models.families.sana.flavours import SANA_SAMPLE_SIZES

    expected = {
        "sana-1.6b-512": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
        "sana-1.6b-512-multiling": "Efficient-Large-Model/Sana_1600M_512px_MultiLing_diffusers",
        "sana-600m-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    }
    for name, repo in expected.items():
        flavour = sana.flavour(name)
        assert (flavour.pretrained, flavour.inference_steps, flavour.guidance, flavour.shift) == (repo, 20, 4.5, 3.0)
        assert SANA_SAMPLE_SIZES[name] == 512 and flavour.resolution == 512  # the default validation size
        assert sana.flow_shift(512, 512, shift=flavour.shift, auto_shift=False) == 3.0
    two_k = sana.flavour("sana-1.6b-2048")  # NVlabs' Sana_1600M_img2048_bf16.yaml: 20 steps, CFG 4.5, shift 3
    assert (two_k.pretrained, two_k.inference_steps, two_k.guidance, two_k.shift, two_k.resolution) == (
        "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers", 20, 4.5, 3.0, 2048
    )
    expected_elsewhere = {*expected, "sana-1.6b-2048"}
    assert {SANA_SAMPLE_SIZES[n] for n in sana.flavours if n not in expected_elsewhere and n != "tiny"} == {1024}
    assert {sana.flavour(n).resolution for n in sana.flavours if n not in expected_elsewhere} == {None}  # 1024

    with caplog.at_level("WARNING"):
        model = load(sana, sana_path, flavour="sana-600m-512")
    made_for = model.transformer.config.sample_size * sana._vae_scale(model.vae)
    assert f"'sana-600m-512' is a 512 px Sana, but the loaded transformer was made for {made_for} px" in caplog.text
    caplog.clear()
    monkeypatch.setitem(module.SANA_SAMPLE_SIZES, "sana-600m-512", made_for)
    with caplog.at_level("WARNING"):
        load(sana, sana_path, flavour="sana-600m-512")
    assert "was made for" not in caplog.text


def test_modules_outside_the_blocks_take_their_original_names(sana, sana_path, tmp_path):
    """A ``lora_target`` that names the embedders and the output projection: the ComfyUI layout
    uses the original NVlabs names for them (``x_embedder.proj``, ``y_embedder.y_proj.fc1``,
    ``t_embedder.mlp.0``, ``t_block.1``, ``final_layer.linear``, as diffusers' conversion script
    renames them), and the file reads back to the same diffusers LoRA, which SanaPipeline loads."""
    from safetensors.torch import save_file

    outside = {
        "patch_embed.proj": "x_embedder.proj",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_embed.linear": "t_block.1",
        "proj_out": "final_layer.linear",
    }
    model = load(sana, sana_path)
    adapters.add_training_lora(model, rank=2, alpha=2, target=[*outside, "attn1.to_q"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if "lora_B" in name:  # a trained-looking LoRA without training
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    state_dict = adapters.training_lora_state_dict(model)
    comfy = sana.to_comfyui(state_dict, alpha=2)
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in comfy if ".lora_" in k}
    assert set(outside.values()) <= modules
    assert not modules & set(outside), "a module outside the blocks kept its diffusers name"
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = sana.lora_state_dict(tmp_path / "comfy.safetensors")
    assert set(back) == set(state_dict)
    for key, tensor in state_dict.items():
        torch.testing.assert_close(back[key], tensor)
    suite = TestSanaConformance()
    expected = suite.image(sana, sana.validation_pipeline(model))
    pipe = sana.validation_pipeline(load(sana, sana_path))
    plain = suite.image(sana, pipe)
    pipe.load_lora_weights(dict(back))
    assert np.abs(expected - plain).max() > 2, "the LoRA does not change the image"
    assert np.abs(suite.image(sana, pipe) - expected).max() <= 1
