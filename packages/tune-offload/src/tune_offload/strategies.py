"""Offload settings (SimpleTuner's keys) and the strategies that act on them.

Offloading keeps most of a model's weights in CPU memory (or on disk) and moves each part onto
the accelerator just before it runs. The settings mirror SimpleTuner's config keys so an existing
``config.json`` means the same thing here. Strategies are plugins
(``tune_register_offload_strategies``); tune's own are ``group`` (diffusers' group offloading, for
a model), ``model_cpu`` (diffusers' model CPU offload, for a pipeline) and ``block_swap``
(musubi-style block swap for training, :mod:`tune_offload.block_swap`) and ``ramtorch``
(CPU-resident linears, :mod:`tune_offload.ram_linear`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    import torch

GROUP_OFFLOAD_TYPES = ("block_level", "leaf_level")


class OffloadConfigError(ValueError):
    """Offload settings that contradict each other or cannot run on this machine."""


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise OffloadConfigError(f"{attribute.name} must be >= 1, got {value}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise OffloadConfigError(f"{attribute.name} must be >= 0, got {value}")


def _percent(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= 100:
        raise OffloadConfigError(f"{attribute.name} must be between 0 and 100, got {value}")


def _offload_type(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in GROUP_OFFLOAD_TYPES:
        raise OffloadConfigError(
            f"{attribute.name} must be one of {', '.join(GROUP_OFFLOAD_TYPES)}, got {value!r}"
        )


@attrs.define
class OffloadSettings:
    """How (and whether) the denoiser's weights leave the accelerator between uses."""

    enable_group_offload: bool = False
    """Offload groups of layers to the CPU and bring each back just before it runs (diffusers'
    group offloading). Saves most of the model's accelerator memory; costs transfer time."""
    group_offload_type: str = attrs.field(default="block_level", validator=_offload_type)
    """``block_level``: move ``group_offload_blocks_per_group`` transformer blocks at a time (the
    children of each ``ModuleList``/``Sequential``); ``leaf_level``: move each leaf layer on its
    own (least memory, most transfers)."""
    group_offload_blocks_per_group: int = attrs.field(default=1, validator=_positive)
    """Blocks moved together with ``block_level``; more is faster and uses more memory."""
    group_offload_use_stream: bool = False
    """Overlap the next group's transfer with the current group's compute on a side stream.
    Needs an accelerator with streams (CUDA); uses a little more memory, hides most transfer time."""
    group_offload_to_disk_path: str | None = None
    """Offload to safetensors files in this folder instead of CPU memory (for machines short of
    RAM). ``None`` keeps offloaded weights in CPU memory."""
    enable_model_cpu_offload: bool = False
    """Keep each pipeline component on the CPU until it is called (diffusers' model CPU offload).
    Applies to a pipeline (validation), not to the model being trained."""
    musubi_blocks_to_swap: int = attrs.field(default=0, validator=_non_negative)
    """Block swap for training (``block_swap`` strategy): the frozen weights of the last N
    transformer blocks live in pinned CPU memory and stream onto the GPU for forward and (with
    gradient checkpointing) backward, overlapped with compute on a side stream. 0 turns it off.
    Trainable LoRA weights stay on the GPU. A no-op when training on the CPU."""
    musubi_block_swap_device: str = "cpu"
    """Where swapped blocks live between uses (``cpu``)."""
    offload_checkpointed_activations: bool = False
    """With gradient checkpointing, keep each block's saved input in pinned CPU memory until
    backward recomputes the block (:func:`tune_offload.activations.offloaded_checkpoint`). Saves
    about 0.9 GiB on Z-Image at 1024 px for under 2 % of step time. Needs CUDA to save anything;
    on the CPU it only changes how checkpointing is done."""

    ramtorch: bool = False
    """Keep the frozen weights of the transformer's linears in pinned CPU memory and copy each
    onto the GPU only while it runs, in forward and again in backward (``ramtorch`` strategy,
    :mod:`tune_offload.ram_linear`). Saves nearly all the weight memory without gradient
    checkpointing; costs one PCIe transfer per layer per pass. Trainable (LoRA) weights stay on
    the GPU. CUDA only; a no-op when training on the CPU."""
    ramtorch_target_modules: str | None = None
    """Comma-separated ``fnmatch`` globs on the dotted module name or class name that limit which
    linears ``ramtorch`` takes (``transformer_blocks.*``; a name without a wildcard also matches
    everything under it). ``None``: every frozen linear."""
    ramtorch_transformer_percent: float = attrs.field(default=100.0, validator=_percent)
    """Share (0-100) of the matching linears ``ramtorch`` takes, first in module order; the rest
    stay on the GPU (faster). Rounded up to whole layers."""

    def gradient_checkpointing_func(self) -> Any:
        """The ``gradient_checkpointing_func`` to pass to diffusers'
        ``enable_gradient_checkpointing``, or ``None`` for its default."""
        if not self.offload_checkpointed_activations:
            return None
        from tune_offload.activations import offloaded_checkpoint

        return offloaded_checkpoint

    def __attrs_post_init__(self) -> None:
        if self.musubi_blocks_to_swap and self.enable_group_offload:
            raise OffloadConfigError(
                "musubi_blocks_to_swap and enable_group_offload are mutually exclusive: both "
                "decide where the transformer's weights live between uses. Use "
                "musubi_blocks_to_swap for training with gradient checkpointing."
            )
        if self.enable_group_offload and self.enable_model_cpu_offload:
            raise OffloadConfigError(
                "enable_group_offload and enable_model_cpu_offload are mutually exclusive: both "
                "decide where the weights live between calls. Keep enable_group_offload for "
                "training a large model; enable_model_cpu_offload only moves whole components."
            )

        for other in ("enable_group_offload", "musubi_blocks_to_swap"):
            if self.ramtorch and getattr(self, other):
                raise OffloadConfigError(
                    f"ramtorch and {other} are mutually exclusive: both decide where the "
                    "transformer's frozen weights live between uses. Use one of them."
                )

    def for_training(self, module: torch.nn.Module) -> OffloadSettings:
        """These settings for a module that is trained through (backward runs through it).

        diffusers' group offloading moves a group's weights with ``param.data = ...`` after the
        group ran, and that also moves the tensors autograd saved in forward: every backward on a
        GPU then fails with "Expected all tensors to be on the same device" (diffusers' own
        training test of it, huggingface/diffusers#11515, fails so; SimpleTuner's
        ``enable_group_offload`` training hits it too). For training, ``enable_group_offload``
        therefore runs as the strategy that keeps the same weights off the accelerator and
        works in backward: ``block_level`` as block swap of every block (:mod:`tune_offload.
        block_swap`; one block is streamed in while the one before computes, so
        ``group_offload_blocks_per_group`` and ``group_offload_use_stream`` have no counterpart),
        ``leaf_level`` (or a model without block lists) as ``ramtorch``, each linear's frozen
        weights streamed in forward and backward. Other settings are returned as they are.
        """
        if not self.enable_group_offload:
            return self
        import logging

        from tune_offload.block_swap import find_blocks

        blocks = find_blocks(module) if self.group_offload_type == "block_level" else []
        if blocks:
            settings = attrs.evolve(self, enable_group_offload=False, musubi_blocks_to_swap=len(blocks))
            instead = f"block swap of all {len(blocks)} blocks (musubi_blocks_to_swap: {len(blocks)})"
        else:
            settings = attrs.evolve(self, enable_group_offload=False, ramtorch=True)
            instead = "ramtorch (each linear's frozen weights streamed in forward and backward)"
        logging.getLogger(__name__).warning(
            "enable_group_offload (%s) on the model being trained runs as %s: diffusers' group "
            "offloading moves the weights autograd saved for backward, which fails on a GPU. "
            "Trainable weights (LoRA, or a full fine-tune's) stay on the accelerator.",
            self.group_offload_type, instead,
        )
        return settings

    @property
    def strategy(self) -> str | None:
        """The built-in strategy these settings ask for, or ``None`` for no offloading."""
        if self.ramtorch:
            return "ramtorch"
        if self.musubi_blocks_to_swap:
            return "block_swap"
        if self.enable_group_offload:
            return "group"
        if self.enable_model_cpu_offload:
            return "model_cpu"
        return None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OffloadSettings:
        """Settings from a (SimpleTuner-style) config mapping; other keys are ignored.

        Keys may carry SimpleTuner's leading ``--``.
        """
        names = {field.name for field in attrs.fields(cls)}
        picked = {}
        for key, value in config.items():
            name = key[2:] if key.startswith("--") else key
            if name in names:
                picked[name] = value
        return cls(**picked)

    def check_device(self, onload_device: str | torch.device) -> None:
        """Raise :class:`OffloadConfigError` if these settings cannot run with ``onload_device``."""
        import torch

        device = torch.device(onload_device)
        accelerator = device.type not in ("cpu", "meta")
        if self.enable_group_offload and self.group_offload_use_stream and not accelerator:
            raise OffloadConfigError(
                "group_offload_use_stream needs an accelerator (a CUDA GPU) to overlap transfers "
                f"with compute, but the model runs on {device.type!r}. Set "
                "group_offload_use_stream to false."
            )
        if self.ramtorch and device.type not in ("cpu", "meta", "cuda"):
            raise OffloadConfigError(
                f"ramtorch streams weights on CUDA streams, but the model runs on {device.type!r}. "
                "Set ramtorch to false."
            )
        if self.enable_model_cpu_offload and not accelerator:
            raise OffloadConfigError(
                "enable_model_cpu_offload needs an accelerator to move components onto, but the "
                f"model runs on {device.type!r}. Set enable_model_cpu_offload to false."
            )


