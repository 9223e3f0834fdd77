"""Give freed host memory back to the operating system while quantising on the CPU.

Quantising a layer makes full-precision temporaries (torchao computes scales in fp32) that are
freed a moment later, but glibc's allocator keeps freed pages in its arenas instead of returning
them. Measured with ``benchmarks/load_peak_rss.py`` (docs/memory.md): after an int8 quantisation
on the CPU the process held about 1.6x the model's bf16 size in such free pages, which no
later ``cudaHostAlloc`` (block swap's pinned memory) or other process could use. Quantising in
groups of layers and trimming after each keeps the peak near the quantised model plus one
group's temporaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterable
from itertools import groupby

__all__ = ["layer_groups", "release_free_memory"]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS, Windows: nothing to do there)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when something could be asked to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def layer_groups(names: Iterable[str], depth: int = 2) -> list[list[str]]:
    """``names`` (module paths, in model order) grouped by their first ``depth`` parts:
    ``layers.3.attention.to_q`` and ``layers.3.feed_forward.w1`` share the group ``layers.3``,
    so one transformer block is quantised at a time."""
    return [list(group) for _, group in groupby(names, key=lambda name: tuple(name.split(".")[:depth]))]
