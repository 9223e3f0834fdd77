"""Issue 5 training features through the real loop on the tiny Z-Image: resume exactness with EMA,
schedule-free and 8-bit optimizers, the NaN guard, epoch intervals, noise options, wandb.
(The disk-low guard is tested without a model in packages/tune-train/tests/test_train_run_control.py.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tune import Trainer

pytestmark = pytest.mark.slow


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw_schedulefree", "bnb-adamw8bit"])
def test_resume_is_exact_with_ema_accumulation_and_stateful_optimizers(
    optimizer, tmp_path, tiny_zimage, shapes_dir, write_run
):
    import pluggy

    from tune_data.plugins import plugin_manager

    settings = {
        "--optimizer": optimizer,
        "--gradient_accumulation_steps": 2,
        "--use_ema": True,
        "--ema_decay": 0.7,
        "--lora_dropout": 0.1,
        "--noise_offset": 0.1,
    }
    straight = write_run(tmp_path / "a", model=tiny_zimage, data=shapes_dir, steps=4, extra=settings)
    full = Trainer.from_config(straight, progress=False).train()

    class KillAfterStep2:
        @pluggy.HookimplMarker("tune")
        def tune_checkpoint_saved(self, trainer, step, path):
            if step == 2:
                raise Killed(path)

    broken = write_run(tmp_path / "b", model=tiny_zimage, data=shapes_dir, steps=4,
                       extra={**settings, "--checkpoint_step_interval": 2})
    plugin_manager().register(KillAfterStep2(), name="kill-after-2")
    try:
        with pytest.raises(Killed):
            Trainer.from_config(broken, progress=False).train()
    finally:
        plugin_manager().unregister(name="kill-after-2")
    state = torch.load(tmp_path / "b" / "output" / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["ema"]["num_updates"] == 2

    resumed = Trainer.from_config(broken, progress=False)
    resumed.config.resume_from_checkpoint = "latest"
    result = resumed.train()
    assert result.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)

    # The EMA file is exported beside the LoRA, in the same layout, and continues exactly.
    ema_a, ema_b = load_file(full.outputs["lora_ema"]), load_file(result.outputs["lora_ema"])
    lora = load_file(full.outputs["lora"])
    assert Path(full.outputs["lora_ema"]).name == "pytorch_lora_weights_ema.safetensors"
    assert set(ema_a) == set(lora) == set(ema_b)
    for key in ema_a:
        assert torch.allclose(ema_a[key], ema_b[key], rtol=1e-5, atol=1e-7), key
    assert any(not torch.equal(ema_a[key], lora[key]) for key in lora)


def test_a_non_finite_gradient_stops_naming_the_parameter_and_nothing_is_saved_after_it(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    from tune_train.trainer import Trainer as Loop

    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=3, extra={"--checkpoint_step_interval": 1})
    facade = Trainer.from_config(config, progress=False)
    loop = Loop(facade.loaded.train, facade.loaded.datasets, progress=False)
    loop.setup()
    name, param = loop._trainable_named()[5]
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    param.register_hook(poison)
    with pytest.raises(FloatingPointError, match=rf"non-finite gradient at step 2 .*{name}"):
        loop.train()
    out = tmp_path / "output"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_epoch_intervals_checkpoint_and_validate_with_ema_comparison_images(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=0,
        extra={
            "--num_train_epochs": 2,
            "--train_batch_size": 4,  # 8 images: 2 steps per epoch
            "--checkpoint_epoch_interval": 1,
            "--validation_epoch_interval": 1,
            "--validation_disable": False,
            "--validation_on_startup": False,
            "--validation_prompt": "a red circle",
            "--validation_resolution": "32",
            "--validation_num_inference_steps": 1,
            "--use_ema": True,
            "--ema_validation": "comparison",
            "--ema_device": "accelerator",
            "--ema_update_interval": 2,
        },
    )
    result = Trainer.from_config(config, progress=False).train()
    out = tmp_path / "output"
    assert result.global_step == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for step in ("000002", "000004"):  # epoch 1, then the final validation
        names = sorted(p.name for p in (out / "validation" / f"step-{step}").glob("*.png"))
        assert names == ["validation-32x32-ema.png", "validation-32x32.png"]
    state = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=False)
    assert state["ema"]["num_updates"] == 2  # every 2nd step


def test_sigma_schedules_noise_options_and_the_bf16_optimizer_train(tmp_path, tiny_zimage, shapes_dir, write_run):
    base = write_run(tmp_path / "base", model=tiny_zimage, data=shapes_dir, steps=1)
    baseline = Trainer.from_config(base, progress=False).train().losses
    options = {
        "--flow_use_beta_schedule": True,
        "--flow_beta_schedule_alpha": 3.0,
        "--noise_offset": 0.1,
        "--noise_offset_probability": 1.0,
        "--input_perturbation": 0.1,
        "--optimizer": "adamw_bf16",
    }
    run = write_run(tmp_path / "opts", model=tiny_zimage, data=shapes_dir, steps=2, extra=options)
    result = Trainer.from_config(run, progress=False).train()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[0] != pytest.approx(baseline[0], rel=1e-4)
    tensors = load_file(result.outputs["lora"])
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # adamw_bf16 trains bf16 weights


def test_wandb_offline_logs_loss(tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=2,
                       extra={"--report_to": "wandb", "--tracker_run_name": "tiny"})
    result = Trainer.from_config(config, progress=False).train()
    runs = list(Path(result.outputs["wandb"]).rglob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    rows = list(csv.DictReader((tmp_path / "output" / "loss_log.csv").open()))
    assert len(rows) == 2


def test_vae_cache_clear_each_epoch_encodes_every_image_again_each_epoch(tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch):
    """8 images, batch 2: 4 steps an epoch. With the cache cleared at each epoch's end, the
    second epoch encodes all 8 again (on demand); without it, nothing is encoded twice."""
    from tune_models.family import get_family

    family = type(get_family("z-image"))
    encoded = []
    original = family.encode_images

    def counting(self, model, pixels):
        encoded.append(pixels.shape[0])
        return original(self, model, pixels)

    monkeypatch.setattr(family, "encode_images", counting)
    for clear in (False, True):
        encoded.clear()
        config = write_run(tmp_path / str(clear), model=tiny_zimage, data=shapes_dir, steps=8,
                           dataset_extra={"vae_cache_clear_each_epoch": clear})
        Trainer.from_config(config, progress=False).train()
        assert sum(encoded) == (16 if clear else 8), (clear, encoded)
