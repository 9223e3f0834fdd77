"""Read a SimpleTuner ``config.json`` (and its ``multidatabackend.json``) into typed configs.

A SimpleTuner user should be able to point tune at the files they already have. So this module
accepts what SimpleTuner accepts and is strict about everything else:

- Keys may carry a leading ``--`` (SimpleTuner passes them to argparse); values may be the strings
  SimpleTuner users write (``"true"``, ``"1e-4"``, ``"16"``, ``"none"``) and are coerced to the
  field's type. A value that cannot be read is an error naming the key and the value.
- Other spellings of a field (``checkpointing_steps``, ``adam_beta1``, ``flux_lora_target``, ...)
  map onto it; see :data:`ALIASES` and :func:`_family_lora_target`.
- Options SimpleTuner has and tune does not implement yet are accepted, collected in
  ``LoadedConfig.ignored`` and reported in a single warning; a training run should not fail
  because a config carries a knob we do not turn. Dataset-level options written in config.json
  (``crop``, ``caption_strategy``, ...) are passed to every dataset as defaults, as SimpleTuner does.
- Any other key is a typo until proven otherwise: an error with the closest known name.

Paths: ``data_backend_config`` and ``user_prompt_library`` are looked up beside config.json, then
in the directory given as ``source``, then in the working directory (SimpleTuner's only choice,
since it runs from its checkout). Relative dataset paths (``instance_data_dir``, ``cache_dir_vae``,
``cache_dir``) are relative to the working directory as in SimpleTuner; when that does not exist
but the path does exist beside config.json (or under the ``source`` directory), that one is used.
``output_dir`` and ``cache_dir`` stay relative to the working directory.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import attrs
from tune_data.config import INHERITABLE_KEYS, DatasetConfig, DatasetConfigError, load_dataset_configs
from tune_train.config import ConfigError, TrainConfig
from tune_train.held_out import check_eval_datasets

__all__ = ["ALIASES", "ConfigError", "LoadedConfig", "ignored_options", "load_config", "simpletuner_options"]

logger = logging.getLogger(__name__)

#: SimpleTuner's other names for TrainConfig fields.
ALIASES: dict[str, str] = {
    "checkpointing_steps": "checkpoint_step_interval",
    "validation_steps": "validation_step_interval",
    "adam_beta1": "optimizer_beta1",
    "adam_beta2": "optimizer_beta2",
    # UNet families keep their denoiser in ``unet/``; SimpleTuner names its location so.
    "pretrained_unet_model_name_or_path": "pretrained_transformer_model_name_or_path",
    "pretrained_unet_subfolder": "pretrained_transformer_subfolder",
}

#: Settings the trainer passes to every dataset that does not set them itself.
TRAIN_DATASET_DEFAULTS = (
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "aspect_bucket_alignment",
    "aspect_bucket_rounding",
)

#: ``<family>_lora_target``; ``slider_lora_target`` is a different SimpleTuner option (sliders).
_FAMILY_LORA_TARGET = re.compile(r"^(?P<family>[a-z0-9_]+?)_lora_target$")
_NOT_FAMILIES = {"slider"}

#: Optional fields where the word "none" is a value, not "unset".
_NONE_IS_A_VALUE = {"pretrained_transformer_subfolder"}

#: SimpleTuner trackers tune does not implement yet: they degrade (with a warning) instead of failing,
#: since losing a dashboard does not change what is trained. Empty now: every tracker SimpleTuner
#: accepts (tensorboard, wandb, comet_ml, all) is implemented.
_TRACKER_FALLBACK: dict[str, str] = {}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@attrs.frozen
class LoadedConfig:
    """A config ready to train: the trainer settings, the datasets, and what was not used."""

    train: TrainConfig
    """The typed trainer settings."""
    datasets: list[DatasetConfig]
    """Enabled datasets from ``multidatabackend.json``, paths resolved."""
    ignored: tuple[str, ...] = ()
    """SimpleTuner options present in the config that tune accepts but does not implement yet."""
    config_path: Path | None = None
    """The config.json that was read (``None`` for a dict)."""
    warnings: tuple[str, ...] = ()
    """Everything the user should know that is not an error (also logged)."""


@cache
def simpletuner_options() -> frozenset[str]:
    """Every SimpleTuner option name (the packaged ``simpletuner_options.txt``)."""
    text = importlib.resources.files("tune").joinpath("simpletuner_options.txt").read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def _fields() -> dict[str, attrs.Attribute]:
    return {field.name: field for field in attrs.fields(TrainConfig)}


def dataset_default_options() -> frozenset[str]:
    """SimpleTuner options that, in config.json, set a default for every dataset."""
    return frozenset(INHERITABLE_KEYS) & (simpletuner_options() - set(_fields()))


def all_family_training_options() -> dict[str, dict[str, str]]:
    """Every registered family's declared options: family name -> {key: meaning}."""
    from tune_models.registry import model_families

    return {
        entry.name: dict(entry.info["training_options"])
        for entry in model_families
        if entry.info.get("training_options")
    }


