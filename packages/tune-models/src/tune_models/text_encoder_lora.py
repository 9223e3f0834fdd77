"""LoRAs on a loaded model's text encoders (``train_text_encoder``).

The family says which encoders take one (:attr:`ModelFamily.text_encoder_lora_components`, the
components its diffusers pipeline's ``load_lora_weights`` reads text-encoder keys for) and which
modules it adapts (:attr:`ModelFamily.text_encoder_lora_targets`). Everything else is generic:

- the adapter is a PEFT LoRA named like the transformer's training adapter (``"tune"``), added
  through transformers' own ``add_adapter``, so the pipeline the trainer validates with (which
  shares the encoder objects) already uses it;
- in files the keys are ``<component>.<module>.lora_A.weight``, as diffusers' pipeline
  ``save_lora_weights`` writes them, with the family's :attr:`ModelFamily.text_encoder_lora_module_prefix`
  (``text_model.``) on every module name, and the adapter's config in the same
  ``lora_adapter_metadata`` header entry as the transformer's (``<component>.r``, ...), so
  ``load_lora_weights`` applies the right alpha to each.

Which encoders carry a training LoRA is kept in ``LoadedModel.extras`` (:data:`EXTRAS_KEY`), so the
trainer, validation and export ask the model rather than the config.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from tune_models.adapters import TRAINING_ADAPTER, rescale_init_lora_weight

if TYPE_CHECKING:  # pragma: no cover
    from tune_models.family import LoadedModel, ModelFamily

EXTRAS_KEY = "text_encoder_loras"
"""``LoadedModel.extras`` entry: the components (``text_encoder``, ...) with a training LoRA."""


def supporting_families() -> list[str]:
    """Registered families that declare text-encoder LoRA components (for refusal messages)."""
    from tune_models.registry import families_where

    return families_where(lambda family: bool(family.text_encoder_lora_components))


def check_support(family: ModelFamily, key: str = "train_text_encoder") -> None:
    """Raise ``ValueError`` naming ``key`` and the families that can, when ``family`` cannot
    train a text-encoder LoRA."""
    if not family.text_encoder_lora_components:
        raise ValueError(
            f"{key}: model_family {family.name!r} cannot train its text encoder (its pipeline loads no "
            f"text-encoder LoRA); families that can: {', '.join(supporting_families()) or 'none'}. "
            f"Remove {key}."
        )


def trained_components(model: LoadedModel) -> list[str]:
    """The components of ``model`` that carry a training text-encoder LoRA (empty when none)."""
    return list(model.extras.get(EXTRAS_KEY, []))


def add_text_encoder_loras(
    model: LoadedModel,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init: bool | str = True,
    use_dora: bool = False,
    adapter_name: str = TRAINING_ADAPTER,
) -> dict[str, list[torch.nn.Parameter]]:
    """Add a trainable LoRA to each of the family's text-encoder LoRA components that ``model``
    has (an SDXL refiner has no ``text_encoder``); returns ``{component: its LoRA parameters}``.
    The encoders' own weights stay frozen."""
    from peft import LoraConfig

    family = model.family
    check_support(family)
    params: dict[str, list[torch.nn.Parameter]] = {}
    for component in family.text_encoder_lora_components:
        encoder = getattr(model, component, None)
        if encoder is None:
            continue
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(family.text_encoder_lora_targets),
            init_lora_weights=init,
            use_dora=use_dora,
        )
        encoder.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            encoder.add_adapter(config, adapter_name=adapter_name)
        encoder.set_adapter(adapter_name)
        found = [p for name, p in encoder.named_parameters() if "lora_" in name and f".{adapter_name}." in name]
        for p in found:
            p.requires_grad_(True)
        params[component] = found
    model.extras[EXTRAS_KEY] = list(params)
    return params


def _file_module(model: LoadedModel, key: str) -> str:
    """A PEFT key of an encoder (``encoder.layers.0...``) as LoRA files name it (``text_model.encoder...``)."""
    prefix = model.family.text_encoder_lora_module_prefix
    return key if not prefix or key.startswith(prefix) else prefix + key


def state_dict(model: LoadedModel, adapter_name: str = TRAINING_ADAPTER) -> dict[str, torch.Tensor]:
    """The text-encoder LoRAs in diffusers layout (``text_encoder.text_model.encoder.layers.0.self_attn
    .q_proj.lora_A.weight``), detached CPU copies; empty without any."""
    from peft import get_peft_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for component in trained_components(model):
        encoder = getattr(model, component)
        for key, value in get_peft_model_state_dict(encoder, adapter_name=adapter_name).items():
            out[f"{component}.{_file_module(model, key)}"] = value.detach().to("cpu").clone()
    return out


def metadata(model: LoadedModel, adapter_name: str = TRAINING_ADAPTER) -> dict[str, Any]:
    """Each encoder LoRA's config as diffusers packs it into ``lora_adapter_metadata``
    (``text_encoder.r``, ``text_encoder.lora_alpha``, ...)."""
    packed: dict[str, Any] = {}
    for component in trained_components(model):
        config = getattr(model, component).peft_config[adapter_name].to_dict()
        for key, value in config.items():
            packed[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return packed


def load_state_dict(
    model: LoadedModel,
    incoming: dict[str, torch.Tensor],
    *,
    file_scale: float | dict[str, float] = 1.0,
    adapter_name: str = TRAINING_ADAPTER,
) -> list[str]:
    """Start the encoders' training LoRAs from ``incoming`` (a diffusers-layout file's tensors,
    ``init_lora``); up weights are rescaled from the file's ``alpha / rank`` (``file_scale``: one
    for all, or per component) to the adapter's, as for the transformer. Returns the components restored; an encoder the file has no keys for
    keeps its fresh LoRA. A file that covers an encoder only in part is an error."""
    from peft import set_peft_model_state_dict

    restored = []
    for component in trained_components(model):
        head = f"{component}."
        theirs = {k.removeprefix(head): v for k, v in incoming.items() if k.startswith(head)}
        if not theirs:
            continue
        encoder = getattr(model, component)
        config = encoder.peft_config[adapter_name]
        scale = file_scale.get(component, 1.0) if isinstance(file_scale, dict) else file_scale
        current = {_file_module(model, k): k for k in state_dict_keys(encoder, adapter_name)}
        missing = sorted(set(current) - set(theirs))
        if missing:
            raise ValueError(
                f"init_lora lacks {len(missing)} of the {component} LoRA's weights (e.g. {head}{missing[0]}); "
                "it was trained on other text-encoder modules"
            )
        loaded = {}
        for file_key, peft_key in current.items():
            loaded[peft_key] = rescale_init_lora_weight(file_key, theirs[file_key], scale, config)
        result = set_peft_model_state_dict(encoder, loaded, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"init_lora {component} weights did not match the adapter: {unexpected[:3]}")
        restored.append(component)
    return restored


def state_dict_keys(encoder: torch.nn.Module, adapter_name: str = TRAINING_ADAPTER) -> list[str]:
    """PEFT's names of ``encoder``'s LoRA weights (``encoder.layers.0.self_attn.q_proj.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(encoder, adapter_name=adapter_name))


def named_parameters(model: LoadedModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The encoders' trainable LoRA parameters, named ``<component>.<parameter>`` (checkpoints)."""
    out = []
    for component in trained_components(model):
        encoder = getattr(model, component)
        out += [(f"{component}.{name}", p) for name, p in encoder.named_parameters() if p.requires_grad]
    return out
