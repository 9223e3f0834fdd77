"""Quantise a transformer one block at a time on the accelerator (``quantize_via: accelerator``).

Why: quantising a large model on the CPU is slow (torchao's int8 of a 32 B FLUX.2 transformer
takes many minutes there) and needs the whole bf16 model *and* its quantised copy in RAM, while
moving the whole bf16 model onto the GPU first does not fit (64 GB for FLUX.2). Block by block,
the accelerator holds at most the part that stays resident (already quantised) plus one bf16
block, and each block is quantised by the GPU's kernels in well under a second.

How: the model's top-level transformer blocks (the children of its block ``ModuleList`` s, in
execution order, the same blocks tune-offload's block swap finds) are visited in order. Each is
moved to ``device``, quantised there, and moved back to ``offload_device`` when it is one that
block swap will keep off the accelerator (the last ``offload_last``, or those ``keep_on_cpu``
says). What is not in a block (embedders, norms, output projection, the model's own tensors) is
moved to ``device`` and quantised there first.

Layer selection is exactly :func:`tune_quant.quantise`'s: each block is quantised inside a
stand-in parent that gives its layers their full dotted names (``transformer_blocks.3.attn.to_q``),
so the default skips and the caller's ``exclude`` substrings pick the very same layers, and the
result equals whole-module quantisation tensor for tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tune_quant.presets import log

if TYPE_CHECKING:
    import torch

#: Names of the ``ModuleList`` s that hold transformer blocks, in execution order. The same list
#: as ``tune_offload.block_swap.BLOCK_LIST_NAMES`` (tune-quant may not import tune-offload; a test
#: checks the two agree), so "the last N blocks" means the same blocks to both packages.
BLOCK_LIST_NAMES = ("noise_refiner", "context_refiner", "layers", "transformer_blocks",
                    "single_transformer_blocks", "blocks")


def block_lists(module: torch.nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """The names of ``module``'s top-level block ``ModuleList`` s, in execution order.

    Those of ``names`` (default :data:`BLOCK_LIST_NAMES`) it has, in that order; a module with
    none of the default names uses all its top-level ``ModuleList`` s in registration order.
    """
    import torch

    lists = [n for n, c in module.named_children() if isinstance(c, torch.nn.ModuleList)]
    order = [n for n in (names or BLOCK_LIST_NAMES) if n in lists]
    if names is not None:
        missing = [n for n in names if n not in lists]
        if missing:
            raise ValueError(f"no ModuleList named {missing} on {type(module).__name__}; it has {sorted(lists)}")
    return order or (lists if names is None else [])


class _QuietEmptyParts(logging.Filter):
    """Drops the built-in presets' "no Linear layer selected" warning for one part."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "no Linear layer selected" not in str(record.msg)


def _shell(path: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A throwaway parent under which each ``{dotted name: module}`` keeps its full name."""
    import torch

    root = torch.nn.Module()
    for dotted, child in path.items():
        parent = root
        *heads, last = dotted.split(".")
        for head in heads:
            if head not in parent._modules:
                parent.add_module(head, torch.nn.Module())
            parent = parent._modules[head]
        parent.add_module(last, child)
    return root


def quantise_blockwise(
    module: torch.nn.Module,
    preset: str,
    *,
    device: str | torch.device = "cuda",
    offload_last: int = 0,
    keep_on_cpu: Callable[[int], bool] | None = None,
    offload_device: str | torch.device = "cpu",
    exclude: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> torch.nn.Module:
    """Quantise ``module`` with ``preset`` one transformer block at a time on ``device``.

    Blocks ``i`` with ``i >= n_blocks - offload_last`` or ``keep_on_cpu(i)`` true go back to
    ``offload_device`` once quantised (block swap will stream them in); everything else ends on
    ``device``. The accelerator therefore never holds more than the resident part plus one
    unquantised block. Same layers, same quantised tensors as ``quantise(module, preset)``.
    Returns ``module`` (changed in place).
    """
    import torch

    from tune_quant.registry import quantisers

    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    quantiser = quantisers.load(preset)
    quantiser.check(str(device))
    device, offload_device = torch.device(device), torch.device(offload_device)

    lists = block_lists(module, names)
    blocks = [(f"{n}.{i}", block) for n in lists for i, block in enumerate(module.get_submodule(n))]
    if not 0 <= offload_last <= len(blocks):
        raise ValueError(
            f"offload_last (musubi_blocks_to_swap) must be between 0 and the model's {len(blocks)} "
            f"blocks, got {offload_last}"
        )
    first_offloaded = len(blocks) - offload_last

    def offloaded(index: int) -> bool:
        return index >= first_offloaded or (keep_on_cpu is not None and bool(keep_on_cpu(index)))

    def run(parts: dict[str, torch.nn.Module]) -> None:
        quantiser.apply(_shell(parts), exclude=exclude)

    # The part outside the blocks stays resident: move it, then quantise it there.
    rest = {n: c for n, c in module.named_children() if n not in lists}
    for child in rest.values():
        child.to(device)
    for table in (module._parameters, module._buffers):
        for name, tensor in list(table.items()):
            if tensor is not None and tensor.device != device:
                moved = tensor.to(device)
                table[name] = torch.nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else moved
    quiet = _QuietEmptyParts()  # a part with no selected layer is normal here, not a warning
    log.addFilter(quiet)
    try:
        run(rest)
        for index, (name, block) in enumerate(blocks):
            block.to(device)
            run({name: block})
            if offloaded(index):
                block.to(offload_device)
    finally:
        log.removeFilter(quiet)
    log.info("%s: quantised %d blocks on %s, %d left on %s", preset, len(blocks), device,
             sum(offloaded(i) for i in range(len(blocks))), offload_device)
    return module
