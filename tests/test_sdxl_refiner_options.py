"""SimpleTuner's SDXL refiner keys on the tiny refiner: ``data_aesthetic_score`` (config.json,
and per dataset) reaches the UNet's ``add_time_ids``, and ``refiner_training_invert_schedule``
trains the noisy part of the schedule instead of the refiner's low-noise end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tune.config import load_config
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tiny_refiner(tmp_path_factory) -> Path:
    from tune_models.families.sdxl.tiny import build_tiny_refiner

    return build_tiny_refiner(tmp_path_factory.mktemp("tiny-refiner"))


def _run(write_run, root: Path, model: Path, data: Path, steps: int, **extra) -> Loop:
    """A refiner run over two datasets of the same images: ``shapes`` (config.json's score) and
    ``shapes-low`` (its own ``data_aesthetic_score``: 2.0)."""
    config = write_run(root, model=model, data=data, steps=steps, extra={
        "--model_family": "sdxl", "--model_flavour": "refiner", "--refiner_training": True, **extra,
    })
    backends = root / "multidatabackend.json"
    datasets = json.loads(backends.read_text())
    datasets.insert(1, {**datasets[0], "id": "shapes-low", "data_aesthetic_score": 2.0})
    backends.write_text(json.dumps(datasets))
    loaded = load_config(config)
    assert not {"data_aesthetic_score", "refiner_training_invert_schedule"} & set(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


def _unet_inputs(loop: Loop, monkeypatch) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(dataset id, timesteps, time_ids) of every training call of the UNet."""
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    current: dict[str, str] = {}
    unet = loop.model.transformer
    forward, compute = unet.forward, loop.compute_loss

    def unet_spy(sample, timestep, *args, **kwargs):
        seen.append((current["id"], timestep.detach().clone(), kwargs["added_cond_kwargs"]["time_ids"].detach().clone()))
        return forward(sample, timestep, *args, **kwargs)

    def compute_spy(dataset_id, batch, generator):
        current["id"] = dataset_id
        return compute(dataset_id, batch, generator)

    monkeypatch.setattr(unet, "forward", unet_spy)
    monkeypatch.setattr(loop, "compute_loss", compute_spy)
    return seen


def test_aesthetic_scores_reach_the_unet_and_the_inverted_schedule_trains_the_noisy_timesteps(
    tmp_path, tiny_refiner, shapes_dir, write_run, monkeypatch
):
    loop = _run(write_run, tmp_path, tiny_refiner, shapes_dir, 8, **{
        "--data_aesthetic_score": 5.0, "--refiner_training_strength": 0.35, "--refiner_training_invert_schedule": True,
    })
    loop.setup()
    assert (loop.ddpm.min_timestep, loop.ddpm.max_timestep) == (350, None)
    seen = _unet_inputs(loop, monkeypatch)
    result = loop.train()
    assert len(result.losses) == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    scores = {dataset: set() for dataset in ("shapes", "shapes-low")}
    for dataset, timesteps, time_ids in seen:
        assert time_ids.shape[-1] == 5  # the refiner's: original size, crop, aesthetic score
        scores[dataset] |= set(time_ids[:, 4].tolist())
    assert scores == {"shapes": {5.0}, "shapes-low": {2.0}}
    drawn = torch.cat([timesteps for _, timesteps, _ in seen])
    assert len(drawn) == 16 and drawn.min() >= 350 and drawn.max() <= 999
    assert drawn.max() > 600  # the noisy end, not the refiner's lowest 350


def test_without_a_score_the_refiner_trains_at_simpletuners_default(tmp_path, tiny_refiner, shapes_dir, write_run, monkeypatch):
    loop = _run(write_run, tmp_path, tiny_refiner, shapes_dir, 6)
    loop.setup()
    assert (loop.ddpm.min_timestep, loop.ddpm.max_timestep) == (0, 200)  # refiner_training alone
    seen = _unet_inputs(loop, monkeypatch)
    loop.train()
    by_dataset: dict[str, set[float]] = {}
    for dataset, _, time_ids in seen:
        by_dataset.setdefault(dataset, set()).update(time_ids[:, 4].tolist())
    assert by_dataset == {"shapes": {7.0}, "shapes-low": {2.0}}
    assert max(timesteps.max().item() for _, timesteps, _ in seen) < 200


def test_tune_check_shows_the_inverted_range(tmp_path, tiny_refiner, shapes_dir, write_run):
    from tune.plan import build_plan

    config = write_run(tmp_path, model=tiny_refiner, data=shapes_dir, steps=1, extra={
        "--model_family": "sdxl", "--model_flavour": "refiner", "--refiner_training": True,
        "--refiner_training_strength": 0.35, "--refiner_training_invert_schedule": True,
    })
    timesteps = build_plan(load_config(config))["noise"]["timesteps"]
    assert timesteps == "all but the lowest 0.35 (refiner_training_invert_schedule)"
