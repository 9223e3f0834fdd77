"""Flux LoRA key names: diffusers/PEFT layout <-> ComfyUI layout (BFL's original module tree).

ComfyUI runs Flux with Black Forest Labs' own module names, where diffusers' separate projections
are fused. The table below was checked against diffusers' single-file converter
(``convert_flux_transformer_checkpoint_to_diffusers`` in ``diffusers.loaders.single_file_utils``),
which reads the BFL/ComfyUI checkpoint into diffusers names:

=======================================================  ==============================================
diffusers (``transformer.``)                              BFL / ComfyUI (``diffusion_model.``)
=======================================================  ==============================================
``transformer_blocks.N.attn.to_q/to_k/to_v``              ``double_blocks.N.img_attn.qkv`` (fused, rows q,k,v)
``transformer_blocks.N.attn.add_q/k/v_proj``              ``double_blocks.N.txt_attn.qkv`` (fused)
``transformer_blocks.N.attn.to_out.0`` / ``to_add_out``   ``double_blocks.N.img_attn.proj`` / ``txt_attn.proj``
``transformer_blocks.N.ff.net.0.proj`` / ``ff.net.2``     ``double_blocks.N.img_mlp.0`` / ``img_mlp.2``
``transformer_blocks.N.ff_context.net.0.proj`` / ``.2``   ``double_blocks.N.txt_mlp.0`` / ``txt_mlp.2``
``transformer_blocks.N.norm1.linear`` / ``norm1_context`` ``double_blocks.N.img_mod.lin`` / ``txt_mod.lin``
``single_transformer_blocks.N.attn.to_q/k/v, proj_mlp``   ``single_blocks.N.linear1`` (fused, rows q,k,v,mlp = 4x)
``single_transformer_blocks.N.proj_out`` / ``norm.linear`` ``single_blocks.N.linear2`` / ``modulation.lin``
``x_embedder`` / ``context_embedder``                     ``img_in`` / ``txt_in``
``time_text_embed.timestep_embedder.linear_1/2``          ``time_in.in_layer`` / ``out_layer``
``time_text_embed.text_embedder.linear_1/2``              ``vector_in.in_layer`` / ``out_layer``
``time_text_embed.guidance_embedder.linear_1/2``          ``guidance_in.in_layer`` / ``out_layer``
``proj_out``                                              ``final_layer.linear``
``norm_out.linear``                                       ``final_layer.adaLN_modulation.1`` (halves swapped)
=======================================================  ==============================================

**Layout we write** (:func:`to_comfyui`): ``diffusion_model.`` + BFL module + ``.lora_down.weight``
/ ``.lora_up.weight`` (+ ``.alpha`` when an alpha is given), the names ComfyUI's LoRA loader maps
onto every ``diffusion_model.<module>.weight`` of a Flux model. Fused modules get one exact LoRA:
down weights stacked, up weights block-diagonal, and zero rows for a projection without a LoRA
(the default ``all`` preset trains a single block's q/k/v but not its ``proj_mlp``: its
``linear1`` LoRA then has zero rows for the MLP part). With ``n`` projections fused the rank is
``n * r``, so the written alpha is ``n * alpha`` and ``alpha / rank`` is unchanged.
``norm_out.linear`` splits its output as (scale, shift) in diffusers and (shift, scale) in BFL,
so its up weight's halves are swapped, as the checkpoint converter swaps the weight.

:func:`from_comfyui` reverses that exactly (round trip), and reads fused LoRAs trained elsewhere:
a block-diagonal fused up weight splits into the original pairs, a dense one into exact
full-rank pairs per projection (as diffusers' converters do). ComfyUI alphas are folded into
``lora_B`` (scale ``alpha / rank``) since a diffusers state dict carries none.
"""

from __future__ import annotations

import re

import torch

from tune_models.families import _clip_lora_keys
from tune_models.families._shared import (
    comfyui_lora_modules,
    diffusers_lora_modules,
    fuse_present_lora,
    put_comfyui,
    put_diffusers,
    split_fused_lora,
)
from tune_models.families._shared import swap_halves as _swap_halves

MLP_RATIO = 4

