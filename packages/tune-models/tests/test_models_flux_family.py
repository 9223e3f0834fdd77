"""Flux: the conformance suite, plus conventions checked against diffusers' own FluxPipeline.

One tiny Flux is built per session (``flux_path``) and shared by every test here.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.family import get_family
from tune_models.testing import ModelFamilyTests, load_tiny


def load(flux, path, flavour="tiny", **source):
    source.setdefault("disable_assistant_lora", True)  # schnell's default adapter is a download
    return load_tiny(flux, path, flavour, **source)


def batch(flux, model, prompts=("a red square", "a cat")):
    pixels = torch.rand(len(prompts), 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = flux.encode_images(model, pixels)
    cond = flux.collate_prompts(flux.encode_prompts(model, list(prompts)), model.device, model.dtype)
    return latents, cond


class TestFluxConformance(ModelFamilyTests):
    family_name = "flux"
    tiny_path_fixture = "flux_path"  # the session's tiny model, built once
    input_flavour = "kontext"  # edits a reference; the plain tiny folder loads as kontext

    def test_lora_target_presets_match_modules(self, family, tiny_path):
        """As the suite's check, except that block indices past the tiny model's single block
        (``tiny``/``nano`` name single blocks 7 and 20) are checked against FLUX.1's 38."""
        model = self.load(family, tiny_path)
        names = [name for name, _ in model.transformer.named_modules()]
        for preset, suffixes in family.lora_target_presets.items():
            for suffix in suffixes:
                indexed = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", suffix)
                if indexed:
                    assert int(indexed[1]) < 38, (preset, suffix)
                    suffix = f"single_transformer_blocks.0.{indexed[2]}"
                assert any(n == suffix or n.endswith("." + suffix) for n in names), (preset, suffix)


# ------------------------------------------------------------------ names and flavours
def test_names_and_flavours(flux):
    assert get_family("FLUX") is flux
    dev, schnell = flux.flavour("dev"), flux.flavour("schnell")
    assert flux.flavour(None) is dev
    assert (dev.pretrained, dev.inference_steps, dev.guidance, dev.shift) == ("black-forest-labs/FLUX.1-dev", 28, 3.5, None)
    assert (schnell.pretrained, schnell.inference_steps, schnell.shift) == ("black-forest-labs/FLUX.1-schnell", 4, 1.0)
    assert schnell.assistant_lora == "ostris/FLUX.1-schnell-training-adapter"
    assert set(flux.lora_target_presets) == {"all", "all+ffs", "context", "context+ffs", "mmdit", "tiny", "nano"}
    assert flux.default_lora_target == "all"
    from tune_models.registry import model_families

    info = model_families.get("flux").info
    assert set(info["flavours"]) == set(flux.flavours) and info["default_flavour"] == flux.default_flavour
    assert set(info["lora_targets"]) == set(flux.lora_target_presets)


def test_kontext_reference_latents_match_the_kontext_pipeline(flux, flux_path):
    """Kontext: one Euler step of FluxKontextPipeline with ``image=`` gives ``noise - v``;
    ``predict`` with that image's latents as ``reference_latents`` (packed after the noisy tokens,
    ids ``(1, row, col)``, outputs dropped) gives the same ``v``, unlike without it. Only the
    kontext flavour trains with references."""
    from PIL import Image

    assert flux.accepts_references("kontext") and not flux.accepts_references("dev")
    model = load(flux, flux_path, flavour="kontext")
    flux.configure_training(model, {"flux_guidance_value": 2.5})
    pipe = flux.validation_pipeline(model)
    assert type(pipe).__name__ == "FluxKontextPipeline"
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    out = pipe(
        image=picture, prompt="a cat", height=64, width=64, max_area=64 * 64, _auto_resize=False,
        num_inference_steps=1, sigmas=[1.0], guidance_scale=2.5, max_sequence_length=512,
        latents=flux.pack(noise), output_type="latent",
    ).images
    reference = flux.encode_images(model, pipe.image_processor.preprocess(picture, 64, 64))
    cond = flux.collate_prompts(flux.encode_prompts(model, ["a cat"]), "cpu", torch.float32)
    with torch.no_grad():
        velocity = flux.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=[reference])
        plain = flux.predict(model, noise, torch.tensor([1.0]), cond)
    torch.testing.assert_close(flux.unpack(out, 32, 32), noise - velocity, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(velocity, plain, atol=1e-4)
    with pytest.raises(ValueError, match="one reference image per sample"):
        flux.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=[reference, reference])


def test_load_freezes_both_text_encoders(flux, flux_path):
    model = load(flux, flux_path)
    assert model.text_encoders == [model.text_encoder, model.text_encoder_2]
    for encoder in model.text_encoders:
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


