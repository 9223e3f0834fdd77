"""Where a run's checkpoints come from, answered without torch (``tune check`` and the model card
ask too).

``pretrained_model_name_or_path`` may name one checkpoint *file* (a ComfyUI / BFL / civitai
``.safetensors``): that file is the denoiser, and every other component (VAE, text encoders,
tokenizers, the denoiser's config) comes from the flavour's default repository. Whatever shows
the run's base model must then name that repository, not the file: a pipeline cannot be loaded
from a transformer file.
"""

from __future__ import annotations

from pathlib import Path

import attrs

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".gguf")
"""File names diffusers' ``from_single_file`` reads (a local file or a hub file URL)."""


def is_single_file(location: str | None) -> bool:
    """Whether ``location`` names one checkpoint file rather than a folder or repository: a local
    file, or a path or URL ending in a checkpoint suffix."""
    if not location:
        return False
    return Path(location).is_file() or str(location).lower().endswith(SINGLE_FILE_SUFFIXES)


@attrs.frozen
class BaseCheckpoint:
    """The checkpoint a run's pipeline is built from, and the denoiser file that replaces its own."""

    base: str
    """Hub id or folder every component but a single-file denoiser comes from."""
    transformer_file: str | None = None
    """The single file ``pretrained_model_name_or_path`` named, loaded as the denoiser; ``None``
    when it named a folder or repository (or nothing)."""


def base_checkpoint(pretrained: str | None, flavour_default: str) -> BaseCheckpoint:
    """What ``pretrained_model_name_or_path`` (``None``: the flavour's default) means for the base
    model: the flavour's repository plus the file when it names a single file, else itself."""
    location = pretrained or flavour_default
    if is_single_file(location):
        return BaseCheckpoint(base=flavour_default, transformer_file=location)
    return BaseCheckpoint(base=location)
