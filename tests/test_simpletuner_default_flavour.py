"""A config without ``model_flavour`` trains the family's default flavour; where SimpleTuner's
default is another checkpoint, the run and ``tune check`` say so (a config brought from
SimpleTuner would otherwise train another model without a word)."""

from __future__ import annotations

import logging

import pytest

from tune.config import load_config
from tune.plan import build_plan, format_plan
from tune_models.flavour_facts import default_flavour_note


def test_the_note_names_both_defaults_and_how_to_choose():
    note = default_flavour_note("sana", "sana1.5-1.6b", "sana1.5-4.8b-1024", {"sana1.5-4.8b-1024": "sana1.5-4.8b"})
    assert note == (
        "model_flavour is not set: tune trains sana's default flavour 'sana1.5-1.6b', while SimpleTuner's "
        "default is 'sana1.5-4.8b-1024' (tune's 'sana1.5-4.8b'); set model_flavour to choose"
    )
    assert "not available in tune" in default_flavour_note("qwen_image", "base", "v2.1", {}, {"v2.1": "why"})
    assert default_flavour_note("sdxl", "base", "base-1.0", {"base-1.0": "base"}) is None  # the same checkpoint
    assert default_flavour_note("sd3", "medium", None) is None


def test_tune_check_shows_the_note_only_when_no_flavour_is_set(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "multidatabackend.json").write_text(
        '[{"id": "pics", "type": "local", "instance_data_dir": "%s", "caption_strategy": "filename"}]' % data
    )
    config = tmp_path / "config.json"
    config.write_text('{"model_family": "z-image", "data_backend_config": "%s"}' % (tmp_path / "multidatabackend.json"))
    plan = build_plan(load_config(config))
    assert plan["flavour"]["name"] == "turbo" and "'turbo-ostris-v2' (tune's 'turbo-ostris-v2')" in plan["flavour"]["note"]
    assert "note: model_flavour is not set" in format_plan(plan)
    config.write_text(
        '{"model_family": "z-image", "model_flavour": "turbo", "data_backend_config": "%s"}'
        % (tmp_path / "multidatabackend.json")
    )
    assert "note" not in build_plan(load_config(config))["flavour"]


@pytest.mark.slow
def test_a_run_without_a_flavour_warns_once(tmp_path, tiny_zimage, shapes_dir, write_run, caplog):
    from tune_train.trainer import Trainer as Loop

    config = write_run(
        tmp_path, model=tiny_zimage, data=shapes_dir, steps=1,
        extra={"--model_flavour": None, "--disable_assistant_lora": True},
    )
    loaded = load_config(config)
    assert loaded.train.model_flavour is None
    with caplog.at_level(logging.WARNING, logger="tune_train.trainer"):
        result = Loop(loaded.train, loaded.datasets, progress=False).train()
    assert result.global_step == 1
    notes = [r.getMessage() for r in caplog.records if "model_flavour is not set" in r.getMessage()]
    assert len(notes) == 1 and "z-image's default flavour 'turbo'" in notes[0]
