"""Feed-forward chunking: a block's MLP runs over the tokens a slice at a time, each slice
checkpointed (``enable_chunked_feed_forward``, ``feed_forward_chunk_size``).

Why: with gradient checkpointing the peak of a training step is inside one block's backward,
where the recomputed block holds everything its backward needs. The largest of those tensors
are the MLP's hidden activations: Z-Image's SwiGLU is 10240 wide (2.7 x the model width), and
its backward keeps the two up-projections (each a base output plus a LoRA sum), the gate and
their product, about 0.6 GiB at 1024 px (``benchmarks/memory_peak_breakdown.py``). Run over
slices of ``chunk_size`` tokens with each slice checkpointed, only one slice's hidden
activations exist at a time; the price is one more forward of the MLP per training step (it is
recomputed when its slice is back-propagated).

Which modules: every module whose class name ends in ``FeedForward`` (diffusers' ``FeedForward``,
Z-Image's and Lumina's, FLUX.2's ...), because those act on each token on its own, so slicing the
token axis cannot change the result. Convolutional MLPs (Sana's ``GLUMBConv``) mix neighbouring
tokens and are not chosen. A model with none is a clear error naming the key.

The wrapped forward slices only when gradients are being recorded and the input is
``[batch, tokens, width]`` longer than one chunk; inference and validation run the plain MLP.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the plan reads DEFAULT_CHUNK_SIZE without torch
    import torch

FEED_FORWARD_SUFFIX = "FeedForward"
"""Class-name suffix of the modules that are chunked (token-wise MLPs)."""

DEFAULT_CHUNK_SIZE = 2048
"""Tokens per slice when ``feed_forward_chunk_size`` is not set: 3 slices at 1024 px on Z-Image
(4352 tokens), the setting measured in docs/benchmarks.md (-0.35 to -0.43 GiB)."""


def feed_forward_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the token-wise MLPs of ``model``, outermost only, in module order."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith(FEED_FORWARD_SUFFIX):
            if not any(name.startswith(f"{outer}.") for outer, _ in found):
                found.append((name, module))
    return found


def _chunked_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to each chunked module as its ``forward``. The plain forward is looked up at call
    time (an instance-level wrapper installed earlier, else the class's), so a deep copy of the
    model chunks its own MLPs, not the original's."""
    import torch

    plain = self.__dict__.get("_tune_ffn_inner_forward") or type(self).forward.__get__(self)
    size = self._tune_ffn_chunk_size
    if (
        args or kwargs or not torch.is_grad_enabled() or not torch.is_tensor(hidden_states)
        or hidden_states.ndim != 3 or hidden_states.shape[1] <= size
    ):
        return plain(hidden_states, *args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    # No RNG state saved and restored per slice: token-wise MLPs draw no random numbers (dropout
    # 0 in every family), and reading the CUDA RNG state makes the CPU wait for the GPU each time.
    pieces = [checkpoint(plain, piece, use_reentrant=False, preserve_rng_state=False)
              for piece in hidden_states.split(size, dim=1)]
    return torch.cat(pieces, dim=1)


def chunk_feed_forward(model: torch.nn.Module, chunk_size: int | None = None) -> list[str]:
    """Make every token-wise MLP of ``model`` run over ``chunk_size``-token checkpointed slices
    while training. Returns the names of the modules changed. Calling it again changes the chunk
    size; :func:`unchunk_feed_forward` undoes it.
    """
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if size < 1:
        raise ValueError(f"feed_forward_chunk_size must be >= 1 (tokens per slice), got {chunk_size}")
    modules = feed_forward_modules(model)
    if not modules:
        raise ValueError(
            f"enable_chunked_feed_forward: {type(model).__name__} has no token-wise feed-forward "
            f"modules (classes named *{FEED_FORWARD_SUFFIX}) to chunk; set "
            "enable_chunked_feed_forward to false"
        )
    for _, module in modules:
        if "_tune_ffn_chunk_size" not in module.__dict__:
            inner = module.__dict__.get("forward")  # another library's instance-level wrapper
            if inner is not None:
                module._tune_ffn_inner_forward = inner
            module.forward = types.MethodType(_chunked_forward, module)
        module._tune_ffn_chunk_size = size
    return [name for name, _ in modules]


def unchunk_feed_forward(model: torch.nn.Module) -> None:
    """Give every chunked MLP under ``model`` (itself included) its plain forward back."""
    for module in model.modules():
        if module.__dict__.pop("_tune_ffn_chunk_size", None) is None:
            continue
        inner = module.__dict__.pop("_tune_ffn_inner_forward", None)
        if inner is not None:
            module.forward = inner
        else:
            module.__dict__.pop("forward", None)
