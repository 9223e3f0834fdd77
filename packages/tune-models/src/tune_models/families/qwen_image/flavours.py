"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

QWEN_IMAGE_FLAVOURS: dict[str, dict[str, Any]] = {
    "base": flavour_facts(
        "Qwen/Qwen-Image", 50, 4.0, None,
        "Qwen-Image (20B MMDiT, Qwen2.5-VL-7B text encoder), true CFG 4 with a negative prompt, auto shift",
    ),
    "edit": flavour_facts(
        "Qwen/Qwen-Image-Edit", 50, 4.0, None,
        "Qwen-Image-Edit: one reference image per edit (conditioning_data), seen by the VL text encoder and the transformer",
    ),
    "edit-plus": flavour_facts(
        "Qwen/Qwen-Image-Edit-2509", 50, 4.0, None,
        "Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline): one or more reference images per edit",
    ),
    "tiny": flavour_facts(
        "tune-tiny:qwen-image", 2, 4.0, None,
        "random tiny Qwen-Image with the real classes, built locally, for tests",
    ),
}
QWEN_IMAGE_LORA_TARGETS = ["all", "attention"]
