"""The Qwen2.5-VL processor Qwen-Image-Edit prompts go through, without its video half.

``QwenImageEditPipeline`` tokenises each prompt together with its reference image through a
``Qwen2VLProcessor`` (tokenizer + image processor: the image becomes patches and the prompt's
``<|image_pad|>`` grows to one token per merged patch). In transformers 5 that processor also
insists on a video processor, which needs torchvision even when no video is ever passed. Edit
prompts have only images, so :class:`ImageOnlyQwenProcessor` is the same class minus that
requirement, and :func:`load_processor` builds it from a checkpoint's ``processor`` folder
(tokenizer files and ``preprocessor_config.json``, as Qwen/Qwen-Image-Edit publishes them): no
torchvision needed, and the pipeline calls it exactly as it calls the original.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen2.5-VL's vision markers: an image sits between start and end as ``<|image_pad|>`` tokens."""


class ImageOnlyQwenProcessor(transformers.Qwen2VLProcessor):
    """``Qwen2VLProcessor`` that accepts ``video_processor=None`` (images only, no torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def build_processor(tokenizer: Any, image_processor: Any) -> ImageOnlyQwenProcessor:
    """A processor over an existing tokenizer and Qwen2-VL image processor."""
    return ImageOnlyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_processor(root: str | os.PathLike, *, subfolder: str = "processor", revision: str | None = None) -> ImageOnlyQwenProcessor:
    """The processor of a Qwen-Image-Edit checkpoint (local folder or hub id)."""
    kwargs: dict[str, Any] = {"subfolder": subfolder}
    if revision:
        kwargs["revision"] = revision
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), **kwargs)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(root), **kwargs)
    return build_processor(tokenizer, image_processor)


def save_processor(processor: Any, path: str | os.PathLike) -> Path:
    """Write the tokenizer files and ``preprocessor_config.json`` (what :func:`load_processor`
    and the published checkpoints' ``processor`` folders hold)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    return path
