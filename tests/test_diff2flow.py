"""Diff2Flow on a tiny SDXL: an epsilon UNet trained with the flow-matching objective through the
generic loop (``diff2flow_enabled`` + ``diff2flow_loss``), and the flow families refusing the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune.config import load_config
from tune_train.trainer import Trainer as Loop

pytestmark = pytest.mark.slow

DIFF2FLOW = {"--diff2flow_enabled": True, "--diff2flow_loss": True}


def _loop(config: Path) -> Loop:
    loaded = load_config(config)
    assert not {"diff2flow_enabled", "diff2flow_loss"} & set(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


def test_diff2flow_lowers_the_flow_loss_of_an_epsilon_unet_on_a_fixed_batch(tiny_sdxl):
    """LoRA steps on the converted prediction bring the implied velocity toward ``noise - x0``;
    the native epsilon error falls with it (the bridge trains the same optimum)."""
    from tune_models import adapters
    from tune_models.families._shared import synthetic_images
    from tune_models.family import ModelSource, get_family
    from tune_train.ddpm import DDPMScheme

    torch.manual_seed(0)  # the LoRA's random init: without a seed the curve depended on the tests run before
    family = get_family("sdxl")
    model = family.load(ModelSource(pretrained_model_name_or_path=str(tiny_sdxl)), "tiny")
    scheme = DDPMScheme.from_scheduler(model.scheduler, diff2flow=True)
    assert scheme.prediction_type == "epsilon"
    params = adapters.add_training_lora(model, rank=4, alpha=4, target="all+ffs")
    latents = family.encode_images(model, synthetic_images(2, 32))
    cond = family.collate_prompts(family.encode_prompts(model, ["a red square", "a blue circle"]), "cpu", torch.float32)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([150, 600])
    noisy, target = scheme.add_noise(latents, noise, timesteps), scheme.target(latents, noise, timesteps)
    torch.testing.assert_close(target, noise - latents)
    optimizer = torch.optim.AdamW(params, lr=5e-3)  # the flow loss amplifies noisy-timestep errors: a gentle rate
    model.transformer.train()
    losses, epsilon_errors = [], []
    for _ in range(20):
        prediction = family.predict(model, noisy, timesteps, cond)
        loss = scheme.loss(prediction, target, timesteps, noisy=noisy)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        epsilon_errors.append(torch.nn.functional.mse_loss(prediction.detach(), noise).item())
    # Measured: 1.94 -> 1.71 in one session, 1.53 -> 1.38 in a full clean-clone run: the tiny UNet
    # (out of a 40-step warm start) differs between sessions, seeds notwithstanding (float sums in
    # another order, most likely). Ask for a clear fall, not a fixed figure.
    assert losses[-1] < 0.95 * losses[0], losses
    assert epsilon_errors[-1] < epsilon_errors[0], epsilon_errors


def test_diff2flow_run_trains_on_the_flow_target_and_exports(tmp_path, tiny_sdxl, shapes_dir, write_run, monkeypatch):
    config = write_run(
        tmp_path, model=tiny_sdxl, data=shapes_dir, steps=3,
        extra={"--model_family": "sdxl", "--model_flavour": "base", "--learning_rate": 5e-2, **DIFF2FLOW},
    )
    trainer = _loop(config)
    trainer.setup()
    assert trainer.ddpm is not None and trainer.ddpm.diff2flow and trainer.ddpm.prediction_type == "epsilon"
    # the loop's loss is the flow loss: the velocity the prediction implies against noise - x0
    seen = []
    from tune_train.ddpm import DDPMScheme

    original = DDPMScheme.loss

    def spy(self, prediction, target, timesteps, noisy=None, mask=None):
        assert mask is None  # no mask dataset in this run
        seen.append((prediction.detach().clone(), target.clone(), timesteps.clone(), noisy.clone()))
        return original(self, prediction, target, timesteps, noisy=noisy, mask=mask)

    monkeypatch.setattr(DDPMScheme, "loss", spy)  # attrs slots: patch the class
    dataset_id, batch = next(iter(trainer.sampler))
    loss = trainer.compute_loss(dataset_id, batch, torch.Generator().manual_seed(0))
    (prediction, target, timesteps, noisy), = seen
    velocity = trainer.ddpm.flow_velocity(prediction, noisy, timesteps)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(velocity, target).item(), rel=1e-5)
    monkeypatch.undo()
    result = trainer.train()
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert Path(result.outputs["lora"]).is_file()


def test_flow_family_refuses_diff2flow(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra=DIFF2FLOW)
    with pytest.raises(ValueError, match="diff2flow_enabled / diff2flow_loss do not apply to model_family 'z-image'"):
        _loop(config).setup()


def test_tune_check_shows_the_diff2flow_loss(tmp_path, tiny_sdxl, shapes_dir, write_run):
    from tune.plan import build_plan, format_plan

    extra = {"--model_family": "sdxl", "--model_flavour": "base"}
    plain = build_plan(load_config(write_run(tmp_path / "a", model=tiny_sdxl, data=shapes_dir, steps=1, extra=extra)))
    assert "loss" not in plain["noise"]
    config = write_run(tmp_path / "b", model=tiny_sdxl, data=shapes_dir, steps=1, extra={**extra, **DIFF2FLOW})
    plan = build_plan(load_config(config))
    assert plan["noise"]["loss"].startswith("flow velocity noise - x0") and "diff2flow_loss" in format_plan(plan)
