"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

FLUX2_FLAVOURS: dict[str, dict[str, Any]] = {
    "dev": flavour_facts(
        "black-forest-labs/FLUX.2-dev", 50, 4.0, None,
        "FLUX.2-dev (32B, Mistral-3 text encoder, guidance-distilled: guidance is an input embedding), auto shift",
    ),
    "tiny": flavour_facts(
        "tune-tiny:flux2", 2, 4.0, None,
        "random tiny FLUX.2 with the real classes, built locally, for tests",
    ),
}
FLUX2_LORA_TARGETS = ["all", "all+ffs", "attention", "full"]

FLUX2_TRAINING_OPTIONS: dict[str, str] = {
    "flux2_guidance_mode": "How the guidance input is set while training: constant (default) or random-range.",
    "flux2_guidance_value": "The constant guidance value while training (default 1.0).",
    "flux2_guidance_min": "Lowest guidance drawn with random-range (default 1.0).",
    "flux2_guidance_max": "Highest guidance drawn with random-range (default 4.0).",
}
"""The family's own config keys (passed to ``configure_training``), each with what it does:
registered as ``training_options`` so ``tune check`` and the config reference know them without
importing the family."""
