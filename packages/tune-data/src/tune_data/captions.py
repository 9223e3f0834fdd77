"""Caption strategies: how an image's caption is found (``caption_strategy`` in a dataset entry).

A strategy is a callable ``strategy(storage, rel_path, dataset) -> str | None``; ``None`` means
"this image has no caption", and discovery drops the image with reason ``missing caption``.
Strategies are registered through ``tune_register_caption_strategies``, so a plugin adds one
(``csv``, ``parquet``, a captioning model, ...) the same way the built-ins below are added.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Protocol

from tune_data.config import DatasetConfig
from tune_data.errors import DatasetConfigError
from tune_data.plugins import UnknownNameError
from tune_data.storage import StorageProvider

__all__ = [
    "CaptionStrategy",
    "filename_caption",
    "textfile_caption",
    "instanceprompt_caption",
    "caption_for",
    "with_instance_prompt",
    "get_strategy",
    "caption_file_for",
    "caption_dropped",
]

_WHITESPACE = re.compile(r"\s+")


class CaptionStrategy(Protocol):
    """Returns the caption of ``rel_path`` in ``storage``, or ``None`` when it has none."""

    def __call__(self, storage: StorageProvider, rel_path: str, dataset: DatasetConfig) -> str | None: ...


def _tidy(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def filename_caption(storage: StorageProvider, rel_path: str, dataset: DatasetConfig) -> str:
    """The file name without folder or extension, underscores read as spaces, whitespace collapsed.

    ``"pets/a_red__cat .png"`` gives ``"a red cat"``. Nothing else is rewritten, so a name such as
    ``"photo (2).jpg"`` keeps its ``(2)``: rename files that carry numbering you do not want.
    """
    stem = posixpath.splitext(posixpath.basename(rel_path))[0]
    return _tidy(stem.replace("_", " "))


def caption_file_for(rel_path: str) -> str:
    """The caption file that belongs to an image: same folder and stem, ``.txt`` extension."""
    return posixpath.splitext(rel_path)[0] + ".txt"


def textfile_caption(storage: StorageProvider, rel_path: str, dataset: DatasetConfig) -> str | None:
    """The content of the ``.txt`` file beside the image (same stem), stripped; ``None`` if absent.

    The file is read as UTF-8 (a byte-order mark is dropped); inner newlines become spaces so one
    caption is one line.
    """
    caption_path = caption_file_for(rel_path)
    try:
        data = storage.read_bytes(caption_path)
    except FileNotFoundError:
        return None
    return _tidy(data.decode("utf-8-sig", errors="replace"))


def instanceprompt_caption(storage: StorageProvider, rel_path: str, dataset: DatasetConfig) -> str:
    """The dataset's ``instance_prompt`` for every image (config validation makes sure it is set)."""
    if not dataset.instance_prompt:
        raise DatasetConfigError(
            f"dataset {dataset.id!r}: instance_prompt is required when caption_strategy is 'instanceprompt'"
        )
    return dataset.instance_prompt


def get_strategy(dataset: DatasetConfig) -> CaptionStrategy:
    """The registered strategy named by ``dataset.caption_strategy``; unknown names list the known."""
    from tune_data.registry import caption_strategies

    try:
        return caption_strategies.load(dataset.caption_strategy)
    except UnknownNameError as exc:
        raise DatasetConfigError(f"dataset {dataset.id!r}: caption_strategy: {exc}") from exc


def caption_for(
    storage: StorageProvider,
    rel: str,
    dataset: DatasetConfig,
    strategy: CaptionStrategy | None = None,
) -> str | None:
    """The caption of one image, with ``instance_prompt`` prepended when the dataset asks for it.

    Pass ``strategy`` (from :func:`get_strategy`) when captioning many files, to look it up once.
    """
    strategy = strategy or get_strategy(dataset)
    caption = strategy(storage, rel, dataset)
    if caption is None:
        return None
    return with_instance_prompt(caption, dataset)


def with_instance_prompt(caption: str, dataset: DatasetConfig) -> str:
    """``caption`` with ``instance_prompt`` prepended when ``prepend_instance_prompt`` asks for it.

    Split out so discovery can cache the strategy's raw caption and apply the (cheap, config-
    dependent) prefix on every run: changing the prefix then needs no caption file read again.
    """
    if (
        dataset.prepend_instance_prompt
        and dataset.instance_prompt
        and dataset.caption_strategy != "instanceprompt"
    ):
        caption = _tidy(f"{dataset.instance_prompt} {caption}")
    return caption


def caption_dropped(dataset: DatasetConfig, item: str, *, seed: int, step: int) -> bool:
    """Whether ``item`` trains with an empty caption at ``step`` (``caption_dropout_probability``).

    Decided by a hash of ``(seed, dataset, item, step)``, never global random state, so every
    process and a resumed run make the same choice.
    """
    probability = dataset.caption_dropout_probability
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}\0{dataset.id}\0{item}\0{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < probability
