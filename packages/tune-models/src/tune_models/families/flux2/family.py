"""FLUX.2 (Black Forest Labs): a 32 B MMDiT flow transformer, a Mistral-3 (Mistral Small 3.1, 24 B)
text encoder and a 32-channel VAE, read off diffusers' ``Flux2Pipeline``,
``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2`` (0.42); and FLUX.2 [klein] (flavours
``klein-4b`` / ``klein-9b``, ``Flux2KleinPipeline``), which differs only where the last list item says:

- prompts: each prompt becomes a chat (BFL's system message, then the prompt as the user turn,
  ``format_input`` in the pipeline module), tokenised by the tokenizer's chat template, padded
  and truncated to ``max_sequence_length`` (512). The encoder runs with the attention mask; the
  hidden states of layers 10, 20 and 30 (``text_encoder_out_layers``) are stacked per token into
  one ``[seq, 3 x 5120] = [512, 15360]`` sequence. The pipeline hands the transformer the whole
  padded sequence and no mask, so we cache it that way (and the mask beside it, unused by the
  denoiser call, so a later masked-training option needs no re-cache). ``txt_ids`` are
  ``(0, 0, 0, l)``.
- latents: the VAE's 32-channel posterior mode at 1/8 of the pixels is *patchified* 2x2 into 128
  channels at 1/16 and normalised by the VAE's batch-norm running statistics
  (``(z - running_mean) / sqrt(running_var + batch_norm_eps)``, per patchified channel), as
  ``Flux2Pipeline._encode_vae_image`` does. We cache that ``B x 128 x H/16 x W/16`` tensor: the
  flow noise lives in that space. :meth:`Flux2Family.predict` only flattens it into tokens
  (``B x hw x 128``, the transformer's ``patch_size`` is 1) with ``img_ids`` ``(0, row, col, 0)``.
- the transformer takes ``timestep = sigma`` (the pipeline divides the scheduler's ``1000 sigma``
  by 1000; the model multiplies by 1000) and predicts the velocity ``noise - x0`` (the scheduler's
  Euler step is ``x + (sigma_next - sigma) v``): no sign flip.
- dev is guidance-distilled: the pipeline's ``guidance_scale`` (4 by default) is an *input*
  embedding, not classifier-free guidance. Training feeds a constant guidance (1.0 by default) or
  a uniform draw per sample (``flux2_guidance_mode: random-range`` with
  ``flux2_guidance_min``/``_max``), as for FLUX.1.
- shift: resolution-dependent, from the scheduler config like every family (the pipeline's own
  sampler uses BFL's step-count-dependent ``compute_empirical_mu`` at inference).
- reference/edit conditioning: ``predict(..., reference_latents=)`` appends clean reference
  latents as extra tokens at ``t = 10, 20, ...``, as the pipeline does with its ``image``
  argument (checked against it in the tests). The trainer feeds it the cached latents of the
  image dataset's conditioning datasets (``conditioning_data``, paired ``reference_strict`` or
  ``reference_loose``); without them training is text-to-image. Validation follows the run: with
  conditioning data it edits a reference (``Flux2Pipeline(image=...)``, see
  :meth:`Flux2Family.validation_input`), without it makes images from text.
- **klein** (the undistilled "Base" 4B / 9B; the per-flavour facts are plain data in
  :data:`~tune_models.families.flux2.flavours.FLUX2_FLAVOUR_LINES`): the same transformer class
  (fewer blocks), VAE, latents, ids, velocity convention, reference conditioning and LoRA key
  names (ComfyUI's reader counts the blocks from the keys). What differs: the text encoder is a
  Qwen3 causal LM; each prompt is the user turn of its chat template with the generation prompt
  and thinking disabled (no system message), padded to 512, and the hidden states of layers 9, 18
  and 27 are stacked per token (``Flux2KleinPipeline._get_qwen3_prompt_embeds``). The transformer
  has no guidance embedding (``guidance_embeds`` false), so ``predict`` passes ``guidance=None``
  and the ``flux2_guidance_*`` options do nothing (a warning says so). Validation runs
  ``Flux2KleinPipeline`` with real classifier-free guidance against the empty prompt (or the
  run's ``validation_negative_prompt``, passed as embeddings: the pipeline takes no negative
  prompt text). Which line a flavour is decides the pipeline and text-encoder classes; a checkpoint
  of the other line is refused before any weights load.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from tune_models.families import _shared
from tune_models.families.flux2.flavours import (
    FLUX2_FLAVOUR_LINES,
    FLUX2_FLAVOURS,
    FLUX2_SIMPLETUNER_DEFAULT_FLAVOUR,
)
from tune_models.family import Flavour, LoadedModel, ModelFamily, ModelSource, compute_dtype

_DOUBLE_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_SINGLE = ["to_qkv_mlp_proj"]
_FFS = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
_SINGLE_OUT = [r"re:(.*\.)?single_transformer_blocks\.\d+\.attn\.to_out"]
"""The single blocks' fused attention/MLP output projection (BFL's ``linear2``): a regex, since
its suffix ``attn.to_out`` is also the double blocks' ``to_out`` ModuleList, which peft cannot adapt."""

