"""``push_checkpoints_to_hub`` and ``push_to_hub_background`` through the real loop on the tiny
Z-Image, against a stand-in Hub (:class:`tune_publish.testing.FakeHub`: ``upload_folder`` copies
what it is given into a local folder, what the repo would then hold)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tune.config import load_config
from tune_publish.hub_uploads import STAGING_PREFIX
from tune_publish.testing import FakeHub
from tune_train.config import ConfigError, TrainConfig
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _loop(write_run, root: Path, model: Path, data: Path, **extra) -> Loop:
    config = write_run(root, model=model, data=data, steps=4, extra={
        "--push_to_hub": True, "--hub_model_id": "me/tiny-lora", "--push_checkpoints_to_hub": True,
        "--checkpoint_step_interval": 2, **extra})
    loaded = load_config(config)
    assert not {"push_checkpoints_to_hub", "push_to_hub_background"} & set(loaded.ignored)
    return Loop(loaded.train, loaded.datasets, progress=False)


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_every_checkpoint_is_uploaded_whole_and_the_run_waits_for_it(
    tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch, background
):
    hub = FakeHub(tmp_path / "hub", hold="checkpoint-2" if background else None).install(monkeypatch)
    loop = _loop(write_run, tmp_path, tiny_zimage, shapes_dir, **{"--push_to_hub_background": background})
    steps_while_held: list[int] = []
    original = loop.train_step

    def train_step():
        logs = original()
        if background and loop.global_step == 3:
            assert hub.held.wait(timeout=10)  # the worker has picked up checkpoint-2...
            if ("done", "checkpoint-2") not in hub.events:
                steps_while_held.append(loop.global_step)  # ...and training took a step meanwhile
            hub.release.set()
        return logs

    loop.train_step = train_step
    result = loop.train()
    out, repo = tmp_path / "output", tmp_path / "hub" / "me" / "tiny-lora"
    if background:
        # Training went on (step 3) while checkpoint-2 was still uploading...
        assert steps_while_held == [3]
    # ...yet when train() returns every upload is done, checkpoints first, the final push last.
    assert [e for e in hub.events if e[0] == "done"] == [("done", "checkpoint-2"), ("done", "checkpoint-4"), ("done", "final")]
    assert result.outputs["hub"] == "https://hub.test/me/tiny-lora"
    for step in (2, 4):
        uploaded = _files(repo / f"checkpoint-{step}")
        assert uploaded == _files(out / f"checkpoint-{step}")  # the whole checkpoint, byte for byte
        assert {"pytorch_lora_weights.safetensors", "adapter.safetensors", "checkpoint.json"} <= set(uploaded)
    assert (repo / "pytorch_lora_weights.safetensors").read_bytes() == Path(result.outputs["lora"]).read_bytes()
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def test_failed_background_checkpoint_upload_is_reported_and_keeps_the_files(
    tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch, caplog
):
    FakeHub(tmp_path / "hub", fail=ConnectionError("hub unreachable"), failing="checkpoint-*").install(monkeypatch)
    loop = _loop(write_run, tmp_path, tiny_zimage, shapes_dir, **{"--push_to_hub_background": True})
    with caplog.at_level(logging.WARNING, logger="tune_publish"):
        result = loop.train()
    assert "push_to_hub to 'me/tiny-lora' failed for checkpoint-2 (ConnectionError: hub unreachable)" in caplog.text
    assert "2 of 2 hub upload(s) to 'me/tiny-lora' failed" in caplog.text
    out = tmp_path / "output"
    assert all((out / f"checkpoint-{step}" / "adapter.safetensors").is_file() for step in (2, 4))
    assert result.outputs["hub"] == "https://hub.test/me/tiny-lora"  # the final push still went through
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def test_push_checkpoints_to_hub_needs_push_to_hub():
    with pytest.raises(ConfigError, match="push_checkpoints_to_hub needs push_to_hub"):
        TrainConfig(model_family="z-image", max_train_steps=1, push_checkpoints_to_hub=True)
