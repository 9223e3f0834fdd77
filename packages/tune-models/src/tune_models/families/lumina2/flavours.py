"""Flavours of this family as plain data (no torch import): see :mod:`tune_models.flavour_facts`.

The ``base`` flavour's fixed shift of 6 is the published checkpoint's own: see
:data:`PUBLISHED_SCHEDULER`.
"""

from __future__ import annotations

from typing import Any

from tune_models.flavour_facts import flavour_facts

LUMINA2_FLAVOURS: dict[str, dict[str, Any]] = {
    "base": flavour_facts(
        "Alpha-VLLM/Lumina-Image-2.0", 50, 4.0, 6.0,
        "Lumina Image 2.0 (2.6B unified single-stream DiT, Gemma-2-2B text encoder, Flux VAE), CFG 4 with a "
        "negative prompt, shift 6",
    ),
    "neta-lumina": flavour_facts(
        "terminusresearch/neta-lumina-v1", 50, 4.0, 6.0,
        "Neta Lumina (an anime fine-tune of Lumina Image 2.0, the same architecture; this diffusers copy is "
        "the one SimpleTuner's neta-lumina flavour loads), the base flavour's sampling settings",
    ),
    "tiny": flavour_facts(
        "tune-tiny:lumina2", 2, 4.0, 6.0,
        "random tiny Lumina 2 with the real classes, built locally, for tests",
    ),
}
LUMINA2_FLAVOUR_ALIASES: dict[str, str] = {"2.0": "base"}
"""SimpleTuner's name for the base flavour (see ``ModelFamily.flavour_aliases``)."""
LUMINA2_LORA_TARGETS = ["all", "attention"]

PUBLISHED_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 6.0,
    "use_dynamic_shifting": False,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
"""The flow-matching settings of ``Alpha-VLLM/Lumina-Image-2.0``'s ``scheduler/scheduler_config.json``
(``FlowMatchEulerDiscreteScheduler``, written by diffusers 0.33.0.dev0). The hub cannot be reached
from here, so these were read from two independent transcriptions: ai-toolkit's
``toolkit/sampler.py`` (``lumina2_config``, a verbatim copy of the file) and ComfyUI's
``supported_models.Lumina2`` (``sampling_settings`` shift 6.0). Because ``use_dynamic_shifting`` is
false, ``Lumina2Pipeline`` ignores the ``mu`` it computes and samples every size at shift 6; the
``base`` flavour trains at that same fixed shift (the tiny model's scheduler is built from this
dict, and a test checks training and the pipeline agree)."""
