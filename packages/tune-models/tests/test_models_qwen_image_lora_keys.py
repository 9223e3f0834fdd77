"""Qwen-Image ComfyUI LoRA keys: pure tensor tests (no model)."""

from __future__ import annotations

import pytest
import torch

from tune_models.families.qwen_image import lora_keys


def lora(modules, rank=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, dim, generator=g)
        out[f"transformer.{m}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
    return out


MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.3.img_mlp.net.0.proj"]


def test_names_are_diffusers_modules_under_diffusion_model():
    comfy = lora_keys.to_comfyui(lora(MODULES))
    assert set(comfy) == {f"diffusion_model.{m}.lora_{s}.weight" for m in MODULES for s in ("down", "up")}


def test_round_trip_is_exact_with_and_without_alpha():
    sd = lora(MODULES)
    for alpha in (None, 2.0):  # alpha == rank: ComfyUI's scale is 1
        back = lora_keys.from_comfyui(lora_keys.to_comfyui(sd, alpha=alpha))
        assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_alpha_is_folded_into_up_on_read():
    sd = lora(MODULES[:1])
    comfy = lora_keys.to_comfyui(sd, alpha=4.0)  # rank 2: scale 2
    assert float(comfy[f"diffusion_model.{MODULES[0]}.alpha"]) == 4.0
    back = lora_keys.from_comfyui(comfy)
    torch.testing.assert_close(back[f"transformer.{MODULES[0]}.lora_B.weight"], 2 * sd[f"transformer.{MODULES[0]}.lora_B.weight"])


def test_agrees_with_diffusers_qwen_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    sd = lora(MODULES)
    ours = lora_keys.from_comfyui(lora_keys.to_comfyui(sd, alpha=2.0))
    theirs = _convert_non_diffusers_qwen_lora_to_diffusers(lora_keys.to_comfyui(sd, alpha=2.0))
    assert set(ours) == set(theirs)  # both under transformer.
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor)


def test_bad_keys_are_refused():
    with pytest.raises(ValueError, match="cannot convert"):
        lora_keys.to_comfyui({"transformer.x.weight": torch.zeros(1)})
