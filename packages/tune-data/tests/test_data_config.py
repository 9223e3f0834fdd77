"""Reading multidatabackend.json: SimpleTuner keys, defaults, and errors a user can act on."""

from __future__ import annotations

import ast
import inspect
import json
import re
import warnings

import pytest

from tune_data import config as config_module
from tune_data.config import (
    DatasetConfig,
    DatasetConfigError,
    IgnoredKeysWarning,
    default_text_embeds,
    load_dataset_configs,
    text_embeds_for,
)


def entry(**overrides):
    return {"id": "pets", "instance_data_dir": "data/pets", **overrides}


def test_simpletuner_entry_with_dashes_and_string_values_is_typed():
    cfg = DatasetConfig.from_dict(
        {"--id": "pets", "--instance_data_dir": "x", "--resolution": "512", "--crop": "true", "repeats": 2.0}
    )
    assert cfg.id == "pets"
    assert cfg.resolution == 512.0
    assert cfg.crop is True
    assert cfg.repeats == 2 and isinstance(cfg.repeats, int)


def test_unknown_key_names_dataset_key_and_closest_known_key():
    with pytest.raises(DatasetConfigError) as info:
        DatasetConfig.from_dict(entry(resolutoin=512))
    assert str(info.value) == "dataset 'pets': unknown key 'resolutoin'; did you mean 'resolution'?"


def test_bad_resolution_type_message():
    with pytest.raises(DatasetConfigError) as info:
        DatasetConfig.from_dict(entry(resolution_type="foo"))
    assert (
        str(info.value) == "dataset 'pets': resolution_type must be one of pixel, area, pixel_area, got 'foo'"
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("resolution", 0, "resolution must be > 0"),
        ("resolution", "big", "resolution must be a number, got 'big'"),
        ("crop", "maybe", "crop must be true or false"),
        ("repeats", -1, "repeats must be >= 0"),
        ("repeats", 1.5, "repeats must be a whole number"),
        ("probability", 1.5, "probability must be between 0 and 1"),
        ("crop_style", "face", "crop_style 'face' needs a face detector, which tune does not ship"),
        ("crop_style", "edge", "crop_style must be one of center, random, corner"),
        ("crop_aspect", "closest", "crop_aspect_buckets is required when crop_aspect is 'closest'"),
        ("crop_aspect", "wide", "crop_aspect must be one of square, preserve, closest, random"),
        ("crop_aspect_buckets", [1.0, -2], "crop_aspect_buckets aspect ratios must be > 0"),
        ("metadata_backend", "sql", "metadata_backend must be one of discovery, parquet, huggingface"),
        ("metadata_backend", "parquet", "metadata_backend 'parquet' needs parquet_width_column"),
        ("scan_for_errors", "perhaps", "scan_for_errors must be true or false"),
        ("dataset_type", "audio", "dataset_type must be one of"),
        ("skip_file_discovery", "vae bogus", "skip_file_discovery may only name"),
        ("caption_strategy", "instanceprompt", "instance_prompt is required when caption_strategy"),
    ],
)
def test_invalid_values_name_dataset_and_key(key, value, expected):
    with pytest.raises(DatasetConfigError, match=f"^dataset 'pets': {expected}"):
        DatasetConfig.from_dict(entry(**{key: value}))


def test_simpletuner_only_keys_are_accepted_and_reported_once():
    with pytest.warns(IgnoredKeysWarning) as record:
        cfg = DatasetConfig.from_dict(entry(aws_bucket_name="b", hash_filenames=True, start_step=3))
    assert len(record) == 1
    assert "dataset 'pets'" in str(record[0].message)
    assert "hash_filenames, start_step" in str(record[0].message)
    assert cfg.ignored_keys == ("hash_filenames", "start_step")
    assert cfg.aws_bucket_name == "b"  # implemented now


def test_defaults_fill_only_unset_dataset_keys():
    trainer = {
        "--resolution": 512,
        "resolution_type": "pixel",
        "crop": True,
        "learning_rate": 1e-4,
        "minimum_image_size": None,
    }
    cfg = DatasetConfig.from_dict(entry(crop=False), defaults=trainer)
    assert cfg.resolution == 512 and cfg.resolution_type == "pixel"
    assert cfg.crop is False  # the entry's own value wins
    assert cfg.minimum_image_size is None  # None in the trainer config means unset


