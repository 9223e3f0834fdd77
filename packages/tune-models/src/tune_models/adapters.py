"""LoRA adapters on a loaded model: the frozen assistant and the one being trained.

Two PEFT adapters may sit on the same transformer:

- ``"assistant"`` (:data:`ASSISTANT_ADAPTER`): a fixed adapter some flavours need *while
  training* (Ostris' de-distillation adapter for Z-Image-Turbo keeps a step-distilled model from
  losing its distillation). It never trains and is switched off for validation images, because
  the trained LoRA is meant to be used on the plain checkpoint.
- ``"tune"`` (:data:`TRAINING_ADAPTER`): the LoRA being trained.

PEFT re-enables gradients of every adapter it activates, so each activation change here ends by
freezing everything except the training adapters. The state of which adapters should be active
lives in ``LoadedModel.extras`` so that toggling is idempotent.

These helpers work for any diffusers transformer with ``PeftAdapterMixin``; family specifics
(LoRA file layout, targets) come from ``model.family``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tune_models.family import LoadedModel

ASSISTANT_ADAPTER = "assistant"
assistant_adapter_name = ASSISTANT_ADAPTER  # the name the trainer was told about
TRAINING_ADAPTER = "tune"

_TRAINING_KEY = "training_adapters"
_ASSISTANT_ON_KEY = "assistant_enabled"


def _training_adapters(model: LoadedModel) -> list[str]:
    return model.extras.setdefault(_TRAINING_KEY, [])


def active_adapters(model: LoadedModel) -> list[str]:
    """Adapters that should currently shape the transformer's output."""
    names = []
    if model.has_assistant and model.extras.get(_ASSISTANT_ON_KEY, True):
        names.append(ASSISTANT_ADAPTER)
    names.extend(_training_adapters(model))
    return names


def _apply(model: LoadedModel) -> None:
    """Make the transformer's active adapters match :func:`active_adapters`, then freeze
    everything that is not a training adapter's LoRA weight."""
    transformer = model.transformer
    if getattr(transformer, "peft_config", None):
        names = active_adapters(model)
        if names:
            transformer.enable_adapters()
            transformer.set_adapters(names)
        else:
            transformer.disable_adapters()
    trainable = _training_adapters(model)
    for name, param in transformer.named_parameters():
        param.requires_grad_(any(f".{adapter}." in name for adapter in trainable) and "lora_" in name)


def load_assistant_lora(
    model: LoadedModel, path: str | os.PathLike, *, weight_name: str | None = None
) -> None:
    """Load ``path`` (hub id, folder or file) as the frozen ``"assistant"`` adapter and turn it on."""
    if model.has_assistant:
        raise ValueError("this model already has an assistant adapter loaded")
    state_dict = model.family.lora_state_dict(path, weight_name=weight_name)
    if not state_dict:
        raise ValueError(f"assistant LoRA {path!s} (weight_name={weight_name!r}) holds no LoRA weights")
    model.transformer.load_lora_adapter(state_dict, adapter_name=ASSISTANT_ADAPTER, prefix=model.family.lora_prefix)
    model.has_assistant = True
    model.extras[_ASSISTANT_ON_KEY] = True
    _apply(model)


def set_assistant_enabled(model: LoadedModel, enabled: bool) -> None:
    """Switch the assistant adapter on (training) or off (validation). A no-op without one."""
    if not model.has_assistant:
        return
    model.extras[_ASSISTANT_ON_KEY] = bool(enabled)
    _apply(model)


