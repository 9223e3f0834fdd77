"""Discovery: which files of a dataset are usable training images, and why the others are not.

It lists the storage once, reads only image headers (size, EXIF orientation), finds each caption,
and drops what cannot be trained on with a reason a user can act on. A metadata cache keyed by
path and storage identity makes a second run reopen only files that changed.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterable

import attrs

from tune_data.captions import caption_file_for, caption_for, get_strategy, textfile_caption, with_instance_prompt
from tune_data.config import DatasetConfig
from tune_data.errors import DataWarning, EmptyDatasetError, MissingFilesError
from tune_data.images import IMAGE_EXTENSIONS, describe_error, header_size, open_rgb
from tune_data.metadata import MetadataCache, metadata_path
from tune_data.storage import StorageProvider
from tune_data.tabular import METADATA_EXTENSIONS
from tune_data.video import VIDEO_EXTENSIONS

__all__ = [
    "ImageRecord",
    "VideoRecord",
    "TOO_SHORT",
    "TOO_LONG",
    "DroppedFile",
    "DiscoveryReport",
    "EmptyDatasetError",
    "MissingFilesError",
    "discover",
    "image_size_in_unit",
    "UNDECODABLE",
    "MISSING_CAPTION",
    "TOO_SMALL",
    "TOO_MUCH_UPSCALING",
    "ASPECT_OUT_OF_RANGE",
    "UNSUPPORTED_EXTENSION",
    "MISSING_FILE",
]

logger = logging.getLogger(__name__)

UNDECODABLE = "undecodable"
MISSING_CAPTION = "missing caption"
TOO_SMALL = "too small"
TOO_MUCH_UPSCALING = "too much upscaling"
ASPECT_OUT_OF_RANGE = "aspect ratio out of range"
UNSUPPORTED_EXTENSION = "unsupported extension"
TOO_SHORT = "too short"
TOO_LONG = "too long"
MISSING_FILE = "missing file"

#: How many dropped files an error message lists before summarising the rest.
_LISTED_DROPS = 8


@attrs.frozen
class ImageRecord:
    """One usable image: where it is, its displayed size, its caption, its storage identity."""

    path: str
    """Path relative to the storage root (POSIX)."""
    width: int
    """Width as displayed (EXIF orientation applied)."""
    height: int
    """Height as displayed."""
    caption: str
    """The caption found by the dataset's caption strategy."""
    identity: str
    """The storage's fingerprint of the file; caches key their entries by it."""


@attrs.frozen
class VideoRecord(ImageRecord):
    """One usable video: an :class:`ImageRecord` (frame size) plus its length and rate."""

    frames: int = 0
    """Frames in the video (from the container; exact when ``scan_for_errors`` decoded it)."""
    fps: float = 0.0
    """The video's own frame rate."""


@attrs.frozen
class DroppedFile:
    """A file discovery did not keep, and why."""

    path: str
    """Path relative to the storage root."""
    reason: str
    """One of ``undecodable``, ``missing caption``, ``too small``, ``too much upscaling`` (beyond
    ``max_upscale_threshold``), ``aspect ratio out of range`` (``minimum_aspect_ratio`` /
    ``maximum_aspect_ratio``), ``unsupported extension``,
    ``too short`` / ``too long`` (videos against ``video.min_frames`` / ``max_frames``),
    ``missing file`` (listed by the source, e.g. a CSV row, but absent or not downloadable)."""
    detail: str = ""
    """Specifics for the user (the decoder's message, the size against the minimum, ...)."""


@attrs.frozen
class DiscoveryReport:
    """What discovery saw in one dataset: every file counted, each kept or dropped."""

    dataset_id: str
    seen: int
    """Files considered (caption ``.txt`` files of the ``textfile`` strategy are not counted)."""
    kept: tuple[ImageRecord, ...]
    dropped: tuple[DroppedFile, ...]

    def drop_counts(self) -> dict[str, int]:
        """Number of dropped files per reason."""
        return dict(Counter(drop.reason for drop in self.dropped))

    def summary(self) -> str:
        """One line for logs: ``dataset 'pets': kept 14 of 16 files; dropped 2 (1 undecodable, ...)``."""
        text = f"dataset {self.dataset_id!r}: kept {len(self.kept)} of {self.seen} files"
        if self.dropped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.drop_counts().items()))
            text += f"; dropped {len(self.dropped)} ({reasons})"
        return text


def image_size_in_unit(width: int, height: int, resolution_type: str) -> float:
    """An image's size in the unit of ``resolution_type``, to compare with ``minimum_image_size``.

    ``pixel``: the shorter edge; ``pixel_area``: the edge of the square of equal area;
    ``area``: megapixels.
    """
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "pixel_area":
        return math.sqrt(width * height)
    return width * height / 1_000_000


