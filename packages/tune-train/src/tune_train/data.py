"""Training data for one run: discovery, buckets, latent and text caches, and the batch sampler.

Everything here runs once during setup. Latents and prompt embeddings are computed with the
family's encoders, stored in content-keyed safetensors caches (tune-data), and reused by the next
run; the training step itself only reads cached tensors.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from tqdm.auto import tqdm
from tune_data.buckets import PlannedImage, load_training_image, plan_buckets, plan_image
from tune_data.cache import TensorCache, cache_root_for, latent_entry_metadata
from tune_data.captions import caption_dropped
from tune_data.conditioning import ConditioningIndex, discover_conditioning, pair_conditioning, plan_reference
from tune_data.config import DatasetConfig, conditioning_for, text_embeds_for
from tune_data.discovery import ImageRecord
from tune_data.discovery import DiscoveryReport, discover
from tune_data.prefetch import ReadAheadSampler
from tune_data.sampler import BucketBatchSampler, MultiDatasetSampler, dataset_weights
from tune_data.storage import StorageProvider, open_storage
from tune_train.distributed import shard

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
    conditioning: tuple[PreparedConditioning, ...] = ()
    """The conditioning datasets its ``conditioning_data`` names, in that order."""
    pairs: dict[str, tuple[ImageRecord, ...]] = attrs.field(factory=dict)
    """Training image path -> its conditioning image in each of :attr:`conditioning`."""

    def current(self, planned: PlannedImage) -> PlannedImage:
        return self.replanned.get(planned.record.path, planned)

    @property
    def references(self) -> tuple[PreparedConditioning, ...]:
        """The conditioning datasets that are model inputs (all but loss masks), in order."""
        return tuple(c for c in self.conditioning if not c.is_mask)


@attrs.define
class PreparedConditioning:
    """One ``dataset_type: conditioning`` dataset: its discovered images and its latent cache.

    Reference latents are planned from their target's current plan when a batch is loaded
    (:func:`tune_data.conditioning.plan_reference`), so a strict reference follows its target's
    crop; each plan is its own cache entry (the crop is part of the key)."""

    config: DatasetConfig
    storage: StorageProvider
    index: ConditioningIndex
    latent_cache: TensorCache

    @property
    def is_mask(self) -> bool:
        """A loss mask (``conditioning_type: mask``): weights the loss, never reaches the model."""
        return self.config.conditioning_type == "mask"


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


def latent_key(dataset: PreparedDataset | PreparedConditioning, planned: PlannedImage) -> str:
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
        conditioning_sampling: str = "combined",
        text_settings: dict[str, Any] | None = None,
    ) -> None:
        self.cache_root = Path(cache_root)
        self.text_settings = dict(text_settings or {})
        """Settings that change prompt embeddings beyond the model (quantised text encoders):
        part of every text cache key, so a changed setting re-encodes instead of reusing."""
        self.conditioning_sampling = conditioning_sampling
        """``conditioning_multidataset_sampling``: ``combined`` (every conditioning dataset's
        reference per sample) or ``random`` (one dataset per batch, from the seed and step)."""
        self.conditioning: dict[str, PreparedConditioning] = {}
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
        unsupported = [d for d in datasets if d.dataset_type not in ("image", "text_embeds", "conditioning")]
        if unsupported:
            kinds = ", ".join(f"{d.id!r} ({d.dataset_type})" for d in unsupported)
            raise NotImplementedError(f"dataset_type not supported yet by the trainer: {kinds}")
        self.prepared: dict[str, PreparedDataset] = {}
        self.encode_images = None
        """The family's pixel encoder, kept by :meth:`cache_latents` for on-demand encoding."""
        self.encode_batch_size = 1
        self.prompt_references = False
        """Prompt embeddings depend on each sample's references (the family's
        ``prompts_use_references``): text entries of datasets with conditioning data are then keyed
        by caption and references (:meth:`text_entry`, :mod:`tune_train.reference_inputs`)."""
        self.read_ahead: ReadAheadSampler | None = None
        """The sampler :meth:`build_sampler` returned, which reads the next batches' cache entries
        on a worker thread; :meth:`load_batch` takes them from it."""
        self.shard: tuple[int, int] = (0, 1)
        """(rank, world size): with several processes, :meth:`cache_latents` and :meth:`cache_text`
        encode only this process's share (the trainer waits for all of them before training)."""

    def _load(self, cache: TensorCache, key: str) -> dict[str, torch.Tensor]:
        """A cache entry of the batch being trained, read ahead when it was (else read now)."""
        if self.read_ahead is not None:
            return self.read_ahead.load(cache, key)
        return cache.load(key)

    def _batch_reads(self, drawn) -> list[tuple[TensorCache, str]]:
        """The cache entries one drawn ``(dataset_id, batch)`` will load: latents, captions'
        embeddings (a dropped caption's empty one is read when used) and reference latents."""
        dataset_id, batch = drawn
        dataset = self.prepared[dataset_id]
        reads = []
        for planned in batch:
            current = dataset.current(planned)
            reads.append((dataset.latent_cache, latent_key(dataset, current)))
            reads.append((dataset.text_cache, self.text_entry(dataset, planned, planned.record.caption)))
            if dataset.conditioning:
                reads += [(c.latent_cache, latent_key(c, plan)) for c, plan in self.reference_plans(dataset, current)]
        return reads

    def _text_cache(self, config: DatasetConfig) -> TensorCache:
        """The prompt-embedding cache of the image dataset's text_embeds dataset (or the default)."""
        text = text_embeds_for(config, self.configs)
        root, storage_options = (
            cache_root_for(text, text.cache_dir)
            if text is not None and text.cache_dir
            else (str(self.cache_root / "text"), None)
        )
        return TensorCache(
            root,
            "text",
            {"model": self.model_identity, **self.text_settings},
            storage_options=storage_options,
            dataset=text.id if text is not None else None,
            compress_disk_cache=(text or config).compress_disk_cache,
        )

    def discover(self) -> None:
        """Find, caption and bucket every image dataset (no model needed); with
        ``scan_for_errors``, also check its latent cache (:meth:`scan_latent_cache`)."""
        for config in self.image_configs:
            storage = open_storage(config)
            metadata_dir = self.cache_root / "metadata" / config.id
            report = discover(config, storage, metadata_dir=metadata_dir, progress=self.progress)
            conditioning = tuple(self._prepare_conditioning(c) for c in conditioning_for(config, self.configs))
            pairs: dict[str, tuple[ImageRecord, ...]] = {}
            if conditioning:
                # Images without a pair in every conditioning dataset are dropped ("missing conditioning").
                report, pairs = pair_conditioning(report, [c.index for c in conditioning])
                if not report.kept:
                    names = ", ".join(repr(c.config.id) for c in conditioning)
                    raise ValueError(
                        f"dataset {config.id!r}: no image has a pair (same relative path) in its "
                        f"conditioning_data {names}; {report.summary()}"
                    )
            for dropped in report.dropped:
                log.info("dataset %r: dropped %s (%s)", config.id, dropped.path, dropped.reason)
            buckets = plan_buckets(list(report.kept), config, seed=self.seed)
            latent_cache = self._latent_cache(config)
            self.prepared[config.id] = PreparedDataset(
                config,
                storage,
                report,
                buckets,
                latent_cache,
                self._text_cache(config),
                encode_on_demand=config.vae_cache_ondemand,
                conditioning=conditioning,
                pairs=pairs,
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

    def _latent_cache(self, config: DatasetConfig) -> TensorCache:
        """A dataset's latent cache: ``cache_dir_vae``, else ``<cache_dir>/vae/<id>``. A cache may be
        a URL (s3://...); an aws dataset's relative cache dir is a prefix in its bucket."""
        vae_root, storage_options = (
            cache_root_for(config, config.cache_dir_vae)
            if config.cache_dir_vae
            else (str(self.cache_root / "vae" / config.id), None)
        )
        return TensorCache(
            vae_root,
            "latents",
            {"model": self.model_identity, **config.cache_settings()},
            storage_options=storage_options,
            dataset=config.id,
            compress_disk_cache=config.compress_disk_cache,
        )

    def _prepare_conditioning(self, config: DatasetConfig) -> PreparedConditioning:
        """Discover a conditioning dataset once, however many image datasets name it."""
        if config.id not in self.conditioning:
            storage = open_storage(config)
            index = discover_conditioning(
                config, storage, metadata_dir=self.cache_root / "metadata" / config.id, progress=self.progress
            )
            self.conditioning[config.id] = PreparedConditioning(config, storage, index, self._latent_cache(config))
        return self.conditioning[config.id]

    @property
    def conditioned_datasets(self) -> dict[str, tuple[str, ...]]:
        """Image dataset id -> the reference (model input) conditioning dataset ids it trains with
        (only those that have some); loss masks are in :attr:`masked_datasets`."""
        return {
            dataset_id: ids
            for dataset_id, dataset in self.prepared.items()
            if (ids := tuple(c.config.id for c in dataset.conditioning if not c.is_mask))
        }

    @property
    def masked_datasets(self) -> dict[str, tuple[str, ...]]:
        """Image dataset id -> its loss-mask datasets (``conditioning_type: mask``), where it has some."""
        return {
            dataset_id: ids
            for dataset_id, dataset in self.prepared.items()
            if (ids := tuple(c.config.id for c in dataset.conditioning if c.is_mask))
        }

    def reference_plans(
        self, dataset: PreparedDataset, planned: PlannedImage, *, masks: bool = False
    ) -> list[tuple[PreparedConditioning, PlannedImage]]:
        """Each reference dataset's planned reference for one (current) training image plan, in
        ``conditioning_data`` order (:attr:`PreparedDataset.references`); with ``masks``, each loss
        mask dataset's planned mask instead."""
        records = dataset.pairs[planned.record.path]
        return [
            (conditioning, plan_reference(planned, record, conditioning.config, seed=self.seed))
            for conditioning, record in zip(dataset.conditioning, records)
            if conditioning.is_mask == masks
        ]

    def text_entry(self, dataset: PreparedDataset, planned: PlannedImage, caption: str) -> str:
        """The text cache key of a sample's (possibly dropped) caption: the caption's, or with
        :attr:`prompt_references` and conditioning data, the caption's with its references'."""
        if not (self.prompt_references and dataset.references):
            return text_key(dataset.text_cache, caption)
        from tune_train.reference_inputs import text_entry_refs

        return dataset.text_cache.key(caption, text_entry_refs(self, dataset, planned))

    def captions(self) -> set[str]:
        """Every caption the run can feed the model (including the empty one for caption dropout);
        with :attr:`prompt_references`, only those of datasets without conditioning data (the
        others are encoded with their references)."""
        plain = [d for d in self.prepared.values() if not (self.prompt_references and d.references)]
        found = {""} if plain else set()
        for dataset in plain:
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
            # Sharded before looking at the cache, so the shares do not depend on what another
            # process has written meanwhile.
            mine = shard([p for images in dataset.buckets.values() for p in images], *self.shard)
            encoded += self._encode_references(dataset, mine, encode_images, batch_size)
            todo = [planned for planned in mine if not dataset.latent_cache.has(latent_key(dataset, planned))]
            if not todo:
                continue
            # Group by bucket so each VAE batch has one shape.
            by_bucket: dict[tuple[int, int], list[PlannedImage]] = {}
            for planned in todo:
                by_bucket.setdefault(planned.bucket, []).append(planned)
            bar = tqdm(total=len(todo), desc=f"caching latents ({dataset.config.id})", disable=not self.progress)
            # A worker thread writes (or uploads) the entries while the VAE encodes the next batch.
            with dataset.latent_cache.writer(max_pending=dataset.config.write_batch_size) as writer:
                for group in by_bucket.values():
                    for start in range(0, len(group), batch_size):
                        chunk = group[start : start + batch_size]
                        self._encode(dataset, chunk, encode_images, save=writer.put)
                        encoded += len(chunk)
                        bar.update(len(chunk))
            bar.close()
        return encoded

    def _encode_references(
        self, dataset: PreparedDataset, targets: Sequence[PlannedImage], encode_images, batch_size: int
    ) -> int:
        """Encode the references of ``targets`` missing from their conditioning caches."""
        if not dataset.references:
            return 0
        todo: dict[tuple[str, tuple[int, int]], list[PlannedImage]] = {}
        seen: set[tuple[str, str]] = set()
        for target in targets:
            for conditioning, plan in self.reference_plans(dataset, target):  # masks: load_masks
                key = latent_key(conditioning, plan)
                if (conditioning.config.id, key) in seen or conditioning.latent_cache.has(key):
                    continue
                seen.add((conditioning.config.id, key))
                todo.setdefault((conditioning.config.id, plan.bucket), []).append(plan)
        total = sum(len(plans) for plans in todo.values())
        bar = tqdm(total=total, desc=f"caching reference latents ({dataset.config.id})", disable=not self.progress or not total)
        for (conditioning_id, _), plans in todo.items():
            for start in range(0, len(plans), max(1, batch_size)):
                chunk = plans[start : start + max(1, batch_size)]
                self._encode(self.conditioning[conditioning_id], chunk, encode_images)
                bar.update(len(chunk))
        bar.close()
        return total

    def load_references(
        self, dataset_id: str, batch: Sequence[PlannedImage], *, step: int = 0
    ) -> list[list[torch.Tensor]]:
        """Each sample's cached reference latents (one per conditioning dataset, in
        ``conditioning_data`` order; with ``conditioning_multidataset_sampling: random`` one dataset,
        the same for the whole batch, chosen from the seed and step). Empty lists for a dataset
        without ``conditioning_data``."""
        dataset = self.prepared[dataset_id]
        if not dataset.references:
            return [[] for _ in batch]
        current = [dataset.current(planned) for planned in batch]
        if self.encode_images is not None:
            # Only what is missing: references of on-demand datasets, or strict references of a
            # target whose crop moved at an epoch end.
            self._encode_references(dataset, current, self.encode_images, self.encode_batch_size)
        chosen = range(len(dataset.references))
        if self.conditioning_sampling == "random" and len(dataset.references) > 1:
            salt = zlib.crc32(dataset_id.encode())
            pick = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + salt) % 2**63)
            chosen = [int(torch.randint(len(dataset.references), (1,), generator=pick))]
        out = []
        for planned in current:
            plans = self.reference_plans(dataset, planned)
            out.append([self._load(plans[i][0].latent_cache, latent_key(plans[i][0], plans[i][1]))["latents"] for i in chosen])
        return out

    def load_masks(self, dataset_id: str, batch: Sequence[PlannedImage], size: tuple[int, int]) -> torch.Tensor | None:
        """The batch's loss masks on the latent grid ``size`` = ``(h, w)``: ``B x 1 x h x w``
        weights in [0, 1] (:mod:`tune_train.masks`), the product of every mask dataset the image
        dataset names; ``None`` when it names none.

        A mask is cut exactly like its target (same bucket and crop window, also after an epoch-end
        re-crop) and cached at latent resolution in its dataset's cache, keyed by that plan and size."""
        from tune_train.masks import mask_from_pixels, to_latent_grid

        dataset = self.prepared[dataset_id]
        if not any(c.is_mask for c in dataset.conditioning):
            return None
        h, w = int(size[0]), int(size[1])
        masks = []
        for planned in batch:
            weight = torch.ones(1, h, w)
            for conditioning, plan in self.reference_plans(dataset, dataset.current(planned), masks=True):
                cache = conditioning.latent_cache
                entry = cache.get_or_compute(
                    cache.key(f"{plan.cache_item_id}|mask@{h}x{w}", plan.record.identity),
                    lambda c=conditioning, p=plan: {
                        "mask": to_latent_grid(mask_from_pixels(load_training_image(c.storage, p)), (h, w))
                    },
                )
                weight = weight * entry["mask"]
            masks.append(weight)
        return torch.stack(masks)

    def _encode(self, dataset: PreparedDataset, chunk: Sequence[PlannedImage], encode_images, save=None) -> None:
        """Encode images of one bucket and write their latent entries (with what inspect reads);
        ``save`` (default: the cache's own) may be a background :class:`CacheWriter`'s ``put``."""
        pixels = torch.stack([pixels_from_array(load_training_image(dataset.storage, p)) for p in chunk])
        with torch.no_grad():
            latents = encode_images(pixels).float().cpu()
        settings = dataset.latent_cache.settings
        for planned, latent in zip(chunk, latents):
            meta = latent_entry_metadata(
                planned.cache_item_id, planned.record.identity, dataset.config.cache_settings(),
                str(settings.get("model", "")),
            )
            (save or dataset.latent_cache.save)(latent_key(dataset, planned), {"latents": latent}, meta)

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
            if self.read_ahead is not None:
                self.read_ahead.forget()  # read before the clear (or of the old crops): not to be used
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
        # write_batch_size of the text_embeds dataset owning the cache (else the image dataset's).
        pending = {
            id(d.text_cache): (text_embeds_for(d.config, self.configs) or d.config).write_batch_size
            for d in self.prepared.values()
        }
        for cache in caches.values():
            todo = [c for c in shard(sorted(self.captions()), *self.shard) if not cache.has(text_key(cache, c))]
            bar = tqdm(total=len(todo), desc="caching text embeddings", disable=not self.progress or not todo)
            # As for latents: a worker thread writes (or uploads) while the encoder runs on; each
            # entry is atomic, so a crash leaves only whole entries and a rerun encodes the rest.
            with cache.writer(max_pending=pending[id(cache)]) as writer:
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start : start + batch_size]
                    with torch.no_grad():
                        embeds = encode_prompts(chunk)
                    for caption, tensors in zip(chunk, embeds):
                        writer.put(text_key(cache, caption), tensors)
                    encoded += len(chunk)
                    bar.update(len(chunk))
            bar.close()
        return encoded

    def build_sampler(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        exclude: Collection[str] = (),
        read_ahead: int = 2,
    ) -> MultiDatasetSampler | ReadAheadSampler:
        """Bucket-homogeneous batches per dataset, mixed by weight (SimpleTuner's auto-weighting).

        Datasets named in ``exclude`` (the held-out ``eval_dataset_id``) are cached like the others
        but never drawn for training. With ``read_ahead`` > 0 (default 2) the next batches' cache
        entries are read on worker threads while a step trains (:mod:`tune_data.prefetch`): the
        same batches in the same order, and ``state_dict`` is the position of the batch handed out
        last; ``0`` reads each batch when it is loaded."""
        training = {dataset_id: d for dataset_id, d in self.prepared.items() if dataset_id not in exclude}
        samplers = {
            dataset_id: BucketBatchSampler(
                dataset.buckets,
                batch_size,
                seed=self.seed,
                repeats=dataset.config.repeats,
                rank=rank,
                world_size=world_size,
                dataset_id=dataset_id,
                oversubscribe=dataset.config.allow_dataset_oversubscription,
            )
            for dataset_id, dataset in training.items()
        }
        for dataset_id, sampler in samplers.items():
            if sampler.oversubscribed_from is not None:
                log.warning(
                    "dataset %r: too small for batch size %d on %d process(es); repeats raised from %d to %d "
                    "(allow_dataset_oversubscription)",
                    dataset_id, batch_size, world_size, sampler.oversubscribed_from, sampler.repeats,
                )
        # data_backend_sampling: SimpleTuner's default auto-weighting is probability x (images x
        # (1 + repeats)); uniform is probability alone.
        weights = dataset_weights(
            {dataset_id: d.config.probability for dataset_id, d in training.items()},
            {
                dataset_id: sum(len(images) for images in d.buckets.values()) * (1 + samplers[dataset_id].repeats)
                for dataset_id, d in training.items()
            },
            mode=_sampling_mode(training.values()),
        )
        self.batches_per_epoch = sum(s.batches_per_epoch() for s in samplers.values())
        sampler = MultiDatasetSampler(samplers, weights, seed=self.seed)
        if self.read_ahead is not None:
            self.read_ahead.close()
        if read_ahead <= 0:
            self.read_ahead = None
            return sampler
        # Two readers: a gzip inflate or an S3 GET releases the GIL, so they overlap each other.
        self.read_ahead = ReadAheadSampler(sampler, self._batch_reads, depth=read_ahead, workers=2)
        return self.read_ahead

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
        captions = self.batch_captions(dataset_id, batch, drop_caption, step=step)
        current = [dataset.current(planned) for planned in batch]
        if dataset.encode_on_demand:
            self._encode_missing(dataset, current)
        latents = torch.stack(
            [self._load(dataset.latent_cache, latent_key(dataset, planned))["latents"] for planned in current]
        )
        prompts = [
            self._load(dataset.text_cache, self.text_entry(dataset, planned, caption))
            for planned, caption in zip(batch, captions)
        ]
        return latents, prompts

    def batch_captions(
        self, dataset_id: str, batch: Sequence[PlannedImage], drop_caption: Sequence[bool], *, step: int = 0
    ) -> list[str]:
        """The captions :meth:`load_batch` feeds for the same arguments: each sample's, or the
        empty prompt where the run-wide draw or the dataset's ``caption_dropout_probability``
        drops it (a text encoder trained live encodes exactly these)."""
        dataset = self.prepared[dataset_id]
        return [
            "" if drop or caption_dropped(dataset.config, planned.record.path, seed=self.seed, step=step)
            else planned.record.caption
            for planned, drop in zip(batch, drop_caption)
        ]

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


