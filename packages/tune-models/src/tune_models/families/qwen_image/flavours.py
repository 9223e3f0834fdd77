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
    "2512": flavour_facts(
        "Qwen/Qwen-Image-2512", 50, 4.0, None,
        "Qwen-Image-2512 (Qwen-Image retrained, the same architecture), true CFG 4 with a negative prompt",
    ),
    "edit-2511": flavour_facts(
        "Qwen/Qwen-Image-Edit-2511", 40, 4.0, None,
        "Qwen-Image-Edit-2511 (QwenImageEditPlusPipeline): one or more reference images per edit; its "
        "transformer config sets zero_cond_t (reference tokens see timestep 0); 40 steps as its model card's example",
    ),
    "tiny": flavour_facts(
        "tune-tiny:qwen-image", 2, 4.0, None,
        "random tiny Qwen-Image with the real classes, built locally, for tests",
    ),
}
QWEN_IMAGE_FLAVOUR_ALIASES: dict[str, str] = {
    "v1.0": "base",
    "v2.0": "2512",
    "edit-v1": "edit",
    "edit-v2": "edit-plus",
    "edit-v3": "edit-2511",
}
"""SimpleTuner's names for the flavours (see ``ModelFamily.flavour_aliases``)."""
QWEN_IMAGE_UNAVAILABLE_FLAVOURS: dict[str, str] = {
    "v2.1": "Qwen-Image 2.1 has its own transformer, a 64-channel VAE and a Qwen3-VL text encoder, which "
    "diffusers 0.42 does not provide; tune can train it once diffusers does",
    "edit-v2+": "SimpleTuner's variant of Qwen-Image-Edit-2509 trained with a zero conditioning timestep is "
    "not a tune flavour; train edit-plus (2509 as published) or edit-2511 (whose checkpoint sets zero_cond_t)",
}
"""SimpleTuner's qwen_image flavour names tune refuses, with the reason."""
QWEN_IMAGE_LORA_TARGETS = ["all", "attention"]
QWEN_IMAGE_SIMPLETUNER_DEFAULT_FLAVOUR = "v2.1"
"""SimpleTuner's default flavour, not tune's (see ``ModelFamily.simpletuner_default_flavour``)."""
