"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`.

Every published Sana checkpoint, 512 px and 1024 px alike, samples with Flow-DPM-Solver, 20 steps,
CFG 4.5 and a fixed flow shift of 3 (its scheduler config's ``flow_shift``; NVlabs' training configs
``Sana_600M_img512.yaml`` / ``Sana_1600M_img512.yaml`` set ``flow_shift: 3.0`` too). The 512 px
checkpoints differ in their training size only: a transformer ``sample_size`` of 16 latents (x 32 =
512 px, where the 1024 px ones have 32), so train and validate them at 512: their ``resolution``
fact, the default ``validation_resolution`` (``SANA_SAMPLE_SIZES`` lists every flavour's).
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
    "sana-1.6b-2048": flavour_facts(
        "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers", 20, 4.5, 3.0,
        "Sana 1.0 1.6B at 2048 px (bf16 weights; NVlabs' Sana_1600M_img2048_bf16.yaml: flow shift 3), CFG 4.5",
        resolution=2048,
    ),
    "sana-1.6b-512": flavour_facts(
        "Efficient-Large-Model/Sana_1600M_512px_diffusers", 20, 4.5, 3.0,
        "Sana 1.0 1.6B at 512 px, CFG 4.5, shift 3",
        resolution=512,
    ),
    "sana-1.6b-512-multiling": flavour_facts(
        "Efficient-Large-Model/Sana_1600M_512px_MultiLing_diffusers", 20, 4.5, 3.0,
        "Sana 1.0 1.6B at 512 px, multilingual prompts (English, Chinese, emoji), CFG 4.5, shift 3",
        resolution=512,
    ),
    "sana-600m-512": flavour_facts(
        "Efficient-Large-Model/Sana_600M_512px_diffusers", 20, 4.5, 3.0,
        "Sana 1.0 0.6B at 512 px (multilingual), CFG 4.5, shift 3",
        resolution=512,
    ),
    "tiny": flavour_facts(
        "tune-tiny:sana", 2, 4.5, 3.0,
        "random tiny Sana with the real classes, built locally, for tests",
    ),
}
SANA_FLAVOUR_ALIASES: dict[str, str] = {
    "sana1.5-4.8b-1024": "sana1.5-4.8b",
    "sana1.5-1.6b-1024": "sana1.5-1.6b",
    "sana1.0-1.6b-2048": "sana-1.6b-2048",
    "sana1.0-1.6b-1024": "sana-1.6b-1024",
    "sana1.0-600m-1024": "sana-600m-1024",
    "sana1.0-600m-512": "sana-600m-512",
}
"""SimpleTuner's names for the flavours (see ``ModelFamily.flavour_aliases``)."""
SANA_LORA_TARGETS = ["all", "all+ffs", "self-attention"]
SANA_SAMPLE_SIZES: dict[str, int] = {
    name: facts["resolution"] or 1024 for name, facts in SANA_FLAVOURS.items() if name != "tiny"
}
"""Pixels per side each flavour's checkpoint was trained at (its transformer's ``sample_size``
times the DC-AE's 32), from the flavours' ``resolution`` facts: the ``resolution`` and
``validation_resolution`` that suit it (the latter is the default). Loading a
checkpoint whose transformer says otherwise logs a warning (a 1024 px folder under a 512 px
flavour trains with the wrong expectations)."""

SANA_TRAINING_OPTIONS: dict[str, str] = {
    "sana_complex_human_instruction": "Lines put before every prompt (a list or one string); false or [] encodes prompts without them; null keeps the default.",
}
"""The family's own config keys (passed to ``configure_training``), each with what it does:
registered as ``training_options`` so ``tune check`` and the config reference know them without
importing the family."""
SANA_SIMPLETUNER_DEFAULT_FLAVOUR = "sana1.5-4.8b-1024"
"""SimpleTuner's default flavour, not tune's (see ``ModelFamily.simpletuner_default_flavour``)."""
