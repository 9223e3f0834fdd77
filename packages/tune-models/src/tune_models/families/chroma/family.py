"""Chroma (lodestones): FLUX.1-schnell's architecture, pruned and retrained, without CLIP.

It differs from Flux (whose family this one extends) in what diffusers' ``ChromaPipeline``
(0.42) does:

- prompts: T5-XXL only (512 tokens), encoded *with* its attention mask; the transformer then
  masks every text padding token except the first (``position <= length``), so the mask is
  cached with the embedding and always used, in training as in sampling.
- the mask reaches the transformer as a *boolean* mask here: padding is hidden, as the Chroma
  authors' code does. diffusers' ``ChromaPipeline`` (0.42) hands the transformer a float 0/1 mask,
  which scaled-dot-product attention *adds* to the logits (valid pairs +1, padding +0), so its
  images attend to padding a little. ``model.extras["diffusers_float_mask"] = True`` makes
  :meth:`ChromaFamily.predict` do the same (the tests use it to match the pipeline exactly).
- no pooled prompt and no guidance input: modulation comes from a small "distilled guidance"
  approximator fed by the timestep; validation uses real classifier-free guidance with a
  negative prompt.
- diffusers' ``ChromaTransformer2DModel`` (0.42) calls its single-stream blocks *without* the
  attention mask when gradient checkpointing is on (the checkpointed call passes hidden states,
  temb and RoPE only), so training with checkpointing would let the image attend to the text
  padding in 38 of the 57 blocks while sampling does not. :meth:`ChromaFamily.predict` puts the
  mask back into those calls (:func:`_mask_checkpointed_single_blocks`).
- everything else is Flux's: 2x2 packed latents with the VAE's shift and scaling, ``img_ids``,
  ``timestep = sigma``, the velocity ``noise - x0``, resolution-dependent shift, and the BFL
  module names for ComfyUI (Chroma has no modulation layers, so no ``*_mod`` keys).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from tune_models.families import _shared
from tune_models.families.chroma.flavours import CHROMA_FLAVOURS, CHROMA_UNAVAILABLE_FLAVOURS
from tune_models.families.flux.family import FluxFamily
from tune_models.family import Flavour, LoadedModel, compute_dtype


class ChromaFamily(FluxFamily):
    """Chroma1-Base and Chroma1-HD."""

    name = "chroma"
    flavours = {name: Flavour(name=name, **facts) for name, facts in CHROMA_FLAVOURS.items()}
    unavailable_flavours = CHROMA_UNAVAILABLE_FLAVOURS
    validation_option_keys = frozenset()  # validation_guidance is already real CFG here
    simpletuner_default_flavour = None  # SimpleTuner's is base too (not Flux's krea, inherited otherwise)
    default_flavour = "base"
    lora_target_presets = {k: v for k, v in FluxFamily.lora_target_presets.items()}
    max_sequence_lengths = {"base": 512, "hd": 512, "tiny": 64}
    label = "Chroma"
    transformer_class = "ChromaTransformer2DModel"
    text_encoder_classes = ("T5EncoderModel",)
    default_extras = {}
    tiny_module = "tune_models.families.chroma.tiny"
    text_encoder_lora_components = ()
    """Chroma's only encoder is a T5 (Flux's CLIP-L LoRA does not apply); train_text_encoder is refused."""

    def configure_training(self, model: LoadedModel, options: Mapping[str, Any]) -> None:
        """Chroma has no training options of its own (no guidance input; masking is always on)."""

    def pipeline_class(self) -> type:
        from diffusers import ChromaPipeline

        return ChromaPipeline

    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``ChromaPipeline.encode_prompt``: ``prompt_embeds`` (T5 run with its
        mask, ``[seq, 4096]``) and ``attention_mask`` (``[seq]``, 1 up to and including the first
        padding token)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        length = self._max_sequence_length(model.flavour)
        t5 = model.text_encoder
        device = next(t5.parameters()).device
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            inputs = model.tokenizer(chunk, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            mask = inputs.attention_mask.to(device)
            embeds = t5(inputs.input_ids.to(device), output_hidden_states=False, attention_mask=mask)[0]
            positions = torch.arange(mask.shape[1], device=device)[None, :]
            keep = (positions <= mask.sum(dim=1, keepdim=True)).to(torch.int64)
            for i in range(len(chunk)):
                results.append(
                    {
                        "prompt_embeds": embeds[i].detach().to("cpu").contiguous(),
                        "attention_mask": keep[i].to("cpu").contiguous(),
                    }
                )
        return results

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        batch = _shared.stack_prompts(items, device, dtype, label=self.label, keys=("prompt_embeds",))
        batch["attention_mask"] = torch.stack([i["attention_mask"] for i in items]).to(device=device)
        return batch

    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """``noise - x0``: like Flux (``timestep = sigma``, packed tokens), with the text mask
        extended over the image tokens, as the pipeline does."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0], even=True)
        batch, _, height, width = noisy_latents.shape
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        device = noisy_latents.device
        image_tokens = (height // 2) * (width // 2)
        mask = torch.cat(
            [prompts["attention_mask"].to(device=device, dtype=torch.bool),
             torch.ones(batch, image_tokens, dtype=torch.bool, device=device)],
            dim=1,
        )
        if model.extras.get("diffusers_float_mask"):
            mask = mask.to(dtype)  # what ChromaPipeline passes (see the module docstring)
        _mask_checkpointed_single_blocks(transformer, mask)
        out = transformer(
            hidden_states=self.pack(noisy_latents.to(dtype)),
            timestep=sigmas.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=self.image_ids(height, width, device, dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return self.unpack(out, height, width)

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the double then single blocks; Chroma's blocks take their arguments
        unlike Flux.1's (:mod:`tune_models.families.chroma.token_routing`)."""
        from tune_models.families.chroma.token_routing import ChromaTokenRouting

        return ChromaTokenRouting()

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """Classifier-free guidance ``guidance`` (> 1 enables it) against ``negative_prompt``."""
        return {
            "negative_prompt": negative_prompt if guidance > 1 else None,
            "max_sequence_length": getattr(pipeline, "_tune_max_sequence_length", 512),
        }


def _mask_checkpointed_single_blocks(transformer: Any, mask: torch.Tensor) -> None:
    """Have this forward's checkpointed single-block calls take ``mask`` (see the module docstring).

    diffusers checkpoints a single block as ``func(block, hidden_states, temb, image_rotary_emb)``;
    the transformer's ``_gradient_checkpointing_func`` is wrapped (once; the wrapper keeps the
    function it wraps, so a later ``enable_gradient_checkpointing`` is honoured) to append the mask
    as the block's fourth positional argument, its ``attention_mask``. Positional, because every
    checkpoint function tune installs (torch's, ``offloaded_checkpoint``, ``every_nth_checkpoint``)
    passes positional arguments through and keeps them for the recomputation in backward, and TREAD
    binds them by the block's signature, so it cuts the mask as it does the uncheckpointed one."""
    func = getattr(transformer, "_gradient_checkpointing_func", None)
    if func is None or not getattr(transformer, "gradient_checkpointing", False):
        return
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    wrapped = getattr(func, "_tune_wraps", func)

    def checkpoint(block: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3 and "attention_mask" not in kwargs:
            args = (*args, checkpoint.mask)
        return wrapped(block, *args, **kwargs)

    checkpoint._tune_wraps = wrapped
    checkpoint.mask = mask
    transformer._gradient_checkpointing_func = checkpoint


FAMILY = ChromaFamily()
