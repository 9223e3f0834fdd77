"""A tiny random Z-Image built from the real classes, for tests and the ``tiny`` flavour.

Everything is the production code path (``ZImageTransformer2DModel``, ``AutoencoderKL``,
``Qwen3Model``, a ``Qwen2Tokenizer`` with a chat template, ``FlowMatchEulerDiscreteScheduler``),
only small, so tests exercise the same loading, encoding and LoRA plumbing as a real run.

Size choices (see FACTS.md "Tiny models that work"):

- transformer ``dim=64, n_heads=2`` so ``head_dim = 32 = sum(axes_dims) = 8 + 12 + 12``; two main
  layers, one refiner each. ``axes_lens[0] = 512`` exceeds any padded caption a test uses
  (caption positions and the image's frame position share that axis).
- VAE with two blocks: 2x downsampling, 16 latent channels (the transformer's ``in_channels``),
  no mid-block attention (it dominates CPU time). 64x64 images -> 32x32 latents -> 256 tokens.
  Its ``shift_factor``/``scaling_factor`` are calibrated on synthetic images so latents have zero
  mean and unit variance, as real VAEs' are; with the Flux values a random VAE's latents would
  be ~0.07 wide, all images would look alike to the transformer and nothing could be learned.
- Qwen3 text encoder with hidden size 32 (the transformer's ``cap_feat_dim``).
- tokenizer: byte-level BPE with the 256 byte symbols and no merges (every byte is a token), the
  Qwen special tokens and a small ChatML template, because the pipeline formats prompts with
  ``apply_chat_template``.
- scheduler configured like Z-Image-Turbo's (fixed shift 3, no dynamic shifting).

A random transformer is a poor stand-in for a base model: it cannot denoise at all, so a LoRA
on it learns very slowly (the LoRA would have to build a denoiser from frozen random weights).
The builder therefore *warm-starts* it: ~60 full-weight flow-matching steps on synthetic images
(about 2 s on two CPU cores). Measured on the default build: a rank-16 LoRA on one 64x64 image
pulls 8-step generations from a mean absolute pixel distance of ~42 to ~28 (of 255) from that
image's VAE reconstruction within 100 steps, ~27 after 300 (about 23 ms a step); without the
warm start the same run only gets from 42 to 38.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tune_models.families import _qwen, _shared

TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=[8, 12, 12],
    axes_lens=[512, 64, 64],
)
TINY_TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)
TINY_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = _qwen.SPECIAL_TOKENS


def build_tokenizer():
    """A Qwen2 tokenizer built in memory: every byte is a token, plus Qwen's special tokens."""
    return _qwen.byte_tokenizer(CHAT_TEMPLATE)


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 60) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` (transformer warm-started for
    ``warm_start_steps``, see the module docstring) and save it at ``path``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tune_models.families.zimage.family import FAMILY

    tokenizer = build_tokenizer()
    with _shared.seeded(seed):
        transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER).eval()
        # The pad tokens start at zero; random values make padding matter, as in a trained model.
        with torch.no_grad():
            transformer.x_pad_token.normal_(std=0.02)
            transformer.cap_pad_token.normal_(std=0.02)
        vae = _shared.tiny_vae()
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER)).eval()
    components = dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )
    return _shared.save_tiny(
        FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed, shift=TINY_SCHEDULER["shift"]
    )


def build_tiny_assistant_lora(
    pipeline_path: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    rank: int = 4,
    seed: int = 1,
    std: float = 0.1,
) -> Path:
    """A random adapter for the tiny transformer in the file format of Ostris' Z-Image-Turbo
    training adapter: one safetensors file, keys ``diffusion_model.<diffusers module>.lora_A.weight``
    / ``.lora_B.weight`` on every main-layer attention and feed-forward linear, no alphas."""
    import json

    config = json.loads((Path(pipeline_path) / "transformer" / "config.json").read_text())
    dim, layers = int(config["dim"]), int(config["n_layers"])
    hidden = int(dim / 3 * 8)  # Z-Image's FeedForward width
    shapes = {
        "attention.to_q": (dim, dim),
        "attention.to_k": (dim, dim),
        "attention.to_v": (dim, dim),
        "attention.to_out.0": (dim, dim),
        "feed_forward.w1": (hidden, dim),
        "feed_forward.w2": (dim, hidden),
        "feed_forward.w3": (hidden, dim),
    }
    keys = {
        f"diffusion_model.layers.{layer}.{module}": shape for layer in range(layers) for module, shape in shapes.items()
    }
    return _shared.random_lora_file(out_file, keys, rank=rank, seed=seed, std=std)
