"""A tiny random SD3 built from the real classes, for tests and the ``tiny`` flavour.

The production classes throughout (``SD3Transformer2DModel``, ``AutoencoderKL``, two
``CLIPTextModelWithProjection``, ``T5EncoderModel``, CLIP and T5 tokenizers,
``FlowMatchEulerDiscreteScheduler`` with shift 3, saved as a ``StableDiffusion3Pipeline`` folder):

- transformer: two joint blocks of 2 heads x 16, the first with 3.5 Medium's second image
  attention (``dual_attention_layers``) and RMS q/k norms, so every module kind of the real
  checkpoints is present; the last block is context-pre-only, as in SD3.
- text: CLIP stand-ins of width 32 (hidden states concatenated: 64) with 32-wide projections
  (pooled: 64), a T5 of width 64 (the joint attention width, which must be at least the CLIP
  concatenation's); tokenizers built in memory. VAE as the other tiny models (2x, calibrated).
- the transformer is warm-started briefly on synthetic images (see ``_shared.warm_start``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tune_models.families import _shared

TINY_TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32,
)
TINY_T5 = dict(d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
TINY_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 12) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from tune_models.families.sd3.family import FAMILY

    tokenizer, tokenizer_2, tokenizer_3 = _shared.clip_tokenizer(), _shared.clip_tokenizer(), _shared.t5_tokenizer()
    with _shared.seeded(seed):
        transformer = SD3Transformer2DModel(**TINY_TRANSFORMER).eval()
        vae = _shared.tiny_vae()
        text_encoder = _shared.tiny_clip(CLIPTextModelWithProjection, tokenizer, TINY_CLIP)
        text_encoder_2 = _shared.tiny_clip(CLIPTextModelWithProjection, tokenizer_2, TINY_CLIP)
        text_encoder_3 = _shared.tiny_t5(tokenizer_3, TINY_T5)
    components = dict(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )
    return _shared.save_tiny(
        FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed, shift=TINY_SCHEDULER["shift"]
    )
