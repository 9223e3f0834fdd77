"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`.

Every published 1024 px Sana checkpoint samples with Flow-DPM-Solver, 20 steps, CFG 4.5 and a
fixed flow shift of 3 (its scheduler config's ``flow_shift``).
"""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

SANA_FLAVOURS: dict[str, dict[str, Any]] = {
    "sana1.5-1.6b": flavour_facts(
        "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", 20, 4.5, 3.0,
        "SANA 1.5 1.6B at 1024 px (linear DiT, Gemma-2-2B text encoder, 32x DC-AE), CFG 4.5, shift 3",
    ),
    "sana1.5-4.8b": flavour_facts(
        "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers", 20, 4.5, 3.0,
        "SANA 1.5 4.8B at 1024 px, CFG 4.5, shift 3",
    ),
    "sana-1.6b-1024": flavour_facts(
        "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", 20, 4.5, 3.0,
        "Sana 1.0 1.6B at 1024 px (bf16 weights), CFG 4.5, shift 3",
    ),
    "sana-600m-1024": flavour_facts(
        "Efficient-Large-Model/Sana_600M_1024px_diffusers", 20, 4.5, 3.0,
        "Sana 1.0 0.6B at 1024 px (fp16 weights), CFG 4.5, shift 3",
    ),
    "tiny": flavour_facts(
        "tune-tiny:sana", 2, 4.5, 3.0,
        "random tiny Sana with the real classes, built locally, for tests",
    ),
}
SANA_LORA_TARGETS = ["all", "all+ffs", "self-attention"]
