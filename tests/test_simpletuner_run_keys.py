"""SimpleTuner keys that change how a run is set up or stepped: ``lr_scale`` / ``lr_scale_sqrt``,
``input_perturbation_steps``, ``disable_tf32``, ``torch_num_threads``, ``vae_enable_tiling`` /
``vae_enable_slicing`` and ``set_grads_to_none``; each checked on the tiny Z-Image run or, for
the arithmetic, on its helper."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from tune import Trainer
from tune.config import load_config
from tune_train import flow, optim, setup_model
from tune_train.config import ConfigError, TrainConfig
from tune_train.trainer import Trainer as Loop

KEYS = {
    "lr_scale": True,
    "lr_scale_sqrt": True,
    "input_perturbation": 0.1,
    "input_perturbation_steps": 10,
    "disable_tf32": True,
    "torch_num_threads": 2,
    "vae_enable_tiling": True,
    "vae_enable_slicing": True,
    "set_grads_to_none": False,
}


def _setup(config) -> Loop:
    facade = Trainer.from_config(config, progress=False)
    loop = Loop(facade.loaded.train, facade.loaded.datasets, progress=False)
    loop.setup()
    return loop


class _TorchSettings:
    """Saves and restores the process-wide settings disable_tf32 and torch_num_threads change
    (through the legacy TF32 flags, which keeps both of torch's TF32 APIs readable)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        self.legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                       torch.get_float32_matmul_precision())
        self.new = (torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision = self.new
        torch.backends.cudnn.allow_tf32 = self.legacy[1]
        torch.set_float32_matmul_precision(self.legacy[2])
        torch.backends.cuda.matmul.allow_tf32 = self.legacy[0]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()) == self.legacy


# ------------------------------------------------------------------------------- config loading


def test_the_keys_load_typed_from_a_simpletuner_config_and_are_no_longer_ignored(tmp_path):
    path = tmp_path / "config.json"
    # SimpleTuner's config.json form: leading dashes, values as strings.
    raw = {f"--{key}": str(value).lower() if isinstance(value, bool) else str(value) for key, value in KEYS.items()}
    path.write_text(json.dumps({"--model_family": "z-image", "--output_dir": str(tmp_path / "out"), **raw}))
    loaded = load_config(path)
    assert not set(KEYS) & set(loaded.ignored)
    for key, value in KEYS.items():
        assert getattr(loaded.train, key) == value, key
    assert not any(key in warning for warning in loaded.warnings for key in KEYS if "ignored" in warning)


def test_defaults_keep_the_old_behaviour():
    config = TrainConfig(model_family="z-image", output_dir="out")
    assert (config.lr_scale, config.lr_scale_sqrt, config.input_perturbation_steps) == (False, False, 0)
    assert (config.disable_tf32, config.torch_num_threads) == (False, None)
    assert (config.vae_enable_tiling, config.vae_enable_slicing, config.set_grads_to_none) == (False, False, True)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("torch_num_threads", 0, "torch_num_threads must be >= 1, got 0"),
        ("input_perturbation_steps", -1, "input_perturbation_steps must be >= 0, got -1"),
    ],
)
def test_invalid_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model_family="z-image", output_dir="out", **{key: value})


# ---------------------------------------------------------------------------------- helpers


def test_lr_scale_factor_is_processes_times_accumulation_times_batch():
    config = TrainConfig(model_family="z-image", output_dir="out", train_batch_size=2, gradient_accumulation_steps=3)
    assert optim.lr_scale_factor(config, 1) == 1.0  # lr_scale off
    scaled = TrainConfig(model_family="z-image", output_dir="out", train_batch_size=2, gradient_accumulation_steps=3, lr_scale=True)
    assert optim.lr_scale_factor(scaled, 1) == 6.0
    assert optim.lr_scale_factor(scaled, 4) == 24.0
    root = TrainConfig(model_family="z-image", output_dir="out", train_batch_size=2, gradient_accumulation_steps=3,
                       lr_scale=True, lr_scale_sqrt=True)
    assert optim.lr_scale_factor(root, 1) == pytest.approx(math.sqrt(6))
    sqrt_alone = TrainConfig(model_family="z-image", output_dir="out", train_batch_size=2, lr_scale_sqrt=True)
    assert optim.lr_scale_factor(sqrt_alone, 1) == 1.0  # lr_scale_sqrt means nothing without lr_scale


def test_input_perturbation_decays_linearly_to_zero_at_input_perturbation_steps():
    strength = flow.input_perturbation_strength
    assert [strength(0.1, 10, step) for step in (0, 5, 9)] == pytest.approx([0.1, 0.05, 0.01])
    assert [strength(0.1, 10, step) for step in (10, 11, 500)] == [0.0, 0.0, 0.0]
    assert [strength(0.1, 0, step) for step in (0, 10, 10_000)] == [0.1, 0.1, 0.1]  # 0: the whole run


