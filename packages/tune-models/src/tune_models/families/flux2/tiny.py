"""A tiny random FLUX.2 built from the real classes, for tests and the ``tiny`` flavour.

``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``, ``Mistral3ForConditionalGeneration`` (language
model *and* Pixtral vision tower, both tiny), a byte-level tokenizer built in memory with a
Mistral-style chat template, and a ``FlowMatchEulerDiscreteScheduler``, saved as a
``Flux2Pipeline`` folder:

- transformer: one double and one single block, 2 heads of 16 (``sum(axes_dims_rope) == 16``
  over FLUX.2's four RoPE axes t/h/w/l), ``in_channels = 128`` (32 latent channels patchified
  2x2), text width 48 (= 3 stacked layers x 16), with the guidance embedding (like dev).
- VAE: 32 latent channels like the real one, two blocks (2x downsampling; with the 2x2
  patchify 64 px -> 16 x 16 tokens), no mid-block attention; its batch-norm running statistics
  are measured on toy images, as the real ones were on real images.
- text encoder: Mistral-3 with a **31-layer**, width-16 language model, because the pipeline
  stacks the hidden states of layers 10, 20 and 30; a 1-layer, width-16 Pixtral vision tower.
  Tokenizer: every byte a token plus Mistral's control tokens (``[SYSTEM_PROMPT]``, ``[INST]``,
  ``[IMG]``, ...); the chat template writes ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``.
  The real checkpoint ships a ``PixtralProcessor``; a bare tokenizer serves text prompts the same
  way and needs no torchvision.
- scheduler: dynamic shifting (256 -> 0.5 ... 4096 -> 1.15).

The transformer is warm-started briefly (full weights) on synthetic images so a LoRA has a
denoiser to adapt.

:func:`build_tiny_klein_pipeline` builds the ``tiny-klein`` flavour's model the same way, as a
``Flux2KleinPipeline`` folder (``is_distilled`` false, like the klein Base checkpoints): the same
tiny transformer without the guidance embedding (klein has none), the same VAE, and a random
**6-layer**, width-16 ``Qwen3ForCausalLM`` (the flavour stacks layers 2, 4 and 5, where the real
klein stacks 9, 18 and 27 of 36) with a byte-level Qwen2 tokenizer whose chat template writes
Qwen3's ``<|im_start|>user ... <|im_end|>`` turns and, with ``enable_thinking=False``, the empty
``<think>`` block after the generation prompt, as Qwen3's own template does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tune_models.families import _qwen, _shared

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=True,
)
TINY_VAE = {**_shared.TINY_VAE, "latent_channels": 32}  # FLUX.2's VAE has 32 latent channels
TINY_TEXT = dict(
    model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=31, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
)
TINY_VISION = dict(
    model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    head_dim=8, patch_size=14, image_size=224,
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)

SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
"""Mistral Small 3.1's chat layout for text turns (system prompt, user turns), enough for
``Flux2Pipeline``'s prompt encoding."""


def build_tokenizer():
    """A byte-level tokenizer built in memory: Mistral's control tokens, then every byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_encoder(tokenizer):
    """A random tiny Mistral-3 (31-layer language model and a Pixtral vision tower)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = Mistral3Config(
        text_config=dict(vocab_size=len(tokenizer), **ids, **TINY_TEXT),
        vision_config=dict(TINY_VISION),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config).eval()


@torch.no_grad()
def calibrate_vae(vae) -> None:
    """Set the batch-norm running mean/variance of the patchified latents from toy images."""
    from tune_models.families.flux2.family import Flux2Family

    latents = Flux2Family.patchify(vae.encode(_shared.synthetic_images(16)).latent_dist.mode())
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def _tiny_components(transformer_config: dict, tokenizer, text_encoder: Callable[[Any], Any], seed: int) -> dict:
    """The tiny pipeline's components (``LoadedModel`` field names) with weights drawn from
    ``seed``: the transformer of ``transformer_config``, the calibrated tiny VAE and
    ``text_encoder(tokenizer)``; dev and klein differ only in those."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    with _shared.seeded(seed):
        transformer = Flux2Transformer2DModel(**transformer_config).eval()
        vae = AutoencoderKLFlux2(**TINY_VAE).eval()
        calibrate_vae(vae)
        encoder = text_encoder(tokenizer)
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER),
    )


def build_tiny_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 20) -> Path:
    """Build the tiny pipeline with weights drawn from ``seed`` and save it at ``path``; the warm
    start draws guidance inputs in [1, 5] so the guidance embedding learns something."""
    from tune_models.families.flux2.family import FAMILY

    components = _tiny_components(TINY_TRANSFORMER, build_tokenizer(), tiny_text_encoder, seed)
    extras = {"guidance": {"mode": "random-range", "value": 1.0, "min": 1.0, "max": 5.0}}
    with _shared.one_thread():  # tiny matrices
        return _shared.save_tiny(FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed, extras=extras)


# ----------------------------------------------------------------------------- FLUX.2 [klein]
TINY_KLEIN_TRANSFORMER = {**TINY_TRANSFORMER, "guidance_embeds": False}
TINY_QWEN3 = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, max_position_embeddings=1024,
)
"""Width 16: three stacked layers make the transformer's 48-wide text input, as for ``tiny``."""
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
"""Qwen3's chat layout for text turns, with its ``enable_thinking=False`` empty think block (what
``Flux2KleinPipeline`` asks for)."""


def build_klein_tokenizer():
    """A byte-level Qwen2 tokenizer built in memory, with :data:`QWEN3_CHAT_TEMPLATE`."""
    return _qwen.byte_tokenizer(QWEN3_CHAT_TEMPLATE)


def tiny_qwen3(tokenizer):
    """A random tiny ``Qwen3ForCausalLM`` (:data:`TINY_QWEN3`) for ``tokenizer``'s vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        **TINY_QWEN3,
    )
    return Qwen3ForCausalLM(config).eval()


def build_tiny_klein_pipeline(path: str | os.PathLike, *, seed: int = 0, warm_start_steps: int = 20) -> Path:
    """Build the tiny FLUX.2 [klein] with weights drawn from ``seed``, warm-start its transformer
    for ``warm_start_steps`` (as the ``tiny-klein`` flavour: Qwen3 prompts, no guidance input) and
    save it at ``path`` as a ``Flux2KleinPipeline`` folder (``is_distilled`` false, its default)."""
    from diffusers import Flux2KleinPipeline

    from tune_models.families.flux2.family import FAMILY

    components = _tiny_components(TINY_KLEIN_TRANSFORMER, build_klein_tokenizer(), tiny_qwen3, seed)
    with _shared.one_thread():  # tiny matrices
        return _shared.save_tiny(
            FAMILY, path, components, warm_start_steps=warm_start_steps, seed=seed, flavour="tiny-klein",
            pipeline_class=Flux2KleinPipeline,
        )
