"""The pieces of ``Trainer.setup`` that wire the model to the hardware: the accelerator, where the
base weights come from and in which dtype, quantisation, gradient checkpointing, offload, the
EMA, the embedding caches and the trackers.

Each function does one step of setup and takes only what that step needs, so
:meth:`tune_train.trainer.Trainer.setup` reads as the order of the steps (which matters: data
is checked before weights load, caches fill before anything big moves to the device).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from tune_train.config import ConfigError, TrainConfig
from tune_train.ema import EMA

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


def apply_torch_settings(config: TrainConfig) -> None:
    """Process-wide torch settings: ``torch_num_threads`` and ``disable_tf32``."""
    if config.torch_num_threads is not None:
        torch.set_num_threads(config.torch_num_threads)
    if config.disable_tf32:
        use_ieee_fp32()


def choose_attention_backends(family: Any, device: torch.device) -> bool:
    """Turn torch's cuDNN attention backend off on CUDA when ``family`` declares that its training
    step cannot run it (``ModelFamily.cudnn_attention_in_training``; Flux.1 and Chroma crash the
    CUDA context in its backward). Returns True when it turned it off. Flash and memory-efficient
    attention stay; measured on Flux.1-dev, the step then runs at the plain diffusers loop's speed
    (1.135 s vs 1.111 s, benchmarks/flux_lora_step.py)."""
    if device.type != "cuda" or getattr(family, "cudnn_attention_in_training", True):
        return False
    if torch.backends.cuda.cudnn_sdp_enabled():
        log.info("cuDNN attention off for %s training: its backward fails on this family's shapes", family.name)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def use_ieee_fp32() -> None:
    """fp32 matmuls and cuDNN convolutions in full IEEE fp32, no TensorFloat-32 (``disable_tf32``).

    Both APIs are set, legacy first: torch 2.9 and later read the ``fp32_precision`` settings,
    and once those were changed alone, reading the legacy ``allow_tf32`` flags (which libraries
    still do) raises on a "mix of the legacy and new APIs"; setting the legacy flags first keeps
    both readable and in agreement. Older torch has only the legacy flags."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9
        torch.backends.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"


def configure_vae(model: Any, family: Any, config: TrainConfig) -> list[str]:
    """``vae_enable_tiling`` / ``vae_enable_slicing``: call the VAE's ``enable_tiling()`` /
    ``enable_slicing()`` before latents are cached (the setting stays for validation's decodes).
    A VAE without the method gets a warning naming its class. Returns the methods called."""
    called = []
    vae = getattr(model, "vae", None)
    for key, method in (("vae_enable_tiling", "enable_tiling"), ("vae_enable_slicing", "enable_slicing")):
        if not getattr(config, key):
            continue
        try:  # diffusers' mixin has both methods, raising NotImplementedError where the VAE lacks them
            getattr(vae, method)()
            called.append(method)
        except (AttributeError, TypeError, NotImplementedError):
            log.warning(
                "%s: the %s VAE of model family %s has no %s(); running without it",
                key, type(vae).__name__, getattr(family, "name", family), method,
            )
    return called


def make_accelerator(config: TrainConfig, output_dir: Path, trackers: list[str]) -> Any:
    """A fresh ``accelerate.Accelerator`` in the run's mixed precision, logging to ``trackers``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tune_train.trackers import check_installed

    check_installed(config.report_to)  # a missing tracker library fails before the model loads
    # accelerate keeps one process-wide state; a second run in the same process (a notebook,
    # a test suite) with another precision must start from a clean one. The distributed
    # environment (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mixed_precision(config),
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_dir=str(output_dir / config.logging_dir),
    )


def mixed_precision(config: TrainConfig) -> str:
    """accelerate's ``mixed_precision``: ``bf16``/``fp16``, or ``no`` for everything else."""
    return config.mixed_precision if config.mixed_precision in ("bf16", "fp16") else "no"


