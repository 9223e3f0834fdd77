"""Masked loss: ``conditioning_type: mask`` datasets are cut like their targets, averaged onto the
latent grid, cached, never VAE-encoded or given to the model, and weight the loss (flow and DDPM)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tune_data.buckets import load_training_image
from tune_data.config import DatasetConfigError, load_dataset_configs
from tune_data.testing import make_shapes_dataset
from tune_train import ddpm
from tune_train.data import TrainingData, check_mask_support
from tune_train.masks import mask_from_pixels, to_latent_grid, weighted_mse


class Encoder:
    """A stand-in VAE: 8x average pooling; counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)


def test_weighted_mse_is_the_mask_weighted_mean():
    prediction = torch.zeros(2, 3, 2, 4)
    target = torch.arange(48, dtype=torch.float32).reshape(2, 3, 2, 4)
    assert weighted_mse(prediction, target) == torch.nn.functional.mse_loss(prediction, target)
    ones = torch.ones(2, 1, 2, 4)
    torch.testing.assert_close(weighted_mse(prediction, target, ones), torch.nn.functional.mse_loss(prediction, target))
    left = ones.clone()
    left[..., 2:] = 0  # right half black
    expected = (target[..., :2] ** 2).mean()
    torch.testing.assert_close(weighted_mse(prediction, target, left), expected)
    # Grey counts partly: a 0.5 weight on the right half.
    half = left.clone()
    half[..., 2:] = 0.5
    err = target**2
    expected = (err[..., :2].sum() + 0.5 * err[..., 2:].sum()) / (3 * 2 * 2 * (2 + 0.5 * 2))
    torch.testing.assert_close(weighted_mse(prediction, target, half), expected)
    per_sample = weighted_mse(prediction, target, left, per_sample=True)
    torch.testing.assert_close(per_sample, (target[..., :2] ** 2).flatten(1).mean(1))
    # An all-black sample adds nothing and makes no NaN.
    assert weighted_mse(prediction, target, torch.zeros(2, 1, 2, 4)).item() == 0.0
    with pytest.raises(ValueError, match="latent grid"):
        weighted_mse(prediction, target, torch.ones(2, 1, 4, 8))


def test_masks_read_brightness_and_average_onto_the_latent_grid():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    pixels[:4, 8:12] = 255  # a corner of one 8x8 cell of the right half
    mask = mask_from_pixels(pixels)
    assert mask.shape == (1, 16, 16) and mask.max() == 1.0 and mask.min() == 0.0
    grid = to_latent_grid(mask, (2, 2))
    torch.testing.assert_close(grid, torch.tensor([[[1.0, 0.25], [1.0, 0.0]]]))


def test_ddpm_loss_takes_the_mask_with_and_without_min_snr():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    plain = ddpm.DDPMScheme.from_scheduler(scheduler)
    snr = ddpm.DDPMScheme.from_scheduler(scheduler, snr_gamma=5.0)
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[..., 1] = 100.0  # a large error only in the right column
    target[..., 0] = torch.tensor([1.0, 2.0])[:, None, None]
    mask = torch.ones(2, 1, 2, 2)
    mask[..., 1] = 0
    t = torch.tensor([20, 800])
    assert plain.loss(prediction, target, t, mask=mask).item() == pytest.approx(2.5)
    weights = ddpm.min_snr_weights(snr.snr(t), 5.0, snr.prediction_type)
    expected = (torch.tensor([1.0, 4.0], dtype=torch.float64) * weights).mean().item()
    assert math.isclose(snr.loss(prediction, target, t, mask=mask).item(), expected, rel_tol=1e-6)
    assert snr.loss(prediction, target, t).item() > 1000  # without the mask the right column counts


@pytest.fixture
def masked_folders(tmp_path):
    """pics/: 4 images of 3:2 with random dark and light vertical stripes (so a square crop moves
    and every crop window looks different); masks/: per image, white where the image is dark."""
    pics, masks = tmp_path / "pics", tmp_path / "masks"
    pics.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        columns = np.repeat(rng.random(24) < 0.5, 4)  # 96 columns in stripes of 4
        dark = np.broadcast_to(columns, (64, 96))
        Image.fromarray(np.where(dark, 30, 220).astype(np.uint8)).convert("RGB").save(pics / f"{i}.png")
        (pics / f"{i}.txt").write_text("stripes")
        Image.fromarray(np.where(dark, 255, 0).astype(np.uint8)).save(masks / f"{i}.png")
    return pics, masks


def _data(tmp_path, pics, masks, **image_options):
    configs = load_dataset_configs([
        {"id": "pics", "instance_data_dir": str(pics), "caption_strategy": "textfile", "resolution": 64,
         "aspect_bucket_alignment": 16, "crop": True, "crop_aspect": "square", "crop_style": "random",
         "conditioning_data": "masks", **image_options},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": str(masks)},
    ])
    data = TrainingData(configs, cache_root=tmp_path / "cache", model_identity="m", seed=5, progress=False)
    data.discover()
    return data


