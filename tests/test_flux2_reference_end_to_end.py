"""FLUX.2 reference (edit) training through the generic loop: a conditioning dataset's images reach
``predict`` as ``reference_latents``, and the exported LoRA changes what Flux2Pipeline makes of
its ``image=`` input. Also: a family without reference support is refused before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tune.config import load_config
from tune_train.config import ConfigError
from tune_train.data import reference_kwargs
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory) -> Path:
    from tune_models.testing import build_tiny_pipeline

    return build_tiny_pipeline("flux2", tmp_path_factory.mktemp("tiny-flux2"))


@pytest.fixture(scope="module")
def edit_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """refs/: four shapes; edited/: the same files colour-inverted, captioned "invert the colours",
    plus one edited image without a reference."""
    from tune_data.testing import make_shapes_dataset

    root = tmp_path_factory.mktemp("edits")
    refs = make_shapes_dataset(root / "refs", count=4, size=(32, 32))
    edited = root / "edited"
    edited.mkdir()
    for image in sorted(refs.glob("*.png")):
        ImageOps.invert(Image.open(image).convert("RGB")).save(edited / image.name)
        (edited / image.name).with_suffix(".txt").write_text("invert the colours")
    # An edited image without a reference: dropped at discovery ("missing conditioning").
    shutil.copy(next(edited.glob("*.png")), edited / "zz-unpaired.png")
    (edited / "zz-unpaired.txt").write_text("invert the colours")
    return edited, refs


def _write(root: Path, model: Path, edited: Path, refs: Path, *, family="flux2", flavour="tiny", steps=4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    datasets = [
        {
            "id": "edited",
            "instance_data_dir": str(edited),
            "caption_strategy": "textfile",
            "resolution": 32,
            "aspect_bucket_alignment": 16,
            "crop": True,
            "crop_aspect": "square",
            "conditioning_data": "refs",
        },
        {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": str(refs)},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "cache" / "text")},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {
        "--model_family": family,
        "--model_flavour": flavour,
        "--pretrained_model_name_or_path": str(model),
        "--output_dir": str(root / "output"),
        "--cache_dir": str(root / "cache"),
        "--data_backend_config": str(root / "multidatabackend.json"),
        "--train_batch_size": 2,
        "--max_train_steps": steps,
        "--learning_rate": 5e-2,
        "--lora_rank": 4,
        "--mixed_precision": "no",
        "--seed": 3,
        "--validation_disable": True,
    }
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


def _loop(config: Path) -> Loop:
    loaded = load_config(config)
    assert "conditioning_data" not in " ".join(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


def _pipeline_image(model_dir: Path, lora: Path | None, reference: Image.Image) -> np.ndarray:
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    out = pipe(
        image=reference, prompt="invert the colours", height=32, width=32, num_inference_steps=2,
        guidance_scale=4.0, max_sequence_length=256, generator=torch.Generator().manual_seed(0), output_type="np",
    )
    return out.images[0]


def test_reference_latents_reach_predict_and_the_lora_changes_the_edit(tmp_path, tiny_flux2, edit_pairs, monkeypatch):
    from tune_models.families.flux2.family import Flux2Family
    from tune_train.data import pixels_from_array

    edited, refs = edit_pairs
    trainer = _loop(_write(tmp_path, tiny_flux2, edited, refs))
    calls: list[dict] = []
    original_predict = Flux2Family.predict

    def spy_predict(self, model, noisy, sigmas, prompts, **kwargs):
        calls.append({"noisy": noisy.detach().clone(), **{k: [t.detach().clone() for t in v] for k, v in kwargs.items()}})
        return original_predict(self, model, noisy, sigmas, prompts, **kwargs)

    monkeypatch.setattr(Flux2Family, "predict", spy_predict)
    batches: list[tuple[str, list]] = []
    trainer.setup()
    original_load = trainer.data.load_references

    def spy_load(dataset_id, batch, *, step=0):
        batches.append((dataset_id, list(batch)))
        return original_load(dataset_id, batch, step=step)

    trainer.data.load_references = spy_load
    result = trainer.train()

    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert len(calls) == 4 and all("reference_latents" in call for call in calls)
    first = calls[0]
    (reference,) = first["reference_latents"]
    assert reference.shape == first["noisy"].shape  # strict: the target's bucket, B x 128 x h x w
    # They are the reference images' latents (what the pipeline's image= encodes), not the targets'.
    from tune_data.buckets import load_training_image

    dataset_id, batch = batches[0]
    prepared = trainer.data.prepared[dataset_id]
    for i, planned in enumerate(batch):
        ((conditioning, plan),) = trainer.data.reference_plans(prepared, prepared.current(planned))
        assert plan.record.path == planned.record.path  # paired by relative path
        pixels = pixels_from_array(load_training_image(conditioning.storage, plan))[None]
        expected = trainer.family.encode_images(trainer.model, pixels)[0]
        torch.testing.assert_close(reference[i], expected.float(), rtol=1e-4, atol=1e-4)
    report = trainer.data.prepared["edited"].report
    assert len(report.kept) == 4
    assert [(d.path, d.reason) for d in report.dropped] == [("zz-unpaired.png", "missing conditioning")]

    lora = Path(result.outputs["lora"])
    # Flux2Pipeline refuses reference images under 64 px (it resizes them itself anyway).
    picture = Image.open(next(refs.glob("*.png"))).convert("RGB").resize((64, 64))
    plain = _pipeline_image(tiny_flux2, None, picture)
    with_lora = _pipeline_image(tiny_flux2, lora, picture)
    assert np.abs(plain - with_lora).max() > 1e-3


def test_a_family_without_reference_support_is_refused_before_loading(tmp_path, tiny_zimage, edit_pairs, monkeypatch):
    from tune_models.families.zimage.family import ZImageFamily

    def no_load(*args, **kwargs):
        raise AssertionError("weights must not load before the conditioning check")

    monkeypatch.setattr(ZImageFamily, "load", no_load)
    edited, refs = edit_pairs
    trainer = _loop(_write(tmp_path, tiny_zimage, edited, refs, family="z-image", flavour="base"))
    with pytest.raises(ConfigError, match=r"model_family 'z-image'.*'edited' uses 'refs'"):
        trainer.setup()


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from tune_models.testing import build_tiny_pipeline

    return build_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux"))


def test_flux_kontext_trains_with_references_and_dev_refuses_them(tmp_path, tiny_flux, edit_pairs, monkeypatch):
    from tune_models.families.flux.family import FluxFamily

    edited, refs = edit_pairs
    with pytest.raises(ConfigError, match=r"model_family 'flux' \(.*\) flavour 'dev' cannot train with reference"):
        _loop(_write(tmp_path / "dev", tiny_flux, edited, refs, family="flux", flavour="dev")).setup()

    seen: list[list[torch.Tensor]] = []
    original_predict = FluxFamily.predict

    def spy_predict(self, model, noisy, sigmas, prompts, **kwargs):
        seen.append([noisy.shape, *(t.shape for t in kwargs.get("reference_latents", []))])
        return original_predict(self, model, noisy, sigmas, prompts, **kwargs)

    monkeypatch.setattr(FluxFamily, "predict", spy_predict)
    from diffusers import FluxKontextPipeline

    given = _spy_pipeline_images(monkeypatch, FluxKontextPipeline)
    config = _write(tmp_path / "kontext", tiny_flux, edited, refs, family="flux", flavour="kontext", steps=2)
    settings = json.loads(config.read_text())
    settings.update({"--validation_disable": False, "--validation_prompt": "invert the colours",
                     "--validation_resolution": "32", "--validation_num_inference_steps": 1})
    config.write_text(json.dumps(settings))
    result = _loop(config).train()
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert [shapes[1:] == shapes[:1] for shapes in seen] == [True, True]  # one reference, the target's shape
    validation = tmp_path / "kontext" / "output" / "validation"
    images = [p for p in validation.rglob("*.png") if p.name != "input.png"]
    assert images and Image.open(images[0]).size == (32, 32)  # Kontext kept the requested size
    # Validation edited the first reference (by path) of the conditioning data, saved beside.
    first_ref = Image.open(min(refs.glob("*.png"))).convert("RGB")
    assert _same(Image.open(validation / "input.png"), first_ref)
    assert len(given) == len(images) and all(_same(image, first_ref) for image in given)


def _spy_pipeline_images(monkeypatch, pipeline_class) -> list:
    """Records the ``image`` each call of ``pipeline_class`` gets (validation's)."""
    given = []
    call = pipeline_class.__call__

    def spy(self, *args, **kwargs):
        given.append(kwargs.get("image"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", spy)
    return given


def _same(image, reference) -> bool:
    """The same picture (compared at ``image``'s size; a square 32 px crop of a 32 px shape is the shape)."""
    return image is not None and np.array_equal(
        np.asarray(image.convert("RGB")), np.asarray(reference.resize(image.size, Image.Resampling.NEAREST))
    )


def test_flux2_validation_edits_a_reference_with_references_and_draws_from_text_without(
    tmp_path, tiny_flux2, edit_pairs, monkeypatch
):
    """FLUX.2 does both: a run with conditioning data validates by editing its first reference
    (saved as validation/input.png, given to Flux2Pipeline as ``image=``); a text-to-image run
    validates from text alone."""
    from diffusers import Flux2Pipeline

    edited, refs = edit_pairs
    given = _spy_pipeline_images(monkeypatch, Flux2Pipeline)
    settings = {"--validation_disable": False, "--validation_prompt": "invert the colours",
                "--validation_resolution": "32", "--validation_num_inference_steps": 1}
    config = _write(tmp_path / "edit", tiny_flux2, edited, refs, steps=1)
    config.write_text(json.dumps({**json.loads(config.read_text()), **settings}))
    _loop(config).train()
    validation = tmp_path / "edit" / "output" / "validation"
    first_ref = Image.open(min(refs.glob("*.png"))).convert("RGB")
    picture = Image.open(validation / "input.png").convert("RGB")
    assert _same(picture, first_ref)
    # The pipeline refuses references under 64 px: the tiny run's 32 px one is enlarged to 64.
    made = [p for p in validation.rglob("*.png") if p.name != "input.png"]
    assert made and len(given) == len(made)
    enlarged = np.asarray(picture.resize((64, 64)))
    assert all(image.size == (64, 64) and np.array_equal(np.asarray(image), enlarged) for image in given)

    given.clear()
    config = _write(tmp_path / "text", tiny_flux2, edited, refs, steps=1)
    settings["--data_backend_config"] = str(tmp_path / "text" / "plain.json")
    backends = json.loads((tmp_path / "text" / "multidatabackend.json").read_text())
    (tmp_path / "text" / "plain.json").write_text(json.dumps(
        [{k: v for k, v in backends[0].items() if k != "conditioning_data"}, backends[2]]
    ))
    config.write_text(json.dumps({**json.loads(config.read_text()), **settings}))
    _loop(config).train()
    assert given and given == [None] * len(given)
    assert not (tmp_path / "text" / "output" / "validation" / "input.png").exists()


def test_reference_kwargs_stacks_slots_and_names_the_dataset_when_sizes_differ():
    a, b = torch.zeros(128, 2, 2), torch.ones(128, 2, 2)
    assert reference_kwargs([[], []], "edits", "cpu") == {}
    out = reference_kwargs([[a, b], [b, a]], "edits", "cpu")["reference_latents"]
    assert [t.shape for t in out] == [(2, 128, 2, 2)] * 2 and torch.equal(out[1][0], b)
    with pytest.raises(ValueError, match="dataset 'edits': the reference latents of one batch differ"):
        reference_kwargs([[a], [torch.zeros(128, 2, 4)]], "edits", "cpu")


def test_eval_loss_of_an_edit_dataset_gives_the_family_its_references(tmp_path, tiny_flux2, edit_pairs, monkeypatch):
    """A held-out edit dataset is evaluated the way it would be trained: with its references."""
    from tune_models.families.flux2.family import Flux2Family

    edited, refs = edit_pairs
    config = _write(tmp_path, tiny_flux2, edited, refs, steps=1)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends.insert(1, {**backends[0], "id": "held"})
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    settings = json.loads(config.read_text())
    settings.update({"--eval_dataset_id": "held", "--eval_timesteps": 2})
    config.write_text(json.dumps(settings))
    with_references = []
    original_predict = Flux2Family.predict

    def spy_predict(self, model, noisy, sigmas, prompts, **kwargs):
        if not torch.is_grad_enabled():  # evaluation runs without gradients
            with_references.append("reference_latents" in kwargs)
        return original_predict(self, model, noisy, sigmas, prompts, **kwargs)

    monkeypatch.setattr(Flux2Family, "predict", spy_predict)
    _loop(config).train()
    assert with_references and all(with_references)
