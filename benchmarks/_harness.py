"""What the LoRA-step benchmarks share: random weights that keep activations in range, the timed
loop (warm-up, synchronised steps, resident and peak memory), running rows so that one failing row
does not hide the others, and the run's versions for the results file.

Imported as ``_harness`` by the scripts beside it (``python benchmarks/<script>.py`` puts this
folder on the path)."""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

GIB = 1024**3


def step_arguments(description: str, *, rows: str, text_len: int) -> argparse.Namespace:
    """The command line every LoRA-step script takes: ``--rows`` (comma-separated), the image
    ``--resolution`` and ``--text-len``, ``--warmup`` / ``--steps``, ``--json`` for the results
    file, and ``--tiny`` (a toy model on the CPU: 64 px, 8 text tokens; a smoke test of every code
    path). Without ``--tiny`` and without CUDA it exits with a message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", default=rows)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-len", type=int, default=text_len)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="toy-size model on the CPU (smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.resolution, args.text_len = 64, 8
    elif not torch.cuda.is_available():
        parser.exit(2, "needs a CUDA GPU (or --tiny for a CPU smoke test)\n")
    torch.backends.cuda.matmul.allow_tf32 = True
    return args


def fill_random(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights that keep activations in range: N(0, 1/fan_in) matrices, unit norm scales, zero
    biases (speed does not depend on the values, but NaNs would end a row)."""
    for name, p in module.named_parameters(recurse=True):
        if p.ndim >= 2:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=generator)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()


def timed_steps(step: Callable[[], float], *, warmup: int, steps: int, device: str) -> dict[str, Any]:
    """Run ``step`` (one training step returning its loss) ``warmup`` times, then ``steps`` times
    with ``torch.cuda.synchronize`` around each. The memory resident before the first step and the
    peak over all steps are read on CUDA (0 elsewhere)."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    resident = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
    return dict(
        resident_gib=round(resident, 2),
        peak_gib=round(torch.cuda.max_memory_allocated() / GIB if cuda else 0.0, 2),
        s_per_step=round(statistics.mean(times), 3), step_times=[round(t, 3) for t in times],
        losses=[round(x, 4) for x in losses], losses_finite=all(map(math.isfinite, losses)),
    )


def run_rows(rows: Sequence[str], run_row: Callable[[str], dict[str, Any]], *, device: str) -> list[dict[str, Any]]:
    """``run_row`` for each row, printing each result as a JSON line; a row that raises becomes
    ``{"row": ..., "error": ...}`` (with its traceback printed) and the next row still runs."""
    results = []
    for row in rows:
        try:
            result = run_row(row)
        except Exception as exc:  # one failing row must not hide the others
            traceback.print_exc()
            result = dict(row=row, error=f"{type(exc).__name__}: {exc}"[:400])
        print(json.dumps(result), flush=True)
        results.append(result)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def run_meta(device: str, **settings: Any) -> dict[str, Any]:
    """The machine and library versions a results file records, with the run's ``settings``."""
    meta = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu (--tiny)",
                torch=torch.__version__, python=platform.python_version(), **settings)
    for name in ("diffusers", "peft", "torchao"):
        try:
            meta[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a library the run did not need
            pass
    return meta


def write_results(path: str | None, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(json.dumps(meta))
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
