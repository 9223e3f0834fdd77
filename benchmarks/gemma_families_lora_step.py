"""Sana and Lumina 2 LoRA training steps: seconds per step and peak GPU memory at 1024 px.

Full-size transformers from their published architectures with random bf16 weights built on the
GPU (speed does not depend on the weights):

- ``sana1.5-1.6b``: ``SanaTransformer2DModel`` defaults (20 blocks, 70 heads x 32, cross-attention
  20 x 112, caption width 2304, patch 1) with SANA 1.5's ``qk_norm="rms_norm_across_heads"``;
  1024 px is 32 x 32 DC-AE latents of 32 channels (1024 tokens), 300 caption tokens.
- ``sana1.5-4.8b``: the same with 60 blocks (SANA 1.5 4.8B's depth).
- ``lumina2``: ``Lumina2Transformer2DModel`` defaults with ``cap_feat_dim=2304`` (Lumina-Image-2.0:
  width 2304, 26 blocks + 2 + 2 refiners, 24 heads / 8 kv heads, Gemma-2-2B captions); 1024 px is 128 x 128 Flux-VAE latents (4096 tokens),
  256 caption tokens.

Each row trains the family's ``all`` LoRA preset at rank 16 through tune's own path
(``tune_models.adapters.add_training_lora``: fp32 LoRA weights; ``family.predict``), batch 1,
bf16 autocast, fused AdamW, gradient checkpointing on or off, as ``tune_train`` runs it.

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/gemma_families_lora_step.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def build(name: str):
    import diffusers

    from tune_models.family import LoadedModel, get_family

    if name.startswith("sana"):
        layers = 60 if name.endswith("4.8b") else 20
        transformer = diffusers.SanaTransformer2DModel(num_layers=layers, qk_norm="rms_norm_across_heads")
        family, latents, caption = get_family("sana"), (32, 32, 32), 300
    else:
        transformer = diffusers.Lumina2Transformer2DModel(cap_feat_dim=2304)  # Gemma-2-2B's width
        family, latents, caption = get_family("lumina2"), (16, 128, 128), 256
    transformer = transformer.to(device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    model = LoadedModel(
        family=family, flavour=family.flavour(None), transformer=transformer, vae=None, text_encoder=None,
        tokenizer=None, scheduler=None,
    )
    return family, model, latents, caption


def run(name: str, checkpointing: bool, steps: int, warmup: int) -> dict:
    from tune_models import adapters

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    family, model, shape, caption = build(name)
    params_b = sum(p.numel() for p in model.transformer.parameters()) / 1e9
    lora = adapters.add_training_lora(model, rank=16, alpha=16, dropout=0.0, target="all", param_dtype=torch.float32)
    if checkpointing:
        model.transformer.enable_gradient_checkpointing()
    model.transformer.train()
    optimizer = torch.optim.AdamW(lora, lr=1e-4, fused=True)
    x0 = torch.randn(1, *shape, device="cuda")
    noise = torch.randn_like(x0)
    cond = family.collate_prompts(
        [{"prompt_embeds": torch.randn(caption, 2304), "prompt_attention_mask": torch.ones(caption, dtype=torch.int64)}],
        "cuda", torch.bfloat16,
    )
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sigma = torch.rand(1, device="cuda")
        noisy = (1 - sigma) * x0 + sigma * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = family.predict(model, noisy, sigma, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    row = {
        "model": name,
        "params_b": round(params_b, 3),
        "gradient_checkpointing": checkpointing,
        "s_per_step": round(statistics.mean(times), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    del model, optimizer, lora
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="sana1.5-1.6b,sana1.5-4.8b,lumina2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for checkpointing in (True, False):
            try:
                row = run(name, checkpointing, args.steps, args.warmup)
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                row = {"model": name, "gradient_checkpointing": checkpointing, "error": f"{type(exc).__name__}: {exc}"[:300]}
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
