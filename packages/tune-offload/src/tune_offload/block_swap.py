"""Block swap for training: the last N transformer blocks live in pinned CPU memory.

SimpleTuner's ``musubi_blocks_to_swap`` (after kohya's musubi-tuner). The frozen weights of the
last N blocks stay in CPU memory; each block is copied onto the accelerator just before it runs,
on a side CUDA stream while the block before it computes, and dropped right after. It works for
the forward pass and for the backward pass with gradient checkpointing, where each block runs
again (recomputed) just before its gradients are taken, in reverse order.

Design decisions, and why:

- **Only frozen tensors travel.** Trainable parameters (the LoRA A/B weights, anything with
  ``requires_grad``) stay on the accelerator: they are tiny (a rank-16 LoRA on every linear of a
  6 B model is ~0.5 % of it), the optimizer steps them in place there (fused AdamW needs them on
  the GPU), and their gradients never have to cross PCIe. Moving them would save a few tens of
  MB for a copy there and back every step.
- **Swapping is by parameter slot, not ``module.to``.** Each swapped frozen tensor gets an
  accelerator copy built from its pinned CPU "leaves" (plain tensors; a torchao quantised weight
  is taken apart with ``__tensor_flatten__`` and rebuilt with ``__tensor_unflatten__``), which is
  placed in the module's ``_parameters`` / ``_buffers`` slot for the block's run, then the slot
  gets the CPU tensor back. Autograd keeps what it saved, so gradients are correct whether or
  not checkpointing is on; without checkpointing, autograd keeps every block's weights alive
  until backward, so block swap saves memory only with gradient checkpointing (a warning says
  so).
- **Release by schedule, not only after forward.** A checkpointed block's recomputation may stop
  early (torch's non-reentrant checkpoint stops once it has what backward needs), so its
  forward post-hook does not always run. Every block's pre-hook therefore releases the swapped
  blocks that are neither running nor prefetched; the post-hook releases eagerly when it runs.
- **Direction from autograd.** Inside backward (``torch._C._current_graph_task_id() != -1``)
  blocks run last to first, so the block *before* is prefetched; otherwise the block after.
- **Copies live in the compute stream's memory (stream-ordered).** A block's accelerator copy
  is allocated on the compute stream, and the side stream waits for the compute stream's work
  queued so far before it writes. So the memory of the block released a moment ago (its last
  kernels are queued, perhaps not yet run) is reused at once for the next copy, the way
  activations reuse each other's memory, and two blocks are in flight, not three. Measured
  alternatives (docs/benchmarks.md): copies allocated on the side stream and marked with
  ``record_stream`` (the first version) could not reuse a released block until the GPU had
  caught up with the CPU, which it rarely had, so a third block's copy was alive at the peak;
  two preallocated buffer sets (tried before) sat beside the activations' memory instead of
  sharing it. The price: a copy starts only when the block before the one it feeds starts, so
  its transfer overlaps one block's compute (as musubi-tuner's does).

On a CPU-only run the :class:`BlockSwapStrategy` is a logged no-op (there is no accelerator
memory to save; the same config still trains). :class:`BlockSwapper` itself also runs with a
CPU "accelerator" (synchronous copies, no streams), which is how its bookkeeping is tested.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tune_offload.strategies import OffloadSettings

log = logging.getLogger(__name__)

_ABSENT = object()

BLOCK_LIST_NAMES = ("noise_refiner", "context_refiner", "layers", "transformer_blocks",
                    "single_transformer_blocks", "blocks")
"""Names of the ``ModuleList`` s searched for transformer blocks, in execution order."""


def find_blocks(module: torch.nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """``(dotted name, block)`` of the module's transformer blocks, in execution order.

    The blocks are the children of the module's top-level ``ModuleList`` s named in ``names``
    (default :data:`BLOCK_LIST_NAMES`) in that order; a module with none of those names uses its
    top-level ``ModuleList`` s in registration order.
    """
    import torch

    lists = {n: c for n, c in module.named_children() if isinstance(c, torch.nn.ModuleList)}
    order = [n for n in (names or BLOCK_LIST_NAMES) if n in lists]
    if not order and names is None:
        order = list(lists)
    if names is not None:
        missing = [n for n in names if n not in lists]
        if missing:
            raise ValueError(f"no ModuleList named {missing} on {type(module).__name__}; it has {sorted(lists)}")
    return [(f"{n}.{i}", block) for n in order for i, block in enumerate(lists[n])]


# ----------------------------------------------------------------------- tensors taken apart
def _leaves(t: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
    """A rebuild recipe and the plain tensors inside ``t`` (a tensor subclass is flattened)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, ctx = t.__tensor_flatten__()
        recipes, leaves = [], []
        for name in names:
            recipe, inner = _leaves(getattr(t, name))
            recipes.append((name, recipe, len(inner)))
            leaves.extend(inner)
        return (type(t), recipes, ctx, tuple(t.size()), tuple(t.stride())), leaves
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        # A subclass we cannot take apart (bitsandbytes' Params4bit keeps its quantisation state
        # outside the tensor): moving it would lose that state silently.
        from tune_offload.strategies import OffloadConfigError

        raise OffloadConfigError(
            f"block swap cannot move a {type(t).__name__} weight; swap blocks of a bf16/fp16 or "
            "torchao-quantised model (e.g. base_model_precision int8-torchao), or set "
            "musubi_blocks_to_swap to 0"
        )
    return None, [t.detach()]


