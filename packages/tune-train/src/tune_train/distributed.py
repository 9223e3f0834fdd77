"""Data-parallel training (several processes, one per GPU) without letting DDP leak into the rest.

accelerate wraps the trained denoiser in ``DistributedDataParallel`` when the run is launched
with several processes (``accelerate launch`` / ``torchrun``). Everything except the training
forward wants the plain module: the families read ``transformer.config``, PEFT finds its
adapters on it, validation hands it to a diffusers pipeline, checkpoints name its parameters.
So the trainer keeps ``model.transformer`` the plain module and sends only the training forward
through the wrapper, by giving ``family.predict`` a :class:`DistributedForward` in its place:
a call goes through DDP (which is what makes the gradients all-reduce), every attribute comes
from the plain module.

DDP is also told to leave the frozen tensors alone (:func:`ignore_frozen_tensors`). By default
it broadcasts every parameter and buffer from rank 0 when it wraps the model, and the buffers
again before each forward: for a LoRA that is gigabytes of frozen base weights that every rank
already loaded from the same file, and tensors DDP cannot send at all (block swap keeps some
in CPU memory; quantised weights are tensor subclasses). Only what trains is synchronised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DistributedForward", "average_gradients", "ignore_frozen_tensors", "shard", "training_view"]


class DistributedForward:
    """Stands in for the denoiser during the training forward: calls go through the DDP wrapper
    (``ddp``), attribute reads and writes reach the plain ``module``."""

    def __init__(self, ddp: torch.nn.Module, module: torch.nn.Module) -> None:
        object.__setattr__(self, "_ddp", ddp)
        object.__setattr__(self, "_module", module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._module, name, value)


def training_view(prepared: torch.nn.Module, module: torch.nn.Module) -> Any:
    """What the training forward calls: ``module`` itself unless accelerate wrapped it."""
    return module if prepared is module else DistributedForward(prepared, module)


def ignore_frozen_tensors(module: torch.nn.Module) -> int:
    """Mark every frozen parameter and every buffer of ``module`` as DDP-ignored (neither
    broadcast at wrap time nor before forwards, nor bucketed for gradients); returns how many.

    Frozen weights are the same on every rank by construction (each loads the same checkpoint,
    the adapters' initialisation is seeded alike), so nothing is lost."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, p in module.named_parameters() if not p.requires_grad]
    names += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return len(names)


def average_gradients(params: Sequence[torch.nn.Parameter], accelerator: Any) -> None:
    """Average ``params``' gradients over the processes, for trained weights outside the DDP
    wrapper (the text encoders' LoRA with ``train_text_encoder``): one all-reduce of all of them
    flattened, after the last micro-batch. A parameter without a gradient on some rank counts as
    a zero gradient there, so every rank sends the same number of values."""
    if accelerator.num_processes < 2 or not params:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    for grad, value in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(value.view_as(grad))


def shard(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of ``items`` (every ``world_size``-th, from ``rank``): each process
    encodes its share of the caches, so the ranks together write every entry once."""
    return items[rank::world_size] if world_size > 1 else items
