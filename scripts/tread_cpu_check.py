"""CPU sanity check of TREAD token routing: seconds per forward+backward of a small random Z-Image
or Flux transformer with and without ``tread_config``. Only shows the mechanism removes work; GPU
speed is measured elsewhere (the token count and the attention share differ completely).

    uv run python scripts/tread_cpu_check.py --family z-image --ratio 0.5 --start 2 --end -2
"""

from __future__ import annotations

import argparse
import time

import torch

from tune_models.family import LoadedModel, get_family
from tune_train.tread import TokenRouter, parse_tread_config


def build(family_name: str, layers: int):
    family = get_family(family_name)
    torch.manual_seed(0)
    if family_name == "z-image":
        from diffusers import ZImageTransformer2DModel

        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=layers,
            n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=64, axes_dims=[16, 24, 24],
            axes_lens=[1024, 128, 128],
        )
        prompts = {"prompt_embeds": [torch.randn(64, 64)]}
        extras = {}
    else:
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=layers // 4, num_single_layers=layers - layers // 4,
            attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
            guidance_embeds=True, axes_dims_rope=(16, 24, 24),
        )
        prompts = {"prompt_embeds": torch.randn(1, 64, 64), "pooled_prompt_embeds": torch.randn(1, 64)}
        extras = {"guidance": {"mode": "constant", "value": 1.0}}
    model = LoadedModel(family=family, flavour=family.flavour(None), transformer=transformer.train(), vae=None,
                        text_encoder=None, tokenizer=None, scheduler=None, extras=extras)
    return model, prompts


def seconds_per_step(model, prompts, latents, steps: int) -> float:
    times = []
    for step in range(steps + 1):
        torch.manual_seed(step)
        model.transformer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.family.predict(model, latents, torch.tensor([0.5]), prompts).square().mean().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, first (warm-up) step dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="z-image", choices=["z-image", "flux"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="latent height and width (tokens = size^2 / 4)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--start", type=int, default=2)
    parser.add_argument("--end", type=int, default=-2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, prompts = build(args.family, args.layers)
    latents = torch.randn(1, 16, args.size, args.size)
    plain = seconds_per_step(model, prompts, latents, args.steps)
    routes = parse_tread_config({"routes": [{"selection_ratio": args.ratio, "start_layer_idx": args.start,
                                             "end_layer_idx": args.end}]})
    router = TokenRouter(model.transformer, model.family.token_routing(model), routes)
    routed = seconds_per_step(model, prompts, latents, args.steps)
    span = router.spans[0]
    print(f"{args.family}: {args.layers} blocks, {args.size * args.size // 4} image tokens, route blocks "
          f"{span.start}..{span.end} at selection_ratio {args.ratio}, {args.threads} thread(s)")
    print(f"plain  {plain:.3f} s/step\nrouted {routed:.3f} s/step ({plain / routed:.2f}x)")


if __name__ == "__main__":
    main()
