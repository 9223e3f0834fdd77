"""Numbers that say how training goes, beyond the noisy training loss.

**Evaluation loss** (``eval_dataset_id``, ``dataset_type: eval``): the training loss is measured on random timesteps with
random noise, so two steps (or two runs) are never compared on the same problem and the curve is
mostly noise. Here a held-out dataset is scored on a fixed problem instead: every image at the
same ``eval_timesteps`` noise levels (an even grid over the range the run trains on), with noise
drawn from a seed that depends only on the image's place in the dataset, never on the run's
``seed`` or step. The model is in eval mode (no dropout) without gradients, and the assistant
adapter stays as it is during training, so the number measures what training changes. Before the
first step a LoRA changes nothing, so two runs with different seeds report the identical value;
after that, differences are the training's. (After "Demystifying SD fine-tuning", whose idea
SimpleTuner's ``eval_steps_interval`` also follows.) Several held-out datasets report one
``eval_loss/<id>`` each, or with ``eval_dataset_pooling`` one ``eval_loss`` over all their images.

**CLIP score** (``evaluation_type: clip``): 100 x the cosine similarity between a validation
image and its prompt in a CLIP model's joint embedding (clamped at 0, the usual definition), the
mean over the validation images: a rough prompt-following signal, meaningful with many prompts.

**Prior-preservation weighting** (``prior_loss_weight``): :func:`sample_loss_weights`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tune_train import flow
from tune_train.held_out import check_eval_datasets  # noqa: F401 - part of this module's API
from tune_train.loss_log import StepLog
from tune_train.masks import weighted_mse

log = logging.getLogger(__name__)

EVAL_LOG = "eval_log.csv"
EVAL_NOISE_SEED = 1_234_567
"""Seed of the evaluation noise; fixed so the number compares across runs with different ``seed``."""


# -- prior preservation --------------------------------------------------------------------------------


def sample_loss_weights(is_regularisation: Sequence[bool], prior_loss_weight: float) -> torch.Tensor:
    """Per-sample loss weights: ``prior_loss_weight`` for regularisation (prior-preservation)
    samples, 1 for the others. With ``prior_loss_weight`` below 1 the run learns the subject more
    and keeps the class prior less; above 1 the reverse."""
    return torch.tensor([prior_loss_weight if reg else 1.0 for reg in is_regularisation], dtype=torch.float32)


def weighted_batch_loss(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A batch-mean loss re-weighted by per-sample weights. Every batch comes from one dataset, so
    its samples share one weight and the mean of weighted samples is the weight times the mean."""
    if torch.all(weights == 1):
        return loss
    return loss * weights.mean().to(loss.device, loss.dtype)


# -- evaluation loss -----------------------------------------------------------------------------------


def eval_sigma_grid(count: int) -> torch.Tensor:
    """``count`` flow-matching sigmas evenly spread over (0, 1) (cell midpoints: the ends, pure
    data and pure noise, teach nothing), before the family's shift."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def eval_timestep_grid(scheme: Any, count: int) -> torch.Tensor:
    """``count`` DDPM timesteps evenly spread over the scheme's training range (integers)."""
    high = scheme.num_train_timesteps if scheme.max_timestep is None else scheme.max_timestep
    grid = scheme.min_timestep + (torch.arange(count, dtype=torch.float64) + 0.5) * (high - scheme.min_timestep) / count
    return grid.floor().long().clamp(scheme.min_timestep, high - 1)


def eval_image_count(data: Any, dataset_id: str, limit: int | None = None) -> int:
    """How many images :func:`eval_loss` scores in ``dataset_id`` (all, or the first ``limit``)."""
    return sum(len(batch) for batch in eval_batches(data, dataset_id, 1, limit))


def held_out_losses(trainer: Any) -> dict[str, tuple[float, int]]:
    """``{dataset id: (eval_loss, images scored)}`` for every held-out dataset of the run."""
    limit = trainer.config.num_eval_images
    return {
        dataset_id: (eval_loss(trainer, dataset_id), eval_image_count(trainer.data, dataset_id, limit))
        for dataset_id in trainer.eval_dataset_ids
    }


def pooled_loss(results: Mapping[str, tuple[float, int]]) -> float:
    """The loss over the images of all held-out datasets: each dataset's mean weighted by how
    many images it scored (the same number as scoring them as one dataset)."""
    images = sum(count for _, count in results.values())
    return sum(loss * count for loss, count in results.values()) / max(images, 1)


