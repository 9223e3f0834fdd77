"""The typed trainer configuration: one attrs class whose field names are SimpleTuner's.

``TrainConfig`` is plain data plus validation. Reading ``config.json`` (the leading ``--``,
string values, aliases, SimpleTuner options we accept but do not implement) is the job of
``tune.config.load_config``; keeping that out of here lets the trainer and the tests build a
config directly in Python.

The string literal under each field is its documentation (meaning, default, choices). The
config reference page and ``tune check`` read those strings through :func:`field_docs`, so the
documentation cannot drift from the code. Validation errors name the user's key
(``lora_rank must be > 0, got 0``) because that is what the user has to go and change.
"""

from __future__ import annotations

import ast
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any

import attrs


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent; the message names the key."""


# Enum-like fields: every value SimpleTuner accepts for the key, and the subset tune implements.
# A value outside the first tuple is a typo; a value outside the second is a clear "not yet".
CHOICES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "model_type": (("lora", "full"),) * 2,
    "resolution_type": (("pixel", "area", "pixel_area"),) * 2,
    "mixed_precision": (("bf16", "fp16", "no"),) * 2,
    "lora_type": (("standard", "lycoris"),) * 2,
    "lora_init_type": (("default", "gaussian", "pissa", "olora", "loftq"),) * 2,
    "lora_format": (("diffusers", "comfyui"),) * 2,
    "report_to": (("none", "tensorboard", "wandb", "comet_ml", "all"),) * 2,
    "ema_device": (("cpu", "accelerator"),) * 2,
    "ema_validation": (("none", "ema_only", "comparison"),) * 2,
    "disk_low_action": (("stop", "wait", "script"),) * 2,
    "quantize_via": (("cpu", "accelerator", "pipeline"),) * 2,
    "base_model_default_dtype": (("bf16", "fp32"),) * 2,
    "group_offload_type": (("block_level", "leaf_level"),) * 2,
    "evaluation_type": (("none", "clip"),) * 2,
    "conditioning_multidataset_sampling": (("combined", "random"),) * 2,
    "timestep_bias_strategy": (("none", "earlier", "later", "range"),) * 2,
}


def _choice(attribute: attrs.Attribute, value: str) -> None:
    known, implemented = CHOICES[attribute.name]
    if value not in known:
        raise ConfigError(
            f"{attribute.name} must be one of {', '.join(known)}; got {value!r}"
        )
    if value not in implemented:
        raise ConfigError(
            f"{attribute.name} {value!r} is not implemented in tune yet; "
            f"supported: {', '.join(implemented)}"
        )


def _check(test: Callable[[Any], bool], rule: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """An attrs validator that raises ``ConfigError("<key> must be <rule>, got <value>")``.

    ``None`` always passes: optional fields are validated only when set.
    """

    def validate(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not test(value):
            raise ConfigError(f"{attribute.name} must be {rule}, got {value!r}")

    return validate


def _choices(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    _choice(attribute, value)


def _zero_is_none(value: Any) -> Any:
    return None if value == 0 and not isinstance(value, bool) else value


def _int_tuple(value: Any) -> Any:
    """A list of whole numbers (a list, or a string ``"7,8,9"`` / ``"[7, 8, 9]"``) as a tuple of
    ints; ``None`` stays ``None``; anything else is left for the validator to reject."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return tuple(int(v) if isinstance(v, str) and v.strip().isdigit() else v for v in value)
    return value


