"""Quantisation presets: the contract, layer selection, and :func:`quantise`.

A preset (``base_model_precision`` in a config) turns the frozen base model's ``nn.Linear``
weights into low-precision ones so a LoRA can be trained on a model that would not fit otherwise.
Presets come from plugins (``tune_register_quantisers``); tune's own live in
``tune_quant.torchao_presets``, ``tune_quant.bnb_presets`` and ``tune_quant.quanto_presets``.

Two rules hold for every built-in preset:

- ``check(device)`` runs *before* any weight is touched and says exactly what is missing (a
  library and its install command, or the hardware) and which preset would work on this machine,
  so a run fails in its first second rather than after loading 20 GB.
- ``apply`` leaves precision-sensitive layers alone: LoRA layers, anything whose name contains a
  caller's ``exclude`` substring, and, by default, the top-level embedders, norms and output
  projection (see :func:`default_skip`). They are small, and quantising them costs quality.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class QuantisationUnavailable(RuntimeError):
    """A preset cannot run here: a library is missing or the hardware cannot do it."""


@runtime_checkable
class Quantiser(Protocol):
    """What a registered quantisation preset provides."""

    name: str
    """The preset name users write (``int8-torchao``)."""

    def check(self, device: str) -> None:
        """Raise :class:`QuantisationUnavailable` if this preset cannot run on ``device``."""

    def apply(self, module: torch.nn.Module, *, exclude: Sequence[str] = ()) -> torch.nn.Module:
        """Quantise ``module``'s selected Linear weights in place and return the module."""

    # Optional, for ``quantize_via: pipeline`` (see :mod:`tune_quant.pipeline`):
    # ``pipeline_config(skeleton, *, dtype, exclude=()) -> diffusers quantization config`` for the
    # layers ``apply`` would quantise in ``skeleton`` (the model built empty, on the meta device);
    # ``pipeline_problem(device) -> str | None`` for what the diffusers loader needs beyond ``check``.


#: Top-level child names containing one of these stay unquantised by default: timestep/text/patch
#: embedders and norms (Flux's ``time_text_embed``, ``x_embedder``, ``norm_out``; Z-Image's
#: ``t_embedder``, ``cap_embedder``) and final layers (``final_layer``).
DEFAULT_SKIP_SUBSTRINGS = ("embed", "norm", "final")
#: Top-level children with exactly these names stay unquantised by default (input/output
#: projections).
#: Only the top level: Flux's single blocks have their own ``proj_out`` which *is* quantised.
DEFAULT_SKIP_NAMES = ("proj_out", "proj_in")


def default_skip(name: str) -> bool:
    """Whether the layer at dotted path ``name`` is one tune leaves in full precision by default."""
    parts = name.split(".")
    top = parts[0]
    if any(part.startswith("lora_") for part in parts):  # an adapter trained on top
        return True
    return top in DEFAULT_SKIP_NAMES or any(s in top for s in DEFAULT_SKIP_SUBSTRINGS)


def is_excluded(name: str, exclude: Sequence[str] = ()) -> bool:
    """Whether a layer stays unquantised: a default skip or a caller's substring match."""
    return default_skip(name) or any(sub and sub in name for sub in exclude)


def selected_linears(
    module: torch.nn.Module,
    exclude: Sequence[str] = (),
    compatible: Callable[[torch.nn.Linear], bool] | None = None,
) -> Iterator[tuple[str, torch.nn.Linear]]:
    """``(name, layer)`` for each plain ``nn.Linear`` a preset should quantise."""
    import torch

    if isinstance(exclude, str):  # one name, not a sequence of characters
        exclude = (exclude,)

    for name, child in module.named_modules():
        if type(child) is not torch.nn.Linear:  # subclasses (bnb, LoRA wrappers) are left alone
            continue
        if is_excluded(name, exclude):
            continue
        if compatible is not None and not compatible(child):
            log.info("leaving %s unquantised: its shape %s does not suit the preset", name,
                     tuple(child.weight.shape))
            continue
        yield name, child


def require(import_name: str, install: str, preset: str) -> str | None:
    """``None`` if ``import_name`` imports, else the message saying how to install it."""
    try:
        importlib.import_module(import_name)
    except ImportError as exc:
        return f"{preset} needs the {import_name!r} library ({exc}). Install it: {install}"
    return None


def device_problem(
    device: str,
    preset: str,
    *,
    cuda_capability: tuple[int, int] | None = None,
    cuda_only: bool = False,
) -> str | None:
    """A message if ``device`` cannot run ``preset`` (no CUDA, too old a GPU), else ``None``.

    ``cuda_capability`` implies ``cuda_only``: fp8 kernels exist only on Ada/Hopper and newer.
    """
    import torch

    dev = torch.device(device)
    need = ""
    if cuda_capability is not None:
        need = f" of compute capability >= {cuda_capability[0]}.{cuda_capability[1]} (Ada/Hopper)"
    if dev.type != "cuda":
        if cuda_only or cuda_capability is not None:
            return f"{preset} needs a CUDA GPU{need}; the device here is {dev.type!r}"
        return None
    if not torch.cuda.is_available():
        return f"{preset} was asked to run on {device!r}, but torch sees no CUDA GPU"
    if cuda_capability is not None:
        have = torch.cuda.get_device_capability(dev)
        if have < cuda_capability:
            return (
                f"{preset} needs a GPU{need}; this one ({torch.cuda.get_device_name(dev)}) has "
                f"compute capability {have[0]}.{have[1]}"
            )
    return None


#: Presets tried, in order, when an error names one that would work on this machine.
FALLBACKS = ("int8-torchao", "int8-bnb", "int8-quanto", "no_change")


def suggest(device: str, *, not_this: str) -> str:
    """The first of :data:`FALLBACKS` (other than ``not_this``) whose check passes on ``device``."""
    from tune_quant.registry import quantisers

    for name in FALLBACKS:
        if name == not_this or name not in quantisers:
            continue
        candidate = quantisers.load(name)
        probe = getattr(candidate, "problem", None)
        if probe is not None:  # built-ins: ask without raising (and without suggesting in turn)
            if probe(device) is None:
                return name
            continue
        try:
            candidate.check(device)
        except QuantisationUnavailable:
            continue
        return name
    return "no_change"


class BasePreset:
    """Shared ``check`` for the built-ins: subclasses say what they need in :meth:`problem`."""

    name = "?"

    def problem(self, device: str) -> str | None:  # pragma: no cover - overridden
        return None

    def check(self, device: str) -> None:
        message = self.problem(str(device))
        if message:
            alternative = suggest(str(device), not_this=self.name)
            raise QuantisationUnavailable(
                f"{message}. A preset that works on {str(device)!r}: {alternative!r}."
            )

    def __repr__(self) -> str:
        return f"<quantiser {self.name}>"


class NoChange(BasePreset):
    """``no_change``: keep the weights as they are (the default ``base_model_precision``)."""

    name = "no_change"

    def apply(self, module: torch.nn.Module, *, exclude: Sequence[str] = ()) -> torch.nn.Module:
        return module


NO_CHANGE = NoChange()


def quantise(
    module: torch.nn.Module,
    preset: str,
    *,
    device: str = "cpu",
    exclude: Sequence[str] = (),
) -> torch.nn.Module:
    """Quantise ``module`` with the registered ``preset`` after checking it can run on ``device``.

    An unknown name raises an error listing the registered presets.
    """
    from tune_quant.registry import quantisers

    quantiser = quantisers.load(preset)
    quantiser.check(str(device))
    return quantiser.apply(module, exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude))
