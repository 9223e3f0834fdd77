"""What a finished run hands to exporters and publishers.

tune-train does not write the final adapter file or the model card itself: DESIGN puts export
and publishing in tune-publish, attached through the ``tune_train_end`` lifecycle hook. The loop
builds one :class:`TrainedAdapter` and every exporter (tune-publish's built-in, or a plugin that
writes another format) reads it, so none of them needs to know the trainer's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch


@attrs.frozen
class TrainedAdapter:
    """A trained adapter (or fully fine-tuned transformer) and everything needed to save, describe and publish it."""

    state_dict: dict[str, torch.Tensor]
    """The adapter in the diffusers/PEFT key layout (``transformer.<module>.lora_A.weight``)."""
    header: dict[str, str]
    """safetensors header entries the loaders need (diffusers' ``lora_adapter_metadata``: alpha)."""
    output_dir: Path
    """The run's ``output_dir``: where the adapter file and model card go."""
    family: str
    """Model family name (``z-image``)."""
    flavour: str
    """Flavour trained (``turbo``)."""
    base_model: str
    """Hub id or path of the base checkpoint, for the model card and loading snippet."""
    lora_format: str
    """``diffusers`` or ``comfyui``: the key layout of the exported file."""
    to_comfyui: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    """The family's converter to ComfyUI key names (alpha already bound), when it has one."""
    step: int
    """Optimizer steps trained."""
    settings: dict[str, Any]
    """The training settings worth showing on a model card."""
    validation_images: list[tuple[str, str]]
    """(prompt, path relative to ``output_dir``): final images first, then before-training ones."""
    ema_state_dict: dict[str, torch.Tensor] | None = None
    """The EMA weights (``use_ema``) in the same layout as ``state_dict``; the trainer also writes
    them as ``pytorch_lora_weights_ema.safetensors`` (output ``lora_ema``). None without EMA."""
    adapter_type: str = "lora"
    """What ``state_dict`` holds: ``lora`` (PEFT/diffusers keys, DoRA included), ``lycoris`` (the
    lycoris-lora library's own keys, ``lycoris_<module>.<weight>``) or ``full`` (every weight of
    the transformer, diffusers names, written as a ``transformer/`` model folder)."""
    model_config: dict[str, Any] | None = None
    """For ``full``: the transformer's diffusers ``config.json`` content. None otherwise."""