def add_training_lora(
    model: LoadedModel,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target: str | list[str] | None = None,
    adapter_name: str = TRAINING_ADAPTER,
    param_dtype: torch.dtype | None = None,
    init: bool | str = True,
    use_dora: bool = False,
) -> list[torch.nn.Parameter]:
    """Inject a trainable LoRA into the transformer and return its parameters.

    ``target`` is a preset of ``model.family.lora_target_presets`` (default: the family's
    ``default_lora_target``) or an explicit list of module-name suffixes. The new adapter is
    active together with the assistant (when enabled); only its own weights require grad.
    ``param_dtype`` (e.g. ``torch.float32``) upcasts the trainable weights, which is what mixed
    precision training of a bf16 model wants.

    ``init`` is PEFT's ``init_lora_weights`` (``True``: A random, B zero; ``"gaussian"``,
    ``"pissa"``, ``"olora"``, ...). PiSSA and OLoRA start from the weight's principal directions
    and *subtract* them from the base weight, so the base is changed; see
    ``tune_train.adapter_setup`` for how such an adapter is exported for the untouched base.
    ``use_dora`` adds DoRA's per-output magnitude vector (trained too).
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"lora_rank must be > 0, got {rank}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
    if adapter_name == ASSISTANT_ADAPTER:
        raise ValueError(f"adapter name {ASSISTANT_ADAPTER!r} is reserved for the assistant adapter")
    if adapter_name in (getattr(model.transformer, "peft_config", None) or {}):
        raise ValueError(f"the transformer already has an adapter named {adapter_name!r}")
    targets = model.family.lora_targets(target)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=init,
        use_dora=use_dora,
    )
    try:
        with warnings.catch_warnings():  # a second adapter beside the assistant is intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.transformer.add_adapter(config, adapter_name=adapter_name)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise ValueError(f"lora_target {target!r} matches no module of the transformer: {exc}") from exc
        raise
    _training_adapters(model).append(adapter_name)
    _apply(model)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    if param_dtype is not None:
        for p in params:
            p.data = p.data.to(param_dtype)
    return params


def training_lora_state_dict(model: LoadedModel, adapter_name: str = TRAINING_ADAPTER) -> dict[str, torch.Tensor]:
    """The training adapter's weights in diffusers layout (``transformer.<module>.lora_A.weight``;
    the prefix is the family's ``lora_prefix``, ``unet`` for UNet families),
    detached CPU copies, without the assistant's. ``pipeline.load_lora_weights(state_dict)``
    accepts it; it carries no alpha, so it reproduces the model exactly when alpha == rank; use
    :func:`save_training_lora` (which records alpha as diffusers metadata) otherwise."""
    from peft import get_peft_model_state_dict

    if adapter_name not in (getattr(model.transformer, "peft_config", None) or {}):
        raise ValueError(f"the transformer has no adapter named {adapter_name!r}")
    peft_sd = get_peft_model_state_dict(model.transformer, adapter_name=adapter_name)
    prefix = model.family.lora_prefix  # ``unet`` for UNet families
    return {f"{prefix}.{k}": v.detach().to("cpu").clone() for k, v in peft_sd.items()}


def training_lora_metadata(model: LoadedModel, adapter_name: str = TRAINING_ADAPTER) -> dict[str, Any]:
    """The adapter's LoRA config (rank, alpha, targets) as diffusers stores it in a LoRA file."""
    config = model.transformer.peft_config[adapter_name].to_dict()
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    return config


def lora_file_metadata(model: LoadedModel, adapter_name: str = TRAINING_ADAPTER) -> dict[str, str]:
    """safetensors header entries that make ``pipeline.load_lora_weights(file)`` use this adapter's
    alpha (diffusers' own ``lora_adapter_metadata`` entry, as ``save_lora_weights`` writes it).
    Merge them into the header of a file holding :func:`training_lora_state_dict`."""
    import json

    prefix = model.family.lora_prefix
    packed = {f"{prefix}.{k}": v for k, v in training_lora_metadata(model, adapter_name).items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, default=str)}


def save_training_lora(
    model: LoadedModel,
    directory: str | os.PathLike,
    *,
    adapter_name: str = TRAINING_ADAPTER,
    weight_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """Write the training adapter as the family pipeline's ``save_lora_weights`` does, with its
    alpha recorded, so ``pipeline.load_lora_weights(directory, weight_name=...)`` is exact."""
    state_dict = training_lora_state_dict(model, adapter_name)
    prefix = model.family.lora_prefix
    layers = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items()}
    model.family.pipeline_class().save_lora_weights(
        save_directory=str(directory),
        weight_name=weight_name,
        **{
            f"{prefix}_lora_layers": layers,
            f"{prefix}_lora_adapter_metadata": training_lora_metadata(model, adapter_name),
        },
    )
    return Path(directory) / weight_name


