"""TREAD token routing (``tread_config``) through the real loop on the tiny Z-Image and Flux: the
run trains end to end with routed forwards, lowers its loss on a fixed batch, and eval-mode work
(eval_loss, validation) runs the whole model; a family without routing is refused before loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tune.config import load_config
from tune_train.config import ConfigError
from tune_train.trainer import Trainer as Loop
from tune_train.trainer import step_generator

pytestmark = pytest.mark.slow

ROUTES = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]}


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from tune_models.testing import build_tiny_pipeline

    return build_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux"))


def _fixed_loss(loop: Loop, batch) -> float:
    torch.manual_seed(0)  # the router's draw, as train_step seeds it
    with torch.no_grad():
        return loop.compute_loss("shapes", batch, step_generator(99, 0)).item()


@pytest.mark.parametrize("family", ["z-image", "flux"])
def test_a_tread_run_trains_routed_and_lowers_the_loss(family, tmp_path, tiny_zimage, tiny_flux, shapes_dir, write_run):
    model, flavour = (tiny_zimage, "base") if family == "z-image" else (tiny_flux, "tiny")
    extra = {"--model_family": family, "--model_flavour": flavour, "--tread_config": ROUTES,
             "--learning_rate": 2e-2}
    path = write_run(tmp_path, model=model, data=shapes_dir, steps=30, extra=extra,
                     dataset_extra={"aspect_bucket_alignment": 16})
    loaded = load_config(path)
    assert "tread_config" not in " ".join(loaded.ignored)
    loop = Loop(loaded.train, loaded.datasets, progress=False)
    loop.setup()
    router = loop.token_router
    assert router is not None and [(s.start, s.end) for s in router.spans] == [(1, 1)]
    batch = sorted(next(iter(loop.data.prepared["shapes"].buckets.values())), key=lambda p: p.record.path)[:2]
    before = _fixed_loss(loop, batch)
    calls = router.calls
    result = loop.train()
    assert result.global_step == 30 and all(math.isfinite(x) for x in result.losses)
    assert router.calls - calls >= 30  # every training forward was routed ...
    after_training = router.calls
    loop.validate()  # ... and validation (eval mode, several denoising steps) was not
    assert router.calls == after_training
    after = _fixed_loss(loop, batch)
    assert after < before * 0.98, (before, after)


def test_tread_is_refused_before_loading_for_a_family_without_routing(tmp_path, shapes_dir, write_run):
    # The path is never read: the refusal comes before any weights load.
    path = write_run(tmp_path, model=tmp_path / "no-such-model", data=shapes_dir, steps=1,
                     extra={"--model_family": "sd3", "--model_flavour": None, "--tread_config": ROUTES})
    loaded = load_config(path)
    loop = Loop(loaded.train, loaded.datasets, progress=False)
    with pytest.raises(ConfigError, match=r"tread_config: model_family 'sd3' does not support TREAD.*flux.*z-image"):
        loop.setup()
    assert not hasattr(loop, "model")  # refused before any weights loaded
