"""A tiny random Qwen-Image built from the real classes, for tests and the ``tiny`` flavour.

``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage``, ``Qwen2_5_VLForConditionalGeneration``
(text *and* vision tower, both tiny), a ``Qwen2Tokenizer`` built in memory (every byte a token plus
Qwen's special tokens, no merges) and a ``FlowMatchEulerDiscreteScheduler``, saved as a
``QwenImagePipeline`` folder:

- transformer: 2 blocks, 2 heads of 16 (``sum(axes_dims_rope) == 16``), ``in_channels = 64``
  (16 latent channels packed 2x2), text width 32.
- VAE: ``base_dim=8``, ``dim_mult=[1, 2]``, one down stage, so 2x downsampling (32 px -> 16x16
  latents); ``latents_mean``/``latents_std`` measured per channel on toy images.
- text encoder: Qwen2.5-VL with a 2-layer, width-32 language model (M-RoPE sections 2/3/3) and a
  1-block, width-16 vision tower.

The transformer is warm-started briefly (full weights) on synthetic images so a LoRA has a denoiser
to adapt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tune_models.families import _shared

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

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tokenizer():
    """A Qwen2 tokenizer built in memory: every byte is a token, plus Qwen's special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_text_encoder(tokenizer):
    """A random tiny Qwen2.5-VL (language model and vision tower) for ``tokenizer``'s vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), **ids, **TINY_TEXT), vision_config=dict(TINY_VISION), **ids
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
    if warm_start_steps > 0:
        from tune_models.family import LoadedModel

        model = LoadedModel(family=FAMILY, flavour=FAMILY.flavour("tiny"), **components)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread is many times faster on a busy CPU
        try:
            warm_start(FAMILY, model, steps=warm_start_steps, seed=seed)
        finally:
            torch.set_num_threads(threads)
    return _shared.save_tiny(FAMILY, path, components, warm_start_steps=0, seed=seed)


def warm_start(family, model, *, steps: int, seed: int, lr: float = 5e-3, size: int = 32, pool: int = 8) -> None:
    """:func:`_shared.warm_start`'s recipe at 32 px on a small pool (Qwen's 3D VAE is slow on a CPU)."""
    generator = torch.Generator().manual_seed(seed)
    words = ["a", "red", "blue", "green", "square", "circle", "photo", "of", "big", "small", "on", "grey"]
    latents = family.encode_images(model, _shared.synthetic_images(pool, size=size, seed=seed + 1))
    captions = [
        " ".join(words[j] for j in torch.randint(0, len(words), (4,), generator=generator).tolist()) for _ in range(pool)
    ]
    embeds = family.encode_prompts(model, captions)
    transformer = model.transformer
    transformer.requires_grad_(True)
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, pool, (4,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = torch.rand(4, generator=generator)
        view = sigmas.view(-1, 1, 1, 1)
        cond = family.collate_prompts([embeds[i] for i in index.tolist()], "cpu", torch.float32)
        pred = family.predict(model, (1 - view) * x0 + view * noise, sigmas, cond)
        torch.nn.functional.mse_loss(pred, noise - x0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    transformer.requires_grad_(False)
    transformer.eval()
