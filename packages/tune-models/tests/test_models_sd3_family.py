"""SD3: the conformance suite, plus conventions checked against diffusers' StableDiffusion3Pipeline.

One tiny SD3 is built per session (``sd3_path``) and shared by every test here.
"""

from __future__ import annotations

import numpy as np
import torch

from tune_models import adapters
from tune_models.testing import ModelFamilyTests
from tune_models.testing import load_tiny as load


class TestSD3Conformance(ModelFamilyTests):
    family_name = "sd3"
    tiny_path_fixture = "sd3_path"  # the session's tiny model, built once


def test_flavours(sd3):
    medium, large = sd3.flavour("medium"), sd3.flavour("large")
    assert sd3.flavour(None) is medium
    assert medium.pretrained == "stabilityai/stable-diffusion-3.5-medium" and medium.shift == 3.0
    assert large.pretrained == "stabilityai/stable-diffusion-3.5-large" and large.guidance > 1
    assert sd3.skip_guidance_layers["medium"] == [7, 8, 9]
    from tune_models.registry import model_families

    info = model_families.get("sd3").info
    assert set(info["flavours"]) == set(sd3.flavours) and set(info["lora_targets"]) == set(sd3.lora_target_presets)


def test_three_text_encoders_match_the_pipeline(sd3, sd3_path):
    model = load(sd3, sd3_path)
    assert len(model.text_encoders) == 3
    assert all(not any(p.requires_grad for p in e.parameters()) for e in model.text_encoders)
    prompts = ["a cat", "a much longer prompt about a red square"]
    encoded = sd3.encode_prompts(model, prompts)
    embeds, _, pooled, _ = sd3.validation_pipeline(model).encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=32
    )
    for i in range(2):
        torch.testing.assert_close(encoded[i]["prompt_embeds"], embeds[i])
        torch.testing.assert_close(encoded[i]["pooled_prompt_embeds"], pooled[i])
    assert encoded[0]["prompt_embeds"].shape == (77 + 32, 64)


def test_predict_is_the_pipelines_velocity(sd3, sd3_path):
    """One Euler step (sigma 1 -> 0, no CFG) of the pipeline returns ``noise - v``."""
    model = load(sd3, sd3_path)
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    out = sd3.validation_pipeline(model)(
        prompt="a cat", height=64, width=64, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=32,
        latents=noise.clone(), output_type="latent",
    ).images
    cond = sd3.collate_prompts(sd3.encode_prompts(model, ["a cat"]), "cpu", torch.float32)
    with torch.no_grad():
        velocity = sd3.predict(model, noise, torch.tensor([1.0]), cond)
    torch.testing.assert_close(out, noise - velocity, rtol=1e-4, atol=1e-5)


def test_fixed_shift_matches_the_scheduler(sd3, sd3_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = load(sd3, sd3_path)
    assert sd3.flow_shift(1024, 1024, shift=sd3.flavour("medium").shift, auto_shift=False) == 3.0
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    torch.testing.assert_close(sd3.shift_sigmas(unshifted, 3.0), scheduler.sigmas)


def test_lora_through_comfyui_layout_changes_the_pipeline(sd3, sd3_path, tmp_path):
    from safetensors.torch import save_file

    suite = TestSD3Conformance()
    model = load(sd3, sd3_path)
    suite.train(sd3, model, alpha=8)
    expected = suite.image(sd3, sd3.validation_pipeline(model))
    plain = suite.image(sd3, sd3.validation_pipeline(load(sd3, sd3_path)))
    assert np.abs(expected - plain).max() > 2
    save_file(sd3.to_comfyui(adapters.training_lora_state_dict(model), alpha=8), str(tmp_path / "comfy.safetensors"))
    pipe = sd3.validation_pipeline(load(sd3, sd3_path))
    pipe.load_lora_weights(dict(sd3.lora_state_dict(tmp_path / "comfy.safetensors")))
    assert np.abs(suite.image(sd3, pipe) - expected).max() <= 1
