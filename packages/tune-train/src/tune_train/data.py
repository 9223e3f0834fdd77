"""Training data for one run: discovery, buckets, latent and text caches, and the batch sampler.

Everything here runs once during setup. Latents and prompt embeddings are computed with the
family's encoders, stored in content-keyed safetensors caches (tune-data), and reused by the next
run; the training step itself only reads cached tensors.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
from tqdm.auto import tqdm
from tune_data.buckets import PlannedImage, load_training_image, plan_buckets, plan_image
from tune_data.cache import TensorCache, cache_root_for, latent_entry_metadata
from tune_data.captions import caption_dropped
from tune_data.config import DatasetConfig, text_embeds_for
from tune_data.discovery import DiscoveryReport, discover
from tune_data.sampler import BucketBatchSampler, MultiDatasetSampler, dataset_weights
from tune_data.storage import StorageProvider, open_storage

log = logging.getLogger(__name__)


@attrs.define
class PreparedDataset:
    """One image dataset, discovered and bucketed, with its caches."""

    config: DatasetConfig
    storage: StorageProvider
    report: DiscoveryReport
    buckets: dict[tuple[int, int], list[PlannedImage]]
    latent_cache: TensorCache
    text_cache: TensorCache
    replanned: dict[str, PlannedImage] = attrs.field(factory=dict)
    """Current plan of images whose crop moved since the sampler was built (per-epoch random crops
    of ``vae_cache_clear_each_epoch``), by path; :meth:`TrainingData.load_batch` reads through it."""
    encode_on_demand: bool = False
    """Latents are encoded when first drawn (``vae_cache_ondemand``, or after an epoch-end clear)."""

    def current(self, planned: PlannedImage) -> PlannedImage:
        return self.replanned.get(planned.record.path, planned)


@attrs.frozen
class CacheScan:
    """What :meth:`TrainingData.scan_latent_cache` found in one dataset's latent cache."""

    dataset_id: str
    checked: int
    """Entries present and read back completely."""
    missing: int
    """Images with no entry yet (not damage: they are encoded by the caching pass or on demand)."""
    damaged: tuple[tuple[str, str], ...]
    """``(image path, what was wrong)`` of each damaged entry; all were deleted."""
    behaviour: str
    """``recreate`` (the images are encoded again) or ``sync`` (they were left out of this run)."""


def latent_key(dataset: PreparedDataset, planned: PlannedImage) -> str:
    """Cache key of one image's latent: file identity, bucket and crop are all part of it."""
    return dataset.latent_cache.key(planned.cache_item_id, planned.record.identity)


def text_key(cache: TensorCache, caption: str) -> str:
    return cache.key(caption, "")


