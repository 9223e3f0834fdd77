"""Units of issue 5: EMA warm-up against its closed form, the eval grids, prior weights, config rules."""

from __future__ import annotations

import pytest
import torch

from tune_train import evaluation
from tune_train.config import ConfigError, TrainConfig
from tune_train.ddpm import DDPMScheme
from tune_train.ema import EMA


def _expected(decay: float, warmup: int, start: torch.Tensor, values: dict[int, torch.Tensor], steps: list[int]):
    """EMA after updates at ``steps``: an update at step s <= warmup copies w_s; later ones average.
    Closed form: with c the last copying update (or the start), ema = d^m * w_c + sum (1-d) d^(m-j) w_j
    over the m averaging updates after it."""
    copies = [s for s in steps if s <= warmup]
    base = values[copies[-1]] if copies else start
    averaging = [s for s in steps if s > warmup]
    m = len(averaging)
    out = decay**m * base
    for j, s in enumerate(averaging, start=1):
        out = out + (1 - decay) * decay ** (m - j) * values[s]
    return out


@pytest.mark.parametrize("warmup,interval", [(0, 1), (3, 1), (3, 2), (10, 1)])
def test_ema_warmup_copies_the_weights_then_averages_in_closed_form(warmup, interval):
    module = torch.nn.Linear(3, 2)
    params = list(module.parameters())
    start = [p.detach().clone() for p in params]
    ema = EMA(params, decay=0.8, warmup_steps=warmup, update_interval=interval)
    seen: list[dict[int, torch.Tensor]] = [{} for _ in params]
    for step in range(1, 8):
        with torch.no_grad():
            for i, p in enumerate(params):
                p.mul_(1.5).add_(float(step))
                seen[i][step] = p.detach().clone()
        ema.step(step)
    steps = [s for s in range(1, 8) if s % interval == 0]
    for i in range(len(params)):
        assert torch.allclose(ema.shadow[i], _expected(0.8, warmup, start[i], seen[i], steps), atol=1e-5)
    if warmup >= 7:  # still warming up: the shadow is exactly the weights
        assert all(torch.equal(s, p.detach()) for s, p in zip(ema.shadow, params))
    assert ema.decay_at(warmup) == 0.0 and ema.decay_at(warmup + 1) == 0.8


def test_ema_warmup_must_not_be_negative():
    with pytest.raises(ValueError, match="ema_warmup_steps"):
        EMA([torch.nn.Parameter(torch.zeros(1))], decay=0.9, warmup_steps=-1)
    with pytest.raises(ConfigError, match="ema_warmup_steps"):
        TrainConfig(model_family="z-image", max_train_steps=1, ema_warmup_steps=-1)


def test_eval_grids_are_fixed_and_inside_the_training_range():
    sigmas = evaluation.eval_sigma_grid(4)
    assert torch.allclose(sigmas, torch.tensor([0.125, 0.375, 0.625, 0.875]))
    scheme = DDPMScheme(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), max_timestep=200)
    grid = evaluation.eval_timestep_grid(scheme, 4)
    assert grid.tolist() == [25, 75, 125, 175]
    assert torch.equal(grid, evaluation.eval_timestep_grid(scheme, 4))
    one = evaluation.eval_timestep_grid(DDPMScheme(torch.linspace(0.999, 0.01, 10, dtype=torch.float64)), 28)
    assert one.min() >= 0 and one.max() <= 9


def test_prior_weights_apply_only_to_regularisation_samples():
    weights = evaluation.sample_loss_weights([True, False, True], 0.25)
    assert weights.tolist() == [0.25, 1.0, 0.25]
    loss = torch.tensor(2.0)
    assert evaluation.weighted_batch_loss(loss, evaluation.sample_loss_weights([False, False], 0.25)) is loss
    assert float(evaluation.weighted_batch_loss(loss, evaluation.sample_loss_weights([True, True], 0.25))) == 0.5


def test_evaluation_config_rules_name_the_keys():
    with pytest.raises(ConfigError, match="pretrained_evaluation_model_name_or_path"):
        TrainConfig(model_family="z-image", max_train_steps=1, evaluation_type="clip")
    with pytest.raises(ConfigError, match="evaluation_type"):
        TrainConfig(model_family="z-image", max_train_steps=1, evaluation_type="fid")
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        TrainConfig(model_family="z-image", max_train_steps=1, prior_loss_weight=-1.0)


def test_eval_dataset_id_must_name_an_image_dataset_and_leave_one_to_train():
    from tune_data.config import DatasetConfig

    train = DatasetConfig(id="train", instance_data_dir="/x")
    held = DatasetConfig(id="held", instance_data_dir="/y")
    text = DatasetConfig(id="text", dataset_type="text_embeds", default=True)
    config = TrainConfig(model_family="z-image", max_train_steps=1, eval_dataset_id="held")
    assert evaluation.check_eval_datasets(config, [train, held, text]) == ["held"]
    with pytest.raises(ConfigError, match="eval_dataset_id 'held' names no enabled image dataset.*'train'"):
        evaluation.check_eval_datasets(config, [train, text])
    with pytest.raises(ConfigError, match="nothing would be left to train on"):
        evaluation.check_eval_datasets(config, [held, text])
    assert evaluation.check_eval_datasets(TrainConfig(model_family="z-image", max_train_steps=1), [train]) == []