def discover(
    dataset: DatasetConfig,
    storage: StorageProvider,
    *,
    metadata_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> DiscoveryReport:
    """Find the usable images of ``dataset`` in ``storage``.

    ``metadata_dir`` enables the metadata cache (one JSON file per dataset there). Undecodable
    images and images whose caption file is missing are reported with a warning naming the file.
    Raises :class:`EmptyDatasetError` when nothing is kept, listing what was dropped and why.
    """
    dataset.require_implemented()
    if not dataset.is_training_data:
        raise ValueError(
            f"dataset {dataset.id!r}: discovery needs an image or video dataset, not {dataset.dataset_type!r}"
        )
    strategy = get_strategy(dataset)
    cache_path = metadata_path(metadata_dir, dataset.id) if metadata_dir is not None else None
    cache = MetadataCache(cache_path, storage.root)
    files = _list_files(storage)
    sidecars = dataset.caption_strategy == "textfile"
    tables = dataset.caption_strategy in ("parquet", "jsonl") or dataset.metadata_backend == "parquet"

    examine = _Examiner(dataset, storage, cache, strategy)
    todo: list[str] = []
    for rel in files:
        extension = posixpath.splitext(rel)[1].lower()
        if sidecars and extension == ".txt":
            continue  # caption files belong to their image
        if tables and extension in METADATA_EXTENSIONS:
            continue  # the caption table itself
        todo.append(rel)

    kept: list[ImageRecord] = []
    dropped: list[DroppedFile] = []
    seen = len(todo)
    for outcome, warning in _map(examine, todo, _workers(storage), progress, dataset.id):
        if warning:
            warnings.warn(warning, DataWarning, stacklevel=2)
        if isinstance(outcome, DroppedFile):
            dropped.append(outcome)
        else:
            kept.append(outcome)
    cache.save()

    report = DiscoveryReport(dataset.id, seen, tuple(kept), tuple(dropped))
    missing = [drop for drop in dropped if drop.reason == MISSING_FILE]
    if missing and not dataset.ignore_missing_files:
        listed = ", ".join(f"{drop.path} ({drop.detail})" for drop in missing[:_LISTED_DROPS])
        more = f", ... and {len(missing) - _LISTED_DROPS} more" if len(missing) > _LISTED_DROPS else ""
        raise MissingFilesError(
            f"dataset {dataset.id!r}: {len(missing)} listed file{'' if len(missing) == 1 else 's'} "
            f"could not be read: {listed}{more}. Set \"ignore_missing_files\": true to train without them."
        )
    logger.info(report.summary())
    if not kept:
        raise EmptyDatasetError(_empty_message(report, storage.root or repr(storage)))
    return report


def _list_files(storage: StorageProvider) -> list[str]:
    """Every file, to report unsupported ones too; else, for a provider that can only list by
    extension, the images and caption files (unsupported files then go unreported)."""
    try:
        return storage.list_files(None)
    except TypeError:  # list_files(extensions) without the optional "None lists all" form
        return storage.list_files(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | {".txt"}))


