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
- ``edit`` (Qwen-Image-Edit) needs edit pairs (reference image latents and the VL encoder seeing
  the image); it is registered but refuses to load until that is implemented.
"""

from __future__ import annotations

from typing import Any

import torch

from tune_models.families import _shared
from tune_models.families.qwen_image.flavours import QWEN_IMAGE_FLAVOURS
from tune_models.family import Flavour, LoadedModel, ModelFamily, ModelSource

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
    """Qwen-Image (text-to-image); ``edit`` is listed but not implemented."""

    name = "qwen_image"
    aliases = ("qwen-image",)
    flavours = {name: Flavour(name=name, **facts) for name, facts in QWEN_IMAGE_FLAVOURS.items()}
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
        """The base class's load (Qwen-Image's own components below), refusing the ``edit`` flavour."""
        if self.flavour(flavour).name == "edit":
            raise NotImplementedError(
                "model_flavour 'edit' (Qwen-Image-Edit, trained on edit pairs: a reference image plus an "
                "instruction) is not implemented yet: training it as text-to-image would ignore the "
                "reference images it is made for. Use model_flavour 'base'."
            )
        return super().load(source, flavour, dtype=dtype, device=device)

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
        self, model: LoadedModel, prompts: list[str], *, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Per prompt, as ``QwenImagePipeline.encode_prompt`` computes it, without the batch
        padding: ``prompt_embeds`` ``[n, 3584]`` (``n`` tokens after the dropped template prefix, at
        most :attr:`max_sequence_length`) and ``prompt_embeds_mask`` ``[n]`` (int64 ones)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
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
    ) -> torch.Tensor:
        """``noise - x0`` for ``x_t = (1 - sigma) x0 + sigma noise``: Qwen-Image takes
        ``timestep = sigma`` and predicts that velocity (see the module docstring)."""
        embeds = prompts["prompt_embeds"]
        sigmas = self._predict_inputs(noisy_latents, sigmas, embeds.shape[0], even=True)
        batch, _, height, width = noisy_latents.shape
        transformer = model.transformer
        dtype = next(transformer.parameters()).dtype
        mask = prompts.get("prompt_embeds_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # as the pipeline: no mask when nothing is padded
        out = transformer(
            hidden_states=self.pack(noisy_latents.to(dtype)),
            timestep=sigmas.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return self.unpack(out, height, width)

    # ----------------------------------------------------------------- validation
    def _pipeline_call_kwargs(self, pipeline: Any, *, guidance: float, negative_prompt: str | None) -> dict[str, Any]:
        """True CFG (``guidance`` goes in as ``true_cfg_scale``, see :attr:`guidance_argument`):
        above 1 a negative prompt is used (``" "`` when none is given). ``guidance_scale`` (for
        guidance-distilled checkpoints only) is not passed."""
        extra: dict[str, Any] = {"max_sequence_length": self.max_sequence_length}
        if guidance > 1:
            extra["negative_prompt"] = negative_prompt if negative_prompt else " "
        return extra


FAMILY = QwenImageFamily()
