"""CPU-resident linears (SimpleTuner's ``ramtorch`` options), the ``ramtorch`` strategy.

The frozen weight (and bias) of each chosen ``nn.Linear`` lives in pinned CPU memory for the
whole run. Every time the layer runs, forward or backward, its weight is copied onto the
accelerator (on a side CUDA stream), used once and dropped; only activations and the trainable
LoRA adapters stay on the GPU. Unlike block swap this works per layer and does not need
gradient checkpointing: the layer's autograd function saves nothing but a reference to the CPU
weight, and copies it again for backward.

Design decisions, and why:

- **Own core, not the ``ramtorch`` package.** ``ramtorch`` (PyPI, 1.11) replaces ``nn.Linear``
  with its own class, which PEFT no longer recognises as a LoRA target, keeps its ping-pong
  buffers CUDA-only (so nothing of it can be tested on a CPU machine), and knows nothing of
  torchao's quantised weight subclasses. The core needed here is ~150 lines: a patched
  ``forward`` on the existing ``nn.Linear`` (so ``isinstance`` checks, PEFT's ``base_layer`` and
  ``state_dict`` keys are unchanged) and one autograd function.
- **Only frozen linears move.** A linear whose weight requires grad (LoRA A/B, a fully trained
  layer) is left where it is: its optimizer state and gradients would otherwise cross PCIe every
  step.
- **Which layers:** SimpleTuner's semantics. ``ramtorch_target_modules`` (comma-separated
  ``fnmatch`` globs on the dotted module name or the class name; a name without a wildcard also
  matches everything under it) narrows the candidates; ``ramtorch_transformer_percent`` then
  takes that share of them, first in module order.
- **Quantised weights** (torchao tensor subclasses) travel as their plain inner tensors and are
  rebuilt on the device (:mod:`tune_offload.block_swap`'s helpers); a weight whose quantisation
  state lives outside the tensor (bitsandbytes) is refused.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tune_offload.strategies import OffloadSettings

log = logging.getLogger(__name__)

_MARK = "_tune_ramtorch"
_RESIDENT = "_tune_ramtorch_resident"


def parse_patterns(value: str | Sequence[str] | None) -> list[str] | None:
    """``ramtorch_target_modules`` as a list of globs (``None``: every frozen linear)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = [item.strip() for item in items if item.strip()]
    return patterns or None


def _matches(name: str, cls_name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(cls_name, pattern):
            return True
        if fnmatch.fnmatchcase(name, pattern + ".*"):  # "transformer_blocks.0" means the block
            return True
    return False


def select_linears(
    module: torch.nn.Module,
    target_modules: str | Sequence[str] | None = None,
    percent: float = 100.0,
) -> list[tuple[str, torch.nn.Linear]]:
    """``(dotted name, linear)`` of the frozen ``nn.Linear`` s the ``ramtorch`` options choose.

    Candidates are frozen linears (weight without ``requires_grad``) matching ``target_modules``
    (all, when ``None``), in module order; ``percent`` of them (rounded up) are taken from the
    front.
    """
    import torch

    patterns = parse_patterns(target_modules)
    candidates = []
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.Linear) or child.weight.requires_grad:
            continue
        if patterns is not None and not _matches(name, type(child).__name__, patterns):
            continue
        candidates.append((name, child))
    take = math.ceil(len(candidates) * percent / 100.0)
    return candidates[:take]


