"""A tiny random Lumina 2 built from the real classes, for tests and the ``tiny`` flavour.

``Lumina2Transformer2DModel``, ``AutoencoderKL``, ``Gemma2Model`` with an in-memory
``GemmaTokenizer`` (see :mod:`tune_models.families._gemma`) and a ``FlowMatchEulerDiscreteScheduler``
with a fixed shift of 6, saved as a ``Lumina2Pipeline`` folder:

- transformer: 1 main block, 1 noise-refiner and 1 context-refiner block, width 32, 2 query heads
  and 1 key/value head of 16 (``sum(axes_dim_rope) == 16``; grouped-query attention as in the real
  model, so the ComfyUI ``qkv`` fusion sees unequal q and k/v sizes), caption width 32, and
  ``axes_lens[0] = 300`` above the 256-token caption plus its image position.
- VAE: four blocks, so 8x downsampling like the Flux VAE (``Lumina2Pipeline`` hard-codes
  ``vae_scale_factor = 8``): 64 px -> 8x8 latents; no mid-block attention; shift and scaling
  calibrated on toy images.

The transformer is warm-started briefly (full weights) on synthetic images so a LoRA has a denoiser
to adapt.
"""

from __future__ import annotations

import os
from pathlib import Path

from tune_models.families import _gemma, _shared
from tune_models.families.lumina2.flavours import PUBLISHED_SCHEDULER

TINY_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    hidden_size=32,
    num_layers=1,
    num_refiner_layers=1,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=16,
    cap_feat_dim=_gemma.TINY_GEMMA["hidden_size"],
    axes_dim_rope=(4, 6, 6),
    axes_lens=(300, 32, 32),
)
TINY_VAE = dict(
    _shared.TINY_VAE,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
)
TINY_SCHEDULER = dict(PUBLISHED_SCHEDULER)
"""The published checkpoint's scheduler settings (fixed shift 6, no dynamic shifting)."""


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 40) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel

    from tune_models.families.lumina2.family import FAMILY

    tokenizer = _gemma.gemma_tokenizer()
    with _shared.seeded(seed):
        transformer = Lumina2Transformer2DModel(**TINY_TRANSFORMER).eval()
        vae = AutoencoderKL(**TINY_VAE).eval()
        _shared.calibrate_vae(vae)
        text_encoder = _gemma.tiny_gemma2(tokenizer)
    components = dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )
    with _shared.one_thread():  # tiny matrices
        return _shared.save_tiny(FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed)
