"""Qwen tokenizer pieces shared by the families whose text encoder is a Qwen model (Qwen-Image's
Qwen2.5-VL, Z-Image's Qwen3): a byte-level ``Qwen2Tokenizer`` built in memory for the tiny models.
transformers and tokenizers are imported inside the function.
"""

from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen's special tokens: ``<|endoftext|>`` (the pad token) and the chat markers."""


def byte_tokenizer(chat_template: str | None = None) -> Any:
    """A Qwen2 tokenizer built in memory: every byte is a token, plus Qwen's special tokens, no
    merges (the real vocabulary is a download; the tiny models only need the same class and
    special tokens). ``chat_template`` is set when the family's pipeline applies one."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
