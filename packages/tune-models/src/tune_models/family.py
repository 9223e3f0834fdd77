"""The model-family contract: what the training loop may ask of any diffusion model.

A family declares what differs between models (checkpoints, components, prompt and image
encoding, the denoiser call, LoRA targets, the validation pipeline, LoRA key names for ComfyUI)
and nothing else; losses, caches, loops and saving live once, outside the families.

A family declares its noise scheme in :attr:`ModelFamily.prediction`, and the loop picks the
maths from that declaration, never from the family's name:

- ``"flow"``: **flow matching** with ``x_t = (1 - sigma) * x0 + sigma * noise`` and training
  target ``noise - x0``. :meth:`ModelFamily.predict` takes sigmas in [0, 1] and returns
  predictions in that convention, so a family whose network uses another time variable or sign
  (Z-Image takes ``t = 1 - sigma`` and predicts ``x0 - noise``) converts inside ``predict`` and
  nowhere else.
- ``"epsilon"`` / ``"v_prediction"``: **DDPM** (UNet families). ``predict`` takes integer timesteps
  of the scheduler's training schedule and returns the network's raw output (noise or velocity);
  the prediction type actually used is :meth:`ModelFamily.prediction_type` (the checkpoint's
  scheduler config, or the user's ``prediction_type``), the maths is ``tune_train.ddpm``.

Per-sample image geometry (original size, crop, training size) and the batch's dataset settings
reach families that condition on them through :meth:`ModelFamily.batch_conditions`, merged into
the prompt batch ``predict`` receives; the others ignore them.

A family is registered by a plugin (see :mod:`tune_models.hookspecs`) and fetched by name with
:func:`get_family`.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from tune_models import flow

_log = logging.getLogger(__name__)
_WARNED_OPTIONS: set[tuple[str, str]] = set()
"""``(family, key)`` pairs already warned about by :meth:`ModelFamily.validation_call_options`."""

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image


@attrs.frozen
class SampleGeometry:
    """Where one training sample came from, in pixels, ``(height, width)`` / ``(top, left)`` order
    as size/crop micro-conditioning writes it."""

    original_size: tuple[int, int]
    """The image's size before any resize."""
    crop_top_left: tuple[int, int]
    """Top-left corner of the crop window in the resized image."""
    target_size: tuple[int, int]
    """The training sample's size (its bucket)."""

    @classmethod
    def from_planned(cls, planned: Any) -> SampleGeometry:
        """From a ``tune_data.buckets.PlannedImage`` (``record``, ``bucket``, ``crop_box``)."""
        width, height = planned.bucket
        left, top = planned.crop_box[0], planned.crop_box[1]
        return cls(
            original_size=(int(planned.record.height), int(planned.record.width)),
            crop_top_left=(int(top), int(left)),
            target_size=(int(height), int(width)),
        )


@attrs.frozen
class Flavour:
    """One published checkpoint of a family and the defaults that suit it."""

    name: str
    """What users write as ``model_flavour`` (``turbo``, ``base``, ...)."""
    pretrained: str
    """Default hub id or local path of the diffusers folder, used when the user gives none."""
    inference_steps: int
    """Denoising steps for validation images."""
    guidance: float
    """Validation guidance, passed to the family's pipeline as its ``guidance_scale`` (for
    Z-Image, 0 disables classifier-free guidance)."""
    shift: float | None
    """Fixed flow shift the checkpoint was trained with; ``None`` means resolution-dependent
    (auto) shift."""
    assistant_lora: str | None = None
    """Hub id or path of an adapter that must be active while training (e.g. a de-distillation
    adapter for a step-distilled checkpoint) and inactive for validation; ``None`` for none."""
    assistant_lora_weight_name: str | None = None
    """File name inside ``assistant_lora`` when it is a repository or folder."""
    description: str = ""
    """One line for ``tune plugins`` and error messages."""
    resolution: int | None = None
    """Pixels per side the checkpoint was trained at, where it is not the usual 1024 (Sana's
    512 px checkpoints): the validation size when the run sets no ``validation_resolution``.
    ``None``: 1024."""


