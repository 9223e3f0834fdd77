"""What ``train_text_encoder`` costs: an SDXL-sized LoRA step with and without the text encoders' LoRA.

SDXL 1.0 base's published architecture with random weights (speed and memory do not depend on
them): the 2.6 B UNet (``UNet2DConditionModel``), CLIP-L (123 M) and OpenCLIP-G (695 M, with
projection), bf16 weights on the GPU. Both rows train LoRA rank 16 on the UNet's attention
projections (the family's default ``all`` target) at 1024 px (128 x 128 latents), batch 1,
gradient checkpointing on the UNet, bf16 autocast, AdamW, clipping:

- ``unet``: prompts from a cache (one fixed embedding per step), as a run without
  ``train_text_encoder``; the encoders are not on the GPU.
- ``unet+te``: tune's ``train_text_encoder`` path: a rank-16 LoRA on both CLIPs' attention and
  MLP linears (``tune_models.text_encoder_lora``), the prompt encoded live with gradients
  through ``SDXLFamily.encode_prompts_for_training`` every step, the encoders' LoRA as a second
  AdamW parameter group.

Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps.

Run (on a CUDA machine, from the repo root):
  PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/sdxl_text_encoder_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

GIB = 1024**3
DEVICE = "cuda"
UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
"""stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the fields that shape it)."""
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280, max_position_embeddings=77)


def build(train_text_encoder: bool, tiny: bool = False):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tune_models.adapters import add_training_lora
    from tune_models.families._shared import clip_tokenizer
    from tune_models.family import LoadedModel, get_family
    from tune_models.text_encoder_lora import add_text_encoder_loras

    family = get_family("sdxl")
    tokenizer = clip_tokenizer()
    ids = dict(vocab_size=49408, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    unet_config, clip_l, clip_g = UNET, CLIP_L, CLIP_G
    if tiny:  # a check of the script itself on any machine (the tiny SDXL's shapes)
        from tune_models.families.sdxl.tiny import TINY_CLIP, TINY_UNET

        unet_config, clip_l, clip_g = TINY_UNET, TINY_CLIP, TINY_CLIP
    with torch.device(DEVICE):
        unet = UNet2DConditionModel(**unet_config).to(torch.bfloat16)
        encoders = None
        if train_text_encoder:
            encoders = (CLIPTextModel(CLIPTextConfig(**clip_l, **ids)).to(torch.bfloat16),
                        CLIPTextModelWithProjection(CLIPTextConfig(**clip_g, **ids)).to(torch.bfloat16))
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    model = LoadedModel(
        family=family, flavour=family.flavour("base"), transformer=unet, vae=None,
        text_encoder=encoders[0] if encoders else None, tokenizer=tokenizer,
        text_encoder_2=encoders[1] if encoders else None, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(),
    )
    params = add_training_lora(model, rank=16, alpha=16, target="all", param_dtype=torch.float32)
    groups = [{"params": params}]
    if train_text_encoder:
        for encoder in encoders:
            encoder.requires_grad_(False)
        te = add_text_encoder_loras(model, rank=16, alpha=16)
        te_params = [p for group in te.values() for p in group]
        for p in te_params:
            p.data = p.data.float()
        groups.append({"params": te_params, "lr": 5e-5})
    return family, model, groups


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(row: str, steps: int, warmup: int, tiny: bool = False) -> dict:
    torch.manual_seed(0)
    train_te = row == "unet+te"
    family, model, groups = build(train_te, tiny)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=DEVICE == "cuda")
    trainable = [p for g in groups for p in g["params"]]
    size = 16 if tiny else 128
    width = model.transformer.config.cross_attention_dim
    pooled = model.transformer.config.projection_class_embeddings_input_dim - 6 * model.transformer.config.addition_time_embed_dim
    latents = torch.randn(1, 4, size, size, device=DEVICE)
    cached = [{"prompt_embeds": torch.randn(77, width, device=DEVICE),
               "pooled_prompt_embeds": torch.randn(pooled, device=DEVICE)}]
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=DEVICE, dtype=torch.float32)
    times = []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            prompts = family.encode_prompts_for_training(model, ["a photo of a cat"], cached) if train_te else cached
            batch = family.collate_prompts(prompts, DEVICE, torch.bfloat16)
            batch["add_time_ids"] = time_ids
            noise = torch.randn_like(latents)
            out = family.predict(model, latents + noise, torch.tensor([500], device=DEVICE), batch)
            loss = torch.nn.functional.mse_loss(out.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "row": row,
        "s_per_step": round(statistics.median(times), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if DEVICE == "cuda" else None,
        "trainable_params": sum(p.numel() for p in trainable),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="unet,unet+te")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL's shapes on the CPU (checks the script)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.tiny else "cuda"
    results = []
    for row in args.rows.split(","):
        result = run(row, args.steps, args.warmup, args.tiny)
        print(json.dumps(result), flush=True)
        results.append(result)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu"
    report = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "rows": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
