"""Captioners: models (or anything else) that write a caption for each image.

A captioner is registered through ``tune_register_captioners`` and found by name in
:data:`tune_data.registry.captioners`. The registered target is a factory with
``from_options(options: dict) -> Captioner`` (usually the class itself); the built object
implements :class:`Captioner`.

Built-ins:

- ``filename``: the caption is the image's file name (``_`` read as space); no model. Useful to
  try the pipeline and in tests.
- ``blip``, ``florence2``, ``qwen2.5-vl``: transformers vision-language models, loaded by hub name
  or local path (``options["model"]``), needing ``pip install "tune-data[caption]"`` (torch and
  transformers). torch and transformers are imported only when one of them is built.

Each image handed to :meth:`Captioner.caption` is RGB (EXIF orientation applied) and carries its
path relative to the dataset root in ``image.info["tune_path"]``.
"""

from __future__ import annotations

import importlib
import posixpath
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from PIL import Image

__all__ = [
    "Captioner",
    "CaptionerFactory",
    "FilenameCaptioner",
    "TransformersCaptioner",
    "BlipCaptioner",
    "Florence2Captioner",
    "QwenVLCaptioner",
    "PATH_KEY",
    "INSTALL_HINT",
    "build_captioner",
]

#: ``image.info`` key holding the image's path relative to the dataset root.
PATH_KEY = "tune_path"
INSTALL_HINT = 'pip install "tune-data[caption]"'


@runtime_checkable
class Captioner(Protocol):
    """Writes one caption per image."""

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Captions for ``images``, in order, one per image (RGB, ``info["tune_path"]`` set)."""
        ...


class CaptionerFactory(Protocol):
    """What a plugin registers: builds a captioner from the user's options."""

    def from_options(self, options: dict[str, Any]) -> Captioner:
        """Build the captioner. ``options`` holds what the user passed (``model``, ``device``,
        ``prompt``, ``batch_size``, any ``--option key=value``); unknown keys may be ignored."""
        ...


def build_captioner(name: str, options: Mapping[str, Any] | None = None) -> Captioner:
    """Look ``name`` up in the captioner registry and build it from ``options``."""
    from tune_data.registry import captioners

    factory = captioners.load(name)
    return factory.from_options(dict(options or {}))


def image_path(image: Image.Image) -> str:
    """The path the pipeline recorded for ``image`` (``info["tune_path"]``, else ``filename``)."""
    return str(image.info.get(PATH_KEY) or getattr(image, "filename", "") or "")


class FilenameCaptioner:
    """The caption is the file name without folder or extension, ``_`` and ``-`` read as spaces."""

    def __init__(self, *, dashes: bool = True) -> None:
        self.dashes = dashes

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> FilenameCaptioner:
        return cls(dashes=bool(options.get("dashes", True)))

    def caption(self, images: list[Image.Image]) -> list[str]:
        captions = []
        for image in images:
            stem = posixpath.splitext(posixpath.basename(image_path(image).replace("\\", "/")))[0]
            stem = stem.replace("_", " ")
            if self.dashes:
                stem = stem.replace("-", " ")
            captions.append(" ".join(stem.split()))
        return captions


def _import_caption_libraries() -> tuple[Any, Any]:
    """``(torch, transformers)``, or an ImportError telling how to install them."""
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(
            f"the transformers captioners need torch and transformers ({exc.name or exc} is missing): "
            f"{INSTALL_HINT}"
        ) from exc
    return torch, transformers


