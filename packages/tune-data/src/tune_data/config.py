"""Dataset entries of a SimpleTuner-style ``multidatabackend.json``, typed and validated.

A user who moves from SimpleTuner keeps their file: every key keeps its SimpleTuner name and
meaning, a leading ``--`` is allowed, keys SimpleTuner knows but tune does not implement yet are
accepted with one warning, and anything else is an error that suggests the closest known key.
Relative paths are kept as written; the caller decides what they are relative to.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from tune_data.errors import DatasetConfigError, IgnoredKeysWarning

__all__ = [
    "DatasetConfig",
    "DatasetConfigError",
    "IgnoredKeysWarning",
    "load_dataset_configs",
    "default_text_embeds",
    "text_embeds_for",
    "conditioning_for",
    "CONDITIONING_TYPES",
]

logger = logging.getLogger(__name__)

RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
CROP_STYLES = ("center", "random", "corner")
CROP_ASPECTS = ("square", "preserve", "closest", "random")
METADATA_BACKENDS = ("discovery", "parquet", "huggingface")
IMPLEMENTED_DATASET_TYPES = ("image", "text_embeds", "video", "conditioning")
DATASET_TYPES = (*IMPLEMENTED_DATASET_TYPES, "eval", "image_embeds")
CONDITIONING_TYPES = ("reference_strict", "reference_loose", "controlnet", "mask")
"""How a conditioning image is paired with its target: ``reference_strict``, ``controlnet`` and
``mask`` take the target's bucket, resize and crop (pixel-aligned pairs); ``reference_loose`` plans
the reference in its own aspect bucket, at the conditioning dataset's resolution. A ``mask`` image
is not a model input: it weights the training loss (white trains, black is ignored)."""
VAE_CACHE_SCAN_BEHAVIOURS = ("recreate", "sync")
DATA_BACKEND_SAMPLING = ("auto-weighting", "uniform")
SKIP_DISCOVERY_WORDS = ("vae", "aspect", "text", "metadata")


@attrs.define
class DatasetConfig:
    """One dataset entry. Field names are SimpleTuner's keys, so a config reads the same in both."""

    id: str
    """Unique name of the dataset. Keep it stable: caches and sampler state are keyed by it."""
    type: str = "local"
    """Storage provider that holds the files, looked up in ``tune_data.registry.storage_providers``.
    Default ``local`` (a folder on this machine); plugins add others."""
    dataset_type: str = "image"
    """What the dataset holds: ``image`` (training images), ``video`` (training videos: discovered,
    bucketed by frame size and read as frame-sampled clips; see the ``video`` block) or
    ``text_embeds`` (where the text-embed cache lives) or ``conditioning`` (reference / control
    images paired by relative path with the images of the datasets whose ``conditioning_data``
    names it). ``eval`` is an image dataset held out from training for the evaluation loss (read
    as ``image`` with :attr:`held_out` set). ``image_embeds`` is accepted in configs but fails with
    a clear error when used, as tune does not implement it yet."""
    disabled: bool = False
    """``true`` drops the entry when loading, as if it were not in the file. Default ``false``."""
    default: bool = False
    """For ``text_embeds`` datasets: the one used when an image dataset names none. Default ``false``."""
    instance_data_dir: str | None = None
    """Folder (or prefix, for remote providers) holding the images, searched recursively."""
    caption_strategy: str = "filename"
    """How captions are found: ``filename`` (file name, underscores as spaces), ``textfile``
    (``same-name.txt`` beside the image) or ``instanceprompt`` (``instance_prompt`` for every
    image). Plugins may register more. Default ``filename``."""
    instance_prompt: str | None = None
    """Caption for every image with ``caption_strategy: instanceprompt``; the prefix added by
    ``prepend_instance_prompt``. Default none."""
    prepend_instance_prompt: bool = False
    """Put ``instance_prompt`` and a space before each caption. Default ``false``."""
    resolution: float = 1024
    """Training size, in the unit of ``resolution_type``. Default 1024."""
    resolution_type: str = "pixel_area"
    """Unit of ``resolution`` and of the size limits: ``pixel`` (the shorter edge in pixels),
    ``area`` (megapixels) or ``pixel_area`` (N means an area of N x N pixels at any aspect).
    Default ``pixel_area``."""
    minimum_image_size: float | None = None
    """Images smaller than this (in the ``resolution_type`` unit) are dropped at discovery.
    Default none (keep all)."""
    maximum_image_size: float | None = None
    """Accepted for SimpleTuner compatibility and part of the cache key; tune always scales an image
    to just cover its bucket before cropping, so it does not change the result. Default none."""
    target_downsample_size: float | None = None
    """Accepted for SimpleTuner compatibility with ``maximum_image_size``; see there. Default none."""
    max_upscale_threshold: float | None = None
    """How much an image may be enlarged to cover its bucket, as a fraction: ``0.2`` allows up to
    1.2x. An image that would need more is dropped at discovery with reason ``too much
    upscaling`` (shown by ``tune-data inspect``). With ``crop_aspect`` ``closest`` or ``random``,
    only the ``crop_aspect_buckets`` within the limit are chosen from, and the image is dropped
    only when none is. Default none (any enlargement)."""
    crop: bool = False
    """Crop to the bucket instead of only trimming the alignment remainder; with ``crop_aspect:
    square`` every bucket becomes square. Default ``false``."""
    crop_style: str = "center"
    """Where the crop window sits: ``center``, ``random`` (seeded per file, stable across runs) or
    ``corner`` (bottom-right). ``face`` is refused: it needs a face detector tune does not ship.
    Default ``center``."""
    crop_aspect: str = "square"
    """With ``crop: true``: ``square`` (square buckets), ``preserve`` (keep each image's aspect),
    ``closest`` (the ``crop_aspect_buckets`` aspect nearest the image's) or ``random`` (one of
    ``crop_aspect_buckets``, chosen per file from the seed, stable across runs). Default ``square``."""
    crop_aspect_buckets: tuple[float, ...] | None = None
    """Aspect ratios (width / height) ``crop_aspect`` ``closest`` and ``random`` choose from, e.g.
    ``[0.75, 1.0, 1.5]``; required by them. Default none."""
    aspect_bucket_alignment: int = 64
    """Bucket edges are multiples of this many pixels. Default 64."""
    aspect_bucket_rounding: int = 2
    """Decimals the aspect ratio is rounded to before the bucket size is computed, so images of
    nearly the same shape share a bucket. Default 2."""
    repeats: int = 0
    """Extra times each image is seen per epoch: 0 means once (SimpleTuner's convention, not
    kohya's). Default 0."""
    probability: float = 1.0
    """Weight of this dataset when a step picks which dataset to draw from (0 to 1). Default 1."""
    cache_dir_vae: str | None = None
    """Folder for this dataset's latent cache. Default none (the trainer chooses)."""
    minimum_aspect_ratio: float | None = None
    """Images whose aspect ratio (width / height, as displayed) is below this are dropped at
    discovery with reason ``aspect ratio out of range`` (e.g. ``0.5``: nothing taller than 1:2).
    Default none."""
    maximum_aspect_ratio: float | None = None
    """Images whose aspect ratio (width / height) is above this are dropped at discovery with reason
    ``aspect ratio out of range`` (e.g. ``2.0``: nothing wider than 2:1). Default none."""
    compress_disk_cache: bool = False
    """Write this dataset's cache entries (latents; text embeddings for a ``text_embeds`` dataset)
    gzip-compressed, ``<key>.safetensors.gz``: 7-12 % smaller for float32 latents, 20-37 % for
    bfloat16, for ~5 ms of CPU per MiB to read (the trainer reads batches ahead, off the step).
    Entries of either form are read whatever the setting, so switching it re-encodes nothing.
    Trainer-level in SimpleTuner; a config.json value applies to every dataset. Default ``false``."""
    cache_dir: str | None = None
    """For ``text_embeds`` datasets: folder for the text-embed cache. Default none."""
    text_embeds: str | None = None
    """Id of the ``text_embeds`` dataset whose cache this image dataset uses. Default none (the
    ``default: true`` one)."""
    skip_file_discovery: str = ""
    """Space- or comma-separated steps to skip when their cache exists: ``vae``, ``aspect``,
    ``text``, ``metadata``. With ``metadata`` or ``aspect``, discovery trusts the metadata cache
    for files it already knows (no identity check: no request per object on S3); changed files
    are then not noticed, so leave it off while the dataset is being edited."""
    metadata_backend: str = "discovery"
    """Where image sizes come from: ``discovery`` (read each image's header, cached), ``parquet``
    (the ``parquet_width_column`` / ``parquet_height_column`` of the caption table, no image is
    opened for it) or ``huggingface`` (as ``discovery``, for ``type: huggingface``).
    Default ``discovery``."""
    scan_for_errors: bool = False
    """Decode every image completely during discovery and drop the ones that fail (reason
    ``undecodable``, with a warning naming the file); a success is remembered in the metadata
    cache, so only new or changed files are decoded again. The trainer also reads back every
    latent cache entry of the dataset at discovery and repairs damaged ones (see
    ``vae_cache_scan_behaviour``). Default ``false`` (headers only)."""
    vae_cache_ondemand: bool = False
    """Skip the pass that encodes every image before training: a latent is encoded the first time
    its batch is drawn, then written to the cache and read from there on. Starts training at once;
    the first epoch runs slower (the VAE works inside the loop). Default ``false``."""
    vae_cache_clear_each_epoch: bool = False
    """Delete this dataset's cached latents at the end of every epoch; the next epoch encodes them
    again on demand. With ``crop_style: random`` each epoch then gets new crop windows (seeded by
    the epoch, so runs stay reproducible). Default ``false``."""
    vae_cache_scan_behaviour: str = "recreate"
    """With ``scan_for_errors``, what to do with a latent cache entry that is damaged (truncated,
    corrupt, or of another shape than its bucket's latents): ``recreate`` deletes it and encodes
    the image again; ``sync`` deletes it and leaves the image out of this run, so the buckets match
    what the cache holds without running the VAE. Default ``recreate``."""
    video_num_frames: int = 125
    """``dataset_type: video`` (SimpleTuner's ``"video": {"num_frames": ...}``): frames per training
    clip. Default 125."""
    video_min_frames: int | None = None
    """Videos yielding fewer frames than this at ``video_fps`` are dropped (reason ``too short``).
    Default: ``video_num_frames`` (every kept video gives a full clip)."""
    video_max_frames: int | None = None
    """Videos yielding more frames than this at ``video_fps`` are dropped (reason ``too long``).
    Default none."""
    video_fps: float | None = None
    """Frame rate clips are sampled at (a 30 fps video at 15 takes every second frame). Default
    none: each video's own rate."""
    video_is_i2v: bool = False
    """The clips train an image-to-video model (the first frame conditions the rest). Recorded
    for the trainer. Default ``false``."""
    ignore_missing_files: bool = False
    """A file the source lists but cannot deliver (a CSV row whose path is gone, a failed download,
    an object deleted since listing) is dropped with reason ``missing file`` and a warning instead
    of failing discovery. Default ``false`` (fail, naming the files)."""
    conditioning_data: tuple[str, ...] | None = None
    """Image datasets: id (or list of ids) of the ``dataset_type: conditioning`` datasets whose
    images condition this one's (reference / edit training). A conditioning image pairs with the
    training image at the same relative path (any image extension: ``a/cat.png`` pairs with
    ``a/cat.jpg``); a training image without a pair in every named dataset is dropped at
    discovery with reason ``missing conditioning``. Default none."""
    conditioning_type: str | None = None
    """``dataset_type: conditioning``: how its images pair with their targets. ``reference_strict``
    (the default) and ``controlnet``: the reference is resized and cropped exactly like its target
    (same bucket, same window), for pixel-aligned pairs; ``reference_loose``: the reference keeps
    its own aspect ratio and gets its own bucket from this dataset's ``resolution`` settings
    (a reference of another shape than its target); ``mask``: a loss mask, cut like
    ``reference_strict``, whose brightness weights the loss per pixel (white = train, black =
    ignore, grey = partly; masked loss)."""
    data_aesthetic_score: float | None = None
    """The aesthetic score this dataset's samples are conditioned on, for models whose
    micro-conditioning takes one (a refiner conditioned on image quality): tells the model what
    quality of image this data is, so a low-quality set can train at a low score beside a good
    one. Trainer-level in SimpleTuner (config.json, its default 7.0); a config.json value
    applies to every dataset that sets none. Default none: the model family's default. Other
    families ignore it."""
    is_regularisation_data: bool = False
    """Marks regularisation (prior-preservation) images, so the trainer can treat them apart.
    Default ``false``."""
    caption_dropout_probability: float = 0.0
    """Chance (0 to 1) that a training step uses an empty caption for an image. Default 0."""
    write_batch_size: int = 64
    """How many encoded cache entries may wait for the background cache writer (memory is bounded
    by it; the encoder waits when the disk or the store falls that far behind). Default 64."""
    allow_dataset_oversubscription: bool = False
    """When the dataset is too small to give each process one batch per epoch (fewer images per
    bucket than ``train_batch_size`` x processes), raise its ``repeats`` just enough, with a
    warning, instead of failing. Trainer-level in SimpleTuner; a config.json value applies to every
    dataset. Default ``false``."""
    data_backend_sampling: str = "auto-weighting"
    """How each step picks the dataset it draws from: ``auto-weighting`` (by ``probability`` x
    images x (1 + ``repeats``): bigger datasets are drawn more often) or ``uniform`` (by
    ``probability`` alone). A trainer-level choice (config.json, as in SimpleTuner); every dataset
    of a run must agree. Default ``auto-weighting``."""
    aws_bucket_name: str | None = None
    """``type: aws``: the S3 bucket holding the images (required for that type)."""
    aws_data_prefix: str = ""
    """``type: aws``: the key prefix (folder) inside the bucket; images are searched below it.
    Default empty (the whole bucket)."""
    aws_endpoint_url: str | None = None
    """``type: aws``: endpoint of an S3-compatible store (MinIO, R2, B2, ...). Default none: the
    ``AWS_ENDPOINT_URL`` environment variable, else Amazon S3."""
    aws_region_name: str | None = None
    """``type: aws``: the bucket's region. Default none: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``."""
    aws_access_key_id: str | None = attrs.field(default=None, repr=False)
    """``type: aws``: access key id. Default none: ``AWS_ACCESS_KEY_ID`` or the usual AWS credential
    chain (profile, instance role). Never printed or logged."""
    aws_secret_access_key: str | None = attrs.field(default=None, repr=False)
    """``type: aws``: secret access key. Default none: ``AWS_SECRET_ACCESS_KEY`` or the usual AWS
    credential chain. Never printed or logged."""
    aws_max_pool_connections: int | None = None
    """``type: aws``: the most HTTP connections kept open to the store. Default none (botocore's 10)."""
    aws_max_attempts: int | None = None
    """``type: aws``: attempts per S3 request before a read or write fails (botocore's
    ``standard`` retry mode: exponential backoff with jitter, at most 20 s between attempts), so a
    store that restarts or drops connections briefly does not end the run. Default none:
    ``AWS_MAX_ATTEMPTS``, else 10 (about a minute of retrying)."""
    csv_file: str | None = None
    """``type: csv``: the CSV file listing the images (a local path or an fsspec URL)."""
    csv_caption_column: str | None = None
    """``type: csv``: the column holding each image's caption (used by ``caption_strategy: csv``)."""
    csv_url_column: str | None = None
    """``type: csv``: the column holding each image's location: an ``http(s)://`` URL (downloaded
    once into ``csv_cache_dir``) or a file path (relative paths are relative to the CSV's folder).
    Default: the first of ``url``, ``path``, ``file``, ``filename``, ``image`` the CSV has."""
    csv_cache_dir: str | None = None
    """``type: csv``: folder where images given by URL are downloaded to (required when the CSV
    lists URLs)."""
    dataset_name: str | None = None
    """``type: huggingface``: the dataset repo id (``user/name``, read through ``hf://datasets/``),
    or a local folder of the same layout (parquet shards)."""
    split: str = "train"
    """``type: huggingface``: which split's parquet shards to read. Default ``train``."""
    revision: str | None = None
    """``type: huggingface``: branch, tag or commit of the dataset repo. Default none (main)."""
    image_column: str = "image"
    """``type: huggingface``: the column holding the images (the hub's Image feature, a struct of
    ``bytes`` and ``path``, or plain bytes). Default ``image``."""
    caption_column: str | None = None
    """``type: huggingface``: the column holding captions (``caption_strategy: huggingface``).
    Default: ``caption``, else ``text``, whichever the shards have."""
    parquet_path: str | None = None
    """``caption_strategy: parquet``: the parquet file with the captions. Default: the only
    ``*.parquet`` file in the dataset's root."""
    jsonl_path: str | None = None
    """``caption_strategy: jsonl``: the JSON-lines file with the captions. Default: the only
    ``*.jsonl`` file in the dataset's root."""
    parquet_caption_column: str = "caption"
    """``caption_strategy: parquet`` / ``jsonl``: the column (field) holding the caption.
    Default ``caption``."""
    parquet_filename_column: str = "filename"
    """``caption_strategy: parquet`` / ``jsonl``: the column naming each image, as a path relative
    to the dataset root, with or without its extension. Default ``filename``."""
    parquet_width_column: str | None = None
    """``metadata_backend: parquet``: the caption table's column of image widths (as displayed, EXIF
    rotation applied). Default none."""
    parquet_height_column: str | None = None
    """``metadata_backend: parquet``: the caption table's column of image heights. Default none."""
    parquet_fallback_caption_column: str | None = None
    """``caption_strategy: parquet`` / ``jsonl``: the column used when the caption column is empty
    for an image. Default none."""
    ignored_keys: tuple[str, ...] = ()
    """SimpleTuner keys the entry set that tune accepts but ignores (filled by :meth:`from_dict`)."""
    held_out: bool = False
    """Set by ``dataset_type: eval`` (not a key of its own): an image dataset discovered and
    cached like the others but never trained on; the trainer measures the evaluation loss on it.
    The dataset then reads as ``dataset_type: image``, so everything that handles image datasets
    (discovery, buckets, caches, conditioning, masks) handles it unchanged."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise DatasetConfigError(f"dataset entry: id must be a non-empty string, got {self.id!r}")
        for name, coerce in _COERCERS.items():
            setattr(self, name, coerce(self, name, getattr(self, name)))
        self.ignored_keys = tuple(self.ignored_keys)
        if self.dataset_type == "eval":  # SimpleTuner's held-out image dataset
            self.dataset_type, self.held_out = "image", True
        self._validate()

    def _error(self, key: str, message: str) -> DatasetConfigError:
        return DatasetConfigError(f"dataset {self.id!r}: {key} {message}")

    def _choice(self, key: str, choices: Iterable[str]) -> None:
        value = getattr(self, key)
        choices = tuple(choices)
        if value not in choices:
            raise self._error(key, f"must be one of {', '.join(choices)}, got {value!r}")

    def _validate(self) -> None:
        self._choice("dataset_type", DATASET_TYPES)
        self._choice("resolution_type", RESOLUTION_TYPES)
        if self.crop_style == "face":
            raise self._error(
                "crop_style",
                "'face' needs a face detector, which tune does not ship; use center, random or corner "
                "(or a plugin that adds face detection)",
            )
        self._choice("crop_style", CROP_STYLES)
        self._choice("crop_aspect", CROP_ASPECTS)
        if self.metadata_backend == "json":
            self.metadata_backend = "discovery"  # SimpleTuner's older name for it
        self._choice("metadata_backend", METADATA_BACKENDS)
        self._choice("vae_cache_scan_behaviour", VAE_CACHE_SCAN_BEHAVIOURS)
        self._choice("data_backend_sampling", DATA_BACKEND_SAMPLING)
        if self.crop_aspect in ("closest", "random") and not self.crop_aspect_buckets:
            raise self._error(
                "crop_aspect_buckets",
                f"is required when crop_aspect is {self.crop_aspect!r}: a list of aspect ratios "
                "(width / height) such as [0.75, 1.0, 1.5]",
            )
        if self.metadata_backend == "parquet" and not (
            self.parquet_width_column and self.parquet_height_column
        ):
            raise self._error(
                "metadata_backend",
                "'parquet' needs parquet_width_column and parquet_height_column (the columns of the "
                "caption table holding each image's size)",
            )
        if self.resolution <= 0:
            raise self._error("resolution", f"must be > 0, got {self.resolution!r}")
        for key in ("minimum_image_size", "maximum_image_size", "target_downsample_size", "max_upscale_threshold",
                    "data_aesthetic_score"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise self._error(key, f"must be >= 0, got {value!r}")
        for key in ("minimum_aspect_ratio", "maximum_aspect_ratio"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise self._error(key, f"must be > 0 (width / height), got {value!r}")
        if (
            self.minimum_aspect_ratio is not None
            and self.maximum_aspect_ratio is not None
            and self.minimum_aspect_ratio > self.maximum_aspect_ratio
        ):
            raise self._error(
                "minimum_aspect_ratio",
                f"({self.minimum_aspect_ratio:g}) must not exceed maximum_aspect_ratio ({self.maximum_aspect_ratio:g})",
            )
        if self.aspect_bucket_alignment <= 0:
            raise self._error("aspect_bucket_alignment", f"must be > 0, got {self.aspect_bucket_alignment!r}")
        if self.aspect_bucket_rounding < 0:
            raise self._error("aspect_bucket_rounding", f"must be >= 0, got {self.aspect_bucket_rounding!r}")
        if self.repeats < 0:
            raise self._error("repeats", f"must be >= 0 (0 means each image once), got {self.repeats!r}")
        for key in ("probability", "caption_dropout_probability"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise self._error(key, f"must be between 0 and 1, got {value!r}")
        if self.video_num_frames <= 0:
            raise self._error("video.num_frames", f"must be > 0, got {self.video_num_frames!r}")
        if self.video_min_frames is not None and self.video_min_frames <= 0:
            raise self._error("video.min_frames", f"must be > 0, got {self.video_min_frames!r}")
        if self.video_max_frames is not None and self.video_max_frames < self.min_frames:
            raise self._error(
                "video.max_frames",
                f"must be >= min_frames ({self.min_frames}), got {self.video_max_frames!r}",
            )
        if self.video_fps is not None and self.video_fps <= 0:
            raise self._error("video.fps", f"must be > 0, got {self.video_fps!r}")
        if self.write_batch_size <= 0:
            raise self._error("write_batch_size", f"must be > 0, got {self.write_batch_size!r}")
        if self.aws_max_attempts is not None and self.aws_max_attempts < 1:
            raise self._error("aws_max_attempts", f"must be >= 1, got {self.aws_max_attempts!r}")
        for word in self.skip_steps:
            if word not in SKIP_DISCOVERY_WORDS:
                raise self._error(
                    "skip_file_discovery",
                    f"may only name {', '.join(SKIP_DISCOVERY_WORDS)}, got {word!r}",
                )
        if self.conditioning_type is not None:
            if self.dataset_type != "conditioning":
                raise self._error(
                    "conditioning_type", f"only applies to dataset_type 'conditioning', not {self.dataset_type!r}"
                )
            self._choice("conditioning_type", CONDITIONING_TYPES)
        if self.dataset_type == "conditioning" and self.conditioning_type is None:
            self.conditioning_type = "reference_strict"
        if self.conditioning_data is not None and not self.is_training_data:
            raise self._error(
                "conditioning_data", f"only applies to image datasets, not dataset_type {self.dataset_type!r}"
            )
        needs_prompt = self.caption_strategy == "instanceprompt" or self.prepend_instance_prompt
        if self.dataset_type == "image" and needs_prompt and not self.instance_prompt:
            key = (
                "caption_strategy" if self.caption_strategy == "instanceprompt" else "prepend_instance_prompt"
            )
            raise self._error(
                "instance_prompt",
                f'is required when {key} is {getattr(self, key)!r}; add "instance_prompt": "..."',
            )

    @property
    def skip_steps(self) -> tuple[str, ...]:
        """``skip_file_discovery`` split into words."""
        return tuple(word for word in self.skip_file_discovery.replace(",", " ").split() if word)

    @property
    def is_image(self) -> bool:
        return self.dataset_type == "image"

    @property
    def is_video(self) -> bool:
        return self.dataset_type == "video"

    @property
    def is_training_data(self) -> bool:
        """Whether the dataset holds training samples (images or videos), not embeddings."""
        return self.dataset_type in ("image", "video")

    @property
    def min_frames(self) -> int:
        """``video_min_frames``, defaulting to ``video_num_frames``."""
        return self.video_min_frames if self.video_min_frames is not None else self.video_num_frames

    def require_implemented(self) -> None:
        """Fail clearly when a dataset type tune accepts but cannot use yet is about to be used."""
        if self.dataset_type not in IMPLEMENTED_DATASET_TYPES:
            raise NotImplementedError(
                f"dataset {self.id!r}: dataset_type {self.dataset_type!r} is accepted in configs but "
                f"not supported yet; supported: {', '.join(IMPLEMENTED_DATASET_TYPES)}. "
                f'Set "disabled": true on this entry to train without it.'
            )

    def cache_settings(self) -> dict[str, Any]:
        """The settings that change a cached latent; a cache keyed by them never serves stale data."""
        return {
            "resolution": self.resolution,
            "resolution_type": self.resolution_type,
            "crop": self.crop,
            "crop_style": self.crop_style,
            "crop_aspect": self.crop_aspect,
            "aspect_bucket_alignment": self.aspect_bucket_alignment,
            "aspect_bucket_rounding": self.aspect_bucket_rounding,
            "minimum_image_size": self.minimum_image_size,
            "maximum_image_size": self.maximum_image_size,
            "target_downsample_size": self.target_downsample_size,
            # Only when set, so caches written before the key existed keep their keys.
            **({"crop_aspect_buckets": list(self.crop_aspect_buckets)} if self.crop_aspect_buckets else {}),
            **(
                {"num_frames": self.video_num_frames, "fps": self.video_fps}
                if self.dataset_type == "video"
                else {}
            ),
            **({"conditioning_type": self.conditioning_type} if self.dataset_type == "conditioning" else {}),
        }

    @classmethod
    def from_dict(
        cls, entry: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None
    ) -> DatasetConfig:
        """Build from one JSON entry; ``defaults`` are trainer-level values for keys it leaves unset.

        Only dataset settings are taken from ``defaults`` (``resolution``, ``crop``, ...); the rest
        of a trainer config passes through unread, and ``None`` values count as unset.
        """
        if not isinstance(entry, Mapping):
            raise DatasetConfigError(f"dataset entry must be a JSON object, got {type(entry).__name__}")
        normalised = _expand_nested(_normalise_keys(entry))
        dataset_id = normalised.get("id")
        if not isinstance(dataset_id, str) or not dataset_id.strip():
            keys = ", ".join(sorted(normalised)) or "no keys"
            raise DatasetConfigError(f'dataset entry ({keys}) is missing "id", a unique name for it')
        values: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in normalised.items():
            if key in _FIELD_NAMES:
                values[key] = value
            elif key in IGNORED_KEYS:
                ignored.append(key)
            else:
                close = difflib.get_close_matches(key, sorted(_FIELD_NAMES | IGNORED_KEYS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise DatasetConfigError(f"dataset {dataset_id!r}: unknown key {key!r}{hint}")
        for key, value in _normalise_keys(defaults or {}).items():
            if key in INHERITABLE_KEYS and key not in values and value is not None:
                values[key] = value
        if ignored:
            message = (
                f"dataset {dataset_id!r}: accepted but ignored (not implemented in tune yet): "
                f"{', '.join(sorted(ignored))}"
            )
            warnings.warn(message, IgnoredKeysWarning, stacklevel=2)
            logger.info(message)
        return cls(**values, ignored_keys=tuple(sorted(ignored)))


def _normalise_keys(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Strip a leading ``--`` and map SimpleTuner's alternative spellings to the canonical key."""
    out: dict[str, Any] = {}
    for raw, value in entry.items():
        key = str(raw).strip()
        key = key[2:] if key.startswith("--") else key
        key = ALIASES.get(key, key)
        if key in out:
            raise DatasetConfigError(
                f"dataset {entry.get('id', '?')!r}: key {key!r} is given twice (as {raw!r} too)"
            )
        out[key] = value
    return out


