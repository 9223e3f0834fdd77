"""train_text_encoder / text_encoder_lr on the tiny SDXL: the CLIPs' LoRA trains (live prompt
encoding with gradients, its own optimizer group), resumes exactly, exports in the keys diffusers'
StableDiffusionXLPipeline.load_lora_weights reads (and ComfyUI's lora_te1_/lora_te2_), comes back
through init_lora, and a family whose pipeline loads no text-encoder LoRA is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tune.config import load_config
from tune_train.config import ConfigError
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SETTINGS = {
    "--model_family": "sdxl",
    "--model_flavour": "base",
    "--train_text_encoder": True,
    "--text_encoder_lr": 2e-2,
    "--learning_rate": 1e-2,
    "--lora_dropout": 0.1,
    "--caption_dropout_probability": 0.3,
}


def _loop(write_run, root, model, data, steps, **extra) -> Loop:
    config = write_run(root, model=model, data=data, steps=steps, extra={**SETTINGS, **extra})
    loaded = load_config(config)
    assert not {"train_text_encoder", "text_encoder_lr"} & set(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


def _keys(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _pipe(model_dir: Path, lora: dict | None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


def _image(pipe):
    out = pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _clip_l_out(pipe):
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]


def test_text_encoder_lora_trains_exports_and_loads_into_the_pipeline(tmp_path, tiny_sdxl, shapes_dir, write_run):
    trainer = _loop(write_run, tmp_path, tiny_sdxl, shapes_dir, 4,
                    **{"--validation_disable": False, "--validation_prompt": "a blue square",
                       "--validation_resolution": "32", "--validation_num_inference_steps": 2})
    result = trainer.train()
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    # (d) text_encoder_lr is the encoders' own optimizer group; the denoiser keeps learning_rate.
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 2e-2])
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainer.weights.text_encoder_params}
    # Validation used the LoRA'd encoders, which stayed on the device for training.
    assert (tmp_path / "output" / "validation" / "step-000004").is_dir()

    lora = _keys(Path(result.outputs["lora"]))
    clip_l = {k: v for k, v in lora.items() if k.startswith("text_encoder.")}
    clip_g = {k: v for k, v in lora.items() if k.startswith("text_encoder_2.")}
    unet = {k: v for k, v in lora.items() if k.startswith("unet.")}
    assert clip_l and clip_g and unet and len(clip_l) + len(clip_g) + len(unet) == len(lora)
    assert all(".text_model.encoder.layers." in k for k in [*clip_l, *clip_g])
    # (a) the encoders' LoRA trained: B starts at zero and moved, in both CLIPs.
    for part in (clip_l, clip_g):
        assert max(v.abs().max().item() for k, v in part.items() if ".lora_B." in k) > 1e-4

    # (b) diffusers' pipeline loader takes every key: the CLIP-L output changes, and the image
    # differs from the one of the UNet-only part of the same file.
    plain = _pipe(tiny_sdxl, None)
    full = _pipe(tiny_sdxl, str(result.outputs["lora"]))
    assert (_clip_l_out(full) - _clip_l_out(plain)).abs().max() > 1e-4
    unet_only = _pipe(tiny_sdxl, unet)
    assert abs(_image(full) - _image(unet_only)).max() > 1e-4

    from safetensors import safe_open

    with safe_open(result.outputs["lora"], "pt") as handle:
        header = handle.metadata()
    assert header["tune.text_encoders"] == "text_encoder,text_encoder_2"
    card = Path(result.outputs["model_card"]).read_text()
    assert "train_text_encoder" in card and "text_encoder_lr" in card


def test_resumed_run_continues_the_text_encoder_exactly(tmp_path, tiny_sdxl, shapes_dir, write_run):
    straight = _loop(write_run, tmp_path / "a", tiny_sdxl, shapes_dir, 4)
    full = straight.train()
    first = _loop(write_run, tmp_path / "b", tiny_sdxl, shapes_dir, 2)
    first.train()
    resumed = _loop(write_run, tmp_path / "b", tiny_sdxl, shapes_dir, 4, **{"--resume_from_checkpoint": "latest"})
    result = resumed.train()
    assert result.global_step == 4
    assert result.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    ours, theirs = _keys(Path(result.outputs["lora"])), _keys(Path(full.outputs["lora"]))
    te_keys = [k for k in theirs if k.startswith("text_encoder")]
    assert te_keys and set(ours) == set(theirs)
    for key in te_keys:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)


def test_init_lora_restores_the_text_encoder_and_comfyui_names_round_trip(tmp_path, tiny_sdxl, shapes_dir, write_run):
    from tune_models.family import get_family
    from tune_models.text_encoder_lora import state_dict as te_state_dict

    first = _loop(write_run, tmp_path / "a", tiny_sdxl, shapes_dir, 1, **{"--text_encoder_lr": 5e-2, "--lora_alpha": 8})
    saved = Path(first.train().outputs["lora"])
    # Rank 4 with alpha 8 in the file, alpha 4 (= rank) here: up weights double to keep the effect.
    continued = _loop(write_run, tmp_path / "b", tiny_sdxl, shapes_dir, 1, **{"--init_lora": str(saved)})
    continued.setup()
    restored = te_state_dict(continued.model)
    original = {k: v for k, v in _keys(saved).items() if k.startswith("text_encoder")}
    assert set(restored) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value * (2.0 if ".lora_B." in key else 1.0))

    sdxl = get_family("sdxl")
    comfy = sdxl.to_comfyui(_keys(saved), alpha=8.0)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in comfy)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_mlp_fc2.") for k in comfy)
    back = sdxl.from_comfyui(comfy)  # ComfyUI's alpha / rank is folded into the up weights
    assert set(back) == set(_keys(saved))
    for key, value in original.items():
        torch.testing.assert_close(back[key], value * (2.0 if ".lora_B." in key else 1.0))


def test_a_family_without_text_encoder_loras_is_refused(tmp_path, shapes_dir, write_run):
    from tune.plan import build_plan, format_plan

    config = write_run(tmp_path, model=tmp_path / "unused", data=shapes_dir, steps=1,
                       extra={"--model_family": "z-image", "--train_text_encoder": True})
    loaded = load_config(config)
    plan = format_plan(build_plan(loaded))  # tune check says so first, without loading anything
    assert "train_text_encoder: model_family 'z-image' cannot train its text encoder; families that can: flux, sd3, sdxl" in plan
    with pytest.raises(ConfigError, match=r"train_text_encoder: model_family 'z-image'.*families that can: .*sdxl"):
        Loop(loaded.train, loaded.datasets, progress=False).setup()


def test_flux_trains_the_clip_lora_and_keeps_the_t5_cached(tmp_path, shapes_dir, write_run):
    from diffusers import FluxPipeline

    from tune_models.testing import build_tiny_pipeline

    tiny_flux = build_tiny_pipeline("flux", tmp_path / "tiny-flux")
    trainer = _loop(write_run, tmp_path / "run", tiny_flux, shapes_dir, 2,
                    **{"--model_family": "flux", "--model_flavour": "dev", "--learning_rate": 5e-2,
                       "--validation_disable": False, "--validation_prompt": "a blue square",
                       "--validation_resolution": "32", "--validation_num_inference_steps": 2})
    trainer.setup()
    t5 = trainer.model.text_encoder_2
    forward = t5.forward

    def no_t5(*args, **kwargs):
        raise AssertionError("the frozen T5 ran during a training step; its embeddings are cached")

    t5.forward = no_t5
    trainer.sampler_iter = iter(trainer.sampler)
    try:
        trainer.train_step()
    finally:
        t5.forward = forward
    result = trainer.train()
    lora = _keys(Path(result.outputs["lora"]))
    te = [k for k in lora if not k.startswith("transformer.")]
    assert te and all(k.startswith("text_encoder.text_model.") for k in te)  # the CLIP-L only, no T5
    assert max(lora[k].abs().max().item() for k in te if ".lora_B." in k) > 1e-4
    assert not any(p.requires_grad for p in trainer.model.text_encoder_2.parameters())

    def pooled(pipe):
        ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids).pooler_output

    plain = FluxPipeline.from_pretrained(tiny_flux)
    loaded = FluxPipeline.from_pretrained(tiny_flux)
    loaded.load_lora_weights(result.outputs["lora"])
    assert (pooled(loaded) - pooled(plain)).abs().max() > 1e-4


def test_tune_check_names_the_trained_encoders_and_their_rate(tmp_path, shapes_dir, write_run):
    from tune.plan import build_plan, format_plan

    config = write_run(tmp_path, model=tmp_path / "unused", data=shapes_dir, steps=1, extra=SETTINGS)
    plan = build_plan(load_config(config))
    assert plan["lora"]["text_encoders"].startswith("text_encoder, text_encoder_2 at lr 0.02")
    assert "no text cache for them" in format_plan(plan)
