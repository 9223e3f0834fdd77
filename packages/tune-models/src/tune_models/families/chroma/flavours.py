"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

CHROMA_FLAVOURS: dict[str, dict[str, Any]] = {
    "base": flavour_facts(
        "lodestones/Chroma1-Base", 40, 4.0, None,
        "Chroma1-Base (8.9B Flux-derived, T5 only, real CFG), the checkpoint meant for fine-tuning",
    ),
    "hd": flavour_facts(
        "lodestones/Chroma1-HD", 40, 4.0, None,
        "Chroma1-HD (Chroma1-Base further trained at 1024 px)",
    ),
    "tiny": flavour_facts(
        "tune-tiny:chroma", 2, 2.0, None,
        "random tiny Chroma with the real classes, built locally, for tests",
    ),
}
CHROMA_UNAVAILABLE_FLAVOURS: dict[str, str] = {
    "flash": "tune has no flavour for Chroma1-Flash (a few-step distilled Chroma whose sampling settings tune "
    "cannot check); train base or hd, or set pretrained_model_name_or_path: lodestones/Chroma1-Flash with "
    "model_flavour hd and your own validation_num_inference_steps and validation_guidance",
}
"""SimpleTuner's chroma flavour names tune refuses, with the reason."""
