"""Conditioning datasets: reference (edit) and control images paired with training images.

An image dataset names one or more ``dataset_type: conditioning`` datasets in its
``conditioning_data``. Pairs are found by relative path, ignoring the extension (``people/ann.png``
pairs with ``people/ann.jpg`` in the conditioning folder), because edit datasets are usually two
folders of the same layout whose files were exported in different formats. A training image
without a pair in *every* named conditioning dataset is dropped at discovery with reason
``missing conditioning``: training it without its reference would teach the model to ignore
references, which is worse than not training on it.

How the reference is cut to size follows the conditioning dataset's ``conditioning_type``:

- ``reference_strict`` / ``controlnet``: the reference gets exactly its target's resize and crop
  (same bucket, same window), so pixel-aligned pairs stay aligned after cropping;
- ``reference_loose``: the reference is planned on its own, in its own aspect bucket from the
  conditioning dataset's ``resolution`` settings (a product photo guiding a differently framed
  scene).

Discovery of a conditioning dataset reads image headers only, like an image dataset's; it needs
no captions.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

import attrs

from tune_data.buckets import PlannedImage, plan_image
from tune_data.config import DatasetConfig
from tune_data.discovery import DiscoveryReport, DroppedFile, ImageRecord, discover
from tune_data.storage import StorageProvider

__all__ = [
    "MISSING_CONDITIONING",
    "ConditioningIndex",
    "discover_conditioning",
    "pair_conditioning",
    "plan_reference",
]

MISSING_CONDITIONING = "missing conditioning"
"""Drop reason of a training image that has no usable pair in one of its conditioning datasets."""


def _stem(path: str) -> str:
    return posixpath.splitext(path)[0]


@attrs.frozen
class ConditioningIndex:
    """One discovered conditioning dataset: its report and its usable images by path stem."""

    dataset: DatasetConfig
    report: DiscoveryReport
    """Discovery of the conditioning images themselves (what was kept and dropped there)."""
    by_stem: dict[str, ImageRecord]
    """Usable conditioning images by relative path without extension."""
    dropped_by_stem: dict[str, DroppedFile]
    """Conditioning files discovery dropped, by stem, to say why a pair is missing."""

    def find(self, target: ImageRecord) -> ImageRecord | None:
        """The conditioning image paired with ``target`` (same relative path, any extension)."""
        return self.by_stem.get(_stem(target.path))


def discover_conditioning(
    dataset: DatasetConfig,
    storage: StorageProvider,
    *,
    metadata_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ConditioningIndex:
    """Discover a ``dataset_type: conditioning`` dataset (headers only, no captions needed).

    Its size and decoding rules are the dataset's own (``minimum_image_size``,
    ``scan_for_errors``, ...). Raises :class:`tune_data.errors.EmptyDatasetError` when it holds no
    usable image.
    """
    if dataset.dataset_type != "conditioning":
        raise ValueError(
            f"dataset {dataset.id!r}: discover_conditioning needs dataset_type 'conditioning', "
            f"not {dataset.dataset_type!r}"
        )
    # The same header discovery as images; file names stand in for captions, which are unused.
    as_images = attrs.evolve(
        dataset,
        dataset_type="image",
        conditioning_type=None,
        caption_strategy="filename",
        instance_prompt=None,
        prepend_instance_prompt=False,
    )
    report = discover(as_images, storage, metadata_dir=metadata_dir, progress=progress)
    by_stem: dict[str, ImageRecord] = {}
    # Sorted so that a stem with two files (a.jpg and a.png) always pairs with the same one.
    for record in sorted(report.kept, key=lambda r: r.path):
        by_stem.setdefault(_stem(record.path), record)
    dropped = {_stem(drop.path): drop for drop in report.dropped}
    return ConditioningIndex(dataset, report, by_stem, dropped)


def pair_conditioning(
    report: DiscoveryReport, indexes: Sequence[ConditioningIndex]
) -> tuple[DiscoveryReport, dict[str, tuple[ImageRecord, ...]]]:
    """Keep the training images that have a pair in every conditioning dataset.

    Returns the report with the unpaired images moved to ``dropped`` (reason
    ``missing conditioning``, the detail naming the conditioning dataset and what it lacks) and the
    pairs: training image path -> one conditioning record per index, in ``indexes`` order.
    """
    kept: list[ImageRecord] = []
    dropped = list(report.dropped)
    pairs: dict[str, tuple[ImageRecord, ...]] = {}
    for record in report.kept:
        found: list[ImageRecord] = []
        for index in indexes:
            reference = index.find(record)
            if reference is None:
                dropped.append(DroppedFile(record.path, MISSING_CONDITIONING, _why_missing(record, index)))
                break
            found.append(reference)
        else:
            kept.append(record)
            pairs[record.path] = tuple(found)
    return DiscoveryReport(report.dataset_id, report.seen, tuple(kept), tuple(dropped)), pairs


def _why_missing(record: ImageRecord, index: ConditioningIndex) -> str:
    stem = _stem(record.path)
    drop = index.dropped_by_stem.get(stem)
    where = f"conditioning dataset {index.dataset.id!r}"
    if drop is not None:
        return f"its pair {drop.path} in {where} was dropped ({drop.reason}: {drop.detail})"
    return f"no image named {stem}.* in {where}"


def plan_reference(
    target: PlannedImage, reference: ImageRecord, conditioning: DatasetConfig, *, seed: int = 0
) -> PlannedImage:
    """How ``reference`` becomes the conditioning sample of ``target`` (see the module docstring).

    Strict pairing scales the reference to the target's resize size, whatever its own size, and
    takes the target's crop window, so the two stay aligned pixel for pixel; loose pairing plans
    it like an image of the conditioning dataset.
    """
    if conditioning.conditioning_type == "reference_loose":
        return plan_image(reference, conditioning, seed=seed)
    return PlannedImage(record=reference, bucket=target.bucket, resize=target.resize, crop_box=target.crop_box)
