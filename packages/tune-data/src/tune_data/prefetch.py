"""Read-ahead of cached batches: the next batches' cache entries are read while this one trains.

Why: a training step only reads cached tensors, but a read is not always cheap. A gzip entry
(``compress_disk_cache``) takes ~5 ms per MiB to inflate on one core, an entry on S3 is a network
round trip. Read synchronously, that time adds to every step; read ahead on a worker thread, it
overlaps the step (the accelerator's work, which releases the GIL) and costs nothing once the
reads are faster than the steps.

:class:`ReadAheadSampler` wraps any batch sampler of :mod:`tune_data.sampler` (anything with
``next_batch``, ``state_dict`` and ``load_state_dict``) and keeps its promises unchanged:

- **Ordered, deterministic.** Batches are drawn from the wrapped sampler in the caller's thread,
  in its order, and handed out in that order; the worker only reads files. The same seed gives
  the same batches with or without read-ahead, and the tensors are the same bytes.
- **Resume unchanged.** :meth:`ReadAheadSampler.state_dict` is the position after the last batch
  handed out, not after the batches drawn ahead, so a checkpoint resumes exactly there.
- **Bounded.** At most ``depth`` batches beyond the current one are drawn and read; their
  tensors are all that is held in memory, and a batch's entries are dropped when the next batch is
  handed out.
- **Errors surface where the data is used.** A read that failed on the worker raises its own
  exception from :meth:`ReadAheadSampler.load` for that entry, exactly as a synchronous read would;
  a failure of a read that is never used (forgotten) is dropped.

The caller says which entries a batch needs (``reads(batch) -> [(cache, key), ...]``) and reads
them through :meth:`ReadAheadSampler.load`, which falls back to a synchronous read for anything not
read ahead (an entry encoded on demand, an evaluation batch, a plan that changed).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from tune_data.cache import TensorCache

__all__ = ["ReadAheadSampler"]

T = TypeVar("T")
Reads = Callable[[Any], Iterable[tuple[TensorCache, str]]]

_STOP = object()


def _entry_id(cache: TensorCache, key: str) -> tuple[str, str]:
    # The key hashes namespace and settings; the directory says which store. Together: one file.
    return str(cache.directory), key


def _read(cache: TensorCache, key: str) -> dict[str, Any] | None:
    """The entry's tensors, or ``None`` when it is not stored (yet): the caller decides then."""
    try:
        return cache.read(key)
    except KeyError:
        return None


def _work(jobs: queue.Queue[Any]) -> None:
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        future, cache, key = job
        if not future.set_running_or_notify_cancel():
            continue  # forgotten before it started
        try:
            future.set_result(_read(cache, key))
        except BaseException as exc:  # handed to whoever uses the entry, never lost here
            future.set_exception(exc)


class ReadAheadSampler(Generic[T]):
    """A batch sampler whose next ``depth`` batches' cache entries are read on worker threads.

    ``sampler``: the sampler to draw from (a :class:`~tune_data.sampler.MultiDatasetSampler` or a
    :class:`~tune_data.sampler.BucketBatchSampler`). ``reads(batch)``: the ``(cache, key)`` pairs a
    batch will load. ``depth``: batches read ahead (>= 1). ``workers``: reading threads; more than
    one overlaps reads of one batch (useful for object stores and gzip, whose inflate releases the
    GIL). Attributes it does not define are the wrapped sampler's.
    """

    def __init__(self, sampler: Any, reads: Reads, *, depth: int = 2, workers: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        if workers < 1:
            raise ValueError(f"read-ahead workers must be >= 1, got {workers}")
        self.sampler = sampler
        self.reads = reads
        self.depth = depth
        self._ahead: deque[tuple[Any, Any, dict[tuple[str, str], Future]]] = deque()
        self._current: dict[tuple[str, str], Future] = {}
        self._state: Any = None
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._threads = [
            # The threads hold only the queue, not this object, so a sampler nobody uses any more
            # is collected (and its threads told to stop by __del__).
            threading.Thread(target=_work, args=(self._jobs,), name=f"tune-read-ahead-{index}", daemon=True)
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _submit(self, batch: Any) -> dict[tuple[str, str], Future]:
        futures: dict[tuple[str, str], Future] = {}
        for cache, key in self.reads(batch):
            entry = _entry_id(cache, key)
            if entry in futures:
                continue  # the same entry twice in a batch (a repeated image): read it once
            future: Future = Future()
            futures[entry] = future
            self._jobs.put((future, cache, key))
        return futures

    # -- the sampler interface -------------------------------------------------------------------
    def next_batch(self) -> Any:
        """The next batch of the wrapped sampler; its entries were (or are being) read ahead."""
        while len(self._ahead) <= self.depth:
            batch = self.sampler.next_batch()
            self._ahead.append((batch, self.sampler.state_dict(), self._submit(batch)))
        batch, state, futures = self._ahead.popleft()
        self._current = futures  # the previous batch's tensors are released here
        self._state = state
        return batch

    def __iter__(self) -> Iterator[Any]:
        """Batches forever, continuing from the current state (as the wrapped sampler's)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> Any:
        """The wrapped sampler's state after the last batch handed out (batches drawn ahead do not
        count), so resuming from it yields the very next batch."""
        return self._state if self._state is not None else self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state; batches drawn ahead are forgotten (drawing them advanced
        the wrapped sampler, which is now set back to ``state``)."""
        self.forget(current=True)
        self.sampler.load_state_dict(state)
        self._state = None

    def forget(self, *, current: bool = False) -> None:
        """Drop what was read ahead (call when cache entries change under it, e.g. an epoch-end
        clear); the batches stay drawn, in order, and their entries are read when they are used.
        ``current=True`` also drops the drawn batches (for :meth:`load_state_dict`)."""
        for index, (batch, state, futures) in enumerate(self._ahead):
            for future in futures.values():
                future.cancel()
            self._ahead[index] = (batch, state, {})
        self._current = {}
        if current:  # the drawn batches themselves go too (the wrapped sampler is being reset)
            self._ahead.clear()

    # -- reading ---------------------------------------------------------------------------------
    def load(self, cache: TensorCache, key: str) -> dict[str, Any]:
        """An entry of the current batch, read ahead when it was, else read now (the same tensors;
        a missing entry raises ``KeyError`` as :meth:`TensorCache.load` does). Each read-ahead
        entry serves one load; later loads of it read the cache."""
        # Used once: a second load of the entry (an image drawn twice into one batch, or a caller
        # that rewrote the entry since) reads the cache again, as it would without read-ahead.
        future = self._current.pop(_entry_id(cache, key), None)
        if future is not None and not future.cancelled():
            tensors = future.result()  # re-raises the worker's error for this entry
            if tensors is not None:
                cache.stats.hits += 1
                return tensors
        return cache.load(key)

    def close(self) -> None:
        """Stop the worker threads (they are daemons: a run that never calls this still exits)."""
        self.forget(current=True)
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(_STOP)
        for thread in threads:
            thread.join()

    def __del__(self) -> None:
        for _ in getattr(self, "_threads", ()):
            self._jobs.put(_STOP)

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on this object: the wrapped sampler's attributes.
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)
