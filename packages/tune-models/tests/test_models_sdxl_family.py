"""SDXL: the conformance suite, plus conventions checked against diffusers' StableDiffusionXLPipeline.

One tiny SDXL is built per session (``sdxl_path``) and shared by every test here.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tune_models import adapters
from tune_models.family import ModelSource, SampleGeometry
from tune_models.testing import ModelFamilyTests
from tune_models.testing import load_tiny as load


class TestSDXLConformance(ModelFamilyTests):
    family_name = "sdxl"
    tiny_path_fixture = "sdxl_path"  # the session's tiny model, built once
    input_flavour = "refiner"  # refines an image
    input_tiny_path_fixture = "refiner_path"  # the tiny refiner (OpenCLIP-G only, aesthetic scores)


def test_flavours_and_declared_scheme(sdxl, sdxl_path):
    base, refiner = sdxl.flavour("base"), sdxl.flavour("refiner")
    assert sdxl.flavour(None) is base
    assert base.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert refiner.pretrained == "stabilityai/stable-diffusion-xl-refiner-1.0"
    assert sdxl.prediction != "flow" and sdxl.lora_prefix == "unet"
    from tune_models.registry import model_families

    info = model_families.get("sdxl").info
    assert set(info["flavours"]) == set(sdxl.flavours) and set(info["lora_targets"]) == set(sdxl.lora_target_presets)
    model = load(sdxl, sdxl_path)
    assert sdxl.prediction_type(model) == "epsilon"  # the checkpoint's scheduler config
    model.extras["prediction_type"] = "v_prediction"  # the user's prediction_type
    assert sdxl.prediction_type(model) == "v_prediction"
    assert sdxl.validation_pipeline(model).scheduler.config.prediction_type == "v_prediction"


def test_prompt_embeds_match_the_pipeline(sdxl, sdxl_path):
    """Both CLIPs' penultimate hidden states concatenated, and CLIP-G's projected pooled output."""
    model = load(sdxl, sdxl_path)
    prompts = ["a cat", "a much longer prompt about a red square"]
    encoded = sdxl.encode_prompts(model, prompts)
    embeds, _, pooled, _ = sdxl.validation_pipeline(model).encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=False
    )
    width = model.text_encoder.config.hidden_size + model.text_encoder_2.config.hidden_size
    for i in range(len(prompts)):
        assert encoded[i]["prompt_embeds"].shape == (77, width)
        torch.testing.assert_close(encoded[i]["prompt_embeds"], embeds[i])
        torch.testing.assert_close(encoded[i]["pooled_prompt_embeds"], pooled[i])
    # penultimate, not last, layer
    ids = model.tokenizer(prompts[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
    last = model.text_encoder(ids).last_hidden_state[0]
    assert not torch.allclose(encoded[0]["prompt_embeds"][:, : last.shape[-1]], last)


def test_time_ids_match_the_pipeline(sdxl, sdxl_path):
    model = load(sdxl, sdxl_path)
    pipeline = sdxl.validation_pipeline(model)
    geometry = SampleGeometry(original_size=(300, 200), crop_top_left=(16, 8), target_size=(64, 128))
    expected = pipeline._get_add_time_ids(
        (300, 200), (16, 8), (64, 128), dtype=torch.float32,
        text_encoder_projection_dim=model.text_encoder_2.config.projection_dim,
    )
    batch = sdxl.batch_conditions(model, [geometry, geometry], device="cpu", dtype=torch.float32)
    assert torch.equal(batch["add_time_ids"], expected.repeat(2, 1))


def test_one_pipeline_step_matches_predict(sdxl, sdxl_path):
    """The UNet call inside the real pipeline (timestep, embeds, pooled, time ids) equals
    ``predict`` on the same noisy latents; and the pipeline decodes our latent scaling."""
    model = load(sdxl, sdxl_path)
    pipeline = sdxl.validation_pipeline(model)
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    handle = model.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        latents = pipeline(
            "a red square", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).images
    finally:
        handle.remove()
    (args, kwargs, output), = calls
    sample, timestep = args[0], args[1]
    cond = sdxl.collate_prompts(sdxl.encode_prompts(model, ["a red square"]), "cpu", torch.float32)
    cond.update(sdxl.batch_conditions(model, [SampleGeometry((64, 64), (0, 0), (64, 64))], device="cpu", dtype=torch.float32))
    ours = sdxl.predict(model, sample, torch.as_tensor(timestep).reshape(1), cond)
    torch.testing.assert_close(ours, output)
    # Without geometry, predict uses the latents' own size and no crop: the same call.
    cond.pop("add_time_ids")
    torch.testing.assert_close(sdxl.predict(model, sample, torch.as_tensor(timestep).reshape(1), cond), output)
    # Latent scaling: the pipeline decodes latents / scaling_factor, as decode_latents does.
    pixels = pipeline.vae.decode(latents / model.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(sdxl.decode_latents(model, latents), pixels)
    images = sdxl.encode_images(model, pixels)
    raw = model.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(images, raw * model.vae.config.scaling_factor)


def test_kohya_keys_round_trip_and_load_in_diffusers(sdxl, sdxl_path, tmp_path):
    """Our ``lora_unet_`` file is read back exactly and diffusers' own kohya reader loads it into
    the pipeline with the same effect as our diffusers-layout state dict."""
    from safetensors.torch import save_file

    model = load(sdxl, sdxl_path)
    adapters.add_training_lora(model, rank=4, alpha=4, target="all+ffs")
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    state_dict = adapters.training_lora_state_dict(model)
    comfy = sdxl.to_comfyui(state_dict, alpha=4)
    assert all(k.startswith("lora_unet_") for k in comfy)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in comfy
    back = sdxl.from_comfyui(comfy)
    assert set(back) == set(state_dict)
    for key, tensor in state_dict.items():
        torch.testing.assert_close(back[key], tensor)
    save_file(comfy, tmp_path / "kohya.safetensors")
    assert set(sdxl.lora_state_dict(tmp_path / "kohya.safetensors")) == set(state_dict)

    def image(pipeline):
        return pipeline("a cat", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(0), output_type="np").images

    ours = sdxl.validation_pipeline(load(sdxl, sdxl_path))
    ours.load_lora_weights(dict(state_dict))
    theirs = sdxl.validation_pipeline(load(sdxl, sdxl_path))
    theirs.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")  # diffusers' kohya reader
    assert abs(image(ours) - image(theirs)).max() < 1e-4


def test_sgm_kohya_names_map_to_diffusers_modules():
    from tune_models.families.sdxl import lora_keys

    down, up = torch.randn(2, 8), torch.randn(8, 2)
    sgm = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_out_0.lora_down.weight": down,
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_out_0.lora_up.weight": up,
        "lora_unet_output_blocks_5_1_proj_in.lora_down.weight": down,
        "lora_unet_output_blocks_5_1_proj_in.lora_up.weight": up,
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
    }
    out = lora_keys.from_comfyui(sgm)
    assert set(out) == {
        f"unet.{m}.lora_{s}.weight"
        for m in (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
            "up_blocks.1.attentions.2.proj_in",
        )
        for s in "AB"
    } | {f"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_{s}.weight" for s in "AB"}
    with pytest.raises(ValueError, match="only the transformer"):
        lora_keys.from_comfyui({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": down,
                                "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": up})


def test_refiner_loads_with_clip_g_only_and_aesthetic_time_ids(sdxl, tmp_path):
    from tune_models.families.sdxl.tiny import build_tiny_refiner

    model = sdxl.load(ModelSource(pretrained_model_name_or_path=str(build_tiny_refiner(tmp_path / "refiner"))), "refiner")
    assert model.text_encoder is None and model.text_encoders == [model.text_encoder_2]
    encoded = sdxl.encode_prompts(model, ["a cat"])
    assert encoded[0]["prompt_embeds"].shape == (77, model.text_encoder_2.config.hidden_size)
    geometry = SampleGeometry(original_size=(96, 64), crop_top_left=(0, 8), target_size=(64, 64))
    ids = sdxl.batch_conditions(model, [geometry], device="cpu", dtype=torch.float32)["add_time_ids"]
    assert ids.tolist() == [[96, 64, 0, 8, 7.0]]  # the aesthetic score (SimpleTuner's 7 by default) replaces the target size
    # A dataset's own data_aesthetic_score wins over the run's; a dataset without one keeps it.
    low, unset = types.SimpleNamespace(data_aesthetic_score=3.5), types.SimpleNamespace(data_aesthetic_score=None)
    assert sdxl.batch_conditions(model, [geometry], device="cpu", dtype=torch.float32, dataset=low)[
        "add_time_ids"].tolist() == [[96, 64, 0, 8, 3.5]]
    assert torch.equal(sdxl.batch_conditions(model, [geometry], device="cpu", dtype=torch.float32, dataset=unset)[
        "add_time_ids"], ids)
    cond = sdxl.collate_prompts(encoded, "cpu", torch.float32)
    latents = sdxl.encode_images(model, torch.zeros(1, 3, 64, 64))
    with torch.no_grad():
        assert sdxl.predict(model, latents, torch.tensor([100]), {**cond, "add_time_ids": ids}).shape == latents.shape
        assert sdxl.predict(model, latents, torch.tensor([100]), cond).shape == latents.shape


@pytest.fixture(scope="module")
def refiner_path(tmp_path_factory):
    from tune_models.families.sdxl.tiny import build_tiny_refiner

    return build_tiny_refiner(tmp_path_factory.mktemp("refiner"))


def _unet_time_ids(pipe) -> list[torch.Tensor]:
    """Every ``time_ids`` the pipeline's UNet is called with (CFG batches negative first)."""
    seen: list[torch.Tensor] = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return forward(*args, **kwargs)

    pipe.unet.forward = spy
    return seen


