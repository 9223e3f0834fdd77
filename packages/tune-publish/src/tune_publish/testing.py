"""A test double for the Hugging Face Hub API that tune calls, for tests (tune's and plugins').

tune reaches the Hub through two ``huggingface_hub.HfApi`` methods only: ``create_repo`` (the
repo of ``hub_model_id``) and ``upload_folder`` (the finished run, and with
``push_checkpoints_to_hub`` each checkpoint into a folder of its name). :class:`FakeHub` replaces
both on ``HfApi`` for one test, through pytest's ``monkeypatch``::

    from tune_publish.testing import FakeHub

    def test_push(tmp_path, monkeypatch):
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        hub = FakeHub(tmp_path / "hub").install(monkeypatch)
        ...  # push
        assert hub.finished == ["final"]

Nothing here imports pytest, and nothing is sent anywhere.
"""

from __future__ import annotations

import fnmatch
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["FakeHub"]


class FakeHub:
    """Stands in for ``HfApi.create_repo`` / ``HfApi.upload_folder``.

    - Every call is recorded in :attr:`calls` as ``(method, keyword arguments)``; ``create_repo``'s
      carry its ``repo_id`` and the client's ``token``. ``create_repo`` answers with a repo whose
      ``url`` is ``https://hub.test/<repo_id>``.
    - An upload is named by its ``path_in_repo`` (``checkpoint-2``), or ``"final"`` for the run's
      own push (no ``path_in_repo``); :attr:`events` records ``("start" | "done", name)`` in order.
    - With ``root``, uploaded files land under ``root/<repo_id>/<path_in_repo>`` (only those
      matching ``allow_patterns``, as the Hub keeps them): what the repo would then hold. Without
      it nothing is copied.
    - ``hold`` names an upload that, once started, sets :attr:`held` and waits for
      :attr:`release` (an Event) before doing anything else (a slow upload).
    - ``fail`` is an exception raised by every upload whose name matches the glob ``failing``
      (all of them by default), after it was recorded and before anything is copied.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        hold: str | None = None,
        fail: Exception | None = None,
        failing: str = "*",
    ) -> None:
        self.root, self.hold, self.fail, self.failing = root, hold, fail, failing
        self.release = threading.Event()
        self.held = threading.Event()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str]] = []

    @property
    def started(self) -> list[str]:
        """The uploads begun, by name, in order."""
        return [name for kind, name in self.events if kind == "start"]

    @property
    def finished(self) -> list[str]:
        """The uploads completed, by name, in order."""
        return [name for kind, name in self.events if kind == "done"]

    def install(self, monkeypatch: Any) -> FakeHub:
        """Replace the two ``HfApi`` methods (``monkeypatch.setattr``: undone after the test)."""
        from huggingface_hub import HfApi

        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kwargs}))
            if hub.root is not None:
                (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(url=f"https://hub.test/{repo_id}")

        def upload_folder(self, **kwargs):
            hub._upload(**kwargs)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self

    def _upload(self, **kwargs: Any) -> None:
        self.calls.append(("upload_folder", kwargs))
        path_in_repo = kwargs.get("path_in_repo")
        name = path_in_repo or "final"
        self.events.append(("start", name))
        if name == self.hold:
            self.held.set()
            if not self.release.wait(timeout=30):
                raise TimeoutError(f"the held upload {name} was never released")
        if self.fail is not None and fnmatch.fnmatch(name, self.failing):
            raise self.fail
        if self.root is not None:
            source = Path(kwargs["folder_path"])
            target = self.root / kwargs["repo_id"] / (path_in_repo or "")
            patterns = kwargs.get("allow_patterns")
            for file in sorted(source.rglob("*")):
                rel = file.relative_to(source).as_posix()
                if file.is_file() and (patterns is None or any(fnmatch.fnmatch(rel, p) for p in patterns)):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, target / rel)
        self.events.append(("done", name))
