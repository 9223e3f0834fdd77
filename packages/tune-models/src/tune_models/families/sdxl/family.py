"""Stable Diffusion XL (Stability AI): a DDPM UNet, CLIP-L + OpenCLIP-G text encoders.

What is particular to SDXL, read off diffusers' ``StableDiffusionXLPipeline`` and
``UNet2DConditionModel`` (0.42):

- the denoiser is a UNet (pipeline component ``unet``, LoRA keys ``unet.<module>``); it is kept
  in ``LoadedModel.transformer`` like every family's denoiser, and :attr:`SDXLFamily.lora_prefix`
  names it ``unet`` in LoRA files and in the pipeline.
- noise: DDPM, not flow matching. The checkpoints' scheduler (``EulerDiscreteScheduler``,
  ``scaled_linear`` betas 0.00085-0.012 over 1000 steps) says ``epsilon``; a v-prediction
  fine-tune says ``v_prediction`` (or the user sets ``prediction_type``). ``predict`` takes integer
  timesteps and returns the UNet's raw output; the maths is ``tune_train.ddpm``.
- prompts: each CLIP's *second to last* hidden state (77 tokens), concatenated along channels
  (768 + 1280 = 2048) as ``prompt_embeds``; the OpenCLIP-G projection of the end token
  (``text_embeds``, 1280) as ``pooled_prompt_embeds``. The refiner has only OpenCLIP-G.
- micro-conditioning: ``add_time_ids`` = original size (h, w) + crop top-left (top, left) +
  target size (h, w), per sample, from the bucket planner's geometry
  (:meth:`SDXLFamily.batch_conditions`); the refiner (its ``model_index.json`` says
  ``requires_aesthetics_score``) replaces the target size with an aesthetic score: the batch's
  dataset's ``data_aesthetic_score`` (SimpleTuner's key; in config.json it is every dataset's
  default), else ``sdxl_aesthetic_score`` (also validation's), else 7.0, SimpleTuner's default
  (the img2img pipeline's own default is 6.0: pass ``aesthetic_score`` at inference to ask for
  what training taught). Without geometry (a caller that has none) ``predict`` uses the latents'
  own size, no crop: what the pipeline does at inference.
- latents: ``vae_latent * scaling_factor`` (0.13025), no shift; 4 channels at 1/8 of the pixels.
- validation: ``StableDiffusionXLPipeline`` with classifier-free guidance against the negative
  prompt (``force_zeros_for_empty_prompt`` when none), an Euler scheduler with the trained
  prediction type. The refiner refines an image (``StableDiffusionXLImg2ImgPipeline``): the
  trainer passes a training image (the held-out eval dataset's first, else the first by path;
  :meth:`SDXLFamily.validation_input`), resized to the validation size, denoised from
  ``sdxl_refiner_strength`` (default 0.3, the pipeline's) of the schedule, with the aesthetic
  score above and ``sdxl_negative_aesthetic_score`` (2.5) for the negative prompt. A training
  image rather than a base-model render: the run has no base model loaded, and refining a known
  image shows what the LoRA changes without a second 2.6 B UNet on the card.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tune_models.families import _shared
from tune_models.families.sdxl.flavours import SDXL_FLAVOURS, SDXL_FLAVOUR_ALIASES, SDXL_UNAVAILABLE_FLAVOURS
from tune_models.family import Flavour, LoadedModel, ModelFamily, ModelSource, SampleGeometry, compute_dtype

_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
_FFS = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
AESTHETIC_SCORE = 7.0
"""The refiner's default aesthetic-score conditioning for training and validation: SimpleTuner's
``data_aesthetic_score`` default, so a SimpleTuner config trains what it trained there."""
NEGATIVE_AESTHETIC_SCORE = 2.5
"""The img2img pipeline's ``negative_aesthetic_score`` default (the negative prompt's score)."""
REFINER_STRENGTH = 0.3
"""The img2img pipeline's ``strength`` default: validation re-noises the input to 30 % of the schedule."""
REFINER_OPTIONS = {
    "sdxl_aesthetic_score": ("aesthetic_score", AESTHETIC_SCORE),
    "sdxl_negative_aesthetic_score": ("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE),
    "sdxl_refiner_strength": ("strength", REFINER_STRENGTH),
}
"""Config key -> (``LoadedModel.extras`` key and img2img pipeline argument, default)."""


WHOLE_CHECKPOINT_KEYS = ("conditioner.embedders.", "first_stage_model.")
"""Key prefixes of a Stability (SGM) checkpoint file's text encoders and VAE; a file with them holds
the whole model, not only the UNet (``model.diffusion_model.``)."""


def whole_checkpoint_file(location: str | None) -> bool:
    """Whether ``location`` is a local ``.safetensors`` file holding a whole SDXL checkpoint (its key
    names say so, read from the header only). A ``.ckpt`` (pickle) or remote file is taken as a
    UNet file: reading its keys would mean loading or downloading it first."""
    from pathlib import Path

    if not location or not str(location).lower().endswith((".safetensors", ".sft")) or not Path(location).is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(location), "pt") as handle:
        keys = list(handle.keys())
    return any(key.startswith(prefix) for key in keys for prefix in WHOLE_CHECKPOINT_KEYS)