def lora_file_scale(path: str | os.PathLike, component: str | None = None) -> float:
    """``alpha / rank`` recorded in a LoRA file's diffusers metadata; 1.0 when it records none
    (a bare state dict, or a ComfyUI file whose alphas :meth:`from_comfyui` already folded in).
    The denoiser's, or with ``component`` (``text_encoder``) that text encoder's where recorded."""
    import json

    from safetensors import safe_open

    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return 1.0
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata() or {}
        comfyui = any(key.endswith(".lora_down.weight") for key in handle.keys())
    if comfyui or "lora_adapter_metadata" not in header:  # ComfyUI alphas are folded on reading
        return 1.0
    packed = json.loads(header["lora_adapter_metadata"])
    # The denoiser's entry (``transformer.`` / ``unet.``), not a text encoder's (train_text_encoder).
    prefixes = [k.split(".", 1)[0] for k in packed if k.endswith(".lora_alpha")]
    prefix = next((p for p in prefixes if not p.startswith("text_encoder")), prefixes[0] if prefixes else "transformer")
    if component is not None and component in prefixes:  # that text encoder's own alpha and rank
        prefix = component
    alpha, rank = packed.get(f"{prefix}.lora_alpha"), packed.get(f"{prefix}.r")
    return float(alpha) / float(rank) if alpha and rank else 1.0


def rescale_init_lora_weight(key: str, value: torch.Tensor, file_scale: float, config: Any) -> torch.Tensor:
    """One ``init_lora`` weight ready for an adapter with PEFT LoRA ``config``: an up weight
    (``.lora_B.`` in ``key``) is rescaled from the file's ``alpha / rank`` (``file_scale``) to the
    adapter's, so the loaded LoRA has the effect it had; any other weight is returned as it is.
    For the transformer's adapter (:func:`load_training_lora`) and the text encoders'
    (``tune_models.text_encoder_lora.load_state_dict``)."""
    ours = float(config.lora_alpha) / float(config.r)
    if ".lora_B." in key and file_scale != ours:
        return value.float() * (file_scale / ours)
    return value


def load_training_lora(
    model: LoadedModel,
    state_dict: dict[str, torch.Tensor],
    *,
    file_scale: float = 1.0,
    adapter_name: str = TRAINING_ADAPTER,
) -> None:
    """Start the training adapter from an existing LoRA (``init_lora``).

    ``state_dict`` is in diffusers layout (``transformer.<module>.lora_A.weight``), as
    ``family.lora_state_dict`` returns for diffusers and ComfyUI files alike. Up weights are
    rescaled from the file's ``alpha/rank`` (``file_scale``) to this adapter's, so the loaded LoRA
    has the same effect it had. Every module of the adapter must be present with the same rank.
    """
    from peft import set_peft_model_state_dict

    config = model.transformer.peft_config[adapter_name]
    current = training_lora_state_dict(model, adapter_name)
    missing = sorted(set(current) - set(state_dict))
    if missing:
        raise ValueError(
            f"init_lora lacks {len(missing)} of the adapter's weights (e.g. {missing[0]}); "
            "it was trained with other lora_target/peft_lora_target_modules"
        )
    loaded = {}
    for key, value in current.items():
        incoming = state_dict[key]
        if incoming.shape != value.shape:
            raise ValueError(
                f"init_lora weight {key} has shape {tuple(incoming.shape)}, the adapter needs "
                f"{tuple(value.shape)}: set lora_rank to the file's rank"
            )
        loaded[key.removeprefix(f"{model.family.lora_prefix}.")] = rescale_init_lora_weight(key, incoming, file_scale, config)
    result = set_peft_model_state_dict(model.transformer, loaded, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"init_lora weights did not match the adapter: {unexpected[:3]}")
