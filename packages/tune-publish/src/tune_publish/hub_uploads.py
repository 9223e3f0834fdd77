"""The Hub uploads of one training run, made inline or on a background thread.

``push_to_hub_background`` exists because an upload of a large checkpoint can take minutes, and
training should not stand still meanwhile. The rules that make that safe:

- **One upload at a time, in order** (a single worker thread): commits to one repo never race,
  and the final push lands after the checkpoints.
- **A snapshot, not the live folder**: a checkpoint may be pruned (``checkpoints_total_limit``)
  or rewritten before its upload starts, so background uploads read from hard links made at
  submit time (copies where the filesystem has no hard links). Checkpoint files are written once
  and replaced only by a rename, so a hard link is a stable snapshot at no cost in disk space.
- **Nothing silent, nothing lost**: a failure is logged when it happens, naming the repo and
  what failed, and again in the summary :meth:`HubUploads.wait` returns; uploads only ever read
  local files. The run waits for every upload before it returns, and a run that stops early
  (an exception, Ctrl-C) still finishes the queued uploads before the process exits (the
  executor's worker is joined at interpreter exit).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

STAGING_PREFIX = ".hub-upload-"
"""Hidden folders in ``output_dir`` holding the snapshots of pending background uploads."""


@attrs.frozen
class UploadFailure:
    """One upload that did not reach the Hub: what it was and why."""

    what: str
    """What was being uploaded (the checkpoint folder's name, ``checkpoint-200``)."""
    error: str
    """``ExceptionType: message``."""


@attrs.define
class HubUploads:
    """The uploads of one run to ``repo_id``: inline when ``background`` is false, else queued on
    one worker thread. ``output_dir`` holds the snapshots of queued uploads."""

    repo_id: str
    output_dir: Path = attrs.field(converter=Path)
    background: bool = False
    _executor: ThreadPoolExecutor | None = attrs.field(default=None, init=False)
    _pending: list[tuple[str, Future]] = attrs.field(factory=list, init=False)
    failures: list[UploadFailure] = attrs.field(factory=list, init=False)
    """Every upload that failed so far (inline ones at once; queued ones after :meth:`wait`)."""
    done: list[str] = attrs.field(factory=list, init=False)
    """What was uploaded, in order."""

    def __attrs_post_init__(self) -> None:
        # Snapshots of a run that died before its uploads finished: nothing will read them now.
        for stale in self.output_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def submit(self, what: str, folder: str | os.PathLike[str], upload: Callable[[Path], str]) -> str | None:
        """Upload ``folder`` with ``upload(folder) -> url``. Inline: returns the URL, or None after
        a logged failure. Background: snapshots ``folder``, queues the upload and returns None at
        once (the outcome is known after :meth:`wait`)."""
        folder = Path(folder)
        if not self.background:
            return self._run(what, folder, upload)
        snapshot = _snapshot(folder, self.output_dir)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tune-hub-upload")
        future = self._executor.submit(self._run, what, snapshot, upload, cleanup=snapshot.parent, source=folder)
        self._pending.append((what, future))
        log.info("queued the upload of %s to %r (%d pending)", what, self.repo_id, len(self._pending))
        return None

    def wait(self) -> list[UploadFailure]:
        """Block until every queued upload has finished; returns all failures of the run."""
        if self._pending:
            log.info("waiting for %d hub upload(s) to %r", len(self._pending), self.repo_id)
        for _, future in self._pending:
            future.result()  # _run never raises: failures are recorded
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        return list(self.failures)

    @property
    def pending(self) -> int:
        """Queued uploads not finished yet."""
        return sum(1 for _, future in self._pending if not future.done())

    def _run(
        self,
        what: str,
        folder: Path,
        upload: Callable[[Path], str],
        *,
        cleanup: Path | None = None,
        source: Path | None = None,
    ) -> str | None:
        try:
            url = upload(folder)
        except Exception as exc:  # noqa: BLE001 - a failed upload must not stop training or lose files
            failure = UploadFailure(what, f"{type(exc).__name__}: {exc}")
            self.failures.append(failure)
            log.warning(
                "push_to_hub to %r failed for %s (%s); the files are safe in %s",
                self.repo_id, what, failure.error, source or folder,
            )
            return None
        finally:
            if cleanup is not None:  # the snapshot, once read
                shutil.rmtree(cleanup, ignore_errors=True)
        self.done.append(what)
        log.info("pushed %s to %s", what, url)
        return url


def _snapshot(folder: Path, output_dir: Path) -> Path:
    """A hard-linked (else copied) twin of ``folder`` under a hidden folder of ``output_dir``,
    named like ``folder`` so an upload of it reads the same."""
    holder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    target = holder / folder.name
    shutil.copytree(folder, target, copy_function=_link_or_copy)
    return target


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def summary(uploads: HubUploads) -> str | None:
    """One line for the end of the run when some uploads failed, else None."""
    if not uploads.failures:
        return None
    failed = "; ".join(f"{f.what} ({f.error})" for f in uploads.failures)
    total = len(uploads.failures) + len(uploads.done)
    return (
        f"{len(uploads.failures)} of {total} hub upload(s) to {uploads.repo_id!r} failed: {failed}. "
        f"Every file is still in {uploads.output_dir}"
    )
