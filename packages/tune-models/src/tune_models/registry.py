"""tune-models's registries, filled by plugins (tune's built-ins and third parties alike)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tune_data.plugins import Registry

from tune_models import hookspecs

_BUILTINS = ("tune_models", "tune_models.builtins")

model_families = Registry("model family", "tune_register_model_families", hookspecs, _BUILTINS)


def families_where(predicate: Callable[[Any], bool]) -> list[str]:
    """Names of the registered families for which ``predicate(family)`` holds, sorted: what a
    refusal lists ("families that support it: ..."). Loads each family; one that fails to load
    is left out, so a broken plugin never hides the error being reported."""
    from tune_models.family import get_family

    names = []
    for name in sorted(model_families.names()):
        try:
            family = get_family(name)
        except Exception:  # noqa: BLE001 - see the docstring
            continue
        if predicate(family):
            names.append(family.name)
    return names