def test_masks_follow_their_targets_crop_and_never_reach_the_model(tmp_path, masked_folders):
    pics, masks = masked_folders
    data = _data(tmp_path, pics, masks)
    assert data.masked_datasets == {"pics": ("masks",)}
    assert data.conditioned_datasets == {}  # not a reference: families without references take masks
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 4 and encoder.images == 4  # masks are not encoded
    batch = next(iter(data.prepared["pics"].buckets.values()))[:2]
    assert data.load_references("pics", batch) == [[], []]
    assert {p.crop_box[0] for p in data.prepared["pics"].buckets[(64, 64)]} != {16}  # random crops, not centred

    weights = data.load_masks("pics", batch, (8, 8))
    assert weights.shape == (2, 1, 8, 8)
    for planned, weight in zip(batch, weights):
        # The mask of the target's own crop: dark pixels of the cropped training image.
        target = load_training_image(data.prepared["pics"].storage, planned).astype(np.float32).mean(-1)
        expected = to_latent_grid(torch.from_numpy((target < 128).astype(np.float32))[None], (8, 8))
        assert (weight - expected).abs().max() < 0.1  # resampling blurs the edges a little
        assert 0 < weight.mean() < 1
    # Cached at latent resolution in the mask dataset's cache: a second run reads, never decodes.
    again = _data(tmp_path, pics, masks)
    import tune_train.data as data_module

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a cached mask")

    original = data_module.load_training_image
    data_module.load_training_image = no_decode
    try:
        torch.testing.assert_close(again.load_masks("pics", batch, (8, 8)), weights)
    finally:
        data_module.load_training_image = original


def test_an_image_without_its_mask_is_dropped(tmp_path, masked_folders):
    pics, masks = masked_folders
    victim = sorted(masks.glob("*.png"))[0]
    victim.unlink()
    data = _data(tmp_path, pics, masks)
    dropped = data.prepared["pics"].report.dropped
    assert [d.reason for d in dropped] == ["missing conditioning"] and victim.stem in dropped[0].path


def test_a_mask_dataset_nobody_pairs_with_is_an_error(tmp_path, masked_folders):
    pics, masks = masked_folders
    with pytest.raises(DatasetConfigError, match=r"'masks' \(conditioning_type 'mask'\) is paired with no image dataset"):
        load_dataset_configs([
            {"id": "pics", "instance_data_dir": str(pics), "caption_strategy": "textfile", "resolution": 64},
            {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
             "instance_data_dir": str(masks)},
        ])


def test_a_family_that_cannot_take_a_mask_is_refused(tmp_path, masked_folders):
    from tune_models.family import ModelFamily
    from tune_train.config import ConfigError

    class Tokens(ModelFamily):
        name = "tokens-only"
        accepts_loss_mask = False

    data = _data(tmp_path, *masked_folders)
    with pytest.raises(ConfigError, match="'tokens-only'.*cannot train with a loss mask.*'pics' uses 'masks'"):
        check_mask_support(data, Tokens())
    check_mask_support(data, ModelFamily())  # the default: masks apply


def test_a_mask_beside_a_reference_stays_out_of_everything_a_reference_feeds(tmp_path, masked_folders):
    from tune_train.reference_inputs import text_entry_refs

    pics, masks = masked_folders
    refs = tmp_path / "refs"
    refs.mkdir()
    for image in pics.glob("*.png"):
        Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(refs / image.name)
    configs = load_dataset_configs([
        {"id": "pics", "instance_data_dir": str(pics), "caption_strategy": "textfile", "resolution": 64,
         "aspect_bucket_alignment": 16, "conditioning_data": ["masks", "refs"]},
        {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": str(masks)},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(refs)},
    ])
    data = TrainingData(configs, cache_root=tmp_path / "cache", model_identity="m", seed=0, progress=False,
                        conditioning_sampling="random")
    data.discover()
    assert data.conditioned_datasets == {"pics": ("refs",)} and data.masked_datasets == {"pics": ("masks",)}
    encoder = Encoder()
    assert data.cache_latents(encoder, batch_size=4) == 8  # 4 targets + 4 references, no masks
    prepared = data.prepared["pics"]
    batch = next(iter(prepared.buckets.values()))[:2]
    width, height = batch[0].bucket
    for step in range(4):  # "random" sampling has only the one reference dataset to pick
        references = data.load_references("pics", batch, step=step)
        assert [len(r) for r in references] == [1, 1] and references[0][0].shape == (3, height // 8, width // 8)
    assert [c.config.id for c, _ in data.reference_plans(prepared, batch[0])] == ["refs"]
    assert [c.config.id for c, _ in data.reference_plans(prepared, batch[0], masks=True)] == ["masks"]
    assert "|" not in text_entry_refs(data, prepared, batch[0])  # prompts read one reference, not the mask
    assert data.load_masks("pics", batch, (height // 8, width // 8)).shape == (2, 1, height // 8, width // 8)
