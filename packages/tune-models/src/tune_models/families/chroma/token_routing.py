"""TREAD token routing for Chroma (see :mod:`tune_models.token_routing`).

Chroma is Flux-shaped but its blocks are called differently from Flux.1's, so it does not use
Flux's routing. The routable blocks are the double-stream ``transformer_blocks`` followed by the
single-stream ``single_transformer_blocks`` (indices count across both, in that order):

- a double block is called ``block(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
  attention_mask, joint_attention_kwargs)`` with the image tokens alone in ``hidden_states`` and
  returns ``(encoder_hidden_states, hidden_states)``;
- between the two kinds the transformer joins text and image into one sequence, text first; a
  single block gets that joint ``hidden_states`` (no text argument) and returns it.

RoPE is one ``(cos, sin)`` pair over ``text + image`` positions without a batch dimension, and the
attention mask (the text's padding mask extended over the image, ``B x (text + image)``) is a
block argument of its own; both are cut to the kept image positions.

A single block's call does not say where its text ends, so the text length is read from the
transformer's own call in :meth:`image_token_count`, once per forward.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.token_routing import TokenRouting, cut_positions, cut_rope


class ChromaTokenRouting(TokenRouting):
    def __init__(self) -> None:
        self.text = 0
        """Text tokens of the current forward (set by :meth:`image_token_count`)."""

    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        self.text = int(text.shape[1])
        return int(hidden.shape[1])

    def _start(self, call: dict[str, Any]) -> int:
        """Where the image tokens start: after the text in a single block's joint sequence."""
        return 0 if call.get("encoder_hidden_states") is not None else self.text

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        return call["hidden_states"].narrow(1, self._start(call), count)

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        start = self._start(call)
        return {**call, "hidden_states": torch.cat([call["hidden_states"].narrow(1, 0, start), tokens], dim=1)}

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        out = dict(call)
        if call.get("image_rotary_emb") is not None:
            out["image_rotary_emb"] = cut_rope(call["image_rotary_emb"], keep, start=self.text, total=total)
        if call.get("attention_mask") is not None:
            out["attention_mask"] = cut_positions(call["attention_mask"], keep, start=self.text, total=total, dim=-1)
        return out

    def output_image_tokens(self, output: Any, count: int) -> torch.Tensor:
        if isinstance(output, tuple):  # a double block: (text, image)
            return output[1]
        return output.narrow(1, self.text, count)

    def with_output_image_tokens(self, output: Any, tokens: torch.Tensor, count: int) -> Any:
        if isinstance(output, tuple):
            return (output[0], tokens)
        return torch.cat([output.narrow(1, 0, self.text), tokens], dim=1)
