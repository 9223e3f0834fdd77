"""What a checkpoint holds of a run beyond its weights, and putting it back on resume.

:mod:`tune_train.checkpoint` knows the folder format (atomic writes, finding, pruning); this
module knows the trainer: which pieces of state make a resumed run continue exactly where the
saved one stopped (optimizer, schedule, EMA, data position, loss history, validation images).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune_train import checkpoint as ckpt

if TYPE_CHECKING:
    from tune_train.trainer import Trainer

log = logging.getLogger(__name__)


def training_state(trainer: Trainer) -> dict[str, Any]:
    """Everything but the weights that a resumed run needs to continue exactly."""
    state = {
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        # The data position of the last completed step, not the sampler's live one (see
        # Trainer.setup): a save after Ctrl-C mid-step must not skip that step's micro-batches.
        "sampler": trainer._sampler_state,
        "losses": list(trainer.losses),
        "validation_images": trainer.validation_images,
    }
    if trainer.ema is not None:
        state["ema"] = trainer.ema.state_dict()
    return state


def restore(trainer: Trainer, path: Path) -> None:
    """Load ``checkpoint-N`` at ``path`` into a set-up trainer: weights, optimizer, EMA, schedule,
    data position, step, and the history (losses, validation images) up to step N."""
    adapter, state, info = ckpt.load_checkpoint(path)
    named = dict(trainer._trainable_named())
    missing = sorted(set(named) - set(adapter))
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks LoRA weights for {missing[:3]} (different lora_rank/target?)")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(adapter[name].to(param.device, param.dtype))
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.ema is not None:
        if "ema" in state:
            trainer.ema.load_state_dict(state["ema"])
        else:  # EMA switched on for a run that was saved without it: start from the weights
            log.warning("checkpoint %s has no EMA state; the EMA starts from its weights", path)
            trainer.ema.shadow = [
                p.detach().to(trainer.ema.storage_device, torch.float32, copy=True) for p in trainer.trainable
            ]
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.global_step = int(info["step"])
    trainer.losses = list(state.get("losses", []))[: trainer.global_step]
    trainer.validation_images = {
        step: images for step, images in state.get("validation_images", {}).items() if step <= trainer.global_step
    }
    log.info("resumed from %s at step %d", path, trainer.global_step)
