"""An exponential moving average of the trained parameters (the LoRA weights, or with
``model_type: full`` every weight of the denoiser).

``ema = decay * ema + (1 - decay) * weights`` after every ``update_interval``-th optimizer step,
with a constant ``decay``, except during a warm-up: an update at optimizer step
``s <= warmup_steps`` copies the weights (decay 0). A LoRA starts at zero change, so an average
that includes the untrained start drags the exported weights back towards "no LoRA" for a long
time (with decay 0.999, about a thousand steps); copying during the warm-up starts the average
from weights that have already learnt something. The shadow tensors are fp32 and live on ``storage_device``; with
``update_on_storage`` false they visit the parameters' device for each update (fast on a GPU),
otherwise the parameters visit them (``ema_cpu_only``). Their state is part of every checkpoint so
a resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


CHUNK_BYTES = 256 * 2**20
"""How much of the EMA one update moves and converts at once (see :meth:`EMA.step`)."""


class EMA:
    """Shadow copies of ``params`` and the update rule."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        decay: float,
        storage_device: torch.device | str = "cpu",
        update_on_storage: bool = False,
        update_interval: int = 1,
        foreach: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.storage_device = torch.device(storage_device)
        self.update_on_storage = update_on_storage
        self.update_interval = max(1, int(update_interval))
        self.foreach = foreach
        if warmup_steps < 0:
            raise ValueError(f"ema_warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.num_updates = 0
        self.shadow = [p.detach().to(self.storage_device, torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def step(self, global_step: int) -> bool:
        """Update after optimizer step ``global_step`` (1-based) when the interval says so."""
        if global_step % self.update_interval:
            return False
        weight = 1.0 - self.decay_at(global_step)
        if self.update_on_storage or not self.params:
            device = self.storage_device
        else:
            device = self.params[0].device
        # A chunk of tensors at a time: the shadow's visit to the device and the fp32 copies of
        # the weights then take at most about CHUNK_BYTES each, not the whole model twice over
        # (a full fine-tune's EMA is as big as the model in fp32).
        for start, stop in self._chunks():
            shadow = [s.to(device) for s in self.shadow[start:stop]]
            current = [p.detach().to(device, torch.float32) for p in self.params[start:stop]]
            if self.foreach:
                torch._foreach_lerp_(shadow, current, weight)
            else:
                for s, c in zip(shadow, current):
                    s.lerp_(c, weight)
            if device != self.storage_device:
                shadow = [s.to(self.storage_device) for s in shadow]
            self.shadow[start:stop] = shadow
        self.num_updates += 1
        return True

    def _chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` ranges of the tensors, each about :data:`CHUNK_BYTES` of fp32 (one
        tensor at least): a LoRA's EMA is one chunk, a full model's some hundreds."""
        start, size = 0, 0
        for index, tensor in enumerate(self.shadow):
            size += tensor.numel() * tensor.element_size()
            if size >= CHUNK_BYTES:
                yield start, index + 1
                start, size = index + 1, 0
        if start < len(self.shadow):
            yield start, len(self.shadow)

    def decay_at(self, global_step: int) -> float:
        """The decay of an update after optimizer step ``global_step``: 0 during the warm-up."""
        return 0.0 if global_step <= self.warmup_steps else self.decay

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; the trained ones come back after.

        The trained weights wait on ``storage_device``, beside the shadow: for a full fine-tune a
        second copy of the model on the accelerator is what there is no room for."""
        saved = [p.detach().to(self.storage_device, copy=True) for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s.to(p.device))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError(
                "EMA state does not match the trained parameters (different lora_rank/target or model_type?)"
            )
        self.shadow = [s.to(self.storage_device, torch.float32) for s in shadow]
        self.num_updates = int(state["num_updates"])
