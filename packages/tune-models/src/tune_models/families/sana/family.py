"""Sana and SANA 1.5 (NVIDIA / MIT HAN Lab): a linear-attention DiT, a Gemma-2-2B text encoder and
the 32x deep-compression autoencoder (DC-AE), read off diffusers' ``SanaPipeline``,
``SanaTransformer2DModel`` and ``AutoencoderDC`` (0.42):

- prompts: lower-cased and stripped, prefixed with Sana's *complex human instruction* (the
  pipeline's default list of lines, joined by newlines), tokenized to ``instruction tokens + 298``
  (right padding, ``<bos>`` first), encoded by Gemma-2 (its last hidden state), then the pipeline
  keeps token 0 and the last 299 (``select_index``, Sana paper section 3.1): the ``<bos>``, the
  instruction's last token, the prompt and padding, 300 tokens in all. The real tokens form a
  prefix of those 300 and the transformer's cross-attention masks the rest, so we cache each prompt
  at its real length with an all-ones ``prompt_attention_mask`` and
  :meth:`SanaFamily.collate_prompts` pads a batch with zeros and mask 0. The instruction can be
  replaced or switched off with ``sana_complex_human_instruction`` (re-cache the text embeds).
- latents: the DC-AE's deterministic latent times ``scaling_factor`` (no shift), 32 channels at
  1/32 of the pixels; the transformer's patch size is 1, so every latent pixel is a token.
- noise scheme: plain flow matching, the scheduler (Flow-DPM-Solver, ``DPMSolverMultistepScheduler``
  with ``prediction_type="flow_prediction"``) takes the model output as the velocity ``noise - x0``
  and the transformer gets ``timestep = 1000 sigma`` (times its ``timestep_scale``, 1 for these
  checkpoints; at inference the scheduler rounds it down to an integer, training uses it
  continuous): no sign flip, no time reversal. Fixed flow shift 3 for every checkpoint, 512 px
  and 1024 px (their scheduler configs and NVlabs' training configs agree).
- flavours: 1024 px (SANA 1.5 1.6B/4.8B, Sana 1.6B, 0.6B) and 512 px (Sana 1.6B, its multilingual
  variant, 0.6B); the sizes are in ``SANA_SAMPLE_SIZES`` and :meth:`SanaFamily.load` warns when the
  loaded transformer was made for another size than its flavour's.
- validation: CFG (guidance 4.5) with a negative prompt (``""`` unless given, encoded without the
  instruction, as the pipeline does), at exactly the requested size
  (``use_resolution_binning=False``: the pipeline would otherwise snap to its aspect-ratio bins).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from tune_models.families import _gemma, _shared
from tune_models.families.sana.flavours import (
    SANA_FLAVOURS,
    SANA_FLAVOUR_ALIASES,
    SANA_SAMPLE_SIZES,
    SANA_SIMPLETUNER_DEFAULT_FLAVOUR,
)
from tune_models.family import Flavour, LoadedModel, ModelFamily, ModelSource, compute_dtype

_SELF = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
_CROSS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
_FFS = ["ff.conv_inverted", "ff.conv_point"]

_log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 300
"""Prompt tokens the pipeline keeps (``SanaPipeline(max_sequence_length=300)``)."""


@functools.cache
def default_complex_human_instruction() -> tuple[str, ...]:
    """The instruction lines ``SanaPipeline.__call__`` uses by default, read from its signature
    (so the cached prompts and the validation images cannot drift apart)."""
    import inspect

    from diffusers import SanaPipeline

    return tuple(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaFamily(ModelFamily):
    """Sana 1.0 and SANA 1.5 text-to-image checkpoints."""

    name = "sana"
    flavours = {name: Flavour(name=name, **facts) for name, facts in SANA_FLAVOURS.items()}
    simpletuner_default_flavour = SANA_SIMPLETUNER_DEFAULT_FLAVOUR
    flavour_aliases = SANA_FLAVOUR_ALIASES
    default_flavour = "sana1.5-1.6b"
    lora_target_presets = {
        "all": _SELF + _CROSS,
        "all+ffs": _SELF + _CROSS + _FFS,
        "self-attention": list(_SELF),
    }
    """``all``: the linear self-attention and the cross-attention projections of every block (the
    convolutional GLUMBConv feed-forward, modulation and embedders stay frozen); ``all+ffs``:
    also GLUMBConv's two 1x1 convolutions (peft's Conv2d LoRA; the depthwise 3x3 ``conv_depth``
    is left out: peft adapts a grouped convolution only when the rank is a multiple of its
    groups, here one per channel); ``self-attention``: the image tokens' own attention only."""
    default_lora_target = "all"
    prediction = "flow"
    vae_scale_factor = 32
    patch_size = 1
    label = "Sana"
    text_encoder_config_key = "pretrained_gemma_model_name_or_path"
    lora_keys_module = "tune_models.families.sana.lora_keys"
    comfyui_key_prefix = "diffusion_model."
    comfyui_key_suffix = ".lora_down.weight"
    tiny_module = "tune_models.families.sana.tiny"
    default_extras = {"complex_human_instruction": None}
    """``None``: the pipeline's default instruction; a list of lines: a custom one; ``[]``: none."""

    def pipeline_class(self) -> type:
        from diffusers import SanaPipeline

        return SanaPipeline

    # ----------------------------------------------------------------- loading
    def load(
        self,
        source: ModelSource,
        flavour: str | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LoadedModel:
        """The base class's load (Sana's own components below), warning when the transformer was
        made for another image size than the flavour's (``sample_size`` x the VAE's scale)."""
        model = super().load(source, flavour, dtype=dtype, device=device)
        expected = SANA_SAMPLE_SIZES.get(model.flavour.name)
        sample_size = model.transformer.config.get("sample_size")
        if expected and sample_size:
            made_for = int(sample_size) * self._vae_scale(model.vae)
            if made_for != expected:
                _log.warning(
                    "model_flavour %r is a %d px Sana, but the loaded transformer was made for %d px "
                    "(sample_size %d): choose the flavour of that checkpoint, and train and validate at its size",
                    model.flavour.name, expected, made_for, int(sample_size),
                )
        return model

    @staticmethod
    def _load_components(source: ModelSource, root: str, *, dtype: torch.dtype, device: str | torch.device) -> dict[str, Any]:
        """Components from a Sana diffusers folder (``AutoencoderDC``, Gemma-2, the checkpoint's own
        Flow-DPM-Solver scheduler) with the usual overrides; a guidance-distilled SANA-Sprint is refused."""
        import diffusers
        import transformers

        kwargs = _shared.load_kwargs(source)
        hub_kwargs = {k: v for k, v in kwargs.items() if k == "revision"}
        transformer = _shared.load_transformer(
            diffusers.SanaTransformer2DModel, source, root, dtype=dtype, label="sana", **kwargs
        )
        vae_location = source.pretrained_vae_model_name_or_path or root
        vae = _shared.load_vae(diffusers.AutoencoderDC, vae_location, is_root=vae_location == root, dtype=dtype, **kwargs)
        if source.pretrained_text_encoder_model_name_or_path:
            text_encoder, tokenizer = _shared.load_text_encoder(
                transformers.Gemma2Model, source.pretrained_text_encoder_model_name_or_path, dtype=dtype
            )
        else:
            text_encoder = transformers.Gemma2Model.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **hub_kwargs)
        scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(root, subfolder="scheduler", **hub_kwargs)
        _shared.freeze(transformer, vae, text_encoder, device=device)
        if transformer.config.get("guidance_embeds"):
            raise NotImplementedError(
                f"{root} is a guidance-distilled Sana (SANA-Sprint: its transformer has guidance_embeds); "
                "model_family 'sana' trains the Sana / SANA 1.5 checkpoints listed as flavours"
            )
        return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def configure_training(self, model: LoadedModel, options: Mapping[str, Any]) -> None:
        """``sana_complex_human_instruction``: a list of lines (or one string) replacing the
        default instruction, or ``false`` / ``""`` / ``[]`` to encode prompts without one;
        ``true`` / ``null`` keep the default. Set it before caching text embeds."""
        if "sana_complex_human_instruction" not in options:
            return
        value = options["sana_complex_human_instruction"]
        if value is None or value is True:
            chosen = None
        elif value is False or value == "" or value == []:
            chosen = []
        elif isinstance(value, str):
            chosen = [value]
        elif isinstance(value, (list, tuple)) and all(isinstance(line, str) for line in value):
            chosen = list(value)
        else:
            raise ValueError(
                "sana_complex_human_instruction must be a list of strings, a string, true or false, "
                f"got {value!r}"
            )
        model.extras["complex_human_instruction"] = chosen

    @staticmethod
    def complex_human_instruction(model: LoadedModel) -> list[str]:
        """The instruction lines in use for ``model`` (``[]`` when switched off)."""
        chosen = model.extras.get("complex_human_instruction")
        return list(default_complex_human_instruction()) if chosen is None else list(chosen)

    # ----------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``SanaPipeline.encode_prompt`` computes it, without the padding:
        ``prompt_embeds`` ``[n, hidden]`` (``n <= 300`` real tokens after ``select_index``) and
        ``prompt_attention_mask`` ``[n]`` (ones)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        tokenizer, encoder = model.tokenizer, model.text_encoder
        param = next(encoder.parameters())
        instruction = self.complex_human_instruction(model)
        prefix, max_length = "", MAX_SEQUENCE_LENGTH
        if instruction:
            prefix = "\n".join(instruction)
            max_length = len(tokenizer.encode(prefix)) + MAX_SEQUENCE_LENGTH - 2
        select = [0, *range(-MAX_SEQUENCE_LENGTH + 1, 0)]
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [prefix + p.lower().strip() for p in prompts[start : start + batch_size]]
            tokens = tokenizer(
                chunk,
                padding="max_length",
                max_length=max_length,
                truncation=True,
                add_special_tokens=True,
                padding_side="right",
                return_tensors="pt",
            ).to(param.device)
            hidden = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0][:, select]
            mask = tokens.attention_mask[:, select]
            for i in range(len(chunk)):
                count = int(mask[i].sum())
                if not bool(mask[i, :count].all()):  # cannot happen with right padding; guards the cache
                    raise RuntimeError("Sana prompt tokens are not a prefix of the selected 300; is the tokenizer padding left?")
                embeds = hidden[i, :count].detach().to(device="cpu", dtype=param.dtype).contiguous()
                results.append({"prompt_embeds": embeds, "prompt_attention_mask": torch.ones(count, dtype=torch.int64)})
        return results

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Pad to the batch's longest prompt with zero embeddings and mask 0 (masked in the
        cross-attention, as the pipeline's padding is)."""
        return _gemma.pad_prompts(items, device, dtype, mask_key="prompt_attention_mask")

    # ----------------------------------------------------------------- images
    @staticmethod
    def _vae_scale(vae: Any) -> int:
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``B x 3 x H x W`` in [-1, 1] -> the DC-AE latent times ``scaling_factor`` (the
        DC-AE is deterministic: no posterior to sample)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape B x 3 x H x W, got {tuple(pixels.shape)}")
        multiple = self._latent_multiple(model)
        if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
            raise ValueError(
                f"image size {pixels.shape[-1]}x{pixels.shape[-2]} must be a multiple of {multiple} for {self.label}"
            )
        vae = model.vae
        param = next(vae.parameters())
        return vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        param = next(vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)

    # ----------------------------------------------------------------- denoiser
    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
    ) -> torch.Tensor:
        """``noise - x0``: Sana's transformer is called at ``timestep = 1000 sigma x timestep_scale``
        and predicts that velocity directly (see the module docstring)."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0])
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        timestep = sigmas * 1000.0 * float(transformer.config.timestep_scale)
        out = transformer(
            noisy_latents.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_attention_mask=prompts["prompt_attention_mask"],
            timestep=timestep.to(dtype),
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * noisy_latents.shape[1]:  # learned-sigma heads: the velocity is the first half
            out = out[:, : noisy_latents.shape[1]]
        return out

    # ----------------------------------------------------------------- validation
    def validation_pipeline(self, model: LoadedModel) -> Any:
        """``SanaPipeline`` over the loaded components, with a fresh copy of the checkpoint's
        scheduler; it remembers the instruction in use so :meth:`generate` passes the same one."""
        pipeline = self.pipeline_class()(
            tokenizer=model.tokenizer,
            text_encoder=model.text_encoder,
            vae=model.vae,
            transformer=model.transformer,
            scheduler=type(model.scheduler).from_config(model.scheduler.config),
        )
        pipeline.set_progress_bar_config(disable=True)
        pipeline.tune_complex_human_instruction = self.complex_human_instruction(model)
        return pipeline

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """Negative prompt (``""`` unless given; used when ``guidance > 1``), the instruction the
        prompts were cached with, 300 tokens, and no resolution binning."""
        instruction = getattr(pipeline, "tune_complex_human_instruction", None)
        if instruction is None:
            instruction = list(default_complex_human_instruction())
        return {
            "negative_prompt": negative_prompt or "",
            "complex_human_instruction": instruction,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "use_resolution_binning": False,
        }


FAMILY = SanaFamily()
