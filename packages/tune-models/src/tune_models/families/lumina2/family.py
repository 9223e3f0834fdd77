"""Lumina Image 2.0 (Alpha-VLLM): a 2.6 B unified single-stream flow transformer (NextDiT), a
Gemma-2-2B text encoder and the 16-channel Flux VAE, read off diffusers' ``Lumina2Pipeline`` and
``Lumina2Transformer2DModel`` (0.42):

- prompts: each prompt is prefixed with the pipeline's system prompt and ``" <Prompt Start> "``,
  tokenized to 256 tokens (right padding, ``<bos>`` first) and encoded by Gemma-2; the caption is
  the encoder's *second to last* hidden state. The transformer only reads the first
  ``mask.sum()`` caption tokens (its RoPE embedder takes the caption length from the mask, and the
  context refiner masks the rest), so we cache each prompt at its own length with an all-ones
  ``prompt_attention_mask``, and :meth:`Lumina2Family.collate_prompts` pads a batch with zeros
  and mask 0. Gemma attends causally, so the cached tokens are exactly the pipeline's.
- latents: the Flux VAE's ``(z - shift_factor) * scaling_factor`` (the generic
  :meth:`~tune_models.family.ModelFamily.encode_images`), 16 channels at 1/8 of the pixels; the
  pipeline hard-codes that 8x, so a tiny VAE must downsample 8x too.
- time and sign (like Z-Image, which shares the NextDiT design): the transformer takes
  ``t = 1 - sigma`` ("Lumina uses t=0 as the noise and t=1 as the image") and predicts
  ``x0 - noise``; the pipeline negates it before the Euler step. :meth:`Lumina2Family.predict`
  returns ``noise - x0``.
- validation: CFG with a negative prompt (``""`` when none is given, as the pipeline) above
  guidance 1, norm-rescaled (``cfg_normalization``) and, as the model card's example, applied only
  in the first quarter of the steps (``cfg_trunc_ratio = 0.25``).
- shift: the model was trained and is sampled with a fixed time shift of 6: the published
  scheduler config says ``shift: 6.0`` with ``use_dynamic_shifting: false``
  (:data:`~tune_models.families.lumina2.flavours.PUBLISHED_SCHEDULER` gives the sources), so
  ``Lumina2Pipeline`` samples every image size at 6 and training does the same. With
  ``flow_schedule_auto_shift`` the training shift follows the image size instead;
  :meth:`Lumina2Family.flow_shift` warns once that inference will not.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tune_models.families import _gemma
from tune_models.families.lumina2.flavours import LUMINA2_FLAVOURS, LUMINA2_FLAVOUR_ALIASES
from tune_models.family import Flavour, LoadedModel, ModelFamily, compute_dtype

_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_MLP = ["feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3"]

SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)
"""``Lumina2Pipeline.system_prompt`` (a test checks they agree)."""
_log = logging.getLogger(__name__)

PROMPT_SEPARATOR = " <Prompt Start> "
"""What ``Lumina2Pipeline.encode_prompt`` puts between the system prompt and the user's prompt."""