class _Resident:
    """One chosen linear: its pinned CPU leaves and how to bring them onto the device."""

    def __init__(self, name: str, linear: torch.nn.Linear, device: torch.device,
                 offload_device: torch.device, use_stream: bool, stream: Any) -> None:
        import torch

        from tune_offload.block_swap import _leaves, _rebuild
        from tune_offload.strategies import OffloadConfigError

        self.name, self.linear, self.device = name, linear, device
        self.use_stream, self.stream = use_stream, stream
        self.transfers = 0
        self.originals: dict[str, Any] = {}
        self.parts: dict[str, tuple[Any, list[torch.Tensor]]] = {}
        pin = offload_device.type == "cpu" and torch.cuda.is_available()
        for key in ("weight", "bias"):
            tensor = linear._parameters.get(key)
            if tensor is None:
                continue
            try:
                recipe, leaves = _leaves(tensor)
            except OffloadConfigError:
                raise OffloadConfigError(
                    f"ramtorch cannot keep {name}.{key} (a {type(tensor).__name__}) in CPU memory: "
                    "its quantisation state lives outside the tensor. Use bf16/fp16 or a torchao "
                    "base_model_precision (e.g. int8-torchao), narrow ramtorch_target_modules, "
                    "or set ramtorch to false"
                ) from None
            moved = []
            for leaf in leaves:
                leaf = leaf.to(offload_device, copy=leaf.device != offload_device)
                if pin and not leaf.is_pinned():
                    leaf = leaf.pin_memory()
                moved.append(leaf)
            # The original object comes back on remove(), but only when it already lived in
            # offload memory: holding a GPU original would keep every "offloaded" weight on the
            # GPU (a model placed on the GPU before ramtorch saved nothing; found on the H100).
            self.originals[key] = tensor if tensor.device == offload_device else None
            self.parts[key] = (recipe, moved)
            linear._parameters[key] = torch.nn.Parameter(_rebuild(recipe, moved), requires_grad=False)
        self.quantised = self.parts["weight"][0] is not None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Resident:
        import copy

        clone = object.__new__(_Resident)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():  # the side stream is shared, not copied
            setattr(clone, key, value if key == "stream" else copy.deepcopy(value, memo))
        return clone

    def onload(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Device copies of the weight and bias, ready for use on the current stream."""
        import torch

        from tune_offload.block_swap import _rebuild

        self.transfers += 1
        out: dict[str, torch.Tensor] = {}
        if self.use_stream:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.stream):
                copies = {k: [leaf.to(self.device, non_blocking=True) for leaf in leaves]
                          for k, (_, leaves) in self.parts.items()}
            compute.wait_stream(self.stream)
            for leaves in copies.values():
                for leaf in leaves:
                    leaf.record_stream(compute)  # freed only after the compute stream is done
        else:
            copies = {k: [leaf.to(self.device, copy=True) for leaf in leaves]
                      for k, (_, leaves) in self.parts.items()}
        for key, leaves in copies.items():
            out[key] = _rebuild(self.parts[key][0], leaves)
        return out["weight"], out.get("bias")


def _linear_function():
    import torch

    class StreamedLinear(torch.autograd.Function):
        """``F.linear`` whose weight comes from CPU memory in forward and again in backward."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, resident: _Resident) -> torch.Tensor:
            weight, bias = resident.onload()
            ctx.resident = resident
            ctx.in_shape = x.shape
            return torch.nn.functional.linear(x, weight, bias)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
            if not ctx.needs_input_grad[0]:
                return None, None
            resident: _Resident = ctx.resident
            weight, _ = resident.onload()
            if not resident.quantised:
                return grad.matmul(weight.to(grad.dtype)), None
            # A quantised weight: let its subclass differentiate linear w.r.t. the input.
            with torch.enable_grad():
                probe = torch.zeros(ctx.in_shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
                (grad_x,) = torch.autograd.grad(torch.nn.functional.linear(probe, weight), probe, grad)
            return grad_x, None

    return StreamedLinear


def _streamed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _linear_function()
    return _FUNCTION.apply(x, self.__dict__[_RESIDENT])


_FUNCTION: Any = None


class CpuResidentLinears:
    """The installed ``ramtorch`` offloading of one module (``module._tune_ramtorch``).

    ``onload_device`` may be the CPU (synchronous copies, no streams): that is how the
    bookkeeping is tested; the strategy itself is a no-op on a CPU run.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        linears: list[tuple[str, torch.nn.Linear]],
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device = "cpu",
        use_stream: bool | None = None,
    ) -> None:
        import torch

        from tune_offload.block_swap import _move_except

        self.module = module
        self.onload_device = torch.device(onload_device)
        offload = torch.device(offload_device)
        if use_stream is None:
            use_stream = self.onload_device.type == "cuda"
        stream = torch.cuda.Stream(self.onload_device) if use_stream else None
        self.residents: list[_Resident] = []
        for name, linear in linears:
            resident = _Resident(name, linear, self.onload_device, offload, use_stream, stream)
            # The record lives on the linear itself, so a deep copy of the model streams the
            # copy's own weights.
            linear.__dict__[_RESIDENT] = resident
            linear.forward = types.MethodType(_streamed_forward, linear)
            self.residents.append(resident)
        _move_except(module, {id(linear) for _, linear in linears}, self.onload_device)
        module.__dict__[_MARK] = self

    @property
    def transfers(self) -> int:
        """Weight copies onto the device so far (one per layer per forward and per backward)."""
        return sum(r.transfers for r in self.residents)

    def cpu_bytes(self) -> int:
        """Bytes of weights kept in CPU memory instead of on the device."""
        return sum(leaf.numel() * leaf.element_size()
                   for r in self.residents for _, leaves in r.parts.values() for leaf in leaves)

    def remove(self) -> None:
        """Put every chosen linear's weight back on the device with its plain ``forward``."""
        import torch

        from tune_offload.block_swap import _move_in_place, _rebuild

        for resident in self.residents:
            linear = resident.linear
            linear.__dict__.pop("forward", None)
            linear.__dict__.pop(_RESIDENT, None)
            for key, original in resident.originals.items():
                if original is None:  # it lived on the device: rebuild it there from the CPU parts
                    recipe, leaves = resident.parts[key]
                    rebuilt = _rebuild(recipe, [leaf.to(self.onload_device) for leaf in leaves])
                    linear._parameters[key] = torch.nn.Parameter(rebuilt, requires_grad=False)
                    continue
                linear._parameters[key] = original
                _move_in_place(linear, key, original, self.onload_device)
        self.module.__dict__.pop(_MARK, None)


def ram_linears(module: Any) -> CpuResidentLinears | None:
    """The :class:`CpuResidentLinears` installed on ``module``, or ``None``."""
    return getattr(module, _MARK, None)


class RamTorchStrategy:
    """``ramtorch``: keep the frozen weights of the chosen linears in CPU memory.

    Call it on the transformer after quantisation and the training LoRA are in place, instead of
    ``transformer.to(device)``: it moves everything else itself. On a CPU run it is a logged no-op.
    """

    def choose(self, module: torch.nn.Module, settings: OffloadSettings) -> list[tuple[str, torch.nn.Linear]]:
        """The linears ``settings`` put in CPU memory; none matching a pattern is an error."""
        from tune_offload.strategies import OffloadConfigError

        linears = select_linears(module, settings.ramtorch_target_modules,
                                 settings.ramtorch_transformer_percent)
        if not linears and settings.ramtorch_transformer_percent > 0:
            raise OffloadConfigError(
                f"ramtorch found no frozen nn.Linear in {type(module).__name__} matching "
                f"ramtorch_target_modules={settings.ramtorch_target_modules!r}"
            )
        return linears

    def apply(
        self,
        module: torch.nn.Module,
        settings: OffloadSettings,
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device = "cpu",
    ) -> torch.nn.Module:
        import torch

        from tune_offload.strategies import OffloadConfigError

        device = torch.device(onload_device)
        if not settings.ramtorch:
            return module
        if device.type == "cpu":
            log.warning("ramtorch ignored: the model runs on the CPU, there is no accelerator "
                        "memory to save")
            return module
        if device.type != "cuda":
            raise OffloadConfigError(f"ramtorch needs a CUDA device, the model runs on {device.type!r}; "
                                     "set ramtorch to false")
        linears = self.choose(module, settings)
        if not linears:  # ramtorch_transformer_percent 0: everything stays on the GPU
            module.to(device)
            return module
        resident = CpuResidentLinears(module, linears, onload_device=device,
                                      offload_device=offload_device)
        log.info("ramtorch: %d linears (%.2f GiB) stay in CPU memory", len(linears),
                 resident.cpu_bytes() / 2**30)
        return module


RAMTORCH = RamTorchStrategy()
