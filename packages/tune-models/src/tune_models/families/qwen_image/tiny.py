"""A tiny random Qwen-Image built from the real classes, for tests and the ``tiny`` flavour.

``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage``, ``Qwen2_5_VLForConditionalGeneration``
(text *and* vision tower, both tiny), a ``Qwen2Tokenizer`` built in memory (every byte a token plus
Qwen's special and vision tokens, no merges) and a ``FlowMatchEulerDiscreteScheduler``, saved as a
``QwenImagePipeline`` folder; :func:`build_tiny_edit_pipeline` adds the ``processor`` folder
(that tokenizer and a Qwen2-VL image processor) and saves it as a ``QwenImageEditPipeline``:

- transformer: 2 blocks, 2 heads of 16 (``sum(axes_dims_rope) == 16``), ``in_channels = 64``
  (16 latent channels packed 2x2), text width 32.
- VAE: ``base_dim=8``, ``dim_mult=[1, 2]``, one down stage, so 2x downsampling (32 px -> 16x16
  latents); ``latents_mean``/``latents_std`` measured per channel on toy images.
- text encoder: Qwen2.5-VL with a 2-layer, width-32 language model (M-RoPE sections 2/3/3) and a
  1-block, width-16 vision tower (14 px patches merged 2x2; the image processor keeps images
  between 56x56 and 112x112 pixels, so a reference costs 4 to 16 encoder tokens).

The transformer is warm-started briefly (full weights) on synthetic images so a LoRA has a denoiser
to adapt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tune_models.families import _qwen, _shared

TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
)
TINY_VISION = dict(
    depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
)
"""Qwen-Image's scheduler settings (dynamic shift 256 -> 0.5 ... 8192 -> 0.9), without its
``shift_terminal``."""

SPECIAL_TOKENS = _qwen.SPECIAL_TOKENS


TINY_IMAGE_PROCESSOR = dict(
    min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
)
"""Qwen2-VL image processor settings matching :data:`TINY_VISION` (the real one allows up to
12.8 M pixels)."""


def build_tokenizer():
    """A Qwen2 tokenizer built in memory: every byte is a token, plus Qwen's special tokens and
    Qwen2.5-VL's vision markers (the edit prompts hold an image between them)."""
    from tune_models.families.qwen_image.processor import VISION_TOKENS

    tokenizer = _qwen.byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS[1:], *VISION_TOKENS]})
    return tokenizer


def build_processor(tokenizer):
    """The edit pipelines' processor over ``tokenizer`` (see :mod:`..processor`)."""
    from transformers import Qwen2VLImageProcessorPil

    from tune_models.families.qwen_image.processor import build_processor as build

    return build(tokenizer, Qwen2VLImageProcessorPil(**TINY_IMAGE_PROCESSOR))


def tiny_text_encoder(tokenizer):
    """A random tiny Qwen2.5-VL (language model and vision tower) for ``tokenizer``'s vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    vision_ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("vision_start", "vision_end")
    }
    vision_ids["image_token_id"] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vision_ids["video_token_id"] = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), **ids, **TINY_TEXT),
        vision_config=dict(TINY_VISION),
        **ids,
        **vision_ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@torch.no_grad()
def calibrate_vae(vae) -> None:
    """Per-channel ``latents_mean``/``latents_std`` so toy images' latents are standardised (how
    the real lists were measured, on real images)."""
    latents = vae.encode(_shared.synthetic_images(8, size=32)[:, :, None]).latent_dist.mode()
    dims = (0, 2, 3, 4)
    vae.register_to_config(
        latents_mean=[float(v) for v in latents.mean(dim=dims)],
        latents_std=[float(v) for v in latents.std(dim=dims)],
    )


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 30) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from tune_models.families.qwen_image.family import FAMILY

    tokenizer = build_tokenizer()
    with _shared.seeded(seed):
        transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER).eval()
        vae = AutoencoderKLQwenImage(**TINY_VAE).eval()
        calibrate_vae(vae)
        text_encoder = tiny_text_encoder(tokenizer)
    components = dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )
    if warm_start_steps > 0:  # at 32 px on a small pool: Qwen's 3D VAE is slow on a CPU
        from tune_models.family import LoadedModel

        model = LoadedModel(family=FAMILY, flavour=FAMILY.flavour("tiny"), **components)
        with _shared.one_thread():  # tiny matrices
            _shared.warm_start(FAMILY, model, steps=warm_start_steps, seed=seed, size=32, pool=8, batch=4)
    return _shared.save_tiny(FAMILY, path, components, warm_start_steps=0, seed=seed)


def build_tiny_edit_pipeline(
    path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 30, zero_cond_t: bool = False
) -> Path:
    """The tiny model as a Qwen-Image-Edit checkpoint: :func:`build_tiny_pipeline`'s folder plus
    ``processor/`` and a ``model_index.json`` naming ``QwenImageEditPipeline`` (what
    Qwen/Qwen-Image-Edit publishes). Load it with ``model_flavour`` ``edit`` or ``edit-plus``.

    ``zero_cond_t`` makes it a Qwen-Image-Edit-2511 checkpoint instead (``edit-2511``): the
    transformer config sets ``zero_cond_t`` (a behaviour, no weights) and ``model_index.json``
    names ``QwenImageEditPlusPipeline``, as 2511 publishes."""
    import json

    from transformers import AutoTokenizer

    from tune_models.families.qwen_image.processor import save_processor

    path = build_tiny_pipeline(path, seed=seed, warm_start_steps=warm_start_steps)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    save_processor(build_processor(tokenizer), path / "processor")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = "QwenImageEditPlusPipeline" if zero_cond_t else "QwenImageEditPipeline"
    if zero_cond_t:
        transformer_file = path / "transformer" / "config.json"
        transformer_config = json.loads(transformer_file.read_text())
        transformer_config["zero_cond_t"] = True
        transformer_file.write_text(json.dumps(transformer_config, indent=2))
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2))
    return path


def shrink_edit_area(monkeypatch: Any, area: int = 32 * 32) -> None:
    """For tests: the edit pipelines resize the output and the VAE's reference to 1024 x 1024
    pixels of area, far too big for the tiny 2x VAE; patch both pipelines' ``calculate_dimensions``
    (with pytest's ``monkeypatch``) to use ``area`` for that one request."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(
            module, "calculate_dimensions",
            lambda wanted, ratio, original=original: original(area if wanted == 1024 * 1024 else wanted, ratio),
        )