def _layer_indices(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(f"{attribute.name} must be a list of block indices (whole numbers >= 0), got {value!r}")


_positive = _check(lambda v: v > 0, "> 0")
_non_negative = _check(lambda v: v >= 0, ">= 0")
_at_least_one = _check(lambda v: v >= 1, ">= 1")
_probability = _check(lambda v: 0 <= v <= 1, "between 0 and 1")
_beta = _check(lambda v: 0 <= v < 1, "in [0, 1)")
_finite = _check(lambda v: math.isfinite(v), "a finite number")


def _json_object(value: Any) -> Any:
    """A JSON object given as text (SimpleTuner's command line) becomes a dict; others are left as they are."""
    if isinstance(value, str) and value.strip().startswith("{"):
        import json

        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # the validator says what is wrong
    return value


def _tread_routes(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        from tune_train.tread import parse_tread_config

        parse_tread_config(value)  # raises ConfigError naming tread_config


def _field(default: Any, *validators: Any, **kwargs: Any) -> Any:
    return attrs.field(default=default, validator=list(validators) or None, **kwargs)


@attrs.define(kw_only=True)
class TrainConfig:
    """Everything the trainer needs that is not a dataset (datasets are ``tune_data`` configs)."""

    # --- model ---------------------------------------------------------------------------------
    model_family: str
    """Model architecture to train, as registered by a tune-models plugin (``z-image``, ``flux``, ...). Required."""
    model_flavour: str | None = None
    """Variant of the family (``turbo``, ``dev``, ...). Default: the family's default flavour."""
    model_type: str = _field("lora", _choices)
    """What is trained. Default ``lora``. Choices: lora (an adapter, see ``lora_type``), full (every weight of the transformer, exported as a diffusers ``transformer/`` folder; no EMA, quantisation or assistant LoRA)."""
    pretrained_model_name_or_path: str | None = None
    """Local folder or hub id of the base model; a single ``.safetensors`` file means that file's transformer with everything else from the flavour's checkpoint. Default: the flavour's checkpoint."""
    pretrained_transformer_model_name_or_path: str | None = None
    """Load the transformer from another folder or hub id (fine-tunes), or from one ``.safetensors`` file in the original (BFL, ComfyUI, ...) or diffusers layout, read by diffusers' ``from_single_file`` with the base model's config. Default: the base model."""
    pretrained_transformer_subfolder: str | None = None
    """Subfolder of the transformer in that location. Default: ``transformer``; ``none`` means the root."""
    pretrained_vae_model_name_or_path: str | None = None
    """Load the VAE from another folder or hub id. Default: the base model's ``vae``."""
    pretrained_gemma_model_name_or_path: str | None = None
    """Load the Gemma-2 text encoder and tokenizer (``sana``, ``lumina2``) from another folder or hub id: a pipeline with ``text_encoder``/``tokenizer`` subfolders or the encoder's own repository (``google/gemma-2-2b-it``). Default: the base model's ``text_encoder``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model. Default: the main branch."""
    variant: str | None = None
    """Weight file variant to load (``fp16``, ``bf16``). Default: none (the plain weights)."""
    assistant_lora_path: str | None = None
    """Folder, file or hub id of an assistant LoRA merged in while training (distilled flavours). Default: the flavour's."""
    assistant_lora_weight_name: str | None = None
    """File name of the assistant LoRA inside ``assistant_lora_path``. Default: the flavour's."""
    disable_assistant_lora: bool = False
    """Train without the flavour's assistant LoRA (expect worse results on turbo flavours). Default false."""

    # --- files and data ------------------------------------------------------------------------
    output_dir: str = "output/models"
    """Where checkpoints, validation images and the final LoRA go (relative to the working directory). Default ``output/models``."""
    data_backend_config: str | None = None
    """Path to ``multidatabackend.json``, looked up beside config.json, then in the working directory. Required to train."""
    cache_dir: str = "cache"
    """Root folder for caches that a dataset does not place itself. Default ``cache``."""
    resolution: float = _field(1024.0, _positive)
    """Training size, in the unit given by ``resolution_type``; datasets inherit it. Default 1024."""
    resolution_type: str = _field("pixel_area", _choices)
    """How ``resolution`` is read. Default ``pixel_area`` (an area of N x N pixels). Choices: pixel (shorter edge), area (megapixels), pixel_area."""
    minimum_image_size: float | None = _field(None, _non_negative)
    """Skip images smaller than this (same unit as ``resolution``); datasets inherit it. Default: keep all."""
    aspect_bucket_alignment: int = _field(64, _positive)
    """Bucket edges are multiples of this many pixels. Default 64."""
    aspect_bucket_rounding: int = _field(2, _check(lambda v: 0 <= v <= 9, "between 0 and 9"))
    """Decimal places aspect ratios are rounded to when forming buckets. Default 2."""

    # --- schedule --------------------------------------------------------------------------------
    train_batch_size: int = _field(1, _positive)
    """Images per step on each device (one aspect bucket per batch). Default 1."""
    gradient_accumulation_steps: int = _field(1, _positive)
    """Batches summed into one optimizer step. Default 1."""
    max_train_steps: int | None = _field(None, _non_negative, converter=_zero_is_none)
    """Optimizer steps to train. Default none (0 too): num_train_epochs x steps per epoch."""
    num_train_epochs: int = _field(1, _non_negative)
    """Passes over the data when ``max_train_steps`` is not set. Default 1."""
    learning_rate: float = _field(1e-4, _positive, _finite)
    """Peak learning rate. Default 1e-4."""
    lr_scale: bool = False
    """Scale ``learning_rate`` (and ``text_encoder_lr`` when set) by the effective batch size: number of processes x ``gradient_accumulation_steps`` x ``train_batch_size`` (batch 2, accumulation 3 on one GPU trains at 6 x ``learning_rate``). ``lr_end`` is not scaled. The learning rate used is logged at the start of training. Default false."""
    lr_scale_sqrt: bool = False
    """With ``lr_scale``: scale by the square root of that product instead (x sqrt(6) for batch 2, accumulation 3); without ``lr_scale`` it changes nothing. Default false."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule, by registered name. Default ``constant``. Built in: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, sine."""
    lr_warmup_steps: int = _field(0, _non_negative)
    """Optimizer steps of linear warm-up (schedules with warm-up only). Default 0."""
    lr_num_cycles: int = _field(1, _at_least_one)
    """Cosine decays (``cosine_with_restarts``) or sine periods (``sine``) over the run. Default 1."""
    lr_power: float = _field(1.0, _positive, _finite)
    """Exponent of the ``polynomial`` decay; 1 is linear. Default 1.0."""
    lr_end: float = _field(4e-7, _non_negative, _finite)
    """Learning rate at the end of ``polynomial`` decay and the low point of ``sine``. Default 4e-7."""
    optimizer: str = "adamw"
    """Optimizer, by registered name. Default ``adamw`` (torch AdamW). Built in: adamw, adamw_bf16 (optimi, Kahan summation, bf16 LoRA weights), bnb-adamw8bit, bnb-lion8bit, bnb-paged-adamw8bit, ao-adamw8bit, ao-adamw4bit, ao-adamfp8 (FP8 GPU), prodigy, lion, adamw_schedulefree, came, soap."""
    optimizer_config: str | None = None
    """Extra optimizer arguments as ``key=value,key=value`` (``d_coef=2,safeguard_warmup=true``); they override tune's defaults. Default none."""
    optimizer_beta1: float = _field(0.9, _beta)
    """First moment decay (alias ``adam_beta1``). Default 0.9."""
    optimizer_beta2: float = _field(0.999, _beta)
    """Second moment decay (alias ``adam_beta2``). Default 0.999."""
    adam_weight_decay: float = _field(0.01, _non_negative)
    """Decoupled weight decay. Default 0.01."""
    adam_epsilon: float = _field(1e-8, _positive)
    """Optimizer epsilon. Default 1e-8."""
    max_grad_norm: float = _field(1.0, _non_negative)
    """Clip the gradient norm to this value; 0 disables clipping. Default 1.0."""
    mixed_precision: str = _field("bf16", _choices)
    """Autocast precision of the forward pass. Default ``bf16``. Choices: bf16, fp16, no."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 40 % slower. Default false."""
    gradient_checkpointing_interval: int | None = _field(None, _at_least_one, converter=_zero_is_none)
    """With gradient_checkpointing, checkpoint only every Nth transformer block (in execution order, the first included); the others keep their activations: faster, more memory. 1 is the same as unset. Default: every block."""
    enable_chunked_feed_forward: bool = False
    """Run each transformer block's MLP over slices of ``feed_forward_chunk_size`` tokens, each slice checkpointed, so only one slice's hidden activations exist during backward: on Z-Image at 1024 px (H100) -0.35 to -0.43 GiB of peak for 18-40 % more step time (docs/memory.md). The last lever for a card that is just short of memory. Every family whose MLPs act per token (all but Sana). Default false."""
    feed_forward_chunk_size: int | None = _field(None, _at_least_one)
    """Tokens per slice with enable_chunked_feed_forward; smaller saves more memory and adds launches. Default 2048."""
    seed: int = 42
    """Random seed for noise, timesteps, dropout and data order. Default 42."""
    ignore_final_epochs: bool = False
    """End the run at ``max_train_steps`` whatever ``num_train_epochs`` says (requires ``max_train_steps``; tune already lets it win). Default false."""

    # --- EMA -------------------------------------------------------------------------------------
    use_ema: bool = False
    """Keep an exponential moving average of the trained weights (the LoRA / LyCORIS weights; with ``model_type: full`` every weight of the transformer or UNet, an fp32 copy on ``ema_device``), saved in checkpoints and exported beside the trained weights: ``pytorch_lora_weights_ema.safetensors``, or for ``full`` a ``transformer_ema/`` (``unet_ema/``) model folder, SimpleTuner's layout. Default false."""
    ema_decay: float = _field(0.995, _beta)
    """EMA decay per update: ``ema = decay * ema + (1 - decay) * weights``. Default 0.995."""
    ema_device: str = _field("cpu", _choices)
    """Where the EMA weights live between updates. Default ``cpu``. Choices: cpu (moved to the accelerator for each update unless ``ema_cpu_only``), accelerator."""
    ema_cpu_only: bool = False
    """Update the EMA on the CPU too, never moving it (slowest, least GPU memory). Default false."""
    ema_update_interval: int | None = _field(None, _positive)
    """Update the EMA every N optimizer steps. Default: every step."""
    ema_warmup_steps: int = _field(0, _check(lambda v: v >= 0, ">= 0"))
    """For the first N optimizer steps the EMA copies the weights instead of averaging them (decay 0), so the average starts from trained weights rather than from the untrained start. Default 0 (average from the first update)."""
    ema_foreach_disable: bool = False
    """Update EMA tensors one by one instead of with torch's batched ``_foreach`` ops (less peak memory). Default false."""
    ema_validation: str = _field("comparison", _choices)
    """Validation images with the EMA weights (when ``use_ema``). Default ``comparison`` (both, EMA files end in ``-ema``). Choices: none, ema_only, comparison."""

    # --- LoRA ------------------------------------------------------------------------------------
    lora_type: str = _field("standard", _choices)
    """Adapter kind. Default ``standard`` (PEFT LoRA). Choices: standard, lycoris (the lycoris-lora library, settings in ``lycoris_config``)."""
    lora_init_type: str = _field("default", _choices)
    """How a new PEFT LoRA starts. Default ``default`` (A random, B zero: no change at step 0). Choices: default, gaussian, pissa and olora (start from the weight's principal directions; the base weight is changed while training, and the export folds that in so the file applies to the original base), loftq (not supported: its adapter only fits a LoftQ-quantised base)."""
    use_dora: bool = False
    """Train a DoRA (weight-decomposed LoRA: a magnitude vector per output besides A and B). Default false."""
    lycoris_config: str | None = None
    """Path to the LyCORIS settings JSON for ``lora_type: lycoris`` (``algo`` lokr/loha/full/..., ``factor``, ``linear_dim``, ``linear_alpha``, ``apply_preset``). Required with lycoris."""
    lora_rank: int = _field(16, _positive)
    """LoRA rank (inner dimension). Default 16."""
    lora_alpha: float | None = _field(None, _positive)
    """LoRA alpha; the update is scaled by alpha / rank. Default: equal to ``lora_rank`` (scale 1)."""
    lora_dropout: float = _field(0.0, _check(lambda v: 0 <= v < 1, "in [0, 1)"))
    """Dropout on the LoRA input. Default 0."""
    lora_target: str | None = None
    """Named preset of layers to adapt (SimpleTuner's ``<family>_lora_target``). Default: the family's default preset."""
    peft_lora_target_modules: tuple[str, ...] | None = None
    """Explicit module names to adapt (JSON list or comma-separated); overrides ``lora_target``. A name is a suffix of module paths (``to_q``, ``attn.to_out.0``); an entry starting with ``re:`` is a regular expression the whole module path must match (``re:single_transformer_blocks\\.\\d+\\.attn\\.to_out``), and a value starting with ``re:`` is one such expression, commas included. Default none."""
    family_options: dict[str, Any] = attrs.field(factory=dict)
    """Options of the chosen model family, collected from keys prefixed with its name (``flux_guidance_value``, ``sd3_clip_uncond_behaviour``); the family validates them. Default none."""
    lora_format: str = _field("diffusers", _choices)
    """Key layout of the saved LoRA. Default ``diffusers``. Choices: diffusers, comfyui."""
    init_lora: str | None = None
    """Start from this existing LoRA file instead of a fresh one. Default none."""
    train_text_encoder: bool = False
    """Also train a LoRA on the text encoders (same ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_init_type`` and ``use_dora`` as the denoiser's, on their attention and MLP linears). Only families whose diffusers pipeline loads text-encoder LoRAs (SDXL: both CLIPs; Flux.1: CLIP-L; SD3: CLIP-L and CLIP-G; ``tune check`` names them); the LoRA file then carries ``text_encoder.`` / ``text_encoder_2.`` keys. Prompts pass through the trained encoders every step (their part of the text cache is not used), so steps are slower and the encoders stay on the accelerator. Needs ``model_type: lora`` with ``lora_type: standard``. Default false."""
    text_encoder_lr: float | None = _field(None, _positive, _finite)
    """Learning rate of the text-encoder LoRA (``train_text_encoder``), its own optimizer parameter group; the learning-rate schedule scales it as it scales ``learning_rate``. Default: ``learning_rate``."""

    # --- noise schedule --------------------------------------------------------------------------
    flow_schedule_shift: float | None = _field(None, _non_negative)
    """Flow-matching timestep shift; higher trains coarser structure. Default: the flavour's shift."""
    flow_schedule_auto_shift: bool = False
    """Shift by image size (more pixels, more shift), as the pipelines do at inference. Default false."""
    caption_dropout_probability: float = _field(0.0, _probability)
    """Chance a caption is replaced by the empty prompt (trains unconditional guidance). Default 0."""
    conditioning_multidataset_sampling: str = _field("combined", _choices)
    """With several conditioning datasets on one image dataset (``conditioning_data`` as a list):
    ``combined`` feeds the model every dataset's reference for each sample; ``random`` one
    dataset's, chosen per batch from the seed and step. Default ``combined``."""
    flow_use_uniform_schedule: bool = False
    """Sample flow-matching sigmas uniformly in (0, 1) instead of logit-normal. Default false."""
    flow_sigmoid_scale: float = _field(1.0, _positive, _finite)
    """Scale of the normal draw inside the logit-normal sigma sampling (larger spreads towards 0 and 1). Default 1.0."""
    flow_use_beta_schedule: bool = False
    """Sample sigmas from a Beta(``flow_beta_schedule_alpha``, ``flow_beta_schedule_beta``) distribution. Default false."""
    flow_beta_schedule_alpha: float = _field(2.0, _positive, _finite)
    """Alpha of the Beta sigma distribution. Default 2.0."""
    flow_beta_schedule_beta: float = _field(2.0, _positive, _finite)
    """Beta of the Beta sigma distribution. Default 2.0."""
    noise_offset: float = _field(0.0, _non_negative, _finite)
    """Add this much per-channel constant noise (helps very dark/bright images). Default 0 (off)."""
    noise_offset_probability: float = _field(0.25, _probability)
    """Chance per sample that ``noise_offset`` is applied. Default 0.25."""
    input_perturbation: float = _field(0.0, _non_negative, _finite)
    """Perturb the noise that makes the model input (not the target) by this much Gaussian noise. Default 0 (off)."""
    input_perturbation_steps: int = _field(0, _non_negative)
    """Apply ``input_perturbation`` only over the first this many optimizer steps, its strength decaying linearly from ``input_perturbation`` at step 0 to 0 at this step (half strength halfway); without ``input_perturbation`` it changes nothing. Default 0: the full strength for the whole run."""
    prediction_type: str | None = _field(None, _check(lambda v: v in ("epsilon", "v_prediction", "flow_matching"), "one of epsilon, v_prediction, flow_matching"))
    """What a DDPM (UNet) family's network predicts: ``epsilon`` (the noise) or ``v_prediction`` (the velocity). Default: the checkpoint's scheduler config. Flow families accept only ``flow_matching``."""
    snr_gamma: float | None = _field(None, _positive, _finite)
    """Min-SNR-gamma loss weighting for epsilon / v-prediction families: each sample's loss is weighted by ``min(SNR, gamma) / SNR`` (epsilon) or ``/ (SNR + 1)`` (v). 5 is the usual value. Default none (plain MSE); ignored, with a warning, for flow families."""
    use_soft_min_snr: bool = False
    """With ``snr_gamma``: use the smooth minimum ``SNR * gamma / (SNR + gamma)`` instead of ``min(SNR, gamma)`` (k-diffusion's soft-min-SNR with ``sigma_data**2 = 1 / gamma``). Default false."""
    refiner_training: bool = False
    """Train only the low-noise timesteps (the lowest ``refiner_training_strength`` share), the range a refiner model denoises. Epsilon / v-prediction families only. Default false."""
    refiner_training_strength: float = _field(0.2, _check(lambda v: 0 < v <= 1, "in (0, 1]"))
    """Share of the timesteps ``refiner_training`` trains, from the clean end. Default 0.2 (timesteps below 200 of 1000)."""
    refiner_training_invert_schedule: bool = False
    """With ``refiner_training``: train the other part of the schedule instead, the noisy timesteps from ``refiner_training_strength`` of the way up to pure noise (with 0.2: 200 to 999 of 1000), the range a first-stage (base) model denoises before a refiner takes over. Default false."""
    timestep_bias_strategy: str = _field("none", _choices)
    """Draw some training timesteps more (or less) often, for epsilon / v-prediction families (the scheme of diffusers' SDXL example): every timestep has weight 1 and the biased ones ``timestep_bias_multiplier``; ``later``: the last ``timestep_bias_portion`` of the schedule (the noisy end, coarse structure), ``earlier``: the first portion (the clean end, fine detail), ``range``: timesteps ``timestep_bias_begin`` to ``timestep_bias_end``. Choices: ``none``, ``earlier``, ``later``, ``range``. Default ``none`` (uniform); no effect, with a warning, for flow families."""
    timestep_bias_multiplier: float = _field(1.0, _non_negative, _finite)
    """With ``timestep_bias_strategy``: the weight of the biased timesteps against 1 for the others; 2 draws them twice as often, 0 never. Default 1.0 (no bias)."""
    timestep_bias_begin: int = _field(0, _non_negative)
    """With ``timestep_bias_strategy: range``: first biased timestep (included). Must be below ``timestep_bias_end``. Default 0."""
    timestep_bias_end: int = _field(1000, _positive)
    """With ``timestep_bias_strategy: range``: end of the biased timesteps (excluded), at most the scheduler's timestep count (1000 for SDXL). Default 1000."""
    timestep_bias_portion: float = _field(0.25, _check(lambda v: 0 < v <= 1, "in (0, 1]"))
    """With ``timestep_bias_strategy: earlier`` / ``later``: the share of the timesteps biased, from that end. Default 0.25."""
    diff2flow_enabled: bool = False
    """Diff2Flow bridge for epsilon / v-prediction families: lets ``diff2flow_loss`` read the network's prediction as a flow velocity. Alone it changes nothing (as in SimpleTuner). Refused for flow families. Default false."""
    diff2flow_loss: bool = False
    """With ``diff2flow_enabled``: convert each epsilon / v prediction to the flow velocity ``noise - x0`` it implies at its timestep and train with the MSE to the true ``noise - x0`` (the flow-matching objective; ``snr_gamma`` is then ignored). The model keeps predicting epsilon / v, so validation and export are unchanged. Experimental. Default false."""
    tread_config: dict[str, Any] | None = _field(None, _tread_routes, converter=_json_object)
    """TREAD token routing while training, as SimpleTuner writes it: ``{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}`` (or that JSON as text). In each route a random ``selection_ratio`` share (in [0, 1)) of the image tokens skips the transformer blocks ``start_layer_idx`` to ``end_layer_idx`` (both included; negative counts from the last block) and rejoins, unchanged, after them: cheaper steps, while validation, ``eval_loss`` and inference use the whole model. Only families that declare support (z-image, flux, flux2, qwen_image, sd3, chroma, lumina2; see docs/training.md); others refuse it. Default none (off)."""

    # --- checkpoints ---------------------------------------------------------------------------
    checkpoint_step_interval: int | None = _field(None, _positive)
    """Save ``checkpoint-<step>`` every N optimizer steps (alias ``checkpointing_steps``). Default: only at the end."""
    checkpoints_total_limit: int | None = _field(None, _at_least_one)
    """Keep at most this many checkpoints, deleting the oldest. Default: keep all."""
    checkpoint_epoch_interval: int | None = _field(None, _positive)
    """Also save a checkpoint every N completed epochs. Default: off."""
    resume_from_checkpoint: str | None = None
    """``latest`` (newest checkpoint in output_dir, if any) or a checkpoint folder. Default: start fresh."""

    # --- validation ----------------------------------------------------------------------------
    validation_step_interval: int | None = _field(None, _positive)
    """Generate validation images every N optimizer steps (alias ``validation_steps``). Default: only at the end."""
    validation_prompt: str | None = None
    """Prompt for validation images. Default none (then only ``user_prompt_library`` prompts)."""
    user_prompt_library: str | None = None
    """JSON file mapping short names to extra validation prompts (``{"name": "prompt"}``). Default none."""
    validation_negative_prompt: str | None = None
    """Negative prompt for validation (families that use CFG). Default: the empty prompt."""
    validation_resolution: str | None = None
    """Validation image size(s): ``1024``, ``512x768`` or several comma-separated. Default: the size the flavour's checkpoint was trained at (512 for Sana's 512 px flavours), else ``1024``."""
    validation_num_inference_steps: int | None = _field(None, _positive)
    """Sampling steps for validation images. Default: the flavour's."""
    validation_guidance: float | None = _field(None, _non_negative)
    """Guidance scale for validation images. Default: the flavour's."""
    validation_guidance_real: float | None = _field(None, _at_least_one, _finite)
    """Flux.1 only (dev, krea, schnell, kontext): real classifier-free guidance for validation images, on top of the distilled ``validation_guidance`` input. Above 1, each step also runs ``validation_negative_prompt`` (default: the empty prompt) and mixes the two, which doubles validation time; for LoRAs trained to need CFG (de-distillation). Other families warn that it does not apply (their ``validation_guidance`` is already CFG). Default: unset, which is 1 (off), SimpleTuner's default."""
    validation_guidance_skip_layers: tuple[int, ...] | None = _field(None, _layer_indices, converter=_int_tuple)
    """SD3 only: transformer blocks skipped in the extra pass of skip-layer guidance for validation images (JSON list or comma-separated, e.g. ``[7, 8, 9]``; ``[]`` turns it off). Needs ``validation_guidance`` > 1. Default: the flavour's (3.5 Medium: 7, 8, 9; Large: none). Other families warn that it does not apply."""
    validation_guidance_skip_layers_start: float | None = _field(None, _probability)
    """SD3 only: fraction of the validation steps after which skip-layer guidance starts. Default: the pipeline's, 0.01."""
    validation_guidance_skip_layers_stop: float | None = _field(None, _probability)
    """SD3 only: fraction of the validation steps at which skip-layer guidance stops. Default: the pipeline's, 0.2."""
    validation_guidance_skip_scale: float | None = _field(None, _non_negative, _finite)
    """SD3 only: strength of skip-layer guidance. Default: the pipeline's, 2.8."""
    validation_seed: int = 42
    """Seed of validation noise, the same every time so images compare across steps. Default 42."""
    validation_epoch_interval: int | None = _field(None, _positive)
    """Also generate validation images every N completed epochs. Default: off."""
    validation_disable: bool = False
    """Never generate validation images. Default false."""
    validation_on_startup: bool = True
    """Generate validation images before the first step (the baseline to compare with). Default true."""

    # --- evaluation and regularisation ---------------------------------------------------------
    eval_dataset_id: str | None = None
    """Id of an image dataset held out from training: its loss is measured at fixed timesteps with fixed noise (``eval_loss``), so the number compares across steps and runs. Datasets of ``dataset_type: eval`` in the data backend config are held out the same way, with or without this key. Default none."""
    eval_steps_interval: int | None = _field(None, _positive)
    """Measure ``eval_loss`` every N optimizer steps (and always before the first step and at the end). Needs a held-out dataset (``eval_dataset_id`` or ``dataset_type: eval``). Default: only before the first step and at the end."""
    eval_epoch_interval: float | None = _field(None, _positive, _finite)
    """Also measure ``eval_loss`` every N epochs; fractions work (0.5: twice per epoch). Needs a held-out dataset (``eval_dataset_id`` or ``dataset_type: eval``). Default: off."""
    eval_dataset_pooling: bool = False
    """With several held-out datasets: report one ``eval_loss`` over all their images (each dataset's loss weighted by its number of images) instead of one ``eval_loss/<dataset id>`` per dataset, in ``eval_log.csv``, the trackers and ``Trainer.eval_losses``. With one held-out dataset the number is ``eval_loss`` either way. Default false."""
    eval_timesteps: int = _field(28, _positive)
    """Noise levels per eval image: an even grid over the training range (the same for every evaluation). Default 28."""
    num_eval_images: int | None = _field(None, _positive)
    """Score only the first N held-out images (in the fixed order: by bucket, then path), to bound the cost. Default: all."""
    eval_loss_disable: bool = False
    """Skip ``eval_loss`` while keeping ``eval_dataset_id`` out of training (e.g. for CLIP scores only). Default false."""
    evaluation_type: str = _field("none", _choices)
    """Score validation images. Default ``none``. Choices: none, clip (``clip_score``: 100 x the cosine similarity of each image and its prompt in the CLIP model of ``pretrained_evaluation_model_name_or_path``, averaged)."""
    pretrained_evaluation_model_name_or_path: str | None = None
    """The CLIP model (a folder or hub id readable by transformers' ``CLIPModel`` and ``CLIPProcessor``) for ``evaluation_type: clip``. Default none."""
    prior_loss_weight: float = _field(1.0, _non_negative, _finite)
    """Loss weight of samples from datasets marked ``is_regularisation_data`` (prior preservation); other samples weigh 1. Default 1.0."""

    # --- logging -------------------------------------------------------------------------------
    report_to: str = _field("none", _choices)
    """Tracker for losses. Default ``none``. Choices: none, tensorboard, wandb (``WANDB_MODE=offline`` works), comet_ml (``pip install "tune-train[comet]"``; ``COMET_START_ONLINE=false`` keeps the run offline, under ``logging_dir``), all (tensorboard and wandb)."""
    logging_dir: str = "logs"
    """Tracker folder, relative to ``output_dir`` unless absolute. Default ``logs``."""
    tracker_project_name: str = "tune"
    """Project name shown by the tracker. Default ``tune``."""
    tracker_run_name: str | None = None
    """Run name shown by the tracker. Default: generated from the date and time."""

    # --- precision and memory ------------------------------------------------------------------
    disable_tf32: bool = False
    """Force full IEEE fp32 for fp32 matrix multiplications and cuDNN convolutions (no TensorFloat-32 on Ampere and later GPUs), for the whole process, from the start of setup. tune itself never turns TF32 on, so without this key torch's own defaults apply (fp32 matmuls in IEEE fp32, cuDNN convolutions allowed TF32) unless something else in the process has changed them. Default false."""
    torch_num_threads: int | None = _field(None, _at_least_one)
    """CPU threads torch uses for intra-op work (``torch.set_num_threads``), set at the start of setup; affects CPU-side work such as quantising or encoding on the CPU. Default none: torch's default (the number of cores, or ``OMP_NUM_THREADS``)."""
    set_grads_to_none: bool = True
    """After each optimizer step, free the gradients (set them to None) rather than filling them with zeros; None saves the memory of the gradient tensors between steps. ``false`` keeps zero-filled gradient tensors allocated. Default true (SimpleTuner's default is false; tune has always freed them)."""
    vae_enable_tiling: bool = False
    """Call the VAE's ``enable_tiling()`` once it is loaded, so images are encoded (latent caching) and decoded (validation) in overlapping tiles: lower peak memory on large images, possibly faint seams. A family whose VAE has no ``enable_tiling`` logs a warning naming the VAE class and runs without. Default false."""
    vae_enable_slicing: bool = False
    """Call the VAE's ``enable_slicing()`` once it is loaded, so a batch is encoded (latent caching) and decoded (validation) one image at a time: lower peak memory, same results. A family whose VAE has no ``enable_slicing`` logs a warning naming the VAE class and runs without. Default false."""
    base_model_precision: str = "no_change"
    """Quantise the frozen base weights with a tune-quant preset (``int8-torchao``, ``nf4-bnb``, ...). Default ``no_change``."""
    text_encoder_1_precision: str = "no_change"
    """Quantise the first text encoder with a tune-quant preset (``int8-torchao``, ``nf4-bnb``, ...), on the CPU right after loading, so a large encoder (FLUX.2's 24 B Mistral, Qwen-Image's Qwen2.5-VL) fits beside nothing else while it fills the text cache. Embeddings change slightly (cached per setting). Default ``no_change``."""
    text_encoder_2_precision: str = "no_change"
    """As text_encoder_1_precision, for the second text encoder (SD3's and SDXL's second CLIP, Flux's T5). Default ``no_change``."""
    text_encoder_3_precision: str = "no_change"
    """As text_encoder_1_precision, for the third text encoder (SD3's T5). Default ``no_change``."""
    text_encoder_4_precision: str = "no_change"
    """As text_encoder_1_precision, for a fourth text encoder. Default ``no_change``."""
    quantize_via: str = _field("cpu", _choices)
    """Where quantisation runs. Default ``cpu``: the whole transformer is quantised in CPU memory (slow; needs RAM for the bf16 model). ``accelerator``: block by block on the GPU (fast; the GPU holds the resident part plus one bf16 block, and the last ``musubi_blocks_to_swap`` blocks go back to the CPU once quantised); on a CPU-only run it is the same as cpu. ``pipeline``: diffusers quantises the weights while it loads the transformer (its ``quantization_config``; measured on the CPU it peaks higher in host RAM than cpu, see docs/memory.md): from the ``base_model_precision`` preset (the torchao and bitsandbytes presets, same layers as cpu; diffusers' bitsandbytes loader needs a GPU) or from ``quantization_config``."""
    quantization_config: dict[str, Any] | str | None = _field(None, converter=_json_object)
    """With ``quantize_via: pipeline``: diffusers quantization configs by component, as a JSON object or the path of a JSON file. tune reads the denoiser's entry (``transformer``, ``unet`` or ``default``): a diffusers config in its saved form, its class from ``quant_method`` (``torchao``, ``bitsandbytes``, ``quanto``) or from its keys (``load_in_4bit``/``load_in_8bit``: bitsandbytes; ``quant_type``: torchao, naming a torchao config class such as ``Int8WeightOnlyConfig``, with ``quant_type_kwargs``; ``weights_dtype``: quanto). Every Linear is quantised except those in ``modules_to_not_convert`` (``llm_int8_skip_modules`` for bitsandbytes). Text encoders take ``text_encoder_N_precision`` instead. Not with ``base_model_precision``. Default none."""
    base_model_default_dtype: str = _field("bf16", _choices)
    """Dtype of the frozen weights that are not quantised. Default ``bf16``. Choices: bf16, fp32."""
    enable_group_offload: bool = False
    """Keep transformer blocks on the CPU and move each group in when it runs. For the transformer being trained this runs as block swap of every block (``block_level``) or ``ramtorch`` (``leaf_level``), with a warning: diffusers' group offloading moves the weights autograd saved for backward, which fails on a GPU (docs/memory.md). The encoders (``group_offload_text_encoder`` / ``group_offload_vae``) use diffusers' group offloading. Default false."""
    group_offload_type: str = _field("block_level", _choices)
    """Offload granularity. Default ``block_level``. Choices: block_level, leaf_level (most saving, slowest)."""
    group_offload_blocks_per_group: int = _field(1, _at_least_one)
    """Blocks moved together with block_level offload; more is faster and uses more memory. Default 1."""
    group_offload_use_stream: bool = False
    """Overlap offload transfers with compute on a CUDA stream (CUDA only). Default false."""
    group_offload_to_disk_path: str | None = None
    """Spill offloaded weights to this folder instead of CPU memory. Not for the transformer being trained (refused: its group offload runs as block swap or ramtorch, which hold weights in CPU memory, and diffusers' disk offload writes each group's file once and reads it back on every use, so trained weights inside the groups would not change). Default none."""
    group_offload_text_encoder: bool = False
    """With ``enable_group_offload``: group-offload the text encoders too (same type, blocks per group, stream and disk settings), so filling the text cache and validation never hold a whole encoder on the accelerator (FLUX.2's 24 B Mistral). ``block_level`` groups the blocks of an encoder's largest block list, wherever it sits (CLIP's ``encoder.layers``, T5's ``encoder.block``). Not with ``train_text_encoder``. Default false."""
    group_offload_vae: bool = False
    """With ``enable_group_offload``: group-offload the VAE too, while filling the latent cache and in validation. Default false."""
    enable_model_cpu_offload: bool = False
    """Move whole models to the CPU while unused (validation, caching). Default false."""
    musubi_blocks_to_swap: int = _field(0, _non_negative)
    """Keep the frozen weights of the last N transformer blocks in CPU memory and stream each in for forward and backward (CUDA; use with gradient_checkpointing). Default 0 (off)."""
    musubi_block_swap_device: str = "cpu"
    """Where swapped blocks wait between uses. Default ``cpu``."""
    ramtorch: bool = False
    """Keep the frozen weights of the transformer's linears in pinned CPU memory and copy each onto the GPU only while it runs, in forward and backward (CUDA; no gradient checkpointing needed). Not with enable_group_offload or musubi_blocks_to_swap. Default false."""
    ramtorch_target_modules: str | None = None
    """Comma-separated globs on module names or class names (``transformer_blocks.*``) limiting which linears ramtorch keeps on the CPU. Default: every frozen linear."""
    ramtorch_transformer_percent: float = _field(100.0, _check(lambda v: 0 <= v <= 100, "between 0 and 100"))
    """Share (0-100) of the matching linears ramtorch keeps on the CPU, first in module order; the rest stay on the GPU. Default 100."""
    offload_checkpointed_activations: bool = False
    """With gradient_checkpointing, keep each block's saved input in pinned CPU memory until backward (CUDA). Default false."""
    offload_during_startup: bool = False
    """Keep the text encoders and the VAE off the accelerator at the same time while caches are filled. tune always does this (each moves to the device only for its own cache, then back to the CPU), so the value changes nothing; accepted for SimpleTuner configs. Default false."""
    offload_during_save: bool = False
    """SimpleTuner moves the pipeline to the CPU while saving to avoid a memory spike when quantised base weights are serialised. tune's checkpoints hold only the trained weights and the optimizer state, never the base model's, so there is nothing to move; accepted for SimpleTuner configs, changes nothing. Default false."""

    disk_low_threshold: str | None = None
    """Before each checkpoint, check the free space in ``output_dir`` against this (``100G``, ``500M``, bytes). Default: no check."""
    disk_low_action: str = _field("stop", _choices)
    """What to do when space is low. Default ``stop`` (end with an error, nothing half-saved). Choices: stop, wait (poll every minute until there is space), script (run ``disk_low_script``, then check again)."""
    disk_low_script: str | None = None
    """Shell command run when space is low with ``disk_low_action`` script (e.g. to prune old files). Default none."""

    # --- publishing ----------------------------------------------------------------------------
    push_to_hub: bool = False
    """At the end of training, upload the LoRA, the model card and the validation images it shows to the Hugging Face Hub repo ``hub_model_id`` (done by tune-publish; token from ``hf auth login`` or ``HF_TOKEN``). A failed upload is a warning: the outputs stay in ``output_dir``. Default false."""
    hub_model_id: str | None = None
    """Hub repository to upload to (``user/name``); required with ``push_to_hub``. The model card's usage snippet loads from it. Default none."""
    model_card_private: bool = False
    """With ``push_to_hub``: create the Hub repo as private (an existing repo keeps its visibility). Default false."""
    push_checkpoints_to_hub: bool = False
    """With ``push_to_hub``: also upload every saved checkpoint, whole (LoRA file, adapter, optimizer and data state), to the folder ``checkpoint-<step>/`` of ``hub_model_id``, so a run can be resumed from the Hub copy. Checkpoints pruned locally by ``checkpoints_total_limit`` stay on the Hub. Needs ``push_to_hub``. Default false."""
    push_to_hub_background: bool = False
    """With ``push_to_hub``: upload from a background thread, one upload at a time, so training goes on while checkpoints upload. The run waits for every upload before it returns (and the process before it exits); a failed upload is a warning naming the repo and what failed, and the files stay in ``output_dir``. Default false (each upload blocks until it is done)."""
    model_card_note: str | None = None
    """Text added near the top of the generated model card. Default none."""

    # --- caching ---------------------------------------------------------------------------------
    vae_batch_size: int = _field(4, _positive)
    """Images encoded per VAE call while building the latent cache. Default 4."""

    def text_encoder_precisions(self) -> tuple[str, ...]:
        """``text_encoder_N_precision`` in encoder order (the first is ``text_encoder``)."""
        return (self.text_encoder_1_precision, self.text_encoder_2_precision,
                self.text_encoder_3_precision, self.text_encoder_4_precision)

    def offload_settings(self):
        """These offload keys as tune-offload's ``OffloadSettings`` (validated there)."""
        from tune_offload.strategies import OffloadSettings

        return OffloadSettings.from_config(
            {field.name: getattr(self, field.name) for field in attrs.fields(OffloadSettings)}
        )

    def __attrs_post_init__(self) -> None:
        # Rules that involve more than one field; single-field rules are attrs validators.
        try:  # the offload rules live once, in tune-offload
            self.offload_settings()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        for key in ("group_offload_text_encoder", "group_offload_vae"):
            if getattr(self, key) and not self.enable_group_offload:
                raise ConfigError(
                    f"{key} needs enable_group_offload: true (it offloads with the transformer's group "
                    "offload settings); set enable_group_offload or drop the key"
                )
        if self.group_offload_text_encoder and getattr(self, "train_text_encoder", False):
            raise ConfigError(
                "group_offload_text_encoder cannot be combined with train_text_encoder: the trained "
                "encoders stay on the accelerator; drop one of them"
            )
        self._check_pipeline_quantisation()
        if self.enable_group_offload and str(self.base_model_precision).endswith("-quanto"):
            raise ConfigError(
                f"enable_group_offload cannot move optimum-quanto weights (base_model_precision "
                f"{self.base_model_precision!r}): use a torchao preset such as int8-torchao, or "
                "musubi_blocks_to_swap instead of group offload"
            )
        if self.gradient_checkpointing_interval and not self.gradient_checkpointing:
            raise ConfigError(
                "gradient_checkpointing_interval needs gradient_checkpointing: true (it picks which "
                "blocks are checkpointed)"
            )
        if self.max_train_steps is None and self.num_train_epochs < 1:
            raise ConfigError(
                "max_train_steps or num_train_epochs must be set (> 0); both are 0"
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub needs hub_model_id (the repository to upload to)")
        if self.push_checkpoints_to_hub and not self.push_to_hub:
            raise ConfigError(
                "push_checkpoints_to_hub needs push_to_hub: true (and hub_model_id, the repository the "
                "checkpoints go to)"
            )
        if self.timestep_bias_strategy == "range" and not self.timestep_bias_begin < self.timestep_bias_end:
            raise ConfigError(
                f"timestep_bias_begin ({self.timestep_bias_begin}) must be below timestep_bias_end "
                f"({self.timestep_bias_end}) with timestep_bias_strategy: range"
            )
        if self.timestep_bias_strategy in ("earlier", "later") and self.timestep_bias_multiplier == 0 and self.timestep_bias_portion == 1:
            raise ConfigError(
                "timestep_bias_multiplier 0 with timestep_bias_portion 1 removes every timestep; "
                "use a multiplier > 0 or a smaller portion"
            )
        if self.diff2flow_loss and not self.diff2flow_enabled:
            raise ConfigError("diff2flow_loss needs diff2flow_enabled: true (the diffusion-to-flow bridge)")
        if self.peft_lora_target_modules is not None and not self.peft_lora_target_modules:
            raise ConfigError("peft_lora_target_modules must name at least one module, got []")
        self._check_adapter_choices()
        if self.flow_use_uniform_schedule and self.flow_use_beta_schedule:
            raise ConfigError("flow_use_uniform_schedule and flow_use_beta_schedule are mutually exclusive; pick one")
        if self.refiner_training and self.refiner_training_invert_schedule and self.refiner_training_strength >= 1:
            raise ConfigError(
                "refiner_training_invert_schedule trains the timesteps above refiner_training_strength; "
                f"with refiner_training_strength {self.refiner_training_strength} none are left (use a value below 1)"
            )
        if self.ignore_final_epochs and self.max_train_steps is None:
            raise ConfigError("ignore_final_epochs needs max_train_steps (the step count that ends the run)")
        if self.disk_low_threshold is not None:
            self.disk_low_bytes()  # raises on a malformed size
            if self.disk_low_action == "script" and not self.disk_low_script:
                raise ConfigError("disk_low_action 'script' needs disk_low_script (the command to run)")
        if self.optimizer_config:
            from tune_train.optim import parse_optimizer_config

            parse_optimizer_config(self.optimizer_config)  # raises on a malformed list
        self.validation_sizes()  # raises on a malformed validation_resolution
        # eval_steps_interval / eval_epoch_interval need a held-out dataset, which may be a
        # dataset_type eval entry of the data config: checked with the datasets (check_eval_datasets).
        if self.evaluation_type == "clip" and not self.pretrained_evaluation_model_name_or_path:
            raise ConfigError(
                "evaluation_type 'clip' needs pretrained_evaluation_model_name_or_path (a CLIP model folder or hub id)"
            )
        start, stop = self.validation_guidance_skip_layers_start, self.validation_guidance_skip_layers_stop
        if (0.01 if start is None else start) >= (0.2 if stop is None else stop):  # the pipeline's defaults
            raise ConfigError(
                f"validation_guidance_skip_layers_start ({start if start is not None else 'default 0.01'}) must be "
                f"below validation_guidance_skip_layers_stop ({stop if stop is not None else 'default 0.2'})"
            )

    def _check_pipeline_quantisation(self) -> None:
        """``quantize_via: pipeline`` needs something to load with, from one key only."""
        if self.quantization_config is not None and self.quantize_via != "pipeline":
            raise ConfigError(
                f"quantization_config is used only with quantize_via: pipeline (quantize_via is "
                f"{self.quantize_via!r}); set quantize_via to pipeline or use base_model_precision"
            )
        if self.quantize_via != "pipeline":
            return
        preset = self.base_model_precision not in (None, "no_change")
        entry = self.pipeline_quantization_entry()
        if preset and entry is not None:
            raise ConfigError(
                f"base_model_precision {self.base_model_precision!r} and quantization_config both "
                "quantise the transformer; keep one"
            )
        if not preset and entry is None:
            raise ConfigError(
                "quantize_via 'pipeline' needs base_model_precision (a preset such as int8-torchao) or "
                "a transformer entry in quantization_config"
            )
        if self.model_type == "full":
            raise ConfigError("quantize_via 'pipeline' quantises the base weights; model_type 'full' trains them all")

    def pipeline_quantization_entry(self) -> dict[str, Any] | None:
        """The transformer's entry of ``quantization_config`` (read from the file it names, when a
        path), checked; ``None`` without one."""
        value = self.quantization_config
        if value is None:
            return None
        if isinstance(value, str):
            import json
            from pathlib import Path

            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"quantization_config must be a JSON object or the path of a JSON file; no file {value!r}")
            try:
                value = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"quantization_config {value!r} is not valid JSON: {exc}") from exc
        from tune_quant.pipeline import denoiser_entry

        try:
            return denoiser_entry(value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def _check_adapter_choices(self) -> None:
        """Combinations of model_type / lora_type / init options that cannot work together."""
        if self.model_type == "full":
            if self.lora_type != "standard":
                raise ConfigError(f"lora_type {self.lora_type!r} applies to model_type 'lora', not 'full'")
            if self.base_model_precision not in (None, "no_change"):
                raise ConfigError(
                    f"model_type 'full' trains the weights themselves; base_model_precision "
                    f"{self.base_model_precision!r} would quantise them (use no_change)"
                )
            if self.init_lora:
                raise ConfigError("init_lora applies to model_type 'lora'; for 'full' set pretrained_transformer_model_name_or_path")
        if self.lora_type == "lycoris":
            if not self.lycoris_config:
                raise ConfigError("lora_type 'lycoris' needs lycoris_config (path to its JSON settings)")
            if self.use_dora or self.lora_init_type != "default":
                raise ConfigError(
                    "use_dora and lora_init_type apply to lora_type 'standard'; for LyCORIS set "
                    "dora_wd in lycoris_config"
                )
            if self.lora_format == "comfyui":
                raise ConfigError("lora_format 'comfyui' applies to lora_type 'standard'; a LyCORIS file keeps the library's own keys")
        if self.use_dora and self.lora_format == "comfyui":
            raise ConfigError(
                "use_dora with lora_format 'comfyui' is not supported (the ComfyUI key mapping carries "
                "plain LoRA only); use lora_format diffusers"
            )
        if self.train_text_encoder:
            if self.model_type != "lora" or self.lora_type != "standard":
                raise ConfigError(
                    "train_text_encoder trains a PEFT LoRA on the text encoders: it needs model_type 'lora' "
                    f"with lora_type 'standard' (got model_type {self.model_type!r}, lora_type {self.lora_type!r})"
                )
            if self.lora_init_type in ("pissa", "olora"):
                raise ConfigError(
                    f"train_text_encoder cannot be combined with lora_init_type {self.lora_init_type!r} "
                    "(it would change the text encoders' base weights); use default or gaussian"
                )
        elif self.text_encoder_lr is not None:
            raise ConfigError("text_encoder_lr is set but train_text_encoder is not: set train_text_encoder: true")
        if self.lora_init_type in ("pissa", "olora"):
            if self.use_dora:
                raise ConfigError(f"use_dora cannot be combined with lora_init_type {self.lora_init_type!r}")
            if self.init_lora:
                raise ConfigError(f"init_lora cannot be combined with lora_init_type {self.lora_init_type!r} (it changes the base weights)")

    # --- derived values ----------------------------------------------------------------------------

    def validation_options(self) -> dict[str, Any]:
        """The validation keys the user set that only some families act on (SD3's skip-layer
        guidance), for ``family.generate(options=...)``; a family warns once about those it does
        not use, so the trainer needs no family names."""
        names = (
            "validation_guidance_real",
            "validation_guidance_skip_layers",
            "validation_guidance_skip_layers_start",
            "validation_guidance_skip_layers_stop",
            "validation_guidance_skip_scale",
        )
        options = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if options.get("validation_guidance_real") == 1:  # SimpleTuner's default, "off": nothing to apply
            del options["validation_guidance_real"]
        return options

    def validation_sizes(self, default: int | None = None) -> list[tuple[int, int]]:
        """``validation_resolution`` as ``[(width, height), ...]``; ``"1024"`` is square. Unset, it
        is ``default`` square (the flavour's ``resolution``), or 1024 without one."""
        if self.validation_resolution is None:
            return [(default or 1024, default or 1024)]
        sizes = []
        for part in str(self.validation_resolution).split(","):
            part = part.strip().lower()
            if not part:
                continue
            width_s, sep, height_s = part.partition("x")
            try:
                width = int(float(width_s))
                height = int(float(height_s)) if sep else width
            except ValueError:
                width = height = 0
            if width <= 0 or height <= 0 or (sep and not height_s.strip()):
                raise ConfigError(
                    f"validation_resolution must be sizes like 1024, 512x768 or "
                    f"'1024x1024,1280x768'; got {self.validation_resolution!r}"
                )
            sizes.append((width, height))
        if not sizes:
            raise ConfigError(f"validation_resolution is empty, got {self.validation_resolution!r}")
        return sizes

    def disk_low_bytes(self) -> int | None:
        """``disk_low_threshold`` in bytes (``100G`` → 100 * 1024**3), or None when unset."""
        if self.disk_low_threshold is None:
            return None
        text = str(self.disk_low_threshold).strip().upper().removesuffix("B")
        units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
        scale = units.get(text[-1:], 1)
        number = text[:-1] if text[-1:] in units else text
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"disk_low_threshold must be a size like 100G, 500M or a byte count; got {self.disk_low_threshold!r}")
        return int(value * scale)

    def sigma_scheme(self) -> str:
        """How flow sigmas are drawn: ``uniform``, ``beta`` or ``logit_normal``."""
        if self.flow_use_uniform_schedule:
            return "uniform"
        if self.flow_use_beta_schedule:
            return "beta"
        return "logit_normal"

    def lora_scale_alpha(self) -> float:
        """The LoRA alpha in effect: ``lora_alpha``, or ``lora_rank`` when unset."""
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.lora_rank)

    def lora_scale(self) -> float:
        """The factor applied to the LoRA update, alpha / rank."""
        return self.lora_scale_alpha() / self.lora_rank

    def optimizer_betas(self) -> tuple[float, float]:
        return (self.optimizer_beta1, self.optimizer_beta2)

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_train_steps``, else epochs x steps per epoch.

        A partial accumulation window at the end of an epoch still makes one optimizer step.
        """
        if self.max_train_steps is not None:
            return self.max_train_steps
        steps_per_epoch = math.ceil(batches_per_epoch / self.gradient_accumulation_steps)
        return self.num_train_epochs * steps_per_epoch


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of an attrs class, ``{field: text}``, in field order.

    Python discards these strings at runtime, so they are read back from the class's source with
    ``ast``: a string expression right after an annotated assignment documents that field.
    """
    source = inspect.getsource(sys.modules[cls.__module__])
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            break
    else:  # pragma: no cover - a class always has its source in its module
        raise ValueError(f"class {cls.__name__} not found in {cls.__module__}")
    docs: dict[str, str] = {}
    body = node.body
    for stmt, following in zip(body, body[1:] + [None]):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs
