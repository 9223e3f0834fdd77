"""TREAD token routing for Flux (see :mod:`tune_models.token_routing`).

The routable blocks are the double-stream ``transformer_blocks`` followed by the single-stream
``single_transformer_blocks`` (indices count across both, in that order). Every one of them is
called ``block(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
joint_attention_kwargs)`` and returns ``(encoder_hidden_states, hidden_states)``: the image tokens
are ``hidden_states``, the text the separate ``encoder_hidden_states``. Kontext appends its
reference's clean tokens after the target's (``img_ids`` time coordinate 1, the target's is 0):
only the target's tokens are routed, the reference goes through every block. RoPE is one ``(cos, sin)`` pair over ``text + image`` positions without
a batch dimension, text first; the optional attention mask (``flux_attention_masked_training``)
is ``B x 1 x 1 x (text + image)`` in ``joint_attention_kwargs``.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.token_routing import SeparateImageStreamRouting, cut_positions, cut_rope


class FluxTokenRouting(SeparateImageStreamRouting):
    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        ids = kwargs.get("img_ids")
        if ids is None:
            return int(hidden.shape[1])
        ids = ids[0] if ids.ndim == 3 else ids
        return int((ids[:, 0] == 0).sum())  # the target's tokens (t = 0) come first, references after

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        out = dict(call)
        text = int(call["encoder_hidden_states"].shape[1])
        if call.get("image_rotary_emb") is not None:
            out["image_rotary_emb"] = cut_rope(call["image_rotary_emb"], keep, start=text, total=total)
        extra = call.get("joint_attention_kwargs")
        if extra and extra.get("attention_mask") is not None:
            out["joint_attention_kwargs"] = {**extra, "attention_mask": cut_positions(extra["attention_mask"], keep, start=text, total=total, dim=-1)}
        return out