#: SimpleTuner's nested ``"parquet": {...}`` block, key by key, as tune's flat keys.
_NESTED_PARQUET = {
    "path": "parquet_path",
    "caption_column": "parquet_caption_column",
    "filename_column": "parquet_filename_column",
    "fallback_caption_column": "parquet_fallback_caption_column",
    "width_column": "parquet_width_column",
    "height_column": "parquet_height_column",
}


#: SimpleTuner's nested ``"video": {...}`` block, key by key, as tune's flat keys.
_NESTED_VIDEO = {
    "num_frames": "video_num_frames",
    "min_frames": "video_min_frames",
    "max_frames": "video_max_frames",
    "fps": "video_fps",
    "is_i2v": "video_is_i2v",
}


def _expand_nested(entry: dict[str, Any]) -> dict[str, Any]:
    """``"parquet": {"path": ..., "caption_column": ...}`` -> ``parquet_path``, ... and
    ``"video": {"num_frames": ...}`` -> ``video_num_frames``, ... (flat keys win)."""
    out = dict(entry)
    for name, mapping in (("parquet", _NESTED_PARQUET), ("video", _NESTED_VIDEO)):
        block = out.get(name)
        if not isinstance(block, Mapping):
            continue
        del out[name]
        leftovers = {}
        for sub, value in block.items():
            flat = mapping.get(str(sub))
            if flat is None:
                leftovers[sub] = value  # keys tune does not need (or implement yet)
            else:
                out.setdefault(flat, value)
        if leftovers:
            out[name] = leftovers  # still reported as accepted-but-ignored
    return out


