"""Which families' LoRA steps survive torch's cuDNN attention (SDPA) backend, and what it is worth.

``--family F`` (run in a fresh process each, since a failing cuDNN kernel can leave the CUDA
context unusable): a reduced-depth, published-width transformer of family F with random bf16
weights, gradient checkpointing, one 1024 px image and a long caption, two forward+backward passes
through ``family.predict`` with cuDNN SDPA enabled; prints ``ok`` or the error. Without
``--family``: each family in its own process, then the Z-Image LoRA step of
benchmarks/zimage_lora_step.py (bf16 row) with cuDNN SDPA enabled and disabled.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':')benchmarks python scripts/sdpa_cudnn_check.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

FAMILIES = ("flux", "chroma", "sd3")


def build(name: str):
    import diffusers

    from tune_models.family import LoadedModel, get_family

    family = get_family(name)
    extras: dict = {}
    latents = torch.randn(1, 16, 128, 128)
    if name == "flux":  # Flux.1-dev width, 2 double + 4 single blocks
        transformer = diffusers.FluxTransformer2DModel(num_layers=2, num_single_layers=4, guidance_embeds=True)
        prompts = {"prompt_embeds": torch.randn(1, 512, 4096), "pooled_prompt_embeds": torch.randn(1, 768)}
        extras = {"guidance": {"mode": "constant", "value": 1.0}}
    elif name == "chroma":  # Chroma1 width, 2 double + 4 single blocks, T5 mask with padding
        transformer = diffusers.ChromaTransformer2DModel(num_layers=2, num_single_layers=4)
        mask = torch.zeros(1, 512, dtype=torch.long)
        mask[:, :77] = 1
        prompts = {"prompt_embeds": torch.randn(1, 512, 4096), "attention_mask": mask}
    else:  # SD3.5 Large width, 4 blocks
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
        )
        prompts = {"prompt_embeds": torch.randn(1, 333, 4096), "pooled_prompt_embeds": torch.randn(1, 2048)}
    transformer = transformer.to(device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    model = LoadedModel(family=family, flavour=family.flavour(None), transformer=transformer, vae=None,
                        text_encoder=None, tokenizer=None, scheduler=None, extras=extras)
    prompts = {k: v.to("cuda") if v.dtype == torch.long else v.to("cuda", torch.bfloat16) for k, v in prompts.items()}
    return model, latents.to("cuda", torch.bfloat16), prompts


def check(name: str, cudnn: bool = True) -> None:
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    model, latents, prompts = build(name)
    for _ in range(2):
        x = latents.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.family.predict(model, x, torch.tensor([0.5], device="cuda"), prompts)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
    print(json.dumps({"family": name, "cudnn_sdp": "ok" if cudnn else "off, ok"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--no-cudnn", action="store_true", help="with --family: cuDNN SDPA disabled (the control)")
    args = parser.parse_args()
    if args.family:
        check(args.family, cudnn=not args.no_cudnn)
        return
    for name in FAMILIES:
        done = subprocess.run([sys.executable, __file__, "--family", name], capture_output=True, text=True, timeout=300)
        if done.returncode:
            error = [line for line in done.stderr.splitlines() if "Error" in line][-1:] or ["exit %d" % done.returncode]
            print(json.dumps({"family": name, "cudnn_sdp": "fails", "error": error[0][:300]}), flush=True)
        else:
            print(done.stdout.strip(), flush=True)
    from argparse import Namespace

    import zimage_lora_step as bench

    torch.backends.cuda.matmul.allow_tf32 = True
    bench_args = Namespace(resolution=1024, caption_len=256, warmup=2, steps=4, tiny=False)
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        result = bench.run_row("bf16", bench_args)
        print(json.dumps({"zimage_bf16_step": True, "cudnn_sdp": cudnn, "s_per_step": result["s_per_step"],
                          "step_times": result["step_times"]}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
