"""``push_checkpoints_to_hub`` and ``push_to_hub_background`` through the real loop on the tiny
Z-Image, against a stand-in Hub (HfApi's two calls; ``upload_folder`` copies what it is given into
a local folder, what the repo would then hold)."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tune.config import load_config
from tune_publish.hub_uploads import STAGING_PREFIX
from tune_train.config import ConfigError, TrainConfig
from tune_train.trainer import Trainer as Loop

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class LocalHub:
    """Uploads land under ``root/<repo>/<path_in_repo>``; ``hold`` names an upload that waits for
    ``release`` (an Event) before it copies anything; ``fail`` makes checkpoint uploads raise."""

    def __init__(self, root: Path, monkeypatch, *, hold: str | None = None, fail: Exception | None = None):
        from huggingface_hub import HfApi

        self.root, self.hold, self.fail = root, hold, fail
        self.release = threading.Event()
        self.held = threading.Event()  # set when the held upload has started
        self.events: list[tuple[str, str]] = []  # ("start" | "done", what)
        hub = self

        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(url=f"https://hub.test/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, **kwargs):
            name = path_in_repo or "final"
            hub.events.append(("start", name))
            if name == hub.hold:
                hub.held.set()
            if name == hub.hold and not hub.release.wait(timeout=30):
                raise TimeoutError("the held upload was never released: training did not go on meanwhile")
            if hub.fail is not None and path_in_repo:
                raise hub.fail
            target = hub.root / repo_id / (path_in_repo or "")
            for file in sorted(Path(folder_path).rglob("*")):
                rel = file.relative_to(folder_path).as_posix()
                if file.is_file() and (allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, target / rel)
            hub.events.append(("done", name))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


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
    hub = LocalHub(tmp_path / "hub", monkeypatch, hold="checkpoint-2" if background else None)
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
    LocalHub(tmp_path / "hub", monkeypatch, fail=ConnectionError("hub unreachable"))
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
