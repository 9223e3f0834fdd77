"""Lumina 2: the conformance suite, plus conventions checked against diffusers' Lumina2Pipeline.

One tiny Lumina 2 is built per session (``lumina_path``) and shared by every test here; torch is
pinned to one thread while this module runs (tiny matrices on a shared CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.family import get_family
from tune_models.testing import ModelFamilyTests, assert_padding_is_masked
from tune_models.testing import load_tiny as load

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["a cat", "a much longer prompt about a red square"]


class TestLumina2Conformance(ModelFamilyTests):
    family_name = "lumina2"
    tiny_path_fixture = "lumina_path"  # the session's tiny model, built once


def test_names_and_flavours(lumina):
    assert get_family("Lumina2") is lumina and get_family("lumina-image-2") is lumina
    base = lumina.flavour(None)
    assert (base.name, base.pretrained, base.inference_steps, base.guidance, base.shift) == (
        "base", "Alpha-VLLM/Lumina-Image-2.0", 50, 4.0, 6.0
    )
    assert set(lumina.flavours) == {"base", "neta-lumina", "tiny"}
    assert lumina.flavour("2.0") is base  # SimpleTuner's name
    assert set(lumina.lora_target_presets["attention"]) < set(lumina.lora_target_presets["all"])
    from tune_models.registry import model_families

    info = model_families.get("lumina2").info
    assert set(info["flavours"]) == set(lumina.flavours) and info["default_flavour"] == "base"
    assert set(info["lora_targets"]) == set(lumina.lora_target_presets)


def test_system_prompt_matches_the_pipeline(lumina, lumina_path):
    from tune_models.families.lumina2 import family as module

    assert module.SYSTEM_PROMPT == lumina.validation_pipeline(load(lumina, lumina_path)).system_prompt


def test_prompts_and_masks_match_the_pipeline(lumina, lumina_path):
    """The cached tokens are the pipeline's (system prompt, 2nd-to-last Gemma layer) at its real
    positions; the pipeline's padding is what the mask hides."""
    model = load(lumina, lumina_path)
    encoded = lumina.encode_prompts(model, PROMPTS)
    embeds, mask, _, _ = lumina.validation_pipeline(model).encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    batch = lumina.collate_prompts(encoded, "cpu", torch.float32)
    length = batch["prompt_embeds"].shape[1]
    assert embeds.shape[1] == 256 and length < 256
    assert torch.equal(mask[:, :length], batch["prompt_attention_mask"]) and not mask[:, length:].any()
    valid = batch["prompt_attention_mask"].bool()
    torch.testing.assert_close(batch["prompt_embeds"][valid], embeds[:, :length][valid])
    assert not batch["prompt_embeds"][~valid].any()
    assert encoded[0]["prompt_embeds"].shape[0] < encoded[1]["prompt_embeds"].shape[0]


def test_predict_is_the_pipelines_velocity(lumina, lumina_path):
    """One Euler step of Lumina2Pipeline (no CFG) from its first sigma ``s`` to 0 returns
    ``x - s v``; ``predict`` at ``s`` must give that ``v``: time reversal (``t = 1 - sigma``), the
    output's sign and the prompt mask (two prompts of different lengths) agree with the pipeline."""
    model = load(lumina, lumina_path)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = lumina.validation_pipeline(model)
    out = pipe(
        prompt=PROMPTS, height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
        latents=latents, output_type="latent", sigmas=[0.5],
    ).images
    sigma = float(pipe.scheduler.sigmas[0])
    assert 0.5 < sigma < 1  # the scheduler's shift 6 moved it
    cond = lumina.collate_prompts(lumina.encode_prompts(model, PROMPTS), "cpu", torch.float32)
    with torch.no_grad():
        velocity = lumina.predict(model, latents, torch.tensor([sigma, sigma]), cond)
    torch.testing.assert_close(out, latents - sigma * velocity, rtol=1e-4, atol=1e-5)


def test_mask_hides_padding(lumina, lumina_path):
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    assert_padding_is_masked(lumina, load(lumina, lumina_path), PROMPTS, latents, mask_key="prompt_attention_mask")


