"""Hook specifications of tune-quant. Each docstring is the reference for plugin authors."""

from __future__ import annotations

from collections.abc import Callable


from tune_data.plugins import hookspec


@hookspec
def tune_register_quantisers(register: Callable[..., None]) -> None:
    """Register quantisation presets (``base_model_precision`` values).

    Call ``register(name, target, description=..., requires=...)``. ``target`` (or an import
    string) implements :class:`tune_quant.presets.Quantiser`: ``check()`` raises a clear error when
    the hardware or library is missing, ``apply(module)`` quantises a module in place. A preset
    that diffusers can load with (``quantize_via: pipeline``) also has
    ``pipeline_config(skeleton, *, dtype, exclude)`` returning the diffusers quantization config
    for the layers ``apply`` would take in ``skeleton`` (the model built on the meta device); one
    without it is refused with that setting, naming the ``quantize_via`` values that work.
    """
