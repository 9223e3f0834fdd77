"""SimpleTuner's ``dataset_type: eval``: an image dataset held out from training."""

from __future__ import annotations

import attrs
import pytest

from tune_data.config import DatasetConfig, DatasetConfigError, load_dataset_configs

TEXT = {"id": "text", "dataset_type": "text_embeds", "default": True}


def test_eval_dataset_reads_as_a_held_out_image_dataset():
    train, held, _ = load_dataset_configs([
        {"id": "pets", "instance_data_dir": "data/pets"},
        {"--id": "pets-eval", "--dataset_type": "eval", "instance_data_dir": "data/eval", "resolution": 512},
        TEXT,
    ])
    assert (held.id, held.dataset_type, held.held_out, held.is_image, held.resolution) == (
        "pets-eval", "image", True, True, 512.0)
    assert not train.held_out
    # copies made with attrs.evolve (as discovery of conditioning data does) stay held out
    assert attrs.evolve(held, caption_strategy="filename").held_out


def test_held_out_is_not_a_key_of_its_own():
    with pytest.raises(DatasetConfigError, match="unknown key 'held_out'"):
        DatasetConfig.from_dict({"id": "pets", "instance_data_dir": "x", "held_out": True})


def test_only_eval_datasets_leave_nothing_to_train_on():
    with pytest.raises(DatasetConfigError, match=r"every image dataset \('a', 'b'\) is dataset_type 'eval'.*nothing"):
        load_dataset_configs([
            {"id": "a", "dataset_type": "eval", "instance_data_dir": "x"},
            {"id": "b", "dataset_type": "eval", "instance_data_dir": "y"},
            TEXT,
        ])
