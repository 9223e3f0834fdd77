"""``push_to_hub``: upload a finished run to the Hugging Face Hub from tune-train's lifecycle hooks.

tune-train only carries the keys (``push_to_hub``, ``hub_model_id``, ``model_card_private``);
tune-publish does the work on its hooks (registered in :mod:`tune_publish.builtins`):

- ``tune_train_start``: a run that will push but has no Hub token gets a warning *now*, not
  after hours of training (it still trains: the outputs are worth having locally);
- ``tune_checkpoint_saved``, with ``push_checkpoints_to_hub``: the whole checkpoint folder goes
  to ``checkpoint-<step>/`` in the repo (so a run can resume from the Hub copy);
- ``tune_train_end``, after the exporter wrote the LoRA and the card: the ``huggingface``
  publisher uploads the adapter, ``README.md`` and the validation images it links to.

With ``push_to_hub_background`` the checkpoint uploads run on a worker thread
(:mod:`tune_publish.hub_uploads`); the final push waits for them, so the run returns only when
everything is on the Hub (or has failed with a warning).

An upload that fails (no network, no token, no permission) is a warning, never an exception:
the run has finished and everything it made is still in ``output_dir``, so losing it to a
network error at the last second would be the worst outcome. The warning says how to retry
(``tune_publish.publish("huggingface", ...)``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tune_publish.hub_uploads import HubUploads, summary

log = logging.getLogger(__name__)

_RUNS: dict[int, HubUploads] = {}
"""The uploads of each running trainer (by ``id``), from ``tune_train_start`` to ``tune_train_end``."""


def hub_settings(config: Any) -> dict[str, Any] | None:
    """The ``huggingface`` publisher's config for a run's TrainConfig (duck-typed: tune-publish
    never imports tune-train), or ``None`` when the run does not push."""
    if not getattr(config, "push_to_hub", False):
        return None
    return {
        "hub_model_id": getattr(config, "hub_model_id", None),
        "private": bool(getattr(config, "model_card_private", False)),
        "commit_message": f"Upload {getattr(config, 'model_family', 'tune')} LoRA trained with tune",
    }


def warn_if_no_token(config: Any) -> None:
    """At train start: warn when ``push_to_hub`` is set but no Hub token is available."""
    if hub_settings(config) is None:
        return
    import huggingface_hub

    if not huggingface_hub.get_token():
        log.warning(
            "push_to_hub is set but no Hugging Face token was found (run `hf auth login` or set "
            "HF_TOKEN); training continues and the upload to %r will fail at the end",
            getattr(config, "hub_model_id", None),
        )


def push_run(output_dir: str, config: Any) -> dict[str, str]:
    """At train end: upload ``output_dir`` to ``hub_model_id``. Returns ``{"hub": url}`` on
    success, ``{}`` (with a warning) on any failure or when the run does not push."""
    settings = hub_settings(config)
    if settings is None:
        return {}
    from tune_publish.publishers import publish_huggingface

    try:
        url = publish_huggingface(output_dir, settings)
    except Exception as exc:  # noqa: BLE001 - any upload failure must not lose the finished run
        log.warning(
            "push_to_hub to %r failed (%s: %s); the outputs are safe in %s. Retry with "
            'tune_publish.publish("huggingface", %r, {"hub_model_id": %r})',
            settings["hub_model_id"], type(exc).__name__, exc, output_dir, str(output_dir), settings["hub_model_id"],
        )
        return {}
    log.info("pushed %s to %s", output_dir, url)
    return {"hub": url}


def start_uploads(trainer: Any) -> HubUploads | None:
    """At train start: the run's upload queue (``push_to_hub_background`` decides inline or
    background), or None when the run does not push."""
    config = getattr(trainer, "config", None)
    settings = hub_settings(config)
    if settings is None:
        return None
    uploads = HubUploads(
        settings["hub_model_id"],
        Path(trainer.output_dir),
        background=bool(getattr(config, "push_to_hub_background", False)),
    )
    _RUNS[id(trainer)] = uploads
    return uploads


def upload_checkpoint(folder: str | os.PathLike[str], settings: dict[str, Any]) -> str:
    """Upload a whole checkpoint folder to the folder of the same name in ``hub_model_id``;
    returns its URL. Raises on any failure (the caller decides how loud)."""
    from huggingface_hub import HfApi

    from tune_publish.publishers import _hub_token

    folder = Path(folder)
    repo_id = settings["hub_model_id"]
    api = HfApi(token=_hub_token(settings))
    repo = api.create_repo(repo_id, repo_type="model", private=settings["private"], exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        path_in_repo=folder.name,
        commit_message=f"Upload {folder.name} (tune)",
    )
    url = str(getattr(repo, "url", None) or f"https://huggingface.co/{repo_id}")
    return f"{url}/tree/main/{folder.name}"


def push_checkpoint(trainer: Any, path: str) -> str | None:
    """On ``tune_checkpoint_saved``: with ``push_checkpoints_to_hub``, upload (or queue) the
    checkpoint at ``path``. Returns the URL of an inline upload that succeeded, else None."""
    config = getattr(trainer, "config", None)
    settings = hub_settings(config)
    if settings is None or not getattr(config, "push_checkpoints_to_hub", False):
        return None
    uploads = _RUNS.get(id(trainer)) or start_uploads(trainer)
    return uploads.submit(Path(path).name, path, lambda folder: upload_checkpoint(folder, settings))


def finish_uploads(trainer: Any) -> None:
    """At train end, before the final push: wait for the queued checkpoint uploads and say
    clearly, once more, which of the run's uploads failed."""
    uploads = _RUNS.pop(id(trainer), None)
    if uploads is None:
        return
    uploads.wait()
    message = summary(uploads)
    if message:
        log.warning("%s", message)