def _sampling_mode(datasets) -> str:
    """``dataset_weights``' mode from the datasets' ``data_backend_sampling`` (a trainer-level
    choice each dataset inherits; one run has one)."""
    chosen = {d.config.data_backend_sampling: d.config.id for d in datasets}
    if len(chosen) > 1:
        listed = ", ".join(f"{mode!r} (dataset {dataset_id!r})" for mode, dataset_id in sorted(chosen.items()))
        raise ValueError(
            f"data_backend_sampling differs between datasets: {listed}; it is one choice for the run: "
            "set it once, in config.json"
        )
    return "uniform" if chosen.keys() == {"uniform"} else "auto"


def check_reference_support(data: TrainingData, family, flavour: str | None = None) -> None:
    """Refuse conditioning datasets for a family (flavour) whose ``predict`` cannot take reference
    latents (``accepts_references``): training such a model on edit pairs would silently drop the
    references and teach it text-to-image on the edited images. Runs before any weights load."""
    conditioned = data.conditioned_datasets
    if not conditioned:
        return
    accepts = getattr(family, "accepts_references", None)
    if accepts(flavour) if accepts is not None else getattr(family, "accepts_reference_latents", False):
        return
    from tune_train.config import ConfigError

    pairs = "; ".join(f"{image!r} uses {', '.join(map(repr, refs))}" for image, refs in conditioned.items())
    label = getattr(family, "label", "") or getattr(family, "name", "?")
    raise ConfigError(
        f"conditioning_data: model_family {getattr(family, 'name', '?')!r} ({label})"
        + (f" flavour {flavour!r}" if flavour else "")
        + f" cannot train with reference images ({pairs}). Use one that takes them (flux2, or flux "
        "with model_flavour kontext), or remove conditioning_data from the dataset to train text-to-image."
    )