@attrs.define
class ModelSource:
    """Where to load a model from; field names are SimpleTuner's config keys."""

    pretrained_model_name_or_path: str | None = None
    """Hub id or local diffusers folder holding every component; ``None`` uses the flavour's
    default checkpoint. A single checkpoint file here is the transformer, with every other
    component from the flavour's checkpoint."""
    pretrained_transformer_model_name_or_path: str | None = None
    """Load the transformer (denoiser) from here instead, e.g. a fine-tuned or de-distilled one: a
    diffusers folder or repository, or one ``.safetensors`` file (diffusers' ``from_single_file``,
    config from the base checkpoint)."""
    pretrained_transformer_subfolder: str | None = None
    """Subfolder of the transformer location; default ``transformer``. ``"none"`` means the
    location itself is the transformer folder (it holds ``config.json`` directly)."""
    pretrained_vae_model_name_or_path: str | None = None
    """Load the VAE from here instead (a folder with a ``vae`` subfolder, or a VAE folder)."""
    pretrained_text_encoder_model_name_or_path: str | None = None
    """Load the (first) text encoder and its tokenizer from here instead: a pipeline folder or
    repository with ``text_encoder``/``tokenizer`` subfolders, or the encoder's own repository
    (e.g. ``google/gemma-2-2b-it``). The config keys that name one family's encoder
    (``pretrained_gemma_model_name_or_path``) set this."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the checkpoints."""
    variant: str | None = None
    """Weights variant file suffix, e.g. ``fp16`` or ``bf16``."""
    assistant_lora_path: str | None = None
    """Override the flavour's assistant adapter (hub id, folder or ``.safetensors`` file)."""
    assistant_lora_weight_name: str | None = None
    """File name inside ``assistant_lora_path`` when it is a repository or folder."""
    disable_assistant_lora: bool = False
    """Train without the flavour's assistant adapter."""
    transformer_quantization: Any = None
    """Quantise the denoiser while diffusers loads it: a diffusers quantization config
    (``TorchAoConfig``, ``BitsAndBytesConfig``, ...), or a function that takes the denoiser built
    empty (on the meta device, to read its layer names from) and returns one. ``None``: load
    the weights as stored."""