def test_latents_use_the_flux_vae_scaling(lumina, lumina_path):
    model = load(lumina, lumina_path)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = lumina.encode_images(model, pixels)
    cfg = model.vae.config
    raw = model.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latents, (raw - cfg.shift_factor) * cfg.scaling_factor)
    assert latents.shape == (1, 16, 8, 8)  # 8x, as Lumina2Pipeline assumes
    assert lumina.decode_latents(model, latents).shape == pixels.shape
    with pytest.raises(ValueError, match="multiple of 16"):
        lumina.encode_images(model, torch.zeros(1, 3, 56, 64))


def test_negative_prompt_and_cfg_reach_the_pipeline(lumina, lumina_path):
    """With guidance > 1 the negative prompt changes the image (CFG runs in the first quarter of
    the steps: 4 steps -> step 0); at guidance 1 it is unused."""
    model = load(lumina, lumina_path)
    pipe = lumina.validation_pipeline(model)

    def image(negative, guidance):
        picture = lumina.generate(
            pipe, "a cat", width=64, height=64, steps=4, guidance=guidance, seed=0, negative_prompt=negative
        )
        return np.asarray(picture).astype(np.int16)

    assert np.abs(image("blurry", 4.0) - image(None, 4.0)).max() > 0
    assert np.array_equal(image("blurry", 1.0), image(None, 1.0))


def test_lora_changes_pipeline_output_in_both_layouts(lumina, lumina_path, tmp_path):
    """A few LoRA steps, saved in diffusers layout and in ComfyUI layout (read back through
    ``lora_state_dict``), reproduce the trained model in Lumina2Pipeline."""
    from safetensors.torch import save_file

    suite = TestLumina2Conformance()
    model = load(lumina, lumina_path)
    losses = suite.train(lumina, model, alpha=8)
    assert losses[-1] < losses[0]
    expected = suite.image(lumina, lumina.validation_pipeline(model))
    plain = suite.image(lumina, lumina.validation_pipeline(load(lumina, lumina_path)))
    assert np.abs(expected - plain).max() > 2, "the trained LoRA does not change the image"

    state_dict = adapters.training_lora_state_dict(model)
    comfy = lumina.to_comfyui(state_dict, alpha=8)
    for native in ("layers.0.attention.qkv", "context_refiner.0.attention.out", "noise_refiner.0.feed_forward.w1"):
        assert f"diffusion_model.{native}.lora_down.weight" in comfy, native
    assert float(comfy["diffusion_model.layers.0.attention.qkv.alpha"]) == 24.0  # fused rank 3r
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = lumina.lora_state_dict(tmp_path / "comfy.safetensors")
    assert set(back) == set(state_dict)
    pipe = lumina.validation_pipeline(load(lumina, lumina_path))
    pipe.load_lora_weights(dict(back))
    assert np.abs(suite.image(lumina, pipe) - expected).max() <= 1


