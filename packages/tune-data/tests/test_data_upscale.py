"""max_upscale_threshold: images that would be enlarged too much to cover their bucket are dropped,
with the reason in the report; random / closest aspects keep to the buckets within the limit."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tune_data.buckets import plan_image, too_much_upscaling, upscale_factor
from tune_data.cli import main
from tune_data.config import DatasetConfig, DatasetConfigError, load_dataset_configs
from tune_data.discovery import ImageRecord, discover
from tune_data.storage import LocalStorage


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (120, 40, 200)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} image")
    return folder


def test_worked_examples_of_the_limit():
    # crop square at resolution 64: a 64x64 bucket. 56x56 -> 64/56 = 1.143x (within 0.2);
    # 50x50 -> 1.28x (beyond 0.2, within 0.3); 80x40 -> max(64/80, 64/40) = 1.6x.
    dataset = DatasetConfig(id="d", resolution=64, aspect_bucket_alignment=16, crop=True, max_upscale_threshold=0.2)
    assert upscale_factor(56, 56, (64, 64)) == pytest.approx(1.142857, rel=1e-5)
    assert too_much_upscaling(56, 56, dataset) is None
    assert too_much_upscaling(64, 64, dataset) is None
    assert too_much_upscaling(50, 50, dataset) == (
        "50x50 needs 1.28x upscaling to cover its bucket 64x64; max_upscale_threshold 0.2 allows 1.20x"
    )
    assert too_much_upscaling(50, 50, DatasetConfig(id="d", resolution=64, aspect_bucket_alignment=16, crop=True,
                                                    max_upscale_threshold=0.3)) is None
    assert too_much_upscaling(80, 40, dataset).startswith("80x40 needs 1.60x")
    # Exactly at the limit is allowed: 80 -> 96 is 1.2x (pixel 96, square crop).
    exact = DatasetConfig(id="d", resolution=96, resolution_type="pixel", aspect_bucket_alignment=16, crop=True,
                          max_upscale_threshold=0.2)
    assert too_much_upscaling(80, 80, exact) is None
    # No threshold: no limit.
    assert too_much_upscaling(8, 8, DatasetConfig(id="d", resolution=64)) is None


def test_discovery_and_inspect_drop_what_needs_too_much_upscaling_with_the_reason(tmp_path, capsys):
    folder = write_images(tmp_path / "imgs", {"big": (72, 72), "fits": (56, 56), "small": (40, 40), "tiny": (24, 24)})
    entry = {
        "id": "pets", "instance_data_dir": str(folder), "caption_strategy": "textfile", "resolution": 64,
        "aspect_bucket_alignment": 16, "crop": True, "max_upscale_threshold": 0.25,
    }
    (dataset,) = load_dataset_configs([entry])
    report = discover(dataset, LocalStorage(dataset))
    assert sorted(r.path for r in report.kept) == ["big.png", "fits.png"]
    assert {(d.path, d.reason) for d in report.dropped} == {
        ("small.png", "too much upscaling"), ("tiny.png", "too much upscaling"),
    }
    assert "40x40 needs 1.60x upscaling" in next(d.detail for d in report.dropped if d.path == "small.png")

    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([entry]))
    assert main(["inspect", str(config), "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert (info["seen"], info["kept"]) == (4, 2)
    assert info["dropped"] == {"too much upscaling": ["small.png", "tiny.png"]}
    assert main(["inspect", str(config)]) == 0
    assert "too much upscaling: 2 (small.png, tiny.png)" in capsys.readouterr().out

    # Without the key, every image is kept (enlarged as much as it takes).
    del entry["max_upscale_threshold"]
    (dataset,) = load_dataset_configs([entry])
    assert len(discover(dataset, LocalStorage(dataset)).kept) == 4


def test_random_aspects_choose_only_buckets_within_the_limit():
    # crop_aspect random over [1.0, 2.0] at 64 px: 1.0 -> 64x64, 2.0 -> 96x48. A 100x52 image
    # covers 96x48 without enlargement but needs 64/52 = 1.23x for 64x64: beyond 0.2.
    def dataset(**extra):
        return DatasetConfig(id="d", resolution=64, aspect_bucket_alignment=16, crop=True, crop_aspect="random",
                             crop_aspect_buckets=[1.0, 2.0], **extra)

    records = [ImageRecord(f"img{i}.png", 100, 52, "c", "i") for i in range(40)]
    unlimited = {plan_image(r, dataset(), seed=1).bucket for r in records}
    assert unlimited == {(64, 64), (96, 48)}
    limited = {plan_image(r, dataset(max_upscale_threshold=0.2), seed=1).bucket for r in records}
    assert limited == {(96, 48)}
    assert too_much_upscaling(100, 52, dataset(max_upscale_threshold=0.2)) is None  # one bucket fits: kept
    assert too_much_upscaling(40, 20, dataset(max_upscale_threshold=0.2)).endswith(
        "to cover its smallest-upscale bucket 96x48; max_upscale_threshold 0.2 allows 1.20x"
    )


def test_the_key_is_checked_and_a_trainer_level_value_reaches_every_dataset():
    with pytest.raises(DatasetConfigError, match="dataset 'd': max_upscale_threshold must be >= 0, got -0.1"):
        DatasetConfig.from_dict({"id": "d", "max_upscale_threshold": -0.1})
    with pytest.raises(DatasetConfigError, match="max_upscale_threshold must be a number"):
        DatasetConfig.from_dict({"id": "d", "max_upscale_threshold": "lots"})
    inherited = DatasetConfig.from_dict({"id": "d"}, defaults={"--max_upscale_threshold": 0.3})
    assert inherited.max_upscale_threshold == 0.3 and inherited.ignored_keys == ()
    own = DatasetConfig.from_dict({"id": "d", "max_upscale_threshold": "0.1"}, defaults={"max_upscale_threshold": 0.3})
    assert own.max_upscale_threshold == 0.1


def test_aspect_ratio_limits_drop_what_is_too_tall_or_too_wide_with_the_reason(tmp_path):
    folder = write_images(tmp_path / "aspects", {"square": (64, 64), "tall": (40, 100), "wide": (150, 60),
                                                 "edge": (128, 64)})
    (dataset,) = load_dataset_configs([{
        "id": "pets", "instance_data_dir": str(folder), "caption_strategy": "textfile", "resolution": 64,
        "aspect_bucket_alignment": 16, "minimum_aspect_ratio": 0.5, "maximum_aspect_ratio": 2.0,
    }])
    assert dataset.ignored_keys == ()  # implemented, no longer "accepted but ignored"
    report = discover(dataset, LocalStorage(dataset))
    assert sorted(r.path for r in report.kept) == ["edge.png", "square.png"]  # 2.0 itself is allowed
    assert {d.path: d.detail for d in report.dropped} == {
        "tall.png": "40x100 has aspect 0.4 < minimum_aspect_ratio 0.5",
        "wide.png": "150x60 has aspect 2.5 > maximum_aspect_ratio 2",
    }
    assert {d.reason for d in report.dropped} == {"aspect ratio out of range"}
    with pytest.raises(DatasetConfigError, match="minimum_aspect_ratio \\(3\\) must not exceed maximum_aspect_ratio \\(2\\)"):
        DatasetConfig(id="d", minimum_aspect_ratio=3, maximum_aspect_ratio=2)
    with pytest.raises(DatasetConfigError, match="maximum_aspect_ratio must be > 0"):
        DatasetConfig(id="d", maximum_aspect_ratio=0)
