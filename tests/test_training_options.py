"""Training options a user sets in config.json, each checked by what the run leaves on disk.

Every run is 1-4 steps on the session's tiny Z-Image and 8-image shapes dataset (one 64x64
bucket: 32x32 images, ``aspect_bucket_alignment`` 64), so each test takes a second or two.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tune import Trainer

pytestmark = pytest.mark.slow


def _train(config: Path):
    return Trainer.from_config(config, progress=False).train()


def _keys(path: str | Path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def _validation_pngs(folder: Path) -> dict[str, tuple[int, int]]:
    """``{file name: (width, height)}`` of the PNGs in one validation step folder."""
    sizes = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            sizes[path.name] = image.size
    return sizes


# ---------------------------------------------------------------------------------------- export


def test_comfyui_format_writes_comfyui_keys_that_convert_back_to_the_checkpoint_lora(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    from tune_models.family import get_family

    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={"--lora_format": "comfyui"})
    result = _train(config)
    exported = load_file(result.outputs["lora"])
    # The checkpoint beside it always holds the diffusers/PEFT layout (transformer.*.lora_A/B).
    diffusers = load_file(Path(result.outputs["checkpoint"]) / "pytorch_lora_weights.safetensors")
    assert Path(result.outputs["checkpoint"]).name == "checkpoint-1"

    assert exported and all(key.startswith("diffusion_model.") for key in exported)
    assert not any(".lora_A." in key or key.startswith("transformer.") for key in exported)
    # q/k/v are fused into ComfyUI's native attention.qkv (lora_keys.py docstring).
    assert any(key.endswith("attention.qkv.lora_down.weight") for key in exported)
    assert not any(".to_q." in key for key in exported)
    # lora_alpha defaults to lora_rank (scale 1), so there is no alpha to fold: from_comfyui
    # must give back exactly the diffusers tensors.
    back = get_family("z-image").from_comfyui(exported)
    assert set(back) == set(diffusers)
    for key, tensor in diffusers.items():
        assert back[key].shape == tensor.shape, key
        assert torch.allclose(back[key], tensor), key
    assert any(t.abs().max() > 0 for key, t in diffusers.items() if ".lora_B." in key)  # it trained


def test_comfyui_format_keeps_a_lora_alpha_that_differs_from_the_rank(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune_models.family import get_family

    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
        extra={"--lora_format": "comfyui", "--lora_rank": 4, "--lora_alpha": 8},
    )
    result = _train(config)
    exported = load_file(result.outputs["lora"])
    diffusers = load_file(Path(result.outputs["checkpoint"]) / "pytorch_lora_weights.safetensors")
    # What a ComfyUI loader applies (alpha folded into up by from_comfyui) must equal what PEFT
    # trained: lora_B scaled by alpha / rank = 2.
    back = get_family("z-image").from_comfyui(exported)
    for key, tensor in diffusers.items():
        expected = tensor * 2.0 if ".lora_B." in key else tensor
        assert torch.allclose(back[key], expected), key


# ------------------------------------------------------------------------------------- precision


def test_bf16_mixed_precision_with_gradient_checkpointing_trains_on_cpu(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=2,
        extra={"--mixed_precision": "bf16", "--gradient_checkpointing": True},
    )
    result = _train(config)
    assert result.global_step == 2
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors = load_file(result.outputs["lora"])
    # float32: with bf16 the frozen base weights load in bf16 (base_model_default_dtype), but the
    # trainer upcasts the LoRA parameters to fp32 ("the LoRA trains in fp32") and the exported
    # file holds those master weights; autocast only lowers the forward pass's matmuls.
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


# -------------------------------------------------------------------------------------- schedule


def test_num_train_epochs_without_max_train_steps_runs_one_pass_over_the_data(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    # steps=0 writes max_train_steps 0, which means "unset" (SimpleTuner's convention).
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=0, extra={"--num_train_epochs": 1})
    trainer = Trainer.from_config(config, progress=False)
    assert trainer.config.max_train_steps is None
    plan = trainer.plan()
    # The numbers as tune check reads them: 8 images kept, all in one bucket, 2 per batch.
    (images,) = [row for row in plan["datasets"] if row["dataset_type"] == "image"]
    assert images["kept"] == 8 and images["buckets"] == {"64x64": 8}
    assert plan["steps"]["batches_per_epoch"] == 4 == 8 // 2
    assert plan["steps"]["total"] == 4

    result = trainer.train()
    assert result.global_step == 4 and len(result.losses) == 4
    rows = list(csv.DictReader((tmp_path / "output" / "loss_log.csv").open()))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]


def test_checkpoints_total_limit_keeps_only_the_newest(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=4,
        extra={"--checkpoint_step_interval": 1, "--checkpoints_total_limit": 2},
    )
    result = _train(config)
    out = tmp_path / "output"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".checkpoint-*"))  # no partial folders left behind either
    assert result.outputs["checkpoint"] == str(out / "checkpoint-4")


# --------------------------------------------------------------------------------------- captions


def _recaptioned_copy(source: Path, target: Path) -> Path:
    """The same images under the same names, every caption replaced."""
    shutil.copytree(source, target)
    captions = list(target.glob("*.txt"))
    assert len(captions) == 8
    for path in captions:
        path.write_text("a photograph of something else entirely")
    return target


def test_caption_dropout_of_one_trains_on_empty_captions_only(tmp_path, tiny_zimage, shapes_dir, write_run):
    dropped = write_run(tmp_path / "dropped", model=tiny_zimage, data=shapes_dir, steps=2,
                        extra={"--caption_dropout_probability": 1.0})
    kept = write_run(tmp_path / "kept", model=tiny_zimage, data=shapes_dir, steps=2,
                     extra={"--caption_dropout_probability": 0.0})
    other = _recaptioned_copy(shapes_dir, tmp_path / "other-captions")
    dropped_other = write_run(tmp_path / "dropped-other", model=tiny_zimage, data=other, steps=2,
                              extra={"--caption_dropout_probability": 1.0})

    with_dropout = _train(dropped).losses
    assert len(with_dropout) == 2 and all(torch.isfinite(torch.tensor(with_dropout)))
    # Same seed, same images, same noise: only the captions differ, and they change the loss.
    assert with_dropout != pytest.approx(_train(kept).losses, rel=1e-6, abs=0)
    # Every caption is dropped, so what the captions say cannot matter.
    assert _train(dropped_other).losses == pytest.approx(with_dropout, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------- validation


def test_validation_resolution_list_makes_one_image_per_size(tmp_path, tiny_zimage, shapes_dir, write_run):
    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
        extra={
            "--validation_disable": False,
            "--validation_on_startup": False,
            "--validation_prompt": "a red circle",
            "--validation_resolution": "32,48x32",
            "--validation_num_inference_steps": 1,
        },
    )
    _train(config)
    validation = tmp_path / "output" / "validation"
    assert [p.name for p in validation.iterdir()] == ["step-000001"]
    # Sizes are width x height: 48x32 is a landscape image 48 wide.
    assert _validation_pngs(validation / "step-000001") == {
        "validation-32x32.png": (32, 32),
        "validation-48x32.png": (48, 32),
    }


def test_user_prompt_library_makes_one_image_per_entry_named_after_it(tmp_path, tiny_zimage, shapes_dir, write_run):
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"red-one": "a red circle", "blue_two": "a blue square"}))
    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
        extra={
            "--validation_disable": False,
            "--validation_on_startup": False,
            "--user_prompt_library": str(library),
            "--validation_resolution": "32",
            "--validation_num_inference_steps": 1,
        },
    )
    result = _train(config)
    folder = tmp_path / "output" / "validation" / "step-000001"
    # File names are the entry names made path-safe (lower case, runs of other characters -> "-").
    assert _validation_pngs(folder) == {"red-one-32x32.png": (32, 32), "blue-two-32x32.png": (32, 32)}
    card = Path(result.outputs["model_card"]).read_text()
    assert "validation/step-000001/red-one-32x32.png" in card


# ------------------------------------------------------------------------------------ assistant


def test_turbo_assistant_lora_is_used_in_training_but_not_exported(tmp_path, tiny_zimage, shapes_dir, write_run):
    from tune_models.testing import build_tiny_assistant_lora

    assistant = build_tiny_assistant_lora(tiny_zimage, tmp_path / "a.safetensors")
    turbo = {"--model_flavour": "turbo"}
    with_assistant = _train(write_run(tmp_path / "with", model=tiny_zimage, data=shapes_dir, steps=1,
                                      extra={**turbo, "--assistant_lora_path": str(assistant)}))
    without = _train(write_run(tmp_path / "without", model=tiny_zimage, data=shapes_dir, steps=1,
                               extra={**turbo, "--disable_assistant_lora": True}))

    keys = _keys(with_assistant.outputs["lora"])
    assert keys and not any("assistant" in key for key in keys)
    assert keys == _keys(without.outputs["lora"])
    # The assistant was really merged in while training: it changes the model, so the loss.
    assert with_assistant.losses != pytest.approx(without.losses, rel=1e-6, abs=0)


# ------------------------------------------------------------------------------------- bad input


def test_undecodable_image_is_skipped_with_a_warning_and_training_goes_on(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    from tune_data.errors import DataWarning

    data = shutil.copytree(shapes_dir, tmp_path / "shapes")
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image" * 4)
    (data / "bad.txt").write_text("a broken picture")
    config = write_run(tmp_path, model=tiny_zimage, data=data, steps=1)

    with pytest.warns(DataWarning, match=r"'shapes'.*undecodable image bad\.png"):
        result = _train(config)
    assert result.global_step == 1 and len(result.losses) == 1
    assert Path(result.outputs["lora"]).is_file()


def test_ramtorch_on_a_cpu_run_is_a_logged_no_op_and_trains(tmp_path, tiny_zimage, shapes_dir, write_run, caplog):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=2, extra={"--ramtorch": True})
    with caplog.at_level("WARNING"):
        result = _train(config)
    assert len(result.losses) == 2
    assert any("ramtorch" in r.getMessage() for r in caplog.records)