def _rebuild(recipe: Any, leaves: list[torch.Tensor]) -> torch.Tensor:
    if recipe is None:
        return leaves[0]
    cls, recipes, ctx, size, stride = recipe
    inner, at = {}, 0
    for name, sub, count in recipes:
        inner[name] = _rebuild(sub, leaves[at:at + count])
        at += count
    return cls.__tensor_unflatten__(inner, ctx, size, stride)


class _Slot:
    """One frozen tensor of a swapped block: where it lives on the module, its pinned leaves."""

    __slots__ = ("owner", "name", "kind", "recipe", "cpu_leaves", "offloaded")

    def __init__(self, owner: torch.nn.Module, name: str, kind: str, tensor: torch.Tensor,
                 offload_device: torch.device, pin: bool) -> None:
        self.owner, self.name, self.kind = owner, name, kind
        self.recipe, leaves = _leaves(tensor)
        moved = []
        for leaf in leaves:
            leaf = leaf.to(offload_device, copy=leaf.device != offload_device)
            if pin and not leaf.is_pinned():
                leaf = leaf.pin_memory()
            moved.append(leaf)
        self.cpu_leaves = moved
        self.offloaded = self._wrap(_rebuild(self.recipe, moved))

    def _wrap(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        if self.kind == "param":
            return torch.nn.Parameter(tensor, requires_grad=False)
        return tensor

    def put(self, tensor: torch.Tensor) -> None:
        table = self.owner._parameters if self.kind == "param" else self.owner._buffers
        table[self.name] = tensor

    def current(self) -> torch.Tensor:
        table = self.owner._parameters if self.kind == "param" else self.owner._buffers
        return table[self.name]


class BlockSwapper:
    """Keep the frozen weights of the last ``blocks_to_swap`` blocks off the accelerator.

    ``module`` must already have its trainable parameters (LoRA) in place. Everything that is
    not swapped is moved to ``onload_device``; the swapped blocks' frozen tensors go to pinned
    ``offload_device`` memory. ``stream_ordered=False`` allocates the copies on the side stream
    instead (the first design, kept to measure against). :attr:`trace` records ``(event, block index)`` when
    ``record=True`` (``onload``, ``prefetch``, ``release``) for tests and debugging.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        blocks_to_swap: int,
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device = "cpu",
        block_lists: Sequence[str] | None = None,
        prefetch: int = 1,
        pin_memory: bool | None = None,
        use_stream: bool | None = None,
        stream_ordered: bool = True,
        record: bool = False,
    ) -> None:
        import torch

        from tune_offload.strategies import OffloadConfigError

        self.module = module
        self.onload_device = torch.device(onload_device)
        if self.onload_device.type == "cuda" and self.onload_device.index is None:
            self.onload_device = torch.device("cuda", torch.cuda.current_device())
        self.offload_device = torch.device(offload_device)
        accelerator = self.onload_device.type == "cuda"
        self.use_stream = accelerator if use_stream is None else use_stream
        if self.use_stream and not accelerator:
            raise OffloadConfigError("block swap streams need a CUDA onload device")
        pin = accelerator and self.offload_device.type == "cpu" if pin_memory is None else pin_memory
        self.blocks = [block for _, block in find_blocks(module, block_lists)]
        self.block_names = [name for name, _ in find_blocks(module, block_lists)]
        if not self.blocks:
            raise OffloadConfigError(f"block swap found no transformer blocks (ModuleList) on {type(module).__name__}")
        if not 0 < blocks_to_swap < len(self.blocks) + 1:
            raise OffloadConfigError(
                f"musubi_blocks_to_swap must be between 1 and the model's {len(self.blocks)} blocks, "
                f"got {blocks_to_swap}"
            )
        if prefetch < 0:
            raise OffloadConfigError(f"block swap prefetch must be >= 0, got {prefetch}")
        self.prefetch_depth = prefetch
        self.stream_ordered = stream_ordered
        self.first_swapped = len(self.blocks) - blocks_to_swap
        self.swapped = list(range(self.first_swapped, len(self.blocks)))
        self.trace: list[tuple[str, int]] | None = [] if record else None
        self.stream = torch.cuda.Stream(self.onload_device) if self.use_stream else None

        # Everything outside the swapped blocks (and their trainable tensors) goes to the
        # accelerator; the swapped blocks' frozen tensors to (pinned) offload memory.
        swapped_ids = {id(self.blocks[i]) for i in self.swapped}
        self.slots: dict[int, list[_Slot]] = {i: [] for i in self.swapped}
        for i in self.swapped:
            for owner in self.blocks[i].modules():
                for name, p in list(owner._parameters.items()):
                    if p is None:
                        continue
                    if p.requires_grad:  # trainable (LoRA): stays on the accelerator, same object
                        _move_in_place(owner, name, p, self.onload_device)
                        continue
                    slot = _Slot(owner, name, "param", p, self.offload_device, pin)
                    slot.put(slot.offloaded)
                    self.slots[i].append(slot)
                for name, b in list(owner._buffers.items()):
                    if b is None:
                        continue
                    slot = _Slot(owner, name, "buffer", b, self.offload_device, pin)
                    slot.put(slot.offloaded)
                    self.slots[i].append(slot)
        _move_except(module, swapped_ids, self.onload_device)

        self.resident: dict[int, Any] = {}  # block index -> the event its copy finishes with
        self._handles = []
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(index)))
        module._tune_block_swap = self
        log.info("block swap: %d of %d blocks (%s .. %s) stream from %s", blocks_to_swap,
                 len(self.blocks), self.block_names[self.first_swapped], self.block_names[-1],
                 self.offload_device)

    # ------------------------------------------------------------------ moving
    def _record(self, event: str, index: int) -> None:
        if self.trace is not None:
            self.trace.append((event, index))

    def _onload(self, index: int, *, prefetch: bool) -> None:
        """Copy block ``index``'s frozen tensors to the accelerator (on the side stream)."""
        import torch

        if index in self.resident:
            return
        self._record("prefetch" if prefetch else "onload", index)
        slots = self.slots[index]
        compute = torch.cuda.current_stream(self.onload_device) if self.use_stream else None
        if self.stream is not None and self.stream_ordered:
            # Allocated on the compute stream (see "stream-ordered" above): the allocator may hand
            # out memory that kernels queued on the compute stream still read, so the side stream
            # waits for them before writing.
            copies = [[torch.empty_like(leaf, device=self.onload_device) for leaf in slot.cpu_leaves]
                      for slot in slots]
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                for slot, leaves in zip(slots, copies):
                    for leaf, source in zip(leaves, slot.cpu_leaves):
                        leaf.copy_(source, non_blocking=True)
                    slot.put(slot._wrap(_rebuild(slot.recipe, leaves)))
                event = torch.cuda.Event()
                event.record(self.stream)
        elif self.stream is not None:
            # Side-stream allocation (``stream_ordered=False``, kept for comparison): no wait, but
            # a released copy's memory comes back only once the GPU has passed its last use.
            with torch.cuda.stream(self.stream):
                for slot in slots:
                    leaves = [leaf.to(self.onload_device, non_blocking=True) for leaf in slot.cpu_leaves]
                    for leaf in leaves:
                        leaf.record_stream(compute)
                    slot.put(slot._wrap(_rebuild(slot.recipe, leaves)))
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            for slot in slots:
                leaves = [leaf.to(self.onload_device, copy=True) for leaf in slot.cpu_leaves]
                slot.put(slot._wrap(_rebuild(slot.recipe, leaves)))
            event = None
        self.resident[index] = event

    def _release(self, index: int) -> None:
        event = self.resident.pop(index, _ABSENT)
        if event is _ABSENT:
            return
        self._record("release", index)
        if event is not None and self.stream_ordered:
            # A prefetched copy may be dropped before any kernel waited for it: order the free
            # (on the compute stream) after the copy, or the memory could be reused mid-copy.
            import torch

            torch.cuda.current_stream(self.onload_device).wait_event(event)
        for slot in self.slots[index]:
            if slot.offloaded.device != self.offload_device:  # someone called module.to(...)
                slot.offloaded = slot._wrap(_rebuild(slot.recipe, slot.cpu_leaves))
            slot.put(slot.offloaded)

    def release_all(self) -> None:
        """Send every swapped block back to offload memory (after a step, before saving)."""
        for index in list(self.resident):
            self._release(index)

    def _backward_now(self) -> bool:
        import torch

        try:
            return torch._C._current_graph_task_id() != -1
        except AttributeError:  # pragma: no cover - older torch
            return False

    def _wanted(self, index: int) -> list[int]:
        """The swapped blocks to have on the accelerator while block ``index`` runs."""
        step = -1 if self._backward_now() else 1
        wanted = [index] if index in self.slots else []
        nxt = index
        for _ in range(self.prefetch_depth):
            nxt += step
            if nxt in self.slots:
                wanted.append(nxt)
        return wanted

    def _make_pre_hook(self, index: int):
        def pre_hook(block, args):
            import torch

            wanted = self._wanted(index)
            for other in [i for i in self.resident if i not in wanted]:
                self._release(other)
            if index in self.slots:
                self._onload(index, prefetch=False)
                event = self.resident[index]
                if event is not None:
                    torch.cuda.current_stream(self.onload_device).wait_event(event)
            for ahead in wanted[1:] if index in self.slots else wanted:
                self._onload(ahead, prefetch=True)
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(block, args, output):
            if index not in self.slots:
                return None
            import torch

            # The last block of a training forward runs first in backward (recomputed under
            # checkpointing): keep it rather than copy it twice.
            last = index == len(self.blocks) - 1
            if last and torch.is_grad_enabled() and not self._backward_now():
                return None
            if self._backward_now():
                # The block's backward comes next and may run parts of it again (a checkpointed
                # MLP slice, enable_chunked_feed_forward): keep its weights in place; autograd
                # holds them until then anyway, so this costs no memory. The next block's
                # pre-hook releases it.
                return None
            self._release(index)
            return None

        return post_hook

    def remove(self) -> None:
        """Undo: hooks removed, every swapped tensor back on the onload device."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release_all()
        for slots in self.slots.values():
            for slot in slots:
                slot.put(slot._wrap(_rebuild(slot.recipe, [leaf.to(self.onload_device) for leaf in slot.cpu_leaves])))
        self.module.__dict__.pop("_tune_block_swap", None)


def _move_in_place(owner: torch.nn.Module, name: str, p: torch.Tensor, device: torch.device) -> None:
    """Move parameter ``name`` of ``owner`` to ``device`` keeping the Parameter object (an
    optimizer or trainer may already hold it)."""
    import torch

    if p.device == device:
        return
    if type(p) in (torch.Tensor, torch.nn.Parameter):
        p.data = p.data.to(device)
    else:  # a tensor subclass: ``.data =`` cannot change its type's layout, so swap the tensors
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad))


def _contains(module: torch.nn.Module, ids: set[int]) -> bool:
    return any(id(m) in ids for m in module.modules())


def _move_except(module: torch.nn.Module, skip: set[int], device: torch.device) -> None:
    """``module.to(device)`` for every tensor outside the modules whose id is in ``skip``."""
    for child in module.children():
        if id(child) in skip:
            continue
        if _contains(child, skip):
            _move_except(child, skip, device)
        else:
            child.to(device)
    for name, p in list(module._parameters.items()):
        if p is not None:
            _move_in_place(module, name, p, device)
    for name, b in list(module._buffers.items()):
        if b is not None and b.device != device:
            module._buffers[name] = b.to(device)


def block_swapper(module: Any) -> BlockSwapper | None:
    """The :class:`BlockSwapper` installed on ``module``, or ``None``."""
    return getattr(module, "_tune_block_swap", None)


class BlockSwapStrategy:
    """``block_swap``: musubi-style block swap of the last ``musubi_blocks_to_swap`` blocks.

    Call it on the transformer *after* quantisation, gradient checkpointing and the training LoRA
    are in place, instead of ``transformer.to(device)``: it moves what is not swapped itself.
    On a CPU onload device it is a logged no-op.
    """

    def apply(
        self,
        module: torch.nn.Module,
        settings: OffloadSettings,
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device | None = None,
    ) -> torch.nn.Module:
        import torch

        device = torch.device(onload_device)
        if settings.musubi_blocks_to_swap == 0:
            return module
        if device.type == "cpu":
            log.warning("musubi_blocks_to_swap=%d ignored: the model runs on the CPU, there is no "
                        "accelerator memory to save", settings.musubi_blocks_to_swap)
            return module
        if device.type != "cuda":
            from tune_offload.strategies import OffloadConfigError

            raise OffloadConfigError(f"block swap needs a CUDA device, the model runs on {device.type!r}")
        if not getattr(module, "gradient_checkpointing", True):
            log.warning("block swap without gradient checkpointing saves little: autograd keeps "
                        "each swapped block's weights until backward. Enable gradient_checkpointing.")
        BlockSwapper(
            module,
            settings.musubi_blocks_to_swap,
            onload_device=device,
            offload_device=settings.musubi_block_swap_device,
        )
        return module


BLOCK_SWAP = BlockSwapStrategy()
