"""TREAD token routing for FLUX.2 (see :mod:`tune_models.token_routing`).

The routable blocks are the double-stream ``transformer_blocks`` followed by the single-stream
``single_transformer_blocks`` (indices count across both, in that order). The two kinds are laid
out differently, and a span may start in one and end in the other:

- a double block is called ``block(hidden_states, encoder_hidden_states, temb_mod_img,
  temb_mod_txt, image_rotary_emb, joint_attention_kwargs)`` with the image tokens alone in
  ``hidden_states`` and returns ``(encoder_hidden_states, hidden_states)``;
- between the two kinds the transformer joins text and image into one sequence, text first, so a
  single block gets ``hidden_states = text + image`` with ``encoder_hidden_states=None`` and
  returns that joint sequence.

RoPE is one ``(cos, sin)`` pair over ``text + image`` positions without a batch dimension.
Reference images (edit training, ``predict(reference_latents=)``) are appended after the target's
tokens with ``img_ids`` time coordinate ``t = 10, 20, ...`` (the target's is 0): only the target's
tokens are routed, the reference tokens go through every block, so the model always sees the
whole reference it edits from.

A single block's call does not say where its text ends, so the text length (and the target's token
count) is read from the transformer's own call in :meth:`image_token_count`, once per forward.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.token_routing import TokenRouting, cut_positions, cut_rope


class Flux2TokenRouting(TokenRouting):
    patch_size = 1
    """The cached latents are already patchified (``B x 128 x H/16 x W/16``): one token per cell."""

    def __init__(self) -> None:
        self.text = 0
        """Text tokens of the current forward (set by :meth:`image_token_count`)."""

    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        self.text = int(text.shape[1])
        if kwargs.get("kv_cache_mode") is not None:
            raise NotImplementedError("TREAD token routing does not handle FLUX.2's reference KV cache (inference only)")
        ids = kwargs.get("img_ids")
        if ids is None:
            return int(hidden.shape[1])
        ids = ids[0] if ids.ndim == 3 else ids
        # The target's tokens come first, at t = 0; references follow at t = 10, 20, ...
        return int((ids[:, 0] == 0).sum())

    @staticmethod
    def _joint(call: dict[str, Any]) -> bool:
        """A single block's call: text and image in one ``hidden_states``."""
        return call.get("encoder_hidden_states") is None

    def _start(self, call: dict[str, Any]) -> int:
        return self.text if self._joint(call) else 0

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        return call["hidden_states"].narrow(1, self._start(call), count)

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        hidden = call["hidden_states"]
        start = self._start(call)
        rest = hidden.narrow(1, start + count, hidden.shape[1] - start - count)
        return {**call, "hidden_states": torch.cat([hidden.narrow(1, 0, start), tokens, rest], dim=1)}

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        out = dict(call)
        if call.get("image_rotary_emb") is not None:
            out["image_rotary_emb"] = cut_rope(call["image_rotary_emb"], keep, start=self.text, total=total)
        extra = call.get("joint_attention_kwargs")
        if extra and extra.get("attention_mask") is not None:
            mask = cut_positions(extra["attention_mask"], keep, start=self.text, total=total, dim=-1)
            out["joint_attention_kwargs"] = {**extra, "attention_mask": mask}
        return out

    def output_image_tokens(self, output: Any, count: int) -> torch.Tensor:
        if isinstance(output, tuple):  # a double block: (text, image)
            return output[1].narrow(1, 0, count)
        return output.narrow(1, self.text, count)

    def with_output_image_tokens(self, output: Any, tokens: torch.Tensor, count: int) -> Any:
        if isinstance(output, tuple):
            image = output[1]
            return (output[0], torch.cat([tokens, image.narrow(1, count, image.shape[1] - count)], dim=1))
        rest = output.narrow(1, self.text + count, output.shape[1] - self.text - count)
        return torch.cat([output.narrow(1, 0, self.text), tokens, rest], dim=1)