class SDXLFamily(ModelFamily):
    """Stable Diffusion XL 1.0 base and refiner."""

    name = "sdxl"
    flavours = {name: Flavour(name=name, **facts) for name, facts in SDXL_FLAVOURS.items()}
    flavour_aliases = SDXL_FLAVOUR_ALIASES
    unavailable_flavours = SDXL_UNAVAILABLE_FLAVOURS
    default_flavour = "base"
    # ``all``: the attention projections of every transformer block (self and cross attention),
    # the usual SDXL LoRA; ``all+ffs`` adds the feed-forwards and the blocks' in/out projections.
    lora_target_presets = {"all": list(_ATTENTION), "all+ffs": _ATTENTION + _FFS}
    default_lora_target = "all"
    prediction = "epsilon"
    lora_prefix = "unet"
    vae_scale_factor = 8
    patch_size = 1
    label = "SDXL"
    lora_keys_module = "tune_models.families.sdxl.lora_keys"
    comfyui_key_prefix = "lora_unet_"
    """kohya / ComfyUI files (``lora_unet_...``) are read by :mod:`.lora_keys`, diffusers files by diffusers."""
    # train_text_encoder: a LoRA on both CLIPs, as StableDiffusionXLPipeline.load_lora_weights reads them.
    text_encoder_lora_components = ("text_encoder", "text_encoder_2")
    text_encoder_lora_module_prefix = "text_model."
    tiny_module = "tune_models.families.sdxl.tiny"

    def validation_input(self, flavour: str | None) -> str | None:
        """The refiner validates by refining a training image; base makes images from text."""
        return "image" if self.flavour(flavour).name == "refiner" else None

    def configure_training(self, model: LoadedModel, options: Any) -> None:
        """The refiner's options (:data:`REFINER_OPTIONS`): ``sdxl_aesthetic_score`` (validation,
        and training where the dataset sets no ``data_aesthetic_score``),
        ``sdxl_negative_aesthetic_score`` and ``sdxl_refiner_strength`` (validation).
        Each must be a number; the strength in (0, 1]."""
        for key, (extra, default) in REFINER_OPTIONS.items():
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
            if key == "sdxl_refiner_strength" and not 0 < value <= 1:
                raise ValueError(f"sdxl_refiner_strength must be in (0, 1], got {value}")
            model.extras[extra] = float(value)

    # ----------------------------------------------------------------- loading
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def _load_components(
        self, source: ModelSource, root: str, *, dtype: torch.dtype, device: str | torch.device
    ) -> dict[str, Any]:
        """UNet (``unet/``, or ``pretrained_transformer_model_name_or_path`` with
        ``pretrained_transformer_subfolder``), VAE, the text encoders the checkpoint has (the
        refiner has no ``text_encoder``) and its DDPM scheduler.

        A single file holding a *whole* SDXL checkpoint (Stability's ``sd_xl_base_1.0.safetensors``
        layout, as most published fine-tunes are: UNet, both CLIPs and the VAE in one file; see
        :func:`whole_checkpoint_file`) gives every one of those components, read by diffusers'
        pipeline ``from_single_file`` with ``root``'s configs and tokenizers: a fine-tune's own
        text encoders and VAE are trained with, not the base model's (a UNet-only file still
        takes them from ``root``). ``pretrained_vae_model_name_or_path`` still replaces the VAE."""
        import diffusers
        import transformers

        kwargs = _shared.load_kwargs(source)
        hub_kwargs = {k: v for k, v in kwargs.items() if k == "revision"}
        index = diffusers.DiffusionPipeline.load_config(root, **hub_kwargs)
        whole = self._whole_file_pipeline(source, root, index, dtype=dtype)
        components: dict[str, Any] = {
            "transformer": whole.unet
            if whole is not None
            else _shared.load_transformer(
                diffusers.UNet2DConditionModel, source, root, dtype=dtype, label=self.name, default_subfolder="unet", **kwargs
            )
        }
        if whole is not None and not source.pretrained_vae_model_name_or_path:
            components["vae"] = whole.vae
        else:
            vae_location = source.pretrained_vae_model_name_or_path or root
            components["vae"] = _shared.load_vae(
                diffusers.AutoencoderKL, vae_location, is_root=vae_location == root, dtype=dtype, **kwargs
            )
        encoders = (("", transformers.CLIPTextModel), ("_2", transformers.CLIPTextModelWithProjection))
        for suffix, encoder_class in encoders:
            entry = index.get(f"text_encoder{suffix}")
            if not entry or entry[0] is None:  # the refiner has no CLIP-L
                continue
            if whole is not None:
                components[f"text_encoder{suffix}"] = getattr(whole, f"text_encoder{suffix}")
                components[f"tokenizer{suffix}"] = getattr(whole, f"tokenizer{suffix}")
                continue
            components[f"text_encoder{suffix}"] = encoder_class.from_pretrained(
                root, subfolder=f"text_encoder{suffix}", dtype=dtype, **kwargs
            )
            components[f"tokenizer{suffix}"] = transformers.AutoTokenizer.from_pretrained(
                root, subfolder=f"tokenizer{suffix}", **hub_kwargs
            )
        components.setdefault("text_encoder", None)
        components.setdefault("tokenizer", None)
        if "text_encoder_2" not in components:
            raise ValueError(f"{root} has no text_encoder_2: not an SDXL checkpoint")
        components["scheduler"] = diffusers.EulerDiscreteScheduler.from_pretrained(
            root, subfolder="scheduler", **hub_kwargs
        )
        _shared.freeze(
            *(v for k, v in components.items() if k in ("transformer", "vae") or k.startswith("text_encoder")),
            device=device,
        )
        components["extras"] = {"requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False))}
        return components

    @staticmethod
    def _whole_file_pipeline(source: ModelSource, root: str, index: Any, *, dtype: torch.dtype) -> Any:
        """The pipeline diffusers reads from a whole-checkpoint file (see :meth:`_load_components`),
        or ``None`` when the transformer location is not one."""
        location = source.pretrained_transformer_model_name_or_path
        if not whole_checkpoint_file(location):
            return None
        import diffusers

        refiner = bool(index.get("requires_aesthetics_score")) or not (index.get("text_encoder") or [None])[0]
        pipeline_class = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
        extra = {"config_revision": source.revision} if source.revision else {}
        return pipeline_class.from_single_file(str(location), config=root, torch_dtype=dtype, **extra)

    # ----------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``StableDiffusionXLPipeline.encode_prompt`` computes it (no clip skip):
        ``prompt_embeds`` ``[77, 2048]`` (refiner ``[77, 1280]``), ``pooled_prompt_embeds`` ``[1280]``."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            embeds, pooled = self._encode(model, chunk)
            for i in range(len(chunk)):
                results.append(
                    {
                        "prompt_embeds": embeds[i].detach().to("cpu").contiguous(),
                        "pooled_prompt_embeds": pooled[i].detach().to("cpu").contiguous(),
                    }
                )
        return results

    @staticmethod
    def _encode(model: LoadedModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, 77, 2048], pooled_prompt_embeds [B, 1280])`` on the encoders' device,
        with gradients where the encoders have trainable weights (the caller decides)."""
        pairs = [(t, e) for t, e in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)) if e is not None]
        hidden, pooled = [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat([h.to(hidden[-1].device) for h in hidden], dim=-1), pooled

    def encode_prompts_for_training(
        self, model: LoadedModel, prompts: list[str], cached: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """Both entries of :meth:`encode_prompts`, with gradients: both CLIPs train, so nothing of
        a prompt comes from the text cache (``cached`` is not read)."""
        embeds, pooled = self._encode(model, list(prompts))
        return [{"prompt_embeds": embeds[i], "pooled_prompt_embeds": pooled[i]} for i in range(len(prompts))]

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        return _shared.stack_prompts(
            items, device, dtype, label=self.label, keys=("prompt_embeds", "pooled_prompt_embeds")
        )

    @torch.no_grad()
    def encode_images(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """``vae_latent * scaling_factor`` from the posterior's mode (SDXL's VAE has no shift)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape B x 3 x H x W, got {tuple(pixels.shape)}")
        multiple = self._latent_multiple(model)
        if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
            raise ValueError(f"image size {pixels.shape[-1]}x{pixels.shape[-2]} must be a multiple of {multiple} for SDXL")
        vae = model.vae
        param = next(vae.parameters())
        latents = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        param = next(vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    # ----------------------------------------------------------------- micro-conditioning
    def time_ids(
        self, model: LoadedModel, geometry: Sequence[SampleGeometry], *, aesthetic_score: float | None = None
    ) -> torch.Tensor:
        """``add_time_ids`` ``[B, 6]`` (refiner ``[B, 5]``), float32, as the pipeline builds them;
        the refiner's score is ``aesthetic_score`` when given, else the run's (``sdxl_aesthetic_score``)."""
        rows = []
        score = aesthetic_score if aesthetic_score is not None else model.extras.get("aesthetic_score", AESTHETIC_SCORE)
        for item in geometry:
            tail = (score,) if model.extras.get("requires_aesthetics_score") else tuple(item.target_size)
            rows.append([*item.original_size, *item.crop_top_left, *tail])
        return torch.tensor(rows, dtype=torch.float32)

    def batch_conditions(
        self,
        model: LoadedModel,
        geometry: Sequence[SampleGeometry],
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        dataset: Any = None,
    ) -> dict[str, Any]:
        """``add_time_ids`` from each sample's original size, crop and target size (the refiner:
        original size, crop and the ``dataset``'s ``data_aesthetic_score``, when it sets one)."""
        score = getattr(dataset, "data_aesthetic_score", None)
        return {"add_time_ids": self.time_ids(model, geometry, aesthetic_score=score).to(device=device, dtype=dtype)}

    # ----------------------------------------------------------------- denoiser
    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """The UNet's output (noise or velocity, see :meth:`prediction_type`) at integer DDPM
        timesteps ``sigmas``; ``prompts`` may carry ``add_time_ids`` (else: no crop, the latents'
        own size)."""
        embeds = prompts["prompt_embeds"]
        timesteps = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0])
        unet = model.transformer
        dtype = compute_dtype(unet)
        time_ids = prompts.get("add_time_ids")
        if time_ids is None:
            scale = 2 ** (len(model.vae.config.block_out_channels) - 1)
            size = (noisy_latents.shape[-2] * scale, noisy_latents.shape[-1] * scale)
            geometry = SampleGeometry(original_size=size, crop_top_left=(0, 0), target_size=size)
            time_ids = self.time_ids(model, [geometry] * noisy_latents.shape[0])
        return unet(
            noisy_latents.to(dtype),
            timesteps.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            added_cond_kwargs={
                "text_embeds": prompts["pooled_prompt_embeds"].to(dtype),
                "time_ids": time_ids.to(noisy_latents.device, dtype),
            },
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------- validation
    def validation_pipeline(self, model: LoadedModel) -> Any:
        """``StableDiffusionXLPipeline`` over ``model``'s components, with its own Euler scheduler
        set to the trained prediction type; for the refiner (no CLIP-L, aesthetic scores) the
        ``StableDiffusionXLImg2ImgPipeline`` :meth:`generate` gives an input image."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

        scheduler = EulerDiscreteScheduler.from_config(model.scheduler.config, prediction_type=self.prediction_type(model))
        components = dict(
            vae=model.vae,
            text_encoder=model.text_encoder,
            text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2,
            unet=model.transformer,
            scheduler=scheduler,
        )
        if model.text_encoder is None or model.extras.get("requires_aesthetics_score"):
            pipeline = StableDiffusionXLImg2ImgPipeline(
                **components, requires_aesthetics_score=bool(model.extras.get("requires_aesthetics_score"))
            )
            # What generate passes besides the prompt (the pipeline call takes them, not the model).
            pipeline.tune_refiner_kwargs = {
                extra: model.extras.get(extra, default) for extra, default in REFINER_OPTIONS.values()
            }
        else:
            pipeline = self.pipeline_class()(**components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """Classifier-free guidance ``guidance`` (> 1 enables it) against ``negative_prompt``."""
        return {"negative_prompt": negative_prompt}

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
        options: Any = None,
        image: Any = None,
    ) -> Any:
        """The base class's for text to image. The refiner's img2img pipeline refines ``image``
        (resized to ``width`` x ``height``: the img2img call takes no size, it keeps its input's)
        with the strength and aesthetic scores :meth:`validation_pipeline` recorded; deterministic
        for a seed, the UNet in eval mode and put back as it was. The img2img pipeline denoises
        ``int(steps * strength)`` of ``steps``; where that is none (2 or 3 steps at strength 0.3)
        it would return no image, so the schedule is lengthened until it denoises one step."""
        refiner = getattr(pipeline, "tune_refiner_kwargs", None)
        if refiner is None:
            return super().generate(
                pipeline, prompt, width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                negative_prompt=negative_prompt, options=options, image=image,
            )
        if image is None:
            raise ValueError(
                "the SDXL refiner refines an image: generate needs image= (in a training run, model_flavour "
                "'refiner' makes the trainer pass a training image)"
            )
        from PIL import Image

        extra = self.validation_call_options(pipeline, options, guidance=guidance, negative_prompt=negative_prompt)
        schedule = int(steps)
        while int(schedule * float(refiner["strength"])) < 1:  # diffusers' own count; 0 makes no image
            schedule += 1
        unet = pipeline.unet
        was_training = unet.training
        unet.eval()
        try:
            result = pipeline(
                prompt=prompt,
                image=image.convert("RGB").resize((width, height), Image.LANCZOS),
                num_inference_steps=schedule,
                guidance_scale=guidance,
                negative_prompt=negative_prompt,
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="pil",
                **refiner,
                **extra,
            )
        finally:
            unet.train(was_training)
        return result.images[0]

FAMILY = SDXLFamily()
