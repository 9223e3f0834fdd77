"""Hook specifications of tune-models. Each docstring is the reference for plugin authors."""

from __future__ import annotations

from collections.abc import Callable

from tune_data.plugins import hookspec


@hookspec
def tune_register_model_families(register: Callable[..., None]) -> None:
    """Register model families (Z-Image, Flux, ...).

    Call ``register(name, target, flavours=[...], description=...)`` once per family. ``name`` is
    the ``model_family`` users write (matched ignoring case and ``-``/``_``); ``target`` is a
    :class:`tune_models.family.ModelFamily` instance or an import string ``"module:attr"`` naming
    one, so listing families imports no model library. ``flavours`` is shown by ``tune plugins``.

    ``training_options`` (optional) maps each config key the family reads in
    ``configure_training`` (named after the family: ``flux_guidance_value``) to a one-line
    meaning. With it, a misspelt family key is an error suggesting the right one, a SimpleTuner
    family key the family does not implement gets the "accepted but ignored" warning, and the
    config reference lists the family's keys. Without it every key named after the family is
    passed to ``configure_training`` unchecked.
    """