class _Examiner:
    """Everything discovery decides about one file: kept (an :class:`ImageRecord`) or dropped
    (a :class:`DroppedFile`), with the warning to show, if any. Runs in worker threads for remote
    storage, so it only returns what it found; the caller warns and collects in listing order."""

    def __init__(self, dataset: DatasetConfig, storage: StorageProvider, cache: MetadataCache, strategy) -> None:
        self.dataset = dataset
        self.storage = storage
        self.cache = cache
        self.strategy = strategy
        self.measure = _Measurer(dataset, storage, cache)
        self.extensions = VIDEO_EXTENSIONS if dataset.is_video else IMAGE_EXTENSIONS
        # textfile captions are remembered in the metadata cache, keyed by the .txt's identity.
        self.cache_captions = strategy is textfile_caption

    def __call__(self, rel: str) -> tuple[ImageRecord | DroppedFile, str | None]:
        dataset = self.dataset
        extension = posixpath.splitext(rel)[1].lower()
        if extension not in self.extensions:
            return DroppedFile(rel, UNSUPPORTED_EXTENSION, extension or "no extension"), None
        outcome = self.measure(rel)
        if isinstance(outcome, DroppedFile):
            what = "missing" if outcome.reason == MISSING_FILE else "undecodable"
            kind = "video" if dataset.is_video else "image"
            return outcome, f"dataset {dataset.id!r}: skipping {what} {kind} {rel}: {outcome.detail}"
        (width, height), identity, video = outcome
        if video is not None:
            length = _wrong_length(dataset, rel, *video)
            if length is not None:
                return length, None
        too_small = _too_small(dataset, rel, width, height)
        if too_small is not None:
            return too_small, None
        wrong_aspect = _wrong_aspect(dataset, rel, width, height)
        if wrong_aspect is not None:
            return wrong_aspect, None
        if dataset.max_upscale_threshold is not None:
            from tune_data.buckets import too_much_upscaling  # buckets imports this module

            why = too_much_upscaling(width, height, dataset)
            if why is not None:
                return DroppedFile(rel, TOO_MUCH_UPSCALING, why), None
        caption = self._caption(rel)
        if caption is None:
            return (
                DroppedFile(rel, MISSING_CAPTION, f"no caption from {dataset.caption_strategy!r}"),
                f"dataset {dataset.id!r}: skipping {rel}: caption_strategy "
                f"{dataset.caption_strategy!r} found no caption for it",
            )
        if video is not None:
            return VideoRecord(rel, width, height, caption, identity, frames=video[0], fps=video[1]), None
        return ImageRecord(rel, width, height, caption, identity), None

    def _caption(self, rel: str) -> str | None:
        if not self.cache_captions:
            return caption_for(self.storage, rel, self.dataset, self.strategy)
        try:
            caption_identity = self.storage.identity(caption_file_for(rel))
        except FileNotFoundError:
            return None
        except Exception:  # a source without identities for side files: read it every time
            return caption_for(self.storage, rel, self.dataset, self.strategy)
        raw = self.cache.remembered_caption(rel, caption_identity)
        if raw is None:
            raw = textfile_caption(self.storage, rel, self.dataset)
            if raw is None:
                return None
            self.cache.remember_caption(rel, caption_identity, raw)
        return with_instance_prompt(raw, self.dataset)


#: Threads that examine files of a remote store at once: each file costs a round trip or two
#: (header range read, caption read), so latency, not CPU, bounds discovery there.
REMOTE_DISCOVERY_THREADS = 16


def _workers(storage: StorageProvider) -> int:
    """Threads for a provider that declares ``concurrent_reads = True`` (thread-safe reads, a
    remote store where latency dominates: ``aws``), else 1 (local header parsing is CPU work
    under the GIL, and a provider that downloads on read may not be safe to call concurrently)."""
    return REMOTE_DISCOVERY_THREADS if getattr(storage, "concurrent_reads", False) else 1


def _map(function, items: list[str], workers: int, progress: bool, dataset_id: str) -> Iterable:
    """``map(function, items)`` in order, on ``workers`` threads, with an optional progress bar."""
    if workers <= 1 or len(items) < 2:
        results = map(function, items)
    else:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tune-discovery")
        results = _closing(pool, pool.map(function, items))
    return _progress(results, progress, dataset_id, len(items))


def _closing(pool, results):
    try:
        yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Measurer:
    """Size and identity of one file, or why it cannot be used; honours the dataset's
    ``skip_file_discovery``, ``scan_for_errors`` and ``metadata_backend`` settings."""

    def __init__(self, dataset: DatasetConfig, storage: StorageProvider, cache: MetadataCache) -> None:
        self.storage = storage
        self.cache = cache
        self.trust_cache = bool({"metadata", "aspect"} & set(dataset.skip_steps))
        self.scan = dataset.scan_for_errors
        self.video = dataset.is_video
        self.table = None
        if dataset.metadata_backend == "parquet":
            from tune_data.tabular import table_for

            self.table = table_for(storage, dataset)

    def __call__(self, rel: str) -> tuple[tuple[int, int], str, tuple[int, float] | None] | DroppedFile:
        storage, cache = self.storage, self.cache
        if self.trust_cache:
            entry = cache.get_trusted(rel)
            if entry is not None and "error" not in entry and (entry.get("verified") or not self.scan):
                return (int(entry["width"]), int(entry["height"])), str(entry["identity"]), _video(entry)
        try:
            identity = storage.identity(rel)
        except FileNotFoundError as exc:  # listed (by a CSV, a stale listing) but not there
            return DroppedFile(rel, MISSING_FILE, describe_error(exc))
        entry = cache.get(rel, identity)
        if entry is not None and "error" in entry:
            return DroppedFile(rel, UNDECODABLE, entry["error"])
        if entry is not None and (entry.get("verified") or not self.scan):
            return (int(entry["width"]), int(entry["height"])), identity, _video(entry)
        if self.video:
            return self._measure_video(rel, identity)
        size = self.table.size(rel) if self.table is not None and not self.scan else None
        try:
            if self.scan:
                with storage.open(rel, "rb") as handle:
                    image = open_rgb(handle)  # every pixel decoded: damage anywhere shows here
                size = image.size
            elif size is None:
                # A provider may offer a cheaper open for header reads (S3: small first fetch).
                opener = getattr(storage, "open_header", None) or (lambda path: storage.open(path, "rb"))
                with opener(rel) as handle:
                    size = header_size(handle)
        except FileNotFoundError as exc:
            return DroppedFile(rel, MISSING_FILE, describe_error(exc))
        except Exception as exc:  # Pillow raises many types for bad files; all mean "undecodable"
            error = describe_error(exc)
            cache.put(rel, identity, error=error)
            return DroppedFile(rel, UNDECODABLE, error)
        cache.put(rel, identity, size=size, verified=self.scan)
        return size, identity, None

    def _measure_video(self, rel: str, identity: str):
        from tune_data.video import count_frames, probe_video

        try:
            with self.storage.open(rel, "rb") as handle:
                info = count_frames(handle) if self.scan else probe_video(handle)
        except FileNotFoundError as exc:
            return DroppedFile(rel, MISSING_FILE, describe_error(exc))
        except ImportError:
            raise  # PyAV missing: the install hint, not a dataset full of "undecodable" files
        except Exception as exc:  # PyAV raises many types for bad files
            error = describe_error(exc)
            self.cache.put(rel, identity, error=error)
            return DroppedFile(rel, UNDECODABLE, error)
        size = (info.width, info.height)
        self.cache.put(rel, identity, size=size, verified=self.scan, extra={"frames": info.frames, "fps": info.fps})
        return size, identity, (info.frames, info.fps)


