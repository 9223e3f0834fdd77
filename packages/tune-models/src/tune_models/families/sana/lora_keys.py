"""Sana LoRA keys: diffusers/PEFT layout <-> the original (NVlabs) module names, for ComfyUI.

ComfyUI core has no Sana model of its own (as far as we checked); Sana runs there through custom
nodes that load the original NVlabs checkpoint, whose module tree differs from diffusers'. The
renames, per block (diffusers ``transformer_blocks.N`` <-> original ``blocks.N``), from the Sana
repository's diffusers conversion script as mirrored in public converters:

=========================================  ==========================================
diffusers                                  original
=========================================  ==========================================
``attn1.to_q`` / ``to_k`` / ``to_v``       one fused ``attn.qkv`` (rows q, k, v)
``attn1.to_out.0``                         ``attn.proj``
``attn2.to_q``                             ``cross_attn.q_linear``
``attn2.to_k`` / ``to_v``                  one fused ``cross_attn.kv_linear`` (rows k, v)
``attn2.to_out.0``                         ``cross_attn.proj``
``ff.conv_inverted`` / ``conv_depth`` /    ``mlp.inverted_conv.conv`` / ``depth_conv.conv`` /
``conv_point``                             ``point_conv.conv``
=========================================  ==========================================

**Layout we write** (:func:`to_comfyui`): ``diffusion_model.`` + original module +
``.lora_down.weight`` / ``.lora_up.weight`` (+ ``.alpha`` when an alpha is given), the layout
ComfyUI's generic LoRA rule reads for any model whose weights use those names. Fused projections
are exact (downs stacked, ups block-diagonal; the alpha is multiplied by the number of parts, since
the rank is); a block lacking one of the parts, or with unequal ranks, keeps them separate under
diffusers names. Modules outside the blocks (reached only through a ``lora_target`` that names
them) take their original names too, from the same script:

=================================================  ==========================================
``patch_embed.proj``                               ``x_embedder.proj``
``caption_projection.linear_1`` / ``linear_2``     ``y_embedder.y_proj.fc1`` / ``fc2``
``time_embed.emb.timestep_embedder.linear_1/2``    ``t_embedder.mlp.0`` / ``.2``
``time_embed.linear``                              ``t_block.1``
``proj_out``                                       ``final_layer.linear``
=================================================  ==========================================

Any other module keeps its diffusers name. :func:`from_comfyui` reverses it exactly and splits
dense fused LoRAs exactly as full-rank parts.
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

_FUSED = {  # diffusers attention -> (original fused module, the projections in row order)
    "attn1": ("attn.qkv", ("to_q", "to_k", "to_v")),
    "attn2": ("cross_attn.kv_linear", ("to_k", "to_v")),
}
_RENAMES = (
    ("attn1.to_out.0", "attn.proj"),
    ("attn2.to_q", "cross_attn.q_linear"),
    ("attn2.to_out.0", "cross_attn.proj"),
    ("ff.conv_inverted", "mlp.inverted_conv.conv"),
    ("ff.conv_depth", "mlp.depth_conv.conv"),
    ("ff.conv_point", "mlp.point_conv.conv"),
)
_TOP_LEVEL = (  # (diffusers module, original module) outside the blocks
    ("patch_embed.proj", "x_embedder.proj"),
    ("caption_projection.linear_1", "y_embedder.y_proj.fc1"),
    ("caption_projection.linear_2", "y_embedder.y_proj.fc2"),
    ("time_embed.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_embed.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_embed.linear", "t_block.1"),
    ("proj_out", "final_layer.linear"),
)
_BLOCK_RE = re.compile(r"^transformer_blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_NATIVE_BLOCK_RE = re.compile(r"^blocks\.(?P<n>\d+)\.(?P<rest>.+)$")


def to_comfyui(state_dict: dict[str, torch.Tensor], *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """diffusers/PEFT Sana LoRA -> original module names under ``diffusion_model.`` (see the
    module docstring). ``alpha`` is the adapter's ``lora_alpha``; without it no ``.alpha`` is
    written (scale 1, as diffusers applies a bare state dict)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in diffusers_lora_modules(state_dict).items():
        match = _BLOCK_RE.match(module)
        if match is None:
            put_comfyui(out, dict(_TOP_LEVEL).get(module, module), pair["A"], pair["B"], alpha)
            continue
        n, rest = match["n"], match["rest"]
        attention, _, proj = rest.partition(".")
        if attention in _FUSED and proj in _FUSED[attention][1]:
            fused.setdefault((n, attention), {})[proj] = (pair["A"], pair["B"])
            continue
        native = dict(_RENAMES).get(rest)
        put_comfyui(out, f"blocks.{n}.{native}" if native else module, pair["A"], pair["B"], alpha)
    for (n, attention), projections in fused.items():
        native, order = _FUSED[attention]
        put_fused_comfyui(out, projections, order, f"blocks.{n}.{native}", f"transformer_blocks.{n}.{attention}", alpha)
    return out


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_comfyui` (``alpha / rank`` folded into the up weights); also reads
    ``lora_A``/``lora_B``-named files and dense fused LoRAs."""
    renames = {native: name for name, native in _RENAMES}
    top_level = {native: name for name, native in _TOP_LEVEL}
    fused = {native: (attention, order) for attention, (native, order) in _FUSED.items()}
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():
        module = module.removeprefix("transformer.")
        match = _NATIVE_BLOCK_RE.match(module)
        if match is None:
            put_diffusers(out, top_level.get(module, module), down, up)
            continue
        n, rest = match["n"], match["rest"]
        if rest in fused:
            attention, order = fused[rest]
            if up.shape[0] % len(order):
                raise ValueError(f"{module}: fused up weight has {up.shape[0]} rows, not {len(order)} equal parts")
            size = up.shape[0] // len(order)
            for proj, pair in zip(order, split_fused_lora(down, up, [size] * len(order))):
                if pair is not None:
                    put_diffusers(out, f"transformer_blocks.{n}.{attention}.{proj}", *pair)
        elif rest in renames:
            put_diffusers(out, f"transformer_blocks.{n}.{renames[rest]}", down, up)
        else:
            raise ValueError(f"cannot map Sana LoRA module {module!r} to diffusers names")
    return out