class TransformersCaptioner:
    """A transformers vision-language model captioning a batch at a time (greedy decoding).

    Options: ``model`` (hub id or local folder; each subclass has a default), ``prompt``,
    ``device`` (``cuda`` when available, else ``cpu``), ``dtype`` (``bfloat16`` on CUDA, else
    ``float32``), ``max_new_tokens`` (``default_max_new_tokens``), ``trust_remote_code`` (False),
    ``revision``.
    """

    default_model: ClassVar[str] = ""
    default_prompt: ClassVar[str | None] = None
    default_max_new_tokens: ClassVar[int] = 77
    model_classes: ClassVar[tuple[str, ...]] = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")

    def __init__(self, options: dict[str, Any]) -> None:
        torch, transformers = _import_caption_libraries()
        self.torch = torch
        self.model_name = str(options.get("model") or self.default_model)
        self.prompt = options.get("prompt", self.default_prompt)
        self.max_new_tokens = int(options.get("max_new_tokens") or self.default_max_new_tokens)
        self.device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = options.get("dtype") or ("bfloat16" if str(self.device).startswith("cuda") else "float32")
        self.dtype = getattr(torch, dtype)
        extra = {"trust_remote_code": bool(options.get("trust_remote_code", False))}
        if options.get("revision"):
            extra["revision"] = options["revision"]
        self.processor = self._load_processor(transformers, extra)
        self.model = self._load_model(transformers, extra)
        self.model.to(self.device).eval()

    def _load_processor(self, transformers: Any, extra: dict[str, Any]) -> Any:
        return transformers.AutoProcessor.from_pretrained(self.model_name, **extra)

    def _load_model(self, transformers: Any, extra: dict[str, Any]) -> Any:
        last: Exception | None = None
        for class_name in self.model_classes:
            model_class = getattr(transformers, class_name, None)
            if model_class is None:
                continue
            try:
                return model_class.from_pretrained(self.model_name, dtype=self.dtype, **extra)
            except (ValueError, KeyError) as exc:  # this auto class does not know the model type
                last = exc
        raise ValueError(f"cannot load captioning model {self.model_name!r}: {last}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TransformersCaptioner:
        return cls(options)

    def _inputs(self, images: list[Image.Image]) -> Any:
        if self.prompt:
            return self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        return self.processor(images=images, return_tensors="pt")

    def _decode(self, generated: Any, inputs: Any) -> list[str]:
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [self._tidy(text) for text in texts]

    def _tidy(self, text: str) -> str:
        if self.prompt and text.startswith(self.prompt):
            text = text[len(self.prompt):]
        return " ".join(text.split())

    def caption(self, images: list[Image.Image]) -> list[str]:
        inputs = self._inputs(images).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self.torch.inference_mode():
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self._decode(generated, inputs)


class BlipCaptioner(TransformersCaptioner):
    """BLIP (``Salesforce/blip-image-captioning-large``): short, plain captions; ``prompt`` is an
    optional caption start (``"a photograph of"``)."""

    default_model = "Salesforce/blip-image-captioning-large"
    model_classes = ("BlipForConditionalGeneration", "AutoModelForImageTextToText", "AutoModelForVision2Seq")


class Florence2Captioner(TransformersCaptioner):
    """Florence-2 (``microsoft/Florence-2-large``); ``prompt`` is its task token
    (``<CAPTION>``, ``<DETAILED_CAPTION>``, ``<MORE_DETAILED_CAPTION>``, the default). Checkpoints
    that ship their own code need ``trust_remote_code``."""

    default_model = "microsoft/Florence-2-large"
    default_prompt = "<MORE_DETAILED_CAPTION>"
    default_max_new_tokens = 256
    model_classes = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModelForVision2Seq")

    def _inputs(self, images: list[Image.Image]) -> Any:
        return self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")

    def _tidy(self, text: str) -> str:
        return " ".join(re.sub(r"</?s>|<pad>|<[A-Z_]+>", " ", text).split())


class QwenVLCaptioner(TransformersCaptioner):
    """Qwen2.5-VL (``Qwen/Qwen2.5-VL-3B-Instruct``) asked ``prompt`` through its chat template."""

    default_model = "Qwen/Qwen2.5-VL-3B-Instruct"
    default_prompt = "Describe this image in one detailed paragraph, as a caption for training an image model."
    default_max_new_tokens = 200
    model_classes = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")

    def _load_processor(self, transformers: Any, extra: dict[str, Any]) -> Any:
        try:
            return super()._load_processor(transformers, extra)
        except ImportError as exc:
            if "torchvision" not in str(exc).lower():
                raise
        # transformers 5 builds Qwen's video processor with the rest, and it needs torchvision;
        # captions need images only, so build the processor without it.
        return _image_only_qwen_processor(transformers, self.model_name, extra)

    def _inputs(self, images: list[Image.Image]) -> Any:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if getattr(self.processor, "tokenizer", None) is not None:
            self.processor.tokenizer.padding_side = "left"
        return self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)

    def _decode(self, generated: Any, inputs: Any) -> list[str]:
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


def _image_only_qwen_processor(transformers: Any, model_name: str, extra: dict[str, Any]) -> Any:
    """A Qwen2.5-VL processor (tokenizer, image processor, chat template) without its video
    processor, so that captioning works where torchvision is not installed."""
    base = getattr(transformers, "Qwen2_5_VLProcessor", None) or transformers.Qwen2VLProcessor

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_name, **extra)
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_name, **extra)
    return ImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=_processor_chat_template(transformers, model_name, extra) or getattr(tokenizer, "chat_template", None),
    )


def _processor_chat_template(transformers: Any, model_name: str, extra: dict[str, Any]) -> str | None:
    """The processor's own chat template (``chat_template.jinja``, or ``chat_template.json`` as
    Qwen publishes it), which places the image tokens; ``None`` when the checkpoint has neither."""
    import json

    from transformers.utils import cached_file

    options = {"revision": extra["revision"]} if extra.get("revision") else {}
    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(
                model_name, name, _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False, **options,
            )
        except (OSError, ValueError):
            path = None
        if not path:
            continue
        text = open(path, encoding="utf-8").read()
        return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None
