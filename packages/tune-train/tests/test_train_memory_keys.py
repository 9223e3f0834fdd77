"""Memory keys of issue 5/6: caching moves one encoder at a time, and the config keys
(quantize_via, gradient_checkpointing_interval, offload_during_startup/save) validate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tune_train.config import ConfigError, TrainConfig
from tune_train.trainer import Trainer

DEVICE = torch.device("cuda")  # a value only: the spies below never touch CUDA


class Component:
    """A VAE / text encoder stand-in that records where it is asked to go."""

    dtype = torch.float32

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name, self.log, self.device = name, log, "cpu"

    def to(self, device, *args, **kwargs):
        self.device = str(torch.device(device))
        self.log.append((self.name, self.device))
        return self


class Pixels:
    def to(self, *args, **kwargs):
        return self


class Data:
    """Calls the encoders as TrainingData does, and checks who is on the device meanwhile."""

    def __init__(self, model, *, images: int, captions: int) -> None:
        self.model, self.images, self.captions, self.seen = model, images, captions, []

    def _on_device(self) -> set[str]:
        return {c.name for c in [self.model.vae, *self.model.text_encoders] if c.device != "cpu"}

    def cache_latents(self, encode_images, *, batch_size):
        for _ in range(self.images):
            encode_images(Pixels())
            self.seen.append(("latents", self._on_device()))
        self.encode_images = encode_images  # kept for vae_cache_ondemand, as TrainingData does
        return self.images

    def cache_text(self, encode_prompts, *, batch_size=8):
        for _ in range(self.captions):
            encode_prompts(["a prompt"])
            self.seen.append(("text", self._on_device()))
        return self.captions


def _trainer(images: int, captions: int) -> tuple[Trainer, list, Data]:
    log: list[tuple[str, str]] = []
    model = SimpleNamespace(vae=Component("vae", log),
                            text_encoders=[Component("te1", log), Component("te2", log)])
    trainer = Trainer.__new__(Trainer)
    trainer.config = SimpleNamespace(vae_batch_size=2)
    trainer.accelerator = SimpleNamespace(device=DEVICE, process_index=0, num_processes=1, wait_for_everyone=lambda: None)
    trainer.model = model
    trainer.family = SimpleNamespace(encode_images=lambda m, p: "latents", encode_prompts=lambda m, p: ["embeds"])
    trainer.data = Data(model, images=images, captions=captions)
    return trainer, log, trainer.data


def test_vae_and_text_encoders_are_never_on_the_device_together():
    trainer, log, data = _trainer(images=3, captions=2)
    trainer._cache_embeddings()
    assert log == [("vae", "cuda"), ("vae", "cpu"), ("te1", "cuda"), ("te2", "cuda"), ("te1", "cpu"), ("te2", "cpu")]
    assert data.seen == [("latents", {"vae"})] * 3 + [("text", {"te1", "te2"})] * 2
    assert (trainer.latents_encoded, trainer.prompts_encoded) == (3, 2)


def test_full_caches_move_nothing_and_on_demand_encoding_keeps_the_vae_put():
    trainer, log, data = _trainer(images=0, captions=0)
    trainer._cache_embeddings()
    assert log == []
    data.encode_images(Pixels())  # vae_cache_ondemand during training
    assert log == []


def test_an_encoder_error_still_sends_it_back_to_the_cpu():
    trainer, log, _ = _trainer(images=1, captions=1)

    def fail(model, prompts):
        raise RuntimeError("tokenizer broke")

    trainer.family.encode_prompts = fail
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        trainer._cache_embeddings()
    assert log[-2:] == [("te1", "cpu"), ("te2", "cpu")]


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(model_family="z-image", output_dir="out", max_train_steps=1, **kwargs)


def test_memory_keys_validate_with_the_users_key():
    assert _config(quantize_via="accelerator").quantize_via == "accelerator"
    assert _config(quantize_via="pipeline", base_model_precision="int8-torchao").quantize_via == "pipeline"
    with pytest.raises(ConfigError, match="quantize_via 'pipeline' needs base_model_precision"):
        _config(quantize_via="pipeline")
    with pytest.raises(ConfigError, match="int8-torchao' and quantization_config both quantise"):
        _config(quantize_via="pipeline", base_model_precision="int8-torchao",
                quantization_config={"transformer": {"load_in_4bit": True}})
    assert _config(gradient_checkpointing=True, gradient_checkpointing_interval=0).gradient_checkpointing_interval is None
    with pytest.raises(ConfigError, match="gradient_checkpointing_interval must be >= 1, got -2"):
        _config(gradient_checkpointing=True, gradient_checkpointing_interval=-2)
    with pytest.raises(ConfigError, match="gradient_checkpointing_interval needs gradient_checkpointing"):
        _config(gradient_checkpointing_interval=2)
    config = _config(offload_during_startup=True, offload_during_save=True)
    assert config.offload_during_startup and config.offload_during_save
