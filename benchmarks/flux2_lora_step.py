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
from _harness import GIB, fill_random, run_meta, run_rows, step_arguments, timed_steps, write_results

DEVICE = "cuda"
CONFIG: dict = {}  # Flux2Transformer2DModel's defaults are FLUX.2 [dev]'s published config
TINY_CONFIG = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, in_channels=16, axes_dims_rope=(4, 4, 4, 4))


def build(preset: str, blocks_to_swap: int, act_offload: bool):
    """The quantised, partly swapped transformer, built block by block (see the module doc)."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**CONFIG)
    model.requires_grad_(False)
    g = torch.Generator(DEVICE).manual_seed(0)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    # Everything outside the blocks (embedders, modulation, output) is small: bf16 on the GPU.
    for child in model.children():
        if not isinstance(child, torch.nn.ModuleList):
            child.to_empty(device=DEVICE)
            child.to(torch.bfloat16)
            fill_random(child, g)
    model.pos_embed.to_empty(device=DEVICE)  # RoPE has no weights; recreate its buffers
    first_swapped = len(blocks) - blocks_to_swap
    for index, block in enumerate(blocks):
        block.to_empty(device=DEVICE)
        block.to(torch.bfloat16)
        fill_random(block, g)
        if preset != "bf16":
            from tune_quant import quantise

            quantise(block, preset, device=DEVICE)
        if index >= first_swapped and DEVICE == "cuda":
            block.to("cpu")  # the block swap pins it; it never waits on the GPU
    # LoRA on every linear inside the blocks, bf16 weights.
    targets = sorted({f"{list_name}.{i}.{name}"
                      for list_name in ("transformer_blocks", "single_transformer_blocks")
                      for i, block in enumerate(getattr(model, list_name))
                      for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights=True, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    # Checkpointing before the swap, which warns without it.
    if act_offload:
        from tune_offload.activations import offloaded_checkpoint

        model.enable_gradient_checkpointing(offloaded_checkpoint)
    else:
        model.enable_gradient_checkpointing()
    swapper = None
    if blocks_to_swap:
        from tune_offload import OffloadSettings, apply_offload
        from tune_offload.block_swap import block_swapper

        apply_offload(model, OffloadSettings(musubi_blocks_to_swap=blocks_to_swap), onload_device=DEVICE)
        swapper = block_swapper(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, swapper


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

    def step() -> float:
        sigma = torch.rand(1, device=DEVICE, generator=g)
        noisy = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            pred = model(noisy, text, sigma, img_ids, txt_ids, guidance, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

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
    print(f"\n{'row':<36} {'peak GiB':>9} {'s/step':>8} {'setup peak':>11}")
    for r in results:
        if "s_per_step" in r:
            print(f"{r['row']:<36} {r['peak_gib']:>9.2f} {r['s_per_step']:>8.2f} {r['setup_peak_gib']:>11.2f}")
        else:
            print(f"{r['row']:<36} {r['error']}")
    write_results(args.json, run_meta(DEVICE, resolution=args.resolution, text_len=args.text_len, warmup=args.warmup,
                                      steps=args.steps, lora_rank=16, batch=1), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
