"""FLUX.2 [klein] (flavours ``klein-4b`` / ``klein-9b``): the conformance suite on the tiny klein,
plus what differs from dev checked against diffusers' ``Flux2KleinPipeline``: Qwen3 prompt
embeddings from the flavour's layers, no guidance input, CFG (and a negative prompt) in
validation, a dev checkpoint refused under a klein flavour, and LoRA files in both layouts.

One tiny klein is built per module (``flux2_klein_path``, ~3 s); torch runs on one thread here."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.testing import ModelFamilyTests
from tune_models.testing import load_tiny as load

PROMPTS = ["a cat", "a red square on a blue background"]
FLAVOUR = "tiny-klein"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux2_klein_path(tmp_path_factory) -> Path:
    from tune_models.families.flux2.tiny import build_tiny_klein_pipeline

    return build_tiny_klein_pipeline(tmp_path_factory.mktemp("tiny-flux2-klein"))


class TestFlux2KleinConformance(ModelFamilyTests):
    family_name = "flux2"
    flavour = FLAVOUR
    tiny_path_fixture = "flux2_klein_path"
    input_flavour = FLAVOUR  # klein edits a reference too when the run has one


def test_klein_flavours_are_the_base_checkpoints_with_the_pipelines_defaults(flux2):
    """The flavour facts agree with diffusers' Flux2KleinPipeline (defaults of its call and of
    encode_prompt) and dev's with Flux2Pipeline's; the registry shows the same flavours."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from tune_models.registry import model_families

    call = inspect.signature(Flux2KleinPipeline.__call__).parameters
    encode = inspect.signature(Flux2KleinPipeline.encode_prompt).parameters
    for name, checkpoint in (("klein-4b", "FLUX.2-klein-base-4B"), ("klein-9b", "FLUX.2-klein-base-9B")):
        flavour = flux2.flavour(name)
        assert flavour.pretrained == f"black-forest-labs/{checkpoint}"
        assert (flavour.inference_steps, flavour.guidance, flavour.shift) == (
            call["num_inference_steps"].default, call["guidance_scale"].default, None
        ) == (50, 4.0, None)
        line = flux2.line(name)
        assert flux2.pipeline_class(name) is Flux2KleinPipeline and line["text_encoder"] == "Qwen3ForCausalLM"
        assert tuple(line["text_encoder_out_layers"]) == encode["text_encoder_out_layers"].default == (9, 18, 27)
        assert line["max_sequence_length"] == encode["max_sequence_length"].default == 512
    dev_layers = inspect.signature(Flux2Pipeline.encode_prompt).parameters["text_encoder_out_layers"].default
    assert tuple(flux2.line("dev")["text_encoder_out_layers"]) == tuple(dev_layers) == (10, 20, 30)
    assert flux2.pipeline_class("dev") is Flux2Pipeline is flux2.pipeline_class()
    info = model_families.get("flux2").info
    assert {"klein-4b", "klein-9b", "tiny-klein"} <= set(info["flavours"])
    assert "no effect on klein" in info["training_options"]["flux2_guidance_value"]


def test_prompt_embeddings_are_the_flavours_qwen3_layers(flux2, flux2_klein_path):
    """Our cached embeddings equal ``Flux2KleinPipeline.encode_prompt``'s with the flavour's
    layers, are the Qwen3 hidden states of exactly those layers side by side per token, and differ
    from dev-style layers; the prompt is the chat's user turn (no system message)."""
    model = load(flux2, flux2_klein_path, FLAVOUR)
    layers = tuple(flux2.line(FLAVOUR)["text_encoder_out_layers"])
    encoded = flux2.encode_prompts(model, PROMPTS)
    batch = flux2.collate_prompts(encoded, "cpu", torch.float32)
    pipe = flux2.validation_pipeline(model)
    embeds, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=128, text_encoder_out_layers=layers)
    torch.testing.assert_close(batch["prompt_embeds"], embeds, rtol=0, atol=0)
    assert embeds.shape == (2, 128, 48)

    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.startswith("<|im_start|>user\n" + PROMPTS[1]) and text.endswith("<think>\n\n</think>\n\n")
    tokens = model.tokenizer(text, return_tensors="pt", padding="max_length", max_length=128)
    hidden = model.text_encoder(**tokens, output_hidden_states=True).hidden_states
    for slot, layer in enumerate(layers):
        torch.testing.assert_close(encoded[1]["prompt_embeds"][:, 16 * slot : 16 * (slot + 1)], hidden[layer][0])
    other, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=128, text_encoder_out_layers=(1, 2, 3))
    assert not torch.allclose(other, embeds)
    assert 0 < int(encoded[0]["attention_mask"].sum()) < int(encoded[1]["attention_mask"].sum()) < 128


