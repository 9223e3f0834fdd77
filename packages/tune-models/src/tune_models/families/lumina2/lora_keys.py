"""Lumina 2 LoRA keys: diffusers/PEFT layout <-> ComfyUI layout.

diffusers renamed Lumina Image 2.0's modules; ComfyUI runs it with its ``NextDiT`` code and the
original Alpha-VLLM names. The renames, from diffusers' single-file converter
(``convert_lumina2_to_diffusers``) and its LoRA converter
(``_convert_non_diffusers_lumina2_lora_to_diffusers``), 0.42:

=====================================================  =========================================
diffusers (per block of ``layers``, ``noise_refiner``,   native / ComfyUI
``context_refiner``)
=====================================================  =========================================
``attn.to_q`` / ``attn.to_k`` / ``attn.to_v``          one fused ``attention.qkv`` (rows q, k, v)
``attn.to_out.0``                                      ``attention.out``
``feed_forward.linear_1`` / ``_2`` / ``_3``            ``feed_forward.w1`` / ``w2`` / ``w3``
``norm1.linear``                                       ``adaLN_modulation.1``
``time_caption_embed.caption_embedder.1``              ``cap_embedder.1``
``time_caption_embed.timestep_embedder.linear_1/2``    ``t_embedder.mlp.0`` / ``.2``
``norm_out.linear_1`` / ``norm_out.linear_2``          ``final_layer.adaLN_modulation.1`` / ``final_layer.linear``
=====================================================  =========================================

``x_embedder`` keeps its name. Lumina 2 uses grouped-query attention, so q has ``hidden`` rows and
k, v have fewer (2304 / 768 / 768 in the real model): q's size is the fused LoRA's input width
(the block's hidden size) and k, v split the rest evenly.

**Layout we write** (:func:`to_comfyui`): ``diffusion_model.`` + native module +
``.lora_down.weight`` / ``.lora_up.weight`` (+ ``.alpha`` when an alpha is given), the names
ComfyUI's generic rule maps onto every model weight. q/k/v are **fused** exactly (downs stacked,
ups block-diagonal; the fused rank is 3r, so the alpha is 3x); a block that lacks one of them or
has unequal ranks keeps them separate under their diffusers names. :func:`from_comfyui` reverses
it exactly, and splits a dense fused ``qkv`` (trained fused elsewhere) exactly as full-rank parts.
"""

from __future__ import annotations

import re

import torch

from tune_models.families._shared import (
    comfyui_lora_modules,
    diffusers_lora_modules,
    put_comfyui,
    put_diffusers,
    put_fused_comfyui,
    split_fused_lora,
)

_QKV = ("to_q", "to_k", "to_v")
_QKV_RE = re.compile(r"^(?P<block>.+)\.attn\.(?P<proj>to_q|to_k|to_v)$")

_RENAMES = (  # (diffusers suffix or whole name, native), applied to the end of a module path
    ("attn.to_out.0", "attention.out"),
    ("feed_forward.linear_1", "feed_forward.w1"),
    ("feed_forward.linear_2", "feed_forward.w2"),
    ("feed_forward.linear_3", "feed_forward.w3"),
    ("norm1.linear", "adaLN_modulation.1"),
)
_TOP_LEVEL = (
    ("time_caption_embed.caption_embedder.1", "cap_embedder.1"),
    ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("norm_out.linear_1", "final_layer.adaLN_modulation.1"),
    ("norm_out.linear_2", "final_layer.linear"),
)


def _rename(module: str, table: tuple[tuple[str, str], ...], *, reverse: bool) -> str:
    for diffusers_name, native in table:
        old, new = (native, diffusers_name) if reverse else (diffusers_name, native)
        if module == old:
            return new
        if module.endswith("." + old):
            return module[: -len(old)] + new
    return module


def _to_native(module: str) -> str:
    for diffusers_name, native in _TOP_LEVEL:
        if module == diffusers_name:
            return native
    return _rename(module, _RENAMES, reverse=False)


def _to_diffusers(module: str) -> str:
    for diffusers_name, native in _TOP_LEVEL:
        if module == native:
            return diffusers_name
    return _rename(module, _RENAMES, reverse=True)


def to_comfyui(state_dict: dict[str, torch.Tensor], *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """diffusers/PEFT Lumina 2 LoRA -> ComfyUI key names (see the module docstring). ``alpha`` is
    the adapter's ``lora_alpha``; without it no ``.alpha`` is written (ComfyUI then applies the
    LoRA at scale 1, as diffusers does for a bare state dict)."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in diffusers_lora_modules(state_dict).items():
        match = _QKV_RE.match(module)
        if match:
            blocks.setdefault(match["block"], {})[match["proj"]] = (pair["A"], pair["B"])
        else:
            put_comfyui(out, _to_native(module), pair["A"], pair["B"], alpha)
    for block, projections in blocks.items():
        put_fused_comfyui(out, projections, _QKV, f"{block}.attention.qkv", f"{block}.attn", alpha)
    return out


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_comfyui` (``alpha / rank`` folded into the up weights); also reads
    ``lora_A``/``lora_B``-named files and dense fused ``qkv`` LoRAs."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():
        if module.endswith(".attention.qkv"):
            block = module[: -len(".attention.qkv")]
            q_rows = down.shape[1]  # q projects hidden -> hidden; k and v share the rest
            rest = up.shape[0] - q_rows
            if rest <= 0 or rest % 2:
                raise ValueError(
                    f"{module}: fused qkv up weight has {up.shape[0]} rows; expected the hidden size {q_rows} "
                    "plus two equal k/v parts"
                )
            for proj, pair in zip(_QKV, split_fused_lora(down, up, [q_rows, rest // 2, rest // 2])):
                if pair is not None:
                    put_diffusers(out, f"{block}.attn.{proj}", *pair)
        else:
            put_diffusers(out, _to_diffusers(module.removeprefix("transformer.")), down, up)
    return out
