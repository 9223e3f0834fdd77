"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

_OSTRIS = "ostris/zimage_turbo_training_adapter"

ZIMAGE_FLAVOURS: dict[str, dict[str, Any]] = {
    "turbo": flavour_facts(
        "Tongyi-MAI/Z-Image-Turbo", 8, 0.0, 3.0,
        "Z-Image-Turbo (8-step distilled, no CFG), trained through Ostris' v1 de-distillation adapter",
        assistant_lora=_OSTRIS, assistant_lora_weight_name="zimage_turbo_training_adapter_v1.safetensors",
    ),
    "turbo-ostris-v2": flavour_facts(
        "Tongyi-MAI/Z-Image-Turbo", 8, 0.0, 3.0,
        "Z-Image-Turbo trained through Ostris' v2 de-distillation adapter",
        assistant_lora=_OSTRIS, assistant_lora_weight_name="zimage_turbo_training_adapter_v2.safetensors",
    ),
    "base": flavour_facts(
        "Tongyi-MAI/Z-Image", 50, 4.0, None,
        "Z-Image base (undistilled, 28-50 steps with classifier-free guidance)",
    ),
    "tiny": flavour_facts(
        "tune-tiny:z-image", 2, 0.0, 3.0,
        "random tiny Z-Image with the real classes, built locally, for tests",
    ),
}
ZIMAGE_UNAVAILABLE_FLAVOURS: dict[str, str] = {
    "ostris-de-turbo": "tune has no flavour for Ostris' de-distilled Z-Image-Turbo transformer; set "
    "pretrained_transformer_model_name_or_path: ostris/Z-Image-De-Turbo with model_flavour base (no "
    "adapter, validation with CFG) and choose validation_num_inference_steps and validation_guidance for it",
}
"""SimpleTuner's z-image flavour names tune refuses, with the reason."""
ZIMAGE_SIMPLETUNER_DEFAULT_FLAVOUR = "turbo-ostris-v2"
"""SimpleTuner's default flavour, not tune's (see ``ModelFamily.simpletuner_default_flavour``)."""
