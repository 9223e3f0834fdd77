"""Qwen-Image (Alibaba Qwen): a 20 B MMDiT flow transformer, a Qwen2.5-VL-7B text encoder and a
16-channel causal 3D VAE (Wan-style), read off diffusers' ``QwenImagePipeline`` and
``QwenImageTransformer2DModel`` (0.42):

- prompts: each prompt is wrapped in a chat template (a system message asking to describe the
  image, then the prompt as the user turn, then ``<|im_start|>assistant\\n``); the encoder's last
  hidden state is taken at the non-padding tokens and the first 34 tokens (the template's system
  prefix) are dropped; at most ``max_sequence_length`` (512) remain. We cache each prompt at its
  own length with an all-ones ``prompt_embeds_mask``; :meth:`QwenImageFamily.collate_prompts` pads
  a batch with zeros and mask 0, as the pipeline does, and the mask hides the padding from the
  transformer's joint attention.
- latents: the VAE works on ``B x C x T x H x W`` (one frame for images); the denoiser's space is
  ``(z - latents_mean) / latents_std`` per channel (the VAE config's lists), 16 channels at 1/8 of
  the pixels. Cached unpacked (``B x 16 x h x w``); :meth:`predict` packs 2x2 patches into tokens
  (``B x hw/4 x 64``) and passes ``img_shapes = [(1, h/2, w/2)]`` for the RoPE.
- the transformer takes ``timestep = sigma`` (the pipeline divides the scheduler's ``1000 sigma``
  by 1000) and predicts the velocity ``noise - x0`` (the scheduler's Euler step is
  ``x + (sigma_next - sigma) v``): no sign flip, no time reversal.
- validation uses *true* classifier-free guidance: ``true_cfg_scale`` (our ``guidance``, 4 for the
  base model) with a negative prompt (``" "`` when none is given), norm-rescaled by the pipeline;
  Qwen-Image has no guidance embedding, so the pipeline's ``guidance_scale`` is not passed.
- shift: resolution-dependent (``use_dynamic_shifting``), from the scheduler config.
- ``edit`` / ``edit-plus`` (Qwen-Image-Edit, -2509) train on edit pairs: an image dataset's
  ``conditioning_data`` gives each target its reference. The reference reaches the model twice,
  as the edit pipelines give it: the Qwen2.5-VL encoder reads it inside the prompt (so prompt
  embeddings are cached per caption *and* reference: :meth:`QwenImageFamily.prompts_use_references`,
  the templates in :mod:`.edit`), and its clean latents are packed and appended after the noisy
  image tokens, with one ``img_shapes`` entry per reference; only the target tokens' output is the
  prediction. Validation runs the edit pipeline on a reference from the run's conditioning data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tune_models.families import _shared
from tune_models.families.qwen_image.edit import EDIT_STYLES, EditStyle
from tune_models.families.qwen_image.flavours import (
    QWEN_IMAGE_FLAVOUR_ALIASES,
    QWEN_IMAGE_FLAVOURS,
    QWEN_IMAGE_UNAVAILABLE_FLAVOURS,
    QWEN_IMAGE_SIMPLETUNER_DEFAULT_FLAVOUR,
)
from tune_models.family import Flavour, LoadedModel, ModelFamily, ModelSource, compute_dtype

log = logging.getLogger(__name__)

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_MLP = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""``QwenImagePipeline.prompt_template_encode`` (a test checks they agree)."""
PROMPT_DROP_TOKENS = 34
"""``QwenImagePipeline.prompt_template_encode_start_idx``: template tokens dropped from the front."""
TOKENIZER_MAX_LENGTH = 1024
"""``QwenImagePipeline.tokenizer_max_length``."""


