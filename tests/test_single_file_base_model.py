"""A single-file ``pretrained_model_name_or_path`` is the transformer, the rest comes from the
flavour's repository: ``tune check`` and the model card must name that repository as the base
model (a pipeline cannot be loaded from a transformer file) and show the file as the transformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tune.config import load_config
from tune.plan import build_plan
from tune_models.sources import BaseCheckpoint, base_checkpoint


def test_base_checkpoint_of_a_file_is_the_flavour_repository(tmp_path):
    file = tmp_path / "my-finetune.safetensors"
    file.write_bytes(b"")
    assert base_checkpoint(str(file), "org/base") == BaseCheckpoint("org/base", str(file))
    assert base_checkpoint("https://hub/org/x/blob/main/t.sft", "org/base").transformer_file.endswith("t.sft")
    assert base_checkpoint("org/finetune", "org/base") == BaseCheckpoint("org/finetune")
    assert base_checkpoint(str(tmp_path), "org/base") == BaseCheckpoint(str(tmp_path))
    assert base_checkpoint(None, "org/base") == BaseCheckpoint("org/base")


def _project(root: Path, **config) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 80, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a blue square")
    backend = [
        {"id": "pics", "instance_data_dir": str(data), "caption_strategy": "textfile", "resolution": 32,
         "minimum_image_size": 16, "crop": True, "crop_aspect": "square"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(backend))
    path = root / "config.json"
    path.write_text(json.dumps({
        "--data_backend_config": str(root / "multidatabackend.json"), "--output_dir": str(root / "output"),
        "--cache_dir": str(root / "cache"), **config,
    }))
    return path


def test_plan_names_the_flavour_repository_and_the_transformer_file(tmp_path):
    from tune_models.family import get_family

    file = "/models/zimage-finetune.safetensors"
    plan = build_plan(load_config(_project(
        tmp_path, **{"--model_family": "z-image", "--model_flavour": "turbo", "--pretrained_model_name_or_path": file}
    )))
    repo = get_family("z-image").flavour("turbo").pretrained
    components = plan["components"]
    assert components["base"].startswith(f"{repo} [flavour default; pretrained_model_name_or_path is a single")
    assert components["transformer"] == f"{file} [single file]"
    assert components["vae"] == f"{repo} / vae"


@pytest.mark.slow
def test_model_card_of_a_single_file_run_loads_the_flavour_repository(tmp_path, monkeypatch):
    """SDXL trained from a one-file UNet (diffusers layout): the card's base model and loading
    snippet name the flavour's checkpoint, its settings the file."""
    from safetensors.torch import save_file
    from tune_models.family import ModelSource, get_family
    from tune_train.trainer import Trainer as Loop

    monkeypatch.setenv("TUNE_TINY_CACHE", str(tmp_path / "tiny"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sdxl = get_family("sdxl")
        unet = sdxl.load(ModelSource(), "tiny").transformer
        file = tmp_path / "unet-finetune.safetensors"
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(file))
        loaded = load_config(_project(
            tmp_path / "run", **{"--model_family": "sdxl", "--model_flavour": "tiny",
                                 "--pretrained_model_name_or_path": str(file), "--max_train_steps": 1,
                                 "--train_batch_size": 1, "--lora_rank": 2, "--mixed_precision": "no",
                                 "--validation_disable": True}
        ))
        result = Loop(loaded.train, loaded.datasets, progress=False).train()
    finally:
        torch.set_num_threads(threads)
    card = (tmp_path / "run" / "output" / "README.md").read_text()
    base = sdxl.flavour("tiny").pretrained
    assert f"base_model: {base}" in card or f'base_model: "{base}"' in card
    assert f"from_pretrained({json.dumps(base)}" in card
    assert str(file) not in card.split("## Use it")[1]  # the snippet does not load the file as a pipeline
    assert "transformer_file" in card and str(file) in card
    assert Path(result.outputs["lora"]).is_file()
