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


def parse_step_row(row: str, options: Sequence[str]) -> dict[str, Any]:
    """``<preset>[+swapN][:option...]`` -> ``preset``, ``swap`` (blocks), ``tread`` (the routed
    share of a ``tread[R]`` option, default R 0.5; 0 without it) and one boolean per known
    ``options`` entry (``act-offload`` -> ``act_offload``). An unknown option is an error naming the
    known ones."""
    head, *given = row.split(":")
    preset, _, swap = head.partition("+swap")
    tread = 0.0
    for option in given:
        if option.startswith("tread"):
            tread = float(option[len("tread"):] or 0.5)
    unknown = {o for o in given if not o.startswith("tread")} - set(options)
    if unknown:
        raise ValueError(f"unknown row options {sorted(unknown)} (known: {', '.join(options)}, tread[R])")
    return dict(preset=preset, swap=int(swap) if swap else 0, tread=tread,
                **{o.replace("-", "_"): o in given for o in options})


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


def build_lora_model(
    make: Callable[[], torch.nn.Module],
    *,
    block_lists: Sequence[str],
    preset: str,
    swap: int,
    act_offload: bool,
    lora_dtype: torch.dtype,
    device: str,
    rope: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> tuple[torch.nn.Module, list[torch.nn.Parameter], Any]:
    """``make()`` built on the meta device, then filled block by block on ``device``: everything
    outside the ``block_lists`` (embedders, modulation, output; small) in bf16, each block in
    bf16, quantised with the tune-quant ``preset`` unless it is ``bf16``, and the last ``swap``
    blocks moved to the CPU for tune-offload's block swap, so neither the bf16 nor the quantised
    model is ever whole on the GPU. ``rope(model)`` rebuilds a RoPE module whose tables are buffers
    computed at construction (meta-built they would be empty). Then a rank-16 LoRA (weights in
    ``lora_dtype``) on every linear inside the blocks, gradient checkpointing (block inputs in
    pinned CPU memory with ``act_offload``) and the block swap. Returns (model, trainable
    parameters, the block swapper or None)."""
    from peft import LoraConfig

    with torch.device("meta"):
        model = make()
    model.requires_grad_(False)
    generator = torch.Generator(device).manual_seed(0)
    for child in model.children():
        if not isinstance(child, torch.nn.ModuleList):
            child.to_empty(device=device)
            child.to(torch.bfloat16)
            fill_random(child, generator)
    if rope is not None:
        model.pos_embed = rope(model).to(device)
    blocks = [block for name in block_lists for block in getattr(model, name)]
    first_swapped = len(blocks) - swap
    for index, block in enumerate(blocks):
        block.to_empty(device=device)
        block.to(torch.bfloat16)
        fill_random(block, generator)
        if preset != "bf16":
            from tune_quant import quantise

            quantise(block, preset, device=device)
        if index >= first_swapped and device == "cuda":
            block.to("cpu")  # the block swap pins it; it never waits on the GPU
    targets = sorted({f"{name}.{i}.{sub}" for name in block_lists for i, block in enumerate(getattr(model, name))
                      for sub, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights=True, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(lora_dtype)
    if act_offload:  # checkpointing before the swap, which warns without it
        from tune_offload.activations import offloaded_checkpoint

        model.enable_gradient_checkpointing(offloaded_checkpoint)
    else:
        model.enable_gradient_checkpointing()
    swapper = None
    if swap:
        from tune_offload import OffloadSettings, apply_offload
        from tune_offload.block_swap import block_swapper

        apply_offload(model, OffloadSettings(musubi_blocks_to_swap=swap), onload_device=device)
        swapper = block_swapper(model)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], swapper


def flow_matching_step(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: str,
) -> Callable[[], float]:
    """One LoRA training step of a flow-matching model, as the trainer takes it: a random sigma,
    ``x_t = (1 - sigma) x0 + sigma noise``, ``forward(x_t, sigma)`` under bf16 autocast against the
    velocity ``noise - x0``, backward, clipping at 1, the optimizer step. Returns the loss."""

    def step() -> float:
        sigma = torch.rand(1, device=device, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = forward(noisy, sigma)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def print_summary(results: list[dict[str, Any]], *, extra: str | None = None) -> None:
    """A table of the rows: peak GiB, s/step, setup peak (and the result key ``extra``)."""
    head = f"{extra:>12}" if extra else ""
    print(f"\n{'row':<44}{head} {'peak GiB':>9} {'s/step':>8} {'setup peak':>11}")
    for r in results:
        if "s_per_step" in r:
            cell = f"{r.get(extra, ''):>12}" if extra else ""
            print(f"{r['row']:<44}{cell} {r['peak_gib']:>9.2f} {r['s_per_step']:>8.3f} {r['setup_peak_gib']:>11.2f}")
        else:
            print(f"{r['row']:<44} {r['error']}")
