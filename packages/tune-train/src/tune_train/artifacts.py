"""What a finished run hands to exporters and publishers.

tune-train does not write the final adapter file or the model card itself: DESIGN puts export
and publishing in tune-publish, attached through the ``tune_train_end`` lifecycle hook. The loop
builds one :class:`TrainedAdapter` and every exporter (tune-publish's built-in, or a plugin that
writes another format) reads it, so none of them needs to know the trainer's internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from tune_models.sources import base_checkpoint

if TYPE_CHECKING:
    from tune_train.trainer import Trainer


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
    them as ``pytorch_lora_weights_ema.safetensors`` (output ``lora_ema``), or for ``full`` as the
    model folder ``<model_folder>_ema/`` (output ``transformer_ema``). None without EMA."""
    adapter_type: str = "lora"
    """What ``state_dict`` holds: ``lora`` (PEFT/diffusers keys, DoRA included), ``lycoris`` (the
    lycoris-lora library's own keys, ``lycoris_<module>.<weight>``) or ``full`` (every weight of
    the transformer, diffusers names, written as a ``transformer/`` model folder)."""
    model_config: dict[str, Any] | None = None
    """For ``full``: the transformer's diffusers ``config.json`` content. None otherwise."""
    model_folder: str = "transformer"
    """The pipeline component the denoiser is (``transformer``; ``unet`` for UNet families): the
    folder a full fine-tune is written to."""


def trained_adapter(trainer: Trainer) -> TrainedAdapter:
    """The trainer's adapter as it stands now (in its evaluation form for schedule-free optimizers)."""
    config = trainer.config
    # ComfyUI files carry alpha per module (diffusers files carry it in the header metadata).
    to_comfyui = functools.partial(trainer.family.to_comfyui, alpha=config.lora_scale_alpha())
    with trainer._eval_weights():
        state_dict = trainer._lora_state_dict()
    # A single-file pretrained_model_name_or_path is the transformer: the card names the repository
    # the pipeline (and its loading snippet) comes from, and the file as a setting.
    base = base_checkpoint(config.pretrained_model_name_or_path, trainer.flavour.pretrained)
    file_setting = {"transformer_file": base.transformer_file} if base.transformer_file else {}
    return TrainedAdapter(
        state_dict=state_dict,
        ema_state_dict=trainer.ema_lora_state_dict(),
        header=trainer._lora_header(),
        output_dir=trainer.output_dir,
        family=trainer.family.name,
        flavour=trainer.flavour.name,
        base_model=base.base,
        lora_format=config.lora_format,
        to_comfyui=to_comfyui,
        step=trainer.global_step,
        adapter_type=trainer.weights.kind,
        model_config=trainer.weights.model_config(trainer.model),
        model_folder=getattr(trainer.family, "lora_prefix", "transformer"),
        settings={
            "steps": trainer.global_step,
            "learning_rate": config.learning_rate,
            "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_scale_alpha(),
            "train_batch_size": config.train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "mixed_precision": config.mixed_precision,
            "lr_scheduler": config.lr_scheduler,
            "optimizer": config.optimizer,
            "lora_format": config.lora_format,
            "final_loss": round(trainer.losses[-1], 6) if trainer.losses else None,
            **file_setting,
            **_text_encoder_settings(trainer),
        },
        validation_images=trainer._card_images(),
    )


def _text_encoder_settings(trainer: Trainer) -> dict[str, Any]:
    """``train_text_encoder`` for the card and ModelSpec: which encoders the file trains, and their rate."""
    from tune_models.text_encoder_lora import trained_components

    trained = trained_components(trainer.model)
    if not trained:
        return {}
    config = trainer.config
    rate = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
    return {"train_text_encoder": ", ".join(trained), "text_encoder_lr": rate}


def write_ema_lora(trainer: Trainer) -> Path:
    """Write ``pytorch_lora_weights_ema.safetensors`` beside the LoRA, in the run's lora_format
    (output ``lora_ema``; exporters also get these weights as ``TrainedAdapter.ema_state_dict``)."""
    from safetensors.torch import save_file

    config = trainer.config
    tensors = trainer.ema_lora_state_dict()
    if config.lora_format == "comfyui":
        tensors = trainer.family.to_comfyui(tensors, alpha=config.lora_scale_alpha())
    path = trainer.output_dir / "pytorch_lora_weights_ema.safetensors"
    header = trainer._lora_header() | {"tune.ema_decay": str(config.ema_decay)}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path, metadata=header)
    return path


def full_ema_state_dict(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A full fine-tune's EMA as the denoiser's state dict: every trained weight's shadow (in the
    weight's own dtype), the rest (buffers, anything frozen) as the model holds it. Built from the
    shadow tensors rather than by swapping them into the model, so no second copy of the model
    is made on the accelerator."""
    transformer = trainer.model.transformer
    shadow = {id(p): s for p, s in zip(trainer.ema.params, trainer.ema.shadow)}
    return {
        name: shadow[id(value)].to(value.dtype) if id(value) in shadow else value.detach()
        for name, value in transformer.state_dict(keep_vars=True).items()
    }


def write_ema_model(trainer: Trainer) -> Path:
    """Write a full fine-tune's EMA as a diffusers model folder beside the trained one:
    ``<output_dir>/<component>_ema/`` (``transformer_ema``, ``unet_ema`` for UNet families;
    SimpleTuner's layout), which ``<ModelClass>.from_pretrained`` and the family pipeline's
    ``from_pretrained(..., unet=...)`` load. Built in a hidden folder and renamed into place."""
    import json
    import os
    import shutil

    from huggingface_hub import save_torch_state_dict

    folder = trainer.output_dir / f"{getattr(trainer.family, 'lora_prefix', 'transformer')}_ema"
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    header = {"format": "pt", "tune.step": str(trainer.global_step), "tune.ema_decay": str(trainer.config.ema_decay)}
    save_torch_state_dict(
        {k: v.contiguous() for k, v in full_ema_state_dict(trainer).items()},
        partial,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size="10GB",
        metadata=header,
    )
    config = trainer.weights.model_config(trainer.model)
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder
