"""The GPU benchmark scripts still run: each LoRA-step script's ``--tiny`` mode (a toy model on the
CPU) goes through every code path its documented rows use, so a refactor that breaks one is
caught here and not on the next (scarce) GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "flux_lora_step.py": "bf16:ref:no-cudnn,bf16:tread,int8-torchao+swap2:act-offload",
    "flux2_lora_step.py": "bf16,int8-torchao+swap2:act-offload",
    "qwen_image_lora_step.py": "bf16:ref,bf16:edit,bf16:edit:tread,int8-torchao+swap2:edit:act-offload:lora-bf16",
    "zimage_lora_step.py": "reference,bf16:tread,int8-torchao+swap2:act-offload,gguf-q8_0",
}


@pytest.mark.parametrize("script", sorted(ROWS))
def test_tiny_run_of_each_row(script, tmp_path):
    out = tmp_path / "results.json"
    if "gguf" in ROWS[script]:
        pytest.importorskip("gguf")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # the GGUF file goes there
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--rows", ROWS[script],
         "--warmup", "1", "--steps", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["row"] for r in results] == ROWS[script].split(",")
    for r in results:
        assert "error" not in r, r
        assert r["losses_finite"] and r["trainable_params"] > 0