def check_mask_support(data: TrainingData, family) -> None:
    """Refuse loss masks (``conditioning_type: mask``) for a family that declares it cannot lay a
    pixel mask over its prediction (``accepts_loss_mask`` false). Runs before any weights load."""
    masked = data.masked_datasets
    if not masked or getattr(family, "accepts_loss_mask", True):
        return
    from tune_train.config import ConfigError

    pairs = "; ".join(f"{image!r} uses {', '.join(map(repr, masks))}" for image, masks in masked.items())
    label = getattr(family, "label", "") or getattr(family, "name", "?")
    raise ConfigError(
        f"conditioning_data: model_family {getattr(family, 'name', '?')!r} ({label}) cannot train with a loss "
        f"mask ({pairs}): its prediction is not laid out on the image's latent grid. Remove the "
        "conditioning_type 'mask' dataset from conditioning_data to train on whole images."
    )


def reference_kwargs(references: Sequence[Sequence[torch.Tensor]], dataset_id: str, device) -> dict:
    """``predict``'s ``reference_latents`` for one batch: per reference slot, the samples' latents
    stacked (``B x C x h x w``); nothing when the dataset has no conditioning data, so families
    without the keyword are called as before.

    Every sample of a batch must have references of one size per slot: true for
    ``reference_strict`` (the target's bucket); for ``reference_loose`` the references keep their
    own buckets, so a batch larger than one needs references of one aspect."""
    if not references or not any(references):
        return {}
    slots = len(references[0])
    stacked = []
    for slot in range(slots):
        tensors = [sample[slot] for sample in references]
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) > 1:
            raise ValueError(
                f"dataset {dataset_id!r}: the reference latents of one batch differ in size "
                f"({', '.join('x'.join(map(str, s)) for s in shapes)}). A reference_loose conditioning "
                "dataset keeps each reference's own aspect bucket: use train_batch_size 1, or give "
                "the references one aspect (crop: true with crop_aspect: square on the conditioning dataset)."
            )
        stacked.append(torch.stack(tensors).to(device))
    return {"reference_latents": stacked}
