"""Each CPU-capable quantisation preset trains a LoRA as well as the unquantised model does.

Issue 6's numerical check: a LoRA trained for 50 steps on a tiny model with each preset reaches a
loss within 10 % of the unquantised run. The runs go through ``tune train``'s own path
(``base_model_precision`` in config.json), on one shared cache, so the presets differ only in
the transformer's weights. The loss compared is the mean of the last 10 steps (one step's loss
depends on its random timestep; the mean over ten is the curve's level).
"""

from __future__ import annotations

import statistics

import pytest

from tune import Trainer

pytestmark = pytest.mark.slow

STEPS = 50
CPU_PRESETS = ("int8-torchao", "int4-weight-only", "int8-bnb", "nf4-bnb")
"""Every preset that runs on a CPU (fp8 and int4-torchao need CUDA kernels; quanto is optional)."""


def _final_loss(tmp_path, name, precision, tiny_zimage, shapes_dir, write_run) -> float:
    config = write_run(
        tmp_path / name,
        model=tiny_zimage,
        data=shapes_dir,
        steps=STEPS,
        extra={"--base_model_precision": precision, "--learning_rate": 5e-3,
               "--checkpoint_step_interval": 1000, "--gradient_checkpointing": False},
    )
    losses = Trainer.from_config(config, progress=False).train().losses
    assert len(losses) == STEPS
    return statistics.mean(losses[-10:])


def test_every_cpu_preset_trains_to_within_ten_percent_of_the_unquantised_loss(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    baseline = _final_loss(tmp_path, "no_change", "no_change", tiny_zimage, shapes_dir, write_run)
    results = {}
    for preset in CPU_PRESETS:
        results[preset] = _final_loss(tmp_path, preset, preset, tiny_zimage, shapes_dir, write_run)
    far = {p: round(v / baseline, 3) for p, v in results.items() if abs(v - baseline) > 0.1 * baseline}
    assert not far, f"final loss vs unquantised ({baseline:.4f}) off by more than 10 %: {far}"