class QwenImageFamily(ModelFamily):
    """Qwen-Image: text to image (``base``) and reference-image editing (``edit``, ``edit-plus``)."""

    name = "qwen_image"
    aliases = ("qwen-image",)
    flavours = {name: Flavour(name=name, **facts) for name, facts in QWEN_IMAGE_FLAVOURS.items()}
    simpletuner_default_flavour = QWEN_IMAGE_SIMPLETUNER_DEFAULT_FLAVOUR
    flavour_aliases = QWEN_IMAGE_FLAVOUR_ALIASES
    unavailable_flavours = QWEN_IMAGE_UNAVAILABLE_FLAVOURS
    default_flavour = "base"
    lora_target_presets = {"all": _ATTENTION + _MLP, "attention": list(_ATTENTION)}
    """``all``: both streams' attention projections and MLP linears in every block (the
    modulation, embedding and output layers stay frozen); ``attention``: the projections only."""
    default_lora_target = "all"
    prediction = "flow"
    vae_scale_factor = 8
    patch_size = 2
    max_sequence_length = 512
    """Prompt tokens kept after the template prefix (the pipeline call's default)."""
    label = "Qwen-Image"
    transformer_class = "QwenImageTransformer2DModel"
    text_encoder_classes = ("Qwen2_5_VLForConditionalGeneration",)
    lora_keys_module = "tune_models.families.qwen_image.lora_keys"
    comfyui_key_prefix = "diffusion_model."
    comfyui_key_suffix = ".lora_down.weight"
    tiny_module = "tune_models.families.qwen_image.tiny"
    guidance_argument = "true_cfg_scale"
    accepts_reference_latents = True
    """Only the edit flavours use them (:meth:`accepts_references`)."""

    def edit_style(self, flavour: str | None) -> EditStyle | None:
        """The edit conventions of ``flavour`` or its alias (``None`` for text-to-image flavours)."""
        return EDIT_STYLES.get(self.flavour(flavour).name)

    def accepts_references(self, flavour: str | None) -> bool:
        """Edit flavours are made for reference images; ``base`` has never seen one."""
        return self.edit_style(flavour) is not None

    def prompts_use_references(self, flavour: str | None) -> bool:
        """Edit flavours encode the instruction together with its reference image(s)."""
        return self.edit_style(flavour) is not None

    def validation_input(self, flavour: str | None) -> str | None:
        """Edit flavours validate by editing a reference image; ``base`` makes images from text."""
        return "reference" if self.edit_style(flavour) is not None else None

    def pipeline_class(self) -> type:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    # ----------------------------------------------------------------- loading
    def load(
        self,
        source: ModelSource,
        flavour: str | None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LoadedModel:
        """The base class's load (Qwen-Image's own components below); an edit flavour also loads
        the checkpoint's ``processor`` (the VL processor its prompts go through) into
        ``extras["processor"]``."""
        model = super().load(source, flavour, dtype=dtype, device=device)
        if model.flavour.name == "edit-2511" and not getattr(model.transformer.config, "zero_cond_t", False):
            log.warning(
                "model_flavour 'edit-2511': the loaded transformer's config does not set zero_cond_t, which "
                "Qwen-Image-Edit-2511's does (reference tokens at timestep 0); is %s a 2509 checkpoint? "
                "Its flavour is edit-plus",
                model.extras.get("root"),
            )
        if self.edit_style(model.flavour.name) is not None:
            from tune_models.families.qwen_image.processor import load_processor

            root = str(model.extras["root"])
            missing = ValueError(
                f"model_flavour {model.flavour.name!r} needs the edit checkpoint's 'processor' folder "
                f"(Qwen2.5-VL tokenizer and image processor), which {root!r} lacks: point "
                "pretrained_model_name_or_path at a Qwen-Image-Edit checkpoint"
            )
            if Path(root).is_dir() and not (Path(root) / "processor").is_dir():
                raise missing
            try:
                model.extras["processor"] = load_processor(root, revision=source.revision)
            except OSError as exc:
                raise missing from exc
        return model

    @staticmethod
    def _load_components(source: ModelSource, root: str, *, dtype: torch.dtype, device: str | torch.device) -> dict[str, Any]:
        """Qwen-Image's own VAE class (``AutoencoderKLQwenImage``) and Qwen2.5-VL text encoder."""
        import diffusers
        import transformers

        kwargs = _shared.load_kwargs(source)
        hub_kwargs = {k: v for k, v in kwargs.items() if k == "revision"}
        transformer = _shared.load_transformer(
            diffusers.QwenImageTransformer2DModel, source, root, dtype=dtype, label="qwen_image", **kwargs
        )
        vae_location = source.pretrained_vae_model_name_or_path or root
        vae = _shared.load_vae(
            diffusers.AutoencoderKLQwenImage, vae_location, is_root=vae_location == root, dtype=dtype, **kwargs
        )
        text_encoder = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root, subfolder="text_encoder", dtype=dtype, **kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **hub_kwargs)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **hub_kwargs)
        _shared.freeze(transformer, vae, text_encoder, device=device)
        return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    # ----------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(
        self,
        model: LoadedModel,
        prompts: list[str],
        *,
        batch_size: int = 8,
        reference_images: list[list[Any]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``QwenImagePipeline.encode_prompt`` computes it, without the batch
        padding: ``prompt_embeds`` ``[n, 3584]`` (``n`` tokens after the dropped template prefix, at
        most :attr:`max_sequence_length`) and ``prompt_embeds_mask`` ``[n]`` (int64 ones).

        Edit flavours need ``reference_images`` (per prompt, its reference PIL images) and encode
        as their edit pipeline does (:meth:`_encode_edit_prompts`)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        style = self.edit_style(model.flavour.name)
        if style is not None:
            if reference_images is None:
                raise ValueError(
                    f"model_flavour {model.flavour.name!r} encodes each prompt with its reference image(s): "
                    "pass reference_images (in a training run: every image dataset needs conditioning_data)"
                )
            return self._encode_edit_prompts(model, style, prompts, reference_images, batch_size=batch_size)
        if reference_images is not None:
            raise ValueError(f"model_flavour {model.flavour.name!r} encodes prompts without reference images")
        encoder = model.text_encoder
        param = next(encoder.parameters())
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [PROMPT_TEMPLATE.format(p) for p in prompts[start : start + batch_size]]
            tokens = model.tokenizer(
                chunk,
                max_length=TOKENIZER_MAX_LENGTH + PROMPT_DROP_TOKENS,
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(param.device)
            hidden = encoder(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
            ).hidden_states[-1]
            for i in range(len(chunk)):
                valid = hidden[i][tokens.attention_mask[i].bool()][PROMPT_DROP_TOKENS:][: self.max_sequence_length]
                embeds = valid.detach().to(device="cpu", dtype=param.dtype).contiguous()
                results.append(
                    {"prompt_embeds": embeds, "prompt_embeds_mask": torch.ones(embeds.shape[0], dtype=torch.int64)}
                )
        return results

    def _encode_edit_prompts(
        self,
        model: LoadedModel,
        style: EditStyle,
        prompts: list[str],
        reference_images: list[list[Any]],
        *,
        batch_size: int,
    ) -> list[dict[str, torch.Tensor]]:
        """``QwenImageEdit(Plus)Pipeline._get_qwen_prompt_embeds`` per prompt: the templated text
        and the references (as :meth:`EditStyle.encoder_image` sizes them) through the processor,
        the encoder's last hidden states at the non-padding tokens, minus the template prefix. Not
        truncated: the edit pipelines keep every token (the image's are among them)."""
        if len(reference_images) != len(prompts):
            raise ValueError(f"{len(reference_images)} reference image lists for {len(prompts)} prompts")
        processor = model.extras.get("processor")
        if processor is None:
            raise ValueError(f"model_flavour {model.flavour.name!r} needs extras['processor'] (loaded with the model)")
        encoder = model.text_encoder
        param = next(encoder.parameters())
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            refs = [[image.convert("RGB") for image in r] for r in reference_images[start : start + batch_size]]
            inputs = processor(
                text=style.texts(chunk, refs),
                images=[style.encoder_image(image) for r in refs for image in r],
                padding=True,
                return_tensors="pt",
            ).to(param.device)
            hidden = encoder(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"].to(param.dtype),
                image_grid_thw=inputs["image_grid_thw"],
                output_hidden_states=True,
            ).hidden_states[-1]
            for i in range(len(chunk)):
                valid = hidden[i][inputs["attention_mask"][i].bool()][style.drop_tokens :]
                embeds = valid.detach().to(device="cpu", dtype=param.dtype).contiguous()
                results.append(
                    {"prompt_embeds": embeds, "prompt_embeds_mask": torch.ones(embeds.shape[0], dtype=torch.int64)}
                )
        return results

    def collate_prompts(
        self, items: list[dict[str, torch.Tensor]], device: str | torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Pad to the batch's longest prompt with zero embeddings and mask 0 (as the pipeline)."""
        if not items:
            raise ValueError("collate_prompts needs at least one prompt")
        length = max(i["prompt_embeds"].shape[0] for i in items)
        embeds, masks = [], []
        for item in items:
            e = item["prompt_embeds"]
            m = item.get("prompt_embeds_mask", torch.ones(e.shape[0], dtype=torch.int64))
            pad = length - e.shape[0]
            embeds.append(torch.cat([e, e.new_zeros(pad, e.shape[1])]))
            masks.append(torch.cat([m.to(torch.int64), torch.zeros(pad, dtype=torch.int64)]))
        return {
            "prompt_embeds": torch.stack(embeds).to(device=device, dtype=dtype),
            "prompt_embeds_mask": torch.stack(masks).to(device=device),
        }

    # ----------------------------------------------------------------- images
    @staticmethod
    def _vae_scale(vae: Any) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    @staticmethod
    def _normalisation(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like)
        std = torch.tensor(vae.config.latents_std).view(shape).to(like)
        return mean, std

    @torch.no_grad()
    def encode_images(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``B x 3 x H x W`` in [-1, 1] -> ``(z - latents_mean) / latents_std``, ``z`` the
        posterior mode of the one-frame video ``B x 3 x 1 x H x W``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape B x 3 x H x W, got {tuple(pixels.shape)}")
        multiple = self._latent_multiple(model)
        if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
            raise ValueError(
                f"image size {pixels.shape[-1]}x{pixels.shape[-2]} must be a multiple of {multiple} for {self.label}"
            )
        vae = model.vae
        param = next(vae.parameters())
        latents = vae.encode(pixels.to(device=param.device, dtype=param.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = self._normalisation(vae, latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        param = next(vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype)
        mean, std = self._normalisation(vae, latents)
        return vae.decode((latents * std + mean)[:, :, None], return_dict=False)[0][:, :, 0].clamp(-1, 1)

    # ----------------------------------------------------------------- denoiser
    pack = staticmethod(_shared.pack_2x2)
    """``B x C x H x W`` -> ``B x (H/2 * W/2) x 4C`` tokens (2x2 patches, see :func:`_shared.pack_2x2`)."""
    unpack = staticmethod(_shared.unpack_2x2)
    """Inverse of :attr:`pack` for a latent of ``height`` x ``width``."""

    def predict(
        self,
        model: LoadedModel,
        noisy_latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: dict[str, Any],
        *,
        reference_latents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``noise - x0`` for ``x_t = (1 - sigma) x0 + sigma noise``: Qwen-Image takes
        ``timestep = sigma`` and predicts that velocity (see the module docstring).

        ``reference_latents`` (edit flavours): clean ``B x 16 x h_i x w_i`` latents from
        :meth:`encode_images`, one tensor per reference; as the edit pipelines do, each is packed
        and appended after the noisy tokens, ``img_shapes`` lists the target then each reference,
        and the output is cut back to the target's tokens."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0], even=True)
        batch, channels, height, width = noisy_latents.shape
        transformer = model.transformer
        dtype = compute_dtype(transformer)
        mask = prompts.get("prompt_embeds_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # as the pipeline: no mask when nothing is padded
        tokens = [self.pack(noisy_latents.to(dtype))]
        shapes = [(1, height // 2, width // 2)]
        for ref in reference_latents or []:
            if ref.ndim != 4 or ref.shape[:2] != (batch, channels) or ref.shape[-2] % 2 or ref.shape[-1] % 2:
                raise ValueError(
                    f"reference latents must be {batch} x {channels} x h x w (h, w even) like the noisy "
                    f"latents, got {tuple(ref.shape)}"
                )
            tokens.append(self.pack(ref.to(device=noisy_latents.device, dtype=dtype)))
            shapes.append((1, ref.shape[-2] // 2, ref.shape[-1] // 2))
        out = transformer(
            hidden_states=torch.cat(tokens, dim=1),
            timestep=sigmas.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * batch,
            return_dict=False,
        )[0]
        return self.unpack(out[:, : tokens[0].shape[1]], height, width)

    def token_routing(self, model: LoadedModel) -> Any:
        """TREAD routing over the blocks; edit references are never routed
        (:mod:`tune_models.families.qwen_image.token_routing`)."""
        from tune_models.families.qwen_image.token_routing import QwenImageTokenRouting

        return QwenImageTokenRouting()

    # ----------------------------------------------------------------- validation
    def validation_pipeline(self, model: LoadedModel) -> Any:
        """``QwenImagePipeline`` for ``base``; an edit flavour's edit pipeline (with the loaded
        processor) for the edit flavours, which :meth:`generate` gives ``image=`` (a reference)."""
        style = self.edit_style(model.flavour.name)
        if style is None:
            return super().validation_pipeline(model)
        import diffusers

        pipeline = getattr(diffusers, style.pipeline)(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            processor=model.extras["processor"],
            transformer=model.transformer,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """True CFG (``guidance`` goes in as ``true_cfg_scale``, see :attr:`guidance_argument`):
        above 1 a negative prompt is used (``" "`` when none is given). ``guidance_scale`` (for
        guidance-distilled checkpoints only) is not passed."""
        extra: dict[str, Any] = {"max_sequence_length": self.max_sequence_length}
        if guidance > 1:
            extra["negative_prompt"] = negative_prompt if negative_prompt else " "
        return extra


FAMILY = QwenImageFamily()
