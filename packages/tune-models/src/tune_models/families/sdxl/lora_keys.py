"""SDXL LoRA key names: diffusers/PEFT layout <-> the kohya / ComfyUI ``lora_unet_...`` layout.

kohya's format names a module by its path with every ``.`` turned into ``_`` under
``lora_unet_``, with ``lora_down`` / ``lora_up`` weights and an ``alpha`` scalar:

==========================================================  ===========================================================
diffusers (``unet.``)                                        kohya / ComfyUI
==========================================================  ===========================================================
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``  ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``
``mid_block.attentions.0.proj_in``                          ``lora_unet_mid_block_attentions_0_proj_in``
``up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2``  ``lora_unet_up_blocks_0_attentions_2_transformer_blocks_3_ff_net_2``
==========================================================  ===========================================================

We write that diffusers-path spelling (what diffusers' ``convert_state_dict_to_kohya`` writes;
ComfyUI, kohya's scripts and the A1111 family all load it). Reading also accepts the spelling
of kohya's own SDXL trainer, which uses Stability's (SGM) module tree:
``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` is ``down_blocks.1.attentions.0....``,
``middle_block_1_...`` is ``mid_block.attentions.0...``, ``output_blocks_3_1_...`` is
``up_blocks.1.attentions.0...`` (SDXL's layout: two layers per down block, three per up block).
Only the transformer (attention) parts of the SGM tree are mapped, which is what SDXL LoRAs
adapt; other SGM modules raise a clear error. Text-encoder modules (``train_text_encoder``) are
``lora_te1_`` (CLIP-L, ``text_encoder.``) and ``lora_te2_`` (OpenCLIP-G, ``text_encoder_2.``), both
ways (:mod:`tune_models.families._clip_lora_keys`); kohya's single-encoder ``lora_te_`` is skipped
with a warning.

``alpha / rank`` is folded into the up weights on reading, as for every family.
"""

from __future__ import annotations

import logging
import re

import torch

from tune_models.families import _clip_lora_keys
from tune_models.families._shared import LORA_A, LORA_B, comfyui_lora_modules, dotted_module_path, put_flat_lora

log = logging.getLogger(__name__)

PREFIX = "lora_unet_"
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
TEXT_ENCODERS = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
"""Pipeline component -> kohya / ComfyUI prefix of its text-encoder LoRA keys."""
# Names inside UNet2DConditionModel that themselves contain ``_`` (longest first).
_COMPOUNDS = sorted(
    [
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "add_embedding", "linear_1", "linear_2",
    ],
    key=lambda name: -name.count("_"),
)
_SGM = re.compile(r"^(?P<kind>input_blocks|output_blocks)_(?P<n>\d+)_1_(?P<rest>.+)$")
_SDXL_DOWN_LAYERS, _SDXL_UP_LAYERS = 2, 3


def to_comfyui(state_dict: dict[str, torch.Tensor], *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """diffusers/PEFT SDXL LoRA (``unet.<module>.lora_A/B.weight``, and ``text_encoder.`` /
    ``text_encoder_2.`` keys) -> kohya/ComfyUI keys."""
    encoders, state_dict = _clip_lora_keys.split_text_encoder_keys(state_dict, TEXT_ENCODERS)
    out = _clip_lora_keys.to_comfyui(encoders, TEXT_ENCODERS, alpha=alpha)
    for key, tensor in state_dict.items():
        if not put_flat_lora(out, PREFIX, key.removeprefix("unet."), tensor, alpha):
            raise ValueError(
                f"cannot convert LoRA key {key!r}: expected 'unet.<module>.lora_A.weight' or '.lora_B.weight' "
                "(plain LoRA in diffusers/PEFT layout)"
            )
    return out


def _diffusers_path(flat: str) -> str:
    """``down_blocks_1_attentions_0_..._to_out_0`` -> ``down_blocks.1.attentions.0....to_out.0``."""
    sgm = _SGM.match(flat)
    if sgm:
        n = int(sgm["n"])
        if sgm["kind"] == "input_blocks":
            block, layer = divmod(n - 1, _SDXL_DOWN_LAYERS + 1)
            flat = f"down_blocks_{block}_attentions_{layer}_{sgm['rest']}"
        else:
            block, layer = divmod(n, _SDXL_UP_LAYERS)
            flat = f"up_blocks_{block}_attentions_{layer}_{sgm['rest']}"
    elif flat.startswith("middle_block_1_"):
        flat = "mid_block_attentions_0_" + flat.removeprefix("middle_block_1_")
    elif flat.startswith(("input_blocks_", "middle_block_", "output_blocks_")):
        raise ValueError(
            f"cannot read kohya SDXL LoRA module {PREFIX}{flat!r}: only the transformer (attention) "
            "modules of Stability's UNet tree are mapped"
        )
    return dotted_module_path(flat, _COMPOUNDS)


def from_comfyui(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya/ComfyUI SDXL LoRA -> diffusers layout (``unet.<module>.lora_A/B.weight``; the CLIPs'
    ``lora_te1_`` / ``lora_te2_`` keys as ``text_encoder.`` / ``text_encoder_2.``)."""
    known = tuple(TEXT_ENCODERS.values())
    skipped = [k for k in state_dict if k.startswith(_TEXT_ENCODER_PREFIXES) and not k.startswith(known)]
    if skipped:
        log.warning("skipping %d text-encoder LoRA weights of an unknown encoder (lora_te_)", len(skipped))
    encoders = {k: v for k, v in state_dict.items() if k.startswith(known)}
    unet = {k: v for k, v in state_dict.items() if not k.startswith(_TEXT_ENCODER_PREFIXES)}
    out = _clip_lora_keys.from_comfyui(encoders, TEXT_ENCODERS) if encoders else {}
    for module, (down, up) in comfyui_lora_modules(unet).items():
        if not module.startswith(PREFIX):
            raise ValueError(f"cannot read SDXL LoRA module {module!r}: expected names starting with {PREFIX!r}")
        path = _diffusers_path(module.removeprefix(PREFIX))
        out[f"unet.{path}{LORA_A}"] = down
        out[f"unet.{path}{LORA_B}"] = up
    return out