class Lumina2Family(ModelFamily):
    """Lumina Image 2.0 (text-to-image)."""

    name = "lumina2"
    aliases = ("lumina-image-2", "lumina")
    flavours = {name: Flavour(name=name, **facts) for name, facts in LUMINA2_FLAVOURS.items()}
    flavour_aliases = LUMINA2_FLAVOUR_ALIASES
    default_flavour = "base"
    lora_target_presets = {"all": _ATTENTION + _MLP, "attention": list(_ATTENTION)}
    """``all``: attention projections and the SwiGLU feed-forward linears of every main, noise-refiner
    and context-refiner block (modulation, embedders and the output layer stay frozen);
    ``attention``: the projections only."""
    default_lora_target = "all"
    prediction = "flow"
    vae_scale_factor = 8
    patch_size = 2
    max_sequence_length = 256
    """Tokens the pipeline pads/truncates a prompt to (system prompt included)."""
    cfg_trunc_ratio = 0.25
    """Validation CFG runs in the first quarter of the steps only (the model card's setting)."""
    label = "Lumina 2"
    transformer_class = "Lumina2Transformer2DModel"
    text_encoder_classes = ("Gemma2Model",)
    text_encoder_config_key = "pretrained_gemma_model_name_or_path"
    lora_keys_module = "tune_models.families.lumina2.lora_keys"
    comfyui_key_prefix = "diffusion_model."
    comfyui_key_suffix = ".lora_down.weight"
    tiny_module = "tune_models.families.lumina2.tiny"

    def flow_shift(
        self,
        height: int,
        width: int,
        *,
        shift: float | None,
        auto_shift: bool,
        model: LoadedModel | None = None,
    ) -> float:
        """The base class's shift; warns once when ``auto_shift`` asks for a size-dependent shift
        while the checkpoint's scheduler samples at a fixed one (``use_dynamic_shifting`` false,
        as published): training and validation/inference would then see different noise levels."""
        config = dict(getattr(getattr(model, "scheduler", None), "config", {}) or {})
        if auto_shift and model is not None and not config.get("use_dynamic_shifting", False) and not self._warned_auto_shift:
            type(self)._warned_auto_shift = True
            _log.warning(
                "flow_schedule_auto_shift: %s samples with its scheduler's fixed shift %s at every size "
                "(use_dynamic_shifting is false); training with a size-dependent shift will not match it. "
                "Leave flow_schedule_auto_shift off to train at the checkpoint's shift.",
                self.label, config.get("shift"),
            )
        return super().flow_shift(height, width, shift=shift, auto_shift=auto_shift, model=model)

    _warned_auto_shift = False

    def pipeline_class(self) -> type:
        from diffusers import Lumina2Pipeline

        return Lumina2Pipeline

    # ----------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``Lumina2Pipeline.encode_prompt`` computes it, without the padding:
        ``prompt_embeds`` ``[n, hidden]`` (Gemma's second to last hidden state at the ``n`` real
        tokens, system prompt included, ``n <= 256``) and ``prompt_attention_mask`` ``[n]`` (ones)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        encoder = model.text_encoder
        param = next(encoder.parameters())
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [SYSTEM_PROMPT + PROMPT_SEPARATOR + p for p in prompts[start : start + batch_size]]
            tokens = model.tokenizer(
                chunk,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                padding_side="right",
                return_tensors="pt",
            ).to(param.device)
            hidden = encoder(
                tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
            ).hidden_states[-2]
            for i in range(len(chunk)):
                valid = hidden[i][tokens.attention_mask[i].bool()]
                embeds = valid.detach().to(device="cpu", dtype=param.dtype).contiguous()
                results.append(
                    {"prompt_embeds": embeds, "prompt_attention_mask": torch.ones(embeds.shape[0], dtype=torch.int64)}
                )
        return results

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Pad to the batch's longest prompt with zero embeddings and mask 0 (the transformer reads
        only the first ``mask.sum()`` tokens of each row)."""
        return _gemma.pad_prompts(items, device, dtype, mask_key="prompt_attention_mask")

    # ----------------------------------------------------------------- denoiser
    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """``noise - x0``: the transformer gets ``t = 1 - sigma`` and predicts ``x0 - noise``, so
        its output is negated (see the module docstring)."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0], even=True)
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        out = transformer(
            hidden_states=noisy_latents.to(dtype),
            timestep=(1 - sigmas).to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_attention_mask=prompts["prompt_attention_mask"],
            return_dict=False,
        )[0]
        return -out

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the main joint layers, each sample's image found after its own caption
        (:mod:`tune_models.families.lumina2.token_routing`)."""
        from tune_models.families.lumina2.token_routing import Lumina2TokenRouting

        return Lumina2TokenRouting(patch_size=int(model.transformer.config.patch_size))

    # ----------------------------------------------------------------- validation
    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """Negative prompt (``""`` unless given; used when ``guidance > 1``), normalised CFG
        truncated to the first :attr:`cfg_trunc_ratio` of the steps, 256 prompt tokens."""
        return {
            "negative_prompt": negative_prompt or "",
            "cfg_trunc_ratio": self.cfg_trunc_ratio,
            "cfg_normalization": True,
            "max_sequence_length": self.max_sequence_length,
        }


FAMILY = Lumina2Family()
