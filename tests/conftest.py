"""Shared fixtures of the cross-package tests: one tiny Z-Image pipeline and dataset per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread while a module runs (``pytest.mark.usefixtures("one_thread")``),
    then restore it: the tiny models' matrices run many times faster on one thread when the
    CPU is shared."""
    from tune_models.families._shared import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    from tune_models.testing import build_tiny_pipeline

    return build_tiny_pipeline("z-image", tmp_path_factory.mktemp("tiny-z-image"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL base pipeline, built once per session: its warm start takes about a minute
    on a shared CPU, so every SDXL test module uses this one."""
    from tune_models.testing import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_assistant(tiny_zimage, tmp_path_factory) -> Path:
    from tune_models.testing import build_tiny_assistant_lora

    return build_tiny_assistant_lora(tiny_zimage, tmp_path_factory.mktemp("assistant") / "assistant.safetensors")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from tune_data.testing import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=8, size=(32, 32))


@pytest.fixture
def write_run():
    """Factory: ``write_run(root, model=..., data=..., steps=..., extra=..., dataset_extra=...)``."""
    return _write_run


def _write_run(
    root: Path,
    *,
    model: Path,
    data: Path,
    steps: int,
    extra: dict | None = None,
    dataset_extra: dict | None = None,
) -> Path:
    """A SimpleTuner-style config.json + multidatabackend.json for a tiny run under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    datasets = [
        {
            "id": "shapes",
            "type": "local",
            "instance_data_dir": str(data),
            "caption_strategy": "textfile",
            "resolution": 32,
            "resolution_type": "pixel_area",
            "minimum_image_size": 16,
            "crop": True,
            "crop_aspect": "square",
            **(dataset_extra or {}),
        },
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {
        "--model_family": "z-image",
        "--model_flavour": "base",
        "--pretrained_model_name_or_path": str(model),
        "--output_dir": str(root / "output"),
        "--cache_dir": str(root / "cache"),
        "--data_backend_config": str(root / "multidatabackend.json"),
        "--train_batch_size": 2,
        "--max_train_steps": steps,
        "--learning_rate": 1e-3,
        "--lora_rank": 4,
        "--mixed_precision": "no",
        "--seed": 3,
        "--validation_disable": True,
        **(extra or {}),
    }
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return path
