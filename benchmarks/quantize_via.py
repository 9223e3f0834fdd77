"""``quantize_via``: int8 quantisation of a Flux.1-width transformer on the CPU vs block by block
on the GPU (``tune_quant.quantise_blockwise``), with time and peak GPU memory.

The model is ``FluxTransformer2DModel`` at Flux.1-dev width (3072, 24 heads) with fewer blocks
(``--double``/``--single``) so the CPU row finishes in minutes; random bf16 weights. Rows:

- ``cpu``: ``tune_quant.quantise(model, "int8-torchao")`` on the CPU (today's default,
  ``quantize_via: cpu``), then the quantised model is moved to the GPU (time included).
- ``accelerator``: ``quantise_blockwise(model, "int8-torchao", device="cuda", offload_last=N)``
  from a CPU bf16 model: the last N blocks end on the CPU, the rest on the GPU.

Peak GPU memory is ``torch.cuda.max_memory_allocated``; the bound the design promises is the
resident quantised part plus one bf16 block.

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/quantize_via.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GIB = 1024**3


def build(double: int, single: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    return model.to(torch.bfloat16).requires_grad_(False)


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--offload-last", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    from tune_quant import quantise, quantise_blockwise

    rows = []
    for row in ("accelerator", "cpu"):
        model = build(args.double, args.single)
        params = sum(p.numel() for p in model.parameters())
        largest_block = max(nbytes(b) for b in [*model.transformer_blocks, *model.single_transformer_blocks])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if row == "cpu":
            quantise(model, "int8-torchao", device="cpu")
            model.to("cuda")
        else:
            quantise_blockwise(model, "int8-torchao", device="cuda", offload_last=args.offload_last)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        on_gpu = torch.cuda.memory_allocated()
        rows.append(dict(
            row=row, params_b=round(params / 1e9, 3), seconds=round(seconds, 2),
            peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 3), resident_gib=round(on_gpu / GIB, 3),
            largest_bf16_block_gib=round(largest_block / GIB, 3),
            offload_last=args.offload_last if row == "accelerator" else 0,
        ))
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cpu_threads=torch.get_num_threads(),
                  double=args.double, single=args.single, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