@attrs.define(eq=False)
class LoadedModel:
    """The components of one loaded model, frozen and in eval mode, plus the family that knows
    how to drive them. Families keep their own bookkeeping (active adapters, ...) in ``extras``."""

    family: ModelFamily
    flavour: Flavour
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    has_assistant: bool = False
    extras: dict[str, Any] = attrs.field(factory=dict)
    text_encoder_2: Any = None
    """Second text encoder of families with several (Flux's T5, SD3's CLIP-G); ``None`` otherwise.
    Names follow diffusers' pipeline components."""
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    """Third text encoder (SD3's T5); ``None`` otherwise."""
    tokenizer_3: Any = None

    @property
    def text_encoders(self) -> list[Any]:
        """Every text encoder the family loaded, in order (for moving them to and from a device
        around prompt caching)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (see :func:`compute_dtype`)."""
        return compute_dtype(self.transformer)


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in, which its inputs are cast to: its first floating-point
    parameter's. The first parameter alone can mislead: a GGUF checkpoint's quantised weights are
    bytes (``uint8``) and dequantise to the compute dtype inside each layer."""
    floating = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return floating if floating is not None else next(module.parameters()).dtype


class ModelFamily:
    """Base class of a model family: generic behaviour here, model specifics in a subclass.

    A subclass sets the class attributes below and implements the methods that raise
    :class:`NotImplementedError` (``encode_prompts``, ``collate_prompts``, ``predict``,
    ``pipeline_class``). Loading, image encoding, the validation pipeline, ``generate``, LoRA
    reading and the ComfyUI / tiny-model delegations are generic for a diffusers model described
    by the attributes; a family overrides what differs (``generate`` through
    :meth:`_pipeline_call_kwargs`). Instances hold no model state (a :class:`LoadedModel` does),
    so one module-level instance serves every run.
    """

    name: str = ""
    """Registered name (``z-image``)."""
    aliases: tuple[str, ...] = ()
    """Other names users may write (``zimage``); ``-`` and ``_`` already match each other."""
    flavours: dict[str, Flavour] = {}
    default_flavour: str = ""
    flavour_aliases: dict[str, str] = {}
    """Other names users may write for a flavour -> its name: SimpleTuner's flavour names where they
    differ from tune's (``base-1.0`` for SDXL's ``base``), so its ``config.json`` runs unchanged."""
    simpletuner_default_flavour: str | None = None
    """SimpleTuner's default flavour (as it writes it) where it is not :attr:`default_flavour`: a
    config without ``model_flavour`` would train another checkpoint in each, so the run and
    ``tune check`` say so (:func:`~tune_models.flavour_facts.default_flavour_note`)."""
    unavailable_flavours: dict[str, str] = {}
    """Flavour names SimpleTuner knows and tune does not carry -> why, and what to use instead: the
    error a user of such a config gets instead of a bare "unknown flavour"."""
    lora_target_presets: dict[str, list[str]] = {}
    """``lora_target`` name -> module-name suffixes for peft's ``target_modules``; an entry
    starting with ``re:`` is a regular expression over full module names (see :meth:`lora_targets`)."""
    default_lora_target: str = "all"
    prediction: str = "flow"
    """Noise scheme of :meth:`predict` (see the module doc): ``flow``, or for a DDPM family its
    default prediction type (``epsilon`` or ``v_prediction``) when the scheduler config names none."""
    lora_prefix: str = "transformer"
    """Name of the denoiser component in the family's pipeline and LoRA files (``unet`` for a
    UNet family): LoRA keys are ``<lora_prefix>.<module>.lora_A.weight``."""
    vae_scale_factor: int = 8
    """Pixels per latent along one side, for the real checkpoints (the tiny ones differ)."""
    patch_size: int = 2
    """Latents per transformer token along one side."""
    label: str = ""
    """Name for messages (``Z-Image``); the registered name when empty."""
    cudnn_attention_in_training: bool = True
    """Whether torch's cuDNN attention backend (scaled-dot-product attention) can run this
    family's training step. False where its backward fails on the family's shapes: the trainer then
    turns that one backend off for the run on CUDA (flash and memory-efficient attention remain).
    A failing cuDNN kernel leaves the CUDA context unusable, so this is declared, not caught.
    Measured with ``scripts/sdpa_cudnn_check.py`` (H100, torch 2.11): Flux.1 and Chroma fail
    (illegal memory access / CUBLAS errors under gradient checkpointing); SD3, Qwen-Image, FLUX.2
    and Z-Image run, and Z-Image's step is 9 % faster with it, so it stays on elsewhere."""
    accepts_reference_latents: bool = False
    """Whether :meth:`predict` takes ``reference_latents=[...]`` (clean latents of reference /
    edit images, one ``B x C x h x w`` tensor per reference, as :meth:`encode_images` returns
    them). The trainer passes the latents of conditioning datasets (``conditioning_data``) only to
    a family that declares it (for the run's flavour: :meth:`accepts_references`), and refuses such datasets for the others before loading weights."""

    accepts_loss_mask: bool = True
    """Whether a pixel-space loss mask (a ``conditioning_type: mask`` dataset) can weight this
    family's loss: true when :meth:`predict` returns the ``B x C x h x w`` latent grid of the image
    (every image family here; token packing is undone inside ``predict``), so the trainer averages
    the mask down to ``h x w``. A family whose prediction is not spatially aligned with the pixels
    sets it false, and the trainer refuses mask datasets before loading weights."""

    # What the generic :meth:`load` reads (a diffusers folder); a family that sets no
    # ``transformer_class`` implements :meth:`load` itself.
    transformer_class: str = ""
    """diffusers class of the denoiser (``FluxTransformer2DModel``), in subfolder ``transformer``."""
    text_encoder_classes: tuple[str, ...] = ()
    """transformers classes of ``text_encoder``, ``text_encoder_2``, ... in that order, each with
    an ``AutoTokenizer`` in ``tokenizer``, ``tokenizer_2``, ..."""
    text_encoder_config_key: str | None = None
    """The config key that relocates this family's (first) text encoder through
    ``ModelSource.pretrained_text_encoder_model_name_or_path`` (``pretrained_gemma_model_name_or_path``
    for the Gemma families); ``None``: no such key, and the trainer refuses one."""
    default_extras: dict[str, Any] = {}
    """Initial ``LoadedModel.extras`` (deep-copied per model), besides ``root``."""
    validation_option_keys: frozenset[str] = frozenset()
    """Validation config keys only some families use (``validation_guidance_skip_layers``, ...)
    that this one acts on in :meth:`_validation_option_kwargs`; :meth:`generate` warns about others."""
    guidance_argument: str = "guidance_scale"
    """The pipeline-call argument :meth:`generate` passes ``guidance`` as (Qwen-Image's true CFG
    is ``true_cfg_scale``; its ``guidance_scale`` is for guidance-distilled checkpoints only)."""

    # Text-encoder LoRAs (``train_text_encoder``); see :mod:`tune_models.text_encoder_lora`.
    text_encoder_lora_components: tuple[str, ...] = ()
    """Pipeline components (``text_encoder``, ``text_encoder_2``) that ``train_text_encoder``
    puts a LoRA on: exactly those the family pipeline's ``load_lora_weights`` reads text-encoder
    keys for (``<component>.<module>.lora_A.weight``), so the exported file applies whole. Empty:
    the family cannot train its text encoder, and the trainer refuses the key naming those that can.
    A family that sets it implements :meth:`encode_prompts_for_training`."""
    text_encoder_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    """Module-name suffixes of the text-encoder LoRA: the attention and MLP linears, the modules
    diffusers' text-encoder LoRA reader looks for."""
    text_encoder_lora_module_prefix: str = ""
    """Prefix of the encoder's module names in LoRA files where the loaded module tree may lack it
    (``text_model.``: transformers 5 flattened one CLIP class but not the other, and diffusers
    strips the prefix again where the encoder has none), so files are the same whichever tree
    trained them."""

    # Modules named by import path and imported on first use (so listing families stays light).
    lora_keys_module: str = ""
    """Module with ``to_comfyui(state_dict, **kwargs)`` and ``from_comfyui(state_dict)``."""
    comfyui_key_prefix: str | None = None
    """When set, :meth:`lora_state_dict` reads a ``.safetensors`` file with a key starting with
    it (and ending with :attr:`comfyui_key_suffix`) through :meth:`from_comfyui`; otherwise
    every file goes to diffusers' reader."""
    comfyui_key_suffix: str = ""
    tiny_module: str = ""
    """Module with ``build_tiny_pipeline(path, *, seed)`` and, for a family with an assistant
    adapter, ``build_tiny_assistant_lora(pipeline_path, out_file, *, rank, seed)``."""

    # ----------------------------------------------------------------- flavours and names
    def flavour(self, name: str | None) -> Flavour:
        """The named flavour (or one of its :attr:`flavour_aliases`), or the default one for
        ``None``/empty. The returned flavour's ``name`` is the canonical one."""
        from tune_models.flavour_facts import resolve_flavour_name

        return self.flavours[
            resolve_flavour_name(
                self.name, name or self.default_flavour, self.flavours, self.flavour_aliases, self.unavailable_flavours
            )
        ]

    def lora_targets(self, target: str | Sequence[str] | None) -> list[str] | str:
        """peft's ``target_modules`` for a ``lora_target`` preset name or an explicit list.

        Plain entries are module-name suffixes (peft adapts ``name == s`` or ``name.endswith("." + s)``)
        and come back as a list. An entry starting with ``re:`` is a regular expression that must
        match a module's *full* name (``re:single_transformer_blocks\\.\\d+\\.attn\\.to_out``):
        it reaches what a suffix cannot, e.g. FLUX.2's single-block ``attn.to_out``, whose suffix
        the double blocks' ``to_out`` ModuleList shares. With any regex entry the whole target
        becomes one regex string (peft's other form of ``target_modules``, full-matched), each
        plain suffix ``s`` written as ``(.*\\.)?s``, so both kinds mix in one list."""
        if target is None:
            target = self.default_lora_target
        if isinstance(target, str):
            if target in self.lora_target_presets:
                return self._target_modules(self.lora_target_presets[target], target)
            if target.startswith("re:"):
                return self._target_modules([target], target)
            known = ", ".join(sorted(self.lora_target_presets))
            raise ValueError(
                f"unknown lora_target {target!r} for model_family {self.name!r}; choose one of: "
                f"{known}, or give a list of module names (a 're:' entry is a regular expression)"
            )
        targets = [str(t) for t in target]
        if not targets:
            raise ValueError("lora_target must name at least one module")
        return self._target_modules(targets, target)

    @staticmethod
    def _target_modules(entries: Sequence[str], target: Any) -> list[str] | str:
        """``entries`` as peft's ``target_modules``: the list itself, or one regex (see :meth:`lora_targets`)."""
        import re

        if not any(e.startswith("re:") for e in entries):
            return list(entries)
        parts = []
        for entry in entries:
            if entry.startswith("re:"):
                pattern = entry[3:]
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"lora_target / peft_lora_target_modules entry {entry!r} is not a valid regular expression: {exc}") from None
                if not pattern:
                    raise ValueError(f"lora_target / peft_lora_target_modules entry {entry!r} has an empty regular expression")
            else:
                pattern = r"(.*\.)?" + re.escape(entry)
            parts.append(f"(?:{pattern})")
        return "|".join(parts)

    # ----------------------------------------------------------------- noise schedule
    def flow_shift(
        self,
        height: int,
        width: int,
        *,
        shift: float | None,
        auto_shift: bool,
        model: LoadedModel | None = None,
    ) -> float:
        """The flow shift for an image of ``height`` x ``width`` pixels.

        ``auto_shift`` (or no fixed ``shift``) gives ``exp(mu)`` with diffusers' ``calculate_shift``:
        ``mu = seq_len * m + b``, the line through ``(base_image_seq_len, base_shift)`` and
        ``(max_image_seq_len, max_shift)``, where ``seq_len`` is the transformer's image token count
        ``(H / (vae_scale * patch)) * (W / (vae_scale * patch))``. With ``model`` the four numbers
        come from its scheduler config and ``vae_scale`` from its VAE (which matters for tiny
        models); without it, diffusers' defaults (256, 4096, 0.5, 1.15) and the family's
        ``vae_scale_factor``. Otherwise the fixed ``shift`` is returned.
        """
        config = None
        scale = self.vae_scale_factor
        if model is not None:
            config = dict(getattr(model.scheduler, "config", {}) or {})
            scale = self._vae_scale(model.vae)
        seq_len = flow.image_seq_len(height, width, vae_scale_factor=scale, patch_size=self.patch_size)
        return flow.resolve_shift(seq_len, shift=shift, auto_shift=auto_shift, config=config)

    @staticmethod
    def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
        """``shift * s / (1 + (shift - 1) * s)`` elementwise."""
        return flow.shift_sigmas(sigmas, shift)

    def prediction_type(self, model: LoadedModel) -> str:
        """What :meth:`predict` returns for ``model``: ``flow`` for a flow family; for a DDPM
        family the user's override (``model.extras["prediction_type"]``, set by the trainer from
        ``prediction_type``), else the checkpoint's scheduler config, else :attr:`prediction`."""
        if self.prediction == "flow":
            return "flow"
        override = model.extras.get("prediction_type")
        if override:
            return str(override)
        config = getattr(model.scheduler, "config", None)
        configured = config.get("prediction_type") if config is not None else None
        return str(configured or self.prediction)

    def accepts_references(self, flavour: str | None) -> bool:
        """Whether the ``flavour`` trains with reference latents (conditioning datasets). The
        family's :attr:`accepts_reference_latents` by default; a family where only some flavours
        were made for references (Flux: kontext) narrows it."""
        return self.accepts_reference_latents

    def prompts_use_references(self, flavour: str | None) -> bool:
        """Whether the ``flavour``'s prompt embeddings depend on the sample's reference images (an
        edit model whose text encoder is a vision-language model that reads the reference, as
        Qwen-Image-Edit's). Then :meth:`encode_prompts` takes ``reference_images=`` (per prompt,
        the RGB PIL images of its references as training sees them, in ``conditioning_data``
        order) and the trainer caches one embedding per caption *and* reference. False here."""
        return False

    def validation_input(self, flavour: str | None) -> str | None:
        """What the ``flavour``'s validation pipeline needs besides a prompt, which the trainer
        passes to :meth:`generate` as ``image=``: ``None`` (text to image, the default),
        ``"reference"`` (an edit model: a reference image from the run's conditioning data; a
        warning when the run has none), ``"optional-reference"`` (a model that makes images from
        text or edits them, as FLUX.2: a reference when the run has conditioning data, else text to
        image) or ``"image"`` (image to image, e.g. a refiner: an image of the training data)."""
        return None

    def batch_conditions(
        self,
        model: LoadedModel,
        geometry: Sequence[SampleGeometry],
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        dataset: Any = None,
    ) -> dict[str, Any]:
        """Extra inputs :meth:`predict` takes from each sample's geometry (merged into the
        collated prompt batch). None here: only families with size/crop conditioning override it.

        ``dataset`` is the settings of the dataset the batch comes from (every batch comes from
        one; a ``tune_data`` ``DatasetConfig``, read by attribute name, e.g.
        ``data_aesthetic_score``), so a family may condition on a per-dataset value; None when
        the caller has no dataset (the family's defaults apply). Overrides must accept it."""
        return {}

    def configure_training(self, model: LoadedModel, options: Mapping[str, Any]) -> None:
        """Take the family's own training options from the run's config (SimpleTuner keys, e.g.
        Flux's ``flux_guidance_mode``); keys a family does not know are ignored, so the trainer may
        pass its whole config as a dict. Call once after :meth:`load`, before training. The base
        family has no such options."""

    # ----------------------------------------------------------------- family specifics
    def load(
        self,
        source: ModelSource,
        flavour: str | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LoadedModel:
        """Load every component (frozen, eval mode) from ``source`` or the flavour's default.

        Generic version: a diffusers folder with :attr:`transformer_class`, an ``AutoencoderKL``,
        :attr:`text_encoder_classes` and a flow-matching scheduler; the transformer may be one
        ``.safetensors`` file (see :func:`tune_models.families._shared.load_transformer`); the ``tiny`` flavour's
        sentinel checkpoint is built on first use; the flavour's (or the source's) assistant
        adapter is loaded unless disabled. A family whose folder holds other component classes
        overrides only :meth:`_load_components`."""
        if not self.transformer_class and type(self)._load_components is ModelFamily._load_components:
            raise NotImplementedError(f"{type(self).__name__}.load")
        from tune_models import adapters
        from tune_models.families import _shared

        chosen = self.flavour(flavour)
        source, root = _shared.resolve_source(self, source, chosen)
        components = self._load_components(source, root, dtype=dtype, device=device)
        # Facts read from the checkpoint itself (SDXL's requires_aesthetics_score) ride along.
        extras = {"root": root, **copy.deepcopy(self.default_extras), **components.pop("extras", {})}
        model = LoadedModel(family=self, flavour=chosen, extras=extras, **components)
        if source.assistant_lora_path:
            assistant, weight_name = source.assistant_lora_path, source.assistant_lora_weight_name
        else:
            assistant = chosen.assistant_lora
            weight_name = source.assistant_lora_weight_name or chosen.assistant_lora_weight_name
        if assistant and not source.disable_assistant_lora:
            adapters.load_assistant_lora(model, assistant, weight_name=weight_name)
        return model

    def _load_components(
        self, source: ModelSource, root: str, *, dtype: torch.dtype, device: str | torch.device
    ) -> dict[str, Any]:
        """The frozen components :meth:`load` puts in its :class:`LoadedModel` (``transformer``,
        ``vae``, text encoders, tokenizers, ``scheduler``, and optionally ``extras``: facts read from
        the checkpoint for :attr:`LoadedModel.extras`), read from ``root`` with ``source``'s
        overrides. Generic version: :attr:`transformer_class`, an ``AutoencoderKL`` and
        :attr:`text_encoder_classes` (see :func:`tune_models.families._shared.load_components`)."""
        from tune_models.families import _shared

        return _shared.load_components(
            source,
            root,
            transformer_class=self.transformer_class,
            text_encoder_classes=self.text_encoder_classes,
            dtype=dtype,
            device=device,
            label=self.name,
        )

    def encode_prompts(self, model: LoadedModel, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """One dict of CPU tensors per prompt, ready to cache on disk. A family whose
        :meth:`prompts_use_references` is true also takes ``reference_images=`` (see there)."""
        raise NotImplementedError(f"{type(self).__name__}.encode_prompts")

    def encode_prompts_for_training(
        self, model: LoadedModel, prompts: list[str], cached: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, the :meth:`encode_prompts` entry (``train_text_encoder``) with what the
        encoders of :attr:`text_encoder_lora_components` produce computed live, *with* gradients
        on the encoders' device (their LoRA trains through it); what only frozen encoders make (a
        T5's embeddings) is taken from ``cached``, the prompts' text-cache entries, so those
        encoders need not run. :meth:`collate_prompts` batches the result."""
        raise NotImplementedError(f"{type(self).__name__}.encode_prompts_for_training")

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Batch cached prompt dicts into what :meth:`predict` takes."""
        raise NotImplementedError(f"{type(self).__name__}.collate_prompts")

    def _vae_scale(self, vae: Any) -> int:
        """Pixels per latent along one side for ``vae``: ``2 ** (levels - 1)`` for the
        ``block_out_channels`` VAEs (AutoencoderKL and kin), else :attr:`vae_scale_factor`. A family
        whose VAE describes its levels otherwise (Qwen-Image's, Sana's DC-AE) overrides this."""
        blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
        return 2 ** (len(blocks) - 1) if blocks else self.vae_scale_factor

    def _latent_multiple(self, model: LoadedModel) -> int:
        """Pixels per transformer token along one side, for the loaded VAE."""
        return self._vae_scale(model.vae) * self.patch_size

    @torch.no_grad()
    def encode_images(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``B x 3 x H x W`` in [-1, 1] -> latents in the space the denoiser works in.

        Generic version: ``(latent - shift_factor) * scaling_factor`` from the VAE posterior's
        *mode* (its mean), not a random sample: a cached latent must not depend on when it was
        computed, and the posterior variance is tiny next to the flow noise."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape B x 3 x H x W, got {tuple(pixels.shape)}")
        multiple = self._latent_multiple(model)
        if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
            raise ValueError(
                f"image size {pixels.shape[-1]}x{pixels.shape[-2]} must be a multiple of {multiple} "
                f"for {self.label or self.name}"
            )
        vae = model.vae
        param = next(vae.parameters())
        latents = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_images`: pixels in [-1, 1]."""
        vae = model.vae
        param = next(vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    def token_routing(self, model: LoadedModel) -> Any:
        """How TREAD token routing (``tread_config``) reaches into this family's transformer: a
        :class:`tune_models.token_routing.TokenRouting`, or ``None`` (the default) when the family
        does not support it, and the trainer refuses ``tread_config`` naming the families that do."""
        return None

    def _predict_inputs(
        self, noisy_latents: torch.Tensor, sigmas: torch.Tensor | float, prompt_count: int, *, even: bool = False
    ) -> torch.Tensor:
        """Check :meth:`predict`'s inputs (``B x C x H x W`` latents, with even ``H`` and ``W`` when
        ``even``, and ``B`` prompts) and return ``sigmas`` as ``B`` floats on the latents' device
        (one value is broadcast)."""
        if noisy_latents.ndim != 4:
            raise ValueError(f"noisy_latents must be B x C x H x W, got {tuple(noisy_latents.shape)}")
        batch, _, height, width = noisy_latents.shape
        if even and (height % 2 or width % 2):
            raise ValueError(f"{self.label or self.name} latents need even height and width, got {height}x{width}")
        if prompt_count != batch:
            raise ValueError(f"{prompt_count} prompt embeddings for a batch of {batch} latents")
        sigmas = torch.as_tensor(sigmas, device=noisy_latents.device).float().reshape(-1)
        if sigmas.numel() == 1:
            sigmas = sigmas.expand(batch)
        if sigmas.numel() != batch:
            raise ValueError(f"{sigmas.numel()} sigmas for a batch of {batch} latents")
        return sigmas

    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """The denoiser's output in the flow convention: an estimate of ``noise - x0``."""
        raise NotImplementedError(f"{type(self).__name__}.predict")

    def validation_pipeline(self, model: LoadedModel) -> Any:
        """The family's diffusers pipeline, sharing ``model``'s components (and adapters).

        Generic version: :meth:`pipeline_class` over the transformer, the VAE and the encoders and
        tokenizers of :attr:`text_encoder_classes`, with its own scheduler instance (sampling
        mutates scheduler state) and no progress bar."""
        if not self.text_encoder_classes:
            raise NotImplementedError(f"{type(self).__name__}.validation_pipeline")
        from diffusers import FlowMatchEulerDiscreteScheduler

        from tune_models.families import _shared

        components = {"transformer": model.transformer, "vae": model.vae}
        for suffix in _shared.component_suffixes(len(self.text_encoder_classes)):
            components[f"text_encoder{suffix}"] = getattr(model, f"text_encoder{suffix}")
            components[f"tokenizer{suffix}"] = getattr(model, f"tokenizer{suffix}")
        pipeline = self.pipeline_class()(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config), **components
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def generate(
        self,
        pipeline: Any,
        prompt: str,
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        seed: int,
        negative_prompt: str | None = None,
        options: Mapping[str, Any] | None = None,
        image: Image.Image | None = None,
    ) -> Image.Image:
        """One image, deterministic for a seed (the generator lives on the CPU). ``guidance`` is
        the pipeline's ``guidance_scale`` (see :attr:`guidance_argument`); the family adds its own arguments (negative prompt,
        sequence length, ...) in :meth:`_pipeline_call_kwargs`, and those from the run's
        validation ``options`` it acts on in :meth:`_validation_option_kwargs` (see
        :meth:`validation_call_options`). ``image`` (see :meth:`validation_input`) goes to the
        pipeline as its ``image=``. The transformer runs in eval mode (no LoRA dropout) and is put
        back as it was."""
        generator = torch.Generator("cpu").manual_seed(int(seed))
        extra = self._pipeline_call_kwargs(pipeline, guidance=guidance, negative_prompt=negative_prompt)
        extra.update(self.validation_call_options(pipeline, options, guidance=guidance, negative_prompt=negative_prompt))
        if image is not None:
            extra["image"] = image
        transformer = getattr(pipeline, self.lora_prefix)
        was_training = transformer.training
        transformer.eval()
        try:
            result = pipeline(
                prompt=prompt,
                width=width,
                height=height,
                num_inference_steps=steps,
                generator=generator,
                output_type="pil",
                **{self.guidance_argument: guidance},
                **extra,
            )
        finally:
            transformer.train(was_training)
        return result.images[0]

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """The family's own keyword arguments for the pipeline call in :meth:`generate`; none here."""
        return {}

    def validation_call_options(
        self, pipeline: Any, options: Mapping[str, Any] | None, *, guidance: float, negative_prompt: str | None = None
    ) -> dict[str, Any]:
        """Pipeline keyword arguments from the run's validation ``options``
        (``TrainConfig.validation_options()``: keys only some families use, such as SD3's
        ``validation_guidance_skip_layers``). Keys outside :attr:`validation_option_keys` are
        logged once per family and key (a setting that silently does nothing is a trap), then
        ignored; the rest go to :meth:`_validation_option_kwargs`."""
        options = dict(options or {})
        for key in sorted(set(options) - set(self.validation_option_keys)):
            if (self.name, key) not in _WARNED_OPTIONS:
                _WARNED_OPTIONS.add((self.name, key))
                _log.warning("%s does not apply to model_family %r; ignored", key, self.name)
            del options[key]
        if not options:
            return {}
        return self._validation_option_kwargs(pipeline, options, guidance=guidance, negative_prompt=negative_prompt)

    def _validation_option_kwargs(
        self, pipeline: Any, options: dict[str, Any], *, guidance: float, negative_prompt: str | None
    ) -> dict[str, Any]:
        """The pipeline arguments for ``options`` (only keys of :attr:`validation_option_keys`),
        given the call's ``guidance`` and ``negative_prompt``; a family that declares such keys
        overrides this."""
        return {}

    def lora_state_dict(self, path: str | os.PathLike, *, weight_name: str | None = None) -> dict:
        """Read a LoRA file or repository into diffusers layout (``transformer.`` keys): a file
        in the family's ComfyUI layout (see :attr:`comfyui_key_prefix`) through
        :meth:`from_comfyui`, anything else through the pipeline class's ``lora_state_dict``."""
        location = str(path)
        if Path(location).is_file() and weight_name is None:
            location, weight_name = str(Path(location).parent), Path(location).name
        file = Path(location) / weight_name if weight_name else None
        prefix, suffix = self.comfyui_key_prefix, self.comfyui_key_suffix
        if prefix is not None and file is not None and file.is_file():
            from safetensors.torch import load_file

            raw = load_file(str(file))
            if any(k.startswith(prefix) and k.endswith(suffix) for k in raw):
                return self.from_comfyui(raw)
        state_dict = self.pipeline_class().lora_state_dict(location, weight_name=weight_name)
        return state_dict[0] if isinstance(state_dict, tuple) else state_dict

    def pipeline_class(self) -> type:
        """The diffusers pipeline class (imported lazily), used to save LoRA files."""
        raise NotImplementedError(f"{type(self).__name__}.pipeline_class")

    def _module(self, attribute: str) -> Any:
        path = getattr(self, attribute)
        if not path:
            raise NotImplementedError(f"{type(self).__name__} sets no {attribute}")
        return importlib.import_module(path)

    def to_comfyui(self, state_dict: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """diffusers/PEFT-layout LoRA -> the key names ComfyUI loads (:attr:`lora_keys_module`)."""
        return self._module("lora_keys_module").to_comfyui(state_dict, **kwargs)

    def from_comfyui(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_comfyui`."""
        return self._module("lora_keys_module").from_comfyui(state_dict)

    def build_tiny(self, path: str | os.PathLike, *, seed: int = 0) -> Path:
        """Save a tiny random model with the real classes at ``path`` (for tests; :attr:`tiny_module`)."""
        return self._module("tiny_module").build_tiny_pipeline(path, seed=seed)

    def build_tiny_assistant_lora(
        self, pipeline_path: str | os.PathLike, out_file: str | os.PathLike, *, rank: int = 4, seed: int = 1
    ) -> Path:
        """Write a random assistant adapter for a tiny model, in the real adapter's file format."""
        build = getattr(self._module("tiny_module"), "build_tiny_assistant_lora", None)
        if build is None:
            raise NotImplementedError(f"{self.label or self.name} has no assistant adapter")
        return build(pipeline_path, out_file, rank=rank, seed=seed)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} flavours={sorted(self.flavours)}>"


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name`` (case, ``-`` and ``_`` ignored; aliases accepted).

    Unknown names raise :class:`tune_data.plugins.UnknownNameError` listing registered families.
    """
    from tune_data.plugins import PluginError

    from tune_models.registry import model_families

    target = model_families.load(name)
    family = target() if isinstance(target, type) else target
    if not isinstance(family, ModelFamily):
        entry = model_families.get(name)
        raise PluginError(
            f"model family {entry.name!r} (plugin {entry.plugin!r}) registered {target!r}, which is "
            f"not a tune_models.family.ModelFamily"
        )
    return family