def pixels_from_array(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC → float CHW in [-1, 1], the range every VAE expects."""
    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


class TrainingData:
    """Prepares every dataset of a run and hands out cached batches."""

    def __init__(
        self,
        datasets: Sequence[DatasetConfig],
        *,
        cache_root: str | os.PathLike,
        model_identity: str,
        seed: int,
        progress: bool = True,
    ) -> None:
        self.cache_root = Path(cache_root)
        self.model_identity = model_identity
        self.seed = seed
        self.progress = progress
        self.configs = list(datasets)
        self.image_configs = [d for d in datasets if d.dataset_type == "image"]
        videos = [d.id for d in datasets if d.dataset_type == "video" and not d.disabled]
        if videos:
            raise NotImplementedError(
                f"dataset_type 'video' ({', '.join(map(repr, videos))}): no model family trains on "
                "video yet. tune-data discovers and reads video datasets (tune-data inspect, "
                'tune_data.video.load_training_clip); set "disabled": true on them to train on the rest.'
            )
        unsupported = [d for d in datasets if d.dataset_type not in ("image", "text_embeds")]
        if unsupported:
            kinds = ", ".join(f"{d.id!r} ({d.dataset_type})" for d in unsupported)
            raise NotImplementedError(f"dataset_type not supported yet by the trainer: {kinds}")
        self.prepared: dict[str, PreparedDataset] = {}
        self.encode_images = None
        """The family's pixel encoder, kept by :meth:`cache_latents` for on-demand encoding."""
        self.encode_batch_size = 1

    def _text_cache(self, config: DatasetConfig) -> TensorCache:
        """The prompt-embedding cache of the image dataset's text_embeds dataset (or the default)."""
        text = text_embeds_for(config, self.configs)
        root, storage_options = (
            cache_root_for(text, text.cache_dir)
            if text is not None and text.cache_dir
            else (str(self.cache_root / "text"), None)
        )
        return TensorCache(root, "text", {"model": self.model_identity}, storage_options=storage_options)

    def discover(self) -> None:
        """Find, caption and bucket every image dataset (no model needed); with
        ``scan_for_errors``, also check its latent cache (:meth:`scan_latent_cache`)."""
        for config in self.image_configs:
            storage = open_storage(config)
            metadata_dir = self.cache_root / "metadata" / config.id
            report = discover(config, storage, metadata_dir=metadata_dir, progress=self.progress)
            for dropped in report.dropped:
                log.info("dataset %r: dropped %s (%s)", config.id, dropped.path, dropped.reason)
            buckets = plan_buckets(list(report.kept), config, seed=self.seed)
            # A cache may be a URL (s3://...); an aws dataset's relative cache dir is a prefix in its bucket.
            vae_root, storage_options = (
                cache_root_for(config, config.cache_dir_vae)
                if config.cache_dir_vae
                else (str(self.cache_root / "vae" / config.id), None)
            )
            latent_cache = TensorCache(
                vae_root,
                "latents",
                {"model": self.model_identity, **config.cache_settings()},
                storage_options=storage_options,
            )
            self.prepared[config.id] = PreparedDataset(
                config,
                storage,
                report,
                buckets,
                latent_cache,
                self._text_cache(config),
                encode_on_demand=config.vae_cache_ondemand,
            )
            if config.scan_for_errors:
                # Here, before the sampler is built: a 'sync' scan changes the buckets it draws from.
                scan = self.scan_latent_cache(config.id)
                if scan.damaged:
                    log.warning(
                        "dataset %r: %d damaged latent cache entr%s deleted (%s): %s",
                        config.id,
                        len(scan.damaged),
                        "y" if len(scan.damaged) == 1 else "ies",
                        "re-encoding" if scan.behaviour == "recreate" else "left out of this run",
                        ", ".join(f"{path} ({why})" for path, why in scan.damaged[:8]),
                    )

    def captions(self) -> set[str]:
        """Every caption the run can feed the model (including the empty one for caption dropout)."""
        found = {""}
        for dataset in self.prepared.values():
            for images in dataset.buckets.values():
                found.update(planned.record.caption for planned in images)
        return found

    def cache_latents(self, encode_images, *, batch_size: int) -> int:
        """Encode every image missing from its latent cache; returns how many were encoded.

        Damaged entries were already deleted by :meth:`discover` (``scan_for_errors``), so they
        are encoded here. A dataset with ``vae_cache_ondemand`` is not pre-encoded:
        ``encode_images`` is kept and :meth:`load_batch` encodes what it lacks.
        """
        self.encode_images = encode_images
        self.encode_batch_size = batch_size
        encoded = 0
        for dataset in self.prepared.values():
            if dataset.encode_on_demand:
                continue
            todo = [
                planned
                for images in dataset.buckets.values()
                for planned in images
                if not dataset.latent_cache.has(latent_key(dataset, planned))
            ]
            if not todo:
                continue
            # Group by bucket so each VAE batch has one shape.
            by_bucket: dict[tuple[int, int], list[PlannedImage]] = {}
            for planned in todo:
                by_bucket.setdefault(planned.bucket, []).append(planned)
            bar = tqdm(total=len(todo), desc=f"caching latents ({dataset.config.id})", disable=not self.progress)
            for group in by_bucket.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    self._encode(dataset, chunk, encode_images)
                    encoded += len(chunk)
                    bar.update(len(chunk))
            bar.close()
        return encoded

    def _encode(self, dataset: PreparedDataset, chunk: Sequence[PlannedImage], encode_images) -> None:
        """Encode images of one bucket and write their latent entries (with what inspect reads)."""
        pixels = torch.stack([pixels_from_array(load_training_image(dataset.storage, p)) for p in chunk])
        with torch.no_grad():
            latents = encode_images(pixels).float().cpu()
        settings = dataset.latent_cache.settings
        for planned, latent in zip(chunk, latents):
            meta = latent_entry_metadata(
                planned.cache_item_id, planned.record.identity, dataset.config.cache_settings(),
                str(settings.get("model", "")),
            )
            dataset.latent_cache.save(latent_key(dataset, planned), {"latents": latent}, meta)

    def scan_latent_cache(self, dataset_id: str) -> CacheScan:
        """Read back every latent entry of a dataset; delete the damaged ones and repair the plan.

        :meth:`discover` calls it for datasets with ``scan_for_errors``; call it before
        :meth:`build_sampler`, as ``sync`` removes images from the buckets.

        Damaged: unreadable (truncated, corrupt) or of another shape than the bucket's other
        latents. With ``vae_cache_scan_behaviour: recreate`` the images are encoded again (by the
        caching pass, or on demand); with ``sync`` they are dropped from this run's buckets.
        """
        dataset = self.prepared[dataset_id]
        cache = dataset.latent_cache
        behaviour = dataset.config.vae_cache_scan_behaviour
        checked = missing = 0
        damaged: list[tuple[PlannedImage, str]] = []
        for images in dataset.buckets.values():
            shapes: dict[PlannedImage, tuple[int, ...]] = {}
            for planned in images:
                key = latent_key(dataset, planned)
                problem = cache.check(key)
                if problem == "missing":
                    missing += 1
                    continue
                checked += 1
                if problem is not None:
                    damaged.append((planned, problem))
                    continue
                shapes[planned] = tuple(cache.load(key)["latents"].shape)
                cache.stats.hits -= 1
            if shapes:
                usual = Counter(shapes.values()).most_common(1)[0][0]
                damaged += [
                    (planned, f"latent shape {list(shape)}, its bucket's are {list(usual)}")
                    for planned, shape in shapes.items()
                    if shape != usual
                ]
        for planned, _ in damaged:
            cache.delete(latent_key(dataset, planned))
        if behaviour == "sync" and damaged:
            gone = {id(planned) for planned, _ in damaged}
            dataset.buckets = {
                bucket: kept
                for bucket, images in dataset.buckets.items()
                if (kept := [p for p in images if id(p) not in gone])
            }
            if not dataset.buckets:
                raise ValueError(
                    f"dataset {dataset_id!r}: every latent cache entry was damaged and "
                    "vae_cache_scan_behaviour is 'sync'; use 'recreate' to encode them again"
                )
        return CacheScan(
            dataset_id, checked, missing, tuple((p.record.path, why) for p, why in damaged), behaviour
        )

    def end_epoch(self, epoch: int, *, delete: bool = True) -> int:
        """Call at the end of every epoch: clears the latent caches of datasets with
        ``vae_cache_clear_each_epoch`` (they are encoded again on demand; random crops move to the
        next epoch's windows). Returns how many entries were deleted.

        With several processes sharing one cache, every rank calls it (each needs the new plan),
        but only one with ``delete=True``, between two barriers, so no rank deletes an entry
        another has just written for the new epoch or is about to read."""
        deleted = 0
        for dataset in self.prepared.values():
            config = dataset.config
            if not config.vae_cache_clear_each_epoch:
                continue
            if delete:
                for images in dataset.buckets.values():
                    for planned in images:
                        deleted += dataset.latent_cache.delete(latent_key(dataset, dataset.current(planned)))
            dataset.encode_on_demand = True
            if config.crop and config.crop_style == "random" and config.crop_aspect != "random":
                # New windows in the same bucket (a random crop_aspect would move images between
                # buckets under a running sampler, so it keeps its per-run choice).
                epoch_seed = self.seed + 1_000_003 * (epoch + 1)
                dataset.replanned = {
                    planned.record.path: plan_image(planned.record, config, seed=epoch_seed)
                    for images in dataset.buckets.values()
                    for planned in images
                }
        return deleted

    def cache_text(self, encode_prompts, *, batch_size: int = 8) -> int:
        """Encode every caption missing from its text cache; returns how many were encoded."""
        encoded = 0
        caches = {id(d.text_cache): d.text_cache for d in self.prepared.values()}
        for cache in caches.values():
            todo = sorted(c for c in self.captions() if not cache.has(text_key(cache, c)))
            bar = tqdm(total=len(todo), desc="caching text embeddings", disable=not self.progress or not todo)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                with torch.no_grad():
                    embeds = encode_prompts(chunk)
                for caption, tensors in zip(chunk, embeds):
                    cache.save(text_key(cache, caption), {k: v.cpu() for k, v in tensors.items()})
                encoded += len(chunk)
                bar.update(len(chunk))
            bar.close()
        return encoded

    def build_sampler(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> MultiDatasetSampler:
        """Bucket-homogeneous batches per dataset, mixed by weight (SimpleTuner's auto-weighting)."""
        samplers = {
            dataset_id: BucketBatchSampler(
                dataset.buckets,
                batch_size,
                seed=self.seed,
                repeats=dataset.config.repeats,
                rank=rank,
                world_size=world_size,
                dataset_id=dataset_id,
            )
            for dataset_id, dataset in self.prepared.items()
        }
        # SimpleTuner's default auto-weighting: probability x (images x (1 + repeats)).
        weights = dataset_weights(
            {dataset_id: d.config.probability for dataset_id, d in self.prepared.items()},
            {
                dataset_id: sum(len(images) for images in d.buckets.values()) * (1 + d.config.repeats)
                for dataset_id, d in self.prepared.items()
            },
            mode="auto",
        )
        self.batches_per_epoch = sum(s.batches_per_epoch() for s in samplers.values())
        return MultiDatasetSampler(samplers, weights, seed=self.seed)

    def load_batch(
        self,
        dataset_id: str,
        batch: Sequence[PlannedImage],
        drop_caption: Sequence[bool],
        *,
        step: int = 0,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Cached latents (stacked) and per-sample prompt embeddings for one batch.

        A caption is dropped (empty prompt) when the run-wide draw in ``drop_caption`` says so or
        the dataset's own ``caption_dropout_probability`` does (decided by tune-data per item and step).
        """
        dataset = self.prepared[dataset_id]
        drop_caption = [
            drop or caption_dropped(dataset.config, planned.record.path, seed=self.seed, step=step)
            for planned, drop in zip(batch, drop_caption)
        ]
        current = [dataset.current(planned) for planned in batch]
        if dataset.encode_on_demand:
            self._encode_missing(dataset, current)
        latents = torch.stack(
            [dataset.latent_cache.load(latent_key(dataset, planned))["latents"] for planned in current]
        )
        prompts = []
        for planned, drop in zip(batch, drop_caption):
            caption = "" if drop else planned.record.caption
            prompts.append(dataset.text_cache.load(text_key(dataset.text_cache, caption)))
        return latents, prompts

    def _encode_missing(self, dataset: PreparedDataset, batch: Sequence[PlannedImage]) -> None:
        missing = [p for p in batch if not dataset.latent_cache.has(latent_key(dataset, p))]
        if not missing:
            return
        if self.encode_images is None:
            raise RuntimeError(
                f"dataset {dataset.config.id!r} encodes latents on demand (vae_cache_ondemand), but "
                "no encoder is set: call TrainingData.cache_latents(encode_images, batch_size=...) first"
            )
        for start in range(0, len(missing), max(1, self.encode_batch_size)):
            self._encode(dataset, missing[start : start + self.encode_batch_size], self.encode_images)