def ignored_options() -> list[str]:
    """SimpleTuner options tune accepts but ignores (for the reference page)."""
    used = set(_fields()) | set(ALIASES) | dataset_default_options()
    used |= {key for options in all_family_training_options().values() for key in options}
    return sorted(name for name in simpletuner_options() - used if not _FAMILY_LORA_TARGET.match(name))


# -- finding the file --------------------------------------------------------------------------------


def _candidates(directory: Path, env: str | None) -> list[Path]:
    if env and env != "default":
        return [directory / "config" / env / "config.json", directory / env / "config.json"]
    return [directory / "config.json", directory / "config" / "config.json"]


def find_config(source: str | os.PathLike[str], env: str | None = None) -> Path:
    """The config.json ``source`` names: the file itself or the first match under a directory.

    Under a directory: ``config.json`` then ``config/config.json``; with an environment name (the
    ``env`` argument, else the ``ENV`` variable, SimpleTuner's switch) ``config/<env>/config.json``
    then ``<env>/config.json``. ``default`` is SimpleTuner's name for "no environment".
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        env = env if env is not None else os.environ.get("ENV")
        looked = _candidates(path, env)
        for candidate in looked:
            if candidate.is_file():
                return candidate
    else:
        looked = [path]
    where = "\n  ".join(str(p) for p in looked)
    raise ConfigError(f"no config file found; looked in:\n  {where}")


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def _locate(key: str, value: str, bases: list[Path]) -> Path:
    """The first existing ``base / value``; absolute paths are taken as they are."""
    path = Path(value).expanduser()
    looked = [path] if path.is_absolute() else [base / path for base in bases]
    for candidate in looked:
        if candidate.exists():
            return candidate.resolve()
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    raise ConfigError(f"{key} {value!r} not found; looked in: {where}")


# -- values --------------------------------------------------------------------------------------------


@cache
def _field_types() -> dict[str, tuple[type, bool]]:
    """``{field: (base type, optional)}`` from TrainConfig's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        optional = type(None) in args
        base = next(arg for arg in args if arg is not type(None))
        out[name] = (typing.get_origin(base) or base, optional)
    return out


def _is_int_list(field: str) -> bool:
    """Whether TrainConfig's ``field`` is a ``tuple[int, ...]`` (block indices, ...)."""
    hint = typing.get_type_hints(TrainConfig)[field]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return any(typing.get_origin(a) is tuple and typing.get_args(a)[:1] == (int,) for a in args)


def _accepts_str(field: str) -> bool:
    """Whether TrainConfig's ``field`` also takes a string (``dict[str, Any] | str | None``)."""
    hint = typing.get_type_hints(TrainConfig)[field]
    return str in (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))


