"""Built-in plugins of tune_publish (registered like any third-party plugin).

Targets are import strings, so listing publishers imports neither fsspec nor huggingface_hub.
"""

from __future__ import annotations

from collections.abc import Callable

from tune_data.plugins import hookimpl


@hookimpl
def tune_register_publishers(register: Callable[..., None]) -> None:
    register(
        "local",
        "tune_publish.publishers:publish_local",
        description="copy the adapter, model card and images to a folder or fsspec URL",
    )
    register(
        "huggingface",
        "tune_publish.publishers:publish_huggingface",
        description="upload the adapter, model card and images to a Hugging Face Hub repo",
    )


@hookimpl
def tune_train_start(trainer) -> None:
    """With ``push_to_hub``: warn at once when no Hub token is available (see tune_publish.push)."""
    if not getattr(getattr(trainer, "accelerator", None), "is_main_process", True):
        return
    from tune_publish.push import start_uploads, warn_if_no_token

    warn_if_no_token(trainer.config)
    start_uploads(trainer)


@hookimpl
def tune_checkpoint_saved(trainer, step: int, path: str) -> None:
    """With ``push_checkpoints_to_hub``: upload the checkpoint to ``checkpoint-<step>/`` of
    ``hub_model_id``, inline or queued (``push_to_hub_background``); see tune_publish.push."""
    from tune_publish.push import push_checkpoint

    push_checkpoint(trainer, path)


@hookimpl(tryfirst=True)
def tune_train_end(trainer, outputs: dict[str, str]) -> None:
    """Export the finished adapter (LoRA file and model card) before any publisher runs, then,
    with ``push_to_hub``, wait for queued checkpoint uploads and upload the adapter to
    ``hub_model_id`` (a failure warns; outputs stay local)."""
    if not getattr(getattr(trainer, "accelerator", None), "is_main_process", True):
        return
    from tune_publish.export import export_adapter
    from tune_publish.push import finish_uploads, hub_settings, push_run

    settings = hub_settings(getattr(trainer, "config", None))
    adapter_id = settings["hub_model_id"] if settings else None
    outputs.update(export_adapter(trainer.trained_adapter(), adapter_id=adapter_id))
    finish_uploads(trainer)  # queued checkpoint uploads land before the final push
    outputs.update(push_run(str(trainer.output_dir), trainer.config))
