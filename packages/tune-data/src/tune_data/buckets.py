"""Aspect buckets: the training size of each image, and the resize and crop that reach it.

SimpleTuner's meaning of the keys is kept:

- ``resolution_type: pixel_area`` (default): ``resolution`` N means a target area of N x N pixels
  at the image's own aspect; ``pixel``: the shorter edge becomes N; ``area``: N megapixels
  (N x 1,000,000 pixels).
- The aspect ratio is rounded to ``aspect_bucket_rounding`` decimals first, so images of nearly
  the same shape land in the same bucket; each edge is then rounded to the nearest multiple of
  ``aspect_bucket_alignment`` (at least one multiple).
- ``crop: true`` with ``crop_aspect: square`` makes every bucket a square of the target area;
  ``preserve`` keeps the aspect as without cropping; ``closest`` uses the ``crop_aspect_buckets``
  aspect nearest the image's, ``random`` one of them chosen from a hash of ``(seed, path)``.

``max_upscale_threshold`` limits how much an image may be enlarged to cover its bucket
(:func:`upscale_factor`): with ``closest`` / ``random`` only the aspects within it are chosen from;
discovery drops an image no allowed bucket fits (:func:`too_much_upscaling`).

The image is always scaled (LANCZOS) to the smallest size that covers its bucket, then cropped to
it: without ``crop`` only the few pixels the alignment rounding adds are trimmed, centred; with
``crop`` the window follows ``crop_style``. Because the whole image is first scaled to cover the
bucket, ``maximum_image_size`` / ``target_downsample_size`` (SimpleTuner's "downsample huge images
before cropping") would not change the result here; they are recorded in the cache key only.

Random crops come from a hash of ``(seed, path)``, never from global random state, so a plan is
the same in every run and process and the cached latents of a crop stay valid.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from collections.abc import Iterable

import attrs
import numpy as np
from PIL import Image

from tune_data.config import DatasetConfig
from tune_data.discovery import ImageRecord
from tune_data.errors import DataWarning
from tune_data.images import open_rgb
from tune_data.storage import StorageProvider

__all__ = [
    "PlannedImage",
    "bucket_size",
    "plan_image",
    "plan_buckets",
    "load_training_image",
    "upscale_factor",
    "too_much_upscaling",
]

Size = tuple[int, int]


@attrs.frozen
class PlannedImage:
    """How one image becomes a training sample: its bucket, the resize, the crop window."""

    record: ImageRecord
    bucket: Size
    """``(width, height)`` of the training sample; every image of a batch shares it."""
    resize: Size
    """``(width, height)`` the image is scaled to first; covers the bucket."""
    crop_box: tuple[int, int, int, int]
    """``(left, top, right, bottom)`` in the resized image; exactly the bucket's size."""

    @property
    def cache_item_id(self) -> str:
        """An item id for a latent cache that changes whenever this image's geometry changes.

        Use it (with ``record.identity``) as the key of a cached latent: a different seed moving a
        random crop, or any resize change, then misses the cache instead of reusing a stale entry.
        """
        (bucket_w, bucket_h), (resized_w, resized_h) = self.bucket, self.resize
        box = ",".join(map(str, self.crop_box))
        return f"{self.record.path}|{bucket_w}x{bucket_h}|{resized_w}x{resized_h}|{box}"


def _align(value: float, alignment: int) -> int:
    """Nearest multiple of ``alignment`` (halves round up), never below one multiple."""
    return max(alignment, int(math.floor(value / alignment + 0.5)) * alignment)


def _target_area(dataset: DatasetConfig) -> float:
    if dataset.resolution_type == "area":
        return dataset.resolution * 1_000_000
    return dataset.resolution * dataset.resolution  # pixel_area; pixel squares use it for crops


