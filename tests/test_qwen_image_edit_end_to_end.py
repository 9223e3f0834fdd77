"""Qwen-Image-Edit trained on edit pairs through the generic loop: each prompt is encoded with its
reference image (one text entry per caption and reference), the reference latents reach
``predict``, validation edits a reference, and the exported LoRA changes what
``QwenImageEditPipeline`` makes of an image after ``load_lora_weights``.

The tiny VAE downsamples 2x, so the edit pipeline's 1024 x 1024 reference/output area is scaled to
32 x 32 here (as in tune-models' edit tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tune.config import load_config
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _small_vae_area(monkeypatch):
    from tune_models.families.qwen_image.tiny import shrink_edit_area

    shrink_edit_area(monkeypatch)


@pytest.fixture(scope="module")
def tiny_edit(tmp_path_factory) -> Path:
    from tune_models.families.qwen_image.tiny import build_tiny_edit_pipeline

    return build_tiny_edit_pipeline(tmp_path_factory.mktemp("tiny-qwen-edit"))


@pytest.fixture(scope="module")
def edit_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """refs/: four shapes; edited/: the same files colour-inverted, all captioned "invert the colours"."""
    from tune_data.testing import make_shapes_dataset

    root = tmp_path_factory.mktemp("edits")
    refs = make_shapes_dataset(root / "refs", count=4, size=(32, 32))
    edited = root / "edited"
    edited.mkdir()
    for image in sorted(refs.glob("*.png")):
        ImageOps.invert(Image.open(image).convert("RGB")).save(edited / image.name)
        (edited / image.name).with_suffix(".txt").write_text("invert the colours")
    return edited, refs


def _config(root: Path, model: Path, edited: Path, refs: Path, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    datasets = [
        {"id": "edited", "instance_data_dir": str(edited), "caption_strategy": "textfile", "resolution": 32,
         "aspect_bucket_alignment": 16, "crop": True, "crop_aspect": "square", "conditioning_data": "refs"},
        {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": str(refs)},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {
        "--model_family": "qwen_image", "--model_flavour": "edit",
        "--pretrained_model_name_or_path": str(model),
        "--output_dir": str(root / "output"), "--cache_dir": str(root / "cache"),
        "--data_backend_config": str(root / "multidatabackend.json"),
        "--train_batch_size": 2, "--max_train_steps": 4, "--learning_rate": 5e-2, "--lora_rank": 4,
        "--mixed_precision": "no", "--seed": 3, "--caption_dropout_probability": 0.3,
        "--validation_prompt": "invert the colours", "--validation_resolution": "32",
        "--validation_num_inference_steps": 2, "--validation_on_startup": False,
        **extra,
    }
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


def _edit(model_dir: Path, lora: Path | None, picture: Image.Image, flavour: str = "edit") -> np.ndarray:
    """The flavour's edit pipeline over the tiny checkpoint's components (loaded fresh), LoRA loaded
    with ``load_lora_weights`` when given."""
    from tune_models.family import ModelSource, get_family

    family = get_family("qwen_image")
    pipe = family.validation_pipeline(family.load(ModelSource(str(model_dir)), flavour))
    assert type(pipe).__name__ == ("QwenImageEditPipeline" if flavour == "edit" else "QwenImageEditPlusPipeline")
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    out = pipe(
        image=picture, prompt="invert the colours", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
        num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
    )
    return out.images[0]


def test_qwen_edit_trains_on_pairs_and_the_lora_changes_the_edit(tmp_path, tiny_edit, edit_pairs, monkeypatch):
    from tune_models.families.qwen_image.family import QwenImageFamily

    edited, refs = edit_pairs
    calls: list[dict] = []
    original_predict = QwenImageFamily.predict

    def spy_predict(self, model, noisy, sigmas, prompts, **kwargs):
        calls.append({"embeds": prompts["prompt_embeds"].detach().clone(), **kwargs})
        return original_predict(self, model, noisy, sigmas, prompts, **kwargs)

    monkeypatch.setattr(QwenImageFamily, "predict", spy_predict)
    loaded = load_config(_config(tmp_path, tiny_edit, edited, refs))
    trainer = Loop(loaded.train, loaded.datasets, progress=False)
    trainer.setup()
    assert trainer.data.prompt_references
    # One text entry per caption and reference: four references, each with its caption and the
    # dropped (empty) caption; the one instruction is cached as four different embeddings.
    dataset = trainer.data.prepared["edited"]
    samples = sorted((p for images in dataset.buckets.values() for p in images), key=lambda p: p.record.path)
    keys = {trainer.data.text_entry(dataset, p, "invert the colours") for p in samples}
    assert len(keys) == 4 and all(dataset.text_cache.has(k) for k in keys)
    assert all(dataset.text_cache.has(trainer.data.text_entry(dataset, p, "")) for p in samples)
    first, second = (dataset.text_cache.load(trainer.data.text_entry(dataset, p, "invert the colours")) for p in samples[:2])
    assert not torch.allclose(first["prompt_embeds"], second["prompt_embeds"])

    result = trainer.train()
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert len(calls) == 4 and all(len(call["reference_latents"]) == 1 for call in calls)
    # Validation edited the first reference (saved beside the images) at the requested size.
    output = tmp_path / "output"
    assert (output / "validation" / "input.png").is_file()
    images = [p for p in (output / "validation").rglob("*.png") if p.name != "input.png"]
    assert images and Image.open(images[0]).size == (32, 32)

    lora = Path(result.outputs["lora"])
    picture = Image.open(sorted(refs.glob("*.png"))[0]).convert("RGB")
    plain = _edit(tiny_edit, None, picture)
    with_lora = _edit(tiny_edit, lora, picture)
    assert np.abs(plain - with_lora).max() > 1e-3


def test_qwen_base_refuses_edit_pairs(tmp_path, tiny_edit, edit_pairs):
    from tune_train.config import ConfigError

    edited, refs = edit_pairs
    loaded = load_config(_config(tmp_path, tiny_edit, edited, refs, **{"--model_flavour": "base"}))
    with pytest.raises(ConfigError, match=r"model_family 'qwen_image' .* flavour 'base' cannot train with reference"):
        Loop(loaded.train, loaded.datasets, progress=False).setup()


def test_qwen_edit_refuses_a_dataset_without_references_before_loading(tmp_path, tiny_edit, edit_pairs, monkeypatch):
    """The edit instruction is never encoded without its image: a plain image dataset (or random
    conditioning sampling over several) is refused before any weights load."""
    from tune_models.families.qwen_image.family import QwenImageFamily
    from tune_train.config import ConfigError

    def no_load(*args, **kwargs):
        raise AssertionError("weights must not load before the check")

    monkeypatch.setattr(QwenImageFamily, "load", no_load)
    edited, refs = edit_pairs
    config = _config(tmp_path, tiny_edit, edited, refs)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends.insert(1, {"id": "plain", "instance_data_dir": str(refs), "resolution": 32, "caption_strategy": "filename"})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    loaded = load_config(config)
    with pytest.raises(ConfigError, match=r"every image dataset needs conditioning_data; 'plain' has none"):
        Loop(loaded.train, loaded.datasets, progress=False).setup()


def test_qwen_edit_with_tread_routes_only_the_target_tokens(tmp_path, tiny_edit, edit_pairs):
    """tread_config on an edit flavour: the routed block gets the kept half of the target's tokens
    and every reference token; the run trains and saves its LoRA."""
    edited, refs = edit_pairs
    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]}
    loaded = load_config(_config(tmp_path, tiny_edit, edited, refs, **{"--tread_config": routes, "--validation_disable": True}))
    trainer = Loop(loaded.train, loaded.datasets, progress=False)
    trainer.setup()
    router = trainer.token_router
    transformer = trainer.model.transformer
    seen: list[tuple[int, int]] = []  # (image tokens the routed block got, target tokens of the call)
    # Registered after the router's hook: sees the routed call.
    transformer.transformer_blocks[-1].register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[1], router.total)), with_kwargs=True
    )
    result = trainer.train()
    assert result.global_step == 4 and all(np.isfinite(result.losses))
    assert seen and router.calls >= 4
    for got, target in seen:  # kept half of the target + the reference's tokens (same size as the target)
        assert got == target - round(0.5 * target) + target, (got, target)
    assert Path(result.outputs["lora"]).is_file()


@pytest.fixture(scope="module")
def tiny_edit_2511(tmp_path_factory) -> Path:
    from tune_models.families.qwen_image.tiny import build_tiny_edit_pipeline

    return build_tiny_edit_pipeline(tmp_path_factory.mktemp("tiny-qwen-edit-2511"), zero_cond_t=True)


def test_qwen_edit_2511_from_a_simpletuner_config_trains_with_tread_and_the_lora_changes_the_edit(
    tmp_path, tiny_edit_2511, edit_pairs
):
    """SimpleTuner's ``edit-v3`` (Qwen-Image-Edit-2511, a ``zero_cond_t`` transformer) with TREAD:
    the routed blocks get the per-token timestep index cut like the tokens, the run trains and
    validates through QwenImageEditPlusPipeline, and the LoRA loads there and changes the edit."""
    edited, refs = edit_pairs
    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]}
    config = _config(tmp_path, tiny_edit_2511, edited, refs, **{"--model_flavour": "edit-v3", "--tread_config": routes})
    loaded = load_config(config)
    trainer = Loop(loaded.train, loaded.datasets, progress=False)
    trainer.setup()
    assert trainer.flavour.name == "edit-2511" and trainer.model.transformer.config.zero_cond_t
    seen: list[tuple[int, int]] = []  # (image tokens, modulate_index length) of the routed block
    trainer.model.transformer.transformer_blocks[-1].register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[1], k["modulate_index"].shape[1])), with_kwargs=True
    )
    result = trainer.train()
    assert result.global_step == 4 and all(np.isfinite(result.losses))
    assert seen and all(tokens == index for tokens, index in seen)
    images = [p for p in (tmp_path / "output" / "validation").rglob("*.png") if p.name != "input.png"]
    assert images and Image.open(images[0]).size == (32, 32)
    lora = Path(result.outputs["lora"])
    picture = Image.open(sorted(refs.glob("*.png"))[0]).convert("RGB")
    plain = _edit(tiny_edit_2511, None, picture, "edit-2511")
    with_lora = _edit(tiny_edit_2511, lora, picture, "edit-2511")
    assert np.abs(plain - with_lora).max() > 1e-3
