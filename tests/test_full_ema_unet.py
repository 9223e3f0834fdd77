"""A full fine-tune of a UNet (tiny SDXL) with ``use_ema``: the UNet and its EMA are written as
diffusers model folders (``unet/`` and ``unet_ema/``, SimpleTuner's layout) that the pipeline
takes, the EMA is the average the config asks for, validation shows it, and a resumed run
continues the same average."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pluggy
import pytest
import torch

from tune import Trainer
from tune_data.plugins import plugin_manager

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DECAY = 0.6


def _config(write_run, root: Path, model: Path, data: Path, steps: int, **extra) -> Path:
    return write_run(root, model=model, data=data, steps=steps, extra={
        "--model_family": "sdxl", "--model_flavour": "base", "--model_type": "full", "--optimizer": "adamw",
        "--learning_rate": 2e-3, "--use_ema": True, "--ema_decay": DECAY, **extra,
    })


def _image(model_dir: Path, unet=None) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, **({"unet": unet} if unet is not None else {}))
    out = pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


class _WeightsAfterEachStep:
    """Records every trained weight after each optimizer step (the EMA's inputs)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    @pluggy.HookimplMarker("tune")
    def tune_step_end(self, trainer, step, logs):  # noqa: ARG002
        self.steps.append({name: p.detach().float().clone() for name, p in trainer._trainable_named()})


class Killed(Exception):
    pass


class _KillAfterStep2:
    @pluggy.HookimplMarker("tune")
    def tune_checkpoint_saved(self, trainer, step, path):  # noqa: ARG002
        if step == 2:
            raise Killed(path)


def _registered(plugin, name: str, run):
    plugin_manager().register(plugin, name=name)
    try:
        return run()
    finally:
        plugin_manager().unregister(name=name)


def test_full_unet_fine_tune_with_ema_exports_both_validates_both_and_resumes_the_same_ema(
    tmp_path, tiny_sdxl, shapes_dir, write_run
):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    validation = {
        "--validation_disable": False, "--validation_prompt": "a blue square", "--validation_resolution": "32",
        "--validation_num_inference_steps": 1, "--ema_validation": "comparison",
    }
    recorder = _WeightsAfterEachStep()
    config = _config(write_run, tmp_path / "a", tiny_sdxl, shapes_dir, 4, **validation)
    result = _registered(recorder, "weights-after-each-step", Trainer.from_config(config, progress=False).train)
    out = tmp_path / "a" / "output"
    assert Path(result.outputs["transformer"]) == out / "unet"
    assert Path(result.outputs["transformer_ema"]) == out / "unet_ema"
    assert (out / "unet_ema" / "config.json").is_file()

    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").state_dict()
    tuned = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    ema = UNet2DConditionModel.from_pretrained(out / "unet_ema").state_dict()
    assert set(ema) == set(tuned) == set(base)
    # The EMA is exactly the configured average of the weights after each step (decay < 1, no
    # warm-up): it starts from the base and trails the trained weights.
    expected = {name: base[name].float() for name in recorder.steps[0]}
    for weights in recorder.steps:
        for name, value in weights.items():
            expected[name] = DECAY * expected[name] + (1 - DECAY) * value
    assert len(recorder.steps) == 4 and len(expected) == len(base)
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tuned[name], recorder.steps[-1][name])
    changed = [n for n in base if not torch.equal(tuned[n], base[n])]
    assert changed and any(not torch.equal(ema[n], tuned[n]) for n in changed)
    assert any(not torch.equal(ema[n], base[n]) for n in changed)

    # Both load into the pipeline and change its image, each its own way.
    plain = _image(tiny_sdxl)
    with_tuned = _image(tiny_sdxl, UNet2DConditionModel.from_pretrained(out / "unet"))
    with_ema = _image(tiny_sdxl, UNet2DConditionModel.from_pretrained(out / "unet_ema"))
    assert np.abs(with_tuned - plain).max() > 1e-3
    assert np.abs(with_ema - plain).max() > 1e-4 and np.abs(with_ema - with_tuned).max() > 1e-4

    # ema_validation comparison: the final validation made an image with each.
    from PIL import Image

    folder = out / "validation" / "step-000004"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["validation-32x32-ema.png", "validation-32x32.png"]
    first, second = (np.asarray(Image.open(folder / n), dtype=int) for n in names)
    assert np.abs(first - second).max() > 0

    # Killed after checkpoint-2 and resumed: the same losses and the same EMA as the straight run.
    broken = _config(write_run, tmp_path / "b", tiny_sdxl, shapes_dir, 4, **{"--checkpoint_step_interval": 2})
    with pytest.raises(Killed):
        _registered(_KillAfterStep2(), "kill-after-2", Trainer.from_config(broken, progress=False).train)
    state = torch.load(tmp_path / "b" / "output" / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["ema"]["num_updates"] == 2
    resumed = Trainer.from_config(broken, progress=False)
    resumed.config.resume_from_checkpoint = "latest"
    again = resumed.train()
    assert again.losses == pytest.approx(result.losses, rel=1e-5, abs=1e-7)
    ema_b = load_file(Path(again.outputs["transformer_ema"]) / "diffusion_pytorch_model.safetensors")
    assert set(ema_b) == set(ema)
    for key, value in ema.items():
        torch.testing.assert_close(ema_b[key], value, rtol=1e-5, atol=1e-7)