def test_predict_is_the_klein_pipelines_velocity_without_guidance(flux2, flux2_klein_path, caplog):
    """One Euler step of Flux2KleinPipeline (CFG off) from sigma 1 to 0 ends at ``noise - v``, and
    ``predict`` gives that ``v``: no guidance input reaches the transformer, so the
    ``flux2_guidance_*`` options change nothing, and saying so is logged."""
    model = load(flux2, flux2_klein_path, FLAVOUR)
    assert not model.transformer.config.guidance_embeds and not flux2.has_guidance_input(model)
    noise = torch.randn(2, 128, 16, 16, generator=torch.Generator().manual_seed(0))
    out = flux2.validation_pipeline(model)(
        prompt=PROMPTS, height=64, width=64, num_inference_steps=1, sigmas=[1.0], guidance_scale=1.0,
        latents=noise, output_type="latent", max_sequence_length=128, text_encoder_out_layers=(2, 4, 5),
    ).images
    cond = flux2.collate_prompts(flux2.encode_prompts(model, PROMPTS), "cpu", torch.float32)
    with torch.no_grad():
        velocity = flux2.predict(model, noise, torch.tensor([1.0, 1.0]), cond)
        with caplog.at_level(logging.WARNING, logger="tune_models.families.flux2.family"):
            flux2.configure_training(model, {"flux2_guidance_mode": "random-range", "flux2_guidance_max": 9.0})
        guided = flux2.predict(model, noise, torch.tensor([1.0, 1.0]), cond)
    # Flux2KleinPipeline's "latent" output is already de-normalised and unpatchified (the VAE's space).
    mean, std = flux2._normalisation(model.vae, noise)
    torch.testing.assert_close(out, flux2.unpatchify((noise - velocity) * std + mean), rtol=1e-4, atol=1e-5)
    assert torch.equal(velocity, guided)
    assert "flux2_guidance_max, flux2_guidance_mode has no effect" in caplog.text and "'tiny-klein'" in caplog.text


def test_validation_runs_real_cfg_with_the_negative_prompt(flux2, flux2_klein_path):
    """Validation is classifier-free guided: two transformer calls a step above guidance 1, one at
    1; the guidance scale and a ``validation_negative_prompt`` (passed as embeddings, since the
    pipeline has no negative-prompt text argument) change the image."""
    model = load(flux2, flux2_klein_path, FLAVOUR)
    pipe = flux2.validation_pipeline(model)
    assert type(pipe).__name__ == "Flux2KleinPipeline" and not pipe.config.is_distilled
    calls = []
    hook = model.transformer.register_forward_hook(lambda *_: calls.append(1))
    settings = dict(width=64, height=64, steps=2, seed=0)
    try:
        guided = np.asarray(flux2.generate(pipe, PROMPTS[1], guidance=4.0, **settings), dtype=np.int16)
        assert len(calls) == 4
        plain = np.asarray(flux2.generate(pipe, PROMPTS[1], guidance=1.0, **settings), dtype=np.int16)
        assert len(calls) == 6
        negative = np.asarray(
            flux2.generate(pipe, PROMPTS[1], guidance=4.0, negative_prompt="blurry", **settings), dtype=np.int16
        )
    finally:
        hook.remove()
    assert np.abs(guided - plain).max() > 1 and np.abs(guided - negative).max() > 1
    kwargs = flux2._pipeline_call_kwargs(pipe, guidance=4.0, negative_prompt="blurry")
    expected, _ = pipe.encode_prompt("blurry", max_sequence_length=128, text_encoder_out_layers=(2, 4, 5))
    torch.testing.assert_close(kwargs["negative_prompt_embeds"], expected)
    assert "negative_prompt_embeds" not in flux2._pipeline_call_kwargs(pipe, guidance=4.0, negative_prompt=None)


