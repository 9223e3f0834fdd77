"""Gradient checkpointing of every Nth transformer block (``gradient_checkpointing_interval``).

Full checkpointing keeps only each block's input until backward and runs every block twice;
no checkpointing keeps every block's activations and runs each once. Checkpointing one block in
N sits in between: the N-1 blocks in each group keep their activations (more memory) and are not
recomputed (about (N-1)/N of the recomputation time saved). On a card where full checkpointing
leaves memory unused, this buys back speed.

:func:`every_nth_checkpoint` wraps a ``gradient_checkpointing_func`` for diffusers'
``enable_gradient_checkpointing`` (diffusers calls ``func(block, *args)`` for each block while
training): block ``i`` (its position in execution order, as block swap counts them) is
checkpointed when ``i % N == 0`` and called directly otherwise. The wrapped function may be
diffusers' default (torch's non-reentrant checkpoint) or
:func:`tune_offload.activations.offloaded_checkpoint` (``offload_checkpointed_activations``),
so the two compose: the checkpointed blocks' inputs wait in pinned CPU memory. It lives here, in
tune-offload, beside that function and :func:`tune_offload.block_swap.find_blocks` which
define what a block and its index are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tune_offload.block_swap import find_blocks


def _torch_checkpoint(block: Any, *args: Any, **kwargs: Any) -> Any:
    """diffusers' default: torch's non-reentrant checkpoint of ``block(*args)``."""
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, **kwargs)


class EveryNthCheckpoint:
    """A ``gradient_checkpointing_func`` that checkpoints only blocks ``i`` with ``i % interval == 0``.

    ``index`` maps each block of the model (by identity) to its position in execution order.
    A module it does not know (a model that checkpoints something other than its listed blocks)
    is checkpointed, the memory-safe choice.
    """

    def __init__(self, index: dict[int, int], interval: int, checkpoint: Callable[..., Any]) -> None:
        if interval < 1:
            raise ValueError(f"gradient_checkpointing_interval must be >= 1, got {interval}")
        self.index = index
        self.interval = interval
        self.checkpoint = checkpoint

    def checkpointed(self, block: Any) -> bool:
        position = self.index.get(id(block))
        return position is None or position % self.interval == 0

    def __call__(self, block: Any, *args: Any, **kwargs: Any) -> Any:
        if self.checkpointed(block):
            return self.checkpoint(block, *args, **kwargs)
        return block(*args, **kwargs)


def every_nth_checkpoint(
    module: torch.nn.Module,
    interval: int,
    checkpoint: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """The ``gradient_checkpointing_func`` for ``module`` that checkpoints every ``interval``-th
    block (the first, the (N+1)-th, ...) with ``checkpoint`` (default: torch's non-reentrant
    checkpoint, as diffusers does) and runs the others plainly.

    Use as ``module.enable_gradient_checkpointing(every_nth_checkpoint(module, 2))``. An interval
    of 1 checkpoints every block (the same as no wrapper).
    """
    index = {id(block): i for i, (_, block) in enumerate(find_blocks(module))}
    return EveryNthCheckpoint(index, interval, checkpoint or _torch_checkpoint)
