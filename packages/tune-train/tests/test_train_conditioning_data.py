"""Reference latents of conditioning datasets in a run's data: cached like images, loaded per
sample, several datasets ``combined`` or ``random`` (``conditioning_multidataset_sampling``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tune_data.buckets import load_training_image
from tune_data.config import load_dataset_configs
from tune_data.testing import make_shapes_dataset
from tune_train.data import TrainingData, pixels_from_array


class Encoder:
    """A stand-in VAE: 8x average pooling; counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)


@pytest.fixture
def folders(tmp_path):
    """edits/: 4 square images; strict/: same names; loose/: same names at 2:1."""
    edits = make_shapes_dataset(tmp_path / "edits", count=4, size=(64, 64))
    strict, loose = tmp_path / "strict", tmp_path / "loose"
    strict.mkdir()
    loose.mkdir()
    for image in sorted(edits.glob("*.png")):
        picture = Image.open(image).convert("RGB")
        picture.rotate(90).save(strict / image.name)
        picture.resize((128, 64)).save(loose / image.with_suffix(".jpg").name)
    return edits, strict, loose


def _data(tmp_path, folders, *, sampling="combined", **image_options):
    edits, strict, loose = folders
    configs = load_dataset_configs([
        {"id": "edits", "instance_data_dir": str(edits), "caption_strategy": "textfile", "resolution": 64,
         "aspect_bucket_alignment": 16, "conditioning_data": ["strict", "loose"], **image_options},
        {"id": "strict", "dataset_type": "conditioning", "instance_data_dir": str(strict)},
        {"id": "loose", "dataset_type": "conditioning", "conditioning_type": "reference_loose",
         "instance_data_dir": str(loose), "resolution": 64, "aspect_bucket_alignment": 16},
    ])
    data = TrainingData(configs, cache_root=tmp_path / "cache", model_identity="m", seed=0, progress=False,
                        conditioning_sampling=sampling)
    data.discover()
    return data


def _batch(data):
    return next(iter(data.prepared["edits"].buckets.values()))[:2]


def test_references_are_cached_once_and_loaded_per_sample(tmp_path, folders):
    data = _data(tmp_path, folders)
    assert data.conditioned_datasets == {"edits": ("strict", "loose")}
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 12  # 4 targets + 4 + 4 references
    assert _data(tmp_path, folders).cache_latents(Encoder(), batch_size=4) == 0  # a second run reuses them

    data.cache_text(lambda prompts: [{"embeds": torch.zeros(1)} for _ in prompts])
    batch = _batch(data)
    latents, _ = data.load_batch("edits", batch, [False, False])
    references = data.load_references("edits", batch)
    assert len(references) == 2 and all(len(sample) == 2 for sample in references)
    strict, loose = references[0]
    assert strict.shape == latents[0].shape == (3, 8, 8)  # the target's bucket, 64 x 64
    assert loose.shape == (3, 6, 12)  # its own 2:1 bucket at 64 x 64 pixels of area: 96 x 48
    # The cached entries are the references' pixels as planned, not the targets'.
    (_, plan), _ = data.reference_plans(data.prepared["edits"], batch[0])
    pixels = pixels_from_array(load_training_image(data.conditioning["strict"].storage, plan))
    torch.testing.assert_close(strict, Encoder()(pixels[None])[0])
    assert not torch.allclose(strict, latents[0])


def test_random_sampling_gives_one_dataset_per_batch_reproducibly(tmp_path, folders):
    data = _data(tmp_path, folders, sampling="random")
    data.cache_latents(Encoder(), batch_size=4)
    batch = _batch(data)
    shapes = []
    for step in range(12):
        references = data.load_references("edits", batch, step=step)
        assert all(len(sample) == 1 for sample in references)
        assert references[0][0].shape == references[1][0].shape  # one dataset for the whole batch
        again = data.load_references("edits", batch, step=step)
        assert torch.equal(references[0][0], again[0][0])
        shapes.append(tuple(references[0][0].shape))
    assert set(shapes) == {(3, 8, 8), (3, 6, 12)}  # both datasets get drawn


def test_on_demand_datasets_encode_references_when_drawn(tmp_path, folders):
    data = _data(tmp_path, folders, vae_cache_ondemand=True)
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 0
    references = data.load_references("edits", _batch(data))
    assert encoder.images == 4 and len(references[0]) == 2  # two samples' two references


def test_datasets_without_conditioning_get_empty_reference_lists(tmp_path):
    root = make_shapes_dataset(tmp_path / "plain", count=2, size=(64, 64))
    configs = load_dataset_configs([{"id": "plain", "instance_data_dir": str(root), "caption_strategy": "textfile",
                                     "resolution": 64}])
    data = TrainingData(configs, cache_root=tmp_path / "cache", model_identity="m", seed=0, progress=False)
    data.discover()
    assert data.conditioned_datasets == {}
    assert data.load_references("plain", _batch_of(data, "plain")) == [[], []]


def _batch_of(data, dataset_id):
    return [p for images in data.prepared[dataset_id].buckets.values() for p in images][:2]


def test_validation_input_optional_reference_is_a_reference_when_the_run_has_them(tmp_path, folders, caplog):
    """``optional-reference`` (FLUX.2: text to image or editing) gives the first reference like
    ``reference`` where the run has conditioning data, and text to image without a warning where it
    has none; ``reference`` (an edit-only model) warns there."""
    from tune_train.reference_inputs import validation_image

    data = _data(tmp_path, folders)
    reference = validation_image(data, "reference")
    optional = validation_image(data, "optional-reference")
    assert reference is not None and optional is not None
    assert list(optional.getdata()) == list(reference.getdata())

    root = make_shapes_dataset(tmp_path / "plain", count=2, size=(64, 64))
    configs = load_dataset_configs([{"id": "plain", "instance_data_dir": str(root), "caption_strategy": "textfile",
                                     "resolution": 64}])
    plain = TrainingData(configs, cache_root=tmp_path / "cache2", model_identity="m", seed=0, progress=False)
    plain.discover()
    with caplog.at_level("WARNING"):
        assert validation_image(plain, "optional-reference") is None
    assert "no validation input image" not in caplog.text
    with caplog.at_level("WARNING"):
        assert validation_image(plain, "reference") is None
    assert "no validation input image" in caplog.text
    with pytest.raises(ValueError, match="optional-reference"):
        validation_image(plain, "references")
