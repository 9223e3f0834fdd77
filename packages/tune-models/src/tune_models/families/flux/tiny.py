"""A tiny random FLUX.1 built from the real classes, for tests and the ``tiny`` flavour.

The production code path throughout (``FluxTransformer2DModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``T5EncoderModel``, CLIP and T5 tokenizers, ``FlowMatchEulerDiscreteScheduler``,
saved as a ``FluxPipeline`` folder), only small (see FACTS.md "Tiny models that work"):

- transformer: one double and one single block, 2 heads of 16 (``sum(axes_dims_rope) == 16``),
  ``in_channels = 64 = 4 x`` the VAE's 16 latent channels (2x2 packing), text and pooled widths
  32, with the guidance embedding (like dev).
- VAE: two blocks, so 2x downsampling (64 px -> 32x32 latents -> 256 tokens), no mid-block
  attention; shift/scaling calibrated so toy latents have zero mean and unit variance.
- CLIP-L and T5 stand-ins of width 32 and two layers; tokenizers built in memory.
- scheduler configured like FLUX.1-dev's (dynamic shifting, 256 -> 0.5 ... 4096 -> 1.15).

As for the tiny Z-Image, the transformer is *warm-started* (a few dozen full-weight flow-matching
steps on synthetic images) so that it is a denoiser of sorts and a LoRA has something to
adapt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tune_models.families import _shared

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32,
)
TINY_T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 12) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``; the warm
    start draws guidance inputs in [1, 5] so the guidance embedding learns something."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from tune_models.families.flux.family import FAMILY

    tokenizer = _shared.clip_tokenizer()
    tokenizer_2 = _shared.t5_tokenizer()
    with _shared.seeded(seed):
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER).eval()
        vae = _shared.tiny_vae()
        text_encoder = _shared.tiny_clip(CLIPTextModel, tokenizer, TINY_CLIP)
        text_encoder_2 = _shared.tiny_t5(tokenizer_2, TINY_T5)
    components = dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )
    extras = {"guidance": {"mode": "random-range", "value": 1.0, "min": 1.0, "max": 5.0}}
    return _shared.save_tiny(FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed, extras=extras)


def build_tiny_assistant_lora(
    pipeline_path: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    rank: int = 4,
    seed: int = 1,
    std: float = 0.1,
) -> Path:
    """A random adapter for the tiny transformer in the layout of Ostris' FLUX.1-schnell training
    adapter (diffusers keys, ``transformer.<module>.lora_A/B.weight``) on every attention
    projection of both block kinds."""
    config = json.loads((Path(pipeline_path) / "transformer" / "config.json").read_text())
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    modules = []
    for n in range(int(config["num_layers"])):
        modules += [f"transformer_blocks.{n}.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    for n in range(int(config["num_single_layers"])):
        modules += [f"single_transformer_blocks.{n}.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    shapes = {f"transformer.{module}": (dim, dim) for module in modules}
    return _shared.random_lora_file(out_file, shapes, rank=rank, seed=seed, std=std)