@runtime_checkable
class OffloadStrategy(Protocol):
    """What a registered offload strategy provides."""

    def apply(
        self,
        module: torch.nn.Module,
        settings: OffloadSettings,
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device = "cpu",
    ) -> torch.nn.Module:
        """Install the offloading on ``module`` (in place) and return it."""


class GroupOffload:
    """``group``: diffusers' group offloading, on a diffusers model or any ``nn.Module``.

    ``block_level`` groups the children of each ``ModuleList``/``Sequential`` (the transformer
    blocks); the layers outside them are onloaded together when the model is called.
    """

    def apply(
        self,
        module: torch.nn.Module,
        settings: OffloadSettings,
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device = "cpu",
    ) -> torch.nn.Module:
        import torch

        settings.check_device(onload_device)
        kwargs: dict[str, Any] = dict(
            onload_device=torch.device(onload_device),
            offload_device=torch.device(offload_device),
            offload_type=settings.group_offload_type,
            use_stream=settings.group_offload_use_stream,
            offload_to_disk_path=settings.group_offload_to_disk_path,
        )
        if settings.group_offload_type == "block_level":
            kwargs["num_blocks_per_group"] = settings.group_offload_blocks_per_group
        if settings.group_offload_to_disk_path is not None:
            import os

            os.makedirs(settings.group_offload_to_disk_path, exist_ok=True)
        if hasattr(module, "enable_group_offload"):
            # A diffusers model: its method also checks the class supports group offloading.
            module.enable_group_offload(**kwargs)
        else:
            from diffusers.hooks import apply_group_offloading

            if settings.group_offload_type == "block_level":
                kwargs["block_modules"] = block_path(module) or None
            apply_group_offloading(module, **kwargs)
        return module