def model_source(config: TrainConfig, family: Any, flavour: Any, device: torch.device | None = None) -> Any:
    """Where the base weights come from (``ModelSource``), from the run's ``pretrained_*`` keys;
    with ``quantize_via: pipeline``, also how diffusers quantises the transformer as it loads
    (checked for ``device`` now, before anything loads)."""
    from tune_models.family import ModelSource

    if config.pretrained_gemma_model_name_or_path and family.text_encoder_config_key != "pretrained_gemma_model_name_or_path":
        raise ConfigError(
            f"pretrained_gemma_model_name_or_path is set, but model_family {family.name!r} has no Gemma text encoder"
        )
    return ModelSource(
        pretrained_model_name_or_path=config.pretrained_model_name_or_path or flavour.pretrained,
        pretrained_transformer_model_name_or_path=config.pretrained_transformer_model_name_or_path,
        pretrained_transformer_subfolder=config.pretrained_transformer_subfolder,
        pretrained_vae_model_name_or_path=config.pretrained_vae_model_name_or_path,
        pretrained_text_encoder_model_name_or_path=config.pretrained_gemma_model_name_or_path,
        revision=config.revision,
        variant=config.variant,
        assistant_lora_path=config.assistant_lora_path,
        assistant_lora_weight_name=config.assistant_lora_weight_name,
        disable_assistant_lora=config.disable_assistant_lora,
        transformer_quantization=pipeline_quantization(config, device or torch.device("cpu")),
    )


def pipeline_quantization(config: TrainConfig, device: torch.device) -> Any:
    """The transformer's diffusers quantization for ``quantize_via: pipeline`` (``None`` otherwise):
    the ``base_model_precision`` preset's (a function of the empty model: the preset picks its
    layers by name) or the config ``quantization_config`` describes."""
    if config.quantize_via != "pipeline":
        return None
    from tune_quant.pipeline import config_from_entry, preset_config
    from tune_quant.presets import QuantisationUnavailable

    entry = config.pipeline_quantization_entry()
    try:
        if entry is not None:
            return config_from_entry(entry)
        return preset_config(config.base_model_precision, device=device.type, dtype=storage_dtype(config))
    except (QuantisationUnavailable, ValueError, ImportError) as exc:
        key = "quantization_config" if entry is not None else f"base_model_precision {config.base_model_precision!r}"
        raise ConfigError(f"{key} with quantize_via 'pipeline': {exc}") from exc


