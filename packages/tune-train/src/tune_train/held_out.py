"""Which datasets a run holds out for ``eval_loss``, checked without torch.

A dataset is held out when ``eval_dataset_id`` names it or its entry is ``dataset_type: eval``
(SimpleTuner's way). The rules live here, apart from :mod:`tune_train.evaluation`, so that
``tune check`` and the config loader refuse a bad combination (an interval with nothing to
measure, every image dataset held out) before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_eval_datasets(config: Any, datasets: Sequence[Any]) -> list[str]:
    """The held-out datasets' ids, in the file's order: ``eval_dataset_id`` and every
    ``dataset_type: eval`` dataset. Checks that ``eval_dataset_id`` names an image dataset, that
    one image dataset is left to train on, and that the eval intervals have a dataset to measure."""
    from tune_train.config import ConfigError

    images = [d for d in datasets if d.dataset_type == "image" and not getattr(d, "disabled", False)]
    wanted = config.eval_dataset_id
    if wanted and wanted not in {d.id for d in images}:
        known = ", ".join(repr(d.id) for d in images) or "none"
        raise ConfigError(f"eval_dataset_id {wanted!r} names no enabled image dataset (image datasets: {known})")
    held = [d.id for d in images if d.id == wanted or getattr(d, "held_out", False)]
    if held and len(held) == len(images):
        if held == [wanted]:
            raise ConfigError(
                f"eval_dataset_id {wanted!r} is the only image dataset: nothing would be left to train on"
            )
        raise ConfigError(
            f"every image dataset ({', '.join(map(repr, held))}) is held out (eval_dataset_id or "
            "dataset_type 'eval'): nothing would be left to train on"
        )
    for key in ("eval_steps_interval", "eval_epoch_interval"):
        if getattr(config, key) and not held:
            raise ConfigError(
                f"{key} needs a held-out dataset to measure eval_loss on: eval_dataset_id, or a dataset "
                "of dataset_type 'eval' in the data backend config"
            )
    return held