# ------------------------------------------------------------------ conventions vs diffusers
def test_prompts_match_the_pipeline(flux, flux_path):
    model = load(flux, flux_path)
    encoded = flux.encode_prompts(model, ["a cat", "a much longer prompt about a red square"])
    pipe = flux.validation_pipeline(model)
    embeds, pooled, text_ids = pipe.encode_prompt(["a cat", "a much longer prompt about a red square"], prompt_2=None, max_sequence_length=64)
    for i in range(2):
        torch.testing.assert_close(encoded[i]["prompt_embeds"], embeds[i])
        torch.testing.assert_close(encoded[i]["pooled_prompt_embeds"], pooled[i])
    assert encoded[0]["attention_mask"].sum() < encoded[1]["attention_mask"].sum() < 64
    assert not text_ids.any()


def test_predict_is_the_pipelines_velocity(flux, flux_path):
    """One Euler step of FluxPipeline from sigma 1 to 0 returns ``noise - v``; ``predict`` at
    sigma 1 with the same guidance must give the same ``v``: timestep, guidance, ids and
    packing all agree with the pipeline's own transformer call."""
    model = load(flux, flux_path)
    flux.configure_training(model, {"flux_guidance_value": 3.5})
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    pipe = flux.validation_pipeline(model)
    out = pipe(
        prompt="a cat", height=64, width=64, num_inference_steps=1, guidance_scale=3.5, max_sequence_length=64,
        latents=flux.pack(noise), output_type="latent", sigmas=[1.0],
    ).images
    cond = flux.collate_prompts(flux.encode_prompts(model, ["a cat"]), "cpu", torch.float32)
    with torch.no_grad():
        velocity = flux.predict(model, noise, torch.tensor([1.0]), cond)
    torch.testing.assert_close(flux.unpack(out, 32, 32), noise - velocity, rtol=1e-4, atol=1e-5)


