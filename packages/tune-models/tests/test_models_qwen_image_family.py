"""Qwen-Image: the conformance suite, plus conventions checked against diffusers' QwenImagePipeline.

One tiny Qwen-Image is built per session (``qwen_path``) and shared by every test here. The tiny
matrices run many times faster on one thread when the CPU is shared, so this module pins torch to
one thread while it runs (and restores the setting).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.family import get_family
from tune_models.testing import ModelFamilyTests, assert_padding_is_masked
from tune_models.testing import load_tiny as load

pytestmark = pytest.mark.usefixtures("one_thread")


class TestQwenImageConformance(ModelFamilyTests):
    family_name = "qwen_image"
    image_size = 32
    tiny_path_fixture = "qwen_path"  # the session's tiny model, built once
    input_flavour = "edit"  # edits a reference image
    input_tiny_path_fixture = "edit_path"  # the tiny edit folder (VL text encoder, processor; conftest)
    input_fixtures = ("small_vae_area",)  # the edit pipeline's reference area, scaled for the tiny VAE


def test_names_and_flavours(qwen):
    assert get_family("qwen_image") is qwen and get_family("Qwen-Image") is qwen
    base = qwen.flavour(None)
    assert (base.name, base.pretrained, base.inference_steps, base.guidance, base.shift) == (
        "base", "Qwen/Qwen-Image", 50, 4.0, None
    )
    assert set(qwen.flavours) == {"base", "2512", "edit", "edit-plus", "edit-2511", "tiny"}
    assert set(qwen.lora_target_presets) == {"all", "attention"} and qwen.default_lora_target == "all"
    assert set(qwen.lora_target_presets["attention"]) < set(qwen.lora_target_presets["all"])
    from tune_models.registry import model_families

    info = model_families.get("qwen-image").info
    assert set(info["flavours"]) == set(qwen.flavours) and info["default_flavour"] == "base"
    assert set(info["lora_targets"]) == set(qwen.lora_target_presets)


def test_prompt_template_matches_the_pipeline(qwen, qwen_path):
    from tune_models.families.qwen_image import family as module

    pipe = qwen.validation_pipeline(load(qwen, qwen_path))
    assert module.PROMPT_TEMPLATE == pipe.prompt_template_encode
    assert module.PROMPT_DROP_TOKENS == pipe.prompt_template_encode_start_idx
    assert module.TOKENIZER_MAX_LENGTH == pipe.tokenizer_max_length


def test_prompts_and_masks_match_the_pipeline(qwen, qwen_path):
    model = load(qwen, qwen_path)
    prompts = ["a cat", "a much longer prompt about a red square"]
    encoded = qwen.encode_prompts(model, prompts)
    embeds, mask = qwen.validation_pipeline(model).encode_prompt(prompts, max_sequence_length=512)
    batch = qwen.collate_prompts(encoded, "cpu", torch.float32)
    torch.testing.assert_close(batch["prompt_embeds"], embeds)
    assert torch.equal(batch["prompt_embeds_mask"], mask)
    assert encoded[0]["prompt_embeds"].shape[0] < encoded[1]["prompt_embeds"].shape[0]
    assert all(bool(item["prompt_embeds_mask"].all()) for item in encoded)


def test_predict_is_the_pipelines_velocity(qwen, qwen_path):
    """One Euler step of QwenImagePipeline from sigma 1 to 0 (no CFG) returns ``noise - v``;
    ``predict`` at sigma 1 must give the same ``v``: timestep, sign, packing, img_shapes and the
    prompt mask all agree with the pipeline's own transformer call. With two prompts of different
    lengths, the padded one exercises the mask."""
    model = load(qwen, qwen_path)
    prompts = ["a cat", "a much longer prompt about a red square"]
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe = qwen.validation_pipeline(model)
    out = pipe(
        prompt=prompts, height=32, width=32, num_inference_steps=1, true_cfg_scale=1.0,
        latents=qwen.pack(noise), output_type="latent", sigmas=[1.0],
    ).images
    cond = qwen.collate_prompts(qwen.encode_prompts(model, prompts), "cpu", torch.float32)
    with torch.no_grad():
        velocity = qwen.predict(model, noise, torch.tensor([1.0, 1.0]), cond)
    torch.testing.assert_close(qwen.unpack(out, 16, 16), noise - velocity, rtol=1e-4, atol=1e-5)


def test_mask_hides_padding(qwen, qwen_path):
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a much longer prompt"]
    assert_padding_is_masked(qwen, load(qwen, qwen_path), prompts, latents, mask_key="prompt_embeds_mask")


def test_pack_round_trip_matches_diffusers(qwen):
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = qwen.pack(latents)
    torch.testing.assert_close(packed, QwenImagePipeline._pack_latents(latents, 2, 16, 8, 12))
    torch.testing.assert_close(qwen.unpack(packed, 8, 12), latents)


def test_latents_use_the_vae_normalisation(qwen, qwen_path):
    model = load(qwen, qwen_path)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = qwen.encode_images(model, pixels)
    cfg = model.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    raw = model.vae.encode(pixels[:, :, None]).latent_dist.mean
    torch.testing.assert_close(latents, ((raw - mean) / std)[:, :, 0])
    assert latents.shape == (1, 16, 16, 16) and qwen.decode_latents(model, latents).shape == pixels.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        qwen.encode_images(model, torch.zeros(1, 3, 30, 32))


def test_auto_shift_matches_the_pipeline(qwen, qwen_path):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    model = load(qwen, qwen_path)  # tiny VAE downsamples 2x: 32 px has 64 packed tokens
    cfg = model.scheduler.config
    mu = calculate_shift(64, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert math.isclose(qwen.flow_shift(32, 32, shift=None, auto_shift=True, model=model), math.exp(mu))


def test_lora_changes_pipeline_output_in_both_layouts(qwen, qwen_path, tmp_path):
    """A few LoRA steps, saved in diffusers layout and in ComfyUI layout (read back through
    ``lora_state_dict``), change QwenImagePipeline's image (true CFG on) after
    ``load_lora_weights``."""
    from safetensors.torch import save_file

    suite = TestQwenImageConformance()
    model = load(qwen, qwen_path)
    losses = suite.train(qwen, model, alpha=8)
    assert losses[-1] < losses[0]
    expected = suite.image(qwen, qwen.validation_pipeline(model))
    plain = suite.image(qwen, qwen.validation_pipeline(load(qwen, qwen_path)))
    assert np.abs(expected - plain).max() > 2, "the trained LoRA does not change the image"

    state_dict = adapters.training_lora_state_dict(model)
    assert any(".img_mlp." in k for k in state_dict) and any(".add_q_proj." in k for k in state_dict)
    comfy = qwen.to_comfyui(state_dict, alpha=8)
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in comfy)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = qwen.lora_state_dict(tmp_path / "comfy.safetensors")
    pipe = qwen.validation_pipeline(load(qwen, qwen_path))
    pipe.load_lora_weights(dict(back))
    assert np.abs(suite.image(qwen, pipe) - expected).max() <= 1
    # diffusers' own reader takes the same ComfyUI file (its Qwen converter).
    from diffusers import QwenImagePipeline

    direct = QwenImagePipeline.lora_state_dict(str(tmp_path), weight_name="comfy.safetensors")
    assert set(direct) == set(back)


def test_attention_preset_targets_projections_only(qwen, qwen_path):
    model = load(qwen, qwen_path)
    adapters.add_training_lora(model, rank=2, alpha=2, target="attention")
    keys = adapters.training_lora_state_dict(model)
    assert keys and not any("_mlp." in k for k in keys)
