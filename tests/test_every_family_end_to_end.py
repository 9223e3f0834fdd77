"""Every built-in family through the real loop: a few LoRA steps on its tiny model with the
generic trainer, the exported file loaded into the family's own diffusers pipeline with
``load_lora_weights``, which then reproduces the trained model's image and differs from the base.

The family tests (``packages/tune-models/tests``) check each family's pieces against diffusers;
this is the one place every family goes through ``tune train`` as a user runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tune import Trainer

pytestmark = pytest.mark.slow

FAMILIES = ["z-image", "flux", "flux2", "flux2-klein", "sd3", "sdxl", "qwen_image", "chroma", "sana", "lumina2"]
SIZE = {"flux2": 64, "flux2-klein": 64, "lumina2": 64}
"""Image side per family (32 px otherwise): the tiny FLUX.2 makes one token per 16 px, and the
tiny Lumina 2 wants more than 4 tokens a side."""
FLAVOURED = {"flux2-klein": ("flux2", "tiny-klein")}
"""Cases that are another flavour line of a family: ``(family, tiny flavour)``. FLUX.2 [klein]
(Qwen3 text encoder, no guidance input, Flux2KleinPipeline with CFG) has its own tiny model."""


def _tiny(name: str, path: Path) -> Path:
    from tune_models.testing import build_tiny_pipeline

    if name == "flux2-klein":
        from tune_models.families.flux2.tiny import build_tiny_klein_pipeline

        return build_tiny_klein_pipeline(path)
    return build_tiny_pipeline(name, path)


def _image(family, pipeline, flavour: str, size: int) -> np.ndarray:
    settings = family.flavour(flavour)
    picture = family.generate(pipeline, "a red circle", width=size, height=size,
                              steps=min(2, settings.inference_steps), guidance=settings.guidance, seed=0)
    return np.asarray(picture).astype(np.int16)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_lora_trained_by_the_loop_loads_into_the_familys_pipeline(name, tmp_path, tiny_zimage, shapes_dir, write_run):
    from safetensors import safe_open

    from tune_models.family import ModelSource, get_family

    family_name, flavour = FLAVOURED.get(name, (name, "base" if name == "z-image" else "tiny"))
    family = get_family(family_name)
    model_dir = tiny_zimage if name == "z-image" else _tiny(name, tmp_path / "tiny")
    size = SIZE.get(name, 32)
    config = write_run(
        tmp_path / "run", model=model_dir, data=shapes_dir, steps=3,
        extra={"--model_family": family_name, "--model_flavour": flavour, "--learning_rate": 5e-2},
        dataset_extra={"resolution": size, "aspect_bucket_alignment": 16},
    )
    trainer = Trainer.from_config(config, progress=False)
    result = trainer.train()
    assert result.global_step == 3 and all(np.isfinite(result.losses))
    lora = Path(result.outputs["lora"])
    with safe_open(lora, "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["modelspec.architecture"].endswith("/lora")
    assert keys and all(k.startswith(f"{family.lora_prefix}.") for k in keys)

    if name == "flux2-klein":  # the flavour's own pipeline, whose LoRA loader reads the file below
        assert type(family.validation_pipeline(trainer._run.model)).__name__ == "Flux2KleinPipeline"
    trained = _image(family, family.validation_pipeline(trainer._run.model), flavour, size)
    source = ModelSource(pretrained_model_name_or_path=str(model_dir), disable_assistant_lora=True)
    pipeline = family.validation_pipeline(family.load(source, flavour))
    plain = _image(family, pipeline, flavour, size)
    pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name)
    loaded = _image(family, pipeline, flavour, size)
    assert np.abs(trained - plain).max() > 1, "three LoRA steps did not change the image"
    assert np.abs(loaded - trained).max() <= 1, "the exported LoRA does not reproduce the trained model"