def _video(entry: dict) -> tuple[int, float] | None:
    """``(frames, fps)`` of a cached video entry, ``None`` for an image's."""
    if "frames" not in entry:
        return None
    return int(entry["frames"]), float(entry.get("fps") or 0.0)


def _wrong_length(dataset: DatasetConfig, rel: str, frames: int, fps: float) -> DroppedFile | None:
    """A video too short for one clip (``min_frames``) or longer than ``max_frames``, counted in
    frames at the dataset's ``video_fps``."""
    from tune_data.video import VideoInfo, frames_at_rate

    usable = frames_at_rate(VideoInfo(1, 1, frames, fps), dataset.video_fps)
    rate = f" at {dataset.video_fps:g} fps" if dataset.video_fps else ""
    if usable < dataset.min_frames:
        return DroppedFile(rel, TOO_SHORT, f"{usable} frames{rate} < min_frames {dataset.min_frames}")
    if dataset.video_max_frames is not None and usable > dataset.video_max_frames:
        return DroppedFile(rel, TOO_LONG, f"{usable} frames{rate} > max_frames {dataset.video_max_frames}")
    return None


def _too_small(dataset: DatasetConfig, rel: str, width: int, height: int) -> DroppedFile | None:
    minimum = dataset.minimum_image_size
    if not minimum:
        return None
    size = image_size_in_unit(width, height, dataset.resolution_type)
    if size >= minimum:
        return None
    return DroppedFile(
        rel,
        TOO_SMALL,
        f"{width}x{height} is {size:g} < minimum_image_size {minimum:g} ({dataset.resolution_type})",
    )


def _wrong_aspect(dataset: DatasetConfig, rel: str, width: int, height: int) -> DroppedFile | None:
    aspect = width / height
    low, high = dataset.minimum_aspect_ratio, dataset.maximum_aspect_ratio
    if low is not None and aspect < low:
        return DroppedFile(rel, ASPECT_OUT_OF_RANGE, f"{width}x{height} has aspect {aspect:.3g} < minimum_aspect_ratio {low:g}")
    if high is not None and aspect > high:
        return DroppedFile(rel, ASPECT_OUT_OF_RANGE, f"{width}x{height} has aspect {aspect:.3g} > maximum_aspect_ratio {high:g}")
    return None


def _empty_message(report: DiscoveryReport, root: str) -> str:
    text = f"dataset {report.dataset_id!r}: no images detected in {root}: saw {report.seen} file{'' if report.seen == 1 else 's'}"
    if report.dropped:
        listed = ", ".join(f"{drop.path} ({drop.reason})" for drop in report.dropped[:_LISTED_DROPS])
        rest = len(report.dropped) - _LISTED_DROPS
        if rest > 0:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(report.drop_counts().items()))
            listed += f", ... and {rest} more ({counts} in all)"
        text += f"; dropped {listed}"
    return text


def _progress(results: Iterable, enabled: bool, dataset_id: str, total: int) -> Iterable:
    if not enabled:
        return results
    from tqdm.auto import tqdm

    return tqdm(results, desc=f"discovering {dataset_id}", unit="file", total=total)
