"""GPU check of TREAD token routing on FLUX.2, Qwen-Image and SD3.5-shaped transformers: seconds
per forward+backward and peak memory with and without ``tread_config``, random bf16 weights at
the published width and a cut-down depth, frozen weights (backward to the input, as a LoRA step
costs without the adapter), one 1024 px image (4096 image tokens), cached-size text.

    python scripts/tread_gpu_check.py --family flux2 --ratio 0.5 --start 2 --end -2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tune_models.family import LoadedModel, get_family
from tune_train.tread import TokenRouter, parse_tread_config


def build(name: str, layers: int, device: str):
    """(model, latents, prompts) for one 1024 px sample."""
    import diffusers

    family = get_family(name)
    extras: dict = {}
    if name == "flux2":  # FLUX.2-dev: 48 heads x 128; 8 double + 48 single blocks published
        transformer = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=max(1, layers // 6), num_single_layers=layers - max(1, layers // 6),
            attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
            timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=True,
        )
        latents = torch.randn(1, 128, 64, 64)
        prompts = {"prompt_embeds": torch.randn(1, 512, 15360)}
        extras = {"guidance": {"mode": "constant", "value": 1.0}}
    elif name == "qwen_image":  # Qwen-Image: 24 heads x 128, 60 blocks published
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
        )
        latents = torch.randn(1, 16, 128, 128)
        prompts = {"prompt_embeds": torch.randn(1, 256, 3584)}
    else:  # SD3.5 Large: 38 heads x 64, 38 blocks published
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
        )
        latents = torch.randn(1, 16, 128, 128)
        prompts = {"prompt_embeds": torch.randn(1, 333, 4096), "pooled_prompt_embeds": torch.randn(1, 2048)}
    transformer = transformer.to(device=device, dtype=torch.bfloat16).train().requires_grad_(False)
    model = LoadedModel(family=family, flavour=family.flavour(None), transformer=transformer, vae=None,
                        text_encoder=None, tokenizer=None, scheduler=None, extras=extras)
    prompts = {k: v.to(device=device, dtype=torch.bfloat16) for k, v in prompts.items()}
    return model, latents.to(device=device, dtype=torch.bfloat16), prompts


def seconds_per_step(model, prompts, latents, steps: int) -> tuple[float, float]:
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 2):
        torch.manual_seed(step)
        x = latents.clone().requires_grad_(True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.family.predict(model, x, torch.tensor([0.5], device=x.device), prompts).float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sorted(times[2:])
    return timed[len(timed) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux2", choices=["flux2", "qwen_image", "sd3"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--start", type=int, default=2)
    parser.add_argument("--end", type=int, default=-2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    args = parser.parse_args()
    model, latents, prompts = build(args.family, args.layers, "cuda")
    plain, plain_mem = seconds_per_step(model, prompts, latents, args.steps)
    routes = parse_tread_config({"routes": [{"selection_ratio": args.ratio, "start_layer_idx": args.start,
                                             "end_layer_idx": args.end}]})
    router = TokenRouter(model.transformer, model.family.token_routing(model), routes)
    routed, routed_mem = seconds_per_step(model, prompts, latents, args.steps)
    span = router.spans[0]
    row = {"family": args.family, "blocks": len(router.routing.blocks(model.transformer)), "span": [span.start, span.end],
           "ratio": args.ratio, "image_tokens": router.total, "plain_s": round(plain, 4), "routed_s": round(routed, 4),
           "speedup": round(plain / routed, 2), "plain_peak_gib": round(plain_mem, 2), "routed_peak_gib": round(routed_mem, 2),
           "device": torch.cuda.get_device_name()}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
