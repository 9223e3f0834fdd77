"""Stable Diffusion 3.5 (Stability AI): an MMDiT flow transformer, CLIP-L + CLIP-G + T5-XXL.

What is particular to SD3, read off diffusers' ``StableDiffusion3Pipeline`` and
``SD3Transformer2DModel`` (0.42):

- prompts: both CLIPs (77 tokens) give their *second to last* hidden state and their projected
  pooled output; the two hidden states are concatenated along channels (768 + 1280), zero-padded
  to T5's width (4096) and put in front of T5's last hidden state (256 tokens, no mask) along the
  sequence: ``prompt_embeds`` is ``[77 + 256, 4096]``; ``pooled_prompt_embeds`` the two pooled
  outputs concatenated, ``[2048]``.
- latents: ``(vae_latent - shift_factor) * scaling_factor``, 16 channels at 1/8 of the pixels;
  the transformer patchifies them itself (patch 2) and takes them unpacked.
- the transformer takes ``timestep = 1000 sigma`` (the scheduler's ``t``, passed as is) and
  predicts the velocity ``noise - x0`` (the pipeline's Euler step is ``x + (sigma_next - sigma) v``),
  so :meth:`SD3Family.predict` only scales the time.
- sampling uses a fixed shift of 3 (the checkpoints' scheduler config); validation uses real
  classifier-free guidance with a negative prompt, and for 3.5 Medium skip-layer guidance on
  layers 7-9 (Stability's recommendation); ``validation_guidance_skip_layers`` (and ``_start``,
  ``_stop``, ``validation_guidance_skip_scale``) override it.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.families import _shared
from tune_models.families.sd3.flavours import SD3_FLAVOURS
from tune_models.family import Flavour, LoadedModel, ModelFamily, compute_dtype

_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
_FFS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


class SD3Family(ModelFamily):
    """Stable Diffusion 3.5 Medium and Large."""

    name = "sd3"
    flavours = {name: Flavour(name=name, **facts) for name, facts in SD3_FLAVOURS.items()}
    default_flavour = "medium"
    # ``all``: every attention projection of both streams (and 3.5 Medium's second image
    # attention ``attn2``); ``all+ffs`` adds the feed-forward layers; ``context``: the text
    # stream's attention; ``mmdit``: the image stream's attention.
    lora_target_presets = {
        "all": list(_ATTENTION),
        "all+ffs": _ATTENTION + _FFS,
        "context": ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
        "mmdit": ["to_k", "to_q", "to_v", "to_out.0"],
    }
    default_lora_target = "all"
    prediction = "flow"
    vae_scale_factor = 8
    patch_size = 2
    max_sequence_lengths = {"medium": 256, "large": 256, "tiny": 32}
    skip_guidance_layers = {"medium": [7, 8, 9]}
    """Skip-layer guidance layers used for validation images, per flavour (none: plain CFG);
    ``validation_guidance_skip_layers`` replaces them."""
    validation_option_keys = frozenset(
        {
            "validation_guidance_skip_layers",
            "validation_guidance_skip_layers_start",
            "validation_guidance_skip_layers_stop",
            "validation_guidance_skip_scale",
        }
    )
    _SKIP_LAYER_ARGUMENTS = {
        "validation_guidance_skip_layers_start": "skip_layer_guidance_start",
        "validation_guidance_skip_layers_stop": "skip_layer_guidance_stop",
        "validation_guidance_skip_scale": "skip_layer_guidance_scale",
    }
    """Config key -> ``StableDiffusion3Pipeline.__call__`` argument (diffusers 0.42)."""
    clip_max_length = 77
    label = "SD3"
    transformer_class = "SD3Transformer2DModel"
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    lora_keys_module = "tune_models.families.sd3.lora_keys"
    comfyui_key_prefix = "diffusion_model."
    """``lora_state_dict`` reads our ComfyUI layout itself, anything else (diffusers, kohya)
    through diffusers."""
    tiny_module = "tune_models.families.sd3.tiny"
    # train_text_encoder: a LoRA on both CLIPs, as StableDiffusion3Pipeline.load_lora_weights reads
    # them; the T5's part of prompt_embeds keeps coming from the text cache.
    text_encoder_lora_components = ("text_encoder", "text_encoder_2")
    text_encoder_lora_module_prefix = "text_model."

    # ----------------------------------------------------------------- loading
    # ``load`` and ``lora_state_dict`` are the base class's.
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    # ----------------------------------------------------------------- encoding
    def _max_sequence_length(self, flavour: Flavour) -> int:
        return self.max_sequence_lengths.get(flavour.name, 256)

    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``StableDiffusion3Pipeline.encode_prompt`` computes it:
        ``prompt_embeds`` ``[77 + seq, 4096]`` and ``pooled_prompt_embeds`` ``[2048]``."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        length = self._max_sequence_length(model.flavour)
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            t5 = model.text_encoder_3
            ids = model.tokenizer_3(
                chunk, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
            ).input_ids
            t5_embeds = t5(ids.to(next(t5.parameters()).device))[0]
            clip, pooled_all = self._clip(model, chunk, width=t5_embeds.shape[-1])
            embeds = torch.cat([clip.to(t5_embeds.device, t5_embeds.dtype), t5_embeds], dim=-2)
            pooled_all = pooled_all.to(t5_embeds.device)
            for i in range(len(chunk)):
                results.append(
                    {
                        "prompt_embeds": embeds[i].detach().to("cpu").contiguous(),
                        "pooled_prompt_embeds": pooled_all[i].detach().to("cpu").contiguous(),
                    }
                )
        return results

    def _clip(self, model: LoadedModel, prompts: list[str], *, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both CLIPs' part of ``prompt_embeds`` (penultimate hidden states side by side, zero-padded
        to the T5's ``width``: ``[B, 77, width]``) and ``pooled_prompt_embeds`` ``[B, 2048]``, on the
        second CLIP's device, with gradients where the CLIPs train."""
        hidden, pooled = [], []
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            ids = tokenizer(
                prompts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        device = hidden[-1].device
        clip = torch.cat([h.to(device) for h in hidden], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return clip, torch.cat([p.to(device) for p in pooled], dim=-1)

    def encode_prompts_for_training(
        self, model: LoadedModel, prompts: list[str], cached: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """Both CLIPs live (the first 77 rows of ``prompt_embeds`` and ``pooled_prompt_embeds``),
        the T5's rows after them from ``cached``."""
        width = cached[0]["prompt_embeds"].shape[-1]
        clip, pooled = self._clip(model, list(prompts), width=width)
        out = []
        for i, entry in enumerate(cached):
            t5 = entry["prompt_embeds"][self.clip_max_length :].to(clip.device, clip.dtype)
            out.append({**entry, "prompt_embeds": torch.cat([clip[i], t5], dim=0), "pooled_prompt_embeds": pooled[i]})
        return out

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        return _shared.stack_prompts(
            items, device, dtype, label=self.label, keys=("prompt_embeds", "pooled_prompt_embeds")
        )

    # ----------------------------------------------------------------- denoiser
    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """``noise - x0``: SD3 takes ``timestep = 1000 sigma`` and predicts that velocity."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0])
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        return transformer(
            hidden_states=noisy_latents.to(dtype),
            timestep=(sigmas * 1000).to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=prompts["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the joint blocks (:mod:`tune_models.families.sd3.token_routing`)."""
        from tune_models.families.sd3.token_routing import SD3TokenRouting

        return SD3TokenRouting(patch_size=int(model.transformer.config.patch_size))

    # ----------------------------------------------------------------- validation
    def validation_pipeline(self, model: LoadedModel) -> Any:
        pipeline = super().validation_pipeline(model)
        pipeline._tune_max_sequence_length = self._max_sequence_length(model.flavour)
        pipeline._tune_skip_guidance_layers = self.skip_guidance_layers.get(model.flavour.name)
        return pipeline

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """Classifier-free guidance ``guidance`` (> 1 enables it) against ``negative_prompt``
        (default empty), plus the flavour's skip-layer guidance."""
        extra: dict[str, Any] = {
            "negative_prompt": negative_prompt,
            "max_sequence_length": getattr(pipeline, "_tune_max_sequence_length", 256),
        }
        layers = getattr(pipeline, "_tune_skip_guidance_layers", None)
        if layers and guidance > 1:
            extra["skip_guidance_layers"] = list(layers)
        return extra

    def _validation_option_kwargs(
        self, pipeline: Any, options: dict[str, Any], *, guidance: float, negative_prompt: str | None
    ) -> dict[str, Any]:
        """``validation_guidance_skip_*`` as the pipeline's skip-layer guidance arguments. The
        layers replace the flavour's (``[]``: none); the pipeline applies them only with
        classifier-free guidance (``guidance`` > 1), in the steps between ``start`` and ``stop``
        (fractions of the step count, both exclusive), adding ``scale`` times the difference
        between the conditional prediction and one made without those blocks."""
        extra: dict[str, Any] = {}
        if "validation_guidance_skip_layers" in options:
            layers = [int(i) for i in options["validation_guidance_skip_layers"]]
            count = int(pipeline.transformer.config.num_layers)
            beyond = [i for i in layers if not 0 <= i < count]
            if beyond:
                raise ValueError(
                    f"validation_guidance_skip_layers {layers} names blocks {beyond} that the {self.label} "
                    f"transformer does not have (it has {count}: 0-{count - 1})"
                )
            extra["skip_guidance_layers"] = layers or None
        for key, argument in self._SKIP_LAYER_ARGUMENTS.items():
            if key in options:
                extra[argument] = float(options[key])
        return extra


FAMILY = SD3Family()
