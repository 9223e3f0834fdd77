"""A tiny random Chroma built from the real classes (``ChromaTransformer2DModel``, the tiny
Flux's VAE, a T5 of width 32, ``ChromaPipeline`` layout), warm-started briefly like the others."""

from __future__ import annotations

import os
from pathlib import Path

from tune_models.families import _shared
from tune_models.families.flux.tiny import TINY_SCHEDULER, TINY_T5

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1,
)


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 12) -> Path:
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from tune_models.families.chroma.family import FAMILY

    tokenizer = _shared.t5_tokenizer()
    with _shared.seeded(seed):
        transformer = ChromaTransformer2DModel(**TINY_TRANSFORMER).eval()
        vae = _shared.tiny_vae()
        text_encoder = _shared.tiny_t5(tokenizer, TINY_T5)
    components = dict(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )
    return _shared.save_tiny(FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed)
