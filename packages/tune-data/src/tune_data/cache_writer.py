"""The background writer of a :class:`~tune_data.cache.TensorCache`: one worker thread, a bounded queue.

Why: the VAE (or text encoder) can encode the next batch while the last one is written or
uploaded, and a slow disk or object store holds back the encoder only when the queue is full.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tune_data.errors import DatasetConfigError

if TYPE_CHECKING:
    import torch

    from tune_data.cache import TensorCache

__all__ = ["CacheWriter", "CacheWriteError"]


class CacheWriteError(RuntimeError):
    """A background write failed; raised by the next :meth:`CacheWriter.put`, ``flush`` or ``close``."""


_STOP = object()


class CacheWriter:
    """Writes entries of a :class:`TensorCache` on one worker thread, through a bounded queue.

    Why: the VAE (or text encoder) can encode the next batch while the last one is written or
    uploaded, and a slow disk or object store then holds back the encoder only when
    ``max_pending`` entries are already waiting: :meth:`put` blocks, so memory stays bounded.

    Each entry is written by :meth:`TensorCache.save`, so it is atomic (temporary file and rename
    locally, one PUT remotely): a crash mid-write leaves no partial entry, and any other process
    (another rank) reads complete entries only. The first error of the worker is raised by the
    next :meth:`put`, :meth:`flush` or :meth:`close`, as :class:`CacheWriteError` naming the key
    and chaining the original; entries queued after a failure are dropped, not written.
    """

    def __init__(self, cache: TensorCache, max_pending: int = 8) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.cache = cache
        self.max_pending = max_pending
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._failed_key: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"tune-cache-writer-{cache.namespace}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:
                    key, tensors, metadata = job
                    try:
                        self.cache.save(key, tensors, metadata)
                    except BaseException as exc:  # surfaced to the producer, never lost in the thread
                        self._error, self._failed_key = exc, key
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, DatasetConfigError):
                raise error  # already one clear error naming the dataset (a refused S3 credential)
            raise CacheWriteError(
                f"writing cache entry {self._failed_key} under {self.cache.directory} failed: "
                f"{type(error).__name__}: {error}"
            ) from error

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        """Queue an entry (same arguments as :meth:`TensorCache.save`); blocks while the queue is full.

        Tensors are detached and copied to the CPU here, so the caller may reuse or free its
        buffers (a GPU batch) as soon as this returns.
        """
        if self._closed:
            raise RuntimeError("CacheWriter.put after close()")
        self._raise_error()
        ready = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
        self._queue.put((key, ready, dict(metadata) if metadata else None))

    #: :meth:`put` under the name of :meth:`TensorCache.save`, so either can be passed as a callback.
    save = put

    @property
    def pending(self) -> int:
        """Entries queued and not yet written (the one being written included)."""
        return self._queue.unfinished_tasks

    def flush(self) -> None:
        """Wait until every queued entry is written; raise the first write error, if any."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, then stop the worker thread. Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the block failed: still write what it queued, but keep its exception the one raised
            self.close()
        except CacheWriteError:
            pass