def _coerce(key: str, field: str, value: Any) -> Any:
    """``value`` as written for ``key`` in config.json, converted to ``field``'s type."""
    base, optional = _field_types()[field]
    if isinstance(value, str) and optional and field not in _NONE_IS_A_VALUE:
        if value.strip().lower() in {"", "none", "null"}:
            return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty (null); remove it to use the default")
    kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(base, "a string")

    def bad() -> ConfigError:
        return ConfigError(f"{key} must be {kind}, got {value!r}")

    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = str(value).strip().lower() if isinstance(value, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise bad()
    if base in (int, float):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value_num = float(value.strip())
            except ValueError:
                raise bad() from None
        elif isinstance(value, (int, float)):
            value_num = value
        else:
            raise bad()
        if base is int:
            if value_num != int(value_num):
                raise bad()
            return int(value_num)
        return float(value_num)
    if base is dict:  # a JSON object (tread_config), or its text as SimpleTuner's command line passes it
        kind = "a JSON object"
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad() from None
        if isinstance(value, dict):
            return value
        if isinstance(value, str) and _accepts_str(field):  # or the path of a JSON file (quantization_config)
            return value
        raise bad()
    if base is tuple:  # a list of names: JSON list, or a JSON-list string, or comma-separated
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise bad() from None
            elif text.startswith("re:"):  # one regular expression (peft_lora_target_modules); commas are its own
                value = [text]
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        if _is_int_list(field):  # e.g. validation_guidance_skip_layers: [7, 8, 9]
            if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                return tuple(value)
            kind = "a list of whole numbers"
            raise bad()
        kind = "a list of names"
        raise bad()
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. validation_resolution: 1024
    raise bad()


def _family_lora_target(name: str) -> str | None:
    match = _FAMILY_LORA_TARGET.match(name)
    if match and match.group("family") not in _NOT_FAMILIES:
        return match.group("family")
    return None


def _plain_value(value: Any) -> Any:
    """SimpleTuner-style strings as Python values: ``"true"`` → True, ``"3.5"`` → 3.5."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _same_family(a: str, b: str) -> bool:
    return a.replace("-", "").replace("_", "").lower() == b.replace("-", "").replace("_", "").lower()


def _family_prefix(name: str, family: str) -> bool:
    """Whether option ``name`` is named after ``family`` (``flux2_guidance_value``, ``qwen_image_x``)."""
    words = name.split("_")
    return any(_same_family("_".join(words[:n]), family) for n in range(1, len(words)))


def family_training_options(family: str) -> dict[str, str] | None:
    """The config keys model family ``family`` declared at registration (key -> meaning), or
    None when it declared none or is not registered (its keys then pass unchecked)."""
    from tune_data.plugins import PluginError
    from tune_models.registry import model_families

    try:
        options = model_families.get(family).info.get("training_options")
    except PluginError:
        return None
    return dict(options) if options is not None else None


def _unknown_family_option_error(key: str, name: str, family: str, declared: Mapping[str, str], where: str) -> str:
    close = difflib.get_close_matches(name, list(declared), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = ", ".join(sorted(declared)) or "none"
    return f"unknown config key {key!r} in {where}: model_family {family!r} has no such option; {hint}its options: {known}"


def _unknown_key_error(key: str, where: str) -> str:
    known = sorted(set(_fields()) | set(ALIASES) | simpletuner_options())
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see docs/config-reference.md for the keys"
    return f"unknown config key {key!r} in {where}; {hint}"


# -- the loader ------------------------------------------------------------------------------------


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], *, env: str | None = None) -> LoadedConfig:
    """Read ``source`` (a config.json, a directory holding one, or a dict) into a LoadedConfig.

    ``env`` (default: the ``ENV`` variable) picks ``config/<env>/config.json`` under a directory.
    A dict may give ``data_backend_config`` as the list of dataset entries itself. Raises
    :class:`ConfigError` (a ``ValueError``) naming the key for anything it cannot accept.
    """
    config_path: Path | None = None
    bases: list[Path] = []
    if isinstance(source, Mapping):
        raw = dict(source)
        where = "the config"
    else:
        config_path = find_config(source, env).resolve()
        raw = _read_json(config_path)
        where = config_path.name
        bases.append(config_path.parent)
        if Path(source).is_dir():
            bases.append(Path(source).resolve())
        if not isinstance(raw, dict):
            raise ConfigError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    bases.append(Path.cwd())
    bases = list(dict.fromkeys(bases))

    fields = _fields()
    st_options = simpletuner_options()
    dataset_keys = dataset_default_options()
    values: dict[str, Any] = {}
    written: dict[str, str] = {}  # field -> key as the user wrote it
    dataset_defaults: dict[str, Any] = {}
    ignored: list[str] = []
    warnings: list[str] = []
    errors: list[str] = []
    family_targets: list[tuple[str, str, Any]] = []
    inline_datasets: list[Any] | None = None
    prefixed: dict[str, Any] = {}  # SimpleTuner options that may belong to the model family
    unknown: dict[str, tuple[str, Any]] = {}  # name -> (key as written, value)

    for raw_key, value in raw.items():
        key = str(raw_key).strip()
        name = key[2:] if key.startswith("--") else key
        if name == "data_backend_config" and isinstance(value, list):
            inline_datasets = value
            continue
        field = ALIASES.get(name, name)
        if field in fields:
            coerced = _coerce(key, field, value)
            if field in values and values[field] != coerced:
                raise ConfigError(
                    f"{written[field]!r} and {key!r} set the same option to different values "
                    f"({values[field]!r} and {coerced!r}); keep one"
                )
            values[field], written[field] = coerced, key
        elif name in dataset_keys:
            dataset_defaults[name] = value
        elif _family_lora_target(name):
            family_targets.append((key, _family_lora_target(name), value))
        elif name in st_options:
            ignored.append(name)
            prefixed[name] = value
        else:
            unknown[name] = (key, value)

    family = values.get("model_family")
    declared = family_training_options(family) if family else None
    # A key SimpleTuner does not know may still be the chosen family's own option
    # (flux2_guidance_value for flux2): the family validates its value when the run starts.
    for name, (key, value) in unknown.items():
        if family and _family_prefix(name, family) and (declared is None or name in declared):
            values.setdefault("family_options", {})[name] = _plain_value(value)
        elif family and _family_prefix(name, family):
            errors.append(_unknown_family_option_error(key, name, family, declared, where))
        else:
            errors.append(_unknown_key_error(key, where))
    if errors:
        raise ConfigError("\n".join(errors))
    if not family:
        raise ConfigError(f'model_family is required in {where} (for example "z-image" or "flux")')
    for key, target_family, value in family_targets:
        if not _same_family(target_family, family):
            ignored.append(key.lstrip("-"))
            warnings.append(f"{key} is ignored: model_family is {family!r}")
            continue
        coerced = _coerce(key, "lora_target", value)
        if values.get("lora_target") not in (None, coerced):
            raise ConfigError(
                f"{written['lora_target']!r} and {key!r} name different LoRA targets "
                f"({values['lora_target']!r} and {coerced!r}); keep one"
            )
        values["lora_target"], written["lora_target"] = coerced, key

    # Keys named after the chosen family (flux_guidance_value for flux) are the family's options:
    # passed to it as they are written, and validated by the family when the run starts. Those
    # SimpleTuner has and the family does not implement stay "accepted but ignored".
    for name, value in prefixed.items():
        if _family_prefix(name, family) and (declared is None or name in declared):
            values.setdefault("family_options", {})[name] = _plain_value(value)
            ignored.remove(name)

    report_to = values.get("report_to")
    if report_to in _TRACKER_FALLBACK:
        values["report_to"] = _TRACKER_FALLBACK[report_to]
        warnings.append(
            f"report_to {report_to!r} is not implemented in tune yet; using {values['report_to']!r}"
        )

    for key in ("data_backend_config", "user_prompt_library", "lycoris_config", "quantization_config"):
        if isinstance(values.get(key), str):
            values[key] = str(_locate(key, values[key], bases))

    try:
        train = TrainConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {where})") from None

    datasets: list[DatasetConfig] = []
    dataset_notes: list[str] = []
    if inline_datasets is not None or train.data_backend_config is not None:
        defaults = {key: getattr(train, key) for key in TRAIN_DATASET_DEFAULTS}
        defaults.update(dataset_defaults)
        datasets, dataset_notes = _load_datasets(train, inline_datasets, defaults, bases)
        try:  # eval_dataset_id / dataset_type eval against the eval keys, before any weights load
            check_eval_datasets(train, datasets)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {where})") from None
    else:
        warnings.append("no data_backend_config: there are no datasets to train on")

    ignored = sorted(set(ignored))
    if ignored:
        warnings.insert(0, f"accepted but ignored (not implemented in tune yet): {', '.join(ignored)}")
    warnings.extend(dataset_notes)
    for message in warnings[: len(warnings) - len(dataset_notes)]:
        logger.warning(message)  # tune-data already logged its own dataset notes
    return LoadedConfig(
        train=train,
        datasets=datasets,
        ignored=tuple(ignored),
        config_path=config_path,
        warnings=tuple(warnings),
    )


_DATASET_PATH_KEYS = ("instance_data_dir", "cache_dir_vae", "cache_dir")


def _load_datasets(
    train: TrainConfig,
    inline: list[Any] | None,
    defaults: dict[str, Any],
    bases: list[Path],
) -> tuple[list[DatasetConfig], list[str]]:
    if inline is not None:
        entries, where = inline, "data_backend_config"
    else:
        path = Path(train.data_backend_config)
        entries, where = _read_json(path), str(path)
    if isinstance(entries, list):
        entries = [_resolve_dataset_paths(entry, bases) for entry in entries]
    try:
        datasets = load_dataset_configs(entries, defaults=defaults)
    except DatasetConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    notes = [
        f"dataset {d.id!r}: accepted but ignored (not implemented in tune yet): {', '.join(d.ignored_keys)}"
        for d in datasets
        if d.ignored_keys
    ]
    return datasets, notes


def _resolve_dataset_paths(entry: Any, bases: list[Path]) -> Any:
    """Make a local dataset's relative paths absolute: the working directory first (SimpleTuner),
    else the first config-side base where the path exists."""
    if not isinstance(entry, dict) or entry.get("type", entry.get("--type", "local")) != "local":
        return entry
    cwd = Path.cwd()
    out = dict(entry)
    for raw_key, value in entry.items():
        if str(raw_key).lstrip("-") not in _DATASET_PATH_KEYS or not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        if path.is_absolute() or "://" in value:
            continue
        chosen = cwd / path
        if not chosen.exists():
            chosen = next((base / path for base in bases if (base / path).exists()), chosen)
        out[raw_key] = str(chosen)
    return out
