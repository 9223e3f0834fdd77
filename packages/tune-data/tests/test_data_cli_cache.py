"""`tune-data inspect` reports what each dataset's latent cache holds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tune_data.buckets import plan_buckets  # noqa: E402
from tune_data.cache import TensorCache, latent_entry_metadata  # noqa: E402
from tune_data.cli import main  # noqa: E402
from tune_data.config import DatasetConfig  # noqa: E402
from tune_data.discovery import discover  # noqa: E402
from tune_data.storage import LocalStorage  # noqa: E402
from tune_data.testing import make_shapes_dataset  # noqa: E402


def test_inspect_counts_present_missing_and_other_cache_entries(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", count=6, size=(64, 64))
    entry = {"id": "shapes", "instance_data_dir": str(data), "caption_strategy": "textfile",
             "resolution": 64, "aspect_bucket_alignment": 16, "cache_dir_vae": str(tmp_path / "vae")}
    config_path = tmp_path / "multidatabackend.json"
    config_path.write_text(json.dumps([entry]))

    dataset = DatasetConfig.from_dict(entry)
    kept = discover(dataset, LocalStorage(dataset)).kept
    planned = [p for images in plan_buckets(kept, dataset, seed=0).values() for p in images]
    # As the trainer writes them: keyed by a hash (with the model), described by metadata.
    cache = TensorCache(tmp_path / "vae", "latents", {"model": "m", **dataset.cache_settings()})
    for item in planned[:4]:
        meta = latent_entry_metadata(item.cache_item_id, item.record.identity, dataset.cache_settings(), "m")
        cache.save(cache.key(item.cache_item_id, item.record.identity), {"latents": torch.zeros(4, 8, 8)}, meta)
    other = DatasetConfig.from_dict({**entry, "resolution": 128})
    meta = latent_entry_metadata(planned[0].cache_item_id, planned[0].record.identity, other.cache_settings(), "m")
    cache.save("f" * 32, {"latents": torch.zeros(4, 16, 16)}, meta)

    assert main(["inspect", str(config_path), "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    held = info["latent_cache"]
    assert (held["present"], held["missing"], held["other_entries"]) == (4, 2, 1)
    assert held["present_bytes"] > 4 * 4 * 8 * 8 * 4 and held["other_bytes"] > 0
    assert held["models"] == ["m"]

    assert main(["inspect", str(config_path)]) == 0
    text = capsys.readouterr().out
    assert "4 present" in text and "2 missing" in text and "1 other entries" in text


def test_inspect_says_when_no_latent_cache_is_configured(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", count=2)
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps([{"id": "s", "instance_data_dir": str(data), "caption_strategy": "textfile"}]))
    assert main(["inspect", str(path)]) == 0
    assert "latent cache: not configured" in capsys.readouterr().out
    # The trainer's cache_dir (from --config) locates it: <cache_dir>/vae/<id>, empty so far.
    (tmp_path / "config.json").write_text(json.dumps({"cache_dir": str(tmp_path / "cache")}))
    assert main(["inspect", str(path), "--json", "--config", str(tmp_path / "config.json")]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["latent_cache"]["location"].startswith(str(tmp_path / "cache" / "vae" / "s"))
    assert (info["latent_cache"]["present"], info["latent_cache"]["missing"]) == (0, 2)