def block_path(module: torch.nn.Module) -> list[str]:
    """Names of the modules between ``module`` and its largest block list (``ModuleList`` or
    ``Sequential``, by parameter count), for diffusers' ``block_modules``.

    diffusers' ``block_level`` groups only the block lists that are direct children; anything
    else moves as one group. A transformers text encoder often keeps its blocks deeper
    (``text_model.encoder.layers`` in CLIP, ``encoder.block`` in T5,
    ``model.language_model.layers`` in Mistral 3), so without this path it would move whole.
    Empty when the largest list is a direct child (or there is none)."""
    import torch

    best, best_size = "", 0
    for name, child in module.named_modules():
        if name and isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            size = sum(p.numel() for p in child.parameters())
            if size > best_size:
                best, best_size = name, size
    return best.split(".")[:-1]


class ModelCpuOffload:
    """``model_cpu``: diffusers' model CPU offload on a pipeline (each component moves as a whole)."""

    def apply(
        self,
        module: Any,
        settings: OffloadSettings,
        *,
        onload_device: str | torch.device,
        offload_device: str | torch.device = "cpu",
    ) -> Any:
        if not hasattr(module, "enable_model_cpu_offload"):
            raise OffloadConfigError(
                "enable_model_cpu_offload applies to a diffusers pipeline (it moves whole "
                f"components between calls), not to a {type(module).__name__}. To offload one "
                "model, use enable_group_offload."
            )
        settings.check_device(onload_device)
        module.enable_model_cpu_offload(device=onload_device)
        return module


GROUP = GroupOffload()
MODEL_CPU = ModelCpuOffload()


def is_offloaded(module: Any) -> bool:
    """Whether any tune offloading (group offload or block swap) is installed on ``module``.

    A trainer skips ``module.to(device)`` (and accelerate's device placement) when this is true.
    """
    from tune_offload.block_swap import block_swapper
    from tune_offload.ram_linear import ram_linears

    return (block_swapper(module) is not None or ram_linears(module) is not None
            or is_group_offloaded(module))


def is_group_offloaded(module: Any) -> bool:
    """Whether diffusers' group offloading hooks are installed on ``module``.

    A trainer uses this to avoid ``module.to(device)``, which would defeat (and, with hooks on,
    confuse) the offloading.
    """
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:  # diffusers moved its private helper: look for the hook registry instead
        return any(hasattr(m, "_diffusers_hook") for m in module.modules())
    return bool(_is_group_offload_enabled(module))


def apply_offload(
    module: Any,
    settings: OffloadSettings,
    *,
    onload_device: str | torch.device,
    offload_device: str | torch.device = "cpu",
    strategy: str | None = None,
) -> Any:
    """Apply the offloading ``settings`` ask for (or the registered ``strategy`` named) to ``module``.

    With no strategy named and nothing enabled in ``settings``, ``module`` is returned unchanged.
    An unknown strategy name lists the registered ones.
    """
    name = strategy or settings.strategy
    if name is None:
        return module
    from tune_offload.registry import offload_strategies

    implementation = offload_strategies.load(name)
    return implementation.apply(
        module, settings, onload_device=onload_device, offload_device=offload_device
    )