def storage_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype the frozen base weights are stored in.

    The autocast dtype (fp16 runs keep fp16 weights, since bf16 weights under fp16 autocast
    would be cast on every matmul); fp32 when asked (``base_model_default_dtype``) or unmixed.
    """
    mixed = mixed_precision(config)
    if mixed == "no" or config.base_model_default_dtype == "fp32":
        return torch.float32
    return _DTYPES[mixed]


def text_cache_settings(config: TrainConfig) -> dict[str, Any]:
    """What besides the model changes the cached prompt embeddings: the text encoders'
    precisions, when any is quantised (empty otherwise, so existing caches stay valid)."""
    precisions = config.text_encoder_precisions()
    if all(p in (None, "no_change") for p in precisions):
        return {}
    return {"text_encoder_precision": list(precisions)}


def quantise_text_encoders(model: Any, config: TrainConfig, device: torch.device) -> list[str]:
    """Quantise each text encoder whose ``text_encoder_N_precision`` names a preset, where it was
    loaded (the CPU), before it is ever moved to ``device``: the point is an encoder that would
    not fit the card in bf16. Returns ``"text_encoder_N: preset"`` for each one done."""
    encoders = model.text_encoders
    done = []
    for index, preset in enumerate(config.text_encoder_precisions(), start=1):
        if preset in (None, "no_change"):
            continue
        key = f"text_encoder_{index}_precision"
        if index > len(encoders):
            raise ConfigError(
                f"{key} is {preset!r}, but this model has {len(encoders)} text encoder(s); "
                f"set {key} to no_change"
            )
        from tune_quant.presets import quantise

        try:
            quantise(encoders[index - 1], preset, device=device.type)
        except Exception as exc:  # the preset's own clear error, named after the user's key
            raise ConfigError(f"{key} {preset!r}: {exc}") from exc
        done.append(f"text_encoder_{index}: {preset}")
    return done


def quantise_and_checkpoint(transformer: Any, config: TrainConfig, device: torch.device) -> Any:
    """Quantise the frozen transformer (``base_model_precision``) and switch on gradient
    checkpointing; returns the run's offload settings (checked against ``device``)."""
    if config.quantize_via == "pipeline":
        # diffusers quantised it while loading (model_source); a family loader that builds the
        # transformer another way (a whole-checkpoint file) would have left it as stored.
        if not getattr(transformer, "is_quantized", False):
            raise ConfigError(
                "quantize_via 'pipeline': this model's transformer was not loaded through diffusers' "
                "quantizer (e.g. it comes from a whole-checkpoint file); use quantize_via cpu or accelerator"
            )
    elif config.base_model_precision not in (None, "no_change"):
        if any(not p.is_floating_point() for p in transformer.parameters()):
            raise ConfigError(
                f"base_model_precision {config.base_model_precision!r}: the transformer's checkpoint "
                "is already quantised (a GGUF file, say), so there is nothing to quantise again; "
                "set base_model_precision to no_change"
            )
        if config.quantize_via == "accelerator" and device.type != "cpu":
            # Block by block on the GPU: fast, and the blocks block swap will stream go
            # straight back to the CPU, so the whole bf16 model is never on the device.
            from tune_quant.blockwise import quantise_blockwise

            quantise_blockwise(
                transformer, config.base_model_precision, device=device,
                offload_last=config.musubi_blocks_to_swap, offload_device=config.musubi_block_swap_device,
            )
        else:
            from tune_quant.presets import quantise

            quantise(transformer, config.base_model_precision, device=device.type)
    offload = config.offload_settings()
    offload.check_device(device)
    if offload.strategy == "group" and offload.group_offload_to_disk_path:
        raise ConfigError(
            "group_offload_to_disk_path cannot hold the transformer being trained: its "
            "enable_group_offload runs as block swap or ramtorch (diffusers' group offloading fails "
            "in backward, docs/memory.md), which keep the offloaded weights in pinned CPU memory, and "
            "diffusers' disk offload could not train it either (it writes each group's file once and "
            "reads it back on every use, so trained weights inside the groups would never change); "
            "unset it to keep offloaded weights in CPU memory"
        )
    # Group offload of a model trained through fails in backward on a GPU; the settings say
    # which backward-safe strategy stands in (the encoders keep diffusers' group offload).
    offload = offload.for_training(transformer)
    if config.gradient_checkpointing:
        # None keeps diffusers' own checkpointing; offload_checkpointed_activations swaps in
        # one that parks each block's saved input in pinned CPU memory until backward.
        checkpoint_func = offload.gradient_checkpointing_func()
        if config.gradient_checkpointing_interval:  # only every Nth block; the rest keep activations
            from tune_offload.checkpointing import every_nth_checkpoint

            checkpoint_func = every_nth_checkpoint(transformer, config.gradient_checkpointing_interval, checkpoint_func)
        transformer.enable_gradient_checkpointing(checkpoint_func)
    if config.enable_chunked_feed_forward:
        from tune_offload.ffn_chunking import chunk_feed_forward

        chunk_feed_forward(transformer, config.feed_forward_chunk_size)
    return offload


def place_transformer(transformer: Any, offload: Any, device: torch.device) -> bool:
    """Move the transformer to ``device``, or let the offload strategy place it; True when offloaded
    (accelerate must then not move it whole onto the device)."""
    offloaded = offload.strategy in ("block_swap", "group", "ramtorch")
    if offloaded:
        # The strategy places what stays resident on the device and keeps the rest off it.
        from tune_offload.strategies import apply_offload

        apply_offload(transformer, offload, onload_device=device)
    else:
        transformer.to(device)
    transformer.train()
    return offloaded


def build_ema(config: TrainConfig, trainable: Sequence[torch.nn.Parameter], device: torch.device) -> EMA | None:
    """The EMA of the trained weights (``use_ema``), stored where ``ema_device`` says; None when off."""
    if not config.use_ema:
        return None
    on_cpu = config.ema_device == "cpu" or config.ema_cpu_only
    return EMA(
        trainable,
        decay=config.ema_decay,
        storage_device="cpu" if on_cpu else device,
        update_on_storage=config.ema_cpu_only,
        update_interval=config.ema_update_interval or 1,
        foreach=not config.ema_foreach_disable,
        warmup_steps=config.ema_warmup_steps,
    )