_log = logging.getLogger(__name__)

GUIDANCE_MODES = _shared.GUIDANCE_MODES
TEXT_ENCODER_OUT_LAYERS = FLUX2_FLAVOUR_LINES["dev"]["text_encoder_out_layers"]
"""dev's hidden-state indices stacked into the prompt embedding (``Flux2Pipeline.encode_prompt``'s
default ``text_encoder_out_layers``; index 0 is the token embeddings); klein's are 9, 18, 27."""
TINY_KLEIN_CACHE_NAME = "flux2-klein-v1"
"""Folder of the ``tiny-klein`` flavour's model under ``$TUNE_TINY_CACHE`` (built on first use)."""
MIN_REFERENCE_SIDE = 64
"""``Flux2ImageProcessor.check_image_input``'s smallest reference side, in pixels."""


class Flux2Family(ModelFamily):
    """FLUX.2-dev and FLUX.2 [klein] Base: text to image, and editing when trained with reference images."""

    name = "flux2"
    flavours = {name: Flavour(name=name, **facts) for name, facts in FLUX2_FLAVOURS.items()}
    simpletuner_default_flavour = FLUX2_SIMPLETUNER_DEFAULT_FLAVOUR
    default_flavour = "dev"
    # diffusers names the single blocks' output projection ``attn.to_out``, the same suffix as the
    # double blocks' ``to_out`` ModuleList, which peft cannot adapt; so only a regex target
    # (``_SINGLE_OUT``, in ``full``) names it.
    lora_target_presets = {
        "all": _DOUBLE_ATTENTION + _SINGLE,
        "all+ffs": _DOUBLE_ATTENTION + _SINGLE + _FFS,
        "attention": list(_DOUBLE_ATTENTION),
        "full": _DOUBLE_ATTENTION + _SINGLE + _FFS + _SINGLE_OUT,
    }
    """``all`` (default): every attention projection of the double-stream blocks and the fused
    q/k/v/MLP input projection of the single-stream blocks; ``all+ffs``: also the double blocks'
    feed-forward layers (both streams); ``attention``: the double blocks' attention only;
    ``full``: every linear layer of every block (``all+ffs`` plus the single blocks' output
    projection)."""
    default_lora_target = "all"
    prediction = "flow"
    accepts_reference_latents = True
    vae_scale_factor = 8
    patch_size = 2
    """The VAE's 2x2 patchify: one transformer token per 16 x 16 pixels."""
    label = "Flux.2"
    transformer_class = "Flux2Transformer2DModel"
    text_encoder_classes = ("Mistral3ForConditionalGeneration",)
    """dev's; klein's is ``Qwen3ForCausalLM``. This family loads its components and builds its
    pipeline itself, by the flavour's line (:meth:`line`), so the generic readers of this
    attribute are not used."""
    default_extras = {"guidance": {"mode": "constant", "value": 1.0, "min": 1.0, "max": 4.0}}
    lora_keys_module = "tune_models.families.flux2.lora_keys"
    comfyui_key_prefix = "diffusion_model."
    comfyui_key_suffix = ".lora_down.weight"
    """Our ComfyUI files (``lora_down``/``lora_up``) are read here; diffusers would send them to its
    kohya converter, which expects ``lora_unet_`` names."""
    tiny_module = "tune_models.families.flux2.tiny"

    def validation_input(self, flavour: str | None) -> str | None:
        """One checkpoint does both: a run with conditioning data validates by editing one of its
        references, a run without makes images from text."""
        return "optional-reference"

    def line(self, flavour: str | Flavour | None) -> dict[str, Any]:
        """The model line of ``flavour`` (a name, alias or :class:`Flavour`; the default flavour's
        for ``None``): pipeline and text-encoder classes, prompt-embedding layers, prompt length
        and guidance kind (see :data:`~tune_models.families.flux2.flavours.FLUX2_MODEL_LINES`)."""
        name = flavour.name if isinstance(flavour, Flavour) else flavour
        if name not in FLUX2_FLAVOUR_LINES:
            name = self.flavour(name).name
        return FLUX2_FLAVOUR_LINES[name]

    def is_klein(self, flavour: str | Flavour | None) -> bool:
        """Whether ``flavour`` is a FLUX.2 [klein] one (Qwen3 text encoder, CFG, no guidance input)."""
        return self.line(flavour)["pipeline"] == "Flux2KleinPipeline"

    def pipeline_class(self, flavour: str | Flavour | None = None) -> type:
        """``Flux2Pipeline``, or ``Flux2KleinPipeline`` for a klein flavour. Without a flavour
        (saving and reading LoRA files) either serves: both read and write LoRAs through the same
        ``Flux2LoraLoaderMixin``."""
        import diffusers

        return getattr(diffusers, self.line(flavour)["pipeline"])

    # ----------------------------------------------------------------- loading
    def load(
        self,
        source: ModelSource,
        flavour: str | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LoadedModel:
        """The base class's load, with FLUX.2's own components (:meth:`_load_components`), after
        two steps of its own: the ``tiny-klein`` flavour's sentinel checkpoint is built on first
        use (the generic path builds only ``tiny``), and the checkpoint's text encoder must be the
        flavour's line's (read from ``text_encoder/config.json`` alone, before any weights load),
        so a dev checkpoint under a klein flavour, or the reverse, fails at once and says which
        flavours fit it."""
        import attrs

        chosen = self.flavour(flavour)
        tiny_klein = self.flavours["tiny-klein"].pretrained
        if (source.pretrained_model_name_or_path or chosen.pretrained) == tiny_klein:
            from tune_models.families.flux2.tiny import build_tiny_klein_pipeline

            built = _shared.tiny_checkpoint(TINY_KLEIN_CACHE_NAME, lambda path: build_tiny_klein_pipeline(path))
            source = attrs.evolve(source, pretrained_model_name_or_path=built)
        _, root = _shared.resolve_source(self, source, chosen)
        found = self._checkpoint_text_encoder(root, revision=source.revision)
        expected = self.line(chosen)["text_encoder"]
        if found is not None and found != expected:
            fitting = sorted(
                name for name in self.flavours
                if self.line(name)["text_encoder"] == found and not name.startswith("tiny")
            )
            raise ValueError(
                f"model_flavour {chosen.name!r} is a {self.line(chosen)['pipeline']} model with a {expected} text "
                f"encoder, but the checkpoint {root!r} has a {found} one; choose model_flavour "
                f"{' or '.join(repr(n) for n in fitting) or 'of its kind'} for it, or another checkpoint"
            )
        return super().load(source, chosen.name, dtype=dtype, device=device)

    @staticmethod
    def _checkpoint_text_encoder(root: str, **hub_kwargs: Any) -> str | None:
        """The transformers class the checkpoint's ``text_encoder/config.json`` names
        (``architectures[0]``), or None where that file cannot be read (the loading that follows
        then reports the problem)."""
        import json

        from transformers.utils import cached_file

        try:
            path = cached_file(
                root, "config.json", subfolder="text_encoder", _raise_exceptions_for_missing_entries=False,
                **{k: v for k, v in hub_kwargs.items() if v},
            )
        except (OSError, ValueError):
            return None
        if not path:
            return None
        architectures = json.loads(open(path, encoding="utf-8").read()).get("architectures") or [None]
        return architectures[0]

    @staticmethod
    def _load_components(source: ModelSource, root: str, *, dtype: torch.dtype, device: str | torch.device) -> dict[str, Any]:
        """FLUX.2's VAE class (``AutoencoderKLFlux2``) and the text encoder class the checkpoint
        names (Mistral-3 for dev, Qwen3 for klein; :meth:`load` has checked it is the flavour's).
        The tokenizer is read with ``AutoTokenizer`` (its chat template is all prompt encoding
        needs), not dev's ``PixtralProcessor``, which would require torchvision for its image half.
        ``extras["is_distilled"]``: the checkpoint's ``model_index.json`` flag that tells
        ``Flux2KleinPipeline`` to skip CFG (true only for the step-distilled klein checkpoints)."""
        import diffusers
        import transformers

        kwargs = _shared.load_kwargs(source)
        hub_kwargs = {k: v for k, v in kwargs.items() if k == "revision"}
        transformer = _shared.load_transformer(
            diffusers.Flux2Transformer2DModel, source, root, dtype=dtype, label="flux2", **kwargs
        )
        vae_location = source.pretrained_vae_model_name_or_path or root
        vae = _shared.load_vae(diffusers.AutoencoderKLFlux2, vae_location, is_root=vae_location == root, dtype=dtype, **kwargs)
        known = {line["text_encoder"] for line in FLUX2_FLAVOUR_LINES.values()}
        found = Flux2Family._checkpoint_text_encoder(root, **hub_kwargs) or "Mistral3ForConditionalGeneration"
        if found not in known:
            raise ValueError(
                f"the FLUX.2 checkpoint {root!r} has a {found} text encoder; FLUX.2 uses one of {sorted(known)}"
            )
        text_encoder = getattr(transformers, found).from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **hub_kwargs)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = Flux2Family._processor_chat_template(root, **hub_kwargs)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **hub_kwargs)
        _shared.freeze(transformer, vae, text_encoder, device=device)
        extras = {"is_distilled": bool(Flux2Family._model_index(root, **hub_kwargs).get("is_distilled", False))}
        return dict(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            extras=extras,
        )

    @staticmethod
    def _model_index(root: str, **hub_kwargs: Any) -> dict[str, Any]:
        """The checkpoint's ``model_index.json`` (``{}`` where there is none)."""
        import json

        from transformers.utils import cached_file

        try:
            path = cached_file(root, "model_index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        except (OSError, ValueError):
            return {}
        return json.loads(open(path, encoding="utf-8").read()) if path else {}

    @staticmethod
    def _processor_chat_template(root: str, **hub_kwargs: Any) -> str:
        """The chat template a processor folder keeps beside the tokenizer (``chat_template.jinja``,
        or ``chat_template.json`` from older transformers), for a tokenizer that came without one."""
        import json

        from transformers.utils import cached_file

        for name in ("chat_template.jinja", "chat_template.json"):
            path = cached_file(
                root, name, subfolder="tokenizer", _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
            if path:
                text = open(path, encoding="utf-8").read()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        raise ValueError(
            f"the FLUX.2 tokenizer in {root!r} (subfolder 'tokenizer') has no chat template; prompts are "
            "encoded through it as Flux2Pipeline does. Use a checkpoint whose tokenizer or processor has one."
        )

    def configure_training(self, model: LoadedModel, options: Mapping[str, Any]) -> None:
        """FLUX.2's training options: ``flux2_guidance_mode`` (``constant``, default, or
        ``random-range``), ``flux2_guidance_value`` (1.0: ai-toolkit and SimpleTuner train
        guidance-distilled Flux at 1), ``flux2_guidance_min`` (1.0), ``flux2_guidance_max`` (4.0).

        They set dev's guidance *input*. A transformer without one (klein: ``guidance_embeds``
        false) ignores them, so setting any logs a warning saying they have no effect (their
        values are still checked)."""
        model.extras["guidance"] = _shared.guidance_settings(model.extras["guidance"], options, "flux2")
        given = sorted(k for k in options if str(k).lstrip("-").startswith("flux2_guidance_"))
        if given and not self.has_guidance_input(model):
            _log.warning(
                "%s has no effect: model_flavour %r has no guidance input (its transformer's guidance_embeds "
                "is false; FLUX.2 [klein] Base uses classifier-free guidance at inference instead)",
                ", ".join(given), model.flavour.name,
            )

    @staticmethod
    def has_guidance_input(model: LoadedModel) -> bool:
        """Whether the transformer takes a guidance input (dev's guidance embedding; klein has none)."""
        return bool(getattr(model.transformer.config, "guidance_embeds", False))

    # ----------------------------------------------------------------- prompts
    def _max_sequence_length(self, flavour: Flavour) -> int:
        return int(self.line(flavour)["max_sequence_length"])

    def _tokenize(self, model: LoadedModel, prompts: list[str], length: int) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (``B x length``) as the flavour's pipeline makes them:
        dev: BFL's system message and the prompt as a chat (``format_input``), through the chat
        template; klein: the prompt as the user turn, the chat template applied as text with the
        generation prompt and thinking off, then tokenised (``_get_qwen3_prompt_embeds``)."""
        if self.is_klein(model.flavour):
            texts = [
                model.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                    enable_thinking=False,
                )
                for prompt in prompts
            ]
            tokens = model.tokenizer(
                texts, return_tensors="pt", padding="max_length", truncation=True, max_length=length
            )
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return model.tokenizer.apply_chat_template(
            format_input(prompts=prompts, system_message=SYSTEM_MESSAGE),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=length,
        )

    @torch.no_grad()
    def encode_prompts(
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 4
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as the flavour's pipeline's ``encode_prompt`` computes it: ``prompt_embeds``
        ``[max_sequence_length, 3 x hidden]`` (the hidden states of the line's three
        ``text_encoder_out_layers`` stacked per token, padding included: 10/20/30 for dev, 9/18/27
        for klein) and the tokenizer's ``attention_mask`` ``[max_sequence_length]`` (int64)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        encoder = model.text_encoder
        param = next(encoder.parameters())
        length = self._max_sequence_length(model.flavour)
        layers = tuple(self.line(model.flavour)["text_encoder_out_layers"])
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            tokens = self._tokenize(model, chunk, length)
            mask = tokens["attention_mask"]
            hidden = encoder(
                input_ids=tokens["input_ids"].to(param.device),
                attention_mask=mask.to(param.device),
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states
            if len(hidden) <= max(layers):
                raise ValueError(
                    f"the {self.label} text encoder has {len(hidden) - 1} layers; model_flavour "
                    f"{model.flavour.name!r} stacks the hidden states of layers {layers} into prompt embeddings"
                )
            stacked = torch.stack([hidden[k] for k in layers], dim=2)  # B x L x 3 x D
            embeds = stacked.flatten(2)  # per token: the first layer's, then the second's, ... (the pipeline's order)
            for i in range(len(chunk)):
                results.append(
                    {
                        "prompt_embeds": embeds[i].detach().to(device="cpu", dtype=param.dtype).contiguous(),
                        "attention_mask": mask[i].to(torch.int64).contiguous(),
                    }
                )
        return results

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        batch = _shared.stack_prompts(items, device, dtype, label=self.label, keys=("prompt_embeds",))
        if all("attention_mask" in i for i in items):
            batch["attention_mask"] = torch.stack([i["attention_mask"] for i in items]).to(device=device)
        return batch

    # ----------------------------------------------------------------- images
    @staticmethod
    def patchify(latents: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` -> ``B x 4C x H/2 x W/2`` (``Flux2Pipeline._patchify_latents``)."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * 4, h // 2, w // 2)

    @staticmethod
    def unpatchify(latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify` (``Flux2Pipeline._unpatchify_latents``)."""
        b, c, h, w = latents.shape
        x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, h * 2, w * 2)

    @staticmethod
    def _normalisation(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm statistics of the patchified latents, as mean and std."""
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like)
        return mean, std

    @torch.no_grad()
    def encode_images(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``B x 3 x H x W`` in [-1, 1] -> ``B x 128 x H/16 x W/16``: the posterior mode,
        patchified 2x2 and batch-norm normalised (``Flux2Pipeline._encode_vae_image``)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape B x 3 x H x W, got {tuple(pixels.shape)}")
        multiple = self._latent_multiple(model)
        if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
            raise ValueError(
                f"image size {pixels.shape[-1]}x{pixels.shape[-2]} must be a multiple of {multiple} for {self.label}"
            )
        vae = model.vae
        param = next(vae.parameters())
        latents = self.patchify(vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode())
        mean, std = self._normalisation(vae, latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_images` (the pipeline's decode): pixels in [-1, 1]."""
        vae = model.vae
        param = next(vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype)
        mean, std = self._normalisation(vae, latents)
        return vae.decode(self.unpatchify(latents * std + mean), return_dict=False)[0].clamp(-1, 1)

    # ----------------------------------------------------------------- denoiser
    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` -> ``B x HW x C`` tokens (``Flux2Pipeline._pack_latents``)."""
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`pack` (row-major tokens, as the pipeline's ``img_ids`` scatter them)."""
        b, _, c = tokens.shape
        return tokens.permute(0, 2, 1).reshape(b, c, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
        """``[HW, 4]`` position ids ``(t=0, row, col, l=0)`` (``Flux2Pipeline._prepare_latent_ids``)."""
        return torch.cartesian_prod(
            torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1)
        ).to(device)

    @staticmethod
    def text_ids(length: int, device: torch.device) -> torch.Tensor:
        """``[L, 4]`` position ids ``(0, 0, 0, l)`` (``Flux2Pipeline._prepare_text_ids``)."""
        return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)

    def training_guidance(self, model: LoadedModel, batch: int, device: torch.device) -> torch.Tensor:
        """The guidance input for a training batch (see :meth:`configure_training`); a random
        range draws from torch's global generator, which the trainer seeds per step."""
        return _shared.guidance_values(model.extras.get("guidance", self.default_extras["guidance"]), batch, device)

    @staticmethod
    def reference_ids(shapes: list[tuple[int, int]], device: torch.device, scale: int = 10) -> torch.Tensor:
        """Position ids of reference-image tokens: ``(t, row, col, 0)`` with ``t = 10, 20, ...`` per
        reference (``Flux2Pipeline._prepare_image_ids``), so references sit apart from the target
        (``t = 0``) and from each other in RoPE space."""
        ids = [
            torch.cartesian_prod(torch.tensor([scale + scale * i]), torch.arange(h), torch.arange(w), torch.arange(1))
            for i, (h, w) in enumerate(shapes)
        ]
        return torch.cat(ids).to(device)

    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
        *,
        reference_latents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``noise - x0`` for ``x_t = (1 - sigma) x0 + sigma noise``: FLUX.2 takes
        ``timestep = sigma`` and predicts that velocity (see the module docstring).

        ``reference_latents`` (edit/reference conditioning, from conditioning datasets): clean
        latents from :meth:`encode_images`, each ``B x 128 x h_i x w_i`` (one reference per
        sample and entry), appended after the noisy tokens as ``Flux2Pipeline`` does with its
        ``image`` argument; their outputs are dropped."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0])
        batch, _, height, width = noisy_latents.shape
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        device = noisy_latents.device
        guidance = None
        if getattr(transformer.config, "guidance_embeds", False):
            guidance = self.training_guidance(model, batch, device)
        tokens = self.pack(noisy_latents.to(dtype))
        ids = self.image_ids(height, width, device)
        if reference_latents:
            for ref in reference_latents:
                if ref.ndim != 4 or ref.shape[:2] != noisy_latents.shape[:2]:
                    raise ValueError(
                        f"reference latents must be {batch} x {noisy_latents.shape[1]} x h x w like the noisy "
                        f"latents, got {tuple(ref.shape)}"
                    )
            refs = torch.cat([self.pack(ref.to(device=device, dtype=dtype)) for ref in reference_latents], dim=1)
            tokens = torch.cat([tokens, refs], dim=1)
            ids = torch.cat([ids, self.reference_ids([tuple(r.shape[-2:]) for r in reference_latents], device)])
        out = transformer(
            hidden_states=tokens,
            timestep=sigmas.to(dtype),
            guidance=guidance,
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=self.text_ids(embeds.shape[1], device),
            img_ids=ids,
            return_dict=False,
        )[0]
        return self.unpack(out[:, : height * width], height, width)

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the double then single blocks; reference tokens are never routed
        (:mod:`tune_models.families.flux2.token_routing`)."""
        from tune_models.families.flux2.token_routing import Flux2TokenRouting

        return Flux2TokenRouting()

    # ----------------------------------------------------------------- validation
    def validation_pipeline(self, model: LoadedModel) -> Any:
        """The flavour's pipeline (``Flux2Pipeline`` or ``Flux2KleinPipeline``, the latter with the
        checkpoint's ``is_distilled``) over ``model``'s components, with its own scheduler
        instance, no progress bar, and the flavour's prompt length and layers for its calls."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        components = dict(
            transformer=model.transformer, vae=model.vae, text_encoder=model.text_encoder,
            tokenizer=model.tokenizer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
        )
        if self.is_klein(model.flavour):
            components["is_distilled"] = bool(model.extras.get("is_distilled", False))
        pipeline = self.pipeline_class(model.flavour)(**components)
        pipeline.set_progress_bar_config(disable=True)
        pipeline._tune_max_sequence_length = self._max_sequence_length(model.flavour)
        pipeline._tune_text_encoder_out_layers = tuple(self.line(model.flavour)["text_encoder_out_layers"])
        return pipeline

    def generate(self, pipeline: Any, prompt: str, *, image: Any = None, **kwargs: Any) -> Any:
        """As the base, the reference ``image`` going to ``Flux2Pipeline(image=...)`` at the size
        training gave it, except that the pipeline refuses a side under 64 px (only small test
        runs have one): such an image is enlarged to 64 on its short side first."""
        if image is not None and min(image.size) < MIN_REFERENCE_SIDE:
            scale = MIN_REFERENCE_SIDE / min(image.size)
            image = image.resize((max(MIN_REFERENCE_SIDE, round(image.width * scale)),
                                  max(MIN_REFERENCE_SIDE, round(image.height * scale))))
        return super().generate(pipeline, prompt, image=image, **kwargs)

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """The flavour's prompt length and layers. dev: ``guidance`` is the distilled guidance
        *input* (no CFG, so ``negative_prompt`` is unused). klein: ``guidance`` is the CFG scale
        (on above 1 unless the checkpoint is step-distilled); the pipeline's negative prompt is
        always the empty one unless given as embeddings, so a ``negative_prompt`` is encoded here
        and passed as ``negative_prompt_embeds``."""
        from diffusers import Flux2KleinPipeline

        kwargs: dict[str, Any] = {
            "max_sequence_length": getattr(pipeline, "_tune_max_sequence_length", 512),
            "text_encoder_out_layers": getattr(pipeline, "_tune_text_encoder_out_layers", TEXT_ENCODER_OUT_LAYERS),
        }
        if (
            isinstance(pipeline, Flux2KleinPipeline) and negative_prompt
            and guidance > 1 and not pipeline.config.is_distilled
        ):
            kwargs["negative_prompt_embeds"], _ = pipeline.encode_prompt(
                prompt=negative_prompt, device=pipeline._execution_device, **kwargs
            )
        return kwargs


FAMILY = Flux2Family()