def eval_metrics(results: Mapping[str, tuple[float, int]], pooling: bool) -> dict[str, float]:
    """What an evaluation reports (``eval_dataset_pooling``): one ``eval_loss`` with a single
    held-out dataset or with pooling (:func:`pooled_loss`), else ``eval_loss/<id>`` per dataset."""
    if len(results) == 1 or pooling:
        return {"eval_loss": pooled_loss(results)}
    return {f"eval_loss/{dataset_id}": loss for dataset_id, (loss, _) in results.items()}


def eval_due(config: Any, step: int, batches_per_epoch: int) -> bool:
    """Whether optimizer step ``step`` (1-based, just taken) ends an evaluation interval:
    every ``eval_steps_interval`` steps, and/or every ``eval_epoch_interval`` epochs (a fraction
    such as 0.5 evaluates twice per epoch), counted in micro-batches as epochs are."""
    if config.eval_steps_interval and step % config.eval_steps_interval == 0:
        return True
    if config.eval_epoch_interval and batches_per_epoch:
        per_step = config.gradient_accumulation_steps / batches_per_epoch  # epochs per step
        before = int((step - 1) * per_step / config.eval_epoch_interval + 1e-9)
        after = int(step * per_step / config.eval_epoch_interval + 1e-9)
        return after > before
    return False


