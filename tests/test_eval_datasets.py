"""SimpleTuner's ``dataset_type: eval`` and ``eval_dataset_pooling`` on the tiny Z-Image: held-out
datasets are never trained on, and report one ``eval_loss/<id>`` each or one pooled ``eval_loss``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tune.config import load_config
from tune_train import evaluation
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory) -> dict[str, Path]:
    from tune_data.testing import make_shapes_dataset

    return {
        "typed": make_shapes_dataset(tmp_path_factory.mktemp("typed-eval"), count=3, size=(32, 32), seed=7),
        "named": make_shapes_dataset(tmp_path_factory.mktemp("named-eval"), count=2, size=(32, 32), seed=11),
    }


def _loop(write_run, root: Path, model: Path, data: Path, eval_dirs: dict[str, Path], **extra) -> Loop:
    """Three image datasets: ``shapes`` to train on, ``typed`` (``dataset_type: eval``, 3 images)
    and ``named`` (an ordinary image dataset named by ``eval_dataset_id``, 2 images)."""
    config = write_run(root, model=model, data=data, steps=2,
                       extra={"--learning_rate": 5e-2, "--eval_timesteps": 2, "--eval_dataset_id": "named", **extra})
    backend = root / "multidatabackend.json"
    datasets = json.loads(backend.read_text())
    base = {k: datasets[0][k] for k in ("type", "caption_strategy", "resolution", "resolution_type",
                                        "minimum_image_size", "crop", "crop_aspect")}
    datasets[1:1] = [
        {**base, "id": "typed", "dataset_type": "eval", "instance_data_dir": str(eval_dirs["typed"])},
        {**base, "id": "named", "instance_data_dir": str(eval_dirs["named"])},
    ]
    backend.write_text(json.dumps(datasets))
    loaded = load_config(config)
    assert "eval_dataset_pooling" not in loaded.ignored
    return Loop(loaded.train, loaded.datasets, progress=False)


def _rows(root: Path) -> list[tuple[int, str, float]]:
    with (root / "output" / evaluation.EVAL_LOG).open() as handle:
        return [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(handle)]


def test_eval_datasets_are_never_trained_on_and_pooling_gives_the_image_weighted_mean(
    tmp_path, tiny_zimage, shapes_dir, eval_dirs, write_run
):
    # Pooling off (SimpleTuner's default): one number per held-out dataset.
    split = _loop(write_run, tmp_path / "split", tiny_zimage, shapes_dir, eval_dirs, **{"--report_to": "tensorboard"})
    split.setup()
    tracked: list[tuple[int, str]] = []
    log = split.accelerator.log

    def spy_log(values, step=None, **kwargs):
        tracked.extend((step, name) for name in values if name.startswith("eval"))
        return log(values, step=step, **kwargs)

    split.accelerator.log = spy_log
    trained_on: list[str] = []
    original = split.compute_loss

    def compute_loss(dataset_id, batch, generator):
        trained_on.append(dataset_id)
        return original(dataset_id, batch, generator)

    split.compute_loss = compute_loss
    split.train()
    assert split.eval_dataset_ids == ["typed", "named"]
    assert trained_on and set(trained_on) == {"shapes"}  # no batch ever comes from a held-out dataset
    assert [(step, metric) for step, metric, _ in _rows(tmp_path / "split")] == [
        (0, "eval_loss/typed"), (0, "eval_loss/named"), (2, "eval_loss/typed"), (2, "eval_loss/named")]
    assert tracked == [(0, "eval_loss/typed"), (0, "eval_loss/named"), (2, "eval_loss/typed"), (2, "eval_loss/named")]
    assert split.eval_losses == {} and sorted(split.eval_losses_by_dataset) == ["named", "typed"]
    by = split.eval_losses_by_dataset
    assert sorted(by["typed"]) == [0, 2] and by["typed"][0] != by["named"][0]
    assert by["typed"][2] != by["typed"][0]  # the LoRA trained between the two evaluations

    # Pooling on: one eval_loss, the mean over all five held-out images.
    pooled = _loop(write_run, tmp_path / "pooled", tiny_zimage, shapes_dir, eval_dirs, **{"--eval_dataset_pooling": True})
    pooled.train()
    assert [(step, metric) for step, metric, _ in _rows(tmp_path / "pooled")] == [(0, "eval_loss"), (2, "eval_loss")]
    assert pooled.eval_losses_by_dataset == {}
    for step in (0, 2):
        weighted = (3 * by["typed"][step] + 2 * by["named"][step]) / 5
        assert pooled.eval_losses[step] == pytest.approx(weighted, rel=1e-5)
    # ...which is not simply the mean of the two datasets' numbers.
    assert pooled.eval_losses[0] != pytest.approx((by["typed"][0] + by["named"][0]) / 2, rel=1e-6)


def test_tune_check_shows_held_out_datasets_and_counts_no_steps_for_them(
    tmp_path, tiny_zimage, shapes_dir, eval_dirs, write_run
):
    from tune.plan import build_plan, format_plan

    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=2, extra={"--eval_dataset_id": "named"})
    backend = tmp_path / "multidatabackend.json"
    datasets = json.loads(backend.read_text())
    base = {k: datasets[0][k] for k in ("caption_strategy", "resolution", "minimum_image_size", "crop")}
    datasets[1:1] = [
        {**base, "id": "typed", "dataset_type": "eval", "instance_data_dir": str(eval_dirs["typed"])},
        {**base, "id": "named", "instance_data_dir": str(eval_dirs["named"])},
    ]
    backend.write_text(json.dumps(datasets))
    plan = build_plan(load_config(config))
    rows = {row["id"]: row for row in plan["datasets"]}
    assert rows["typed"].get("held_out") and rows["named"].get("held_out") and not rows["shapes"].get("held_out")
    assert plan["steps"]["batches_per_epoch"] == 4  # the 8 training images in batches of 2, nothing held out
    assert format_plan(plan).count("held out: measured for eval_loss, never trained on") == 2


def test_loading_refuses_an_eval_interval_with_nothing_held_out(tmp_path):
    from tune.config import ConfigError

    backend = tmp_path / "multidatabackend.json"
    train = {"id": "pets", "instance_data_dir": str(tmp_path)}
    text = {"id": "text", "dataset_type": "text_embeds", "default": True}
    keys = {"model_family": "z-image", "max_train_steps": 1, "eval_steps_interval": 5, "data_backend_config": str(backend)}
    backend.write_text(json.dumps([train, text]))
    with pytest.raises(ConfigError, match="eval_steps_interval needs a held-out dataset.*dataset_type 'eval'"):
        load_config(keys)
    backend.write_text(json.dumps([train, {**train, "id": "pets-eval", "dataset_type": "eval"}, text]))
    loaded = load_config(keys)
    assert [d.held_out for d in loaded.datasets if d.is_image] == [False, True]
