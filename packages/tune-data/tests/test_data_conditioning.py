"""Conditioning datasets: config keys, pairing by relative path, strict / loose planning, inspect."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from tune_data.buckets import load_training_image, plan_buckets
from tune_data.cli import main
from tune_data.conditioning import MISSING_CONDITIONING, discover_conditioning, pair_conditioning, plan_reference
from tune_data.config import DatasetConfig, DatasetConfigError, load_dataset_configs
from tune_data.discovery import discover
from tune_data.storage import open_storage


def _gradient(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    noise = rng.integers(0, 30, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def edit_pairs(tmp_path):
    """targets/: a.png, sub/b.png, c.png, d.png; refs/: a.jpg (other extension), sub/b.png at twice
    the size, d.png undecodable, nothing for c."""
    targets, refs = tmp_path / "targets", tmp_path / "refs"
    (targets / "sub").mkdir(parents=True)
    (refs / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png", "c.png", "d.png"]):
        _gradient(48, 32, i).save(targets / name)
        (targets / name).with_suffix(".txt").write_text(f"edit {i}")
    _gradient(48, 32, 0).convert("RGB").save(refs / "a.jpg", quality=95)
    _gradient(48, 32, 1).resize((96, 64), Image.Resampling.LANCZOS).save(refs / "sub" / "b.png")
    (refs / "d.png").write_bytes(b"not an image")
    return targets, refs


def _configs(targets, refs, *, conditioning_type="reference_strict", **cond_extra):
    entries = [
        {
            "id": "edits",
            "instance_data_dir": str(targets),
            "caption_strategy": "textfile",
            "resolution": 32,
            "aspect_bucket_alignment": 16,
            "crop": True,
            "crop_aspect": "square",
            "crop_style": "random",
            "conditioning_data": "refs",
        },
        {
            "id": "refs",
            "dataset_type": "conditioning",
            "conditioning_type": conditioning_type,
            "instance_data_dir": str(refs),
            "resolution": 32,
            "aspect_bucket_alignment": 16,
            **cond_extra,
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conditioning keys are understood, not "ignored"
        return load_dataset_configs(entries)


def _discover(configs):
    image, cond = configs[0], configs[1]
    report = discover(image, open_storage(image))
    with pytest.warns(UserWarning, match="d.png"):
        index = discover_conditioning(cond, open_storage(cond))
    return image, cond, *pair_conditioning(report, [index])


def test_config_keys_are_validated_with_the_users_key_names(tmp_path):
    base = {"id": "edits", "instance_data_dir": str(tmp_path)}
    text = {"id": "text", "dataset_type": "text_embeds"}
    cond = {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(tmp_path)}
    configs = load_dataset_configs([{**base, "conditioning_data": ["refs"]}, cond, text])
    assert configs[0].conditioning_data == ("refs",)
    assert configs[1].conditioning_type == "reference_strict"  # the default
    with pytest.raises(DatasetConfigError, match="conditioning_data names 'nope'.*conditioning datasets: 'refs'"):
        load_dataset_configs([{**base, "conditioning_data": "nope"}, cond, text])
    with pytest.raises(DatasetConfigError, match="names 'refs', which is disabled"):
        load_dataset_configs([{**base, "conditioning_data": "refs"}, {**cond, "disabled": True}, text])
    with pytest.raises(DatasetConfigError, match="conditioning_type must be one of reference_strict"):
        DatasetConfig.from_dict({**cond, "conditioning_type": "reference_sloppy"})
    with pytest.raises(DatasetConfigError, match="conditioning_type only applies to dataset_type 'conditioning'"):
        DatasetConfig.from_dict({**base, "conditioning_type": "reference_loose"})
    with pytest.raises(DatasetConfigError, match="conditioning_data must be a dataset id or a list"):
        DatasetConfig.from_dict({**base, "conditioning_data": 3})


def test_pairs_by_relative_path_and_drops_images_without_a_usable_pair(edit_pairs):
    image, cond, report, pairs = _discover(_configs(*edit_pairs))
    assert sorted(r.path for r in report.kept) == ["a.png", "sub/b.png"]
    assert pairs["a.png"][0].path == "a.jpg"  # the extension may differ
    assert pairs["sub/b.png"][0].path == "sub/b.png"
    missing = {d.path: d.detail for d in report.dropped if d.reason == MISSING_CONDITIONING}
    assert missing["c.png"] == "no image named c.* in conditioning dataset 'refs'"
    assert missing["d.png"].startswith("its pair d.png in conditioning dataset 'refs' was dropped (undecodable")
    assert report.summary().endswith("dropped 2 (2 missing conditioning)")


def test_strict_reference_takes_the_targets_bucket_and_crop(edit_pairs):
    image, cond, report, pairs = _discover(_configs(*edit_pairs))
    planned = {p.record.path: p for items in plan_buckets(report.kept, image, seed=7).values() for p in items}
    target = planned["sub/b.png"]
    assert target.crop_box[:2] != (0, 0) or target.resize != target.bucket  # a real (random) crop
    reference = plan_reference(target, pairs["sub/b.png"][0], cond, seed=7)
    assert (reference.bucket, reference.resize, reference.crop_box) == (target.bucket, target.resize, target.crop_box)
    # The reference is the target at twice the size: after strict planning the pixels line up.
    target_pixels = load_training_image(open_storage(image), target).astype(float)
    reference_pixels = load_training_image(open_storage(cond), reference).astype(float)
    assert target_pixels.shape == reference_pixels.shape == (32, 32, 3)
    assert np.abs(target_pixels - reference_pixels).mean() < 8
    assert reference.cache_item_id != plan_reference(planned["a.png"], pairs["a.png"][0], cond).cache_item_id


def test_loose_reference_keeps_its_own_aspect_bucket(edit_pairs):
    targets, refs = edit_pairs
    _gradient(64, 32, 5).save(refs / "c.png")  # 2:1, while every target is cropped square
    image, cond, report, pairs = _discover(_configs(targets, refs, conditioning_type="reference_loose"))
    planned = {p.record.path: p for items in plan_buckets(report.kept, image).values() for p in items}
    assert planned["c.png"].bucket == (32, 32)
    loose = plan_reference(planned["c.png"], pairs["c.png"][0], cond)
    # 2:1 at an area of 32 x 32 pixels, edges aligned to 16: 48 x 16 (not the target's 32 x 32).
    assert loose.bucket == (48, 16)
    assert load_training_image(open_storage(cond), loose).shape == (16, 48, 3)
    strict = plan_reference(planned["c.png"], pairs["c.png"][0], _configs(targets, refs)[1])
    assert strict.bucket == (32, 32)


def test_inspect_reports_missing_pairs(edit_pairs, tmp_path, capsys):
    targets, refs = edit_pairs
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps([
        {"id": "edits", "instance_data_dir": str(targets), "caption_strategy": "textfile", "resolution": 32,
         "aspect_bucket_alignment": 16, "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(refs)},
    ]))
    with pytest.warns(UserWarning, match="d.png"):
        assert main(["inspect", str(path), "--json"]) == 0
    edits, cond = json.loads(capsys.readouterr().out)
    assert edits["kept"] == 2 and edits["conditioning_data"] == ["refs"]
    assert sorted(edits["dropped"][MISSING_CONDITIONING]) == ["c.png", "d.png"]
    assert (cond["conditioning_type"], cond["seen"], cond["kept"]) == ("reference_strict", 3, 2)
    with pytest.warns(UserWarning, match="d.png"):
        assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conditioning data: refs" in out
    assert "missing conditioning: 2 (c.png, d.png)" in out
