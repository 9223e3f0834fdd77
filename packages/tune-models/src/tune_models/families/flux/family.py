"""FLUX.1 (Black Forest Labs): a 12 B MMDiT flow transformer, CLIP-L + T5-XXL, a 16-channel VAE.

What is particular to Flux, read off diffusers' ``FluxPipeline`` and ``FluxTransformer2DModel``
(0.42):

- prompts: CLIP-L's *pooled* output (77 tokens, ``pooler_output``) conditions the modulation; T5's
  last hidden state, padded to ``max_sequence_length`` (512 for dev, 256 for schnell), is the text
  sequence. The pipeline passes no attention mask to T5 or to the transformer; we cache T5's mask
  anyway so ``flux_attention_masked_training`` can hide the padding from the transformer.
  ``txt_ids`` are zeros ``[seq, 3]``.
- latents: ``(vae_latent - shift_factor) * scaling_factor``, 16 channels at 1/8 of the pixels,
  cached unpacked (``B x 16 x h x w``); :meth:`FluxFamily.predict` packs 2x2 patches into tokens
  (``B x hw/4 x 64``) with ``img_ids`` ``(0, row, col)`` and unpacks the output.
- the transformer takes ``timestep = sigma`` (it multiplies by 1000 itself; the pipeline divides
  the scheduler's ``t = 1000 sigma`` by 1000) and predicts the velocity ``noise - x0`` directly:
  the pipeline's Euler step is ``x + (sigma_next - sigma) * v``. So ``predict`` needs no sign flip.
- dev is guidance-distilled: ``guidance_scale`` is an *input* (``guidance`` embedding, also x1000
  inside), not classifier-free guidance. Training feeds a constant (``flux_guidance_value``,
  default 1.0) or a uniform draw in ``[flux_guidance_min, flux_guidance_max]`` per sample
  (``flux_guidance_mode: random-range``). schnell has no guidance embedding.
- kontext (FLUX.1-Kontext-dev, reference-image editing): the same transformer; the reference
  image's latent is packed like the noisy one and appended after it with ids ``(1, row, col)``
  (``FluxKontextPipeline.prepare_latents``), its outputs dropped. ``predict(...,
  reference_latents=[ref])`` does that; the trainer passes the latents of the image dataset's
  conditioning dataset (``conditioning_data``). One reference per sample, as the pipeline's.
  Validation edits a reference of the run (``FluxKontextPipeline(image=...)``, see
  :meth:`FluxFamily.validation_input`) at the size training gave it.
- the sampling shift is resolution-dependent for dev (``calculate_shift`` on the packed token
  count, 256 -> 0.5 ... 4096 -> 1.15, ``shift = exp(mu)``) and fixed at 1 for schnell.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tune_models.families import _shared
from tune_models.families.flux.flavours import (
    FLUX_FLAVOURS,
    FLUX_SIMPLETUNER_DEFAULT_FLAVOUR,
    FLUX_UNAVAILABLE_FLAVOURS,
)
from tune_models.family import Flavour, LoadedModel, ModelFamily, compute_dtype

_ATTENTION = ["to_k", "to_q", "to_v", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0", "to_add_out"]
_CONTEXT = ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
_CONTEXT_FFS = ["ff_context.net.0.proj", "ff_context.net.2"]

GUIDANCE_MODES = _shared.GUIDANCE_MODES


class FluxFamily(ModelFamily):
    """FLUX.1-dev and FLUX.1-schnell."""

    name = "flux"
    flavours = {name: Flavour(name=name, **facts) for name, facts in FLUX_FLAVOURS.items()}
    simpletuner_default_flavour = FLUX_SIMPLETUNER_DEFAULT_FLAVOUR
    unavailable_flavours = FLUX_UNAVAILABLE_FLAVOURS
    """Facts live in :mod:`tune_models.builtins` so listing them needs no torch."""
    cudnn_attention_in_training = False
    """cuDNN attention's backward fails on Flux's shapes (and Chroma's, which inherits this):
    an illegal memory access on the H100 with torch 2.11 (``scripts/sdpa_cudnn_check.py``)."""
    default_flavour = "dev"
    # SimpleTuner's ``flux_lora_target`` values, by their documented meaning: ``all`` = every
    # attention projection of both streams (single blocks' q/k/v included), no feed-forward;
    # ``mmdit`` = the image stream's attention only; ``context`` = the text stream's attention;
    # ``+ffs`` adds the feed-forward layers of the streams named (for ``all``: both streams' MLPs
    # and the single blocks' ``proj_mlp``/``proj_out``); ``tiny``/``nano`` = TheLastBen's
    # few-layer LoRAs (the output projection of single blocks 7 and 20, or 7 only).
    lora_target_presets = {
        "all": list(_ATTENTION),
        "all+ffs": _ATTENTION + ["ff.net.0.proj", "ff.net.2", *_CONTEXT_FFS, "proj_mlp", "proj_out"],
        "context": list(_CONTEXT),
        "context+ffs": _CONTEXT + _CONTEXT_FFS,
        "mmdit": ["to_k", "to_q", "to_v", "to_out.0"],
        "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
        "nano": ["single_transformer_blocks.7.proj_out"],
    }
    default_lora_target = "all"
    prediction = "flow"
    vae_scale_factor = 8
    patch_size = 2
    max_sequence_lengths = {"dev": 512, "krea": 512, "schnell": 256, "kontext": 512, "tiny": 64}
    validation_option_keys = frozenset({"validation_guidance_real"})
    accepts_reference_latents = True
    """Only the ``kontext`` flavour uses them (:meth:`accepts_references`)."""
    """T5 tokens per prompt, padded and truncated (the pipelines' defaults; the tiny model's is short)."""
    clip_max_length = 77
    label = "Flux"
    transformer_class = "FluxTransformer2DModel"
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    default_extras = {"guidance": {"mode": "constant", "value": 1.0, "min": 0.0, "max": 4.0}}
    lora_keys_module = "tune_models.families.flux.lora_keys"
    comfyui_key_prefix = "diffusion_model."
    comfyui_key_suffix = ".lora_down.weight"
    """Our ComfyUI layout is read here (diffusers' reader knows BFL keys, not our fused ones);
    ``lora_state_dict`` otherwise reads any layout diffusers knows (its own, kohya, BFL/ai-toolkit,
    XLabs)."""
    tiny_module = "tune_models.families.flux.tiny"
    # train_text_encoder: a LoRA on the CLIP-L, the one encoder FluxPipeline.load_lora_weights
    # reads (text_encoder.); the T5's embeddings keep coming from the text cache.
    text_encoder_lora_components = ("text_encoder",)
    text_encoder_lora_module_prefix = "text_model."

    # ----------------------------------------------------------------- options
    def accepts_references(self, flavour: str | None) -> bool:
        """FLUX.1-Kontext is made for a reference image; dev and schnell have never seen one."""
        return self.flavour(flavour).name == "kontext"

    def validation_input(self, flavour: str | None) -> str | None:
        """Kontext validates by editing a reference of the run's conditioning data; dev and
        schnell make images from text."""
        return "reference" if self.accepts_references(flavour) else None

    def configure_training(self, model: LoadedModel, options: Mapping[str, Any]) -> None:
        """Flux's training options (SimpleTuner keys): ``flux_guidance_mode`` (``constant``, default,
        or ``random-range``), ``flux_guidance_value`` (1.0), ``flux_guidance_min`` (0.0),
        ``flux_guidance_max`` (4.0), ``flux_attention_masked_training`` (False)."""
        model.extras["guidance"] = _shared.guidance_settings(model.extras["guidance"], options, "flux")
        model.extras["attention_masked"] = bool(options.get("flux_attention_masked_training") or False)

    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    # ----------------------------------------------------------------- encoding
    def _max_sequence_length(self, flavour: Flavour) -> int:
        return self.max_sequence_lengths.get(flavour.name, 512)

    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``FluxPipeline.encode_prompt`` computes it: ``prompt_embeds``
        (T5 ``[seq, 4096]``), ``pooled_prompt_embeds`` (CLIP ``[768]``) and T5's
        ``attention_mask`` (``[seq]``, int64)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        length = self._max_sequence_length(model.flavour)
        t5 = model.text_encoder_2
        t5_device = next(t5.parameters()).device
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            pooled = self._clip_pooled(model, chunk)
            t5_inputs = model.tokenizer_2(
                chunk, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            embeds = t5(t5_inputs.input_ids.to(t5_device), output_hidden_states=False)[0]
            for i in range(len(chunk)):
                results.append(
                    {
                        "prompt_embeds": embeds[i].detach().to("cpu").contiguous(),
                        "pooled_prompt_embeds": pooled[i].detach().to("cpu").contiguous(),
                        "attention_mask": t5_inputs.attention_mask[i].to(torch.int64).contiguous(),
                    }
                )
        return results

    def _clip_pooled(self, model: LoadedModel, prompts: list[str]) -> torch.Tensor:
        """CLIP-L's pooled output ``[B, 768]`` on its device (with gradients where it trains)."""
        clip = model.text_encoder
        ids = model.tokenizer(
            prompts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return clip(ids.to(next(clip.parameters()).device), output_hidden_states=False).pooler_output

    def encode_prompts_for_training(
        self, model: LoadedModel, prompts: list[str], cached: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """``pooled_prompt_embeds`` from the trained CLIP-L, live; the T5's ``prompt_embeds`` and
        ``attention_mask`` from ``cached``."""
        pooled = self._clip_pooled(model, list(prompts))
        return [{**entry, "pooled_prompt_embeds": pooled[i]} for i, entry in enumerate(cached)]

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        batch = _shared.stack_prompts(
            items, device, dtype, label=self.label, keys=("prompt_embeds", "pooled_prompt_embeds")
        )
        if all("attention_mask" in i for i in items):
            batch["attention_mask"] = torch.stack([i["attention_mask"] for i in items]).to(device=device)
        return batch

    # ----------------------------------------------------------------- denoiser
    pack = staticmethod(_shared.pack_2x2)
    """``B x C x H x W`` -> ``B x (H/2 * W/2) x 4C`` tokens (2x2 patches, see :func:`_shared.pack_2x2`)."""
    unpack = staticmethod(_shared.unpack_2x2)
    """Inverse of :attr:`pack` for a latent of ``height`` x ``width``."""

    @staticmethod
    def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[(H/2)(W/2), 3]`` position ids ``(0, row, col)`` of the packed tokens."""
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] = torch.arange(height // 2)[:, None]
        ids[..., 2] = torch.arange(width // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def training_guidance(self, model: LoadedModel, batch: int, device: torch.device) -> torch.Tensor:
        """The guidance input for a training batch (see :meth:`configure_training`). A random
        range draws from torch's global generator, which the trainer seeds per step."""
        return _shared.guidance_values(model.extras.get("guidance", {"mode": "constant", "value": 1.0}), batch, device)

    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
        *,
        reference_latents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``noise - x0`` for ``x_t = (1 - sigma) x0 + sigma noise``: Flux takes ``timestep = sigma``
        and predicts exactly that velocity (see the module docstring).

        ``reference_latents`` (Kontext): one clean ``B x 16 x h x w`` latent from
        :meth:`encode_images`, appended as tokens at ids ``(1, row, col)`` like
        ``FluxKontextPipeline``'s ``image``; their outputs are dropped."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0], even=True)
        batch, _, height, width = noisy_latents.shape
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        device = noisy_latents.device
        guidance = None
        if getattr(transformer.config, "guidance_embeds", False):
            guidance = self.training_guidance(model, batch, device)
        kwargs: dict[str, Any] = {}
        tokens = self.pack(noisy_latents.to(dtype))
        ids = self.image_ids(height, width, device, dtype)
        if reference_latents:
            if len(reference_latents) != 1:
                raise ValueError(
                    f"Flux Kontext takes one reference image per sample, got {len(reference_latents)} "
                    "(one conditioning dataset in conditioning_data, or conditioning_multidataset_sampling: random)"
                )
            (ref,) = reference_latents
            if ref.ndim != 4 or ref.shape[:2] != noisy_latents.shape[:2] or ref.shape[2] % 2 or ref.shape[3] % 2:
                raise ValueError(
                    f"reference latents must be {batch} x {noisy_latents.shape[1]} x h x w (h, w even) like the "
                    f"noisy latents, got {tuple(ref.shape)}"
                )
            ref_ids = self.image_ids(ref.shape[2], ref.shape[3], device, dtype)
            ref_ids[:, 0] = 1
            tokens = torch.cat([tokens, self.pack(ref.to(device=device, dtype=dtype))], dim=1)
            ids = torch.cat([ids, ref_ids])
        if model.extras.get("attention_masked") and "attention_mask" in prompts:
            image_tokens = tokens.shape[1]
            text = prompts["attention_mask"].to(device=device, dtype=torch.bool)
            mask = torch.cat([text, torch.ones(batch, image_tokens, dtype=torch.bool, device=device)], dim=1)
            kwargs["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
        out = transformer(
            hidden_states=tokens,
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=prompts["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=ids,
            return_dict=False,
            **kwargs,
        )[0]
        return self.unpack(out[:, : (height // 2) * (width // 2)], height, width)

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the transformer's blocks (:mod:`tune_models.families.flux.token_routing`)."""
        from tune_models.families.flux.token_routing import FluxTokenRouting

        return FluxTokenRouting()

    # ----------------------------------------------------------------- validation
    def validation_pipeline(self, model: LoadedModel) -> Any:
        """``FluxPipeline``, or ``FluxKontextPipeline`` (same components) for kontext."""
        pipeline = super().validation_pipeline(model)
        if model.flavour.name == "kontext":
            from diffusers import FluxKontextPipeline

            pipeline = FluxKontextPipeline(**pipeline.components)
            pipeline.set_progress_bar_config(disable=True)
        pipeline._tune_max_sequence_length = self._max_sequence_length(model.flavour)
        return pipeline

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """``guidance`` is the distilled guidance *input* for dev (no CFG, so ``negative_prompt``
        is used only with ``validation_guidance_real``, see :meth:`_validation_option_kwargs`),
        ignored by schnell. Kontext gets ``max_area`` and, with a reference image,
        ``_auto_resize=False`` (see :meth:`generate`)."""
        kwargs: dict[str, Any] = {"max_sequence_length": getattr(pipeline, "_tune_max_sequence_length", 512)}
        if getattr(pipeline, "_tune_max_area", None):
            kwargs["max_area"] = pipeline._tune_max_area
            kwargs["_auto_resize"] = False
        return kwargs

    def _validation_option_kwargs(
        self, pipeline: Any, options: dict[str, Any], *, guidance: float, negative_prompt: str | None
    ) -> dict[str, Any]:
        """``validation_guidance_real`` above 1: real classifier-free guidance, the pipeline's
        ``true_cfg_scale`` against ``validation_negative_prompt`` (the empty prompt when unset:
        ``FluxPipeline`` runs CFG only when it has a negative prompt). Two transformer calls a step."""
        scale = float(options.get("validation_guidance_real", 1.0))
        if scale <= 1:
            return {}
        return {"true_cfg_scale": scale, "negative_prompt": negative_prompt or ""}

    def generate(self, pipeline: Any, prompt: str, *, width: int, height: int, **kwargs: Any) -> Any:
        """As the base (the reference ``image`` goes to ``FluxKontextPipeline(image=...)``). For
        Kontext the requested size is also its ``max_area``, since the pipeline otherwise rescales
        every request to 1024 x 1024 pixels of area; and the reference keeps the size training gave
        it (bucket-sized, rounded down to 16 px by the pipeline) instead of being resized to the
        nearest of Kontext's preferred ~1 MP sizes (``_auto_resize``)."""
        if type(pipeline).__name__ == "FluxKontextPipeline":
            pipeline._tune_max_area = width * height
        return super().generate(pipeline, prompt, width=width, height=height, **kwargs)


FAMILY = FluxFamily()