def test_refiner_validation_refines_an_image_with_the_trained_aesthetic_score(sdxl, refiner_path):
    """The refiner validates through StableDiffusionXLImg2ImgPipeline on an input image; its UNet
    sees the same aesthetic micro-conditioning training uses (``sdxl_aesthetic_score``), the
    negative prompt the negative score, and the image comes back at the validation size."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    assert sdxl.validation_input("refiner") == "image" and sdxl.validation_input("base") is None
    model = sdxl.load(ModelSource(pretrained_model_name_or_path=str(refiner_path)), "refiner")
    sdxl.configure_training(model, {"sdxl_aesthetic_score": 7.5})
    pipe = sdxl.validation_pipeline(model)
    assert isinstance(pipe, StableDiffusionXLImg2ImgPipeline) and pipe.config.requires_aesthetics_score
    seen = _unet_time_ids(pipe)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    kwargs = dict(width=32, height=32, steps=4, guidance=3.0, seed=0)
    out = sdxl.generate(pipe, "a cat", image=picture, **kwargs)
    assert out.size == (32, 32)
    geometry = SampleGeometry(original_size=(32, 32), crop_top_left=(0, 0), target_size=(32, 32))
    trained = sdxl.batch_conditions(model, [geometry], device="cpu", dtype=torch.float32)["add_time_ids"]
    assert trained.tolist() == [[32, 32, 0, 0, 7.5]]
    # strength 0.3 of 4 steps: one UNet call, CFG batch [negative, positive].
    assert len(seen) == 1 and seen[0].tolist() == [[32, 32, 0, 0, 2.5], *trained.tolist()]
    other = sdxl.generate(pipe, "a cat", image=picture.transpose(Image.FLIP_LEFT_RIGHT), **kwargs)
    assert np.asarray(out).tolist() != np.asarray(other).tolist()  # it refines the given image
    seen.clear()  # 2 steps at strength 0.3 denoise int(0.6) = 0: the schedule is lengthened to denoise one
    assert sdxl.generate(pipe, "a cat", image=picture, **{**kwargs, "steps": 2}).size == (32, 32) and len(seen) == 1
    with pytest.raises(ValueError, match="refines an image"):
        sdxl.generate(pipe, "a cat", **kwargs)
    with pytest.raises(ValueError, match="sdxl_refiner_strength must be in"):
        sdxl.configure_training(model, {"sdxl_refiner_strength": 0})


def test_a_whole_checkpoint_file_gives_every_component(sdxl, sdxl_path, tmp_path, monkeypatch):
    """A Stability-layout file holding the UNet, both CLIPs and the VAE (how most SDXL fine-tunes are
    published) is read whole, by StableDiffusionXLPipeline.from_single_file with the base folder's
    configs: the fine-tune's own text encoders and VAE are trained with, not the base model's. The
    file's key names decide it (a UNet-only file keeps the base folder's encoders). diffusers'
    converter itself is stubbed: a tiny Stability-layout file cannot be written without the reverse
    of that converter; the stub returns the fine-tune's components."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from tune_models.families.sdxl.family import whole_checkpoint_file

    finetune = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    with torch.no_grad():
        for module in (finetune.unet, finetune.vae, finetune.text_encoder, finetune.text_encoder_2):
            for param in module.parameters():
                param.add_(0.01)
    file = tmp_path / "finetune.safetensors"
    save_file({f"{prefix}x": torch.zeros(1) for prefix in ("model.diffusion_model.", "conditioner.embedders.0.", "first_stage_model.")}, str(file))
    unet_only = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(unet_only))
    assert whole_checkpoint_file(str(file)) and not whole_checkpoint_file(str(unet_only))
    assert not whole_checkpoint_file(str(tmp_path / "missing.safetensors"))

    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append((cls.__name__, path, kwargs))
        return finetune

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(from_single_file))
    model = sdxl.load(ModelSource(str(sdxl_path), pretrained_transformer_model_name_or_path=str(file)), "tiny")
    assert calls == [("StableDiffusionXLPipeline", str(file), {"config": str(sdxl_path), "torch_dtype": torch.float32})]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        expected = finetune.unet if name == "transformer" else getattr(finetune, name)
        assert getattr(model, name) is expected, name
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # frozen like any load
    # pretrained_vae_model_name_or_path still replaces the file's VAE.
    other = sdxl.load(
        ModelSource(str(sdxl_path), pretrained_transformer_model_name_or_path=str(file), pretrained_vae_model_name_or_path=str(sdxl_path)),
        "tiny",
    )
    assert other.vae is not finetune.vae and other.text_encoder is finetune.text_encoder
