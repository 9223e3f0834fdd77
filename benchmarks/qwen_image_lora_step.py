"""Qwen-Image-sized LoRA training step on one GPU, text-to-image and edit: peak memory and s/step.

The transformer is ``QwenImageTransformer2DModel`` with its published defaults (Qwen-Image and
Qwen-Image-Edit share it: 60 blocks, 24 heads x 128, text features 3584 wide; about 20.4 B
parameters) and random weights (speed does not depend on them). It is built block by block on the
GPU: each block is filled with random weights, quantised by ``tune_quant`` when the row asks and,
when it is one of the last N blocks, handed to ``tune_offload``'s block swap (pinned CPU memory),
so a model that does not fit is never whole on the GPU.

Each row trains LoRA rank 16 on every linear layer inside the blocks at 1024 px (4096 image
tokens), 256 text tokens (a long caption), batch 1, gradient checkpointing, bf16 autocast, fused
AdamW, clipping. The forward is ``tune_models``' own ``QwenImageFamily.predict``: for ``:edit``
one 1024 px reference is packed and appended after the noisy tokens (8192 image tokens), as
Qwen-Image-Edit trains, and the loss is taken on the target's tokens.

Row syntax: ``<preset>[+swapN][:option...]``, presets ``bf16`` (no quantisation), ``int8-torchao``,
``fp8-torchao``; options:
  edit         a reference image (Qwen-Image-Edit), else text to image
  ref          the bar to beat: a plain diffusers + peft loop (the transformer called directly
               with the same inputs, no tune code) instead of ``predict``
  lora-bf16    bf16 LoRA weights (default fp32, what mixed precision training keeps)
  act-offload  the checkpointed block inputs in pinned CPU memory (tune_offload.activations)
  tread[R]     TREAD token routing: a share R (default 0.5) of the target's image tokens skips
               blocks 2 .. -2 (tune_train.tread; references are never routed)
Peak memory is ``torch.cuda.max_memory_allocated`` over the training steps; setup's own peak
is reported apart.

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/qwen_image_lora_step.py \\
      --rows bf16:ref,bf16,bf16:edit:ref,bf16:edit --json qwen_image_lora_step.json
CPU smoke test of every code path: add ``--tiny``.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch
from _harness import (GIB, build_lora_model, flow_matching_step, parse_step_row, print_summary, run_meta,
                      run_rows, step_arguments, timed_steps, write_results)

DEVICE = "cuda"
CONFIG: dict = {}  # QwenImageTransformer2DModel's defaults are Qwen-Image's published config
TINY_CONFIG = dict(num_layers=6, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                   axes_dims_rope=(4, 6, 6))
OPTIONS = ("edit", "ref", "lora-bf16", "act-offload")


def parse_row(row: str) -> dict:
    settings = parse_step_row(row, OPTIONS)
    if settings["ref"] and (settings["tread"] or settings["preset"] != "bf16" or settings["swap"]):
        raise ValueError("the ref row is the plain diffusers + peft loop: bf16, no swap, no tread")
    return settings


def build(settings: dict):
    """The (quantised, partly swapped) transformer with its LoRA, built block by block."""
    from diffusers import QwenImageTransformer2DModel

    def rope(model):  # the RoPE tables are buffers made at construction
        return type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)

    return build_lora_model(lambda: QwenImageTransformer2DModel(**CONFIG), block_lists=("transformer_blocks",),
                            preset=settings["preset"], swap=settings["swap"], act_offload=settings["act_offload"],
                            lora_dtype=torch.bfloat16 if settings["lora_bf16"] else torch.float32, device=DEVICE,
                            rope=rope)


def forward_fn(model, settings: dict, text: torch.Tensor, reference: torch.Tensor | None):
    """``(noisy latents, sigma) -> velocity`` the way the row asks: tune's ``predict`` (with TREAD
    when asked) or the transformer called directly as a plain diffusers + peft loop would."""
    from tune_models.family import LoadedModel, get_family

    family = get_family("qwen-image")
    prompts = {"prompt_embeds": text}
    references = [reference] if reference is not None else None
    if settings["tread"]:
        from tune_train import tread

        route = {"selection_ratio": settings["tread"], "start_layer_idx": 2, "end_layer_idx": -2}
        loaded = LoadedModel(family=family, flavour=family.flavour(None), transformer=model, vae=None,
                             text_encoder=None, tokenizer=None, scheduler=None)
        tread.install(loaded, family, {"routes": [route]})
    if not settings["ref"]:
        handle = SimpleNamespace(transformer=model)
        return lambda noisy, sigma: family.predict(handle, noisy.to(torch.bfloat16), sigma, prompts,
                                                   reference_latents=references)

    def plain(noisy, sigma):
        noisy = noisy.to(torch.bfloat16)
        _, _, h, w = noisy.shape
        tokens = [family.pack(noisy)]
        shapes = [(1, h // 2, w // 2)]
        if reference is not None:
            tokens.append(family.pack(reference))
            shapes.append((1, h // 2, w // 2))
        out = model(hidden_states=torch.cat(tokens, 1), timestep=sigma, encoder_hidden_states=text,
                    img_shapes=[shapes], return_dict=False)[0]
        return family.unpack(out[:, : tokens[0].shape[1]], h, w)

    return plain


def run_row(row: str, args) -> dict:
    settings = parse_row(row)
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, params, swapper = build(settings)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
    setup_s = time.perf_counter() - t0
    setup_peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
    side = args.resolution // 8  # the Qwen-Image VAE's 8x latents, 16 channels
    g = torch.Generator(DEVICE).manual_seed(1)
    x0 = torch.randn(1, 16, side, side, device=DEVICE, generator=g, dtype=torch.bfloat16)
    noise = torch.randn(x0.shape, device=DEVICE, generator=g, dtype=torch.bfloat16)
    text = torch.randn(1, args.text_len, model.config.joint_attention_dim, device=DEVICE, generator=g,
                       dtype=torch.bfloat16)
    reference = torch.randn(x0.shape, device=DEVICE, generator=g, dtype=torch.bfloat16) if settings["edit"] else None
    forward = forward_fn(model, settings, text, reference)

    step = flow_matching_step(forward, x0, noise, params, optimizer, g, DEVICE)
    result = dict(row=row, setup_s=round(setup_s, 1), setup_peak_gib=round(setup_peak, 2),
                  **timed_steps(step, warmup=args.warmup, steps=args.steps, device=DEVICE),
                  params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
                  trainable_params=sum(p.numel() for p in params),
                  swapped_blocks=len(swapper.swapped) if swapper is not None else 0,
                  image_tokens=(side // 2) ** 2 * (2 if settings["edit"] else 1))
    del model, params, optimizer, swapper, forward
    return result


def main() -> int:
    args = step_arguments(__doc__.split("\n")[0], rows="bf16:ref,bf16,bf16:edit:ref,bf16:edit", text_len=256)
    global DEVICE
    if args.tiny:
        DEVICE = "cpu"
        CONFIG.update(TINY_CONFIG)
    results = run_rows(args.rows.split(","), lambda row: run_row(row, args), device=DEVICE)
    print_summary(results, extra="image_tokens")
    write_results(args.json, run_meta(DEVICE, resolution=args.resolution, text_len=args.text_len, warmup=args.warmup,
                                      steps=args.steps, lora_rank=16, batch=1), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
