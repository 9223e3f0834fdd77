"""What is alive on the GPU at the peak of one training step, grouped by where it was allocated.

Runs one row of ``zimage_lora_step.py`` (same model, same step) with torch's CUDA allocator
history recording on, replays the allocation trace to find the moment of the peak, and prints
the live allocations at that moment grouped by the first stack frames outside torch. It is the
tool for the question "why is the peak 2 GiB above the resident weights": it names the tensors.

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':')benchmarks python benchmarks/memory_peak_breakdown.py \\
      --row int8-torchao+swap17:lora-bf16:act-offload --top 25
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

GIB = 1024**3
MIB = 1024**2
_SKIP = ("torch/", "contextlib.py", "torchao/", "peft/tuners/tuners_utils", "<frozen")


def _where(frames: list[dict], depth: int) -> str:
    """The first ``depth`` frames of a stack that are not inside torch itself (file:line name)."""
    out = []
    for frame in frames:
        name = frame.get("filename", "?")
        if any(part in name for part in _SKIP):
            continue
        short = "/".join(name.split("/")[-2:])
        out.append(f"{short}:{frame.get('line', '?')} {frame.get('name', '?')}")
        if len(out) == depth:
            break
    return " <- ".join(out) or "(torch internals)"


def live_at_peak(trace: list[dict], base_bytes: int) -> tuple[int, list[dict]]:
    """Replay alloc/free events; return the peak (plus ``base_bytes`` already alive when
    recording began) and the events of the allocations alive at that moment."""
    live: dict[int, dict] = {}
    current = peak = 0
    peak_live: list[dict] = []
    for event in trace:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_live = current, list(live.values())
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak + base_bytes, peak_live


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", default="int8-torchao+swap17:lora-bf16:act-offload")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--caption-len", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import zimage_lora_step as bench

    torch.backends.cuda.matmul.allow_tf32 = True
    model, params, optimizer, swapper, preset = bench.setup(args.row)
    transformer = model.transformer
    g = torch.Generator("cuda").manual_seed(0)
    size = args.resolution // 8
    x0 = torch.randn(1, 16, size, size, device="cuda", generator=g, dtype=torch.bfloat16)
    noise = torch.randn(x0.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    caption = torch.randn(args.caption_len, bench.CONFIG["cap_feat_dim"], device="cuda", generator=g,
                          dtype=torch.bfloat16)

    def step() -> None:
        sigma = torch.rand(1, device="cuda", generator=g)
        noisy = (1 - sigma) * x0 + sigma * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model.family.predict(model, noisy, sigma, {"prompt_embeds": [caption]})
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # optimizer states exist, caches warm
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    measured_peak = torch.cuda.max_memory_allocated()
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, alive = live_at_peak(trace, base)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for event in alive:
        groups[_where(event.get("frames", []), args.depth)].append(event["size"])
    rows = sorted(((sum(s), len(s), where) for where, s in groups.items()), reverse=True)
    print(f"row {args.row}: resident before the step {base / GIB:.2f} GiB, "
          f"peak {measured_peak / GIB:.2f} GiB (replayed {peak / GIB:.2f}), "
          f"allocated during the step and alive at the peak {(peak - base) / GIB:.2f} GiB")
    print(f"{'MiB':>8} {'n':>4}  where (first frames outside torch)")
    for total, count, where in rows[: args.top]:
        print(f"{total / MIB:>8.1f} {count:>4}  {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(row=args.row, resident_gib=base / GIB, peak_gib=measured_peak / GIB,
                           groups=[dict(mib=t / MIB, count=c, where=w) for t, c, w in rows[:100]]), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
