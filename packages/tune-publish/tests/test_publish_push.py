"""``push_to_hub`` from the lifecycle hooks, against a fake Hub (:class:`tune_publish.testing.FakeHub`:
HfApi's two calls recorded)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from tune_publish.lora_file import save_lora
from tune_publish.model_card import write_model_card
from tune_publish.push import hub_settings, push_run, warn_if_no_token
from tune_publish.testing import FakeHub


@pytest.fixture
def output_dir(tmp_path):
    out = tmp_path / "output"
    save_lora({"w": torch.ones(2, 2)}, out / "pytorch_lora_weights.safetensors")
    (out / "validation").mkdir()
    (out / "validation" / "step-2.png").write_bytes(b"png")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"big")
    write_model_card(out, base_model="base/model", family="z-image", flavour="base", title="t", settings={},
                     validation_images=[("a prompt", "validation/step-2.png")], adapter_id="me/lora")
    return out


def run_config(**kwargs):
    values = {"push_to_hub": True, "hub_model_id": "me/lora", "model_card_private": False, "model_family": "z-image"}
    return SimpleNamespace(**(values | kwargs))


def test_push_uploads_adapter_card_and_images_to_the_repo(output_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub().install(monkeypatch)
    assert push_run(str(output_dir), run_config(model_card_private=True)) == {"hub": "https://hub.test/me/lora"}
    (create, created), (upload, uploaded) = hub.calls
    assert create == "create_repo" and created["repo_id"] == "me/lora" and created["private"] is True
    assert created["exist_ok"] is True and created["token"] == "hf_test_token"
    assert upload == "upload_folder" and uploaded["repo_id"] == "me/lora" and uploaded["folder_path"] == str(output_dir)
    # what a user needs, not the checkpoints
    assert sorted(uploaded["allow_patterns"]) == ["README.md", "pytorch_lora_weights.safetensors", "validation/step-2.png"]


def test_public_by_default_and_nothing_without_push_to_hub(output_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub().install(monkeypatch)
    assert push_run(str(output_dir), run_config(push_to_hub=False)) == {} and hub.calls == []
    assert hub_settings(SimpleNamespace()) is None  # a config without the keys does not push
    push_run(str(output_dir), run_config())
    assert hub.calls[0][1]["private"] is False


def test_failed_upload_warns_and_keeps_the_local_outputs(output_dir, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    FakeHub(fail=ConnectionError("hub unreachable")).install(monkeypatch)
    before = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*"))
    with caplog.at_level(logging.WARNING, logger="tune_publish.push"):
        assert push_run(str(output_dir), run_config()) == {}
    assert "push_to_hub to 'me/lora' failed (ConnectionError: hub unreachable)" in caplog.text
    assert f"outputs are safe in {output_dir}" in caplog.text
    assert sorted(p.relative_to(output_dir) for p in output_dir.rglob("*")) == before


def _no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


def test_missing_token_warns_at_start_and_fails_softly_at_the_end(output_dir, monkeypatch, caplog):
    _no_token(monkeypatch)
    hub = FakeHub().install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tune_publish.push"):
        warn_if_no_token(run_config())
        assert "no Hugging Face token was found" in caplog.text
        caplog.clear()
        warn_if_no_token(run_config(push_to_hub=False))
        assert caplog.text == ""
        assert push_run(str(output_dir), run_config()) == {}
    assert "PublishError" in caplog.text and "hf auth login" in caplog.text
    assert hub.calls == []  # refused before any network call