def eval_batches(data: Any, dataset_id: str, batch_size: int, limit: int | None = None) -> list[list[Any]]:
    """Every image of the held-out dataset once (the first ``limit`` only, when set), bucket by
    bucket, in a fixed order (by path); a batch never mixes buckets."""
    dataset = data.prepared[dataset_id]
    batches = []
    left = limit if limit is not None else sum(len(images) for images in dataset.buckets.values())
    for bucket in sorted(dataset.buckets):
        images = sorted(dataset.buckets[bucket], key=lambda planned: planned.record.path)[:left]
        left -= len(images)
        batches += [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return batches


@torch.no_grad()
def eval_loss(trainer: Any, dataset_id: str) -> float:
    """The mean loss over the held-out dataset at the fixed timesteps with the fixed noise.

    Uses the trainer's noise scheme (``trainer.ddpm``, or flow matching with the family's shift)
    and loss (min-SNR weighting included for DDPM families), so it is the training objective on
    data the run never trains on. Run on every process (a rank that skipped it would only wait
    at the next step's gradient all-reduce), each computing the whole number."""
    from tune_models.family import SampleGeometry

    config, family, model = trainer.config, trainer.family, trainer.model
    device = trainer.accelerator.device
    scheme = trainer.ddpm
    transformer = model.transformer
    from tune_models.family import compute_dtype

    dtype = compute_dtype(transformer)
    count = config.eval_timesteps
    was_training = transformer.training
    transformer.eval()
    total, samples, index = 0.0, 0, 0
    try:
        for batch in eval_batches(trainer.data, dataset_id, config.train_batch_size, config.num_eval_images):
            loaded = trainer.data.load_batch(dataset_id, batch, [False] * len(batch), step=0)
            latents, prompts = loaded[0], loaded[1]
            if getattr(getattr(trainer, "weights", None), "text_encoder_params", None):  # trained text encoders
                from tune_train.text_encoder_training import encoders_in_eval, live_prompts

                captions = trainer.data.batch_captions(dataset_id, batch, [False] * len(batch), step=0)
                with encoders_in_eval(model), trainer.accelerator.autocast():
                    prompts = live_prompts(family, model, captions, prompts)
            # One generator per image, seeded by its place in the fixed order: the noise of an
            # image does not depend on the batch size, the run's seed or the step.
            generators = [torch.Generator().manual_seed(EVAL_NOISE_SEED + 7919 * (index + i)) for i in range(len(batch))]
            index += len(batch)
            noises = torch.stack(
                [torch.stack([torch.randn(latents.shape[1:], generator=g) for _ in range(count)]) for g in generators],
                dim=1,
            )  # [timestep, sample, ...]
            if scheme is not None:
                levels = eval_timestep_grid(scheme, count)
            else:
                width, height = batch[0].bucket
                shift = family.flow_shift(
                    height,
                    width,
                    shift=config.flow_schedule_shift if config.flow_schedule_shift is not None else trainer.flavour.shift,
                    auto_shift=config.flow_schedule_auto_shift,
                    model=model,
                )
                levels = family.shift_sigmas(eval_sigma_grid(count), shift)
            prompt_batch = family.collate_prompts(prompts, device=device, dtype=dtype)
            # Edit/reference datasets: the same reference latents training gives the family.
            from tune_train.data import reference_kwargs

            references = reference_kwargs(
                trainer.data.load_references(dataset_id, batch, step=0), dataset_id, device
            )
            geometry = [SampleGeometry.from_planned(planned) for planned in batch]
            prompt_batch.update(family.batch_conditions(
                model, geometry, device=device, dtype=dtype, dataset=trainer.data.prepared[dataset_id].config
            ))
            # Masked datasets: the same loss mask training weights these images with.
            mask = trainer.data.load_masks(dataset_id, batch, tuple(latents.shape[-2:]))
            mask = mask.to(device) if mask is not None else None
            for k in range(count):
                noise = noises[k]
                level = levels[k].expand(len(batch)).clone()
                if scheme is not None:
                    noisy = scheme.add_noise(latents, noise, level)
                    target = scheme.target(latents, noise, level)
                else:
                    noisy = flow.add_noise(latents, noise, level)
                    target = flow.velocity_target(latents, noise)
                with trainer.accelerator.autocast():
                    prediction = family.predict(model, noisy.to(device), level.to(device), prompt_batch, **references)
                if scheme is not None:
                    loss = scheme.loss(prediction, target, level, noisy=noisy.to(device), mask=mask)
                else:
                    loss = weighted_mse(prediction, target, mask)
                total += float(loss) * len(batch)
                samples += len(batch)
    finally:
        transformer.train(was_training)
    return total / max(samples, 1)


class EvalLog(StepLog):
    """``eval_log.csv``: ``step,metric,value`` rows (``eval_loss``, ``clip_score``, ...); on resume,
    rows past the checkpoint are dropped, as in ``loss_log.csv``."""

    HEADER = ("step", "metric", "value")

    def append(self, step: int, metric: str, value: float) -> None:
        self._append_row([step, metric, f"{value:.8f}"])

    def rows(self) -> list[tuple[int, str, float]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(handle)]


# -- CLIP score ----------------------------------------------------------------------------------------


class ClipScorer:
    """Scores images against prompts with a CLIP model (transformers' ``CLIPModel`` and
    ``CLIPProcessor`` from ``pretrained_evaluation_model_name_or_path``), loaded on first use and
    kept on the CPU between validations so it costs no accelerator memory during training."""

    def __init__(self, name_or_path: str, device: torch.device | str = "cpu") -> None:
        self.name_or_path = name_or_path
        self.device = torch.device(device)
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import CLIPModel, CLIPProcessor

        try:
            self._model = CLIPModel.from_pretrained(self.name_or_path).eval()
            self._processor = CLIPProcessor.from_pretrained(self.name_or_path)
        except OSError as exc:
            raise FileNotFoundError(
                f"pretrained_evaluation_model_name_or_path {self.name_or_path!r}: no CLIP model and "
                f"processor could be loaded ({exc})"
            ) from exc

    @torch.no_grad()
    def scores(self, pairs: Sequence[tuple[str, Any]]) -> list[float]:
        """``100 * max(cos(image, prompt), 0)`` for each ``(prompt, image or image path)``."""
        if not pairs:
            return []
        self._load()
        from PIL import Image

        prompts = [prompt for prompt, _ in pairs]
        images = [Image.open(i).convert("RGB") if isinstance(i, (str, os.PathLike)) else i.convert("RGB") for _, i in pairs]
        inputs = self._processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        model = self._model.to(self.device)
        try:
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            image_features = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
            text_features = _features(
                model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            )
        finally:
            model.to("cpu")
        image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
        text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        cosine = (image_features * text_features).sum(dim=-1)
        return (100.0 * cosine.clamp(min=0)).cpu().tolist()


def _features(output: Any) -> torch.Tensor:
    """transformers 5 may return a model output instead of the bare projected embeddings."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")


def validation_prompt_pairs(
    prompts: Sequence[tuple[str, str]], sizes: Sequence[Any], paths: Sequence[str]
) -> list[tuple[str, str]]:
    """``(prompt, path)`` for the images one validation wrote: for each weights variant (trained,
    then EMA), each prompt, each size, in that order."""
    expanded = [prompt for _, prompt in prompts for _ in sizes]
    if not expanded or len(paths) % len(expanded):
        log.warning("clip_score skipped: %d validation images do not match %d prompts x sizes", len(paths), len(expanded))
        return []
    return [(expanded[i % len(expanded)], path) for i, path in enumerate(paths)]
