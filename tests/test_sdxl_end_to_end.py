"""A tiny SDXL LoRA trained end to end through the generic loop (DDPM epsilon / v-prediction,
min-SNR, micro-conditioning), exported, and loaded into diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tune.config import load_config
from tune_train.trainer import Trainer as Loop

pytestmark = pytest.mark.slow


def _sdxl_run(write_run, root, model, data, steps, **extra):
    return write_run(
        root,
        model=model,
        data=data,
        steps=steps,
        extra={"--model_family": "sdxl", "--model_flavour": "base", **extra},
    )


def _loop(config: Path) -> Loop:
    """The training loop itself (the facade's ``Trainer`` hides it), to inspect its scheme."""
    loaded = load_config(config)
    assert not {"snr_gamma", "prediction_type", "use_soft_min_snr", "refiner_training"} & set(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


def _pipeline_image(model_dir: Path, lora: Path | None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    out = pipe("a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=3,
               guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def test_sdxl_lora_trains_exports_and_changes_the_pipeline_image(tmp_path, tiny_sdxl, shapes_dir, write_run):
    config = _sdxl_run(
        write_run, tmp_path, tiny_sdxl, shapes_dir, 6,
        **{
            "--learning_rate": 5e-2,
            "--snr_gamma": 5.0,
            "--validation_disable": False,
            "--validation_prompt": "a blue square",
            "--validation_negative_prompt": "blurry",
            "--validation_resolution": "32",
            "--validation_num_inference_steps": 2,
        },
    )
    trainer = _loop(config)
    result = trainer.train()
    assert trainer.ddpm is not None and trainer.ddpm.prediction_type == "epsilon" and trainer.ddpm.snr_gamma == 5.0
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    out = tmp_path / "output"
    assert (out / "validation" / "step-000006").is_dir()
    lora = Path(result.outputs["lora"])
    from safetensors import safe_open

    with safe_open(lora, "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    plain = _pipeline_image(tiny_sdxl, None)
    with_lora = _pipeline_image(tiny_sdxl, lora)
    assert abs(plain - with_lora).max() > 1e-3


def test_micro_conditioning_reaches_the_unet(tmp_path, tiny_sdxl, shapes_dir, write_run, monkeypatch):
    """Each sample's original size, crop and bucket size become its ``add_time_ids``."""
    config = _sdxl_run(write_run, tmp_path, tiny_sdxl, shapes_dir, 1)
    trainer = _loop(config)
    trainer.setup()
    seen = []
    original = trainer.family.predict

    def spy(model, noisy, timesteps, prompts):
        seen.append((timesteps.clone(), prompts["add_time_ids"].clone()))
        return original(model, noisy, timesteps, prompts)

    monkeypatch.setattr(trainer.family, "predict", spy)
    dataset_id, batch = next(iter(trainer.sampler))
    trainer.compute_loss(dataset_id, batch, torch.Generator().manual_seed(0))
    (timesteps, time_ids), = seen
    # integer DDPM timesteps of the scheduler's schedule, not flow sigmas
    assert timesteps.dtype == torch.int64 and ((timesteps >= 0) & (timesteps < 1000)).all()
    for planned, row in zip(batch, time_ids.tolist()):
        width, height = planned.bucket
        left, top = planned.crop_box[:2]
        assert row == [planned.record.height, planned.record.width, top, left, height, width]
    # 32 px images in 64 px buckets (the alignment): original and target sizes really differ
    assert time_ids[:, :2].tolist() == [[32, 32]] * 2 and time_ids[:, 4:].tolist() == [[64, 64]] * 2


def test_v_prediction_with_min_snr_lowers_the_loss_on_a_fixed_batch(tiny_sdxl):
    from tune_models import adapters
    from tune_models.family import ModelSource, get_family
    from tune_train.ddpm import DDPMScheme

    family = get_family("sdxl")
    model = family.load(ModelSource(pretrained_model_name_or_path=str(tiny_sdxl)), "tiny")
    model.extras["prediction_type"] = "v_prediction"
    scheme = DDPMScheme.from_scheduler(model.scheduler, prediction_type=family.prediction_type(model), snr_gamma=5.0)
    params = adapters.add_training_lora(model, rank=4, alpha=4, target="all+ffs")
    from tune_models.families._shared import synthetic_images

    latents = family.encode_images(model, synthetic_images(2, 32))
    cond = family.collate_prompts(family.encode_prompts(model, ["a red square", "a blue circle"]), "cpu", torch.float32)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([150, 600])
    noisy, target = scheme.add_noise(latents, noise, timesteps), scheme.target(latents, noise, timesteps)
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    model.transformer.train()
    losses = []
    for _ in range(10):
        loss = scheme.loss(family.predict(model, noisy, timesteps, cond), target, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_v_prediction_soft_min_snr_run_validates_with_a_v_scheduler(tmp_path, tiny_sdxl, shapes_dir, write_run):
    config = _sdxl_run(
        write_run, tmp_path, tiny_sdxl, shapes_dir, 2,
        **{"--prediction_type": "v_prediction", "--snr_gamma": 5, "--use_soft_min_snr": True,
           "--refiner_training": True, "--refiner_training_strength": 0.5},
    )
    trainer = _loop(config)
    result = trainer.train()
    assert trainer.ddpm.prediction_type == "v_prediction" and trainer.ddpm.soft_min_snr
    assert trainer.ddpm.max_timestep == 500
    assert all(torch.isfinite(torch.tensor(result.losses)))
    pipeline = trainer.family.validation_pipeline(trainer.model)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


def test_flow_family_refuses_a_ddpm_prediction_type(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={"--prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="prediction_type 'epsilon' does not apply"):
        _loop(config).setup()


def test_tune_check_shows_the_ddpm_noise_settings(tmp_path, tiny_sdxl, shapes_dir, write_run):
    from tune.plan import build_plan, format_plan

    config = _sdxl_run(write_run, tmp_path, tiny_sdxl, shapes_dir, 1, **{"--snr_gamma": 5, "--prediction_type": "v_prediction"})
    plan = build_plan(load_config(config))
    assert plan["family"]["prediction"] == "epsilon"
    assert plan["noise"]["prediction_type"] == "v_prediction" and plan["noise"]["snr_gamma"] == 5
    assert "flow_shift" not in plan["noise"] and "snr_gamma" in format_plan(plan)


def test_kohya_init_lora_and_comfyui_export(tmp_path, tiny_sdxl, shapes_dir, write_run):
    """A kohya-layout file starts the adapter; ``lora_format: comfyui`` writes ``lora_unet_`` keys
    that read back exactly."""
    from safetensors.torch import load_file, save_file

    from tune_models.family import get_family

    family = get_family("sdxl")
    first = _sdxl_run(write_run, tmp_path / "a", tiny_sdxl, shapes_dir, 2, **{"--learning_rate": 5e-2})
    trained = load_file(_loop(first).train().outputs["lora"])
    kohya = tmp_path / "kohya.safetensors"
    save_file(family.to_comfyui(trained, alpha=4.0), kohya)
    second = _sdxl_run(
        write_run, tmp_path / "b", tiny_sdxl, shapes_dir, 1,
        **{"--init_lora": str(kohya), "--lora_format": "comfyui", "--learning_rate": 1e-12},
    )
    loop = _loop(second)
    loop.setup()
    start = loop._lora_state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(start[key], value)
    exported = Path(loop.train().outputs["lora"])
    keys = list(load_file(exported))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    # Read back through the family (as init_lora does): the weights the loop ended with.
    back = family.lora_state_dict(exported)
    final = loop._lora_state_dict()
    assert set(back) == set(final)
    for key, value in final.items():
        torch.testing.assert_close(back[key], value)
    # diffusers' own reader takes the ComfyUI file as it is (no diffusers alpha header beside
    # the kohya alphas, which it refuses).
    from safetensors import safe_open

    with safe_open(exported, "pt") as handle:
        assert "lora_adapter_metadata" not in (handle.metadata() or {})
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name)


def test_refiner_trains_its_low_noise_range_and_validates_by_refining_a_training_image(tmp_path, shapes_dir, write_run):
    from PIL import Image
    from tune_models.families.sdxl.tiny import build_tiny_refiner

    refiner = build_tiny_refiner(tmp_path / "refiner")
    config = _sdxl_run(
        write_run, tmp_path / "run", refiner, shapes_dir, 2,
        **{"--model_flavour": "refiner", "--refiner_training": True, "--validation_disable": False,
           "--validation_prompt": "a cat", "--validation_resolution": "32", "--sdxl_aesthetic_score": 7.0},
    )
    loop = _loop(config)
    result = loop.train()
    assert loop.ddpm.max_timestep == 200 and len(result.losses) == 2
    assert loop.model.extras["aesthetic_score"] == 7.0
    assert Path(result.outputs["lora"]).is_file()
    validation = tmp_path / "run" / "output" / "validation"
    # The input is a training image as training sees it (its 64 px bucket here, from 32 px files).
    given = Image.open(validation / "input.png")
    assert given.size in loop.data.prepared["shapes"].buckets
    small = np.asarray(given.resize((32, 32), Image.LANCZOS)).astype(int)
    sources = [np.asarray(Image.open(p).convert("RGB")).astype(int) for p in shapes_dir.rglob("*.png")]
    assert min(np.abs(small - source).mean() for source in sources) < 8
    refined = [p for p in validation.rglob("*.png") if p.name != "input.png"]
    assert refined and all(Image.open(p).size == (32, 32) for p in refined)


def test_full_fine_tune_of_a_unet_exports_a_unet_folder_the_pipeline_takes(tmp_path, tiny_sdxl, shapes_dir, write_run):
    """``model_type: full`` writes the denoiser under the pipeline's own component name (``unet/``
    for SDXL), and the model card's snippet passes it as ``unet=``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    config = _sdxl_run(write_run, tmp_path, tiny_sdxl, shapes_dir, 2,
                       **{"--model_type": "full", "--learning_rate": 1e-3, "--optimizer": "adamw"})
    result = _loop(config).train()
    folder = Path(result.outputs["transformer"])
    assert folder == tmp_path / "output" / "unet" and (folder / "config.json").is_file()
    unet = UNet2DConditionModel.from_pretrained(folder)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), base.state_dict().values()))
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, unet=unet)  # the pipeline takes it
    card = (tmp_path / "output" / "README.md").read_text()
    assert "unet=unet" in card and "/unet" in card
