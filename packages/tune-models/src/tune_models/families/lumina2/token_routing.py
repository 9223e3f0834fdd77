"""TREAD token routing for Lumina 2 (see :mod:`tune_models.token_routing`).

The routable blocks are ``transformer.layers``, the main joint blocks; the noise refiner (image
only) and the context refiner (caption only) before them stay whole. A layer is called
``layer(hidden_states, attention_mask, image_rotary_emb, temb)`` on one joint sequence per sample:
the sample's own caption tokens (``mask.sum()`` of them, so the image starts at a different place
in each sample), then its image tokens, then padding up to the batch's longest. RoPE has one
entry per position *and sample*; the attention mask (``B x L``, only when caption lengths differ)
too. Every sample has the same number of image tokens (one aspect bucket), so the kept tokens are
the same image positions in every sample, each found after that sample's caption.

The caption lengths are read from the transformer's own call in :meth:`image_token_count`, once
per forward.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.token_routing import TokenRouting


class Lumina2TokenRouting(TokenRouting):
    def __init__(self, patch_size: int = 2) -> None:
        self.patch_size = patch_size
        self.captions: list[int] = []
        """Each sample's caption length in the current forward (set by :meth:`image_token_count`)."""

    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return list(transformer.layers)

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask = kwargs["encoder_attention_mask"] if "encoder_attention_mask" in kwargs else args[3]
        self.captions = [int(n) for n in mask.sum(dim=1).tolist()]
        return (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)

    def _select(self, value: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` image positions of each sample of a ``B x L x ...`` sequence."""
        return torch.stack([value[b, cap : cap + count] for b, cap in enumerate(self.captions)])

    def _replace(self, value: torch.Tensor, part: torch.Tensor, count: int) -> torch.Tensor:
        """Each sample's ``count`` image positions replaced by its row of ``part`` (another number)."""
        return torch.stack([
            torch.cat([value[b, :cap], part[b], value[b, cap + count :]]) for b, cap in enumerate(self.captions)
        ])

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        return self._select(call["hidden_states"], count)

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        return {**call, "hidden_states": self._replace(call["hidden_states"], tokens, count)}

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        out = dict(call)
        for name in ("image_rotary_emb", "attention_mask"):
            value = call.get(name)
            if value is not None:
                kept = self._select(value, total).index_select(1, keep.to(value.device))
                out[name] = self._replace(value, kept, total)
        return out

    def output_image_tokens(self, output: torch.Tensor, count: int) -> torch.Tensor:
        return self._select(output, count)

    def with_output_image_tokens(self, output: torch.Tensor, tokens: torch.Tensor, count: int) -> torch.Tensor:
        return self._replace(output, tokens, count)
