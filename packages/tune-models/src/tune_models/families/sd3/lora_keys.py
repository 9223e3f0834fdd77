"""SD3 LoRA key names: diffusers/PEFT layout <-> ComfyUI layout (Stability's MMDiT module tree).

ComfyUI runs SD3 with Stability's original module names. The table was checked against
diffusers' single-file converter (``convert_sd3_transformer_checkpoint_to_diffusers``):

=====================================================  =====================================================
diffusers (``transformer.``)                            Stability / ComfyUI (``diffusion_model.``)
=====================================================  =====================================================
``transformer_blocks.N.attn.to_q/to_k/to_v``            ``joint_blocks.N.x_block.attn.qkv`` (fused, rows q,k,v)
``transformer_blocks.N.attn.add_q/k/v_proj``            ``joint_blocks.N.context_block.attn.qkv`` (fused)
``transformer_blocks.N.attn2.to_q/to_k/to_v``           ``joint_blocks.N.x_block.attn2.qkv`` (fused; 3.5 Medium)
``transformer_blocks.N.attn.to_out.0`` / ``to_add_out`` ``joint_blocks.N.x_block.attn.proj`` / ``context_block.attn.proj``
``transformer_blocks.N.attn2.to_out.0``                 ``joint_blocks.N.x_block.attn2.proj``
``transformer_blocks.N.ff.net.0.proj`` / ``ff.net.2``   ``joint_blocks.N.x_block.mlp.fc1`` / ``mlp.fc2``
``transformer_blocks.N.ff_context.net.0.proj`` / ``.2`` ``joint_blocks.N.context_block.mlp.fc1`` / ``fc2``
``transformer_blocks.N.norm1.linear``                   ``joint_blocks.N.x_block.adaLN_modulation.1``
``transformer_blocks.N.norm1_context.linear``           ``joint_blocks.N.context_block.adaLN_modulation.1`` (last block: halves swapped)
``context_embedder``                                    ``context_embedder``
``time_text_embed.timestep_embedder.linear_1/2``        ``t_embedder.mlp.0`` / ``mlp.2``
``time_text_embed.text_embedder.linear_1/2``            ``y_embedder.mlp.0`` / ``mlp.2``
``proj_out`` / ``norm_out.linear``                      ``final_layer.linear`` / ``final_layer.adaLN_modulation.1`` (halves swapped)
=====================================================  =====================================================

The layout and the exact fusion are those of the Flux converter (see
:mod:`tune_models.families.flux.lora_keys`): ``lora_down``/``lora_up`` (+ ``alpha``, multiplied
by the number of fused projections), block-diagonal fused up weights with zero rows for a
projection without a LoRA; the reverse reads those and dense fused LoRAs exactly. The last
block's ``norm1_context`` is an ``AdaLayerNormContinuous`` (2 x width outputs, scale/shift in
diffusers, shift/scale in Stability's tree), recognised by its shape.
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

_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_TOP = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK_RE = re.compile(r"^transformer_blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_NATIVE_RE = re.compile(r"^joint_blocks\.(?P<n>\d+)\.(?P<rest>.+)$")


def _swapped(diffusers_module: str, down: torch.Tensor, up: torch.Tensor) -> bool:
    """Modules whose (scale, shift) output halves are (shift, scale) in Stability's tree."""
    if diffusers_module == "norm_out.linear":
        return True
    return diffusers_module.endswith("norm1_context.linear") and up.shape[0] == 2 * down.shape[1]


TEXT_ENCODERS = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
"""Text-encoder LoRA keys (``train_text_encoder``): SD3's CLIP-L / CLIP-G (``text_encoder.`` / ``text_encoder_2.``) as ComfyUI's ``lora_te1_`` / ``lora_te2_`` (:mod:`tune_models.families._clip_lora_keys`)."""


def to_comfyui(state_dict: dict[str, torch.Tensor], *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Convert a diffusers/PEFT SD3 LoRA to ComfyUI's key names (see the module docstring)."""
    encoders, state_dict = _clip_lora_keys.split_text_encoder_keys(state_dict, TEXT_ENCODERS)
    out: dict[str, torch.Tensor] = {}

    def emit(native: str, down: torch.Tensor, up: torch.Tensor, module_alpha: float | None) -> None:
        put_comfyui(out, native, down, up, module_alpha)

    groups: dict[tuple[str, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in diffusers_lora_modules(state_dict).items():
        down, up = pair["A"], pair["B"]
        match = _BLOCK_RE.match(module)
        if match and match["rest"] in _BLOCK:
            up = _swap_halves(up) if _swapped(module, down, up) else up
            emit(f"joint_blocks.{match['n']}.{_BLOCK[match['rest']]}", down, up, alpha)
        elif match and any(match["rest"] in parts for parts in _FUSED.values()):
            target = next(name for name, parts in _FUSED.items() if match["rest"] in parts)
            groups.setdefault((f"joint_blocks.{match['n']}", target), {})[match["rest"]] = (down, up)
        elif module in _TOP:
            emit(_TOP[module], down, _swap_halves(up) if _swapped(module, down, up) else up, alpha)
        else:
            raise ValueError(f"no ComfyUI name known for SD3 module {module!r}")
    for (block, target), present in groups.items():
        down, up, n = fuse_present_lora(present, [(name, 1) for name in _FUSED[target]])
        emit(f"{block}.{target}", down, up, None if alpha is None else n * alpha)
    return out | _clip_lora_keys.to_comfyui(encoders, TEXT_ENCODERS, alpha=alpha)


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a ComfyUI-layout SD3 LoRA back to diffusers layout (``transformer.`` keys)."""
    encoders, state_dict = _clip_lora_keys.split_comfyui_text_encoder_keys(state_dict, TEXT_ENCODERS)
    out: dict[str, torch.Tensor] = _clip_lora_keys.from_comfyui(encoders, TEXT_ENCODERS) if encoders else {}

    def emit(module: str, down: torch.Tensor, up: torch.Tensor) -> None:
        put_diffusers(out, module, down, up)

    block_names = {v: k for k, v in _BLOCK.items()}
    top_names = {v: k for k, v in _TOP.items()}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():  # alpha/rank folded into up
        match = _NATIVE_RE.match(module)
        if match and match["rest"] in block_names:
            name = f"transformer_blocks.{match['n']}.{block_names[match['rest']]}"
            emit(name, down, _swap_halves(up) if _swapped(name, down, up) else up)
        elif match and match["rest"] in _FUSED:
            names = _FUSED[match["rest"]]
            unit = up.shape[0] // len(names)
            for name, pair in zip(names, split_fused_lora(down, up, [unit] * len(names))):
                if pair is not None:
                    emit(f"transformer_blocks.{match['n']}.{name}", *pair)
        elif module in top_names:
            name = top_names[module]
            emit(name, down, _swap_halves(up) if _swapped(name, down, up) else up)
        else:
            raise ValueError(f"no diffusers name known for SD3 ComfyUI module {module!r}")
    return out
