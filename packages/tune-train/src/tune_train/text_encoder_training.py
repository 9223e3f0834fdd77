"""Training the text encoders' LoRA beside the denoiser's (``train_text_encoder``).

What changes in a run, and why each piece lives where it does:

- setup: :func:`check_support` refuses a family whose pipeline loads no text-encoder LoRA before
  any weight loads; :func:`add_loras` puts a LoRA on the family's text-encoder LoRA components
  (:mod:`tune_models.text_encoder_lora`), and :func:`place` keeps those encoders on the
  accelerator for the run (they run every step);
- each step: the prompts of the batch (after caption dropout) are encoded live, with gradients, by
  :meth:`ModelFamily.encode_prompts_for_training` (:func:`live_prompts`): what only frozen
  encoders make (a T5's embeddings) still comes from the text cache;
- the optimizer gets the encoders' LoRA as its own parameter group at ``text_encoder_lr``
  (:func:`param_groups`); gradient clipping, the non-finite gradient guard, EMA and checkpoints
  see them through the trainer's trainable list and named parameters;
- export: :class:`tune_train.adapter_setup.TrainedWeights` adds the encoders' keys and metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tune_train.config import ConfigError, TrainConfig


def check_support(family: Any, config: TrainConfig) -> None:
    """Refuse ``train_text_encoder`` for a family that cannot train its text encoder (naming the
    families that can), before any weights load."""
    if not config.train_text_encoder:
        return
    from tune_models.text_encoder_lora import check_support as family_check

    try:
        family_check(family)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def add_loras(model: Any, config: TrainConfig) -> list[torch.nn.Parameter]:
    """The text encoders' training LoRAs (the transformer's rank, alpha, dropout, init and DoRA);
    :func:`place` moves the encoders to the accelerator once the caches are filled."""
    from tune_models.text_encoder_lora import add_text_encoder_loras

    from tune_train.adapter_setup import PEFT_INIT

    if not config.train_text_encoder:
        return []
    per_component = add_text_encoder_loras(
        model,
        rank=config.lora_rank,
        alpha=config.lora_scale_alpha(),
        dropout=config.lora_dropout,
        init=PEFT_INIT[config.lora_init_type],
        use_dora=config.use_dora,
    )
    return [p for group in per_component.values() for p in group]


def place(model: Any, device: torch.device) -> None:
    """Move the trained text encoders to ``device`` for the whole run (they encode every step),
    in training mode (LoRA dropout applies as on the denoiser)."""
    from tune_models.text_encoder_lora import trained_components

    for component in trained_components(model):
        getattr(model, component).to(device).train()


def param_groups(
    transformer_params: Sequence[torch.nn.Parameter],
    text_encoder_params: Sequence[torch.nn.Parameter],
    config: TrainConfig,
) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """What the optimizer builder gets: the plain parameter list without text-encoder training
    (as every builder and plugin expects), else two groups, the second at ``text_encoder_lr``."""
    if not text_encoder_params:
        return list(transformer_params)
    lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
    return [
        {"params": list(transformer_params), "name": "transformer"},
        {"params": list(text_encoder_params), "lr": lr, "name": "text_encoder"},
    ]


def live_prompts(
    family: Any, model: Any, captions: Sequence[str], cached: Sequence[dict[str, torch.Tensor]]
) -> list[dict[str, Any]]:
    """The batch's prompt entries: what the trained encoders make encoded live (differentiable)
    from the same (possibly dropped) captions, the rest from the cached entries."""
    return family.encode_prompts_for_training(model, list(captions), list(cached))


@contextlib.contextmanager
def encoders_in_eval(model: Any) -> Iterator[None]:
    """The trained text encoders in eval mode (no LoRA dropout) for validation and ``eval_loss``,
    put back in training mode afterwards."""
    from tune_models.text_encoder_lora import trained_components

    encoders = [getattr(model, c) for c in trained_components(model)]
    states = [e.training for e in encoders]
    for encoder in encoders:
        encoder.eval()
    try:
        yield
    finally:
        for encoder, state in zip(encoders, states):
            encoder.train(state)


def is_trained(model: Any, encoder: Any) -> bool:
    """Whether ``encoder`` carries a training LoRA (it then stays on the accelerator)."""
    from tune_models.text_encoder_lora import trained_components

    return any(getattr(model, c) is encoder for c in trained_components(model))