def test_fused_qkv_is_exact_with_grouped_query_sizes():
    """q, k, v of different sizes (grouped-query attention) fuse into one ``qkv`` whose
    ``up @ down`` stacks the three deltas, and split back exactly; a dense fused LoRA from another
    trainer splits into parts with the same deltas."""
    from tune_models.families.lumina2 import lora_keys

    g = torch.Generator().manual_seed(0)
    hidden, kv, rank = 32, 16, 4
    sd = {}
    for proj, rows in (("to_q", hidden), ("to_k", kv), ("to_v", kv)):
        sd[f"transformer.layers.0.attn.{proj}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
        sd[f"transformer.layers.0.attn.{proj}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    sd["transformer.layers.0.norm1.linear.lora_A.weight"] = torch.randn(rank, 32, generator=g)
    sd["transformer.layers.0.norm1.linear.lora_B.weight"] = torch.randn(128, rank, generator=g)
    comfy = lora_keys.to_comfyui(sd)
    down = comfy["diffusion_model.layers.0.attention.qkv.lora_down.weight"]
    up = comfy["diffusion_model.layers.0.attention.qkv.lora_up.weight"]
    def delta(state, proj):
        key = f"transformer.layers.0.attn.{proj}"
        return state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]

    deltas = [delta(sd, p) for p in ("to_q", "to_k", "to_v")]
    torch.testing.assert_close(up @ down, torch.cat(deltas))
    assert "diffusion_model.layers.0.adaLN_modulation.1.lora_up.weight" in comfy
    back = lora_keys.from_comfyui(comfy)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    qkv = "diffusion_model.layers.0.attention.qkv"
    dense_down, dense_up = torch.randn(6, hidden, generator=g), torch.randn(hidden + 2 * kv, 6, generator=g)
    parts = lora_keys.from_comfyui({f"{qkv}.lora_down.weight": dense_down, f"{qkv}.lora_up.weight": dense_up})
    stacked = torch.cat([delta(parts, p) for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(stacked, dense_up @ dense_down)


def test_text_encoder_override(lumina, lumina_path, tmp_path):
    """``pretrained_text_encoder_model_name_or_path`` (config key
    ``pretrained_gemma_model_name_or_path``) loads Gemma from another place: a bare encoder folder
    (config and tokenizer at its root) or a pipeline folder."""
    from tune_models.families import _gemma

    tokenizer = _gemma.gemma_tokenizer()
    torch.manual_seed(5)
    other = _gemma.tiny_gemma2(tokenizer)
    other.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    model = load(lumina, lumina_path, pretrained_text_encoder_model_name_or_path=str(tmp_path / "gemma"))
    for (name, loaded), saved in zip(model.text_encoder.named_parameters(), other.parameters()):
        assert torch.equal(loaded, saved), name
    assert not model.text_encoder.training and not any(p.requires_grad for p in model.text_encoder.parameters())
    same = load(lumina, lumina_path, pretrained_text_encoder_model_name_or_path=str(lumina_path))
    base = load(lumina, lumina_path)
    assert all(torch.equal(a, b) for a, b in zip(same.text_encoder.parameters(), base.text_encoder.parameters()))


@pytest.mark.parametrize("size", [512, 1024, 1536])
def test_training_shift_is_the_one_lumina2pipeline_samples_with(lumina, size):
    """With the published scheduler config (fixed shift 6, no dynamic shifting) Lumina2Pipeline
    ignores the ``mu`` it computes and moves every sigma by shift 6 at any size; the ``base``
    flavour trains at that shift."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift, retrieve_timesteps

    from tune_models.families.lumina2.flavours import PUBLISHED_SCHEDULER

    scheduler = FlowMatchEulerDiscreteScheduler(**PUBLISHED_SCHEDULER)
    tokens = (size // 16) ** 2  # 8x VAE, 2x2 patches
    mu = calculate_shift(tokens, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    retrieve_timesteps(scheduler, 8, "cpu", sigmas=sigmas, mu=mu)  # what the pipeline calls
    trained = lumina.flow_shift(size, size, shift=lumina.flavour("base").shift, auto_shift=False)
    assert trained == 6.0
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), torch.as_tensor(lumina.shift_sigmas(sigmas, trained)))


def test_auto_shift_warns_that_the_pipeline_samples_at_a_fixed_shift(lumina, lumina_path, caplog, monkeypatch):
    from tune_models.families.lumina2.family import Lumina2Family
    from tune_models.families.lumina2.tiny import TINY_SCHEDULER
    from tune_models.families.lumina2.flavours import PUBLISHED_SCHEDULER

    assert TINY_SCHEDULER == PUBLISHED_SCHEDULER
    model = load(lumina, lumina_path)
    assert model.scheduler.config.shift == 6.0 and not model.scheduler.config.use_dynamic_shifting
    monkeypatch.setattr(Lumina2Family, "_warned_auto_shift", False)
    with caplog.at_level("WARNING"):
        assert lumina.flow_shift(64, 64, shift=6.0, auto_shift=False, model=model) == 6.0
        assert "fixed shift" not in caplog.text
        auto = lumina.flow_shift(64, 64, shift=6.0, auto_shift=True, model=model)
        lumina.flow_shift(64, 64, shift=6.0, auto_shift=True, model=model)
    assert auto != 6.0
    assert caplog.text.count("samples with its scheduler's fixed shift 6.0") == 1