def _rng(seed: int, dataset: DatasetConfig, path: str, purpose: str = "") -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{dataset.id}\0{path}{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _chosen_aspect(width: int, height: int, dataset: DatasetConfig, path: str, seed: int) -> float:
    """The ``crop_aspect_buckets`` entry an image is cropped to (``closest`` or ``random``), among
    those within ``max_upscale_threshold`` when it is set (all of them when none is: discovery has
    dropped such an image already; a caller planning it anyway gets the usual choice)."""
    choices = dataset.crop_aspect_buckets or (1.0,)
    if dataset.max_upscale_threshold is not None:
        allowed = tuple(a for a in choices if _within_threshold(width, height, _aspect_bucket(a, dataset), dataset))
        choices = allowed or choices
    if dataset.crop_aspect == "random":
        return _rng(seed, dataset, path, "\0aspect").choice(choices)
    own = math.log(width / height)  # nearest in log space: 2:1 and 1:2 are equally far from 1:1
    return min(choices, key=lambda aspect: (abs(math.log(aspect) - own), aspect))


def bucket_size(width: int, height: int, dataset: DatasetConfig, *, path: str = "", seed: int = 0) -> Size:
    """The ``(width, height)`` bucket of an image of this displayed size.

    ``path`` and ``seed`` only matter for ``crop_aspect: random`` (which aspect a file gets).
    """
    alignment = dataset.aspect_bucket_alignment
    if dataset.crop and dataset.crop_aspect == "square":
        side = math.sqrt(_target_area(dataset))
        edge = _align(side, alignment)
        return edge, edge
    if dataset.crop and dataset.crop_aspect in ("closest", "random"):
        return _aspect_bucket(_chosen_aspect(width, height, dataset, path, seed), dataset)
    return _aspect_bucket(width / height, dataset)


def _aspect_bucket(aspect: float, dataset: DatasetConfig) -> Size:
    """The bucket of an aspect ratio (width / height) at the dataset's resolution."""
    alignment = dataset.aspect_bucket_alignment
    rounding = dataset.aspect_bucket_rounding
    aspect = max(round(aspect, rounding), 10.0**-rounding)
    if dataset.resolution_type == "pixel":
        short = dataset.resolution
        if aspect >= 1:
            return _align(short * aspect, alignment), _align(short, alignment)
        return _align(short, alignment), _align(short / aspect, alignment)
    area = _target_area(dataset)
    return _align(math.sqrt(area * aspect), alignment), _align(math.sqrt(area / aspect), alignment)


def upscale_factor(width: int, height: int, bucket: Size) -> float:
    """How much an image of this size is enlarged to cover ``bucket`` (``1.0`` or less: not at all)."""
    return max(bucket[0] / width, bucket[1] / height)


def _within_threshold(width: int, height: int, bucket: Size, dataset: DatasetConfig) -> bool:
    limit = dataset.max_upscale_threshold
    # A hair of tolerance: 0.2 must allow exactly 1.2x despite float rounding.
    return limit is None or upscale_factor(width, height, bucket) <= 1.0 + limit + 1e-9


def too_much_upscaling(width: int, height: int, dataset: DatasetConfig) -> str | None:
    """Why an image of this size needs more enlargement than ``max_upscale_threshold`` allows, or
    ``None`` when it fits (or no threshold is set). The same for every seed: with ``closest`` /
    ``random`` the image is kept when any of ``crop_aspect_buckets`` fits it."""
    limit = dataset.max_upscale_threshold
    if limit is None:
        return None
    if dataset.crop and dataset.crop_aspect in ("closest", "random"):
        candidates = [_aspect_bucket(a, dataset) for a in dataset.crop_aspect_buckets or (1.0,)]
    else:
        candidates = [bucket_size(width, height, dataset)]
    best = min(candidates, key=lambda bucket: upscale_factor(width, height, bucket))
    if _within_threshold(width, height, best, dataset):
        return None
    factor = upscale_factor(width, height, best)
    which = "its smallest-upscale bucket" if len(candidates) > 1 else "its bucket"
    return (
        f"{width}x{height} needs {factor:.2f}x upscaling to cover {which} {best[0]}x{best[1]}; "
        f"max_upscale_threshold {limit:g} allows {1 + limit:.2f}x"
    )


def _crop_offsets(free_x: int, free_y: int, dataset: DatasetConfig, path: str, seed: int) -> tuple[int, int]:
    if not dataset.crop or dataset.crop_style == "center":
        return free_x // 2, free_y // 2
    if dataset.crop_style == "corner":
        return free_x, free_y
    rng = _rng(seed, dataset, path)
    return rng.randint(0, free_x), rng.randint(0, free_y)


def plan_image(record: ImageRecord, dataset: DatasetConfig, *, seed: int = 0) -> PlannedImage:
    """The bucket, resize and crop of one image (pure: the same inputs give the same plan)."""
    bucket_w, bucket_h = bucket_size(record.width, record.height, dataset, path=record.path, seed=seed)
    (resized_w, resized_h), _ = _cover(record.width, record.height, (bucket_w, bucket_h))
    left, top = _crop_offsets(resized_w - bucket_w, resized_h - bucket_h, dataset, record.path, seed)
    return PlannedImage(
        record=record,
        bucket=(bucket_w, bucket_h),
        resize=(resized_w, resized_h),
        crop_box=(left, top, left + bucket_w, top + bucket_h),
    )


def plan_buckets(
    records: Iterable[ImageRecord], dataset: DatasetConfig, *, seed: int = 0
) -> dict[Size, list[PlannedImage]]:
    """Group images by bucket. Keys are sorted ``(width, height)``; each list keeps record order."""
    buckets: dict[Size, list[PlannedImage]] = {}
    for record in records:
        planned = plan_image(record, dataset, seed=seed)
        buckets.setdefault(planned.bucket, []).append(planned)
    return dict(sorted(buckets.items()))


def load_training_image(storage: StorageProvider, planned: PlannedImage) -> np.ndarray:
    """The training pixels of one planned image: ``uint8``, ``(height, width, 3)`` RGB, bucket-sized.

    EXIF orientation is applied and transparency composited onto white before the LANCZOS resize
    and the crop. A file that no longer decodes raises ``ValueError`` naming it.
    """
    rel = planned.record.path
    try:
        with storage.open(rel, "rb") as handle:
            image = open_rgb(handle)
    except Exception as exc:
        raise ValueError(f"cannot decode image {rel} in {storage.root}: {exc}") from exc
    resize, crop_box = planned.resize, planned.crop_box
    if image.size != (planned.record.width, planned.record.height):
        # The file changed since discovery. Keep the batch's shape: cover the bucket, crop centred.
        warnings.warn(
            f"image {rel} is {image.width}x{image.height} now but was "
            f"{planned.record.width}x{planned.record.height} at discovery; fitting it to its "
            f"bucket {planned.bucket[0]}x{planned.bucket[1]}. Run discovery again to refresh.",
            DataWarning,
            stacklevel=2,
        )
        resize, crop_box = _cover(image.width, image.height, planned.bucket)
    image = image.resize(resize, Image.Resampling.LANCZOS).crop(crop_box)
    return np.asarray(image, dtype=np.uint8)


def _cover(width: int, height: int, bucket: Size) -> tuple[Size, tuple[int, int, int, int]]:
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized_w = max(bucket_w, round(width * scale))
    resized_h = max(bucket_h, round(height * scale))
    left, top = (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
    return (resized_w, resized_h), (left, top, left + bucket_w, top + bucket_h)
