"""Qwen-Image LoRA keys: diffusers/PEFT layout <-> ComfyUI layout.

Qwen-Image was published in diffusers layout, and ComfyUI's own Qwen-Image model keeps those
module names (``transformer_blocks.N.attn.to_q``, ``img_mlp.net.0.proj``, ...) under
``diffusion_model.``. Sources checked:

- ComfyUI ``comfy/lora.py`` (``model_lora_keys_unet``, the ``comfy.model_base.QwenImage`` branch,
  v0.3.77): every ``diffusion_model.<module>.weight`` of the model is reachable as ``<module>``,
  ``transformer.<module>`` and ``lycoris_<module with _>``; the generic branch above it maps
  ``diffusion_model.<module>`` for every model.
- diffusers 0.42 ``_convert_non_diffusers_qwen_lora_to_diffusers`` (used by
  ``QwenImagePipeline.lora_state_dict``): strips ``diffusion_model.``, reads
  ``lora_down``/``lora_up`` and folds ``.alpha`` as ``alpha / rank``, with no renaming of modules.

So ``to_comfyui`` writes ``diffusion_model.<diffusers module>.lora_down/lora_up.weight`` (plus
``.alpha`` when given); no fusing is needed, and the round trip is exact (an ``.alpha`` other
than the rank is folded into ``lora_up`` on the way back, as diffusers does).
"""

from __future__ import annotations

import torch

from tune_models.families._shared import comfyui_lora_modules, diffusers_lora_modules, put_comfyui, put_diffusers


def to_comfyui(state_dict: dict[str, torch.Tensor], *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """``transformer.<module>.lora_A/B.weight`` -> ``diffusion_model.<module>.lora_down/up.weight``
    (+ ``.alpha`` = ``alpha`` when given; without it ComfyUI applies the LoRA at scale 1)."""
    out: dict[str, torch.Tensor] = {}
    for module, pair in diffusers_lora_modules(state_dict).items():
        put_comfyui(out, module, pair["A"], pair["B"], alpha)
    return out


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_comfyui`; also reads ``lora_A``/``lora_B``-named ComfyUI files."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in comfyui_lora_modules(state_dict).items():
        put_diffusers(out, module.removeprefix("transformer."), down, up)
    return out
