"""A tiny random Sana built from the real classes, for tests and the ``tiny`` flavour.

``SanaTransformer2DModel``, ``AutoencoderDC``, ``Gemma2Model`` with an in-memory ``GemmaTokenizer``
(see :mod:`tune_models.families._gemma`) and Sana's Flow-DPM-Solver
(``DPMSolverMultistepScheduler`` with flow sigmas, flow prediction, shift 3), saved as a
``SanaPipeline`` folder:

- transformer: 2 blocks, 2 heads of 16 (self and cross attention), caption width 32, patch 1,
  no positional embedding (as the 1024 px checkpoints).
- DC-AE: three ResBlock stages of 8/16/16 channels, so 4x downsampling (32 px -> 8x8 latents),
  8 latent channels, ``scaling_factor`` calibrated on toy images.

The transformer is warm-started briefly (full weights) on synthetic images so a LoRA has a denoiser
to adapt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tune_models.families import _gemma, _shared

TINY_TRANSFORMER = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=32,
    caption_channels=_gemma.TINY_GEMMA["hidden_size"],
    sample_size=8,
    patch_size=1,
)
TINY_VAE = dict(
    latent_channels=8,
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(8, 16, 16),
    decoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (), ()),
    decoder_qkv_multiscales=((), (), ()),
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    algorithm_type="dpmsolver++",
    solver_order=2,
)
"""The published Sana checkpoints' scheduler settings that matter (Flow-DPM-Solver, shift 3)."""


@torch.no_grad()
def calibrate_vae(vae) -> None:
    """``scaling_factor`` so toy images' latents have unit variance (how the real factor was
    chosen, on real images)."""
    latents = vae.encode(_shared.synthetic_images(8, size=32)).latent
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 40) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel

    from tune_models.families.sana.family import FAMILY

    tokenizer = _gemma.gemma_tokenizer()
    with _shared.seeded(seed):
        transformer = SanaTransformer2DModel(**TINY_TRANSFORMER).eval()
        vae = AutoencoderDC(**TINY_VAE).eval()
        calibrate_vae(vae)
        text_encoder = _gemma.tiny_gemma2(tokenizer)
    components = dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**TINY_SCHEDULER),
    )
    with _shared.one_thread():  # tiny matrices
        return _shared.save_tiny(FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed, shift=3.0,
                                     extras={"complex_human_instruction": None})
