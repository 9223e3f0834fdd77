"""Config keys of SD3's skip-layer guidance (SimpleTuner's spelling): parsed from JSON lists or
comma lists, validated with the user's key in the message, and handed to the family as
``TrainConfig.validation_options()``."""

from __future__ import annotations

import pytest

from tune.config import ConfigError, load_config

DATASETS = [
    {"id": "pics", "type": "local", "instance_data_dir": "data", "caption_strategy": "filename"},
    {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
]
BASE = {"model_family": "sd3", "data_backend_config": DATASETS, "max_train_steps": 1}


def train(**keys):
    return load_config({**BASE, **keys}).train


@pytest.mark.parametrize("written", [[7, 8, 9], "7,8,9", "[7, 8, 9]", ["7", "8", "9"]])
def test_skip_layers_spellings(written):
    config = train(validation_guidance_skip_layers=written)
    assert config.validation_guidance_skip_layers == (7, 8, 9)
    assert config.validation_options() == {"validation_guidance_skip_layers": (7, 8, 9)}


def test_empty_list_turns_it_off_and_unset_keys_are_not_passed():
    assert train(validation_guidance_skip_layers=[]).validation_options() == {"validation_guidance_skip_layers": ()}
    assert train().validation_options() == {}
    config = train(
        validation_guidance_skip_layers=[1],
        validation_guidance_skip_layers_start=0.0,
        validation_guidance_skip_layers_stop=0.5,
        validation_guidance_skip_scale=3,
    )
    assert config.validation_options() == {
        "validation_guidance_skip_layers": (1,),
        "validation_guidance_skip_layers_start": 0.0,
        "validation_guidance_skip_layers_stop": 0.5,
        "validation_guidance_skip_scale": 3.0,
    }


def test_real_guidance_is_an_option_only_above_one():
    """SimpleTuner's ``validation_guidance_real`` (Flux's real CFG): its default 1 means off, so
    configs that carry it do not make other families warn."""
    assert train(validation_guidance_real=1.0).validation_options() == {}
    assert train(validation_guidance_real="3.5").validation_options() == {"validation_guidance_real": 3.5}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"validation_guidance_real": 0.5}, "validation_guidance_real must be >= 1"),
        ({"validation_guidance_skip_layers": [-1]}, "validation_guidance_skip_layers must be a list of block indices"),
        ({"validation_guidance_skip_layers": "7,x"}, "validation_guidance_skip_layers must be a list of block indices"),
        ({"validation_guidance_skip_layers": [7.5]}, "validation_guidance_skip_layers must be a list of whole numbers"),
        ({"validation_guidance_skip_layers_stop": 1.5}, "validation_guidance_skip_layers_stop must be between 0 and 1"),
        ({"validation_guidance_skip_layers_start": 0.3}, "validation_guidance_skip_layers_start .* must be below"),
        (
            {"validation_guidance_skip_layers_start": 0.5, "validation_guidance_skip_layers_stop": 0.4},
            "must be below validation_guidance_skip_layers_stop",
        ),
        ({"validation_guidance_skip_scale": -1}, "validation_guidance_skip_scale must be >= 0"),
    ],
)
def test_bad_values_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        train(**keys)


def test_peft_lora_target_modules_regex_is_one_entry():
    """A ``re:`` value is one regular expression, its commas included (not a comma list)."""
    config = train(peft_lora_target_modules=r"re:.*blocks\.\d{1,2}\.attn\.to_out")
    assert config.peft_lora_target_modules == (r"re:.*blocks\.\d{1,2}\.attn\.to_out",)
    mixed = train(peft_lora_target_modules=["to_q", r"re:single_transformer_blocks\.\d+\.attn\.to_out"])
    assert mixed.peft_lora_target_modules == ("to_q", r"re:single_transformer_blocks\.\d+\.attn\.to_out")
    assert train(peft_lora_target_modules="to_q,to_k").peft_lora_target_modules == ("to_q", "to_k")


@pytest.mark.slow
def test_a_run_hands_the_options_to_the_family(tmp_path, tiny_zimage, shapes_dir, write_run, caplog, monkeypatch):
    """The trainer passes ``validation_options()`` to ``family.generate``: Z-Image has no
    skip-layer guidance, so the run warns once (over two validations) and still makes its images."""
    import logging

    from tune import Trainer
    from tune_models import family as family_module

    monkeypatch.setattr(family_module, "_WARNED_OPTIONS", set())
    extra = {
        "--validation_disable": False,
        "--validation_prompt": "a red circle",
        "--validation_resolution": "32",
        "--validation_num_inference_steps": 1,
        "--validation_guidance_skip_layers": "[7, 8, 9]",
    }
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra=extra)
    with caplog.at_level(logging.WARNING, logger="tune_models.family"):
        Trainer.from_config(config, progress=False).train()
    warned = [r.getMessage() for r in caplog.records if r.name == "tune_models.family"]
    assert warned == ["validation_guidance_skip_layers does not apply to model_family 'z-image'; ignored"]
    assert len(list((tmp_path / "output" / "validation").glob("step-*/*.png"))) == 2
