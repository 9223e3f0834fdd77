"""Z-Image (Tongyi-MAI): a 6 B single-stream flow transformer, Qwen3 text encoder, Flux VAE.

What is particular to Z-Image, all of it read off diffusers' ``ZImagePipeline`` and
``ZImageTransformer2DModel`` (0.42):

- prompts go through the tokenizer's chat template (one user turn, generation prompt on), are
  padded to 512 tokens, and the text encoder's *second to last* hidden state, with padding
  removed, is the caption: a ``[seq, 2560]`` tensor whose length varies per prompt. The
  transformer takes a list of them, so nothing is padded in the cache.
- latents are ``(vae_latent - shift_factor) * scaling_factor``, 16 channels, 1/8 of the pixels.
- the transformer takes a *list* of ``C x 1 x H x W`` latents (a frame axis), a time
  ``t = 1 - sigma`` (1 is clean) and predicts ``x0 - noise``; the pipeline negates it before the
  Euler step. :meth:`ZImageFamily.predict` hands back ``noise - x0``, the loop's target.
- the pipeline's ``guidance_scale`` turns classifier-free guidance on for any value > 0, with
  ``pos + g * (pos - neg)``; Turbo is distilled to run without it (0).
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.families.zimage.flavours import (
    ZIMAGE_FLAVOURS,
    ZIMAGE_SIMPLETUNER_DEFAULT_FLAVOUR,
    ZIMAGE_UNAVAILABLE_FLAVOURS,
)
from tune_models.family import Flavour, LoadedModel, ModelFamily, compute_dtype


class ZImageFamily(ModelFamily):
    """Z-Image and Z-Image-Turbo."""

    name = "z-image"
    aliases = ("z_image", "zimage")
    flavours = {name: Flavour(name=name, **facts) for name, facts in ZIMAGE_FLAVOURS.items()}
    simpletuner_default_flavour = ZIMAGE_SIMPLETUNER_DEFAULT_FLAVOUR
    unavailable_flavours = ZIMAGE_UNAVAILABLE_FLAVOURS
    """Facts live in :mod:`tune_models.builtins` so listing them needs no torch."""
    default_flavour = "turbo"
    lora_target_presets = {
        "all": [
            "attention.to_q",
            "attention.to_k",
            "attention.to_v",
            "attention.to_out.0",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        ],
        "attention": ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"],
    }
    default_lora_target = "all"
    prediction = "flow"
    vae_scale_factor = 8
    patch_size = 2
    max_sequence_length = 512
    """Prompt tokens the pipeline pads/truncates to (``ZImagePipeline(max_sequence_length=512)``)."""
    label = "Z-Image"
    transformer_class = "ZImageTransformer2DModel"
    text_encoder_classes = ("AutoModel",)
    lora_keys_module = "tune_models.families.zimage.lora_keys"
    # Our ComfyUI export (lora_down/lora_up) reads back through from_comfyui; other
    # ``diffusion_model.`` files (Ostris' adapters use lora_A/lora_B) go through the pipeline.
    comfyui_key_prefix = "diffusion_model."
    comfyui_key_suffix = ".lora_down.weight"
    tiny_module = "tune_models.families.zimage.tiny"

    # ----------------------------------------------------------------- loading
    # ``load`` is the base class's; diffusers' reader knows every Z-Image LoRA layout (its own,
    # ``diffusion_model.`` keys as Ostris' adapter and ComfyUI use, kohya), so ``lora_state_dict``
    # is the base class's too.
    def pipeline_class(self) -> type:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    # ----------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """``{"prompt_embeds": Tensor[seq, dim]}`` per prompt, exactly as ``ZImagePipeline``
        encodes it (chat template, padding to 512, hidden_states[-2], padding removed)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        tokenizer, text_encoder = model.tokenizer, model.text_encoder
        device = next(text_encoder.parameters()).device
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    tokenize=False,
                    add_generation_prompt=True,
                    enable_thinking=True,
                )
                for prompt in chunk
            ]
            inputs = tokenizer(
                texts,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                return_tensors="pt",
            )
            input_ids = inputs.input_ids.to(device)
            mask = inputs.attention_mask.to(device).bool()
            hidden = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            for i in range(len(chunk)):
                results.append({"prompt_embeds": hidden[i][mask[i]].detach().to("cpu").contiguous()})
        return results

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Z-Image takes captions as a list of unpadded ``[seq, dim]`` tensors."""
        if not items:
            raise ValueError("collate_prompts needs at least one prompt")
        return {"prompt_embeds": [item["prompt_embeds"].to(device=device, dtype=dtype) for item in items]}

    # ----------------------------------------------------------------- denoiser
    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """``noise - x0`` for ``x_t = (1 - sigma) x0 + sigma noise``: the transformer sees
        ``t = 1 - sigma`` and predicts ``x0 - noise``, so its output is negated."""
        captions = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, len(captions))
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        frames = list(noisy_latents.to(dtype).unsqueeze(2).unbind(dim=0))  # B x [C, 1, H, W]
        out = transformer(frames, 1.0 - sigmas, list(captions), return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the transformer's blocks (:mod:`tune_models.families.zimage.token_routing`)."""
        from tune_models.families.zimage.token_routing import ZImageTokenRouting

        return ZImageTokenRouting()

    # ----------------------------------------------------------------- validation
    # ``validation_pipeline`` and ``generate`` are the base class's.
    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """``guidance`` > 0 turns classifier-free guidance on (against ``negative_prompt``)."""
        return {"negative_prompt": negative_prompt if guidance > 0 else None}


FAMILY = ZImageFamily()
