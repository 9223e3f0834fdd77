"""Several processes train one LoRA (DDP), launched the way a user launches them (``torchrun``).

On the CPU the processes talk over gloo, so CI checks what the GPU run relies on: each process
encodes its share of the caches, the ranks' LoRA weights stay identical step after step (their
gradients are averaged), only rank 0 writes the logs, checkpoints and the exported LoRA, and the
run ends on every rank (a rank left waiting at a barrier hangs the whole job). The same test runs
over NCCL on a machine with two GPUs (``-m gpu``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Run by every process: train, then leave what the test compares (each rank's trained weights
# and how many cache entries it encoded) where the test can read them.
RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from tune import Trainer

    config, out = sys.argv[1], Path(sys.argv[2])
    trainer = Trainer.from_config(config, progress=False)
    result = trainer.train()
    run = trainer._run
    rank = run.accelerator.process_index
    save_file({n: p.detach().cpu().contiguous() for n, p in run._trainable_named()}, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": run.accelerator.num_processes,
        "steps": result.global_step,
        "latents_encoded": run.latents_encoded,
        "prompts_encoded": run.prompts_encoded,
        "device": str(run.accelerator.device),
    }))
    """
)


def _launch(config: Path, out: Path, processes: int, *, gpu: bool) -> subprocess.CompletedProcess:
    script = out / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), str(config), str(out)]
    return subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=900)


def _check_run(result: subprocess.CompletedProcess, out: Path, output_dir: Path, steps: int, images: int) -> None:
    import json

    import torch
    from safetensors.torch import load_file

    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [steps, steps]
    # Each process encoded its own share of the latent cache: together every image once.
    assert sum(r["latents_encoded"] for r in ranks) == images
    assert all(0 < r["latents_encoded"] < images for r in ranks)
    # Averaged gradients keep the ranks' adapters identical, and they did train.
    first, second = (load_file(out / f"rank{r}.safetensors") for r in (0, 1))
    assert first.keys() == second.keys() and first
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)
    assert any(first[name].abs().max() > 0 for name in first if "lora_B" in name)
    # One writer: one loss row per step, the checkpoints, and the exported LoRA.
    with (output_dir / "loss_log.csv").open() as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == list(range(1, steps + 1))
    assert (output_dir / f"checkpoint-{steps}").is_dir()
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()


def test_two_processes_train_one_lora_on_the_cpu(tmp_path, tiny_zimage, shapes_dir, write_run):
    # Checkpoints at steps 2 and 4: the last one is written inside the loop, and every rank must
    # then see it at the end instead of one rank waiting to save it again.
    config = write_run(tmp_path / "run", model=tiny_zimage, data=shapes_dir, steps=4,
                       extra={"--checkpointing_steps": 2, "--train_batch_size": 1})
    result = _launch(config, tmp_path, 2, gpu=False)
    _check_run(result, tmp_path, tmp_path / "run" / "output", steps=4, images=8)


@pytest.mark.gpu
def test_two_gpus_train_one_lora(tmp_path, tiny_zimage, shapes_dir, write_run):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    config = write_run(tmp_path / "run", model=tiny_zimage, data=shapes_dir, steps=4,
                       extra={"--checkpointing_steps": 2, "--train_batch_size": 1, "--mixed_precision": "bf16"})
    result = _launch(config, tmp_path, 2, gpu=True)
    _check_run(result, tmp_path, tmp_path / "run" / "output", steps=4, images=8)
    assert "cuda:1" in (tmp_path / "rank1.json").read_text()
