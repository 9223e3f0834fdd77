"""FLUX.2-dev-sized LoRA training step on one GPU: int8 weights + block swap, peak memory and s/step.

The transformer is ``Flux2Transformer2DModel`` with its published defaults (the FLUX.2 [dev]
architecture: 8 double-stream + 48 single-stream blocks, width 6144, 48 heads, text features 15360
wide; about 32 B parameters) and random weights. A 32 B model does not fit a 24 GiB card even in
int8 (~30 GiB), so each block is materialised on the GPU, filled with random weights, quantised by
``tune_quant`` and, when it is one of the last N blocks, handed to ``tune_offload``'s block swap
(pinned CPU memory) before the next block is built: the bf16 model never exists whole.

Each row trains LoRA rank 16 (bf16 weights) on every linear layer inside the blocks at 1024 px
(the Flux.2 VAE's 16x, 128-channel packed latents: 4096 image tokens), 512 text tokens, batch 1,
gradient checkpointing, bf16 autocast, fused AdamW, clipping. Peak memory is
``torch.cuda.max_memory_allocated`` over the training steps (with weights, LoRA and optimizer
states in place); the setup's own peak is reported separately.

Rows: ``int8-torchao+swapN`` swaps the last N of the 56 blocks; ``:act-offload`` keeps the
checkpointed block inputs in pinned CPU memory (``tune_offload.activations``).

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/flux2_lora_step.py \\
      --rows int8-torchao+swap40:act-offload --json flux2_lora_step.json
"""

from __future__ import annotations

import sys
import time

import torch
from _harness import (GIB, build_lora_model, flow_matching_step, print_summary, run_meta, run_rows,
                      step_arguments, timed_steps, write_results)

DEVICE = "cuda"
CONFIG: dict = {}  # Flux2Transformer2DModel's defaults are FLUX.2 [dev]'s published config
TINY_CONFIG = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 4, 4, 4))


def build(preset: str, blocks_to_swap: int, act_offload: bool):
    """The quantised, partly swapped transformer, built block by block (see the module doc);
    LoRA weights in bf16."""
    from diffusers import Flux2Transformer2DModel

    return build_lora_model(lambda: Flux2Transformer2DModel(**CONFIG),
                            block_lists=("transformer_blocks", "single_transformer_blocks"), preset=preset,
                            swap=blocks_to_swap, act_offload=act_offload, lora_dtype=torch.bfloat16, device=DEVICE)


def parse_row(row: str) -> tuple[str, int, bool]:
    row, *options = row.split(":")
    unknown = set(options) - {"act-offload"}
    if unknown:
        raise ValueError(f"unknown row options {sorted(unknown)} (known: act-offload)")
    preset, _, swap = row.partition("+swap")
    return preset, int(swap) if swap else 0, "act-offload" in options


def run_row(row: str, args) -> dict:
    preset, blocks_to_swap, act_offload = parse_row(row)
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, params, swapper = build(preset, blocks_to_swap, act_offload)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
    setup_s = time.perf_counter() - t0
    setup_peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
    in_channels = model.config.in_channels
    side = args.resolution // 16
    g = torch.Generator(DEVICE).manual_seed(1)
    x0 = torch.randn(1, side * side, in_channels, device=DEVICE, generator=g, dtype=torch.bfloat16)
    noise = torch.randn(x0.shape, device=DEVICE, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, args.text_len, model.config.joint_attention_dim, device=DEVICE, generator=g,
                       dtype=torch.bfloat16)
    hw = torch.cartesian_prod(torch.arange(side), torch.arange(side))
    img_ids = torch.cat([torch.zeros(side * side, 1), hw, torch.zeros(side * side, 1)], 1).to(DEVICE)
    txt_ids = torch.zeros(args.text_len, 4, device=DEVICE)
    txt_ids[:, 3] = torch.arange(args.text_len, device=DEVICE)
    guidance = torch.full((1,), 4.0, device=DEVICE)

    def forward(noisy, sigma):
        return model(noisy, text, sigma, img_ids, txt_ids, guidance, return_dict=False)[0]

    step = flow_matching_step(forward, x0, noise, params, optimizer, g, DEVICE)
    result = dict(row=row, setup_s=round(setup_s, 1), setup_peak_gib=round(setup_peak, 2),
                  **timed_steps(step, warmup=args.warmup, steps=args.steps, device=DEVICE),
                  params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
                  trainable_params=sum(p.numel() for p in params),
                  swapped_blocks=len(swapper.swapped) if swapper is not None else 0)
    del model, params, optimizer, swapper
    return result


def main() -> int:
    args = step_arguments(__doc__.split("\n")[0], rows="int8-torchao+swap40:act-offload", text_len=512)
    global DEVICE
    if args.tiny:
        DEVICE = "cpu"
        CONFIG.update(TINY_CONFIG)
    results = run_rows(args.rows.split(","), lambda row: run_row(row, args), device=DEVICE)
    print_summary(results)
    write_results(args.json, run_meta(DEVICE, resolution=args.resolution, text_len=args.text_len, warmup=args.warmup,
                                      steps=args.steps, lora_rank=16, batch=1), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