def group_offload_encoders(model: Any, config: TrainConfig, device: torch.device) -> list[str]:
    """Install diffusers' group offloading, with the transformer's settings (``group_offload_type``,
    ``group_offload_blocks_per_group``, ``group_offload_use_stream``, ``group_offload_to_disk_path``),
    on the text encoders (``group_offload_text_encoder``) and the VAE (``group_offload_vae``).

    Their weights then stay off the accelerator except for the group running, through caching
    and validation alike; :func:`move` leaves them where the hooks put them. Returns the names
    of the components offloaded."""
    chosen: list[tuple[str, Any]] = []
    if config.group_offload_text_encoder:
        chosen += [(f"text_encoder_{i}", e) for i, e in enumerate(model.text_encoders, start=1)]
    if config.group_offload_vae:
        chosen.append(("vae", model.vae))
    if not chosen:
        return []
    from tune_offload.strategies import apply_offload

    settings = config.offload_settings()
    for name, component in chosen:
        own = settings
        if settings.group_offload_to_disk_path:
            # diffusers names each group's file after the group (``layers_0_0``), not the model:
            # an encoder sharing the folder would hand its files to the transformer's groups.
            # It also reads a file left by an earlier run instead of writing its own, so a
            # component's folder starts empty (stale weights of another checkpoint otherwise).
            folder = Path(settings.group_offload_to_disk_path) / name
            shutil.rmtree(folder, ignore_errors=True)
            own = attrs.evolve(settings, group_offload_to_disk_path=str(folder))
        apply_offload(component, own, onload_device=device, strategy="group")
    return [name for name, _ in chosen]


def move(component: Any, device: torch.device | str) -> bool:
    """Move a frozen component (VAE, text encoder) whole to ``device``, unless group offloading
    places its weights (:func:`group_offload_encoders`); True when it moved."""
    from tune_offload.strategies import is_group_offloaded

    if isinstance(component, torch.nn.Module) and is_group_offloaded(component):
        return False
    component.to(device)
    return True


def cache_embeddings(
    device: torch.device, model: Any, family: Any, data: Any, *, vae_batch_size: int
) -> tuple[Any, Any]:
    """Fill the latent and text caches, moving each encoder to the device only while it runs;
    returns what ``data.cache_latents`` and ``data.cache_text`` report.

    The VAE and the text encoders are never on the device together (SimpleTuner's
    ``offload_during_startup``, always on here: a 24 B text encoder beside the VAE is what
    runs a card out of memory), and a component moves only once something needs encoding,
    so a run whose caches are full moves nothing. A group-offloaded one
    (:func:`group_offload_encoders`) is never moved whole: its hooks bring each group in.
    """
    moved: list[Any] = []
    caching = True

    def onload(*components: Any) -> None:
        if caching:  # on-demand VAE encoding during training keeps the VAE where it is
            for component in components:
                if not any(component is m for m in moved) and move(component, device):
                    moved.append(component)

    def offload() -> None:
        for component in moved:
            component.to("cpu")
        moved.clear()

    def encode_images(pixels: Any) -> Any:
        onload(model.vae)
        return family.encode_images(model, pixels.to(device, model.vae.dtype))

    def encode_prompts(prompts: Any, **kwargs: Any) -> Any:
        onload(*model.text_encoders)
        return family.encode_prompts(model, prompts, **kwargs)

    # A family whose prompt embeddings read the references (an edit model's VL text encoder)
    # gets one text entry per caption and reference set (tune_train.reference_inputs).
    uses_references = getattr(family, "prompts_use_references", None)
    data.prompt_references = bool(uses_references and uses_references(model.flavour.name))
    try:
        latents_encoded = data.cache_latents(encode_images, batch_size=vae_batch_size)
        offload()
        prompts_encoded = data.cache_text(encode_prompts)
        if data.prompt_references:
            from tune_train.reference_inputs import cache_reference_prompts

            prompts_encoded += cache_reference_prompts(data, encode_prompts)
    finally:
        offload()
        caching = False
    return latents_encoded, prompts_encoded


def init_trackers(accelerator: Any, config: TrainConfig, output_dir: Path) -> None:
    """Start the ``report_to`` trackers with the run's scalar settings as their config."""
    from tune_train.trackers import init_kwargs

    logging_dir = output_dir / config.logging_dir
    logging_dir.mkdir(parents=True, exist_ok=True)
    tracker_kwargs = init_kwargs(config.report_to, logging_dir=logging_dir, run_name=config.tracker_run_name)
    accelerator.init_trackers(
        config.tracker_project_name,
        config={k: v for k, v in attrs.asdict(config).items() if isinstance(v, (int, float, str, bool))},
        init_kwargs=tracker_kwargs,
    )
