"""How the trainer's data mixes datasets and sizes its writers: data_backend_sampling,
allow_dataset_oversubscription and write_batch_size, as config.json passes them to every dataset."""

from __future__ import annotations

import logging

import pytest
import torch

from tune_data.cache import TensorCache
from tune_data.config import DatasetConfig
from tune_data.testing import make_shapes_dataset
from tune_train.data import TrainingData


class Encoder:
    def __call__(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, 8)


def two_datasets(tmp_path, defaults, *, big=8, small=2, **small_options):
    configs = []
    for name, count, options in (("big", big, {}), ("small", small, small_options)):
        root = tmp_path / name
        if not root.exists():
            make_shapes_dataset(root, count=count, size=(64, 64))
        configs.append(DatasetConfig.from_dict(
            {"id": name, "instance_data_dir": str(root), "caption_strategy": "textfile", "resolution": 64,
             "aspect_bucket_alignment": 16, **options},
            defaults=defaults,
        ))
    data = TrainingData(configs, cache_root=tmp_path / "cache", model_identity="tiny", seed=0, progress=False)
    data.discover()
    return data


def picks(sampler, steps=400):
    drawn = [sampler.next_batch()[0] for _ in range(steps)]
    return drawn.count("big") / steps


def test_auto_weighting_draws_by_size_and_uniform_by_probability(tmp_path):
    auto = picks(two_datasets(tmp_path, {}).build_sampler(1, read_ahead=0))
    uniform = picks(two_datasets(tmp_path, {"data_backend_sampling": "uniform"}).build_sampler(1, read_ahead=0))
    assert auto == pytest.approx(0.8, abs=0.07)  # 8 images against 2
    assert uniform == pytest.approx(0.5, abs=0.07)  # probability 1 each


def test_datasets_must_agree_on_data_backend_sampling(tmp_path):
    data = two_datasets(tmp_path, {}, data_backend_sampling="uniform")
    with pytest.raises(ValueError, match="data_backend_sampling differs between datasets.*set it once, in config.json"):
        data.build_sampler(1)


def test_oversubscription_lets_a_small_dataset_train_with_a_warning(tmp_path, caplog):
    with pytest.raises(ValueError, match="dataset 'small' is too small for batch_size 4.*allow_dataset_oversubscription"):
        two_datasets(tmp_path, {}).build_sampler(4)
    data = two_datasets(tmp_path, {"allow_dataset_oversubscription": True})
    with caplog.at_level(logging.WARNING):
        sampler = data.build_sampler(4)
    assert "dataset 'small': too small for batch size 4 on 1 process(es); repeats raised from 0 to 1" in caplog.text
    batches = [sampler.next_batch() for _ in range(40)]
    assert {name for name, _ in batches} == {"big", "small"} and all(len(batch) == 4 for _, batch in batches)


def test_write_batch_size_bounds_the_background_writers(tmp_path, monkeypatch):
    bounds = []
    real = TensorCache.writer

    def recording(self, max_pending=8):
        bounds.append((self.namespace, max_pending))
        return real(self, max_pending=max_pending)

    monkeypatch.setattr(TensorCache, "writer", recording)
    data = two_datasets(tmp_path, {"write_batch_size": 3})
    data.cache_latents(Encoder(), batch_size=4)
    data.cache_text(lambda captions: [{"e": torch.zeros(2)} for _ in captions])
    assert bounds and all(bound == 3 for _, bound in bounds)
    assert {namespace for namespace, _ in bounds} == {"latents", "text"}
