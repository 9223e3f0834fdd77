"""tune-quant: quantisation presets applied to an already-loaded module.

Importing this package imports no torch; :func:`quantise` imports what the preset needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tune_quant.blockwise import quantise_blockwise
    from tune_quant.presets import QuantisationUnavailable, Quantiser, quantise

__all__ = ["QuantisationUnavailable", "Quantiser", "quantise", "quantise_blockwise"]


def __getattr__(name: str) -> Any:
    if name == "quantise_blockwise":
        from tune_quant.blockwise import quantise_blockwise

        return quantise_blockwise
    if name in __all__:
        from tune_quant import presets

        return getattr(presets, name)
    raise AttributeError(f"module 'tune_quant' has no attribute {name!r}")
