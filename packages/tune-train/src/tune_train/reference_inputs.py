"""Reference images outside the latent path: prompts encoded *with* their references, and the input
image a validation pipeline edits or refines.

Two family declarations (``tune_models.family.ModelFamily``) drive this, never a family's name:

- ``prompts_use_references(flavour)``: the text encoder reads the reference images (a
  vision-language encoder, as Qwen-Image-Edit's), so one caption has one embedding *per
  reference*. :func:`cache_reference_prompts` encodes every (caption, references) pair of the
  datasets with ``conditioning_data``, plus the empty caption with the same references (caption
  dropout keeps the image and drops the words); :meth:`TrainingData.text_entry` names those
  entries, and ``load_batch`` reads them. The entry is keyed by the reference *files* (path, size,
  mtime), not their crop: the embedding is computed once from the reference as first planned, so a
  per-epoch re-crop (``vae_cache_clear_each_epoch``) reuses it instead of running the encoder again.
- ``validation_input(flavour)``: ``"reference"``, ``"optional-reference"`` or ``"image"``;
  :func:`validation_image` picks the picture the validation pipeline gets as ``image=``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from tune_data.buckets import PlannedImage, load_training_image

if TYPE_CHECKING:
    from PIL import Image

    from tune_train.data import PreparedDataset, TrainingData

log = logging.getLogger(__name__)


def reference_pictures(data: TrainingData, dataset: PreparedDataset, planned: PlannedImage) -> list[Image.Image]:
    """The sample's reference images as training sees them (planned crop and size), in
    ``conditioning_data`` order."""
    from PIL import Image

    current = dataset.current(planned)
    return [
        Image.fromarray(load_training_image(conditioning.storage, plan))
        for conditioning, plan in data.reference_plans(dataset, current)
    ]


def check_prompt_references(data: TrainingData, family: Any, flavour: str | None) -> None:
    """Before any weights load: a flavour whose prompts are encoded with their references needs
    conditioning data on every image dataset (its instruction is never encoded without the image),
    and cannot use ``conditioning_multidataset_sampling: random`` with several conditioning
    datasets (the prompt saw every reference of the sample)."""
    uses = getattr(family, "prompts_use_references", None)
    if uses is None or not uses(flavour):
        return
    from tune_train.config import ConfigError

    label = getattr(family, "label", "") or getattr(family, "name", "?")
    plain = sorted(dataset_id for dataset_id, d in data.prepared.items() if not d.references)
    if plain:
        raise ConfigError(
            f"model_flavour {flavour!r} of {label} encodes each caption together with its reference image, so "
            f"every image dataset needs conditioning_data; {', '.join(map(repr, plain))} has none "
            "(pair it with a conditioning dataset, or use a text-to-image flavour)"
        )
    several = sorted(dataset_id for dataset_id, d in data.prepared.items() if len(d.references) > 1)
    if data.conditioning_sampling == "random" and several:
        raise ConfigError(
            f"conditioning_multidataset_sampling 'random' with several conditioning datasets "
            f"({', '.join(map(repr, several))}): model_flavour {flavour!r} of {label} encodes each prompt with "
            "all of a sample's references, so it trains with all of them at once; use 'combined'"
        )


def cache_reference_prompts(
    data: TrainingData,
    encode_prompts: Callable[..., list[dict[str, torch.Tensor]]],
    *,
    batch_size: int = 8,
) -> int:
    """Encode every (caption, references) text entry missing from the caches of datasets with
    conditioning data; ``encode_prompts(captions, reference_images=...)`` is the family's encoder.
    Returns how many were encoded. Call after setting ``data.prompt_references``."""
    conditioned = [d for d in data.prepared.values() if d.references]
    if data.conditioning_sampling == "random" and any(len(d.references) > 1 for d in conditioned):
        several = ", ".join(repr(d.config.id) for d in conditioned if len(d.references) > 1)
        raise ValueError(
            f"conditioning_multidataset_sampling 'random' with several conditioning datasets ({several}): this "
            "model encodes each prompt together with its reference images, so it trains with all of a sample's "
            "references at once; use 'combined'"
        )
    todo: dict[tuple[int, str], tuple[PreparedDataset, PlannedImage, str]] = {}
    for dataset in conditioned:
        for images in dataset.buckets.values():
            for planned in images:
                for caption in (planned.record.caption, ""):
                    key = data.text_entry(dataset, planned, caption)
                    if (id(dataset.text_cache), key) not in todo and not dataset.text_cache.has(key):
                        todo[(id(dataset.text_cache), key)] = (dataset, planned, caption)
    items = list(todo.items())
    bar = tqdm(total=len(items), desc="caching text embeddings with references", disable=not data.progress or not items)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        captions = [caption for _, (_, _, caption) in chunk]
        pictures = [reference_pictures(data, dataset, planned) for _, (dataset, planned, _) in chunk]
        with torch.no_grad():
            embeds = encode_prompts(captions, reference_images=pictures)
        for ((_, key), (dataset, _, _)), tensors in zip(chunk, embeds):
            dataset.text_cache.save(key, {k: v.cpu() for k, v in tensors.items()})
        bar.update(len(chunk))
    bar.close()
    return len(items)


def validation_image(data: TrainingData, kind: str | None, *, prefer: str | None = None) -> Image.Image | None:
    """The picture a validation pipeline gets as ``image=`` (``kind`` is the family's
    ``validation_input``): for ``"reference"`` the first reference of the first sample (by path)
    of a dataset with conditioning data; for ``"image"`` the first training image (by path) itself;
    ``None`` for text-to-image. ``prefer`` (the held-out ``eval_dataset_id``) is looked at first,
    so validation edits an image the model was not trained on when there is one. Bucket-sized,
    as training sees it. ``"optional-reference"`` is ``"reference"`` where the run has
    conditioning data and text to image (``None``, no warning) where it has none."""
    if kind is None:
        return None
    if kind not in ("reference", "optional-reference", "image"):
        raise ValueError(
            f"unknown validation_input {kind!r}: expected None, 'reference', 'optional-reference' or 'image'"
        )
    from PIL import Image

    optional = kind == "optional-reference"
    if optional:
        kind = "reference"

    order = sorted(data.prepared, key=lambda dataset_id: dataset_id != prefer)
    for dataset_id in order:
        dataset = data.prepared[dataset_id]
        if kind == "reference" and not dataset.references:
            continue
        planned = min((p for images in dataset.buckets.values() for p in images), key=lambda p: p.record.path, default=None)
        if planned is None:
            continue
        if kind == "reference":
            return reference_pictures(data, dataset, planned)[0]
        return Image.fromarray(load_training_image(dataset.storage, dataset.current(planned)))
    if optional:
        return None
    what = "a dataset with conditioning_data" if kind == "reference" else "an image dataset"
    log.warning("no validation input image: the model's validation pipeline needs %s", what)
    return None


def text_entry_refs(data: TrainingData, dataset: PreparedDataset, planned: PlannedImage) -> str:
    """The references part of a text entry's key: each reference file's identity (see the module doc)."""
    return "|".join(
        conditioning.latent_cache.key(plan.record.path, plan.record.identity)
        for conditioning, plan in data.reference_plans(dataset, dataset.current(planned))
    )