# -- coercion: JSON gives strings and ints where we want floats and bools --------------------------


def _as_str(optional: bool) -> Callable[[DatasetConfig, str, Any], Any]:
    def coerce(cfg: DatasetConfig, key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise cfg._error(key, f"must be a string, got {value!r}")
        return value

    return coerce


def _as_bool(cfg: DatasetConfig, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise cfg._error(key, f"must be true or false, got {value!r}")


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _as_number(kind: type, optional: bool) -> Callable[[DatasetConfig, str, Any], Any]:
    def coerce(cfg: DatasetConfig, key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None:
            raise cfg._error(key, f"must be a number, got {value!r}")
        if kind is int:
            if number != int(number):
                raise cfg._error(key, f"must be a whole number, got {value!r}")
            return int(number)
        return float(number)

    return coerce


def _as_aspects(cfg: DatasetConfig, key: str, value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise cfg._error(key, f"must be a list of aspect ratios (width / height), got {value!r}")
    aspects = []
    for item in value:
        number = _as_number(float, False)(cfg, key, item)
        if number <= 0:
            raise cfg._error(key, f"aspect ratios must be > 0, got {item!r}")
        aspects.append(number)
    return tuple(aspects)


def _as_ids(cfg: DatasetConfig, key: str, value: Any) -> tuple[str, ...] | None:
    """A dataset id or a list of them (SimpleTuner accepts both) as a tuple; empty means none."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item.strip() for item in value):
        raise cfg._error(key, f"must be a dataset id or a list of dataset ids, got {value!r}")
    return tuple(value) or None


_COERCERS: dict[str, Callable[[DatasetConfig, str, Any], Any]] = {
    "type": _as_str(False),
    "dataset_type": _as_str(False),
    "disabled": _as_bool,
    "default": _as_bool,
    "instance_data_dir": _as_str(True),
    "caption_strategy": _as_str(False),
    "instance_prompt": _as_str(True),
    "prepend_instance_prompt": _as_bool,
    "resolution": _as_number(float, False),
    "resolution_type": _as_str(False),
    "minimum_image_size": _as_number(float, True),
    "maximum_image_size": _as_number(float, True),
    "target_downsample_size": _as_number(float, True),
    "max_upscale_threshold": _as_number(float, True),
    "data_aesthetic_score": _as_number(float, True),
    "minimum_aspect_ratio": _as_number(float, True),
    "maximum_aspect_ratio": _as_number(float, True),
    "crop": _as_bool,
    "crop_style": _as_str(False),
    "crop_aspect": _as_str(False),
    "crop_aspect_buckets": _as_aspects,
    "metadata_backend": _as_str(False),
    "scan_for_errors": _as_bool,
    "ignore_missing_files": _as_bool,
    "video_num_frames": _as_number(int, False),
    "video_min_frames": _as_number(int, True),
    "video_max_frames": _as_number(int, True),
    "video_fps": _as_number(float, True),
    "video_is_i2v": _as_bool,
    "vae_cache_ondemand": _as_bool,
    "vae_cache_clear_each_epoch": _as_bool,
    "vae_cache_scan_behaviour": _as_str(False),
    "parquet_width_column": _as_str(True),
    "parquet_height_column": _as_str(True),
    "aspect_bucket_alignment": _as_number(int, False),
    "aspect_bucket_rounding": _as_number(int, False),
    "repeats": _as_number(int, False),
    "probability": _as_number(float, False),
    "cache_dir_vae": _as_str(True),
    "compress_disk_cache": _as_bool,
    "cache_dir": _as_str(True),
    "text_embeds": _as_str(True),
    "skip_file_discovery": _as_str(False),
    "is_regularisation_data": _as_bool,
    "conditioning_data": _as_ids,
    "conditioning_type": _as_str(True),
    "caption_dropout_probability": _as_number(float, False),
    "write_batch_size": _as_number(int, False),
    "allow_dataset_oversubscription": _as_bool,
    "data_backend_sampling": _as_str(False),
    "aws_bucket_name": _as_str(True),
    "aws_data_prefix": _as_str(False),
    "aws_endpoint_url": _as_str(True),
    "aws_region_name": _as_str(True),
    "aws_access_key_id": _as_str(True),
    "aws_secret_access_key": _as_str(True),
    "aws_max_pool_connections": _as_number(int, True),
    "aws_max_attempts": _as_number(int, True),
    "csv_file": _as_str(True),
    "csv_caption_column": _as_str(True),
    "csv_url_column": _as_str(True),
    "csv_cache_dir": _as_str(True),
    "dataset_name": _as_str(True),
    "split": _as_str(False),
    "revision": _as_str(True),
    "image_column": _as_str(False),
    "caption_column": _as_str(True),
    "parquet_path": _as_str(True),
    "jsonl_path": _as_str(True),
    "parquet_caption_column": _as_str(False),
    "parquet_filename_column": _as_str(False),
    "parquet_fallback_caption_column": _as_str(True),
}

_FIELD_NAMES = frozenset(_COERCERS) | {"id"}

#: Dataset keys a trainer-level config may supply for every dataset (``defaults`` of from_dict).
INHERITABLE_KEYS = frozenset(
    {
        "resolution",
        "resolution_type",
        "minimum_image_size",
        "maximum_image_size",
        "target_downsample_size",
        "max_upscale_threshold",  # trainer-level in SimpleTuner; per dataset here, inherited
        "data_aesthetic_score",  # likewise
        "compress_disk_cache",  # likewise
        "allow_dataset_oversubscription",  # likewise
        "data_backend_sampling",  # likewise; TrainingData.build_sampler checks datasets agree
        "ignore_missing_files",  # likewise
        "crop",
        "crop_style",
        "crop_aspect",
        "aspect_bucket_alignment",
        "aspect_bucket_rounding",
        "caption_strategy",
        "instance_prompt",
        "prepend_instance_prompt",
        "caption_dropout_probability",
        "write_batch_size",
        "skip_file_discovery",
        "crop_aspect_buckets",
        "scan_for_errors",
        "metadata_backend",
        "vae_cache_ondemand",  # trainer-level in SimpleTuner; per dataset here, inherited
        "vae_cache_scan_behaviour",
        # The facade passes trainer keys listed here to every dataset, and its generated config
        # reference lists them: adding one goes with a regeneration of docs/config-reference.md.
    }
)

#: Other spellings SimpleTuner configs use for the same setting.
ALIASES = {"disable": "disabled", "is_regularization_data": "is_regularisation_data"}

#: SimpleTuner dataset keys that tune accepts (with one warning) but does not implement yet.
IGNORED_KEYS = frozenset(
    {
        "parquet",
        "huggingface",
        "preserve_data_backend_cache",
        "conditioning",
        "hash_filenames",
        "only_instance_prompt",
        "caption_filter_list",
        "cache_file_suffix",
        "max_num_samples",
        "start_epoch",
        "start_step",
        "end_epoch",
        "end_step",
        "ignore_epochs",
        "disable_validation",
        "image_embeds",
        "source_dataset_id",
        "video",
        "regularisation_data",
    }
)


# -- the whole file ----------------------------------------------------------------------------------


def load_dataset_configs(
    source: str | os.PathLike[str] | list[dict[str, Any]],
    *,
    defaults: Mapping[str, Any] | None = None,
) -> list[DatasetConfig]:
    """Read ``multidatabackend.json`` (a path or the parsed list) into enabled, validated datasets.

    Fails on: a file that is not a JSON list, an entry without ``id``, two entries with one id, no
    enabled image dataset, and an image dataset whose ``text_embeds`` names no ``text_embeds``
    dataset. Disabled entries are dropped (but still must be well-formed, so typos surface early).
    """
    where = "the dataset list"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            with open(source, encoding="utf-8") as handle:
                entries = json.load(handle)
        except FileNotFoundError:
            raise DatasetConfigError(f"dataset config {where} does not exist") from None
        except json.JSONDecodeError as exc:
            raise DatasetConfigError(f"dataset config {where} is not valid JSON: {exc}") from None
    else:
        entries = source
    if not isinstance(entries, list):
        raise DatasetConfigError(
            f"{where} must hold a JSON list of dataset entries, got {type(entries).__name__}"
        )
    configs: list[DatasetConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if isinstance(entry, Mapping) and "id" not in entry and "--id" not in entry:
            raise DatasetConfigError(f'{where}: entry {index} is missing "id", a unique name for it')
        config = DatasetConfig.from_dict(entry, defaults=defaults)
        if config.id in seen:
            raise DatasetConfigError(
                f"{where}: dataset id {config.id!r} is used by entries {seen[config.id]} and {index}; "
                "ids must be unique"
            )
        seen[config.id] = index
        configs.append(config)
    enabled = [config for config in configs if not config.disabled]
    if not any(config.is_training_data for config in enabled):
        found = ", ".join(f"{c.id!r} ({c.dataset_type}{', disabled' if c.disabled else ''})" for c in configs)
        raise DatasetConfigError(
            f"{where}: no enabled dataset of dataset_type 'image' or 'video' (found: {found or 'none'})"
        )
    if all(config.held_out for config in enabled if config.is_training_data):
        held = ", ".join(repr(c.id) for c in enabled if c.held_out)
        raise DatasetConfigError(
            f"{where}: every image dataset ({held}) is dataset_type 'eval', held out from training: "
            "nothing would be left to train on"
        )
    _check_text_embeds(enabled, where)
    _check_conditioning(configs, where)
    return enabled


def _check_conditioning(configs: list[DatasetConfig], where: str) -> None:
    """Every ``conditioning_data`` id names an enabled conditioning dataset (a disabled one is an
    error too: training without the references would silently become text-to-image)."""
    by_id = {config.id: config for config in configs}
    conditioning_ids = [c.id for c in configs if c.dataset_type == "conditioning" and not c.disabled]
    for config in configs:
        if config.disabled or not config.conditioning_data:
            continue
        if config.dataset_type == "video":
            raise DatasetConfigError(
                f"dataset {config.id!r}: conditioning_data on a video dataset is not supported yet"
            )
        for name in config.conditioning_data:
            target = by_id.get(name)
            if target is None or target.dataset_type != "conditioning":
                known = ", ".join(map(repr, conditioning_ids)) or "none"
                raise DatasetConfigError(
                    f"dataset {config.id!r}: conditioning_data names {name!r}, which is not a dataset of "
                    f"dataset_type 'conditioning' (conditioning datasets: {known})"
                )
            if target.disabled:
                raise DatasetConfigError(
                    f"dataset {config.id!r}: conditioning_data names {name!r}, which is disabled; enable it "
                    "or remove it from conditioning_data"
                )
    # A loss mask nobody pairs with would leave the run unmasked without a word.
    named = {name for c in configs if not c.disabled and c.is_training_data for name in c.conditioning_data or ()}
    for config in configs:
        if config.dataset_type == "conditioning" and config.conditioning_type == "mask" and not config.disabled:
            if config.id not in named:
                raise DatasetConfigError(
                    f"dataset {config.id!r} (conditioning_type 'mask') is paired with no image dataset: name it "
                    f"in the conditioning_data of the dataset whose images it masks, or disable it"
                )


def conditioning_for(dataset: DatasetConfig, configs: Iterable[DatasetConfig]) -> list[DatasetConfig]:
    """The conditioning datasets ``dataset`` names in ``conditioning_data``, in that order."""
    by_id = {config.id: config for config in configs}
    return [by_id[name] for name in dataset.conditioning_data or () if name in by_id]


def _check_text_embeds(configs: list[DatasetConfig], where: str) -> None:
    by_id = {config.id: config for config in configs}
    text_ids = [config.id for config in configs if config.dataset_type == "text_embeds"]
    defaults = [config.id for config in configs if config.dataset_type == "text_embeds" and config.default]
    if len(defaults) > 1:
        raise DatasetConfigError(
            f"{where}: datasets {', '.join(map(repr, defaults))} are all text_embeds with "
            '"default": true; mark only one'
        )
    for config in configs:
        if config.text_embeds is None or not config.is_training_data:
            continue
        target = by_id.get(config.text_embeds)
        if target is None or target.dataset_type != "text_embeds":
            known = ", ".join(map(repr, text_ids)) or "none"
            raise DatasetConfigError(
                f"dataset {config.id!r}: text_embeds names {config.text_embeds!r}, which is not an "
                f"enabled text_embeds dataset (text_embeds datasets: {known})"
            )


def default_text_embeds(configs: Iterable[DatasetConfig]) -> DatasetConfig | None:
    """The ``text_embeds`` dataset marked ``default``, or the only one when there is just one."""
    text = [config for config in configs if config.dataset_type == "text_embeds"]
    marked = [config for config in text if config.default]
    if marked:
        return marked[0]
    return text[0] if len(text) == 1 else None


def text_embeds_for(dataset: DatasetConfig, configs: Iterable[DatasetConfig]) -> DatasetConfig | None:
    """The ``text_embeds`` dataset whose cache ``dataset`` uses (its own choice, else the default)."""
    configs = list(configs)
    if dataset.text_embeds is not None:
        return next((config for config in configs if config.id == dataset.text_embeds), None)
    return default_text_embeds(configs)
