"""FLUX.2 LoRA key names: diffusers/PEFT layout <-> ComfyUI layout (BFL's original module tree).

ComfyUI runs FLUX.2 with Black Forest Labs' module names. The table was worked out from diffusers'
single-file converter (``convert_flux2_transformer_checkpoint_to_diffusers`` in
``diffusers.loaders.single_file_utils``, 0.42), which reads a BFL/ComfyUI checkpoint into diffusers
names, and agrees with diffusers' reader of BFL-named LoRAs
(``_convert_non_diffusers_flux2_lora_to_diffusers`` in ``lora_conversion_utils``):

=============================================================  ===========================================
diffusers (``transformer.``)                                    BFL / ComfyUI (``diffusion_model.``)
=============================================================  ===========================================
``transformer_blocks.N.attn.to_q/to_k/to_v``                    ``double_blocks.N.img_attn.qkv`` (fused, rows q,k,v)
``transformer_blocks.N.attn.add_q/k/v_proj``                    ``double_blocks.N.txt_attn.qkv`` (fused)
``transformer_blocks.N.attn.to_out.0`` / ``to_add_out``         ``double_blocks.N.img_attn.proj`` / ``txt_attn.proj``
``transformer_blocks.N.ff.linear_in`` / ``linear_out``          ``double_blocks.N.img_mlp.0`` / ``img_mlp.2``
``transformer_blocks.N.ff_context.linear_in`` / ``linear_out``  ``double_blocks.N.txt_mlp.0`` / ``txt_mlp.2``
``single_transformer_blocks.N.attn.to_qkv_mlp_proj``            ``single_blocks.N.linear1`` (already fused in both)
``single_transformer_blocks.N.attn.to_out``                     ``single_blocks.N.linear2``
``x_embedder`` / ``context_embedder``                           ``img_in`` / ``txt_in``
``time_guidance_embed.timestep_embedder.linear_1/2``            ``time_in.in_layer`` / ``out_layer``
``time_guidance_embed.guidance_embedder.linear_1/2``            ``guidance_in.in_layer`` / ``out_layer``
``double_stream_modulation_img/txt.linear``                     ``double_stream_modulation_img/txt.lin``
``single_stream_modulation.linear``                             ``single_stream_modulation.lin``
``proj_out``                                                    ``final_layer.linear``
``norm_out.linear``                                             ``final_layer.adaLN_modulation.1`` (halves swapped)
=============================================================  ===========================================

Unlike FLUX.1, FLUX.2 has no per-block modulation layers (three shared ones instead) and its
single blocks are fused the same way in both trees, so only the double blocks' q/k/v are fused
on the way out.

**Layout we write** (:func:`to_comfyui`): ``diffusion_model.`` + BFL module + ``.lora_down.weight``
/ ``.lora_up.weight`` (+ ``.alpha`` when an alpha is given), the names ComfyUI's LoRA loader maps
onto every ``diffusion_model.<module>.weight`` of the model. A fused qkv gets one exact LoRA:
down weights stacked, up weights block-diagonal (zero rows for a projection without a LoRA), rank
``n * r`` and alpha ``n * alpha`` so ``alpha / rank`` is unchanged. ``norm_out.linear`` splits its
output as (scale, shift) in diffusers and (shift, scale) in BFL, so its up weight's halves swap.

:func:`from_comfyui` reverses that exactly and reads fused LoRAs trained elsewhere (a dense fused
up weight splits into exact per-projection pairs, as diffusers' converter does); ComfyUI alphas
are folded into ``lora_B`` (scale ``alpha / rank``) since a diffusers state dict carries none.
"""

from __future__ import annotations

import re

import torch

from tune_models.families._shared import (
    comfyui_lora_modules,
    diffusers_lora_modules,
    fuse_present_lora,
    put_comfyui,
    put_diffusers,
    split_fused_lora,
    swap_halves,
)

_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_SWAPPED = {"norm_out.linear"}
_FUSED = {
    "img_attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
}
_BLOCK_RE = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_NATIVE_RE = re.compile(r"^(?P<kind>double_blocks|single_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_KINDS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
_NATIVE_KINDS = {v: k for k, v in _KINDS.items()}


def to_comfyui(state_dict: dict[str, torch.Tensor], *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Convert a diffusers/PEFT FLUX.2 LoRA to ComfyUI's key names (see the module docstring).

    ``alpha`` is the adapter's ``lora_alpha``; when given, ``.alpha`` entries are written so ComfyUI
    scales by ``alpha / rank`` as PEFT did; without it none are (scale 1, i.e. alpha == rank)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in diffusers_lora_modules(state_dict).items():
        match = _BLOCK_RE.match(module)
        if match:
            native_block = f"{_KINDS[match['kind']]}.{match['n']}"
            rest = match["rest"]
            renames = _DOUBLE if match["kind"] == "transformer_blocks" else _SINGLE
            if rest in renames:
                put_comfyui(out, f"{native_block}.{renames[rest]}", pair["A"], pair["B"], alpha)
                continue
            fused = next((name for name, parts in _FUSED.items() if rest in dict(parts)), None)
            if fused is not None and match["kind"] == "transformer_blocks":
                groups.setdefault((native_block, fused), {})[rest] = (pair["A"], pair["B"])
                continue
        elif module in _TOP:
            up = swap_halves(pair["B"]) if module in _SWAPPED else pair["B"]
            put_comfyui(out, _TOP[module], pair["A"], up, alpha)
            continue
        raise ValueError(f"no ComfyUI name known for FLUX.2 module {module!r}")
    for (native_block, fused), present in groups.items():
        down, up, n = fuse_present_lora(present, _FUSED[fused])
        put_comfyui(out, f"{native_block}.{fused}", down, up, None if alpha is None else n * alpha)
    return out


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a ComfyUI-layout FLUX.2 LoRA back to diffusers layout (``transformer.`` keys)."""
    out: dict[str, torch.Tensor] = {}
    top = {v: k for k, v in _TOP.items()}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():  # alpha/rank folded into up
        match = _NATIVE_RE.match(module)
        if match:
            block = f"{_NATIVE_KINDS[match['kind']]}.{match['n']}"
            rest = match["rest"]
            renames = {v: k for k, v in (_DOUBLE if match["kind"] == "double_blocks" else _SINGLE).items()}
            if rest in renames:
                put_diffusers(out, f"{block}.{renames[rest]}", down, up)
                continue
            if rest in _FUSED and match["kind"] == "double_blocks":
                spec = _FUSED[rest]
                sizes = [up.shape[0] // len(spec)] * len(spec)
                for (name, _), pair in zip(spec, split_fused_lora(down, up, sizes)):
                    if pair is not None:
                        put_diffusers(out, f"{block}.{name}", *pair)
                continue
        elif module in top:
            name = top[module]
            put_diffusers(out, name, down, swap_halves(up) if name in _SWAPPED else up)
            continue
        raise ValueError(f"no diffusers name known for FLUX.2 ComfyUI module {module!r}")
    return out
