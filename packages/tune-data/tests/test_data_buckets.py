"""Aspect buckets: sizes derived by hand for each resolution_type and crop mode, and pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tune_data.buckets import bucket_size, load_training_image, plan_buckets, plan_image
from tune_data.config import DatasetConfig
from tune_data.discovery import ImageRecord, discover
from tune_data.storage import LocalStorage
from tune_data.testing import make_shapes_dataset


def ds(**overrides):
    return DatasetConfig(id="pets", instance_data_dir="unused", **overrides)


def record(width, height, path="img.png"):
    return ImageRecord(path=path, width=width, height=height, caption="c", identity="i")


# Each case: the arithmetic that gives the expected numbers, worked by hand.
CASES = [
    # pixel_area 1024: area 1048576, aspect 1024/1536 -> 0.67; w = sqrt(1048576 * 0.67) = 838.2
    # -> 13 x 64 = 832; h = sqrt(1048576 / 0.67) = 1251.0 -> 20 x 64 = 1280. Cover: scale
    # max(832/1024, 1280/1536) = 0.8333 -> 853 x 1280; centre crop trims (853 - 832) // 2 = 10.
    (dict(resolution=1024), (1024, 1536), (832, 1280), (853, 1280), (10, 0, 842, 1280)),
    # alignment 32: w 838.2 -> 26 x 32 = 832; h 1251.0 -> 39 x 32 = 1248.
    (
        dict(resolution=1024, aspect_bucket_alignment=32),
        (1024, 1536),
        (832, 1248),
        (832, 1248),
        (0, 0, 832, 1248),
    ),
    # pixel 512: shorter edge 512, aspect 1.33 -> 512 * 1.33 = 681.0 -> 11 x 64 = 704.
    # Cover: max(704/800, 512/600) = 0.88 -> 704 x 528; centre crop trims 8 rows.
    (dict(resolution=512, resolution_type="pixel"), (800, 600), (704, 512), (704, 528), (0, 8, 704, 520)),
    # area 0.25 MP: 250000 px, aspect 1.78; w = sqrt(445000) = 667.1 -> 640; h = sqrt(140449) =
    # 374.8 -> 384. Cover: max(0.4, 0.4267) -> 683 x 384; trims (683 - 640) // 2 = 21.
    (dict(resolution=0.25, resolution_type="area"), (1600, 900), (640, 384), (683, 384), (21, 0, 661, 384)),
    # area 1.0 MP square image: sqrt(1e6) = 1000 -> 15.6 -> 16 x 64 = 1024 (upscaled to cover).
    (
        dict(resolution=1.0, resolution_type="area"),
        (1000, 1000),
        (1024, 1024),
        (1024, 1024),
        (0, 0, 1024, 1024),
    ),
    # crop square, pixel_area 512: 512 x 512. Cover: max(0.64, 0.8533) -> 683 x 512; centre 85.
    (dict(resolution=512, crop=True), (800, 600), (512, 512), (683, 512), (85, 0, 597, 512)),
    # crop square, corner: the window sits at the bottom-right: 683 - 512 = 171.
    (
        dict(resolution=512, crop=True, crop_style="corner"),
        (800, 600),
        (512, 512),
        (683, 512),
        (171, 0, 683, 512),
    ),
    # crop square, pixel 512 on a portrait: 512 x 512; cover 512 x 683; centre 85 rows down.
    (
        dict(resolution=512, resolution_type="pixel", crop=True),
        (600, 800),
        (512, 512),
        (512, 683),
        (0, 85, 512, 597),
    ),
    # crop square, area 1.0: sqrt(1e6) = 1000 -> 1024 x 1024.
    (
        dict(resolution=1.0, resolution_type="area", crop=True),
        (3000, 2000),
        (1024, 1024),
        (1536, 1024),
        (256, 0, 1280, 1024),
    ),
    # crop preserve keeps the aspect: the same bucket as without crop (pixel 512 case above).
    (
        dict(resolution=512, resolution_type="pixel", crop=True, crop_aspect="preserve"),
        (800, 600),
        (704, 512),
        (704, 528),
        (0, 8, 704, 520),
    ),
]


@pytest.mark.parametrize(("settings", "size", "bucket", "resize", "crop_box"), CASES)
def test_bucket_resize_and_crop(settings, size, bucket, resize, crop_box):
    planned = plan_image(record(*size), ds(**settings))
    assert (planned.bucket, planned.resize, planned.crop_box) == (bucket, resize, crop_box)


def test_nearly_equal_aspects_share_a_bucket_after_rounding():
    # 1000/1500 = 0.6667 and 1010/1500 = 0.6733 both round to 0.67 at aspect_bucket_rounding 2.
    assert bucket_size(1000, 1500, ds()) == bucket_size(1010, 1500, ds()) == (832, 1280)


def test_random_crop_is_deterministic_per_seed_and_path():
    dataset = ds(resolution=512, crop=True, crop_style="random")
    records = [record(900 + 37 * i, 600, path=f"{i}.png") for i in range(12)]
    first = plan_buckets(records, dataset, seed=7)
    assert plan_buckets(records, dataset, seed=7) == first
    other = plan_buckets(records, dataset, seed=8)
    boxes = [p.crop_box for p in first[(512, 512)]]
    assert boxes != [p.crop_box for p in other[(512, 512)]]
    centres = [plan_image(r, ds(resolution=512, crop=True)).crop_box for r in records]
    assert boxes != centres  # random offsets, not the centre
    for planned in first[(512, 512)]:
        left, top, right, bottom = planned.crop_box
        assert 0 <= left and right <= planned.resize[0] and (right - left, bottom - top) == (512, 512)
        assert top == 0  # landscape images covering a square have no vertical freedom


def test_cache_item_id_follows_geometry():
    dataset = ds(resolution=512, crop=True, crop_style="random")
    r = record(1200, 600)
    assert plan_image(r, dataset, seed=1).cache_item_id != plan_image(r, dataset, seed=2).cache_item_id
    assert plan_image(r, dataset, seed=1).cache_item_id == plan_image(r, dataset, seed=1).cache_item_id


def test_loaded_images_have_exactly_their_bucket_size(tmp_path):
    make_shapes_dataset(tmp_path, count=9, size=(96, 64), varied_sizes=True)
    dataset = DatasetConfig(
        id="shapes",
        instance_data_dir=str(tmp_path),
        caption_strategy="textfile",
        resolution=64,
        aspect_bucket_alignment=16,
    )
    storage = LocalStorage(dataset)
    buckets = plan_buckets(discover(dataset, storage).kept, dataset)
    assert len(buckets) == 3
    for (width, height), items in buckets.items():
        for planned in items:
            pixels = load_training_image(storage, planned)
            assert pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)


def test_transparency_becomes_white_and_exif_rotation_is_applied(tmp_path):
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    photo = Image.new("RGB", (60, 30), (0, 0, 255))
    photo.paste((255, 0, 0), (0, 0, 30, 30))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red ends up on top
    photo.save(tmp_path / "photo.png", exif=exif.tobytes())
    dataset = DatasetConfig(id="t", instance_data_dir=str(tmp_path), resolution=32, aspect_bucket_alignment=8)
    storage = LocalStorage(dataset)
    plans = {
        p.record.path: p
        for items in plan_buckets(discover(dataset, storage).kept, dataset).values()
        for p in items
    }
    clear = load_training_image(storage, plans["clear.png"])
    assert (clear == 255).all()
    rotated = load_training_image(storage, plans["photo.png"])
    assert rotated.shape[0] > rotated.shape[1]  # portrait, as displayed
    top, bottom = rotated[2, rotated.shape[1] // 2], rotated[-3, rotated.shape[1] // 2]
    assert top[0] > 200 and top[2] < 60  # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue


MODES = [
    dict(resolution=1024),
    dict(resolution=512, resolution_type="pixel"),
    dict(resolution=1.0, resolution_type="area"),
    dict(resolution=512, crop=True),
    dict(resolution=512, crop=True, crop_style="random"),
    dict(resolution=512, crop=True, crop_style="corner", crop_aspect="preserve"),
    dict(resolution=768, resolution_type="pixel", crop=True, crop_style="random", crop_aspect="closest",
         crop_aspect_buckets=[0.75, 1.0, 1.5]),
    dict(resolution=0.5, resolution_type="area", crop=True, crop_style="random", crop_aspect="random",
         crop_aspect_buckets=[0.5, 1.0, 2.0], aspect_bucket_alignment=32),
]


@pytest.mark.parametrize("settings", MODES)
def test_every_crop_lies_inside_its_resized_image_and_is_exactly_the_bucket(settings):
    dataset = ds(**settings)
    sizes = [(w, h) for w in (97, 300, 512, 777, 1024, 1920, 4000) for h in (64, 333, 512, 1080, 2999)]
    for index, (width, height) in enumerate(sizes):
        planned = plan_image(record(width, height, path=f"{index}.png"), dataset, seed=index)
        (bucket_w, bucket_h), (resized_w, resized_h) = planned.bucket, planned.resize
        left, top, right, bottom = planned.crop_box
        assert 0 <= left and 0 <= top and right <= resized_w and bottom <= resized_h, (width, height, planned)
        assert (right - left, bottom - top) == (bucket_w, bucket_h)
        assert bucket_w % dataset.aspect_bucket_alignment == 0 and bucket_h % dataset.aspect_bucket_alignment == 0
        # The resize keeps the image's aspect (to a pixel) and is the smallest that covers the bucket.
        scale = max(bucket_w / width, bucket_h / height)
        assert abs(resized_w - width * scale) <= 1 and abs(resized_h - height * scale) <= 1


def test_no_image_is_dropped_without_a_reason_in_the_report(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, size in {"ok_a": (80, 64), "ok_b": (64, 96), "small": (12, 12), "blurry_upscale": (40, 40)}.items():
        Image.new("RGB", size, (90, 90, 90)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name.replace("_", " "))
    Image.new("RGB", (64, 64)).save(folder / "uncaptioned.png")  # no .txt beside it
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.md").write_text("not an image")
    dataset = DatasetConfig(
        id="mixed", instance_data_dir=str(folder), caption_strategy="textfile", resolution=64,
        aspect_bucket_alignment=16, minimum_image_size=16, max_upscale_threshold=0.5,
    )
    with pytest.warns(UserWarning):
        report = discover(dataset, LocalStorage(dataset))
    assert report.seen == len(report.kept) + len(report.dropped) == 7
    assert {d.path: d.reason for d in report.dropped} == {
        "small.png": "too small",
        "blurry_upscale.png": "too much upscaling",
        "uncaptioned.png": "missing caption",
        "broken.png": "undecodable",
        "notes.md": "unsupported extension",
    }
    assert all(d.detail for d in report.dropped)  # each says why in the user's terms
    buckets = plan_buckets(report.kept, dataset)
    assert sorted(p.record.path for items in buckets.values() for p in items) == ["ok_a.png", "ok_b.png"]