# Per-block 1:1 renames (diffusers suffix -> BFL suffix).
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_SWAPPED = {"norm_out.linear"}
# Fused groups: diffusers suffixes in row order -> BFL suffix; sizes as multiples of the input width.
_DOUBLE_FUSED = {
    "img_attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
}
_SINGLE_FUSED = {
    "linear1": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", MLP_RATIO)),
}
_BLOCK_RE = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_NATIVE_RE = re.compile(r"^(?P<kind>double_blocks|single_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_KINDS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
_NATIVE_KINDS = {v: k for k, v in _KINDS.items()}


TEXT_ENCODERS = {"text_encoder": "lora_te1_"}
"""Text-encoder LoRA keys (``train_text_encoder``): Flux.1's CLIP-L (``text_encoder.``) as ComfyUI's ``lora_te1_`` (:mod:`tune_models.families._clip_lora_keys`)."""


def to_comfyui(
    state_dict: dict[str, torch.Tensor], *, alpha: float | None = None, fuse: bool = True
) -> dict[str, torch.Tensor]:
    """Convert a diffusers/PEFT Flux LoRA to ComfyUI's key names (see the module docstring).

    ``alpha`` is the adapter's ``lora_alpha``; when given, ``.alpha`` entries are written so ComfyUI
    scales by ``alpha / rank`` as PEFT did; without it none are (scale 1, i.e. alpha == rank).
    ``fuse=False`` keeps projections of fused modules separate under ``diffusion_model.`` +
    diffusers names (not loadable by ComfyUI; for inspection).
    """
    encoders, state_dict = _clip_lora_keys.split_text_encoder_keys(state_dict, TEXT_ENCODERS)
    modules = diffusers_lora_modules(state_dict)
    out: dict[str, torch.Tensor] = {}

    def emit(native: str, down: torch.Tensor, up: torch.Tensor, module_alpha: float | None) -> None:
        put_comfyui(out, native, down, up, module_alpha)

    groups: dict[tuple[str, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in modules.items():
        match = _BLOCK_RE.match(module)
        if match:
            kind, n, rest = match["kind"], match["n"], match["rest"]
            native_block = f"{_KINDS[kind]}.{n}"
            renames = _DOUBLE if kind == "transformer_blocks" else _SINGLE
            fused = _DOUBLE_FUSED if kind == "transformer_blocks" else _SINGLE_FUSED
            if rest in renames:
                emit(f"{native_block}.{renames[rest]}", pair["A"], pair["B"], alpha)
                continue
            target = next((name for name, parts in fused.items() if rest in dict(parts)), None)
            if target is not None and fuse:
                groups.setdefault((native_block, target), {})[rest] = (pair["A"], pair["B"])
                continue
            if target is not None:
                emit(module, pair["A"], pair["B"], alpha)
                continue
        elif module in _TOP:
            up = _swap_halves(pair["B"]) if module in _SWAPPED else pair["B"]
            emit(_TOP[module], pair["A"], up, alpha)
            continue
        raise ValueError(f"no ComfyUI name known for Flux module {module!r}")

    for (native_block, target), present in groups.items():
        spec = (_DOUBLE_FUSED if native_block.startswith("double_blocks") else _SINGLE_FUSED)[target]
        down, up, n = fuse_present_lora(present, spec)
        emit(f"{native_block}.{target}", down, up, None if alpha is None else n * alpha)
    return out | _clip_lora_keys.to_comfyui(encoders, TEXT_ENCODERS, alpha=alpha)


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a ComfyUI-layout Flux LoRA back to diffusers layout (``transformer.`` keys)."""
    encoders, state_dict = _clip_lora_keys.split_comfyui_text_encoder_keys(state_dict, TEXT_ENCODERS)
    out: dict[str, torch.Tensor] = _clip_lora_keys.from_comfyui(encoders, TEXT_ENCODERS) if encoders else {}

    def emit(module: str, down: torch.Tensor, up: torch.Tensor) -> None:
        put_diffusers(out, module, down, up)

    top = {v: k for k, v in _TOP.items()}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():  # alpha/rank folded into up
        match = _NATIVE_RE.match(module)
        if match:
            kind, n, rest = match["kind"], match["n"], match["rest"]
            block = f"{_NATIVE_KINDS[kind]}.{n}"
            renames = {v: k for k, v in (_DOUBLE if kind == "double_blocks" else _SINGLE).items()}
            fused = _DOUBLE_FUSED if kind == "double_blocks" else _SINGLE_FUSED
            if rest in renames:
                emit(f"{block}.{renames[rest]}", down, up)
                continue
            if rest in fused:
                spec = fused[rest]
                unit = up.shape[0] // sum(ratio for _, ratio in spec)
                sizes = [ratio * unit for _, ratio in spec]
                for (name, _), pair in zip(spec, split_fused_lora(down, up, sizes)):
                    if pair is not None:
                        emit(f"{block}.{name}", *pair)
                continue
        elif _BLOCK_RE.match(module):
            emit(module, down, up)  # diffusers names under diffusion_model. (fuse=False)
            continue
        elif module in top:
            name = top[module]
            emit(name, down, _swap_halves(up) if name in _SWAPPED else up)
            continue
        raise ValueError(f"no diffusers name known for Flux ComfyUI module {module!r}")
    return out
