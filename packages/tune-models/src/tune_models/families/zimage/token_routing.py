"""TREAD token routing for Z-Image (see :mod:`tune_models.token_routing`).

The routable blocks are ``transformer.layers``, the main single-stream layers; the noise and
context refiners before them stay whole. A layer is called ``layer(x, attn_mask, freqs_cis,
adaln_input, ...)`` on one joint sequence per sample: the image tokens first (``F x H/2 x W/2`` of
them, then padding up to a multiple of 32), the caption after. ``freqs_cis`` (RoPE) and
``attn_mask`` have one entry per position, with a batch dimension. Omni mode (SigLIP image
features, caption first) is not routed.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.token_routing import TokenRouting


class ZImageTokenRouting(TokenRouting):
    def blocks(self, transformer: Any) -> list[torch.nn.Module]:
        return list(transformer.layers)

    def image_token_count(self, args: tuple, kwargs: dict[str, Any]) -> int:
        frames = kwargs["x"] if "x" in kwargs else args[0]
        if kwargs.get("siglip_feats") is not None or isinstance(frames[0], (list, tuple)):
            raise NotImplementedError("TREAD token routing does not handle Z-Image omni inputs (image conditions)")
        patch = int(kwargs.get("patch_size", 2))
        frame_patch = int(kwargs.get("f_patch_size", 1))
        _, f, h, w = frames[0].shape
        return (f // frame_patch) * (h // patch) * (w // patch)

    def image_tokens(self, call: dict[str, Any], count: int) -> torch.Tensor:
        return call["x"][:, :count]

    def with_image_tokens(self, call: dict[str, Any], tokens: torch.Tensor, count: int) -> dict[str, Any]:
        return {**call, "x": torch.cat([tokens, call["x"][:, count:]], dim=1)}

    def with_positions(self, call: dict[str, Any], keep: torch.Tensor, total: int) -> dict[str, Any]:
        out = dict(call)
        for name in ("freqs_cis", "attn_mask", "noise_mask"):
            value = call.get(name)
            if value is not None:
                out[name] = torch.cat([value[:, :total][:, keep], value[:, total:]], dim=1)
        return out

    def output_image_tokens(self, output: torch.Tensor, count: int) -> torch.Tensor:
        return output[:, :count]

    def with_output_image_tokens(self, output: torch.Tensor, tokens: torch.Tensor, count: int) -> torch.Tensor:
        return torch.cat([tokens, output[:, count:]], dim=1)
