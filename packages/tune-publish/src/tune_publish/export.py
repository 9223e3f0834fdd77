"""The built-in exporter: a finished run's LoRA file and model card.

It runs on tune-train's ``tune_train_end`` hook (registered in :mod:`tune_publish.builtins`) and
reads the run's ``TrainedAdapter`` (duck-typed here, so tune-publish never imports tune-train).
It runs first among ``tune_train_end`` implementations, so publishers that run after it find
the file and card in ``outputs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tune_publish.lora_file import LORA_WEIGHT_NAME, save_lora
from tune_publish.model_card import write_model_card
from tune_publish.modelspec import modelspec_metadata


#: ModelSpec architecture suffix and model-card title word per ``TrainedAdapter.adapter_type``.
_KINDS = {"lora": ("/lora", "LoRA"), "lycoris": ("/lycoris", "LyCORIS"), "full": ("", "fine-tune")}


def export_adapter(adapter: Any, *, adapter_id: str | None = None) -> dict[str, str]:
    """Write the run's weights and ``README.md``.

    ``adapter_id`` (the Hub repo a ``push_to_hub`` run uploads to) is what the card's usage
    snippet loads; without it the snippet shows a placeholder path.

    An adapter goes to ``pytorch_lora_weights.safetensors`` (diffusers or ComfyUI layout for a
    LoRA, the lycoris-lora library's own keys for LyCORIS); returns ``{"lora": path,
    "model_card": path}``. The file header carries the loaders' adapter metadata (alpha,
    LyCORIS settings) and ModelSpec provenance. A full fine-tune (``adapter_type == "full"``)
    goes to a diffusers model folder instead, named after the pipeline component it replaces
    (``transformer/``, ``unet/`` for UNet families; output ``transformer``).
    """
    kind = getattr(adapter, "adapter_type", "lora")
    suffix, word = _KINDS[kind]
    title = f"{adapter.family} {adapter.flavour} {word}"
    metadata = dict(adapter.header) | modelspec_metadata(
        architecture=f"{adapter.family}{suffix}",
        title=title,
        training_info={"base_model": adapter.base_model, **adapter.settings},
    )
    output_dir = Path(adapter.output_dir)
    model_folder = getattr(adapter, "model_folder", "transformer")
    if kind == "full":
        # The pipeline component it replaces: ``transformer/``, or ``unet/`` for UNet families.
        written = {"transformer": str(save_model_folder(adapter.state_dict, adapter.model_config,
                                                        output_dir / model_folder, metadata=metadata))}
    else:
        convert = adapter.to_comfyui if adapter.lora_format == "comfyui" and kind == "lora" else None
        if adapter.lora_format == "comfyui" and convert is None:
            raise ValueError(f"lora_format 'comfyui': model family {adapter.family!r} has no ComfyUI key mapping")
        if convert is not None:
            # ComfyUI-layout keys carry their alphas as tensors; diffusers' kohya/ComfyUI readers
            # refuse a file that also has its own alpha header ("Both network_alphas and
            # metadata cannot be specified").
            metadata.pop("lora_adapter_metadata", None)
        lora = save_lora(adapter.state_dict, output_dir / LORA_WEIGHT_NAME, metadata=metadata, convert=convert)
        written = {"lora": str(lora)}
    card = write_model_card(
        output_dir,
        base_model=adapter.base_model,
        family=adapter.family,
        flavour=adapter.flavour,
        title=title,
        settings=adapter.settings,
        validation_images=adapter.validation_images,
        kind=kind,
        adapter_id=adapter_id,
        model_folder=model_folder,
    )
    return {**written, "model_card": str(card)}


def save_model_folder(
    state_dict: dict[str, Any],
    config: dict[str, Any] | None,
    folder: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
    max_shard_size: str = "10GB",
) -> Path:
    """Write a diffusers model folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
    sharded with an index past ``max_shard_size``) that ``<ModelClass>.from_pretrained`` and the
    family pipeline's ``from_pretrained(..., transformer=...)`` load.

    Tensors are written one shard at a time from where they are, so no second copy of the whole
    model is made. The folder is built beside ``folder`` and renamed into place when complete.
    """
    import json
    import shutil

    from huggingface_hub import save_torch_state_dict

    if not config or "_class_name" not in config:
        raise ValueError("a model folder needs the model's diffusers config (with _class_name)")
    target = Path(folder)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_torch_state_dict(
        state_dict,
        partial,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=max_shard_size,
        metadata={"format": "pt", **(metadata or {})},
    )
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target