def test_pack_round_trip_matches_diffusers(flux):
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = flux.pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    torch.testing.assert_close(flux.unpack(packed, 8, 12), latents)
    torch.testing.assert_close(flux.image_ids(8, 12, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


def test_latents_use_scaling_and_shift(flux, flux_path):
    model = load(flux, flux_path)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = flux.encode_images(model, pixels)
    cfg = model.vae.config
    torch.testing.assert_close(latents, (model.vae.encode(pixels).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor)
    assert latents.shape == (1, 16, 32, 32) and flux.decode_latents(model, latents).shape == pixels.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        flux.encode_images(model, torch.zeros(1, 3, 62, 64))


def test_auto_shift_matches_the_pipeline(flux, flux_path):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert math.isclose(flux.flow_shift(1024, 1024, shift=None, auto_shift=True), math.exp(calculate_shift(4096)))
    assert math.isclose(flux.flow_shift(512, 768, shift=None, auto_shift=True), math.exp(calculate_shift(32 * 48)))
    assert flux.flow_shift(1024, 1024, shift=flux.flavour("schnell").shift, auto_shift=False) == 1.0
    model = load(flux, flux_path)  # tiny VAE downsamples 2x: 64 px has 256 packed tokens
    assert math.isclose(flux.flow_shift(64, 64, shift=None, auto_shift=True, model=model), math.exp(calculate_shift(256)))


# ------------------------------------------------------------------ guidance and masking
def test_training_guidance_modes(flux, flux_path):
    model = load(flux, flux_path)
    assert torch.equal(flux.training_guidance(model, 3, "cpu"), torch.ones(3))  # default constant 1.0
    flux.configure_training(model, {"flux_guidance_mode": "random-range", "flux_guidance_min": 2.0, "flux_guidance_max": 3.0, "unrelated": 1})
    values = flux.training_guidance(model, 64, "cpu")
    assert values.min() >= 2.0 and values.max() <= 3.0 and values.std() > 0
    with pytest.raises(ValueError, match="flux_guidance_mode"):
        flux.configure_training(model, {"flux_guidance_mode": "sometimes"})
    with pytest.raises(ValueError, match="flux_guidance_min"):
        flux.configure_training(model, {"flux_guidance_mode": "random-range", "flux_guidance_min": 5.0, "flux_guidance_max": 1.0})
    latents, cond = batch(flux, model)
    flux.configure_training(model, {"flux_guidance_mode": "constant", "flux_guidance_value": 1.0})
    with torch.no_grad():
        one = flux.predict(model, latents, torch.tensor([0.5, 0.5]), cond)
        flux.configure_training(model, {"flux_guidance_value": 4.0})
        four = flux.predict(model, latents, torch.tensor([0.5, 0.5]), cond)
    assert not torch.allclose(one, four)  # the guidance embedding is used


def test_attention_masked_training(flux, flux_path):
    model = load(flux, flux_path)
    latents, cond = batch(flux, model)
    with torch.no_grad():
        plain = flux.predict(model, latents, torch.tensor([0.5, 0.5]), cond)
        flux.configure_training(model, {"flux_attention_masked_training": True})
        masked = flux.predict(model, latents, torch.tensor([0.5, 0.5]), cond)
        cond["prompt_embeds"][:, -5:] = 100.0  # padding positions: hidden from a masked model
        masked_again = flux.predict(model, latents, torch.tensor([0.5, 0.5]), cond)
    assert torch.isfinite(masked).all() and not torch.allclose(plain, masked)
    torch.testing.assert_close(masked, masked_again)


# ------------------------------------------------------------------ adapters end to end
def test_schnell_style_assistant_adapter(flux, flux_path, tmp_path):
    file = flux.build_tiny_assistant_lora(flux_path, tmp_path / "pytorch_lora_weights.safetensors")
    model = load(flux, flux_path, assistant_lora_path=str(file), disable_assistant_lora=False)
    assert model.has_assistant and not any(p.requires_grad for p in model.transformer.parameters())
    params = adapters.add_training_lora(model, rank=2, alpha=2, target="context")
    assert params and adapters.active_adapters(model) == ["assistant", "tune"]
    state_dict = adapters.training_lora_state_dict(model)
    assert state_dict and all("add_" in k or "to_add_out" in k for k in state_dict)


def test_lora_changes_pipeline_output_in_both_layouts(flux, flux_path, tmp_path):
    """A few LoRA steps, saved in diffusers layout and in ComfyUI layout (read back through
    ``lora_state_dict``), change FluxPipeline's image the same way after ``load_lora_weights``."""
    from safetensors.torch import save_file

    suite = TestFluxConformance()
    model = load(flux, flux_path)
    losses = suite.train(flux, model, alpha=8)
    assert losses[-1] < losses[0]
    expected = suite.image(flux, flux.validation_pipeline(model))
    plain = suite.image(flux, flux.validation_pipeline(load(flux, flux_path)))
    assert np.abs(expected - plain).max() > 2, "the trained LoRA does not change the image"

    comfy = flux.to_comfyui(adapters.training_lora_state_dict(model), alpha=8)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = flux.lora_state_dict(tmp_path / "comfy.safetensors")
    pipe = flux.validation_pipeline(load(flux, flux_path))
    pipe.load_lora_weights(dict(back))
    assert np.abs(suite.image(flux, pipe) - expected).max() <= 1


def test_kontext_validation_edits_a_reference_at_its_training_size(flux, flux_path):
    """Kontext validates by editing a reference of the run (``validation_input``), dev and schnell
    from text; ``generate(image=)`` reaches ``FluxKontextPipeline(image=...)`` and changes the
    picture, and the reference is encoded at the size it comes in (no ~1 MP preferred-size resize)."""
    from PIL import Image

    assert flux.validation_input("kontext") == "reference"
    assert flux.validation_input("dev") is None and flux.validation_input("schnell") is None
    model = load(flux, flux_path, flavour="kontext")
    pipe = flux.validation_pipeline(model)
    shapes = []
    prepare = pipe.prepare_latents

    def spy(image, *args, **kwargs):
        shapes.append(None if image is None else tuple(image.shape))
        return prepare(image, *args, **kwargs)

    pipe.prepare_latents = spy
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    settings = dict(width=32, height=32, steps=1, guidance=2.5, seed=0)
    text_only = np.asarray(flux.generate(pipe, "a cat", **settings), dtype=np.float32)
    edited = np.asarray(flux.generate(pipe, "a cat", image=picture, **settings), dtype=np.float32)
    assert shapes == [None, (1, 3, 32, 48)]
    assert edited.shape == text_only.shape == (32, 32, 3)
    assert np.abs(edited - text_only).max() > 1


def test_validation_guidance_real_runs_classifier_free_guidance(flux, flux_path):
    """``validation_guidance_real`` > 1: FluxPipeline's true CFG against the negative prompt (the
    empty one when unset): two transformer calls a step and another image; 1 changes nothing;
    Chroma (real CFG already) does not take the key."""
    model = load(flux, flux_path)
    pipe = flux.validation_pipeline(model)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    kwargs = dict(width=32, height=32, steps=2, guidance=3.5, seed=0)
    plain = np.asarray(flux.generate(pipe, "a red square", **kwargs))
    assert len(calls) == 2
    calls.clear()
    real = np.asarray(flux.generate(pipe, "a red square", options={"validation_guidance_real": 4.0}, **kwargs))
    assert len(calls) == 4 and np.abs(real.astype(int) - plain.astype(int)).max() > 0
    negative = np.asarray(
        flux.generate(pipe, "a red square", negative_prompt="blue", options={"validation_guidance_real": 4.0}, **kwargs)
    )
    assert np.abs(negative.astype(int) - real.astype(int)).max() > 0  # the negative prompt is used
    assert flux.validation_call_options(pipe, {"validation_guidance_real": 1.0}, guidance=3.5) == {}
    assert "validation_guidance_real" not in get_family("chroma").validation_option_keys
