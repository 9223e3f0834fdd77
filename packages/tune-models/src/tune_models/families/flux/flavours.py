"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`."""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

FLUX_FLAVOURS: dict[str, dict[str, Any]] = {
    "dev": flavour_facts(
        "black-forest-labs/FLUX.1-dev", 28, 3.5, None,
        "FLUX.1-dev (guidance-distilled: guidance is an input embedding, no CFG), auto shift",
    ),
    "schnell": flavour_facts(
        "black-forest-labs/FLUX.1-schnell", 4, 0.0, 1.0,
        "FLUX.1-schnell (4-step timestep-distilled, no guidance input), trained through Ostris' "
        "de-distillation adapter",
        assistant_lora="ostris/FLUX.1-schnell-training-adapter",
    ),
    "kontext": flavour_facts(
        "black-forest-labs/FLUX.1-Kontext-dev", 28, 2.5, None,
        "FLUX.1-Kontext-dev (reference-image editing: train with a conditioning dataset)",
    ),
    "krea": flavour_facts(
        "black-forest-labs/FLUX.1-Krea-dev", 28, 4.5, None,
        "FLUX.1 Krea [dev] (FLUX.1-dev architecture, guidance-distilled, aesthetic-photography weights; "
        "guidance 4.5 as its model card's example)",
    ),
    "tiny": flavour_facts(
        "tune-tiny:flux", 2, 3.5, None,
        "random tiny Flux with the real classes, built locally, for tests",
    ),
}
FLUX_UNAVAILABLE_FLAVOURS: dict[str, str] = {
    name: (
        "tune does not carry SimpleTuner's community FLUX.1 fine-tunes (fluxbooru, libreflux): they are "
        "de-distilled and validate with classifier-free guidance (libreflux also with attention masking), "
        "which the flux family's flavours do not do; train dev, krea, schnell or kontext"
    )
    for name in ("fluxbooru", "libreflux")
}
"""SimpleTuner's flux flavour names tune refuses, with the reason (see ``ModelFamily.unavailable_flavours``)."""
FLUX_LORA_TARGETS = ["all", "all+ffs", "context", "context+ffs", "mmdit", "tiny", "nano"]

FLUX_TRAINING_OPTIONS: dict[str, str] = {
    "flux_guidance_mode": "How the guidance input is set while training: constant (default) or random-range.",
    "flux_guidance_value": "The constant guidance value while training (default 1.0).",
    "flux_guidance_min": "Lowest guidance drawn with random-range (default 0.0).",
    "flux_guidance_max": "Highest guidance drawn with random-range (default 4.0).",
    "flux_attention_masked_training": "Hide the T5 padding tokens from the transformer while training (default false).",
}
"""The family's own config keys (passed to ``configure_training``), each with what it does:
registered as ``training_options`` so ``tune check`` and the config reference know them without
importing the family."""
FLUX_SIMPLETUNER_DEFAULT_FLAVOUR = "krea"
"""SimpleTuner's default flavour, not tune's (see ``ModelFamily.simpletuner_default_flavour``)."""
