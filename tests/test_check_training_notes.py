"""What `tune check` says about training-time options: snr_gamma (and timestep_bias_*) on a flow-matching family has no
effect (min-SNR weights are defined on a DDPM schedule) and it says so, but not for a DDPM family;
TREAD routes are shown."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tune.config import load_config
from tune.plan import build_plan, format_plan


def _project(root, family: str, snr_gamma: float | None):
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 80, 40)).save(data / "a red fox.png")
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "pics", "instance_data_dir": str(data), "caption_strategy": "filename"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(root / "text")},
    ]))
    config = {"model_family": family, "output_dir": str(root / "out"),
              "data_backend_config": str(root / "multidatabackend.json")}
    if snr_gamma is not None:
        config["snr_gamma"] = snr_gamma
    (root / "config.json").write_text(json.dumps(config))
    return load_config(root / "config.json")


@pytest.mark.parametrize("family", ["z-image", "flux"])
def test_tune_check_says_snr_gamma_does_nothing_for_flow_families(tmp_path, family):
    plan = build_plan(_project(tmp_path, family, 5.0))
    assert plan["noise"]["snr_gamma"] == "5 ignored (flow matching)"
    text = format_plan(plan)
    assert f"warning: snr_gamma 5 has no effect: model_family {family!r} trains with flow matching" in text


def test_no_warning_without_snr_gamma_or_for_a_ddpm_family(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert "snr_gamma" not in format_plan(build_plan(_project(tmp_path / "a", "z-image", None)))
    ddpm = build_plan(_project(tmp_path / "b", "sdxl", 5.0))
    assert ddpm["noise"]["snr_gamma"] == 5.0
    assert "has no effect" not in format_plan(ddpm)


def test_tune_check_shows_tread_routes(tmp_path):
    loaded = _project(tmp_path, "flux", None)
    import attrs

    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}
    loaded = attrs.evolve(loaded, train=attrs.evolve(loaded.train, tread_config=routes))
    text = format_plan(build_plan(loaded))
    assert "tread: 50% of image tokens skip blocks 2..-2 (training forwards only)" in text


def _with(loaded, **train):
    import attrs

    return attrs.evolve(loaded, train=attrs.evolve(loaded.train, **train))


@pytest.mark.parametrize("family", ["z-image", "flux"])
def test_tune_check_says_timestep_bias_does_nothing_for_flow_families(tmp_path, family):
    plan = build_plan(_with(_project(tmp_path, family, None), timestep_bias_strategy="later", timestep_bias_multiplier=2.0))
    assert plan["noise"]["timestep_bias"] == "later ignored (flow matching)"
    text = format_plan(plan)
    assert f"warning: timestep_bias_strategy 'later' has no effect: model_family {family!r} trains with flow matching" in text


def test_tune_check_shows_the_timestep_bias_of_a_ddpm_family(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    loaded = _project(tmp_path / "a", "sdxl", None)
    assert "timestep_bias" not in build_plan(loaded)["noise"]
    later = build_plan(_with(loaded, timestep_bias_strategy="later", timestep_bias_multiplier=2.0))
    assert later["noise"]["timestep_bias"] == "later: the last 0.25 of the timesteps drawn with weight 2 (others 1)"
    assert "has no effect" not in format_plan(later)
    removed = build_plan(_with(loaded, timestep_bias_strategy="range", timestep_bias_multiplier=0.0,
                               timestep_bias_begin=200, timestep_bias_end=400))
    assert removed["noise"]["timestep_bias"] == "range: timesteps 200..399 never drawn"
    assert "timestep_bias" not in format_plan(build_plan(_project(tmp_path / "b", "z-image", None)))
