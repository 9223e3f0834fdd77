"""The family side of TREAD token routing: where a transformer's routable blocks are, and where
the image tokens, their positions and their attention mask sit in one block call.

TREAD (Krause et al., 2025) trains faster by sending a random share of the image tokens around a
span of transformer blocks: they skip those blocks and rejoin, unchanged, after the span. The
mechanism (choosing the tokens, cutting each block call down, putting the tokens back) is generic
and lives in ``tune_train.tread``; what differs per architecture is only how a block is called,
and that is what a family describes by returning a :class:`TokenRouting` from
:meth:`tune_models.family.ModelFamily.token_routing`.

A block call is handled as a dict of its arguments by name (positional arguments are bound to the
block's ``forward`` signature first, so a transformer that passes them positionally under
gradient checkpointing and by keyword otherwise looks the same). Every method returns a new dict
or output and never modifies its input in place. "Image tokens" are a ``B x N x D`` slice of the
block's token stream; ``keep`` is a sorted 1-D index into the ``N`` image tokens the transformer
started with, the same for every sample of the batch (a training batch is one aspect bucket, so
every sample has the same ``N``, and one index keeps the positional embeddings free of a batch
dimension where the model has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SeparateImageStreamRouting", "TokenRouting", "cut_positions"]


def cut_positions(value: torch.Tensor, keep: torch.Tensor, *, start: int, total: int, dim: int) -> torch.Tensor:
    """``value`` along ``dim`` with its ``total`` image positions from ``start`` cut to ``keep``;
    what comes before (text) and after (reference images) stays. For the positional embeddings
    and attention masks that :meth:`TokenRouting.with_positions` hands a routed block."""
    head = value.narrow(dim, 0, start)
    image = value.narrow(dim, start, total).index_select(dim, keep.to(value.device))
    tail = value.narrow(dim, start + total, value.shape[dim] - start - total)
    return torch.cat([head, image, tail], dim=dim)


def cut_rope(rope: Any, keep: torch.Tensor, *, start: int, total: int) -> Any:
    """A Flux-style RoPE (one tensor, or a ``(cos, sin)`` pair, over the joint sequence's positions
    along dim 0, no batch dimension) with its image positions cut as :func:`cut_positions` does;
    ``None`` stays ``None``. Flux.1, FLUX.2 and Chroma hand their blocks RoPE this way."""
    if isinstance(rope, (tuple, list)):
        return type(rope)(cut_positions(r, keep, start=start, total=total, dim=0) for r in rope)
    if rope is None:
        return None
    return cut_positions(rope, keep, start=start, total=total, dim=0)


class TokenRouting:
    """How TREAD reaches into one family's transformer; a family subclasses it.

    ``count`` below is the number of image tokens the call carries *now*: ``N`` at the first
    routed block, ``len(keep)`` inside the span."""

    patch_size: int = 2
    """Latent cells per image token along one side, for :meth:`latent_grid_tokens`."""

    def latent_grid_tokens(self, weights: torch.Tensor, count: int) -> torch.Tensor:
        """Per-image-token values (``B x count``) of a ``B x 1 x h x w`` map on the latent grid
        (a loss mask): each token gets the largest value of the cells it covers. Generic version:
        tokens are ``patch_size`` square patches in row-major order, as every built-in routing
        family packs them (FLUX.2 with ``patch_size`` 1, SD3 and Lumina 2 with their model's patch
        size); tokens past the grid (reference tokens appended after the target's) get 0."""
        pooled = torch.nn.functional.max_pool2d(weights.float(), self.patch_size).flatten(1)
        if pooled.shape[1] >= count:
            return pooled[:, :count]
        return torch.cat([pooled, pooled.new_zeros(pooled.shape[0], count - pooled.shape[1])], dim=1)

    def blocks(self, transformer: Any) -> Sequence[torch.nn.Module]:
        """The routable blocks, in the order the transformer runs them; route layer indices count
        in this list (negative ones from its end)."""
        raise NotImplementedError

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """How many image tokens the blocks carry, from the arguments of the transformer's own
        call (the blocks cannot say where the image part of a joint sequence ends)."""
        raise NotImplementedError

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        """The ``B x count x D`` image tokens of a block call."""
        raise NotImplementedError

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        """The call with its ``count`` image tokens replaced by ``tokens`` (another number of them)."""
        raise NotImplementedError

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        """The call with the image tokens' positional embeddings (and attention-mask entries, if
        any) cut from the ``total`` image positions down to those in ``keep``; text positions stay."""
        raise NotImplementedError

    def output_image_tokens(self, output: Any, count: int) -> torch.Tensor:
        """The ``B x count x D`` image tokens of a block's output."""
        raise NotImplementedError

    def with_output_image_tokens(self, output: Any, tokens: torch.Tensor, count: int) -> Any:
        """The block output with its ``count`` image tokens replaced by ``tokens``."""
        raise NotImplementedError


class SeparateImageStreamRouting(TokenRouting):
    """:class:`TokenRouting` for blocks that keep the image tokens apart from the text: a block is
    called with the image tokens alone in ``hidden_states`` (the routed target's first, any
    reference images' after them), the text in its own ``encoder_hidden_states``, and returns the
    pair ``(encoder_hidden_states, hidden_states)``. Flux.1 and Qwen-Image blocks are called so; a
    family subclasses it for the blocks, the token count and the positions."""

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        return call["hidden_states"][:, :count]

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        return {**call, "hidden_states": torch.cat([tokens, call["hidden_states"][:, count:]], dim=1)}

    def output_image_tokens(self, output: tuple, count: int) -> torch.Tensor:
        return output[1][:, :count]

    def with_output_image_tokens(self, output: tuple, tokens: torch.Tensor, count: int) -> tuple:
        return (output[0], torch.cat([tokens, output[1][:, count:]], dim=1))
