"""The discovery metadata cache: image sizes remembered per file, so a rerun reopens nothing unchanged.

One JSON file per dataset, keyed by relative path and checked against the storage identity (size
and mtime, or an etag): a changed file is measured again, a removed one is forgotten. It is
written to a temporary file and renamed into place, so a killed run leaves the old cache or the
new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MetadataCache", "metadata_path"]

_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def metadata_path(metadata_dir: str | os.PathLike[str], dataset_id: str) -> Path:
    """Where the cache of one dataset lives: a readable name plus a hash, so odd ids stay distinct."""
    safe = _UNSAFE.sub("-", dataset_id).strip("-")[:60] or "dataset"
    digest = hashlib.sha256(dataset_id.encode()).hexdigest()[:8]
    return Path(metadata_dir) / f"discovery-{safe}-{digest}.json"


class MetadataCache:
    """Sizes (or decode errors) of the files of one dataset root, valid while their identity holds."""

    def __init__(self, path: Path | None, root: str) -> None:
        self.path = path
        self.root = root
        self._old: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}  # unreadable cache: measure again, it is only a cache
            if data.get("version") == _VERSION and data.get("root") == root:
                self._old = dict(data.get("files", {}))

    def get(self, rel: str, identity: str) -> dict[str, Any] | None:
        """The remembered entry for ``rel`` if its identity is unchanged, else ``None``."""
        entry = self._old.get(rel)
        if entry is None or entry.get("identity") != identity:
            return None
        self._new[rel] = entry
        return entry

    def get_trusted(self, rel: str) -> dict[str, Any] | None:
        """The remembered entry for ``rel`` without checking its identity (``skip_file_discovery``)."""
        entry = self._old.get(rel)
        if entry is not None:
            self._new[rel] = entry
        return entry

    def remembered_caption(self, rel: str, caption_identity: str) -> str | None:
        """The caption stored for ``rel`` this run if its caption file's identity is unchanged."""
        entry = self._new.get(rel)
        if entry is None or entry.get("caption_identity") != caption_identity:
            return None
        caption = entry.get("caption")
        return caption if isinstance(caption, str) else None

    def remember_caption(self, rel: str, caption_identity: str, caption: str) -> None:
        """Store the caption read from ``rel``'s caption file (after the file's size is recorded).

        A rerun then reads no caption file whose identity held (on S3 the identity comes from the
        listing, so a warm discovery makes no request per file at all).
        """
        entry = self._new.get(rel)
        if entry is None:
            return
        # A copy: the entry may be the very dict of the old cache, and save() compares the two.
        self._new[rel] = {**entry, "caption_identity": caption_identity, "caption": caption}

    def put(
        self,
        rel: str,
        identity: str,
        *,
        size: tuple[int, int] | None = None,
        error: str | None = None,
        verified: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        entry: dict[str, Any] = {"identity": identity, **(extra or {})}
        if size is not None:
            entry["width"], entry["height"] = size
        if error is not None:
            entry["error"] = error
        if verified:
            entry["verified"] = True  # decoded completely once (scan_for_errors)
        self._new[rel] = entry

    def save(self) -> None:
        """Write what this run saw (files no longer present are dropped), atomically."""
        if self.path is None or self._new == self._old:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": _VERSION, "root": self.root, "files": dict(sorted(self._new.items()))}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
