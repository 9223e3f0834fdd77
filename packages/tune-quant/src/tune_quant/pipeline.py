"""Quantising while diffusers loads (``quantize_via: pipeline``): a preset, or the user's
``quantization_config``, as a diffusers ``quantization_config``.

Loading with a quantization config quantises the weights inside diffusers' loader (it does not
lower the host-memory peak: docs/memory.md has the measurement). A preset chooses its layers by name
(:func:`tune_quant.presets.selected_linears`) and diffusers needs those names before any weight
exists, so a preset's ``pipeline_config`` gets the model built empty (on the meta device) to
choose from. A preset without ``pipeline_config`` has no pipeline form; the error says which
``quantize_via`` values work instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tune_quant.presets import QuantisationUnavailable

if TYPE_CHECKING:
    import torch

#: How to get diffusers when only tune-quant is installed.
INSTALL = 'pip install "tune-quant[pipeline]"'


def diffusers_module() -> Any:
    """diffusers, imported here because only quantising while diffusers loads needs it (tune-quant
    alone quantises a module in memory); its absence names the extra to install."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"quantize_via 'pipeline' needs diffusers, which is not installed: {INSTALL}") from exc
    return diffusers


#: ``quantization_config`` component names that mean the denoiser (the model tune trains).
DENOISER_KEYS = ("transformer", "unet", "default")
#: ``quant_method`` values and the diffusers config class each names.
BACKENDS = {"torchao": "TorchAoConfig", "bitsandbytes": "BitsAndBytesConfig", "quanto": "QuantoConfig"}
#: Keys that give a config's backend away when it names no ``quant_method``.
_BACKEND_KEYS = (
    ("bitsandbytes", ("load_in_4bit", "load_in_8bit")),
    ("torchao", ("quant_type",)),
    ("quanto", ("weights_dtype",)),
)
_OTHER_WAYS = "use quantize_via cpu or accelerator, which quantise the loaded model with any preset"


def preset_config(
    preset: str, *, device: str, dtype: torch.dtype, exclude: tuple[str, ...] = ()
) -> Callable[[torch.nn.Module], Any]:
    """A function of the empty model that returns ``preset``'s diffusers quantization config.

    Checks now, before any weight loads, that the preset exists, has a pipeline form and can run
    on ``device``; raises :class:`QuantisationUnavailable` naming the preset otherwise."""
    from tune_quant.registry import quantisers

    missing = no_pipeline_form(preset)
    if missing:
        raise QuantisationUnavailable(missing)
    quantiser = quantisers.load(preset)
    make = quantiser.pipeline_config
    quantiser.check(str(device))
    probe = getattr(quantiser, "pipeline_problem", None)
    message = probe(str(device)) if probe is not None else None
    if message:
        raise QuantisationUnavailable(f"{message}; {_OTHER_WAYS}")
    return lambda skeleton: make(skeleton, dtype=dtype, exclude=exclude)


def no_pipeline_form(preset: str) -> str | None:
    """The refusal for a registered ``preset`` without ``pipeline_config``, else ``None``."""
    from tune_quant.registry import quantisers

    if hasattr(quantisers.load(preset), "pipeline_config"):
        return None
    return (
        f"base_model_precision {preset!r} has no quantize_via 'pipeline' form (diffusers cannot "
        f"load with it); {_OTHER_WAYS}"
    )


def denoiser_entry(components: Any, *, key: str = "quantization_config") -> dict[str, Any] | None:
    """The denoiser's entry of a per-component ``quantization_config`` (``transformer``, ``unet`` or
    ``default``), checked; ``None`` when it has none. Raises ``ValueError`` naming ``key`` for
    anything tune would otherwise ignore: another component, or a config whose backend is unclear."""
    if not isinstance(components, Mapping):
        raise ValueError(
            f"{key} must be a JSON object mapping component names to diffusers quantization configs "
            f"(e.g. {{\"transformer\": {{\"load_in_4bit\": true}}}}), got {components!r}"
        )
    others = sorted(set(components) - set(DENOISER_KEYS))
    if others:
        raise ValueError(
            f"{key} names {', '.join(others)}: tune quantises only the denoiser through it "
            f"({', '.join(DENOISER_KEYS)}); quantise text encoders with text_encoder_N_precision"
        )
    named = [name for name in DENOISER_KEYS if name in components]
    if len(named) > 1:
        raise ValueError(f"{key} gives the denoiser twice ({', '.join(named)}); keep one")
    if not named:
        return None
    entry = components[named[0]]
    if not isinstance(entry, Mapping):
        raise ValueError(f"{key}[{named[0]!r}] must be a JSON object (a diffusers quantization config), got {entry!r}")
    backend_of(entry, where=f"{key}[{named[0]!r}]")
    return dict(entry)


def backend_of(entry: Mapping[str, Any], *, where: str = "quantization_config") -> str:
    """``torchao``, ``bitsandbytes`` or ``quanto``: the entry's ``quant_method``, else read off its keys."""
    method = entry.get("quant_method")
    if method is not None:
        if method not in BACKENDS:
            raise ValueError(f"{where}: quant_method must be one of {', '.join(BACKENDS)}, got {method!r}")
        return method
    found = [backend for backend, keys in _BACKEND_KEYS if any(k in entry for k in keys)]
    if len(found) != 1:
        raise ValueError(
            f"{where}: cannot tell which diffusers quantization backend this is ({dict(entry)!r}); "
            f"add quant_method ({', '.join(BACKENDS)})"
        )
    return found[0]


def config_from_entry(entry: Mapping[str, Any], *, where: str = "quantization_config") -> Any:
    """The diffusers quantization config an entry of ``quantization_config`` describes.

    torchao's ``quant_type`` may name a ``torchao.quantization`` config class
    (``Int8WeightOnlyConfig``, with ``quant_type_kwargs``) or be torchao's saved form
    (``{"default": {"_type": ..., "_data": ...}}``, as a quantised checkpoint's config holds it)."""
    diffusers = diffusers_module()
    backend = backend_of(entry, where=where)
    fields = {k: v for k, v in entry.items() if k != "quant_method"}
    config_class = getattr(diffusers, BACKENDS[backend])
    if backend == "torchao" and isinstance(fields.get("quant_type"), str):
        from torchao import quantization

        name = fields.pop("quant_type")
        kwargs = fields.pop("quant_type_kwargs", {}) or {}
        make = getattr(quantization, name, None)
        if make is None or not isinstance(make, type):
            raise ValueError(
                f"{where}: quant_type {name!r} is not a torchao.quantization config class "
                "(e.g. Int8WeightOnlyConfig, Float8WeightOnlyConfig)"
            )
        return config_class(make(**kwargs), **fields)
    try:
        return config_class.from_dict({**fields, "quant_method": backend})
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{where}: diffusers' {BACKENDS[backend]} does not accept {dict(entry)!r}: {exc}") from exc
