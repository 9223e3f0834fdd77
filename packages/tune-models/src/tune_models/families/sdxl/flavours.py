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
SDXL_LORA_TARGETS = ["all", "all+ffs"]