def test_dataset_type_eval_datasets_are_held_out_with_or_without_eval_dataset_id():
    from tune_data.config import DatasetConfig

    train = DatasetConfig(id="train", instance_data_dir="/x")
    named = DatasetConfig(id="named", instance_data_dir="/y")
    evals = [DatasetConfig(id=f"eval-{i}", dataset_type="eval", instance_data_dir=f"/e{i}") for i in (1, 2)]
    plain = TrainConfig(model_family="z-image", max_train_steps=1, eval_steps_interval=5)
    assert evaluation.check_eval_datasets(plain, [train, *evals]) == ["eval-1", "eval-2"]
    both = TrainConfig(model_family="z-image", max_train_steps=1, eval_dataset_id="named")
    assert evaluation.check_eval_datasets(both, [evals[0], train, named]) == ["eval-1", "named"]
    with pytest.raises(ConfigError, match=r"every image dataset \('named', 'eval-1'\) is held out.*nothing"):
        evaluation.check_eval_datasets(both, [named, evals[0]])
    # The intervals need something to measure: eval_dataset_id or a dataset_type eval dataset.
    for key, value in (("eval_steps_interval", 5), ("eval_epoch_interval", 1.0)):
        config = TrainConfig(model_family="z-image", max_train_steps=1, **{key: value})
        with pytest.raises(ConfigError, match=f"{key} needs a held-out dataset.*eval_dataset_id.*dataset_type 'eval'"):
            evaluation.check_eval_datasets(config, [train])


def test_pooling_reports_the_image_weighted_mean_else_one_number_per_dataset():
    results = {"a": (0.5, 3), "b": (2.0, 1)}
    assert evaluation.pooled_loss(results) == pytest.approx((0.5 * 3 + 2.0) / 4)
    assert evaluation.eval_metrics(results, pooling=True) == {"eval_loss": pytest.approx(0.875)}
    assert evaluation.eval_metrics(results, pooling=False) == {"eval_loss/a": 0.5, "eval_loss/b": 2.0}
    # one held-out dataset: eval_loss either way
    assert evaluation.eval_metrics({"a": (0.5, 3)}, pooling=False) == {"eval_loss": 0.5}


def test_eval_log_trims_rows_past_a_resume_point(tmp_path):
    log = evaluation.EvalLog(tmp_path / "eval_log.csv")
    for step in (0, 2, 4):
        log.append(step, "eval_loss", 0.5 + step)
    log.trim_after(2)
    assert log.rows() == [(0, "eval_loss", 0.5), (2, "eval_loss", 2.5)]


def test_eval_batches_keep_a_fixed_order_one_bucket_each_and_honour_num_eval_images():
    from types import SimpleNamespace

    def planned(path, bucket):
        return SimpleNamespace(record=SimpleNamespace(path=path), bucket=bucket)

    buckets = {(64, 32): [planned("b.png", (64, 32)), planned("a.png", (64, 32))],
               (32, 32): [planned("z.png", (32, 32)), planned("c.png", (32, 32)), planned("d.png", (32, 32))]}
    data = SimpleNamespace(prepared={"held": SimpleNamespace(buckets=buckets)})
    paths = lambda batches: [[p.record.path for p in batch] for batch in batches]  # noqa: E731
    assert paths(evaluation.eval_batches(data, "held", 2)) == [["c.png", "d.png"], ["z.png"], ["a.png", "b.png"]]
    assert paths(evaluation.eval_batches(data, "held", 2, limit=4)) == [["c.png", "d.png"], ["z.png"], ["a.png"]]
    assert paths(evaluation.eval_batches(data, "held", 8, limit=2)) == [["c.png", "d.png"]]


def test_eval_is_due_every_n_steps_and_at_fractions_of_an_epoch():
    def due(steps, **keys):
        config = TrainConfig(model_family="z-image", max_train_steps=40, eval_dataset_id="held", **keys)
        return [s for s in range(1, 41) if evaluation.eval_due(config, s, batches_per_epoch=10)]

    assert due(range(40), eval_steps_interval=15) == [15, 30]
    assert due(range(40), eval_epoch_interval=0.5) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert due(range(40), eval_epoch_interval=2) == [20, 40]
    # With accumulation 4 a step consumes 4 of the epoch's 10 micro-batches.
    assert due(range(40), eval_epoch_interval=1, gradient_accumulation_steps=4)[:3] == [3, 5, 8]
