"""Plain-data flavour facts, importable without torch (``tune plugins`` / ``tune check`` read them).

Each family keeps its facts in ``families/<name>/flavours.py`` built with :func:`flavour_facts`;
its ``family.py`` turns them into :class:`~tune_models.family.Flavour` objects and ``builtins``
shows them, so there is one source for both.
"""

from __future__ import annotations

from typing import Any


def flavour_facts(pretrained: str, steps: int, guidance: float, shift: float | None, description: str, **extra: Any) -> dict[str, Any]:
    facts = {
        "pretrained": pretrained,
        "inference_steps": steps,
        "guidance": guidance,
        "shift": shift,
        "assistant_lora": None,
        "assistant_lora_weight_name": None,
        "description": description,
        "resolution": None,
    }
    facts.update(extra)
    return facts
