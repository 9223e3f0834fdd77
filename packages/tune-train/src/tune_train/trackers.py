"""Which accelerate trackers a ``report_to`` value starts, and the arguments each one gets.

The loop logs through accelerate's tracker API only (``init_trackers`` / ``log`` /
``end_training``), so adding a tracker is a name here plus its start arguments; the loop does
not change. The tracker libraries are optional extras: a missing one is a ``ConfigError`` with
the install command *before* minutes of model loading, not an ImportError deep inside accelerate.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from tune_train.config import ConfigError

#: ``report_to`` -> accelerate tracker names. ``all`` keeps its old meaning (tensorboard and
#: wandb): comet_ml needs an account or an offline setup, so it is only started when named.
TRACKERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "comet_ml": ("comet_ml",),
    "all": ("tensorboard", "wandb"),
}

#: Tracker -> (module to import, pip extra that installs it).
_REQUIREMENTS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet"),
}


def tracker_names(report_to: str) -> list[str]:
    """The accelerate trackers ``report_to`` starts (``[]`` for ``none``)."""
    return list(TRACKERS.get(report_to, ()))


def check_installed(report_to: str) -> None:
    """Raise a ``ConfigError`` naming ``report_to`` and the install command when a tracker's
    library is missing."""
    for name in tracker_names(report_to):
        module, extra = _REQUIREMENTS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"report_to {report_to!r} needs the {module} package, which is not installed: "
                f'pip install "tune-train[{extra}]" (or set report_to: none)'
            ) from exc


def init_kwargs(report_to: str, *, logging_dir: Path, run_name: str | None) -> dict[str, dict[str, Any]]:
    """Per-tracker start arguments for ``Accelerator.init_trackers``.

    wandb and comet_ml write their local files under ``logging_dir`` (``WANDB_MODE=offline`` /
    ``COMET_START_ONLINE=false`` keep everything there) and name the run ``tracker_run_name``.
    Whether comet_ml logs online is left to comet's own settings (``COMET_START_ONLINE``, its
    config file), as its users expect.
    """
    names = tracker_names(report_to)
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(logging_dir), "name": run_name}
    if "comet_ml" in names:
        import comet_ml

        kwargs["comet_ml"] = {
            "experiment_config": comet_ml.ExperimentConfig(name=run_name, offline_directory=str(logging_dir))
        }
    return kwargs
