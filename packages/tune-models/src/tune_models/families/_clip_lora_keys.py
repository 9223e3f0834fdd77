"""Text-encoder LoRA keys of CLIP encoders: diffusers layout <-> kohya / ComfyUI names.

A trained text-encoder LoRA (``train_text_encoder``) is written in diffusers layout as
``<component>.text_model.encoder.layers.<i>.<self_attn.q_proj | mlp.fc1 | ...>.lora_A.weight``
(see :mod:`tune_models.text_encoder_lora`). kohya's scripts and ComfyUI name the same module with
the pipeline component's ``lora_te<N>_`` prefix and every ``.`` turned into ``_``:
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight``; ComfyUI maps
``lora_te1_`` to the CLIP-L and ``lora_te2_`` to the CLIP-G of the checkpoint it loads.

The families that train CLIP LoRAs pass their own component -> prefix map (SDXL and SD3:
``text_encoder`` -> ``lora_te1_``, ``text_encoder_2`` -> ``lora_te2_``; Flux.1: ``text_encoder``
-> ``lora_te1_``).
"""

from __future__ import annotations

import torch

from tune_models.families._shared import LORA_A, LORA_B, comfyui_lora_modules, dotted_module_path, put_flat_lora

# Names inside a CLIP text model that themselves contain ``_`` (longest first).
_COMPOUNDS = sorted(
    ["text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
     "layer_norm2", "token_embedding", "position_embedding", "text_projection"],
    key=lambda name: -name.count("_"),
)


def split_text_encoder_keys(
    state_dict: dict[str, torch.Tensor], components: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(text-encoder keys, the rest)`` of a diffusers-layout state dict."""
    heads = tuple(f"{c}." for c in components)
    encoders = {k: v for k, v in state_dict.items() if k.startswith(heads)}
    return encoders, {k: v for k, v in state_dict.items() if k not in encoders}


def to_comfyui(
    state_dict: dict[str, torch.Tensor], components: dict[str, str], *, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """diffusers text-encoder keys (``text_encoder.<module>.lora_A.weight``) -> ``lora_te1_<module>``
    keys (``components`` maps each component to its prefix), with ``.alpha`` when given."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        component, _, name = key.partition(".")
        prefix = components.get(component)
        if prefix is None:
            raise ValueError(f"cannot convert text-encoder LoRA key {key!r}: no ComfyUI name for {component!r}")
        if not put_flat_lora(out, prefix, name, tensor, alpha):
            raise ValueError(
                f"cannot convert LoRA key {key!r}: expected '<component>.<module>.lora_A.weight' or '.lora_B.weight'"
            )
    return out


def _module_path(flat: str) -> str:
    """``text_model_encoder_layers_0_self_attn_q_proj`` -> ``text_model.encoder.layers.0.self_attn.q_proj``."""
    return dotted_module_path(flat, _COMPOUNDS)


def from_comfyui(state_dict: dict[str, torch.Tensor], components: dict[str, str]) -> dict[str, torch.Tensor]:
    """``lora_te<N>_...`` keys -> diffusers layout (``text_encoder.text_model....lora_A.weight``),
    alpha / rank folded into the up weights. Keys of prefixes not in ``components`` are an error
    (the caller drops what it does not read)."""
    by_prefix = {prefix: component for component, prefix in components.items()}
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():
        prefix = next((p for p in by_prefix if module.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"cannot read text-encoder LoRA module {module!r}: expected one of {sorted(by_prefix)}")
        path = f"{by_prefix[prefix]}.{_module_path(module.removeprefix(prefix))}"
        out[f"{path}{LORA_A}"] = down
        out[f"{path}{LORA_B}"] = up
    return out


def split_comfyui_text_encoder_keys(
    state_dict: dict[str, torch.Tensor], components: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(lora_te<N>_ keys of ``components``' prefixes, the rest)`` of a ComfyUI-layout state dict."""
    prefixes = tuple(components.values())
    encoders = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    return encoders, {k: v for k, v in state_dict.items() if k not in encoders}
