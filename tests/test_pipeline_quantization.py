"""quantize_via: pipeline: diffusers quantises the transformer while it loads, from the
base_model_precision preset (the same layers as quantize_via cpu) or from quantization_config;
the LoRA trains on top and saves the keys a bf16 base gives; presets without a pipeline form are
refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("torchao")


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def _quantised(trainer) -> set[str]:
    transformer = trainer._run.model.transformer
    return {name for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and type(m.weight.data).__name__ == "Int8Tensor"}


def _train(root, write_run, tiny_zimage, shapes_dir, steps=3, **keys):
    from tune import Trainer

    config = write_run(root, model=tiny_zimage, data=shapes_dir, steps=steps, extra=keys)
    trainer = Trainer.from_config(config, progress=False)
    return trainer, trainer.train()


def test_int8_torchao_through_the_pipeline_trains_a_lora_like_cpu_quantisation(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    _, plain = _train(tmp_path / "plain", write_run, tiny_zimage, shapes_dir)
    cpu_trainer, on_cpu = _train(tmp_path / "cpu", write_run, tiny_zimage, shapes_dir,
                                 **{"--base_model_precision": "int8-torchao"})
    trainer, piped = _train(tmp_path / "pipe", write_run, tiny_zimage, shapes_dir,
                            **{"--base_model_precision": "int8-torchao", "--quantize_via": "pipeline",
                               "--validation_disable": False, "--validation_prompt": "a blue square",
                               "--validation_resolution": "32", "--validation_num_inference_steps": 2})

    transformer = trainer._run.model.transformer
    assert transformer.is_quantized  # diffusers' quantizer did it while loading
    layers = _quantised(trainer)
    assert layers and layers == _quantised(cpu_trainer)  # the preset's layers, embedders left alone
    assert not any(name.startswith(("t_embedder", "cap_embedder")) for name in layers)
    assert _keys(piped.outputs["lora"]) == _keys(plain.outputs["lora"])
    assert piped.losses == pytest.approx(on_cpu.losses, rel=1e-3)
    assert (tmp_path / "pipe" / "output" / "validation" / "step-000003" / "validation-32x32.png").is_file()


def test_quantization_config_entry_loads_the_transformer_quantised(tmp_path, tiny_zimage, shapes_dir, write_run):
    described = {"transformer": {"quant_type": "Int8WeightOnlyConfig", "modules_to_not_convert": ["t_embedder"]}}
    config_file = tmp_path / "quant.json"
    config_file.write_text(json.dumps(described))
    trainer, result = _train(tmp_path / "run", write_run, tiny_zimage, shapes_dir, steps=1,
                             **{"--quantize_via": "pipeline", "--quantization_config": str(config_file)})
    layers = _quantised(trainer)
    assert any(name.startswith("cap_embedder") for name in layers)  # every Linear but the ones named
    assert not any(name.startswith("t_embedder") for name in layers)
    assert result.losses and _keys(result.outputs["lora"])


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"--base_model_precision": "int8-quanto"},
         "base_model_precision 'int8-quanto' has no quantize_via 'pipeline' form.*quantize_via cpu or accelerator"),
        ({"--base_model_precision": "nf4-bnb"},
         "nf4-bnb through quantize_via 'pipeline' needs a CUDA GPU.*quantize_via cpu or accelerator"),
        ({}, "quantize_via 'pipeline' needs base_model_precision"),
        ({"--quantization_config": {"text_encoder": {"load_in_8bit": True}}},
         "quantization_config names text_encoder: tune quantises only the denoiser"),
        ({"--quantization_config": {"transformer": {"bits": 4}}},
         r"quantization_config\['transformer'\]: cannot tell which diffusers quantization backend"),
    ],
)
def test_unsupported_pipeline_quantisation_is_refused_by_name(tmp_path, tiny_zimage, shapes_dir, write_run, keys, message):
    if torch.cuda.is_available() and keys.get("--base_model_precision") == "nf4-bnb":
        pytest.skip("a GPU is here: diffusers' bitsandbytes loader can run")
    with pytest.raises(Exception, match=message):
        _train(tmp_path, write_run, tiny_zimage, shapes_dir, steps=1, **{"--quantize_via": "pipeline", **keys})


def test_quantization_config_needs_quantize_via_pipeline():
    from tune_train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="quantization_config is used only with quantize_via: pipeline"):
        TrainConfig(model_family="z-image", max_train_steps=1,
                    quantization_config='{"transformer": {"load_in_4bit": true}}')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_bnb_through_the_pipeline_quantises_the_cpu_paths_layers(tmp_path, tiny_zimage, shapes_dir, write_run):
    pytest.importorskip("bitsandbytes")

    def four_bit(trainer) -> set[str]:
        transformer = trainer._run.model.transformer
        return {name for name, m in transformer.named_modules() if type(m).__module__.startswith("bitsandbytes")}

    common = {"--mixed_precision": "bf16", "--base_model_precision": "nf4-bnb"}
    cpu_trainer, on_cpu = _train(tmp_path / "cpu", write_run, tiny_zimage, shapes_dir, **common)
    trainer, piped = _train(tmp_path / "pipe", write_run, tiny_zimage, shapes_dir, **common,
                            **{"--quantize_via": "pipeline"})
    assert four_bit(trainer) and four_bit(trainer) == four_bit(cpu_trainer)
    assert _keys(piped.outputs["lora"]) == _keys(on_cpu.outputs["lora"])
    assert piped.losses == pytest.approx(on_cpu.losses, rel=0.05)


def test_tune_check_names_a_preset_without_a_pipeline_form_and_the_offloaded_encoders(tmp_path, shapes_dir, write_run):
    from tune.config import load_config
    from tune.plan import build_plan

    model = tmp_path / "model"  # tune check loads no weights
    config = write_run(tmp_path / "quanto", model=model, data=shapes_dir, steps=1,
                       extra={"--quantize_via": "pipeline", "--base_model_precision": "int8-quanto"})
    problems = build_plan(load_config(config))["problems"]
    assert any("'int8-quanto' has no quantize_via 'pipeline' form" in p for p in problems)
    config = write_run(tmp_path / "offload", model=model, data=shapes_dir, steps=1,
                       extra={"--enable_group_offload": True, "--group_offload_vae": True})
    assert build_plan(load_config(config))["precision"]["offload"].endswith("; the VAE too")


def test_nf4_bnb_pipeline_config_leaves_the_presets_skipped_layers_alone():
    """diffusers' bitsandbytes loader needs a GPU, but which layers it replaces is decided on the
    empty model: every layer nf4-bnb leaves in full precision stays so; the only other layers left
    are those named like a skipped top-level one (Flux's single-block proj_out)."""
    pytest.importorskip("bitsandbytes")
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
    from tune_models.families import _shared
    from tune_models.family import get_family
    from tune_quant.bnb_presets import NF4
    from tune_quant.presets import selected_linears

    family = get_family("flux")
    root = _shared.tiny_checkpoint(f"{family.name}-v1", lambda path: family.build_tiny(path))
    config = diffusers.FluxTransformer2DModel.load_config(root, subfolder="transformer")
    with init_empty_weights():
        skeleton = diffusers.FluxTransformer2DModel.from_config(config)
        loading = diffusers.FluxTransformer2DModel.from_config(config)
    quantization = NF4.pipeline_config(skeleton, dtype=torch.bfloat16)
    loading = replace_with_bnb_linear(loading, modules_to_not_convert=quantization.llm_int8_skip_modules,
                                      quantization_config=quantization)
    replaced = {n for n, m in loading.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    chosen = {n for n, _ in selected_linears(skeleton)}
    assert replaced and replaced <= chosen
    assert {n.rsplit(".", 1)[-1] for n in chosen - replaced} <= {"proj_out", "proj_in"}
