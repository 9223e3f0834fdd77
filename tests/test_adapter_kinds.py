"""What a run trains besides a plain LoRA: DoRA, PiSSA/OLoRA starts, LyCORIS LoKr and the whole
transformer (``model_type: full``), each through the generic loop, exported, and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tune import Trainer
from tune_train.config import ConfigError

pytestmark = pytest.mark.slow


def _loop(config):
    """The tune-train loop of a config file, set up (model loaded, adapter built)."""
    from tune_train.trainer import Trainer as Loop

    loaded = Trainer.from_config(config, progress=False).loaded
    loop = Loop(loaded.train, loaded.datasets, progress=False)
    loop.setup()
    return loop


def _image(model_dir: Path, *, lora: Path | None = None, transformer=None) -> np.ndarray:
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(model_dir, **({"transformer": transformer} if transformer is not None else {}))
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    out = pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _killed_then_resumed(config: Path, step: int):
    """Run ``config`` until ``checkpoint-<step>`` is on disk, 'die' there, then resume to the end."""
    import pluggy

    from tune_data.plugins import plugin_manager

    class Killed(Exception):
        pass

    class KillAfter:
        @pluggy.HookimplMarker("tune")
        def tune_checkpoint_saved(self, trainer, step: int, path):  # noqa: ARG002
            if step == kill_at:
                raise Killed(path)

    kill_at = step
    plugin_manager().register(KillAfter(), name="kill-after")
    try:
        with pytest.raises(Killed):
            Trainer.from_config(config, progress=False).train()
    finally:
        plugin_manager().unregister(name="kill-after")
    resumed = Trainer.from_config(config, progress=False)
    resumed.config.resume_from_checkpoint = "latest"
    return resumed.train()


def _lycoris_json(root: Path, **settings) -> str:
    path = root / "lycoris_config.json"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1, **settings}))
    return str(path)


# --------------------------------------------------------------------------------- PEFT LoRA


def test_dora_resumes_exactly_and_loads_into_the_zimage_pipeline_changing_the_image(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    settings = {"--use_dora": True, "--learning_rate": 5e-2, "--lora_dropout": 0.1}
    straight = Trainer.from_config(
        write_run(tmp_path / "a", model=tiny_zimage, data=shapes_dir, steps=3, extra=settings), progress=False
    ).train()
    broken = write_run(tmp_path / "b", model=tiny_zimage, data=shapes_dir, steps=3,
                       extra={**settings, "--checkpoint_step_interval": 1})
    result = _killed_then_resumed(broken, 1)
    assert result.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-7)
    lora = Path(result.outputs["lora"])
    with safe_open(lora, "pt") as handle:
        keys = list(handle.keys())
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert metadata["transformer.use_dora"] is True
    assert np.abs(_image(tiny_zimage, lora=lora) - _image(tiny_zimage)).max() > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_exports_reproduce_the_trained_model_on_the_original_base(
    tmp_path, tiny_zimage, shapes_dir, write_run, init
):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=2,
                       extra={"--lora_init_type": init, "--learning_rate": 5e-2, "--lora_alpha": 8})
    loop = _loop(config)
    result = loop.train()
    trained = _image(tiny_zimage, transformer=loop.model.transformer.eval())
    # The file is a plain LoRA of twice the rank for the untouched checkpoint.
    exported = _image(tiny_zimage, lora=Path(result.outputs["lora"]))
    assert np.abs(trained - _image(tiny_zimage)).max() > 1e-3
    np.testing.assert_allclose(exported, trained, atol=1e-4)
    rank = load_file(result.outputs["lora"])
    a = next(v for k, v in rank.items() if ".lora_A." in k)
    assert a.shape[0] == 2 * 4


def test_gaussian_init_starts_with_random_a_and_zero_b(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune_models.adapters import training_lora_state_dict

    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={"--lora_init_type": "gaussian"})
    weights = training_lora_state_dict(_loop(config).model)
    a = next(v for k, v in weights.items() if ".lora_A." in k)
    # PEFT's gaussian init draws A ~ N(0, 1/rank); the default (kaiming uniform) is bounded far lower.
    assert a.abs().max() > 1.0 / np.sqrt(a.shape[1]) * 1.5
    assert all(not v.any() for k, v in weights.items() if ".lora_B." in k)


def test_loftq_without_cuda_is_a_clear_error(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={"--lora_init_type": "loftq"})
    with pytest.raises(ConfigError, match="lora_init_type 'loftq' needs a CUDA GPU"):
        _loop(config)


# --------------------------------------------------------------------------------- full


def test_full_fine_tune_resumes_exactly_and_exports_a_transformer_the_pipeline_loads(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    from diffusers import ZImageTransformer2DModel

    settings = {"--model_type": "full", "--learning_rate": 1e-3, "--lr_scheduler": "cosine"}
    straight = Trainer.from_config(
        write_run(tmp_path / "a", model=tiny_zimage, data=shapes_dir, steps=4, extra=settings), progress=False
    ).train()

    broken = write_run(tmp_path / "b", model=tiny_zimage, data=shapes_dir, steps=4,
                       extra={**settings, "--checkpoint_step_interval": 2})
    result = _killed_then_resumed(broken, 2)
    assert result.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-7)

    folder = Path(result.outputs["transformer"])
    assert folder == tmp_path / "b" / "output" / "transformer"
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert "lora" not in result.outputs
    card = Path(result.outputs["model_card"]).read_text()
    assert "A full fine-tune of the transformer" in card and "transformer=transformer" in card
    tuned = ZImageTransformer2DModel.from_pretrained(folder)
    base = ZImageTransformer2DModel.from_pretrained(tiny_zimage, subfolder="transformer")
    straight_weights = load_file(Path(straight.outputs["transformer"]) / "diffusion_pytorch_model.safetensors")
    for name, param in tuned.state_dict().items():
        torch.testing.assert_close(param, straight_weights[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, base.state_dict()[n]) for n, p in tuned.state_dict().items())
    assert np.abs(_image(tiny_zimage, transformer=tuned) - _image(tiny_zimage)).max() > 1e-3


def test_full_fine_tune_keeps_bf16_weights_without_an_fp32_copy(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
                       extra={"--model_type": "full", "--mixed_precision": "bf16"})
    loop = _loop(config)
    params = list(loop.model.transformer.parameters())
    assert all(p.requires_grad for p in params)
    assert {p.dtype for p in loop.trainable} == {torch.bfloat16}
    assert len(loop.trainable) == len(params)


# --------------------------------------------------------------------------------- LyCORIS


def test_lycoris_lokr_resumes_exactly_saves_its_own_format_and_reloads(tmp_path, tiny_zimage, shapes_dir, write_run):
    from lycoris import create_lycoris_from_weights

    settings = {"--lora_type": "lycoris", "--lycoris_config": _lycoris_json(tmp_path), "--learning_rate": 5e-2,
                "--lr_scheduler": "cosine", "--gradient_accumulation_steps": 2}
    straight = Trainer.from_config(
        write_run(tmp_path / "a", model=tiny_zimage, data=shapes_dir, steps=3, extra=settings), progress=False
    ).train()
    broken = write_run(tmp_path / "b", model=tiny_zimage, data=shapes_dir, steps=3,
                       extra={**settings, "--checkpoint_step_interval": 1})
    result = _killed_then_resumed(broken, 1)
    assert result.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-7)

    lora = Path(result.outputs["lora"])
    tensors = load_file(lora)
    assert tensors and all(k.startswith("lycoris_") for k in tensors)
    assert any(k.endswith(".lokr_w1") for k in tensors)
    with safe_open(lora, "pt") as handle:
        header = handle.metadata()
    assert json.loads(header["lycoris_config"])["algo"] == "lokr"
    assert header["modelspec.architecture"] == "z-image/lycoris"
    assert "create_lycoris_from_weights" in (lora.parent / "README.md").read_text()

    # The library's own loader applies the file to a fresh transformer and changes the image.
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_zimage, subfolder="transformer")
    network, _ = create_lycoris_from_weights(1.0, str(lora), transformer)
    network.merge_to()
    assert np.abs(_image(tiny_zimage, transformer=transformer) - _image(tiny_zimage)).max() > 1e-3

    # diffusers' load_lora_weights does not read LyCORIS LoKr for Z-Image (docs/adapters.md says so).
    with pytest.raises(Exception, match="not found in the base model"):
        _image(tiny_zimage, lora=lora)

    # init_lora continues from the file exactly.
    again = write_run(tmp_path / "c", model=tiny_zimage, data=shapes_dir, steps=1,
                      extra={**settings, "--init_lora": str(lora)})
    network = _loop(again).model.transformer.lycoris
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, tensors[key].to(value.dtype))


def test_lycoris_config_that_matches_nothing_names_the_key(tmp_path, tiny_zimage, shapes_dir, write_run):
    path = _lycoris_json(tmp_path, apply_preset={"target_module": ["NoSuchBlock"]})
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
                       extra={"--lora_type": "lycoris", "--lycoris_config": path})
    with pytest.raises(ConfigError, match="lycoris_config .* matches no module"):
        _loop(config)


# --------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["dora", "lokr", "full"])
def test_each_kind_trains_on_cuda_in_bf16(tmp_path, tiny_zimage, shapes_dir, write_run, kind):
    import math

    extra = {
        "dora": {"--use_dora": True},
        "lokr": {"--lora_type": "lycoris", "--lycoris_config": _lycoris_json(tmp_path / "ly")},
        "full": {"--model_type": "full", "--optimizer": "adamw_bf16"},
    }[kind]
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=3,
                       extra={**extra, "--mixed_precision": "bf16", "--gradient_checkpointing": True,
                              "--checkpoint_step_interval": 2})
    loop = _loop(config)
    result = loop.train()
    assert loop.accelerator.device.type == "cuda"
    assert all(p.is_cuda for p in loop.trainable)
    expected = torch.bfloat16 if kind == "full" else torch.float32
    assert {p.dtype for p in loop.trainable} == {expected}
    assert result.global_step == 3 and all(math.isfinite(x) for x in result.losses)
    assert Path(result.outputs["transformer" if kind == "full" else "lora"]).exists()
