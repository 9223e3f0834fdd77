"""Z-Image specifics: sources, names, the assistant adapter, conventions checked against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.family import ModelSource
from tune_models.testing import load_tiny as load


def batch(zimage, model, prompts=("a red square", "a cat")):
    pixels = torch.rand(len(prompts), 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = zimage.encode_images(model, pixels)
    cond = zimage.collate_prompts(zimage.encode_prompts(model, list(prompts)), model.device, model.dtype)
    return latents, cond


# ------------------------------------------------------------------ names and flavours
def test_names_resolve_to_one_family(zimage):
    from tune_models.family import get_family

    for name in ("z-image", "z_image", "Z-Image", "zimage"):
        assert get_family(name) is zimage
    assert set(zimage.aliases) >= {"z_image", "zimage"}


def test_unknown_family_lists_registered():
    from tune_data.plugins import UnknownNameError
    from tune_models.family import get_family

    with pytest.raises(UnknownNameError, match="z-image") as info:
        get_family("flux-99")
    assert "Registered:" in str(info.value)


def test_unknown_flavour_lists_flavours(zimage, tiny_path):
    with pytest.raises(ValueError, match="turbo-ostris-v2"):
        zimage.flavour("turbo-v9")
    with pytest.raises(ValueError, match="unknown model_flavour"):
        load(zimage, tiny_path, flavour="nope")


def test_flavours_match_published_checkpoints(zimage):
    turbo, v2, base = zimage.flavour("turbo"), zimage.flavour("turbo-ostris-v2"), zimage.flavour("base")
    assert zimage.flavour(None) is turbo
    assert turbo.pretrained == v2.pretrained == "Tongyi-MAI/Z-Image-Turbo"
    assert turbo.assistant_lora == v2.assistant_lora == "ostris/zimage_turbo_training_adapter"
    assert turbo.assistant_lora_weight_name == "zimage_turbo_training_adapter_v1.safetensors"
    assert v2.assistant_lora_weight_name == "zimage_turbo_training_adapter_v2.safetensors"
    assert (turbo.inference_steps, turbo.guidance) == (8, 0.0)
    assert base.pretrained == "Tongyi-MAI/Z-Image" and base.assistant_lora is None and base.guidance > 1


def test_registration_is_cheap():
    """Listing families must not import torch or diffusers (``tune plugins`` stays fast)."""
    import subprocess
    import sys

    code = (
        "import sys; from tune_models.registry import model_families; "
        "entry = model_families.get('z_image'); assert 'turbo' in entry.info['flavours']; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ loading
def test_transformer_folder_with_subfolder_none(zimage, tiny_path):
    plain = load(zimage, tiny_path)
    for spelling in ("none", "None"):
        split = load(
            zimage,
            tiny_path,
            pretrained_transformer_model_name_or_path=str(tiny_path / "transformer"),
            pretrained_transformer_subfolder=spelling,
        )
        for (name, a), b in zip(plain.transformer.state_dict().items(), split.transformer.state_dict().values()):
            assert torch.equal(a, b), name


def test_vae_override_accepts_pipeline_or_vae_folder(zimage, tiny_path):
    for location in (tiny_path, tiny_path / "vae"):
        model = load(zimage, tiny_path, pretrained_vae_model_name_or_path=str(location))
        assert model.vae.config.latent_channels == 16


def test_tiny_flavour_builds_itself(zimage, tiny_cache, monkeypatch):
    # The session's ``tiny_cache`` fixture had the tiny flavour build itself there; loading it
    # again finds that build instead of making another.
    assert (tiny_cache / "z-image-v1" / "model_index.json").is_file()
    monkeypatch.setenv("TUNE_TINY_CACHE", str(tiny_cache))
    model = zimage.load(ModelSource(), "tiny")
    assert model.extras["root"] == str(tiny_cache / "z-image-v1")
    assert model.flavour.name == "tiny" and not model.has_assistant


def test_missing_checkpoint_fails_clearly(zimage, tmp_path):
    with pytest.raises((OSError, EnvironmentError, ValueError)):
        load(zimage, tmp_path / "does-not-exist")


# ------------------------------------------------------------------ conventions vs diffusers
def test_prompt_embeds_match_pipeline(zimage, tiny_path):
    model = load(zimage, tiny_path)
    prompts = ["a red square", "a much longer prompt about a blue circle on white"]
    ours = zimage.encode_prompts(model, prompts, batch_size=1)
    theirs, _ = zimage.validation_pipeline(model).encode_prompt(
        list(prompts), device="cpu", do_classifier_free_guidance=False
    )
    assert ours[0]["prompt_embeds"].shape[0] != ours[1]["prompt_embeds"].shape[0]
    for mine, reference in zip(ours, theirs):
        assert mine["prompt_embeds"].shape == reference.shape and reference.shape[-1] == 32
        torch.testing.assert_close(mine["prompt_embeds"], reference)


def test_predict_is_noise_minus_x0_as_the_pipeline_steps(zimage, tiny_path):
    """One Euler step of ``ZImagePipeline`` from sigma to 0 must equal ``x_t - sigma * predict``."""
    model = load(zimage, tiny_path)
    latents, cond = batch(zimage, model, prompts=("a red square",))
    x_t = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    pipeline = zimage.validation_pipeline(model)
    stepped = pipeline(
        prompt_embeds=cond["prompt_embeds"],
        latents=x_t.clone(),
        sigmas=[0.6],
        num_inference_steps=1,
        guidance_scale=0.0,
        height=64,
        width=64,
        output_type="latent",
    ).images
    sigma = float(pipeline.scheduler.sigmas[0])  # after the scheduler's own shift
    with torch.no_grad():
        ours = x_t - sigma * zimage.predict(model, x_t, torch.tensor([sigma]), cond)
    torch.testing.assert_close(stepped, ours, rtol=1e-4, atol=1e-5)


def test_encode_images_uses_scaling_and_is_invertible_in_shape(zimage, tiny_path):
    model = load(zimage, tiny_path)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = zimage.encode_images(model, pixels)
    raw = model.vae.encode(pixels).latent_dist.mean
    cfg = model.vae.config
    torch.testing.assert_close(latents, (raw - cfg.shift_factor) * cfg.scaling_factor)
    assert latents.shape == (1, 16, 32, 32)
    assert zimage.decode_latents(model, latents).shape == pixels.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        zimage.encode_images(model, torch.zeros(1, 3, 62, 64))


def test_flow_shift(zimage, tiny_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    sizes = [(256, 256), (512, 512), (1024, 1024), (2048, 2048)]
    shifts = [zimage.flow_shift(h, w, shift=None, auto_shift=True) for h, w in sizes]
    assert shifts == sorted(shifts) and len(set(shifts)) == len(shifts)
    assert math.isclose(shifts[2], math.exp(calculate_shift((1024 // 16) ** 2)))
    assert zimage.flow_shift(1024, 1024, shift=3.0, auto_shift=False) == 3.0
    assert zimage.flow_shift(1024, 1024, shift=None, auto_shift=False) == shifts[2]  # no fixed shift known
    model = load(zimage, tiny_path)  # tiny VAE downsamples 2x: 64 px already has 256 tokens
    assert math.isclose(
        zimage.flow_shift(64, 64, shift=None, auto_shift=True, model=model), math.exp(calculate_shift(256))
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    torch.testing.assert_close(zimage.shift_sigmas(unshifted, 3.0), scheduler.sigmas)


# ------------------------------------------------------------------ the assistant adapter
def test_assistant_adapter_loaded_frozen_and_switchable(zimage, tiny_path, assistant_file):
    model = load(zimage, tiny_path, assistant_lora_path=str(assistant_file))
    assert model.has_assistant and adapters.ASSISTANT_ADAPTER in model.transformer.peft_config
    assert not any(p.requires_grad for p in model.transformer.parameters())
    assert adapters.assistant_adapter_name == "assistant"

    plain = load(zimage, tiny_path)
    latents, cond = batch(zimage, model)
    noisy, sigmas = torch.randn_like(latents), torch.tensor([0.4, 0.8])
    with torch.no_grad():
        with_assistant = zimage.predict(model, noisy, sigmas, cond)
        adapters.set_assistant_enabled(model, False)
        without = zimage.predict(model, noisy, sigmas, cond)
        reference = zimage.predict(plain, noisy, sigmas, cond)
        adapters.set_assistant_enabled(model, True)
        again = zimage.predict(model, noisy, sigmas, cond)
    assert not torch.allclose(with_assistant, without)
    torch.testing.assert_close(without, reference)
    torch.testing.assert_close(again, with_assistant)


def test_training_lora_beside_assistant(zimage, tiny_path, assistant_file):
    model = load(zimage, tiny_path, assistant_lora_path=str(assistant_file))
    params = adapters.add_training_lora(model, rank=4, alpha=4, dropout=0.0, target="attention")
    names = {id(p): n for n, p in model.transformer.named_parameters()}
    assert params and all(".tune." in names[id(p)] for p in params)
    assert adapters.active_adapters(model) == ["assistant", "tune"]
    for enabled in (False, True):  # toggling must not unfreeze the assistant or freeze the LoRA
        adapters.set_assistant_enabled(model, enabled)
        trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
        assert sorted(trainable) == sorted(names[id(p)] for p in params)

    # one step moves the training LoRA only
    assistant_before = {n: p.clone() for n, p in model.transformer.named_parameters() if ".assistant." in n}
    latents, cond = batch(zimage, model)
    model.transformer.enable_gradient_checkpointing()
    model.transformer.train()
    loss = zimage.predict(model, torch.randn_like(latents), torch.tensor([0.5, 0.5]), cond).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    for n, p in model.transformer.named_parameters():
        if n in assistant_before:
            assert torch.equal(p, assistant_before[n]) and p.grad is None

    state_dict = adapters.training_lora_state_dict(model)
    modules = {n.removesuffix(".lora_A.tune.weight") for n in names.values() if n.endswith(".lora_A.tune.weight")}
    assert {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in state_dict if "lora_A" in k} == modules
    layer = model.transformer.layers[0].attention.to_q
    torch.testing.assert_close(state_dict["transformer.layers.0.attention.to_q.lora_B.weight"], layer.lora_B["tune"].weight)
    assert not any("feed_forward" in k for k in state_dict)  # the assistant's ff weights stay out


def test_disable_assistant_lora_skips_it(zimage, tiny_path, assistant_file):
    model = load(zimage, tiny_path, assistant_lora_path=str(assistant_file), disable_assistant_lora=True)
    assert not model.has_assistant and not getattr(model.transformer, "peft_config", None)
    adapters.set_assistant_enabled(model, True)  # harmless without one
    assert adapters.active_adapters(model) == []


def test_assistant_from_folder_and_weight_name(zimage, tiny_path, assistant_file):
    model = load(
        zimage,
        tiny_path,
        flavour="turbo",  # its hub adapter is replaced by the local one, so nothing is downloaded
        assistant_lora_path=str(assistant_file.parent),
        assistant_lora_weight_name=assistant_file.name,
    )
    assert model.has_assistant and model.flavour.name == "turbo"


def test_add_training_lora_validates(zimage, tiny_path):
    model = load(zimage, tiny_path)
    with pytest.raises(ValueError, match="lora_rank must be > 0"):
        adapters.add_training_lora(model, rank=0, alpha=1, dropout=0.0, target="all")
    with pytest.raises(ValueError, match="attention"):
        adapters.add_training_lora(model, rank=4, alpha=4, dropout=0.0, target="everything")
    with pytest.raises(ValueError, match="reserved"):
        adapters.add_training_lora(model, rank=4, alpha=4, adapter_name="assistant")
    params = adapters.add_training_lora(model, rank=2, alpha=2, target=["feed_forward.w2"], param_dtype=torch.float64)
    assert len(params) == 2 * 4 and all(p.dtype == torch.float64 for p in params)  # 4 blocks x (A, B)


def test_lora_file_metadata_keeps_alpha_in_any_writer(zimage, tiny_path, tmp_path):
    """A file written by other code (tune-publish) with our header entries loads exactly."""
    from safetensors.torch import save_file

    model = load(zimage, tiny_path)
    adapters.add_training_lora(model, rank=4, alpha=16, target="all")
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    header = adapters.lora_file_metadata(model)
    save_file(adapters.training_lora_state_dict(model), str(tmp_path / "lora.safetensors"), metadata=header)
    latents, cond = batch(zimage, model)
    sigmas = torch.tensor([0.3, 0.6])
    fresh = load(zimage, tiny_path)
    zimage.validation_pipeline(fresh).load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(
            zimage.predict(fresh, latents, sigmas, cond), zimage.predict(model, latents, sigmas, cond)
        )


def test_registration_facts_describe_the_flavours(zimage):
    from tune_models.registry import model_families

    info = model_families.get("z-image").info
    assert info["default_flavour"] == zimage.default_flavour
    assert set(info["flavours"]) == set(zimage.flavours)
    assert info["flavours"]["turbo"]["assistant_lora"] == zimage.flavour("turbo").assistant_lora
    assert model_families.get("zimage") is model_families.get("z-image")  # an alias, listed once
    assert model_families.names().count("z-image") == 1 and "zimage" not in model_families.names()


def test_base_flavour_validates_with_real_classifier_free_guidance(zimage, tiny_path):
    """Z-Image base is undistilled: its validation runs 28-50 steps at guidance 4-6 with a real
    negative branch (the transformer sees prompt and negative prompt at every step)."""
    base = zimage.flavour("base")
    assert 28 <= base.inference_steps <= 50 and 4.0 <= base.guidance <= 6.0
    model = load(zimage, tiny_path)
    pipeline = zimage.validation_pipeline(model)
    branches = []
    hook = pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: branches.append(len(args[0] if args else kwargs["x"])), with_kwargs=True
    )

    def image(guidance, negative):
        branches.clear()
        out = zimage.generate(pipeline, "a red square", width=64, height=64, steps=2,
                              guidance=guidance, seed=0, negative_prompt=negative)
        return np.asarray(out, dtype=np.float32), list(branches)

    try:
        plain, plain_branches = image(0.0, None)
        cfg, cfg_branches = image(base.guidance, "blurry, low quality")
        other_negative, _ = image(base.guidance, "a red square")
    finally:
        hook.remove()
    assert plain_branches == [1, 1] and cfg_branches == [2, 2]  # prompt + negative, each step
    assert np.abs(cfg - plain).max() > 1.0
    assert np.abs(cfg - other_negative).max() > 1.0  # the negative prompt is used