def test_cache_settings_change_with_resolution_only_when_it_matters():
    base = DatasetConfig.from_dict(entry())
    assert base.cache_settings() == DatasetConfig.from_dict(entry(repeats=3)).cache_settings()
    assert base.cache_settings() != DatasetConfig.from_dict(entry(resolution=512)).cache_settings()
    json.dumps(base.cache_settings())  # must be usable as a JSON cache key


def write(tmp_path, data):
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(data))
    return path


def test_load_file_drops_disabled_and_links_text_embeds(tmp_path):
    path = write(
        tmp_path,
        [
            entry(text_embeds="te-b"),
            {"id": "old", "instance_data_dir": "x", "disabled": True},
            {"id": "te-a", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/a"},
            {"id": "te-b", "dataset_type": "text_embeds", "cache_dir": "cache/b"},
            {"id": "second", "instance_data_dir": "relative/dir"},
        ],
    )
    configs = load_dataset_configs(path)
    assert [c.id for c in configs] == ["pets", "te-a", "te-b", "second"]
    assert configs[3].instance_data_dir == "relative/dir"  # relative paths are kept as written
    assert default_text_embeds(configs).id == "te-a"
    assert text_embeds_for(configs[0], configs).id == "te-b"
    assert text_embeds_for(configs[3], configs).id == "te-a"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"id": "pets"}, "must hold a JSON list of dataset entries, got dict"),
        ([{"instance_data_dir": "x"}], 'entry 0 is missing "id"'),
        ([entry(), entry()], "dataset id 'pets' is used by entries 0 and 1"),
        ([entry(disabled=True)], "no enabled dataset of dataset_type 'image' or 'video'"),
        ([{"id": "te", "dataset_type": "text_embeds"}], "no enabled dataset of dataset_type 'image' or 'video'"),
        (
            [entry(text_embeds="nope")],
            "dataset 'pets': text_embeds names 'nope', which is not an enabled text_embeds dataset",
        ),
    ],
)
def test_load_errors(tmp_path, data, message):
    with pytest.raises(DatasetConfigError, match=re.escape(message)):
        load_dataset_configs(write(tmp_path, data))


def test_load_accepts_a_parsed_list_and_defaults():
    configs = load_dataset_configs([entry()], defaults={"resolution": 768})
    assert configs[0].resolution == 768


def test_missing_file_and_bad_json_are_config_errors(tmp_path):
    with pytest.raises(DatasetConfigError, match="does not exist"):
        load_dataset_configs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DatasetConfigError, match="is not valid JSON"):
        load_dataset_configs(bad)


def test_unimplemented_dataset_type_is_accepted_then_refused_on_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = DatasetConfig.from_dict(entry(dataset_type="image_embeds"))
    with pytest.raises(NotImplementedError, match="dataset 'pets': dataset_type 'image_embeds' is accepted"):
        cfg.require_implemented()


def test_every_field_has_a_docstring():
    """The config reference is generated from these docstrings; a field without one is undocumented."""
    tree = ast.parse(inspect.getsource(config_module.DatasetConfig))
    body = tree.body[0].body
    documented = set()
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                documented.add(node.target.id)
    fields = {field.name for field in DatasetConfig.__attrs_attrs__}
    assert fields - documented == set()


def test_trainer_level_data_keys_reach_every_dataset_and_are_checked():
    from tune_data.config import DatasetConfig, DatasetConfigError

    defaults = {"--allow_dataset_oversubscription": "true", "data_backend_sampling": "uniform",
                "ignore_missing_files": True, "write_batch_size": 16}
    dataset = DatasetConfig.from_dict({"id": "d"}, defaults=defaults)
    assert (dataset.allow_dataset_oversubscription, dataset.data_backend_sampling, dataset.ignore_missing_files,
            dataset.write_batch_size) == (True, "uniform", True, 16)
    assert dataset.ignored_keys == ()
    assert DatasetConfig(id="d").data_backend_sampling == "auto-weighting"
    with pytest.raises(DatasetConfigError, match="data_backend_sampling must be one of auto-weighting, uniform, got 'random'"):
        DatasetConfig.from_dict({"id": "d", "data_backend_sampling": "random"})
