"""How Qwen-Image-Edit flavours phrase a prompt around its reference images.

Both edit pipelines of diffusers 0.42 encode the instruction *with* the reference image: the
Qwen2.5-VL text encoder reads the image's patches inline in the chat template, and the hidden
states after a fixed template prefix are the prompt embeddings. They differ in the template, how
many references a prompt may have and at what size the encoder sees them:

- ``edit`` (``QwenImageEditPipeline``, Qwen/Qwen-Image-Edit): one reference; its vision tokens sit
  in the template's user turn; the encoder sees the image as the VAE does (the pipeline resizes it
  to about 1024 x 1024 pixels, training passes the reference as its dataset plans it).
- ``edit-plus`` (``QwenImageEditPlusPipeline``, Qwen/Qwen-Image-Edit-2509): one or more references,
  each introduced as ``Picture N:`` before the instruction; the encoder sees each one resized to
  about 384 x 384 pixels (``CONDITION_IMAGE_SIZE``), the VAE at its own size.
- ``edit-2511`` (Qwen/Qwen-Image-Edit-2511): ``edit-plus``'s pipeline and prompts; what differs is
  in its transformer's config (``zero_cond_t``: the reference tokens are modulated with timestep 0),
  which diffusers' ``QwenImageTransformer2DModel`` applies by itself, in training as in validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n"
)


@attrs.frozen
class EditStyle:
    """One edit pipeline's prompt conventions (a test checks each against its pipeline)."""

    pipeline: str
    """diffusers pipeline class used for validation and checked against."""
    template: str
    """``prompt_template_encode``: ``{}`` is the instruction (with ``Picture N:`` prefixes)."""
    drop_tokens: int
    """``prompt_template_encode_start_idx``: encoder states dropped from the front."""
    picture_prefix: str | None = None
    """Per-reference prefix (``{}`` = 1, 2, ...) before the instruction; ``None``: the template
    holds the one image itself."""
    max_references: int | None = None
    """References one prompt may have (``None``: any number)."""
    condition_area: int | None = None
    """Pixel area each reference is resized to for the text encoder (``None``: as given)."""

    def texts(self, prompts: Sequence[str], references: Sequence[Sequence[Any]]) -> list[str]:
        """The templated prompt texts (one per prompt), checking each has a usable number of references."""
        texts = []
        for prompt, refs in zip(prompts, references, strict=True):
            if not refs:
                raise ValueError(
                    f"{self.pipeline} prompts are encoded with their reference image; prompt {prompt!r} has none"
                )
            if self.max_references is not None and len(refs) > self.max_references:
                raise ValueError(
                    f"{self.pipeline} takes {self.max_references} reference image(s) per prompt, got {len(refs)}: "
                    "give the image dataset one conditioning dataset, or use model_flavour 'edit-plus' (several "
                    "references per edit)"
                )
            prefix = "".join(self.picture_prefix.format(i + 1) for i in range(len(refs))) if self.picture_prefix else ""
            texts.append(self.template.format(prefix + prompt))
        return texts

    def encoder_image(self, image: Any) -> Any:
        """A reference as the text encoder sees it (resized to :attr:`condition_area` as the
        pipeline does, sides rounded to 32, Lanczos)."""
        if self.condition_area is None:
            return image
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        width, height = calculate_dimensions(self.condition_area, image.size[0] / image.size[1])
        return VaeImageProcessor().resize(image, height, width)


EDIT_STYLES: dict[str, EditStyle] = {
    "edit": EditStyle(
        pipeline="QwenImageEditPipeline",
        template=_SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n",
        drop_tokens=64,
        max_references=1,
    ),
    "edit-plus": EditStyle(
        pipeline="QwenImageEditPlusPipeline",
        template=_SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        drop_tokens=64,
        picture_prefix="Picture {}: <|vision_start|><|image_pad|><|vision_end|>",
        condition_area=384 * 384,
    ),
}
EDIT_STYLES["edit-2511"] = EDIT_STYLES["edit-plus"]  # the same pipeline and prompt; zero_cond_t is the transformer's
"""Edit flavour name -> its conventions; flavours not listed are text-to-image."""
