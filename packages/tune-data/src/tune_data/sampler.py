"""Batch samplers: bucket-homogeneous batches, repeats, rank shards, dataset weights, exact resume.

Every batch comes from one aspect bucket (so its images stack into one tensor) and, with several
datasets, from one dataset. All randomness comes from ``random.Random`` seeded by a hash of
``(seed, epoch)`` or ``(seed, step)``: never the global RNG, so every process computes the same
plan and a restored state replays exactly the batches that were still to come.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from tune_data.errors import DatasetTooSmallError

__all__ = ["BucketBatchSampler", "MultiDatasetSampler", "DatasetTooSmallError", "dataset_weights"]

T = TypeVar("T")


def _seeded(*parts: object) -> random.Random:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sorted_keys(keys: Any) -> list[Hashable]:
    try:
        return sorted(keys)
    except TypeError:  # mixed key types: any fixed order will do
        return sorted(keys, key=repr)


def _describe_key(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) for v in key):
        return f"{key[0]}x{key[1]}"
    return str(key)


class BucketBatchSampler(Generic[T]):
    """Endless batches of ``batch_size`` items, each batch drawn from a single bucket.

    One epoch holds every item ``1 + repeats`` times (each repetition shuffled on its own), cut
    into batches per bucket, the incomplete tail of each bucket dropped, and the batch order
    shuffled. With ``world_size`` > 1, rank ``r`` takes batches ``r, r + world_size, ...``; every
    rank gets the same number (the last few batches are dropped), so ranks stay in step.

    ``oversubscribe`` (SimpleTuner's ``allow_dataset_oversubscription``): when the buckets are too
    small to give every rank one batch per epoch, ``repeats`` is raised to the smallest value that
    does (:attr:`oversubscribed_from` keeps the value asked for) instead of failing.
    """

    def __init__(
        self,
        buckets: Mapping[Hashable, Sequence[T]],
        batch_size: int,
        *,
        seed: int = 0,
        repeats: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dataset_id: str = "",
        oversubscribe: bool = False,
    ) -> None:
        label = f"dataset {dataset_id!r}" if dataset_id else "sampler"
        if batch_size < 1:
            raise ValueError(f"{label}: batch_size must be >= 1, got {batch_size}")
        if repeats < 0:
            raise ValueError(f"{label}: repeats must be >= 0, got {repeats}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"{label}: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats
        self.rank = rank
        self.world_size = world_size
        self.dataset_id = dataset_id
        self._buckets = {key: list(buckets[key]) for key in _sorted_keys(buckets.keys())}
        self._epoch = 0
        self._position = 0
        self._plan: list[list[T]] | None = None
        self._plan_epoch = -1
        self.oversubscribed_from: int | None = None
        """The ``repeats`` asked for, when ``oversubscribe`` had to raise it; else ``None``."""
        if self.batches_per_epoch() == 0 and oversubscribe and any(self._buckets.values()):
            asked = self.repeats
            # Terminates: once 1 + repeats >= batch_size x world_size, any non-empty bucket gives
            # every rank a batch.
            while self.batches_per_epoch() == 0:
                self.repeats += 1
            self.oversubscribed_from = asked
        if self.batches_per_epoch() == 0:
            raise DatasetTooSmallError(self._too_small_message(label))

    def _too_small_message(self, label: str) -> str:
        counts = ", ".join(f"{_describe_key(k)}: {len(v)}" for k, v in self._buckets.items()) or "no images"
        copies = 1 + self.repeats
        total = sum(len(items) * copies // self.batch_size for items in self._buckets.values())
        text = (
            f"{label} is too small for batch_size {self.batch_size}: every batch comes from one "
            f"aspect bucket, and the buckets hold {counts} images"
        )
        if self.repeats:
            text += f" (each seen {copies} times with repeats {self.repeats})"
        if self.world_size > 1:
            text += f"; that makes {total} batches per epoch for {self.world_size} processes"
        return text + (
            ". Add images, lower batch_size, raise repeats, or set allow_dataset_oversubscription "
            "to raise repeats as needed."
        )

    def batches_per_epoch(self) -> int:
        """Batches this rank yields per epoch."""
        copies = 1 + self.repeats
        total = sum(len(items) * copies // self.batch_size for items in self._buckets.values())
        return total // self.world_size

    def __len__(self) -> int:
        return self.batches_per_epoch()

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def _epoch_plan(self, epoch: int) -> list[list[T]]:
        if self._plan_epoch != epoch or self._plan is None:
            rng = _seeded("bucket-batches", self.seed, epoch)
            batches: list[list[T]] = []
            for items in self._buckets.values():
                pool: list[T] = []
                for _ in range(1 + self.repeats):
                    copy = list(items)
                    rng.shuffle(copy)
                    pool.extend(copy)
                usable = len(pool) - len(pool) % self.batch_size
                batches.extend(pool[i : i + self.batch_size] for i in range(0, usable, self.batch_size))
            rng.shuffle(batches)
            per_rank = len(batches) // self.world_size
            self._plan = batches[self.rank :: self.world_size][:per_rank]
            self._plan_epoch = epoch
        return self._plan

    def next_batch(self) -> list[T]:
        """The next batch; advances the state (so :meth:`state_dict` after it points past it)."""
        plan = self._epoch_plan(self._epoch)
        batch = list(plan[self._position])
        self._position += 1
        if self._position >= len(plan):
            self._epoch += 1
            self._position = 0
        return batch

    def __iter__(self) -> Iterator[list[T]]:
        """Batches forever, across epochs, continuing from the current state."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands: ``{"epoch": ..., "position": ...}`` (batches taken this epoch)."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved state: the same batches follow as followed when it was saved."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch():
            raise ValueError(
                f"sampler state {dict(state)} does not fit {self.dataset_id or 'this dataset'} "
                f"({self.batches_per_epoch()} batches per epoch); did the dataset or batch size change?"
            )
        self._epoch, self._position = epoch, position


class MultiDatasetSampler(Generic[T]):
    """Each step picks one dataset by weight and yields ``(dataset_id, batch)`` from its sampler.

    The pick at step ``n`` depends only on ``(seed, n)``, so resuming needs only the step count
    and each dataset's own sampler state.
    """

    def __init__(
        self,
        samplers: Mapping[str, BucketBatchSampler[T]],
        weights: Mapping[str, float],
        *,
        seed: int = 0,
    ) -> None:
        if not samplers:
            raise ValueError("MultiDatasetSampler needs at least one dataset sampler")
        missing = sorted(set(samplers) - set(weights))
        extra = sorted(set(weights) - set(samplers))
        if missing or extra:
            raise ValueError(f"weights must name exactly the datasets; missing {missing}, unknown {extra}")
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"dataset {name!r}: weight must be >= 0, got {weight}")
        self._ids = sorted(samplers)
        self._samplers = dict(samplers)
        self._weights = [float(weights[name]) for name in self._ids]
        if sum(self._weights) <= 0:
            raise ValueError(f"at least one dataset weight must be > 0, got {dict(weights)}")
        self.seed = seed
        self._step = 0

    def _pick(self, step: int) -> str:
        return _seeded("dataset-pick", self.seed, step).choices(self._ids, weights=self._weights)[0]

    def next_batch(self) -> tuple[str, list[T]]:
        dataset_id = self._pick(self._step)
        self._step += 1
        return dataset_id, self._samplers[dataset_id].next_batch()

    def __iter__(self) -> Iterator[tuple[str, list[T]]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "datasets": {name: sampler.state_dict() for name, sampler in self._samplers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["datasets"]
        if set(saved) != set(self._samplers):
            raise ValueError(f"sampler state is for datasets {sorted(saved)}, but this run has {self._ids}")
        for name, sampler in self._samplers.items():
            sampler.load_state_dict(saved[name])
        self._step = int(state["step"])


def dataset_weights(
    probabilities: Mapping[str, float], sizes: Mapping[str, int], *, mode: str = "auto"
) -> dict[str, float]:
    """Per-dataset weights as SimpleTuner computes them.

    ``auto`` (SimpleTuner's auto-weighting): ``probability x size``, so a bigger dataset is drawn
    from more often; ``uniform``: ``probability`` alone.
    """
    if mode == "uniform":
        return {name: float(probabilities[name]) for name in probabilities}
    if mode == "auto":
        return {name: float(probabilities[name]) * sizes[name] for name in probabilities}
    raise ValueError(f"dataset weighting mode must be 'auto' or 'uniform', got {mode!r}")
