"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

LUMINA2_FLAVOURS: dict[str, dict[str, Any]] = {
    "base": flavour_facts(
        "Alpha-VLLM/Lumina-Image-2.0", 50, 4.0, 6.0,
        "Lumina Image 2.0 (2.6B unified single-stream DiT, Gemma-2-2B text encoder, Flux VAE), CFG 4 with a "
        "negative prompt, shift 6",
    ),
    "tiny": flavour_facts(
        "tune-tiny:lumina2", 2, 4.0, 6.0,
        "random tiny Lumina 2 with the real classes, built locally, for tests",
    ),
}
LUMINA2_LORA_TARGETS = ["all", "attention"]
