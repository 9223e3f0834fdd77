"""The tiny run on a CUDA device: bf16 autocast, gradient checkpointing, validation on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_tiny_lora_trains_on_cuda(tmp_path, tiny_zimage, shapes_dir, write_run, precision):
    from tune import Trainer

    config = write_run(
        tmp_path,
        model=tiny_zimage,
        data=shapes_dir,
        steps=6,
        extra={
            "--mixed_precision": precision,
            "--gradient_checkpointing": True,
            "--checkpoint_step_interval": 3,
            "--validation_disable": False,
            "--validation_prompt": "a red circle",
            "--validation_resolution": "32",
            "--validation_num_inference_steps": 2,
        },
    )
    trainer = Trainer.from_config(config, progress=False)
    result = trainer.train()
    loop = trainer._run
    assert loop.accelerator.device.type == "cuda"
    assert next(p for p in loop.trainable).is_cuda
    assert result.global_step == 6 and all(math.isfinite(x) for x in result.losses)
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "output" / "validation" / "step-000006").glob("*.png"))


def test_tiny_lora_trains_with_block_swap_and_activation_offload(tmp_path, tiny_zimage, shapes_dir, write_run):
    """The trainer's offload wiring: swapped blocks stay off the GPU between uses, and the loss
    curve equals the plain run's (block swap moves weights, it must not change the maths)."""
    from tune import Trainer
    from tune_offload.strategies import is_offloaded

    def run(root, **extra):
        config = write_run(
            root, model=tiny_zimage, data=shapes_dir, steps=4,
            extra={"--mixed_precision": "bf16", "--gradient_checkpointing": True, **extra},
        )
        trainer = Trainer.from_config(config, progress=False)
        return trainer, trainer.train()

    _, plain = run(tmp_path / "plain")
    trainer, swapped = run(
        tmp_path / "swap", **{"--musubi_blocks_to_swap": 1, "--offload_checkpointed_activations": True}
    )
    transformer = trainer._run.model.transformer
    assert is_offloaded(transformer)
    assert swapped.losses == pytest.approx(plain.losses, rel=1e-3)
