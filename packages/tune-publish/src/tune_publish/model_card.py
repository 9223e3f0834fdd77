"""The adapter's ``README.md``: Hub front matter, settings, sample images and a usage snippet.

The Hugging Face Hub reads the YAML front matter to tag the repository, link it to its base
model and fill the image widget; people read the rest. The YAML is written by hand (no PyYAML
dependency) with every string double-quoted and escaped, so a prompt holding ``: # - "`` or a
newline cannot break the card.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from tune_publish._atomic import write_text_atomic
from tune_publish.lora_file import LORA_WEIGHT_NAME

#: Tags every tune card carries, before the family and the caller's own.
BASE_TAGS = ("text-to-image", "diffusers", "lora", "tune")

_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(<([^>]+)>\)")


def yaml_str(value: Any) -> str:
    """A YAML double-quoted scalar for ``str(value)``: safe for any characters."""
    out = ['"']
    for char in str(value):
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029, 0xFEFF) or (
            0xD800 <= code <= 0xDFFF
        ):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _relative_image(path: str) -> str:
    posix = PurePosixPath(str(path).replace(os.sep, "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", str(path)) or ".." in posix.parts:
        raise ValueError(
            f"validation image {path!r} must be a path relative to output_dir inside it, so the "
            "card still works once the folder is uploaded"
        )
    return posix.as_posix()


def _table_cell(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _caption(text: str) -> str:
    """A prompt as one line of Markdown text, its emphasis and HTML characters escaped."""
    return re.sub(r"([\\`*_<>\[\]])", r"\\\1", " ".join(text.split()))


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item not in seen:
            seen[item] = None
    return list(seen)


def _front_matter(
    *,
    base_model: str,
    license: str,
    tags: list[str],
    trigger: str | None,
    images: list[tuple[str, str]],
) -> str:
    lines = [
        "---",
        f"base_model: {yaml_str(base_model)}",
        "library_name: diffusers",
        f"license: {yaml_str(license)}",
        "pipeline_tag: text-to-image",
        "tags:",
        *(f"- {yaml_str(tag)}" for tag in tags),
    ]
    if trigger:
        lines.append(f"instance_prompt: {yaml_str(trigger)}")
    if images:
        lines.append("widget:")
        for prompt, url in images:
            lines += [f"- text: {yaml_str(prompt)}", "  output:", f"    url: {yaml_str(url)}"]
    lines.append("---")
    return "\n".join(lines)


def _usage(base_model: str, adapter: str, weight_name: str, prompt: str) -> str:
    return "\n".join(
        [
            "```python",
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            f"pipe = DiffusionPipeline.from_pretrained({json.dumps(base_model)}, "
            "torch_dtype=torch.bfloat16)",
            'pipe.to("cuda")',
            f"pipe.load_lora_weights({json.dumps(adapter)}, weight_name={json.dumps(weight_name)})",
            f"image = pipe({json.dumps(prompt, ensure_ascii=False)}).images[0]",
            'image.save("output.png")',
            "```",
        ]
    )


def _usage_full(base_model: str, folder: str, prompt: str, component: str = "transformer") -> str:
    return "\n".join(
        [
            "```python",
            "import torch",
            "from diffusers import AutoModel, DiffusionPipeline",
            "",
            f"{component} = AutoModel.from_pretrained({json.dumps(folder)}, torch_dtype=torch.bfloat16)",
            f"pipe = DiffusionPipeline.from_pretrained({json.dumps(base_model)}, {component}={component}, "
            "torch_dtype=torch.bfloat16)",
            'pipe.to("cuda")',
            f"image = pipe({json.dumps(prompt, ensure_ascii=False)}).images[0]",
            "```",
        ]
    )


def _usage_lycoris(base_model: str, adapter: str, weight_name: str) -> str:
    return "\n".join(
        [
            "diffusers' `load_lora_weights` does not read LyCORIS files; apply it with the",
            "`lycoris-lora` library (ComfyUI also loads it):",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "from lycoris import create_lycoris_from_weights",
            "",
            f"pipe = DiffusionPipeline.from_pretrained({json.dumps(base_model)})",
            f"network, _ = create_lycoris_from_weights(1.0, {json.dumps(adapter + '/' + weight_name)}, pipe.transformer)",
            "network.merge_to()",
            "```",
        ]
    )


_INTRO = {"lora": "A LoRA adapter", "lycoris": "A LyCORIS adapter", "full": "A full fine-tune of the {model_folder}"}


def write_model_card(
    output_dir: str | os.PathLike[str],
    *,
    base_model: str,
    family: str,
    flavour: str | None,
    title: str,
    settings: Mapping[str, Any],
    validation_images: list[tuple[str, str]],
    trigger: str | None = None,
    tags: list[str] | None = None,
    license: str = "other",
    adapter_id: str | None = None,
    weight_name: str = LORA_WEIGHT_NAME,
    kind: str = "lora",
    model_folder: str = "transformer",
) -> Path:
    """Write ``output_dir/README.md`` atomically and return its path.

    ``validation_images`` are ``(prompt, path)`` pairs with paths relative to ``output_dir`` (the
    card travels with the folder). ``adapter_id`` is what the usage snippet loads (a Hub repo id
    once published); it defaults to ``"path/to/output_dir"`` as a placeholder. ``kind`` (``lora``,
    ``lycoris``, ``full``) picks the description and the loading snippet; ``model_folder`` is the
    pipeline component a full fine-tune replaces (``transformer``, or ``unet`` for UNet families).
    """
    out = Path(output_dir)
    images = [(str(prompt), _relative_image(path)) for prompt, path in validation_images]
    all_tags = _unique([*BASE_TAGS, family, *(tags or [])])
    front = _front_matter(
        base_model=base_model, license=license, tags=all_tags, trigger=trigger, images=images
    )
    model_line = f"`{base_model}` ({family}" + (f", flavour `{flavour}`)" if flavour else ")")
    body = [
        front,
        "",
        f"# {title}",
        "",
        f"{_INTRO.get(kind, _INTRO['lora']).format(model_folder=model_folder)} for {model_line}, trained with tune.",
        "",
    ]
    if trigger:
        body += ["## Trigger words", "", f"Use `{trigger}` in the prompt to trigger the concept.", ""]
    body += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    body += [f"| {_table_cell(key)} | {_table_cell(value)} |" for key, value in settings.items()]
    body.append("")
    if images:
        body += ["## Validation images", ""]
        for prompt, url in images:
            # Angle brackets let the link hold spaces; the prompt is the caption.
            alt = prompt.replace("[", "(").replace("]", ")").replace("\n", " ")
            body += [f"![{alt}](<{url}>)", "", f"*{_caption(prompt)}*", ""]
    sample_prompt = images[0][0] if images else (trigger or "a photo")
    body += [
        "## Use it with diffusers" if kind != "lycoris" else "## Use it",
        "",
        _usage_full(base_model, (adapter_id or "path/to/output_dir") + f"/{model_folder}", sample_prompt, model_folder)
        if kind == "full"
        else _usage_lycoris(base_model, adapter_id or "path/to/output_dir", weight_name)
        if kind == "lycoris"
        else _usage(base_model, adapter_id or "path/to/output_dir", weight_name, sample_prompt),
        "",
    ]
    return write_text_atomic(out / "README.md", "\n".join(body))


def card_image_paths(readme: str | os.PathLike[str]) -> list[str]:
    """The relative image paths a card written by :func:`write_model_card` links to."""
    text = Path(readme).read_text(encoding="utf-8")
    return _unique(_IMAGE_LINK.findall(text))
