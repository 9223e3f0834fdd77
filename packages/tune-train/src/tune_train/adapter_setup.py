"""What a run trains and how it is exported: a PEFT LoRA (with DoRA and PEFT's init schemes),
a LyCORIS network (LoKr, LoHa, ...) or the whole transformer (``model_type: full``).

The loop does not care which: it trains :attr:`TrainedWeights.trainable`, checkpoints every
parameter of the transformer that requires grad (a LyCORIS network is attached to the
transformer as its ``lycoris`` submodule, so it moves, syncs under DDP and checkpoints like the
transformer's own weights), and asks this module for the tensors and header of the exported file.
Keeping these differences here keeps ``trainer.py`` readable top to bottom.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import attrs
import torch

from tune_train.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

#: ``lora_init_type`` -> PEFT's ``init_lora_weights``.
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
#: Init schemes that move the base weight (W <- W - B0 A0): the trained adapter only reproduces
#: the model on the *changed* base, so it is exported with the initial factors folded in.
MUTATING_INIT = ("pissa", "olora")
#: Attribute name of the LyCORIS network on the transformer.
LYCORIS_MODULE = "lycoris"


@attrs.define
class TrainedWeights:
    """The weights a run trains, and how to turn them into the exported file."""

    kind: str
    """``lora`` (PEFT, DoRA included), ``lycoris`` or ``full``."""
    trainable: list[torch.nn.Parameter]
    """What the optimizer updates."""
    initial_factors: dict[str, torch.Tensor] = attrs.field(factory=dict)
    """PiSSA/OLoRA: the LoRA factors at step 0 (diffusers keys), needed to export for the original base."""
    lycoris_config: dict[str, Any] | None = None
    """The parsed ``lycoris_config`` JSON (LyCORIS runs)."""
    text_encoder_params: list[torch.nn.Parameter] = attrs.field(factory=list)
    """The text encoders' LoRA weights (``train_text_encoder``), also in :attr:`trainable`; the
    optimizer gives them their own group (``text_encoder_lr``)."""

    @property
    def transformer_params(self) -> list[torch.nn.Parameter]:
        """:attr:`trainable` without the text encoders' weights."""
        theirs = {id(p) for p in self.text_encoder_params}
        return [p for p in self.trainable if id(p) not in theirs]

    # ------------------------------------------------------------------ export
    def state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        """The exported tensors: diffusers-layout LoRA, LyCORIS's own keys, or the full
        transformer's state dict (not copied: a full model has no memory to spare)."""
        transformer = model.transformer
        if self.kind == "full":
            return {k: v.detach() for k, v in transformer.state_dict().items()}
        if self.kind == "lycoris":
            network = getattr(transformer, LYCORIS_MODULE)
            return {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}
        from tune_models.adapters import training_lora_state_dict

        from tune_models import text_encoder_lora

        tensors = training_lora_state_dict(model)
        if self.initial_factors:
            tensors = fold_initial_factors(tensors, self.initial_factors)
        # ``text_encoder.`` / ``text_encoder_2.`` keys beside the denoiser's (train_text_encoder).
        return tensors | text_encoder_lora.state_dict(model)

    def header(self, model: Any) -> dict[str, str]:
        """safetensors header entries the loaders need (LoRA alpha; the LyCORIS settings)."""
        if self.kind == "full":
            return {"format": "pt"}
        if self.kind == "lycoris":
            return {"format": "pt", "lycoris_config": json.dumps(self.lycoris_config, sort_keys=True)}
        from tune_models.adapters import lora_file_metadata, training_lora_metadata

        header = lora_file_metadata(model)
        if self.initial_factors:
            # The folded adapter has twice the rank; doubling alpha keeps alpha / rank.
            config = training_lora_metadata(model)
            config.update(r=2 * config["r"], lora_alpha=2 * config["lora_alpha"], init_lora_weights=True)
            prefix = getattr(model.family, "lora_prefix", "transformer")  # ``unet`` for UNet families
            packed = {f"{prefix}.{k}": v for k, v in config.items()}
            header["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True, default=str)
        from tune_models import text_encoder_lora

        encoders = text_encoder_lora.metadata(model)
        if encoders:  # each encoder's alpha and rank, where diffusers' loader reads them
            packed = json.loads(header["lora_adapter_metadata"]) | encoders
            header["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True, default=str)
            header["tune.text_encoders"] = ",".join(text_encoder_lora.trained_components(model))
        return header

    def model_config(self, model: Any) -> dict[str, Any] | None:
        """The transformer's diffusers config (``config.json``) for a full fine-tune, else None."""
        if self.kind != "full":
            return None
        return json.loads(model.transformer.to_json_string())


def fold_initial_factors(
    tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PiSSA/OLoRA adapter -> a plain LoRA for the *original* base weight.

    Training ran on ``W - s B0 A0`` plus ``s B A``, so the change to the original weight is
    ``s (B A - B0 A0)``: a LoRA of twice the rank with ``A' = [A; A0]`` and ``B' = [B, -B0]``
    (PEFT's ``path_initial_model_for_weight_conversion`` does the same).
    """
    folded = dict(tensors)
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        folded[key] = torch.cat([a, initial[key].to(a.dtype)], dim=0)
        folded[b_key] = torch.cat([tensors[b_key], -initial[b_key].to(a.dtype)], dim=1)
    return folded


# ---------------------------------------------------------------------- building


def build_trained_weights(
    model: Any,
    family: Any,
    config: TrainConfig,
    *,
    optimizer_param_dtype: torch.dtype | None,
) -> TrainedWeights:
    """Set up what ``config`` trains on ``model`` (freezing everything else) and return it.

    ``optimizer_param_dtype`` is the dtype the optimizer wants its weights in (``adamw_bf16``
    says bf16); None means the default: adapters train in fp32, a full model stays in the
    dtype it was loaded in (an fp32 master copy of a whole model is what full fine-tuning
    cannot afford; choose ``base_model_default_dtype: fp32`` to train in fp32).
    """
    if config.model_type == "full":
        weights = _build_full(model, config)
    elif config.lora_type == "lycoris":
        weights = _build_lycoris(model, config)
    else:
        weights = _build_peft_lora(model, family, config)
    if weights.kind != "full":
        dtype = optimizer_param_dtype or torch.float32
        for param in weights.trainable:
            param.data = param.data.to(dtype)
    return weights


def _build_peft_lora(model: Any, family: Any, config: TrainConfig) -> TrainedWeights:
    from tune_models.adapters import add_training_lora, training_lora_state_dict

    init = config.lora_init_type
    if init == "loftq":
        _check_loftq()
    target = config.peft_lora_target_modules or config.lora_target or family.default_lora_target
    trainable = add_training_lora(
        model,
        rank=config.lora_rank,
        alpha=config.lora_scale_alpha(),
        dropout=config.lora_dropout,
        target=target,
        init=PEFT_INIT[init],
        use_dora=config.use_dora,
    )
    weights = TrainedWeights(kind="lora", trainable=trainable)
    if init in MUTATING_INIT:
        weights.initial_factors = {
            k: v.float() for k, v in training_lora_state_dict(model).items() if ".lora_A." in k or ".lora_B." in k
        }
    if config.train_text_encoder:
        from tune_train.text_encoder_training import add_loras

        weights.text_encoder_params = add_loras(model, config)
        weights.trainable = trainable + weights.text_encoder_params
    if config.init_lora:
        # Continue from an existing adapter (diffusers or the family's ComfyUI layout).
        from tune_models.adapters import load_training_lora, lora_file_scale

        state_dict = family.lora_state_dict(config.init_lora)
        scale = lora_file_scale(config.init_lora)
        load_training_lora(model, state_dict, file_scale=scale)
        _init_text_encoders(model, config, state_dict)
    return weights


def _init_text_encoders(model: Any, config: TrainConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """``init_lora``'s text-encoder keys: restored into the encoders' LoRA with
    ``train_text_encoder``; otherwise said to be unused (the run would silently drop them)."""
    from tune_models import text_encoder_lora

    components = model.family.text_encoder_lora_components
    present = sorted({k.split(".", 1)[0] for k in state_dict if k.split(".", 1)[0] in components})
    if not present:
        return
    if not config.train_text_encoder:
        log.warning(
            "init_lora %s has text-encoder weights (%s) that this run does not train or export; "
            "set train_text_encoder: true to continue them", config.init_lora, ", ".join(present),
        )
        return
    from tune_models.adapters import lora_file_scale

    scales = {component: lora_file_scale(config.init_lora, component) for component in present}
    try:
        restored = text_encoder_lora.load_state_dict(model, state_dict, file_scale=scales)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("init_lora: restored the text-encoder LoRA of %s", ", ".join(restored))


def _check_loftq() -> None:
    """LoftQ quantises the base weight with bitsandbytes on a CUDA device while initialising."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ConfigError("lora_init_type 'loftq' needs a CUDA GPU (PEFT's LoftQ runs its quantiser on CUDA)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError('lora_init_type \'loftq\' needs bitsandbytes: pip install "tune-quant[bnb]"')
    raise ConfigError(
        "lora_init_type 'loftq' is not supported by tune yet: PEFT's LoftQ replaces the base weights "
        "with their 4-bit reconstruction, so the adapter only fits that quantised base, which tune "
        "does not export. Use pissa or olora (exported for the original base)."
    )


def _build_full(model: Any, config: TrainConfig) -> TrainedWeights:
    if model.has_assistant:
        raise ConfigError(
            "model_type 'full' cannot train under an assistant LoRA (its weights would be baked into "
            "neither file); set disable_assistant_lora: true"
        )
    transformer = model.transformer
    if next(transformer.parameters()).dtype == torch.float16:
        raise ConfigError(
            "model_type 'full' with fp16 weights cannot use the fp16 gradient scaler; use "
            "mixed_precision bf16 or base_model_default_dtype fp32"
        )
    transformer.requires_grad_(True)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if trainable[0].dtype != torch.float32:
        log.warning(
            "model_type full: the transformer trains in %s (no fp32 master copy). Plain AdamW "
            "loses small updates to rounding; optimizer adamw_bf16 compensates, "
            "base_model_default_dtype fp32 trains in fp32 at twice the memory.",
            trainable[0].dtype,
        )
    return TrainedWeights(kind="full", trainable=trainable)


# ---------------------------------------------------------------------- LyCORIS

#: Keys of a ``lycoris_config`` JSON besides ``create_lycoris``'s keyword arguments.
_LYCORIS_OWN_KEYS = {"algo", "multiplier", "linear_dim", "linear_alpha", "apply_preset"}
_LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "full", "ia3", "dylora", "glora", "diag-oft", "boft")


def read_lycoris_config(path: str) -> dict[str, Any]:
    """The ``lycoris_config`` JSON, checked enough that a typo fails now and names the key."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"lycoris_config {path!r} does not exist (a JSON file such as "
                          '{"algo": "lokr", "factor": 16, "linear_dim": 10000, "linear_alpha": 1})')
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"lycoris_config {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"lycoris_config {path!r} must hold a JSON object, got {type(data).__name__}")
    algo = str(data.get("algo", "lora")).lower()
    if algo not in _LYCORIS_ALGOS:
        raise ConfigError(f"lycoris_config {path!r}: algo must be one of {', '.join(_LYCORIS_ALGOS)}; got {algo!r}")
    preset = data.get("apply_preset")
    if preset is not None and not isinstance(preset, dict):
        raise ConfigError(f"lycoris_config {path!r}: apply_preset must be an object (target_module, module_algo_map, ...)")
    return data


def _import_lycoris():
    try:
        import lycoris  # noqa: F401
        from lycoris import LycorisNetwork, create_lycoris
    except ImportError as exc:
        raise ImportError(
            'lora_type lycoris needs the lycoris-lora package: pip install "tune-train[lycoris]"'
        ) from exc
    return LycorisNetwork, create_lycoris


#: LycorisNetwork keeps its preset in class attributes; their values at import, restored before
#: each network is built so one run's preset does not leak into the next in the same process.
_PRESET_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
_preset_defaults: dict[str, Any] = {}


def _build_lycoris(model: Any, config: TrainConfig) -> TrainedWeights:
    LycorisNetwork, create_lycoris = _import_lycoris()
    from lycoris.config import FULL_UNET_MODULES, FULL_UNET_NAMES

    settings = read_lycoris_config(config.lycoris_config)
    transformer = model.transformer
    if not _preset_defaults:
        _preset_defaults.update({name: getattr(LycorisNetwork, name) for name in _PRESET_ATTRS})
    for name, value in _preset_defaults.items():
        setattr(LycorisNetwork, name, value)
    # Without apply_preset, adapt every block of the known diffusion transformers (the
    # library's "full" preset lists their block classes).
    preset = {"target_module": list(FULL_UNET_MODULES), "target_name": list(FULL_UNET_NAMES)}
    preset.update(settings.get("apply_preset") or {})
    try:
        LycorisNetwork.apply_preset(preset)
    except KeyError as exc:
        raise ConfigError(f"lycoris_config {config.lycoris_config!r}: apply_preset: {exc}") from exc
    extra = {k: v for k, v in settings.items() if k not in _LYCORIS_OWN_KEYS}
    network = create_lycoris(
        transformer,
        float(settings.get("multiplier", 1.0)),
        linear_dim=int(settings.get("linear_dim", config.lora_rank)),
        linear_alpha=float(settings.get("linear_alpha", config.lora_scale_alpha())),
        algo=str(settings.get("algo", "lora")).lower(),
        # The default preset names blocks of many architectures; only an explicit one should warn.
        warn_on_unmatched=bool(settings.get("apply_preset")),
        **extra,
    )
    if not network.loras:
        raise ConfigError(
            f"lycoris_config {config.lycoris_config!r} matches no module of the {type(transformer).__name__}; "
            "set apply_preset.target_module to its block classes or target_name to module names"
        )
    network.apply_to()
    transformer.requires_grad_(False)
    # A submodule of the transformer: moved, wrapped by DDP and checkpointed with it.
    transformer.add_module(LYCORIS_MODULE, network)
    network.requires_grad_(True)
    if config.init_lora:
        _load_lycoris_weights(network, config.init_lora)
    trainable = [p for p in network.parameters() if p.requires_grad]
    log.info("LyCORIS %s: %d modules, %d trainable parameters", settings.get("algo", "lora"),
             len(network.loras), sum(p.numel() for p in trainable))
    return TrainedWeights(kind="lycoris", trainable=trainable, lycoris_config=settings)


def _load_lycoris_weights(network: torch.nn.Module, path: str) -> None:
    """``init_lora`` for LyCORIS: a file this network's own ``save_weights`` format wrote."""
    from safetensors.torch import load_file

    incoming = load_file(path)
    ours = network.state_dict()
    missing = sorted(set(ours) - set(incoming))
    if missing:
        raise ConfigError(
            f"init_lora {path!r} lacks {len(missing)} of the LyCORIS network's weights (e.g. {missing[0]}); "
            "it was trained with another lycoris_config"
        )
    for key, value in ours.items():
        if incoming[key].shape != value.shape:
            raise ConfigError(
                f"init_lora weight {key} has shape {tuple(incoming[key].shape)}, the LyCORIS network needs "
                f"{tuple(value.shape)}: use the lycoris_config it was trained with"
            )
    network.load_state_dict({k: incoming[k] for k in ours})
