"""Plain-data flavour facts, importable without torch (``tune plugins`` / ``tune check`` read them).

Each family keeps its facts in ``families/<name>/flavours.py`` built with :func:`flavour_facts`;
its ``family.py`` turns them into :class:`~tune_models.family.Flavour` objects and ``builtins``
shows them, so there is one source for both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def resolve_flavour_name(
    family: str,
    name: str,
    flavours: Iterable[str],
    aliases: Mapping[str, str] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> str:
    """The canonical flavour name for ``name``: itself, or the flavour an alias stands for.

    One function for the family class (a run) and ``tune check`` (registration data, no torch), so
    the two accept the same names and refuse them with the same words. Raises ``ValueError`` for a
    name tune does not carry, with the reason where SimpleTuner knows the name (``unavailable``)."""
    known = set(flavours)
    aliases = aliases or {}
    canonical = aliases.get(name, name)
    if canonical in known:
        return canonical
    if unavailable and name in unavailable:
        raise ValueError(f"model_flavour {name!r} of model_family {family!r} is not available in tune: {unavailable[name]}")
    choices = ", ".join(sorted(known))
    also = ", ".join(f"{alias} (= {target})" for alias, target in sorted(aliases.items()))
    raise ValueError(
        f"unknown model_flavour {name!r} for model_family {family!r}; choose one of: {choices}"
        + (f"; SimpleTuner's names are accepted too: {also}" if also else "")
    )


def default_flavour_note(
    family: str,
    default: str,
    simpletuner_default: str | None,
    aliases: Mapping[str, str] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> str | None:
    """What to tell a user whose config sets no ``model_flavour`` when SimpleTuner's default for
    the family is another checkpoint than tune's (``None`` when they agree): such a config, brought
    from SimpleTuner, would otherwise train another model without a word."""
    if not simpletuner_default or (aliases or {}).get(simpletuner_default, simpletuner_default) == default:
        return None
    theirs = (aliases or {}).get(simpletuner_default)
    if theirs:
        where = f"tune's {theirs!r}"
    elif simpletuner_default in (unavailable or {}):
        where = "not available in tune"
    else:
        where = f"tune's {simpletuner_default!r}"
    return (
        f"model_flavour is not set: tune trains {family}'s default flavour {default!r}, while SimpleTuner's "
        f"default is {simpletuner_default!r} ({where}); set model_flavour to choose"
    )
