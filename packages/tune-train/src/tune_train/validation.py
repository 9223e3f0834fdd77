"""Validation images during a run: which prompts, how the pipeline is borrowed from the training
model, where the images go, and their CLIP scores (``evaluation_type: clip``).

These functions take the :class:`~tune_train.trainer.Trainer` because validation borrows its
live model (the LoRA in training, not a copy) and records into its ``validation_images`` /
``clip_scores``; the Trainer keeps thin methods of the same names for plugins and notebooks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tune_train import evaluation
from tune_train.config import TrainConfig
from tune_train.setup_model import move

if TYPE_CHECKING:
    from tune_train.trainer import Trainer

log = logging.getLogger(__name__)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt name (``my prompt!`` -> ``my-prompt``)."""
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit] or "prompt"


def validation_prompts(config: TrainConfig) -> list[tuple[str, str]]:
    """(name, prompt) pairs from ``validation_prompt`` and ``user_prompt_library``."""
    prompts: list[tuple[str, str]] = []
    if config.validation_prompt:
        prompts.append(("validation", config.validation_prompt))
    if config.user_prompt_library:
        library = json.loads(Path(config.user_prompt_library).read_text())
        items = library.items() if isinstance(library, dict) else enumerate(library)
        for name, prompt in items:
            prompts.append((str(name), prompt if isinstance(prompt, str) else prompt["prompt"]))
    return prompts


def validate(trainer: Trainer) -> list[str]:
    """Images for every validation prompt and size, made without the assistant adapter."""
    config = trainer.config
    prompts = trainer.validation_prompts()
    if config.validation_disable or not prompts or not trainer.accelerator.is_main_process:
        return []
    try:  # a flavour may have no text-to-image pipeline (e.g. a refiner): train on, say so once
        trainer.family.validation_pipeline(trainer.model)
    except NotImplementedError as exc:
        if not getattr(trainer, "_validation_warned", False):
            log.warning("no validation images: %s", exc)
            trainer._validation_warned = True
        return []
    from tune_models.adapters import set_assistant_enabled

    folder = trainer.output_dir / "validation" / f"step-{trainer.global_step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    model = trainer.model
    transformer = model.transformer
    # The VAE and text encoders live on the CPU between validations (see setup_model); they
    # visit the device only while images are made; group-offloaded ones (group_offload_vae,
    # group_offload_text_encoder) are never moved whole: their hooks bring each group in.
    set_assistant_enabled(model, False)
    transformer.eval()
    move(model.vae, trainer.accelerator.device)
    for encoder in model.text_encoders:
        move(encoder, trainer.accelerator.device)
    pipeline = trainer.family.validation_pipeline(model)
    image = _input_image(trainer)
    paths = []
    # (file suffix, weights): the trained weights (in their evaluation form for schedule-free
    # optimizers) and/or the EMA weights, as ema_validation asks.
    variants: list[tuple[str, Any]] = [("", contextlib.nullcontext)]
    if trainer.ema is not None and config.ema_validation != "none":
        ema_variant = ("-ema", trainer.ema.swapped_in)
        variants = [ema_variant] if config.ema_validation == "ema_only" else [*variants, ema_variant]
    from tune_train.text_encoder_training import encoders_in_eval, is_trained

    try:
        # A trained text encoder (train_text_encoder) is the pipeline's own: its LoRA shapes the images.
        with torch.no_grad(), trainer._eval_weights(), encoders_in_eval(model):
            for suffix, weights in variants:
                with weights():
                    paths += _validation_images(trainer, pipeline, prompts, folder, suffix, image)
    finally:
        move(model.vae, "cpu")
        for encoder in model.text_encoders:
            if not is_trained(model, encoder):  # a trained one stays on the device for training
                move(encoder, "cpu")
        transformer.train()
        set_assistant_enabled(model, True)
    if config.evaluation_type == "clip":
        trainer._score_validation(evaluation.validation_prompt_pairs(prompts, validation_sizes(trainer), paths))
    trainer.hook.tune_validation_end(trainer=trainer, step=trainer.global_step, images=paths)
    return paths


def validation_sizes(trainer: Trainer) -> list[tuple[int, int]]:
    """The run's validation sizes; without ``validation_resolution``, the flavour's own size."""
    return trainer.config.validation_sizes(default=getattr(trainer.flavour, "resolution", None))


def _input_image(trainer: Trainer) -> Any:
    """The picture the family's validation pipeline edits or refines (its ``validation_input``:
    a reference from the conditioning data, or a training image; the held-out eval dataset's
    first), saved once as ``validation/input.png``; ``None`` for text to image."""
    from tune_train.reference_inputs import validation_image

    declared = getattr(trainer.family, "validation_input", None)
    kind = declared(trainer.flavour.name) if declared is not None else None
    if kind is None:
        return None
    cached = getattr(trainer, "_validation_input", None)
    if cached is None:
        cached = validation_image(trainer.data, kind, prefer=trainer.eval_dataset_id)
        if cached is not None:
            cached.save(trainer.output_dir / "validation" / "input.png")
        trainer._validation_input = cached
    return cached


def _validation_images(
    trainer: Trainer, pipeline: Any, prompts: list[tuple[str, str]], folder: Path, suffix: str, image: Any = None
) -> list[str]:
    """Generate and save one image per (prompt, size); record each for the model card. ``image``
    (when the family's pipeline takes one) goes to every prompt's call."""
    config, flavour = trainer.config, trainer.flavour
    paths = []
    extra = {"image": image} if image is not None else {}
    for name, prompt in prompts:
        for width, height in validation_sizes(trainer):
            image = trainer.family.generate(
                pipeline,
                prompt,
                width=width,
                height=height,
                steps=config.validation_num_inference_steps or flavour.inference_steps,
                guidance=config.validation_guidance if config.validation_guidance is not None else flavour.guidance,
                seed=config.validation_seed,
                negative_prompt=config.validation_negative_prompt,
                options=config.validation_options(),  # family-specific keys; others warn once
                **extra,
            )
            path = folder / f"{slug(name)}-{width}x{height}{suffix}.png"
            image.save(path)
            paths.append(str(path))
            label = f"{prompt} (EMA)" if suffix else prompt
            trainer.validation_images.setdefault(trainer.global_step, []).append(
                (label, str(path.relative_to(trainer.output_dir)))
            )
    return paths


def card_images(validation_images: dict[int, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The last validation images first (the hub widget shows them), then the before-training ones."""
    if not validation_images:
        return []
    steps = sorted(validation_images)
    images = list(validation_images[steps[-1]])
    if steps[0] != steps[-1]:
        images += [(f"{prompt} (before training)", path) for prompt, path in validation_images[steps[0]]]
    return images


def score_validation(trainer: Trainer, pairs: list[tuple[str, str]]) -> None:
    """Mean CLIP score of the images just made (``clip_score``; ``clip_score_ema`` for the EMA ones)."""
    if not pairs:
        return
    # The CLIP model loads on first use and stays: reloading it every validation costs seconds.
    if trainer._clip is None:
        trainer._clip = evaluation.ClipScorer(
            trainer.config.pretrained_evaluation_model_name_or_path, trainer.accelerator.device
        )
    scores = trainer._clip.scores(pairs)
    groups: dict[str, list[float]] = {}
    for (_, path), score in zip(pairs, scores):
        groups.setdefault("clip_score_ema" if Path(path).stem.endswith("-ema") else "clip_score", []).append(score)
    means = {name: sum(values) / len(values) for name, values in groups.items()}
    if "clip_score" in means:
        trainer.clip_scores[trainer.global_step] = means["clip_score"]
    trainer._log_metrics(means)
