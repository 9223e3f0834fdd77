"""A tiny random SDXL built from the real classes, for tests and the ``tiny`` flavour.

The production classes throughout (``UNet2DConditionModel`` with SDXL's ``text_time``
added conditioning and linear projections, ``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTextModelWithProjection``, CLIP tokenizers, ``EulerDiscreteScheduler`` with SDXL's
betas), saved as a ``StableDiffusionXLPipeline`` folder:

- UNet: a plain and a cross-attention down block (and the mirror up blocks), widths 32/64, so
  resnets, down/up samplers, attention and feed-forwards are all present; cross-attention width
  64 = the two CLIPs' hidden states concatenated; ``add_time_ids`` embedded in 8 per id, plus the
  pooled 32-wide projection: ``6 * 8 + 32 = 80`` inputs to the added embedding, as SDXL's
  ``6 * 256 + 1280``.
- VAE: two blocks (2x), 4 latent channels as SDXL's, ``scaling_factor`` calibrated to unit std
  and no shift (SDXL's pipeline applies none).
- the UNet is warm-started briefly on synthetic images (see ``_shared.warm_start``), in its
  DDPM epsilon scheme.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tune_models.families import _shared

TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    transformer_layers_per_block=(1, 1),
)
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=32,
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
)
"""SDXL 1.0 base's scheduler config."""


@torch.no_grad()
def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**{**_shared.TINY_VAE, "latent_channels": 4}).eval()
    latents = vae.encode(_shared.synthetic_images(16)).latent_dist.mode()
    vae.register_to_config(shift_factor=None, scaling_factor=float(1.0 / latents.std()))
    return vae


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 40) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tune_models.families.sdxl.family import FAMILY
    from tune_models.family import LoadedModel

    tokenizer, tokenizer_2 = _shared.clip_tokenizer(), _shared.clip_tokenizer()
    with _shared.seeded(seed):
        unet = UNet2DConditionModel(**TINY_UNET).eval()
        vae = _tiny_vae()
        text_encoder = _shared.tiny_clip(CLIPTextModel, tokenizer, TINY_CLIP)
        text_encoder_2 = _shared.tiny_clip(CLIPTextModelWithProjection, tokenizer_2, TINY_CLIP)
    scheduler = EulerDiscreteScheduler(**TINY_SCHEDULER)
    if warm_start_steps > 0:
        model = LoadedModel(
            family=FAMILY, flavour=FAMILY.flavour("tiny"), transformer=unet, vae=vae, text_encoder=text_encoder,
            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler,
        )
        _shared.warm_start(FAMILY, model, steps=warm_start_steps, seed=seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    FAMILY.pipeline_class()(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    ).save_pretrained(path)
    return path


def build_tiny_refiner(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny SDXL *refiner* (no CLIP-L; ``add_time_ids`` of 5 with the aesthetic score), saved as
    a ``StableDiffusionXLImg2ImgPipeline`` folder with ``requires_aesthetics_score``, as the
    real refiner is; not warm-started."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    tokenizer_2 = _shared.clip_tokenizer()
    with _shared.seeded(seed):
        unet = UNet2DConditionModel(
            **{**TINY_UNET, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 5 * 8 + 32}
        ).eval()
        vae = _tiny_vae()
        text_encoder_2 = _shared.tiny_clip(CLIPTextModelWithProjection, tokenizer_2, TINY_CLIP)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(**TINY_SCHEDULER), requires_aesthetics_score=True,
    ).save_pretrained(path)
    return path
