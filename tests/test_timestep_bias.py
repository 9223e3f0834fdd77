"""SimpleTuner's ``timestep_bias_*`` keys in real (tiny) runs: an SDXL run draws its DDPM
timesteps with the bias (and the keys are no longer "accepted but ignored"); a flow family's
run says the keys have no effect."""

from __future__ import annotations

import logging

import pytest
import torch

from tune.config import load_config
from tune_train.trainer import Trainer as Loop

pytestmark = pytest.mark.slow

BIAS_KEYS = {"timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_begin", "timestep_bias_end",
             "timestep_bias_portion"}


def test_sdxl_run_with_a_later_bias_trains_on_the_biased_timesteps(tmp_path, tiny_sdxl, shapes_dir, write_run, monkeypatch):
    # "later" with multiplier 0 and portion 0.5 removes the noisy half: every drawn timestep then
    # lies below 500, which 8 uniform draws would do only by chance (1 in 256)
    config = write_run(
        tmp_path, model=tiny_sdxl, data=shapes_dir, steps=4,
        extra={"--model_family": "sdxl", "--model_flavour": "base", "--timestep_bias_strategy": "later",
               "--timestep_bias_multiplier": 0, "--timestep_bias_portion": 0.5},
    )
    loaded = load_config(config)
    assert not BIAS_KEYS & set(loaded.ignored)
    assert not any("timestep_bias" in warning for warning in loaded.warnings)
    trainer = Loop(loaded.train, loaded.datasets, progress=False)
    trainer.setup()
    weights = trainer.ddpm.timestep_weights
    assert weights[:500].eq(1).all() and weights[500:].eq(0).all()
    seen = []
    original = trainer.family.predict

    def spy(model, noisy, timesteps, prompts):
        seen.append(timesteps.clone())
        return original(model, noisy, timesteps, prompts)

    monkeypatch.setattr(trainer.family, "predict", spy)
    result = trainer.train()
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    drawn = torch.cat(seen)
    assert drawn.numel() == 8 and drawn.max() < 500


def test_zimage_run_says_timestep_bias_has_no_effect(tmp_path, tiny_zimage, shapes_dir, write_run, caplog):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
                       extra={"--timestep_bias_strategy": "later", "--timestep_bias_multiplier": 2})
    loaded = load_config(config)
    assert not BIAS_KEYS & set(loaded.ignored)
    trainer = Loop(loaded.train, loaded.datasets, progress=False)
    with caplog.at_level(logging.WARNING, logger="tune_train.ddpm"):
        trainer.setup()
    assert trainer.ddpm is None
    assert "timestep_bias_strategy 'later' has no effect: model_family 'z-image' is trained with flow matching" in caplog.text
