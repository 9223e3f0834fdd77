"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

# SDXL is not a flow model: ``shift`` is None and unused.
SDXL_FLAVOURS: dict[str, dict[str, Any]] = {
    "base": flavour_facts(
        "stabilityai/stable-diffusion-xl-base-1.0", 30, 5.0, None,
        "Stable Diffusion XL 1.0 base (2.6B UNet, CLIP-L + OpenCLIP-G, epsilon prediction)",
    ),
    "refiner": flavour_facts(
        "stabilityai/stable-diffusion-xl-refiner-1.0", 30, 5.0, None,
        "Stable Diffusion XL 1.0 refiner (UNet, OpenCLIP-G only, aesthetic-score conditioning); "
        "pair with refiner_training",
    ),
    "tiny": flavour_facts(
        "tune-tiny:sdxl", 4, 2.0, None,
        "random tiny SDXL with the real classes, built locally, for tests",
    ),
}
SDXL_FLAVOUR_ALIASES: dict[str, str] = {"base-1.0": "base", "refiner-1.0": "refiner"}
"""SimpleTuner's names for the flavours (see ``ModelFamily.flavour_aliases``)."""
SDXL_UNAVAILABLE_FLAVOURS: dict[str, str] = {
    name: (
        "SDXL 0.9 was a gated research preview, replaced by 1.0; tune's flavours are the 1.0 checkpoints "
        f"(base, refiner). To train a 0.9 folder you have, set pretrained_model_name_or_path to it with "
        f"model_flavour {kind}"
    )
    for name, kind in (("base-0.9", "base"), ("refiner-0.9", "refiner"))
}
SDXL_LORA_TARGETS = ["all", "all+ffs"]

SDXL_TRAINING_OPTIONS: dict[str, str] = {
    "sdxl_aesthetic_score": "Refiner: aesthetic score of validation, and of training where a dataset sets no data_aesthetic_score (default 7.0).",
    "sdxl_negative_aesthetic_score": "Refiner: the negative aesthetic score of validation (default 2.5).",
    "sdxl_refiner_strength": "Refiner: img2img strength of validation, in (0, 1] (default 0.3).",
}
"""The family's own config keys (passed to ``configure_training``), each with what it does:
registered as ``training_options`` so ``tune check`` and the config reference know them without
importing the family."""
