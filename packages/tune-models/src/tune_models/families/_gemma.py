"""Gemma-2 pieces shared by the families whose text encoder is Gemma-2 (Sana, Lumina 2).

Both cache each prompt at its real length and pad a batch with a mask (:func:`pad_prompts`); the
tiny-model parts are a Gemma tokenizer built in memory and a random Gemma-2 encoder for its
vocabulary. transformers is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import torch

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
"""Gemma's special tokens, at Gemma's ids (pad 0, eos 1, bos 2, unk 3)."""

TINY_GEMMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=2048,
    sliding_window=4096,
)
"""A 2-layer, width-32 Gemma-2 (two layers, so Lumina 2's *second to last* hidden state is not the
embedding output). Gemma-2's real sliding window (4096) is wider than any prompt here."""


def gemma_tokenizer() -> Any:
    """A ``GemmaTokenizer`` built in memory: the space marker ``▁``, printable ASCII characters and
    Gemma's 256 byte-fallback tokens, no merges; it adds ``<bos>`` like the real one and pads on
    the right, as both Gemma pipelines set."""
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in "\u2581" + "".join(chr(i) for i in range(33, 127)):
        vocab.setdefault(char, len(vocab))
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, padding_side="right")


def tiny_gemma2(tokenizer: Any) -> Any:
    """A random :data:`TINY_GEMMA` ``Gemma2Model`` (the class both pipelines load) for ``tokenizer``."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_GEMMA,
    )
    return Gemma2Model(config).eval()


def pad_prompts(
    items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype, *, mask_key: str
) -> dict[str, Any]:
    """Batch per-prompt ``prompt_embeds`` ``[n_i, d]`` (and ``mask_key`` ``[n_i]``) of different
    lengths: zero embeddings and mask 0 after each prompt, up to the longest."""
    if not items:
        raise ValueError("collate_prompts needs at least one prompt")
    length = max(i["prompt_embeds"].shape[0] for i in items)
    embeds, masks = [], []
    for item in items:
        e = item["prompt_embeds"]
        m = item.get(mask_key, torch.ones(e.shape[0], dtype=torch.int64))
        pad = length - e.shape[0]
        embeds.append(torch.cat([e, e.new_zeros(pad, e.shape[1])]))
        masks.append(torch.cat([m.to(torch.int64), torch.zeros(pad, dtype=torch.int64)]))
    return {"prompt_embeds": torch.stack(embeds).to(device=device, dtype=dtype), mask_key: torch.stack(masks).to(device=device)}
