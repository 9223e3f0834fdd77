"""Run control through the real loop on the tiny Z-Image: ``report_to: comet_ml`` (offline) and
``push_to_hub`` uploading the finished run through tune-publish's lifecycle hook to a fake Hub."""

from __future__ import annotations

import json
import logging
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tune import Trainer
from tune.config import load_config
from tune_publish.testing import FakeHub
from tune_train.config import ConfigError

pytestmark = pytest.mark.slow


def test_comet_ml_offline_logs_the_loss(tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch):
    pytest.importorskip("comet_ml")
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=2,
                       extra={"--report_to": "comet_ml", "--tracker_run_name": "tiny-comet"})
    loaded = load_config(config)
    assert loaded.train.report_to == "comet_ml" and not any("report_to" in w for w in loaded.warnings)
    result = Trainer.from_config(config, progress=False).train()
    archives = list(Path(result.outputs["comet_ml"]).glob("*.zip"))  # comet's offline experiment
    assert len(archives) == 1
    with zipfile.ZipFile(archives[0]) as archive:
        experiment = json.loads(archive.read("experiment.json"))
        messages = archive.read("messages.json").decode()
    assert experiment["project_name"] == "tune"  # tracker_project_name
    records = [json.loads(line) for line in messages.splitlines()]
    metrics = [r["payload"]["metric"] for r in records if r["type"] == "metric_msg"]
    losses = {m["step"]: m["metricValue"] for m in metrics if m["metricName"] == "train/loss"}
    assert sorted(losses) == [1, 2]
    assert [losses[1], losses[2]] == pytest.approx(result.losses, rel=1e-6)  # the loop's own numbers
    params = {r["payload"]["param"]["paramName"]: r["payload"]["param"]["paramValue"]
              for r in records if r["type"] == "parameter_msg"}
    assert params["tracker_run_name"] == "tiny-comet" and float(params["learning_rate"]) == 1e-3


def test_missing_comet_ml_names_the_install_command(tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # as if not installed: import raises
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={"--report_to": "comet_ml"})
    trainer = Trainer.from_config(config, progress=False)
    with pytest.raises(ConfigError, match=r"report_to 'comet_ml' needs the comet_ml package.*tune-train\[comet\]"):
        trainer.train()
    assert not (tmp_path / "cache" / "text").exists()  # refused before any model or cache work


PUSH = {
    "--push_to_hub": True,
    "--hub_model_id": "me/tiny-lora",
    "--validation_disable": False,
    "--validation_prompt": "a blue square",
    "--validation_resolution": "32",
    "--validation_num_inference_steps": 2,
}


def test_push_to_hub_uploads_the_run_at_train_end(tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub().install(monkeypatch)
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=2,
                       extra={**PUSH, "--model_card_private": True})
    loaded = load_config(config)
    assert loaded.train.model_card_private and "model_card_private" not in loaded.ignored
    result = Trainer.from_config(config, progress=False).train()
    out = tmp_path / "output"
    assert result.outputs["hub"] == "https://hub.test/me/tiny-lora"
    (create, created), (upload, uploaded) = hub.calls
    assert create == "create_repo" and created["repo_id"] == "me/tiny-lora" and created["private"] is True
    assert upload == "upload_folder" and uploaded["repo_id"] == "me/tiny-lora"
    assert Path(uploaded["folder_path"]) == out
    files = uploaded["allow_patterns"]
    images = [f for f in files if f.endswith(".png")]
    assert files[:2] == ["pytorch_lora_weights.safetensors", "README.md"]
    assert images and all(f.startswith("validation/") and (out / f).is_file() for f in images)
    assert not any(f.startswith("checkpoint-") or f.startswith("logs") for f in files)  # only what a user needs
    # the card tells readers to load the adapter from the repo it was pushed to
    assert 'load_lora_weights("me/tiny-lora"' in (out / "README.md").read_text()


def test_failed_push_warns_and_keeps_the_outputs(tmp_path, tiny_zimage, shapes_dir, write_run, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub(fail=ConnectionError("hub unreachable")).install(monkeypatch)
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={**PUSH, "--validation_disable": True})
    with caplog.at_level(logging.WARNING, logger="tune_publish.push"):
        result = Trainer.from_config(config, progress=False).train()
    assert "hub" not in result.outputs and [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert "push_to_hub to 'me/tiny-lora' failed (ConnectionError: hub unreachable)" in caplog.text
    assert Path(result.outputs["lora"]).is_file() and Path(result.outputs["model_card"]).is_file()
    assert all(torch.isfinite(torch.tensor(result.losses)))
