"""Masked loss through the real loop on the tiny Z-Image: a mask dataset (``conditioning_type:
mask``) paired with an image dataset makes the loss, and so the LoRA gradient, blind to the black
half of every image; a masked run trains end to end; ``tune check`` shows the mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune.config import load_config
from tune_train.trainer import Trainer as Loop
from tune_train.trainer import step_generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def half_masks(tmp_path_factory) -> tuple[Path, Path]:
    """Shapes images and one mask each: left half white (trained), right half black (ignored)."""
    from tune_data.testing import make_shapes_dataset

    root = tmp_path_factory.mktemp("masked")
    shapes = make_shapes_dataset(root / "shapes", count=8, size=(32, 32))
    masks = root / "masks"
    masks.mkdir()
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[:, :16] = 255
    for image in shapes.glob("*.png"):
        Image.fromarray(pixels).save(masks / image.name)
    return shapes, masks


def _masked_run(root: Path, write_run, tiny_zimage, half_masks, *, steps: int = 2) -> Path:
    shapes, masks = half_masks
    path = write_run(root, model=tiny_zimage, data=shapes, steps=steps, dataset_extra={"conditioning_data": "masks"})
    backend = json.loads((root / "multidatabackend.json").read_text())
    backend.insert(1, {"id": "masks", "dataset_type": "conditioning", "conditioning_type": "mask",
                       "instance_data_dir": str(masks)})
    (root / "multidatabackend.json").write_text(json.dumps(backend))
    return path


def test_the_black_half_changes_neither_loss_nor_lora_gradient(tmp_path, tiny_zimage, half_masks, write_run, monkeypatch):
    from tune_train import trainer as trainer_module
    from tune_train.data import latent_key

    loaded = load_config(_masked_run(tmp_path, write_run, tiny_zimage, half_masks))
    loop = Loop(loaded.train, loaded.datasets, progress=False)
    loop.setup()
    # At sigma 1 the model input is pure noise, so the images reach the loss only through the
    # target: what the model is asked to predict. Whatever the black half asks must not count.
    monkeypatch.setattr(trainer_module.flow, "sample_sigmas", lambda count, generator, **_: torch.ones(count))
    dataset_id, batch = next(iter(loop.sampler))
    real_masks = loop.data.load_masks

    def loss_and_grads(masked: bool):
        monkeypatch.setattr(loop.data, "load_masks", real_masks if masked else lambda *a, **k: None)
        for p in loop.trainable:
            p.grad = None
        torch.manual_seed(0)
        loss = loop.compute_loss(dataset_id, batch, step_generator(3, 0))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in loop.trainable]

    before_masked, before_plain = loss_and_grads(True), loss_and_grads(False)
    # Change every training image where its mask is black (the right half, less the few columns
    # at the edge that the resize blurs to grey: those count partly, as they should).
    prepared = loop.data.prepared[dataset_id]
    for planned in prepared.buckets[batch[0].bucket]:
        key = latent_key(prepared, planned)
        latents = prepared.latent_cache.load(key)["latents"]
        black = real_masks(dataset_id, [planned], tuple(latents.shape[-2:]))[0] == 0
        assert 0.4 < black.float().mean() < 0.5
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)) * 3
        prepared.latent_cache.save(key, {"latents": torch.where(black, noise, latents)})
    after_masked, after_plain = loss_and_grads(True), loss_and_grads(False)

    assert torch.equal(before_masked[0], after_masked[0])
    for a, b in zip(before_masked[1], after_masked[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in after_masked[1])  # the left half still trains
    # Without the mask the same change moves both (the test can fail).
    assert not torch.isclose(before_plain[0], after_plain[0])
    assert any(not torch.allclose(a, b) for a, b in zip(before_plain[1], after_plain[1]))


def test_a_masked_run_trains_and_tune_check_shows_the_mask(tmp_path, tiny_zimage, half_masks, write_run):
    from tune.plan import build_plan, format_plan

    path = _masked_run(tmp_path, write_run, tiny_zimage, half_masks, steps=3)
    loaded = load_config(path)
    text = format_plan(build_plan(loaded))
    assert "masks [local, conditioning]" in text and "(mask: weights the loss, white = train, black = ignore)" in text
    assert "loss mask from: masks (masked loss)" in text
    assert "paired with conditioning" not in text  # a mask is not a model input

    result = Loop(loaded.train, loaded.datasets, progress=False).train()
    assert result.global_step == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert Path(result.outputs["checkpoint"]).is_dir()
    # The masks were cached on the latent grid in the mask dataset's cache.
    cached = list((tmp_path / "cache" / "vae" / "masks").rglob("*.safetensors"))
    assert cached, "no mask cache entries"


def test_with_tread_the_masked_in_half_is_never_routed_around(tmp_path, tiny_zimage, half_masks, write_run):
    routes = {"routes": [{"selection_ratio": 0.75, "start_layer_idx": 1, "end_layer_idx": -1}]}
    path = _masked_run(tmp_path, write_run, tiny_zimage, half_masks, steps=2)
    loaded = load_config(path)
    loaded.train.tread_config = routes
    loop = Loop(loaded.train, loaded.datasets, progress=False)
    kept = []
    loop.setup()
    original = loop.token_router.kept

    def spy(span, total, device):
        kept.append((original(span, total, device), loop.token_router._force.clone()))
        return kept[-1][0]

    loop.token_router.kept = spy
    loop.train()
    assert len(kept) >= 2
    for keep, forced in kept:
        # The white left half of every image (plus the grey columns the resize blurs at its edge)
        # is forced through; only black-half tokens skip.
        assert 0.5 <= forced.float().mean() < 0.7
        assert set(torch.nonzero(forced).flatten().tolist()) <= set(keep.tolist())


def test_eval_loss_of_a_masked_held_out_dataset_uses_its_masks(tmp_path, tiny_zimage, half_masks, write_run, monkeypatch):
    from tune_train import evaluation

    path = _masked_run(tmp_path, write_run, tiny_zimage, half_masks)
    backend = json.loads((tmp_path / "multidatabackend.json").read_text())
    held = {**backend[0], "id": "held", "conditioning_data": "masks"}  # same images, held out, same masks
    backend.insert(1, held)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    config = json.loads(path.read_text())
    config.update({"--eval_dataset_id": "held", "--eval_timesteps": 2, "--num_eval_images": 2})
    path.write_text(json.dumps(config))
    loaded = load_config(path)
    loop = Loop(loaded.train, loaded.datasets, progress=False)
    loop.setup()
    assert loop.data.masked_datasets["held"] == ("masks",)
    masked = evaluation.eval_loss(loop, "held")
    monkeypatch.setattr(loop.data, "load_masks", lambda *a, **k: None)
    plain = evaluation.eval_loss(loop, "held")
    monkeypatch.setattr(loop.data, "load_masks", lambda d, b, size: torch.ones(len(b), 1, *size))
    all_white = evaluation.eval_loss(loop, "held")
    assert masked != pytest.approx(plain) and all_white == pytest.approx(plain, rel=1e-6)
