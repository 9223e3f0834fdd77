"""SimpleTuner's memory keys are read from config.json, not reported as ignored."""

from __future__ import annotations

from tune.config import load_config


def test_simpletuner_memory_keys_are_read(tmp_path):
    loaded = load_config({
        "--model_family": "z-image",
        "--output_dir": str(tmp_path / "out"),
        "--max_train_steps": "1",
        "--base_model_precision": "int8-torchao",
        "--quantize_via": "accelerator",
        "--gradient_checkpointing": "true",
        "--gradient_checkpointing_interval": "2",
        "--offload_during_startup": "true",
        "--offload_during_save": "true",
        "data_backend_config": [
            {"id": "pics", "type": "local", "instance_data_dir": str(tmp_path), "caption_strategy": "filename"},
        ],
    })
    train = loaded.train
    assert (train.quantize_via, train.gradient_checkpointing_interval) == ("accelerator", 2)
    assert train.offload_during_startup and train.offload_during_save
    assert not {"quantize_via", "gradient_checkpointing_interval", "offload_during_startup",
                "offload_during_save"} & set(loaded.ignored)


def test_group_offload_with_a_quanto_preset_is_refused_naming_both_keys(tmp_path):
    import pytest

    from tune.config import ConfigError

    with pytest.raises(ConfigError, match="enable_group_offload cannot move optimum-quanto.*int8-quanto"):
        load_config({
            "--model_family": "z-image",
            "--output_dir": str(tmp_path / "out"),
            "--max_train_steps": "1",
            "--base_model_precision": "int8-quanto",
            "--enable_group_offload": "true",
            "data_backend_config": [
                {"id": "pics", "type": "local", "instance_data_dir": str(tmp_path), "caption_strategy": "filename"},
            ],
        })
