"""TREAD token routing for Qwen-Image (see :mod:`tune_models.token_routing`).

The routable blocks are the ``transformer_blocks`` (all double-stream). A block is called
``block(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
image_rotary_emb, joint_attention_kwargs, modulate_index)`` and returns
``(encoder_hidden_states, hidden_states)``; ``hidden_states`` holds only image tokens, and the
text mask covers only the text (the attention processor appends an all-true mask for however many
image tokens it gets), so it needs no cutting. RoPE is a pair ``(image_freqs, text_freqs)`` of
complex frequencies without a batch dimension; ``modulate_index`` (``zero_cond_t`` checkpoints)
has one entry per image token and sample.

Edit flavours append each reference's clean tokens after the target's (``img_shapes`` lists the
target first, then the references). Only the target's tokens are routed: the references go
through every block, so the edit always sees the whole image it starts from.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch

from tune_models.token_routing import SeparateImageStreamRouting, cut_positions


class QwenImageTokenRouting(SeparateImageStreamRouting):
    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        shapes = kwargs.get("img_shapes")
        if not shapes:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return int(hidden.shape[1])
        # One entry per sample: the target's (frames, rows, cols) first, then each reference's.
        first = shapes[0]
        target = first[0] if isinstance(first, list) else first
        return prod(int(n) for n in target)

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        out = dict(call)
        rope = call.get("image_rotary_emb")
        if rope is not None:
            image_freqs, text_freqs = rope
            out["image_rotary_emb"] = (cut_positions(image_freqs, keep, start=0, total=total, dim=0), text_freqs)
        index = call.get("modulate_index")
        if index is not None:
            out["modulate_index"] = cut_positions(index, keep, start=0, total=total, dim=1)
        return out
