"""TrainConfig: defaults, validation messages that name the key, derived values, field docs."""

from __future__ import annotations

import attrs
import pytest

from tune_train.config import ConfigError, TrainConfig, field_docs


def make(**kwargs):
    return TrainConfig(model_family="z-image", **kwargs)


def test_defaults_are_simpletuner_like():
    config = make()
    assert config.model_type == "lora"
    assert config.lora_rank == 16 and config.lora_alpha is None
    assert config.learning_rate == 1e-4
    assert config.resolution == 1024.0 and config.resolution_type == "pixel_area"
    assert config.validation_on_startup is True
    assert config.max_train_steps is None and config.num_train_epochs == 1


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_lora_rank_error_names_the_key():
    with pytest.raises(ConfigError, match=r"^lora_rank must be > 0, got 0$"):
        make(lora_rank=0)


def test_validators_also_run_on_assignment():
    config = make()
    with pytest.raises(ConfigError, match="lora_rank must be > 0"):
        config.lora_rank = -1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mixed_precision", "fp32", "mixed_precision must be one of bf16, fp16, no; got 'fp32'"),
        ("lora_format", "kohya", "lora_format must be one of diffusers, comfyui; got 'kohya'"),
        ("resolution_type", "pixels", "resolution_type must be one of pixel, area, pixel_area"),
        ("group_offload_type", "x", "group_offload_type must be one of block_level, leaf_level"),
        ("checkpoints_total_limit", 0, "checkpoints_total_limit must be >= 1, got 0"),
        ("caption_dropout_probability", 1.5, "caption_dropout_probability must be between 0 and 1"),
        ("optimizer_beta2", 1.0, r"optimizer_beta2 must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_values_list_choices_or_rule(key, value, message):
    with pytest.raises(ConfigError, match=message):
        make(**{key: value})


def test_known_but_unimplemented_choices_say_so(monkeypatch):
    from tune_train import config as config_module

    # a value SimpleTuner knows that tune would not implement (set up here so that the test
    # does not go stale as the real ones get implemented)
    monkeypatch.setitem(config_module.CHOICES, "report_to", (("none", "mlflow"), ("none",)))
    with pytest.raises(ConfigError, match="report_to 'mlflow' is not implemented in tune yet"):
        make(report_to="mlflow")
    monkeypatch.undo()
    assert make(report_to="comet_ml").report_to == "comet_ml"  # implemented (tune_train.trackers)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lora_type": "lycoris"}, "lora_type 'lycoris' needs lycoris_config"),
        ({"lora_type": "lycoris", "lycoris_config": "l.json", "use_dora": True}, "set dora_wd in lycoris_config"),
        ({"model_type": "full", "base_model_precision": "int8-torchao"}, "would quantise them"),
        ({"model_type": "full", "lora_type": "lycoris", "lycoris_config": "l.json"}, "applies to model_type 'lora'"),
        ({"lora_init_type": "pissa", "use_dora": True}, "use_dora cannot be combined"),
        ({"lora_init_type": "olora", "init_lora": "a.safetensors"}, "init_lora cannot be combined"),
        ({"use_dora": True, "lora_format": "comfyui"}, "use_dora with lora_format 'comfyui' is not supported"),
        ({"lora_init_type": "kaiming"}, "lora_init_type must be one of default, gaussian, pissa, olora, loftq"),
    ],
)
def test_adapter_options_that_cannot_work_together_name_the_keys(values, message):
    with pytest.raises(ConfigError, match=message):
        make(**values)


def test_an_inverted_refiner_schedule_needs_timesteps_left_to_train():
    make(refiner_training=True, refiner_training_invert_schedule=True, refiner_training_strength=0.35)
    with pytest.raises(ConfigError, match="with refiner_training_strength 1.0 none are left"):
        make(refiner_training=True, refiner_training_invert_schedule=True, refiner_training_strength=1.0)


def test_offload_strategies_are_mutually_exclusive():
    with pytest.raises(
        ConfigError, match="enable_group_offload and enable_model_cpu_offload are mutually exclusive"
    ):
        make(enable_group_offload=True, enable_model_cpu_offload=True)


def test_steps_need_max_train_steps_or_epochs():
    assert make(max_train_steps=0).max_train_steps is None  # 0 means "derive", as in SimpleTuner
    with pytest.raises(ConfigError, match="max_train_steps or num_train_epochs"):
        make(max_train_steps=0, num_train_epochs=0)
    assert make(max_train_steps=10, num_train_epochs=0).total_steps(batches_per_epoch=3) == 10


def test_total_steps_from_epochs_rounds_partial_accumulation_up():
    config = make(num_train_epochs=3, gradient_accumulation_steps=4)
    assert config.total_steps(batches_per_epoch=10) == 3 * 3


def test_push_to_hub_needs_a_repository():
    with pytest.raises(ConfigError, match="push_to_hub needs hub_model_id"):
        make(push_to_hub=True)


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("1024", [(1024, 1024)]),
        ("512x768", [(512, 768)]),
        ("1024x1024, 1280x768,2048x2048", [(1024, 1024), (1280, 768), (2048, 2048)]),
        ("768,1024X512", [(768, 768), (1024, 512)]),
    ],
)
def test_validation_sizes(text, sizes):
    assert make(validation_resolution=text).validation_sizes() == sizes


def test_unset_validation_resolution_follows_the_flavour():
    """Unset, validation makes square images at the flavour's ``resolution`` (512 for a 512 px
    checkpoint), else 1024; a size the user sets wins."""
    assert make().validation_resolution is None
    assert make().validation_sizes() == [(1024, 1024)]
    assert make().validation_sizes(default=512) == [(512, 512)]
    assert make(validation_resolution="768").validation_sizes(default=512) == [(768, 768)]
    assert make(validation_resolution="1024").validation_sizes(default=512) == [(1024, 1024)]

    from types import SimpleNamespace

    from tune_models.family import Flavour
    from tune_train.validation import validation_sizes

    flavour = Flavour(name="small", pretrained="x", inference_steps=2, guidance=1.0, shift=None, resolution=512)
    assert validation_sizes(SimpleNamespace(config=make(), flavour=flavour)) == [(512, 512)]
    assert validation_sizes(SimpleNamespace(config=make(validation_resolution="64x32"), flavour=flavour)) == [(64, 32)]
    plain = Flavour(name="base", pretrained="x", inference_steps=2, guidance=1.0, shift=None)
    assert validation_sizes(SimpleNamespace(config=make(), flavour=plain)) == [(1024, 1024)]


@pytest.mark.parametrize("text", ["", "big", "1024x", "0", "512x-1", "x512"])
def test_bad_validation_resolution(text):
    with pytest.raises(ConfigError, match="validation_resolution"):
        make(validation_resolution=text)


def test_lora_alpha_defaults_to_rank():
    assert make(lora_rank=8).lora_scale_alpha() == 8.0
    assert make(lora_rank=8).lora_scale() == 1.0
    assert make(lora_rank=8, lora_alpha=4).lora_scale() == 0.5


def test_every_field_has_a_docstring_with_a_default():
    docs = field_docs(TrainConfig)
    names = [field.name for field in attrs.fields(TrainConfig)]
    assert list(docs) == names
    for name in names:
        doc = docs[name]
        assert len(doc) > 20, f"{name}: docstring too short"
        assert "Default" in doc or "Required" in doc, f"{name}: docstring does not state the default"


def test_plain_data_class_is_keyword_only():
    with pytest.raises(TypeError):
        TrainConfig("z-image")  # type: ignore[misc]