def test_reference_latents_condition_like_the_klein_pipelines_image_input(flux2, flux2_klein_path):
    """Reference (edit) conditioning works on klein as on dev: one Euler step of
    Flux2KleinPipeline with ``image=`` ends where ``predict(..., reference_latents=[...])`` says."""
    from PIL import Image

    model = load(flux2, flux2_klein_path, FLAVOUR)
    assert flux2.accepts_references(FLAVOUR) and flux2.validation_input(FLAVOUR) == "optional-reference"
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pipe = flux2.validation_pipeline(model)
    noise = torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(2))
    out = pipe(
        image=picture, prompt=PROMPTS[0], height=64, width=64, num_inference_steps=1, sigmas=[1.0],
        guidance_scale=1.0, latents=noise, output_type="latent", max_sequence_length=128,
        text_encoder_out_layers=(2, 4, 5),
    ).images
    reference = flux2.encode_images(model, pipe.image_processor.preprocess(picture, height=64, width=64, resize_mode="crop"))
    cond = flux2.collate_prompts(flux2.encode_prompts(model, PROMPTS[:1]), "cpu", torch.float32)
    with torch.no_grad():
        velocity = flux2.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=[reference])
        plain = flux2.predict(model, noise, torch.tensor([1.0]), cond)
    mean, std = flux2._normalisation(model.vae, noise)
    torch.testing.assert_close(out, flux2.unpatchify((noise - velocity) * std + mean), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(velocity, plain, atol=1e-4)


def test_a_checkpoint_of_the_other_line_is_refused_before_loading(flux2, flux2_klein_path, tmp_path):
    """A klein checkpoint under dev, or a dev checkpoint (Mistral-3 text encoder) under a klein
    flavour, fails at once naming the flavours that fit; no weights are read (the dev folder
    here holds nothing but its text encoder's config)."""
    with pytest.raises(ValueError, match="'klein-4b' or 'klein-9b'"):
        load(flux2, flux2_klein_path, "dev")
    dev = tmp_path / "dev"
    (dev / "text_encoder").mkdir(parents=True)
    (dev / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["Mistral3ForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM text encoder.*Mistral3ForConditionalGeneration one.*'dev'"):
        load(flux2, dev, "klein-9b")


def test_klein_lora_loads_from_both_layouts(flux2, flux2_klein_path, tmp_path):
    """A LoRA on every block linear of the klein transformer reproduces its image in
    Flux2KleinPipeline after ``load_lora_weights``: from the diffusers state dict, from our ComfyUI
    file read back through ``lora_state_dict``, and from the same BFL names in ai-toolkit's
    ``lora_A``/``lora_B`` spelling through diffusers' own FLUX.2 converter (which counts klein's
    blocks from the keys). The ComfyUI names are dev's module names; klein has no guidance_in."""
    from safetensors.torch import save_file

    suite = TestFlux2KleinConformance()
    model = load(flux2, flux2_klein_path, FLAVOUR)
    adapters.add_training_lora(model, rank=4, alpha=4, dropout=0.0, target="full")
    model.transformer.eval()
    for name, param in model.transformer.named_parameters():  # a visible, deterministic LoRA
        if "lora_B" in name:
            param.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    expected = suite.image(flux2, flux2.validation_pipeline(model))
    plain = suite.image(flux2, flux2.validation_pipeline(load(flux2, flux2_klein_path, FLAVOUR)))
    assert np.abs(expected - plain).max() > 2, "the LoRA does not change the image"

    state_dict = adapters.training_lora_state_dict(model)
    comfy = flux2.to_comfyui(state_dict, alpha=4)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in comfy
    assert "diffusion_model.single_blocks.0.linear2.lora_up.weight" in comfy
    assert not any("guidance_in" in k for k in comfy)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    for weights in (
        dict(state_dict),
        dict(flux2.lora_state_dict(tmp_path / "comfy.safetensors")),
        {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
         for k, v in flux2.to_comfyui(state_dict).items()},
    ):
        pipe = flux2.validation_pipeline(load(flux2, flux2_klein_path, FLAVOUR))
        pipe.load_lora_weights(weights)
        assert type(pipe).__name__ == "Flux2KleinPipeline"
        assert np.abs(suite.image(flux2, pipe) - expected).max() <= 1


def test_the_tiny_klein_flavour_builds_its_model_on_first_use(flux2, tmp_path, monkeypatch):
    """Like ``tiny``, ``model_flavour: tiny-klein`` with no checkpoint builds its model once under
    ``$TUNE_TINY_CACHE`` and loads it (Qwen3 encoder, no guidance embedding)."""
    from tune_models.family import ModelSource

    monkeypatch.setenv("TUNE_TINY_CACHE", str(tmp_path))
    model = flux2.load(ModelSource(), FLAVOUR)
    assert type(model.text_encoder).__name__ == "Qwen3ForCausalLM" and not flux2.has_guidance_input(model)
    assert Path(model.extras["root"]) == tmp_path / "flux2-klein-v1"
    assert json.loads((tmp_path / "flux2-klein-v1" / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
