"""FLUX.2: the conformance suite, plus conventions checked against diffusers' Flux2Pipeline.

One tiny FLUX.2 is built per session (``flux2_path``) and shared by every test here. The tiny
matrices run many times faster on one thread when the CPU is shared, so this module pins torch to
one thread while it runs (and restores the setting).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.testing import ModelFamilyTests
from tune_models.testing import load_tiny as load

PROMPTS = ["a cat", "a red square on a blue background"]


pytestmark = pytest.mark.usefixtures("one_thread")


class TestFlux2Conformance(ModelFamilyTests):
    family_name = "flux2"
    tiny_path_fixture = "flux2_path"  # the session's tiny model, built once
    input_flavour = "tiny"  # every flavour edits a reference when there is one ("optional-reference")


def test_names_and_flavours(flux2):
    dev = flux2.flavour(None)
    assert (dev.name, dev.pretrained, dev.inference_steps, dev.guidance, dev.shift) == (
        "dev", "black-forest-labs/FLUX.2-dev", 50, 4.0, None
    )
    assert set(flux2.flavours) == {"dev", "klein-4b", "klein-9b", "tiny", "tiny-klein"}
    assert flux2.default_lora_target == "all"
    assert set(flux2.lora_target_presets["attention"]) < set(flux2.lora_target_presets["all"])
    assert set(flux2.lora_target_presets["all"]) < set(flux2.lora_target_presets["all+ffs"])
    from tune_models.registry import model_families

    info = model_families.get("flux2").info
    assert set(info["flavours"]) == set(flux2.flavours) and info["default_flavour"] == "dev"
    assert set(info["lora_targets"]) == set(flux2.lora_target_presets)


def test_prompt_embeddings_match_the_pipeline(flux2, flux2_path):
    """Our cached embeddings equal ``Flux2Pipeline.encode_prompt``'s, and are the hidden states of
    layers 10, 20 and 30 side by side per token (padding included, as the pipeline passes it)."""
    model = load(flux2, flux2_path)
    encoded = flux2.encode_prompts(model, PROMPTS)
    batch = flux2.collate_prompts(encoded, "cpu", torch.float32)
    pipe = flux2.validation_pipeline(model)
    embeds, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=256)
    torch.testing.assert_close(batch["prompt_embeds"], embeds, rtol=0, atol=0)
    assert embeds.shape == (2, 256, 48)
    torch.testing.assert_close(flux2.text_ids(256, "cpu"), text_ids[0])

    tokens = model.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": pipe.system_message}]},
          {"role": "user", "content": [{"type": "text", "text": PROMPTS[1]}]}]],
        tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", max_length=256,
    )
    hidden = model.text_encoder(**tokens, output_hidden_states=True).hidden_states
    for slot, layer in enumerate((10, 20, 30)):
        torch.testing.assert_close(encoded[1]["prompt_embeds"][:, 16 * slot : 16 * (slot + 1)], hidden[layer][0])
    mask = encoded[1]["attention_mask"]
    assert mask.dtype == torch.int64 and mask.shape == (256,)
    assert 0 < int(encoded[0]["attention_mask"].sum()) < int(mask.sum()) < 256


def test_latents_match_the_pipelines_encode_and_decode(flux2, flux2_path):
    """``encode_images`` equals ``Flux2Pipeline._encode_vae_image`` (posterior mode, 2x2 patchify,
    batch-norm statistics); ``decode_latents`` equals the pipeline's own decode of those latents."""
    model = load(flux2, flux2_path)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = flux2.encode_images(model, pixels)
    pipe = flux2.validation_pipeline(model)
    assert latents.shape == (2, 128, 16, 16)
    torch.testing.assert_close(latents, pipe._encode_vae_image(pixels, generator=None))
    torch.testing.assert_close(flux2.unpatchify(flux2.patchify(pixels)), pixels)

    # Let the pipeline decode our latents: after its one step, replace its latents with ours.
    def swap(pipeline, step, timestep, kwargs):
        return {"latents": flux2.pack(latents[:1])}

    decoded = pipe(
        prompt=PROMPTS[0], height=64, width=64, num_inference_steps=1, output_type="pt",
        callback_on_step_end=swap, max_sequence_length=256,
    ).images
    ours = flux2.decode_latents(model, latents[:1])
    torch.testing.assert_close(decoded, (ours + 1) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        flux2.encode_images(model, torch.zeros(1, 3, 30, 32))


def test_predict_is_the_pipelines_velocity(flux2, flux2_path):
    """One Euler step of Flux2Pipeline from sigma 1 to 0 returns ``noise - v``; ``predict`` at
    sigma 1 with the same guidance input must give the same ``v``: timestep scale, sign, token
    order, position ids and guidance all agree with the pipeline's transformer call."""
    model = load(flux2, flux2_path)
    flux2.configure_training(model, {"flux2_guidance_value": 3.0})
    noise = torch.randn(2, 128, 16, 16, generator=torch.Generator().manual_seed(0))
    out = flux2.validation_pipeline(model)(
        prompt=PROMPTS, height=64, width=64, num_inference_steps=1, sigmas=[1.0], guidance_scale=3.0,
        latents=noise, output_type="latent", max_sequence_length=256,
    ).images
    cond = flux2.collate_prompts(flux2.encode_prompts(model, PROMPTS), "cpu", torch.float32)
    with torch.no_grad():
        velocity = flux2.predict(model, noise, torch.tensor([1.0, 1.0]), cond)
        other = flux2.predict(model, noise, torch.tensor([0.5, 0.5]), cond)
    torch.testing.assert_close(flux2.unpack(out, 16, 16), noise - velocity, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(velocity, other), "predict ignores sigma"


def test_guidance_is_an_input_and_options_are_checked(flux2, flux2_path):
    model = load(flux2, flux2_path)
    cond = flux2.collate_prompts(flux2.encode_prompts(model, PROMPTS[:1]), "cpu", torch.float32)
    noise = torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        at_one = flux2.predict(model, noise, torch.tensor([0.5]), cond)
        flux2.configure_training(model, {"flux2_guidance_value": 5.0})
        at_five = flux2.predict(model, noise, torch.tensor([0.5]), cond)
    assert not torch.allclose(at_one, at_five)
    flux2.configure_training(model, {"flux2_guidance_mode": "random-range", "flux2_guidance_min": 2, "flux2_guidance_max": 3})
    drawn = flux2.training_guidance(model, 64, torch.device("cpu"))
    assert drawn.min() >= 2 and drawn.max() <= 3 and drawn.std() > 0
    with pytest.raises(ValueError, match="flux2_guidance_mode"):
        flux2.configure_training(model, {"flux2_guidance_mode": "cfg"})
    with pytest.raises(ValueError, match="flux2_guidance_min"):
        flux2.configure_training(model, {"flux2_guidance_mode": "random-range", "flux2_guidance_min": 5, "flux2_guidance_max": 1})


def test_auto_shift_uses_the_token_count(flux2, flux2_path):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = load(flux2, flux2_path)  # tiny VAE: 2x down, 2x2 patchify -> 64 px has 16 x 16 tokens
    cfg = model.scheduler.config
    mu = calculate_shift(256, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert math.isclose(flux2.flow_shift(64, 64, shift=None, auto_shift=True, model=model), math.exp(mu))
    # the real model: 1024 px -> 64 x 64 = 4096 tokens -> max_shift
    assert math.isclose(flux2.flow_shift(1024, 1024, shift=None, auto_shift=True), math.exp(1.15))


def test_lora_loads_in_diffusers_and_comfyui_layouts(flux2, flux2_path, tmp_path):
    """A few LoRA steps change Flux2Pipeline's image; the LoRA reproduces it after
    ``load_lora_weights`` from our ComfyUI file read back through ``lora_state_dict``, and from the
    same BFL names in ai-toolkit's ``lora_A``/``lora_B`` spelling through diffusers' own FLUX.2
    converter (which checks our BFL module names against diffusers')."""
    from safetensors.torch import save_file

    suite = TestFlux2Conformance()
    model = load(flux2, flux2_path)
    adapters.add_training_lora(model, rank=4, alpha=4, dropout=0.0, target="all+ffs")
    model.transformer.eval()
    for name, param in model.transformer.named_parameters():  # a visible, deterministic LoRA
        if "lora_B" in name:
            param.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    expected = suite.image(flux2, flux2.validation_pipeline(model))
    plain = suite.image(flux2, flux2.validation_pipeline(load(flux2, flux2_path)))
    assert np.abs(expected - plain).max() > 2, "the LoRA does not change the image"

    state_dict = adapters.training_lora_state_dict(model)
    assert any(".ff_context.linear_in." in k for k in state_dict)
    comfy = flux2.to_comfyui(state_dict, alpha=4)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in comfy
    assert "diffusion_model.double_blocks.0.txt_mlp.0.lora_up.weight" in comfy
    assert "diffusion_model.single_blocks.0.linear1.lora_down.weight" in comfy
    assert float(comfy["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == 12.0
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    back = flux2.lora_state_dict(tmp_path / "comfy.safetensors")
    pipe = flux2.validation_pipeline(load(flux2, flux2_path))
    pipe.load_lora_weights(dict(back))
    assert np.abs(suite.image(flux2, pipe) - expected).max() <= 1

    ai_toolkit = {
        k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
        for k, v in flux2.to_comfyui(state_dict).items()
    }
    pipe = flux2.validation_pipeline(load(flux2, flux2_path))
    pipe.load_lora_weights(ai_toolkit)
    assert np.abs(suite.image(flux2, pipe) - expected).max() <= 1


def test_presets_leave_the_single_blocks_output_to_explicit_names(flux2, flux2_path):
    model = load(flux2, flux2_path)
    adapters.add_training_lora(
        model, rank=2, alpha=2, target=["to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"]
    )
    keys = adapters.training_lora_state_dict(model)
    assert "transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight" in keys
    assert flux2.from_comfyui(flux2.to_comfyui(keys)).keys() == keys.keys()


def test_chat_template_from_a_processor_folder(flux2, flux2_path, tmp_path):
    """A checkpoint whose tokenizer folder keeps the chat template only as a processor's
    ``chat_template.json`` still encodes prompts the same way; one with none fails clearly."""
    import json
    import shutil

    copy = Path(shutil.copytree(flux2_path, tmp_path / "model"))
    template = (copy / "tokenizer" / "chat_template.jinja").read_text()
    (copy / "tokenizer" / "chat_template.jinja").unlink()
    (copy / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    expected = flux2.encode_prompts(load(flux2, flux2_path), PROMPTS[:1])[0]["prompt_embeds"]
    assert torch.equal(flux2.encode_prompts(load(flux2, copy), PROMPTS[:1])[0]["prompt_embeds"], expected)
    (copy / "tokenizer" / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        load(flux2, copy)


def test_reference_latents_condition_like_the_pipelines_image_input(flux2, flux2_path):
    """With a reference image, one Euler step of Flux2Pipeline (its ``image`` argument) gives
    ``noise - v``; ``predict`` with that image's latents as ``reference_latents`` gives the same
    ``v`` (reference tokens appended at ``t = 10``, their outputs dropped), and differs from the
    unconditioned prediction."""
    from PIL import Image

    model = load(flux2, flux2_path)
    flux2.configure_training(model, {"flux2_guidance_value": 4.0})
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    pipe = flux2.validation_pipeline(model)
    noise = torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(2))
    out = pipe(
        image=picture, prompt=PROMPTS[0], height=64, width=64, num_inference_steps=1, sigmas=[1.0],
        guidance_scale=4.0, latents=noise, output_type="latent", max_sequence_length=256,
    ).images
    pixels = pipe.image_processor.preprocess(picture, height=64, width=64, resize_mode="crop")
    reference = flux2.encode_images(model, pixels)
    cond = flux2.collate_prompts(flux2.encode_prompts(model, PROMPTS[:1]), "cpu", torch.float32)
    with torch.no_grad():
        velocity = flux2.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=[reference])
        plain = flux2.predict(model, noise, torch.tensor([1.0]), cond)
    torch.testing.assert_close(flux2.unpack(out, 16, 16), noise - velocity, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(velocity, plain, atol=1e-4)
    with pytest.raises(ValueError, match="reference latents"):
        flux2.predict(model, noise, torch.tensor([1.0]), cond, reference_latents=[reference[:, :32]])


def test_validation_edits_the_runs_reference_through_the_pipelines_image(flux2, flux2_path):
    """FLUX.2 validates by editing a reference when the run has one (``optional-reference``):
    ``generate(image=)`` reaches ``Flux2Pipeline(image=...)`` and changes the picture; a reference
    under the pipeline's 64 px minimum (a tiny run's) is enlarged first instead of refused."""
    from PIL import Image

    assert flux2.validation_input("dev") == flux2.validation_input("tiny") == "optional-reference"
    model = load(flux2, flux2_path)
    pipe = flux2.validation_pipeline(model)
    seen = []
    call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("image"))
        return call(self, *args, **kwargs)

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    settings = dict(width=32, height=32, steps=1, guidance=4.0, seed=0)
    try:
        type(pipe).__call__ = spy
        text_only = np.asarray(flux2.generate(pipe, PROMPTS[0], **settings), dtype=np.float32)
        edited = np.asarray(flux2.generate(pipe, PROMPTS[0], image=small, **settings), dtype=np.float32)
    finally:
        type(pipe).__call__ = call
    assert seen[0] is None and seen[1].size == (96, 64)  # short side 32 -> 64, aspect kept
    assert edited.shape == text_only.shape == (32, 32, 3)
    assert np.abs(edited - text_only).max() > 1
