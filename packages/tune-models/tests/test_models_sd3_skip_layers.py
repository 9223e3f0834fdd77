"""SD3 skip-layer guidance in validation: the ``validation_guidance_skip_*`` options reach
``StableDiffusion3Pipeline`` through ``family.generate(options=...)``, change the picture, and
families that have no such option warn once instead of silently ignoring it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tune_models import family as family_module
from tune_models.family import ModelSource

SLG = {"validation_guidance_skip_layers_start": 0.0, "validation_guidance_skip_layers_stop": 1.0}
"""Over the whole (short) schedule: the pipeline applies it at steps with start < i/steps < stop."""


@pytest.fixture(scope="module")
def pipeline(sd3, sd3_path):
    return sd3.validation_pipeline(sd3.load(ModelSource(pretrained_model_name_or_path=str(sd3_path)), "tiny"))


@pytest.fixture
def skip_calls(pipeline):
    """The ``skip_layers`` argument of every transformer call made while a test runs."""
    calls: list = []
    handle = pipeline.transformer.register_forward_pre_hook(
        lambda _module, _args, kwargs: calls.append(kwargs.get("skip_layers")), with_kwargs=True
    )
    yield calls
    handle.remove()


def picture(sd3, pipeline, options=None, guidance=3.0):
    image = sd3.generate(
        pipeline, "a red square", width=64, height=64, steps=3, guidance=guidance, seed=0, options=options
    )
    return np.asarray(image).astype(np.int16)


def test_skip_layers_reach_the_pipeline_and_change_the_image(sd3, pipeline, skip_calls):
    plain = picture(sd3, pipeline, {"validation_guidance_skip_layers": ()})
    assert skip_calls and all(layers is None for layers in skip_calls)
    skip_calls.clear()
    guided = picture(sd3, pipeline, {"validation_guidance_skip_layers": (1,), **SLG, "validation_guidance_skip_scale": 4.0})
    assert [1] in skip_calls  # the extra pass without block 1
    assert np.abs(guided - plain).mean() > 1.0
    other = picture(sd3, pipeline, {"validation_guidance_skip_layers": (0,), **SLG, "validation_guidance_skip_scale": 4.0})
    assert np.abs(other - guided).mean() > 1.0  # which blocks are skipped matters


def test_window_and_scale_are_passed(sd3, pipeline, skip_calls):
    # stop 0.2 of 3 steps: no step lies inside the window, so no extra pass and the plain picture.
    plain = picture(sd3, pipeline, {"validation_guidance_skip_layers": ()})
    skip_calls.clear()
    late = picture(sd3, pipeline, {"validation_guidance_skip_layers": (1,), "validation_guidance_skip_layers_stop": 0.2})
    assert all(layers is None for layers in skip_calls)
    np.testing.assert_array_equal(late, plain)
    zero = picture(sd3, pipeline, {"validation_guidance_skip_layers": (1,), **SLG, "validation_guidance_skip_scale": 0.0})
    np.testing.assert_array_equal(zero, plain)


def test_option_replaces_the_flavour_default(sd3, pipeline, skip_calls):
    pipeline._tune_skip_guidance_layers = [1]  # as 3.5 Medium's [7, 8, 9]
    try:
        assert sd3._pipeline_call_kwargs(pipeline, guidance=3.0, negative_prompt=None)["skip_guidance_layers"] == [1]
        picture(sd3, pipeline, {"validation_guidance_skip_layers": (), **SLG})
        assert all(layers is None for layers in skip_calls)
    finally:
        pipeline._tune_skip_guidance_layers = None


def test_a_block_the_transformer_lacks_is_a_clear_error(sd3, pipeline):
    with pytest.raises(ValueError, match=r"validation_guidance_skip_layers \[1, 7\] names blocks \[7\]"):
        picture(sd3, pipeline, {"validation_guidance_skip_layers": (1, 7)})


def test_other_families_warn_once(zimage, tiny_path, caplog, monkeypatch):
    monkeypatch.setattr(family_module, "_WARNED_OPTIONS", set())
    pipe = zimage.validation_pipeline(zimage.load(ModelSource(pretrained_model_name_or_path=str(tiny_path)), "tiny"))
    options = {"validation_guidance_skip_layers": (7, 8, 9)}
    with caplog.at_level(logging.WARNING, logger="tune_models.family"):
        first = zimage.generate(pipe, "a cat", width=64, height=64, steps=2, guidance=0.0, seed=1, options=options)
        again = zimage.generate(pipe, "a cat", width=64, height=64, steps=2, guidance=0.0, seed=1, options=options)
    warnings = [r.getMessage() for r in caplog.records if "validation_guidance_skip_layers" in r.getMessage()]
    assert warnings == ["validation_guidance_skip_layers does not apply to model_family 'z-image'; ignored"]
    plain = zimage.generate(pipe, "a cat", width=64, height=64, steps=2, guidance=0.0, seed=1)
    assert np.array_equal(np.asarray(first), np.asarray(plain)) and np.array_equal(np.asarray(again), np.asarray(plain))