def test_disable_tf32_forces_ieee_fp32_in_torch_flags():
    with _TorchSettings():
        # As SimpleTuner-era code turns TF32 on: the legacy flags.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        setup_model.apply_torch_settings(TrainConfig(model_family="z-image", output_dir="out"))
        assert torch.backends.cuda.matmul.allow_tf32  # without disable_tf32 tune leaves them alone
        setup_model.apply_torch_settings(TrainConfig(model_family="z-image", output_dir="out", disable_tf32=True))
        # Both APIs read IEEE fp32 (the legacy getters would raise on a mixed state).
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
        # ... also when TF32 was turned on through the new API instead.
        torch.backends.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        setup_model.use_ieee_fp32()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_a_vae_without_tiling_gets_a_warning_naming_its_class(caplog):
    class PlainVAE(torch.nn.Module):
        pass

    config = TrainConfig(model_family="z-image", output_dir="out", vae_enable_tiling=True, vae_enable_slicing=True)
    with caplog.at_level(logging.WARNING, logger="tune_train.setup_model"):
        called = setup_model.configure_vae(SimpleNamespace(vae=PlainVAE()), SimpleNamespace(name="toy"), config)
    assert called == []
    assert "vae_enable_tiling: the PlainVAE VAE of model family toy has no enable_tiling()" in caplog.text
    assert "vae_enable_slicing: the PlainVAE VAE of model family toy has no enable_slicing()" in caplog.text


# --------------------------------------------------------------------------- on the tiny run


@pytest.mark.slow
@pytest.mark.parametrize(("sqrt", "factor"), [(False, 6.0), (True, math.sqrt(6))])
def test_lr_scale_sets_the_optimizer_lr_to_base_times_the_effective_batch(
    tmp_path, tiny_zimage, shapes_dir, write_run, caplog, sqrt, factor
):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={
        "--train_batch_size": 2, "--gradient_accumulation_steps": 3, "--learning_rate": 1e-4,
        "--lr_scale": True, "--lr_scale_sqrt": sqrt,
    })
    with caplog.at_level(logging.INFO, logger="tune_train.trainer"):
        loop = _setup(config)
    assert loop.config.learning_rate == 1e-4  # the user's value stays in the config
    assert [group["lr"] for group in loop.optimizer.param_groups] == pytest.approx([1e-4 * factor])
    assert loop.lr_scheduler.get_last_lr() == pytest.approx([1e-4 * factor])
    assert f"learning rate {1e-4 * factor:g} (learning_rate 0.0001 x {factor:g}, lr_scale)" in caplog.text


@pytest.mark.slow
def test_vae_tiling_slicing_threads_and_tf32_are_applied_at_setup_and_caching_works(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    config = write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra={
        "--vae_enable_tiling": True, "--vae_enable_slicing": True, "--torch_num_threads": 1, "--disable_tf32": True,
    })
    with _TorchSettings():
        torch.set_num_threads(2)
        loop = _setup(config)
        assert torch.get_num_threads() == 1
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert not torch.backends.cudnn.allow_tf32
        vae = loop.model.vae
        assert type(vae).__name__ == "AutoencoderKL"
        assert vae.use_tiling and vae.use_slicing
        assert loop.latents_encoded > 0  # every image went through the tiled, sliced VAE
        losses = loop.train().losses
    assert len(losses) == 1 and math.isfinite(losses[0])


@pytest.mark.slow
def test_input_perturbation_steps_trains_and_changes_only_the_steps_it_covers(
    tmp_path, tiny_zimage, shapes_dir, write_run
):
    def losses(name, extra):
        run = write_run(tmp_path / name, model=tiny_zimage, data=shapes_dir, steps=2, extra=extra)
        return Trainer.from_config(run, progress=False).train().losses

    plain = losses("plain", {})
    whole = losses("whole", {"--input_perturbation": 0.5})
    first = losses("first", {"--input_perturbation": 0.5, "--input_perturbation_steps": 2})
    assert all(math.isfinite(loss) for loss in plain + whole + first)
    # Step 1 (strength 0.5 in both) is the same draw; step 2 is perturbed at 0.25 instead of 0.5.
    assert first[0] == pytest.approx(whole[0], rel=1e-6)
    assert first[0] != pytest.approx(plain[0], rel=1e-4)
    assert first[1] != pytest.approx(whole[1], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("to_none", [True, False])
def test_set_grads_to_none_false_keeps_zeroed_gradients_after_a_step(
    tmp_path, tiny_zimage, shapes_dir, write_run, to_none
):
    extra = {} if to_none else {"--set_grads_to_none": False}
    loop = _setup(write_run(tmp_path, model=tiny_zimage, data=shapes_dir, steps=1, extra=extra))
    loop.sampler_iter = iter(loop.sampler)
    loop.train_step()
    grads = [p.grad for _, p in loop._trainable_named()]
    if to_none:
        assert all(g is None for g in grads)
    else:
        assert grads and all(g is not None and not g.any() for g in grads)
