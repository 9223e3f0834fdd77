"""FLUX.2 LoRA key conversion (diffusers/PEFT <-> ComfyUI/BFL names) on synthetic state dicts."""

from __future__ import annotations

import pytest
import torch

from tune_models.families.flux2 import lora_keys

DIM, RANK = 8, 2


def pair(module: str, out: int = DIM, inp: int = DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"transformer.{module}.lora_A.weight": torch.randn(RANK, inp, generator=generator),
        f"transformer.{module}.lora_B.weight": torch.randn(out, RANK, generator=generator),
    }


def delta(state_dict: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    return state_dict[f"transformer.{module}.lora_B.weight"] @ state_dict[f"transformer.{module}.lora_A.weight"]


def full_state_dict() -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    modules = [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.to_add_out", "transformer_blocks.3.ff.linear_out",
        "transformer_blocks.3.ff_context.linear_out", "single_transformer_blocks.7.attn.to_out",
        "x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
        "time_guidance_embed.guidance_embedder.linear_2", "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear", "single_stream_modulation.linear", "proj_out",
    ]
    for i, module in enumerate(modules):
        sd.update(pair(module, seed=i))
    sd.update(pair("transformer_blocks.3.ff.linear_in", out=6 * DIM, seed=50))  # SwiGLU: 2 x 3 x dim
    sd.update(pair("transformer_blocks.3.ff_context.linear_in", out=6 * DIM, seed=51))
    sd.update(pair("single_transformer_blocks.7.attn.to_qkv_mlp_proj", out=9 * DIM, seed=52))
    sd.update(pair("norm_out.linear", out=2 * DIM, seed=53))
    return sd


def test_bfl_names():
    comfy = lora_keys.to_comfyui(full_state_dict())
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in comfy}
    assert modules == {
        "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
        "double_blocks.0.txt_attn.proj", "double_blocks.3.img_mlp.0", "double_blocks.3.img_mlp.2",
        "double_blocks.3.txt_mlp.0", "double_blocks.3.txt_mlp.2", "single_blocks.7.linear1",
        "single_blocks.7.linear2", "img_in", "txt_in", "time_in.in_layer", "guidance_in.out_layer",
        "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
        "final_layer.linear", "final_layer.adaLN_modulation.1",
    }
    assert not any(k.endswith(".alpha") for k in comfy)


def test_round_trip_is_exact_and_fused_qkv_is_the_stacked_deltas():
    sd = full_state_dict()
    comfy = lora_keys.to_comfyui(sd, alpha=RANK)
    down = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"]
    up = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]
    assert down.shape == (3 * RANK, DIM) and up.shape == (3 * DIM, 3 * RANK)
    stacked = torch.cat([delta(sd, f"transformer_blocks.0.attn.{p}") for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(up @ down, stacked)
    assert float(comfy["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == 3 * RANK
    assert float(comfy["diffusion_model.single_blocks.7.linear1.alpha"]) == RANK
    back = lora_keys.from_comfyui(comfy)
    assert set(back) == set(sd)
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor), key


def test_final_modulation_halves_are_swapped():
    sd = full_state_dict()
    comfy = lora_keys.to_comfyui(sd)
    up = sd["transformer.norm_out.linear.lora_B.weight"]
    native = comfy["diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight"]
    torch.testing.assert_close(native[:DIM], up[DIM:])  # BFL (shift, scale) vs diffusers (scale, shift)
    torch.testing.assert_close(native[DIM:], up[:DIM])


def test_partial_qkv_and_alpha_folding():
    sd = {**pair("transformer_blocks.1.attn.add_k_proj", seed=7)}
    comfy = lora_keys.to_comfyui(sd, alpha=4 * RANK)  # scale 4 in PEFT
    back = lora_keys.from_comfyui(comfy)
    assert set(back) == set(sd)
    torch.testing.assert_close(delta(back, "transformer_blocks.1.attn.add_k_proj"), 4 * delta(sd, "transformer_blocks.1.attn.add_k_proj"))


def test_dense_fused_lora_from_elsewhere_splits_exactly():
    generator = torch.Generator().manual_seed(9)
    down, up = torch.randn(RANK, DIM, generator=generator), torch.randn(3 * DIM, RANK, generator=generator)
    comfy = {
        "diffusion_model.double_blocks.2.txt_attn.qkv.lora_down.weight": down,
        "diffusion_model.double_blocks.2.txt_attn.qkv.lora_up.weight": up,
    }
    back = lora_keys.from_comfyui(comfy)
    stacked = torch.cat([delta(back, f"transformer_blocks.2.attn.{p}") for p in ("add_q_proj", "add_k_proj", "add_v_proj")])
    torch.testing.assert_close(stacked, up @ down)


def test_unknown_modules_are_named():
    with pytest.raises(ValueError, match="no ComfyUI name known for FLUX.2 module 'transformer_blocks.0.norm1'"):
        lora_keys.to_comfyui(pair("transformer_blocks.0.norm1"))
    with pytest.raises(ValueError, match="no diffusers name known"):
        lora_keys.from_comfyui({
            "diffusion_model.double_blocks.0.img_mod.lin.lora_down.weight": torch.zeros(RANK, DIM),
            "diffusion_model.double_blocks.0.img_mod.lin.lora_up.weight": torch.zeros(DIM, RANK),
        })
