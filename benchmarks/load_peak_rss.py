"""Host memory (peak RSS) of loading a transformer with and without quantising while it loads.

``quantize_via: cpu`` (the default) loads the whole transformer in its storage dtype, then
quantises it in place, so the full-precision model sits in RAM at the peak. ``quantize_via:
pipeline`` hands diffusers the preset's quantization config, which quantises as the weights are
read. This script measures the difference on the CPU, with no GPU needed: it saves a Z-Image
transformer (the published architecture at a reduced width and depth, random bf16 weights) in the
diffusers layout, then loads it once per mode in a fresh process through tune's own loader
(``tune_models.families._shared.load_transformer``, the path the trainer takes) and reports:

- ``peak_mib``: the process's peak RSS minus its RSS after the imports (what loading added);
- ``end_mib``: RSS after loading (and quantising) minus the same baseline, and ``end_anon_mib``
  the part of it that is the process's own memory (the rest is pages of the memory-mapped
  safetensors shards, page cache the kernel can drop when memory runs short).

Run from the repo root (about 2 minutes on a 2-core machine; ``--dim``/``--layers`` scale it):
  uv run python benchmarks/load_peak_rss.py --json benchmarks/results/load_peak_rss_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("bf16", "int8-torchao:cpu", "int8-torchao:pipeline")
MIB = 1024**2


def _rss_mib(kind: str = "VmRSS") -> float:
    """Resident memory: ``VmRSS`` (all), ``RssAnon`` (the process's own memory) or ``RssFile``
    (pages of mapped files, e.g. a memory-mapped safetensors shard: page cache the kernel may drop)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(path: Path, dim: int, layers: int) -> int:
    """Save a random bf16 Z-Image transformer of width ``dim`` and ``layers`` main layers."""
    import torch
    from diffusers import ZImageTransformer2DModel

    heads = dim // 128
    with torch.device("meta"):
        model = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=layers,
            n_refiner_layers=2, n_heads=heads, n_kv_heads=heads, norm_eps=1e-5, qk_norm=True,
            cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
            axes_lens=[1536, 512, 512],
        )
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(path / "transformer", max_shard_size="1GB")
    return sum(p.numel() for p in model.parameters())


def load(root: str, mode: str) -> dict:
    """In this (fresh) process: load ``root``'s transformer as ``mode`` says; memory figures."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from tune_models.families._shared import load_transformer
    from tune_models.family import ModelSource

    baseline, anon_baseline = _rss_mib(), _rss_mib("RssAnon")
    preset, _, via = mode.partition(":")
    quantization = None
    if via == "pipeline":
        from tune_quant.pipeline import preset_config

        quantization = preset_config(preset, device="cpu", dtype=torch.bfloat16)
    source = ModelSource(pretrained_model_name_or_path=root, transformer_quantization=quantization)
    model = load_transformer(ZImageTransformer2DModel, source, root, dtype=torch.bfloat16, label="z-image")
    if via == "cpu":
        from tune_quant import quantise

        quantise(model, preset, device="cpu")  # block by block, trimming after each
    from tune_quant.host_memory import release_free_memory

    release_free_memory()  # as the trainer does after loading
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(mode=mode, peak_mib=round(peak - baseline), end_mib=round(_rss_mib() - baseline),
                end_anon_mib=round(_rss_mib("RssAnon") - anon_baseline), baseline_mib=round(baseline))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load(*args.child)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        params = build(Path(folder), args.dim, args.layers)
        results = []
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", folder, mode],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode:
                results.append(dict(mode=mode, error=out.stderr.strip().splitlines()[-1][:300]))
            else:
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"\ntransformer: {params / 1e9:.2f} B parameters, {params * 2 / MIB:.0f} MiB in bf16")
    print(f"{'mode':<24} {'peak MiB':>9} {'after MiB':>10} {'own MiB':>8}")
    for r in results:
        print(f"{r['mode']:<24} {r['peak_mib']:>9} {r['end_mib']:>10} {r['end_anon_mib']:>8}" if "error" not in r
              else f"{r['mode']:<24} {r['error']}")
    if args.json:
        meta = dict(machine=f"{platform.machine()} CPU, {os.cpu_count()} cores", python=platform.python_version(),
                    dim=args.dim, layers=args.layers, parameters=params)
        for name in ("torch", "diffusers", "torchao"):
            meta[name] = __import__(name).__version__
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
