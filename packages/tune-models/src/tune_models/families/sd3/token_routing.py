"""TREAD token routing for Stable Diffusion 3 / 3.5 (see :mod:`tune_models.token_routing`).

The routable blocks are the ``transformer_blocks`` (joint MMDiT blocks; SD 3.5's dual-attention
blocks add a self-attention over the image tokens alone, which routing shortens the same way). A
block is called ``block(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)`` with
only the image tokens in ``hidden_states`` and returns ``(encoder_hidden_states,
hidden_states)`` (the last block's text output is ``None``). SD3 has no rotary embedding and no
attention mask: each token's position is in its features (the patch embedding adds a sinusoidal
position before the first block), so a routed token carries its own position with it and nothing
else needs cutting.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.token_routing import TokenRouting


class SD3TokenRouting(TokenRouting):
    def __init__(self, patch_size: int = 2) -> None:
        self.patch_size = patch_size

    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        return call["hidden_states"]

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        return {**call, "hidden_states": tokens}

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        return call

    def output_image_tokens(self, output: tuple, count: int) -> torch.Tensor:
        return output[1]

    def with_output_image_tokens(self, output: tuple, tokens: torch.Tensor, count: int) -> tuple:
        return (output[0], tokens)
