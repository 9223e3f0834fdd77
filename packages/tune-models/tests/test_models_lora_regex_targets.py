"""Regex LoRA targets (``re:`` entries of ``lora_target`` presets and ``peft_lora_target_modules``):
they reach modules a suffix cannot (FLUX.2's single-block ``attn.to_out``), mix with plain
suffixes, and the presets built on them (FLUX.2 ``full``, Sana ``all+ffs`` with GLUMBConv's
convolutions) adapt exactly the modules they document and export to ComfyUI."""

from __future__ import annotations

import re

import pytest
import torch

from tune_models import adapters
from tune_models.family import ModelSource, get_family
from tune_models.testing import build_tiny_pipeline


def adapted(model) -> set[str]:
    """Names of the transformer's modules that carry the training adapter."""
    return {
        name
        for name, module in model.transformer.named_modules()
        if adapters.TRAINING_ADAPTER in (getattr(module, "lora_A", None) or {})
    }


def module_names(model, pattern: str) -> set[str]:
    return {n for n, _ in model.transformer.named_modules() if re.fullmatch(pattern, n)}


@pytest.fixture
def flux2_model(flux2_path):
    flux2 = get_family("flux2")
    return flux2.load(ModelSource(pretrained_model_name_or_path=str(flux2_path)), "tiny")


def test_lora_targets_mix_suffixes_and_regexes(zimage):
    assert zimage.lora_targets(["to_q", "to_k"]) == ["to_q", "to_k"]  # no regex: peft's suffix list
    pattern = zimage.lora_targets(["to_q", r"re:layers\.\d+\.attention\.to_out\.0"])
    assert isinstance(pattern, str)
    assert re.fullmatch(pattern, "layers.0.attention.to_q") and re.fullmatch(pattern, "to_q")
    assert re.fullmatch(pattern, "layers.3.attention.to_out.0")
    assert not re.fullmatch(pattern, "layers.0.attention.to_qx") and not re.fullmatch(pattern, "noise_refiner.0.attention.to_out.0")
    assert zimage.lora_targets(r"re:.*\.to_v") == r"(?:.*\.to_v)"  # a single regex as the whole value
    with pytest.raises(ValueError, match="not a valid regular expression"):
        zimage.lora_targets(["re:to_(q"])


def test_regex_reaches_the_single_blocks_output(flux2_model):
    single_out = r"re:single_transformer_blocks\.\d+\.attn\.to_out"
    adapters.add_training_lora(flux2_model, rank=2, alpha=2, target=["to_q", single_out])
    expected = module_names(flux2_model, r"transformer_blocks\.\d+\.attn\.to_q") | module_names(
        flux2_model, r"single_transformer_blocks\.\d+\.attn\.to_out"
    )
    assert adapted(flux2_model) == expected
    assert any(n.startswith("single_transformer_blocks.") for n in expected)
    assert not any(n.startswith("transformer_blocks.") and n.endswith("to_out.0") for n in adapted(flux2_model))


def test_flux2_full_preset_adapts_every_block_linear_and_exports_to_comfyui(flux2_model, flux2_path, tmp_path):
    flux2 = flux2_model.family
    blocks = {
        name
        for name, module in flux2_model.transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and re.match(r"(single_)?transformer_blocks\.", name)
    }
    adapters.add_training_lora(flux2_model, rank=2, alpha=2, target="full")
    assert adapted(flux2_model) == blocks
    state_dict = adapters.training_lora_state_dict(flux2_model)
    for key in state_dict:  # a non-zero up weight, so the exported file carries every module
        if ".lora_B." in key:
            state_dict[key] = torch.randn_like(state_dict[key])
    comfy = flux2.to_comfyui(state_dict, alpha=2)
    assert any(".linear2.lora_down.weight" in k for k in comfy)
    back = flux2.from_comfyui(comfy)
    assert set(back) == set(state_dict)
    # The saved file (its config records the regex) loads into the diffusers pipeline on every module.
    saved = adapters.save_training_lora(flux2_model, tmp_path)
    pipeline = flux2.validation_pipeline(flux2.load(ModelSource(pretrained_model_name_or_path=str(flux2_path)), "tiny"))
    pipeline.load_lora_weights(str(tmp_path), weight_name=saved.name)
    loaded = {n for n, m in pipeline.transformer.named_modules() if len(getattr(m, "lora_A", None) or {})}
    assert loaded == blocks


def test_a_regex_that_matches_nothing_is_a_clear_error(flux2_model):
    with pytest.raises(ValueError, match="matches no module"):
        adapters.add_training_lora(flux2_model, rank=2, alpha=2, target=[r"re:no_such_block\.\d+"])


def test_sana_all_ffs_adapts_glumbconv_convolutions(tmp_path):
    sana = get_family("sana")
    model = sana.load(ModelSource(pretrained_model_name_or_path=str(build_tiny_pipeline("sana", tmp_path))), "tiny")
    latents = torch.randn(1, model.transformer.config.in_channels, 4, 4)
    prompts = sana.collate_prompts(sana.encode_prompts(model, ["a cat"]), "cpu", torch.float32)
    before = sana.predict(model, latents, torch.tensor([0.5]), prompts)
    params = adapters.add_training_lora(model, rank=2, alpha=2, target="all+ffs")
    convs = module_names(model, r"transformer_blocks\.\d+\.ff\.conv_(inverted|point)")
    assert convs and convs <= adapted(model)
    assert not module_names(model, r".*conv_depth") & adapted(model)
    assert {n for n in adapted(model) if ".ff." not in n} == {
        n for n, m in model.transformer.named_modules() if re.fullmatch(r"transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)", n)
    }
    # The conv LoRA trains: a step changes the prediction.
    for p in params:
        if p.ndim == 4 and p.shape[0] != 2:  # lora_B of a conv: start it off zero
            torch.nn.init.normal_(p, std=0.1)
    after = sana.predict(model, latents, torch.tensor([0.5]), prompts)
    assert not torch.allclose(before, after)
    comfy = sana.to_comfyui(adapters.training_lora_state_dict(model), alpha=2)
    assert any("mlp.inverted_conv.conv.lora_down.weight" in k for k in comfy)
    assert any("mlp.point_conv.conv.lora_down.weight" in k for k in comfy)
