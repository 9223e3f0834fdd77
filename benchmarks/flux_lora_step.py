"""Flux.1-dev-sized LoRA training step on one GPU: tune's step against DESIGN.md's bar.

The transformer is ``FluxTransformer2DModel`` with Flux.1-dev's published config (19 double- and
38 single-stream blocks, 24 heads x 128, T5 features 4096 wide, CLIP pooled 768, the guidance
embedding; about 11.9 B parameters) and random bf16 weights, built block by block on the GPU.
Each row trains LoRA rank 16 on every linear inside the blocks at 1024 px (4096 image tokens),
512 text tokens, batch 1, gradient checkpointing, bf16 autocast, fused AdamW, clipping, as
DESIGN.md's reference loop does (1.087 s, 25.8 GiB on the H100 with checkpointing, taken with
cuDNN attention turned off because its backward failed on Flux's shapes).

Row syntax: ``<preset>[+swapN][:option...]``, presets ``bf16``, ``int8-torchao``, ...; options:
  ref          the plain diffusers + peft loop (the transformer called directly, fp32 LoRA as in
               tune) instead of ``FluxFamily.predict``
  no-cudnn     ``torch.backends.cuda.enable_cudnn_sdp(False)`` for the row, as the bar was taken
               (tune's rows turn it off anyway, as the trainer does for Flux: its backward
               crashes on Flux's shapes, ``ModelFamily.cudnn_attention_in_training``)
  act-offload  checkpointed block inputs in pinned CPU memory (tune_offload.activations)
  tread[R]     TREAD routing of a share R (default 0.5) of the image tokens over blocks 2..-2

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/flux_lora_step.py \\
      --rows bf16:ref:no-cudnn,bf16:no-cudnn,bf16 --json flux_lora_step.json
CPU smoke test of every code path: add ``--tiny``.
"""

from __future__ import annotations

import sys
import time

import torch
from _harness import (GIB, build_lora_model, flow_matching_step, parse_step_row, print_summary, run_meta,
                      run_rows, step_arguments, timed_steps, write_results)

DEVICE = "cuda"
CONFIG: dict = dict(guidance_embeds=True)  # the class defaults are Flux.1's; dev adds guidance
TINY_CONFIG = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
OPTIONS = ("ref", "no-cudnn", "act-offload")


def parse_row(row: str) -> dict:
    return parse_step_row(row, OPTIONS)


def build(settings: dict):
    """The (quantised, partly swapped) transformer with its fp32 LoRA, built block by block."""
    from diffusers import FluxTransformer2DModel

    def rope(model):  # the RoPE module recreated off the meta device
        return type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope))

    return build_lora_model(lambda: FluxTransformer2DModel(**CONFIG),
                            block_lists=("transformer_blocks", "single_transformer_blocks"),
                            preset=settings["preset"], swap=settings["swap"], act_offload=settings["act_offload"],
                            lora_dtype=torch.float32, device=DEVICE, rope=rope)


def forward_fn(model, settings: dict, prompts: dict):
    from tune_models.family import LoadedModel, get_family

    family = get_family("flux")
    loaded = LoadedModel(family=family, flavour=family.flavour(None), transformer=model, vae=None,
                         text_encoder=None, tokenizer=None, scheduler=None,
                         extras={"guidance": {"mode": "constant", "value": 1.0}})
    if settings["tread"]:
        from tune_train import tread

        route = {"selection_ratio": settings["tread"], "start_layer_idx": 2, "end_layer_idx": -2}
        tread.install(loaded, family, {"routes": [route]})
    if not settings["ref"]:
        return lambda noisy, sigma: family.predict(loaded, noisy.to(torch.bfloat16), sigma, prompts)

    def plain(noisy, sigma):
        noisy = noisy.to(torch.bfloat16)
        _, _, h, w = noisy.shape
        embeds = prompts["prompt_embeds"]
        out = model(hidden_states=family.pack(noisy), timestep=sigma.to(noisy.dtype),
                    guidance=torch.ones(1, device=noisy.device),
                    pooled_projections=prompts["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                    img_ids=family.image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return family.unpack(out, h, w)

    return plain


def run_row(row: str, args) -> dict:
    settings = parse_row(row)
    cuda = DEVICE == "cuda"
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled() if cuda else None
    if cuda and settings["no_cudnn"]:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if cuda and not settings["ref"]:  # tune's path chooses its attention backends as the trainer does
        from tune_models.family import get_family
        from tune_train.setup_model import choose_attention_backends

        choose_attention_backends(get_family("flux"), torch.device(DEVICE))
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model, params, swapper = build(settings)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
        setup_s = time.perf_counter() - t0
        setup_peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
        side = args.resolution // 8
        g = torch.Generator(DEVICE).manual_seed(1)
        x0 = torch.randn(1, 16, side, side, device=DEVICE, generator=g, dtype=torch.bfloat16)
        noise = torch.randn(x0.shape, device=DEVICE, generator=g, dtype=torch.bfloat16)
        prompts = {
            "prompt_embeds": torch.randn(1, args.text_len, model.config.joint_attention_dim, device=DEVICE,
                                         generator=g, dtype=torch.bfloat16),
            "pooled_prompt_embeds": torch.randn(1, model.config.pooled_projection_dim, device=DEVICE,
                                                generator=g, dtype=torch.bfloat16),
        }
        forward = forward_fn(model, settings, prompts)

        step = flow_matching_step(forward, x0, noise, params, optimizer, g, DEVICE)
        result = dict(row=row, setup_s=round(setup_s, 1), setup_peak_gib=round(setup_peak, 2),
                      **timed_steps(step, warmup=args.warmup, steps=args.steps, device=DEVICE),
                      params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
                      trainable_params=sum(p.numel() for p in params),
                      swapped_blocks=len(swapper.swapped) if swapper is not None else 0)
        del model, params, optimizer, swapper, forward
        return result
    finally:
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_before)


def main() -> int:
    args = step_arguments(__doc__.split("\n")[0], rows="bf16:ref:no-cudnn,bf16:no-cudnn,bf16", text_len=512)
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
