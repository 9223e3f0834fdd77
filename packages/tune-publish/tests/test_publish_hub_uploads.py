"""``push_checkpoints_to_hub`` and ``push_to_hub_background`` through tune-publish's lifecycle hooks,
against a stand-in Hub (:class:`tune_publish.testing.FakeHub`: ``upload_folder`` copies what it is
given into a local folder, what the repo would hold, optionally held back or failing)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tune_publish import builtins as hooks
from tune_publish.hub_uploads import STAGING_PREFIX, HubUploads
from tune_publish.lora_file import save_lora
from tune_publish.testing import FakeHub


def _checkpoint(output_dir: Path, step: int) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    save_lora({"w": torch.full((2, 2), float(step))}, folder / "pytorch_lora_weights.safetensors")
    (folder / "training_state.pt").write_bytes(b"optimizer state %d" % step)
    (folder / "checkpoint.json").write_text('{"step": %d}' % step)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _trainer(tmp_path: Path, **keys) -> SimpleNamespace:
    config = {"push_to_hub": True, "hub_model_id": "me/lora", "model_card_private": False,
              "model_family": "z-image", "push_checkpoints_to_hub": True, "push_to_hub_background": False}
    output = tmp_path / "output"
    output.mkdir(exist_ok=True)
    return SimpleNamespace(config=SimpleNamespace(**(config | keys)), output_dir=output,
                           accelerator=SimpleNamespace(is_main_process=True))


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


def test_each_checkpoint_goes_whole_to_its_own_folder_of_the_repo(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    trainer = _trainer(tmp_path)
    hooks.tune_train_start(trainer)
    for step in (2, 4):
        hooks.tune_checkpoint_saved(trainer, step, str(_checkpoint(trainer.output_dir, step)))
        # inline: the upload is done when the hook returns
        assert hub.finished[-1] == f"checkpoint-{step}"
    repo = tmp_path / "hub" / "me" / "lora"
    for step in (2, 4):
        assert _files(repo / f"checkpoint-{step}") == _files(trainer.output_dir / f"checkpoint-{step}")


def test_no_checkpoint_upload_without_push_checkpoints_to_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    trainer = _trainer(tmp_path, push_checkpoints_to_hub=False)
    hooks.tune_train_start(trainer)
    hooks.tune_checkpoint_saved(trainer, 2, str(_checkpoint(trainer.output_dir, 2)))
    assert hub.started == []


def test_background_upload_returns_at_once_survives_pruning_and_is_awaited(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", hold="checkpoint-2").install(monkeypatch)
    uploads = HubUploads("me/lora", tmp_path, background=True)
    from tune_publish.push import upload_checkpoint

    settings = {"hub_model_id": "me/lora", "private": False}
    folder = _checkpoint(tmp_path, 2)
    expected = _files(folder)
    assert uploads.submit("checkpoint-2", folder, lambda f: upload_checkpoint(f, settings)) is None
    # The call returned while the upload is still held at the Hub...
    assert uploads.pending == 1 and hub.finished == []
    # ...and checkpoints_total_limit may prune the folder before it is read: a snapshot is uploaded.
    shutil.rmtree(folder)
    hub.release.set()
    assert uploads.wait() == []
    assert hub.finished == ["checkpoint-2"] and uploads.pending == 0
    assert _files(tmp_path / "hub" / "me" / "lora" / "checkpoint-2") == expected
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))  # snapshots removed once uploaded


def test_failed_background_upload_is_reported_with_the_repo_and_keeps_the_files(tmp_path, monkeypatch, caplog):
    FakeHub(tmp_path / "hub", fail=ConnectionError("hub unreachable")).install(monkeypatch)
    trainer = _trainer(tmp_path, push_to_hub_background=True)
    hooks.tune_train_start(trainer)
    folder = _checkpoint(trainer.output_dir, 2)
    before = _files(folder)
    with caplog.at_level(logging.WARNING, logger="tune_publish"):
        hooks.tune_checkpoint_saved(trainer, 2, str(folder))
        from tune_publish.push import finish_uploads

        finish_uploads(trainer)  # what tune_train_end does before the final push
    assert "push_to_hub to 'me/lora' failed for checkpoint-2 (ConnectionError: hub unreachable)" in caplog.text
    assert f"the files are safe in {folder}" in caplog.text
    # the end-of-run summary says it again, with the count
    assert "1 of 1 hub upload(s) to 'me/lora' failed: checkpoint-2 (ConnectionError: hub unreachable)" in caplog.text
    assert _files(folder) == before
    assert not list(trainer.output_dir.glob(f"{STAGING_PREFIX}*"))


def test_failed_inline_upload_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    FakeHub(tmp_path / "hub", fail=PermissionError("403 forbidden")).install(monkeypatch)
    trainer = _trainer(tmp_path)
    hooks.tune_train_start(trainer)
    with caplog.at_level(logging.WARNING, logger="tune_publish"):
        hooks.tune_checkpoint_saved(trainer, 2, str(_checkpoint(trainer.output_dir, 2)))  # does not raise
    assert "push_to_hub to 'me/lora' failed for checkpoint-2 (PermissionError: 403 forbidden)" in caplog.text

