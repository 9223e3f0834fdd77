"""A content-keyed tensor cache (latents, text embeddings), one safetensors file per item.

The key of an entry hashes everything that decides its content: the cache's namespace (which
model and encoder), the settings that shape it (resolution, crop, ...), the item id and the
source file's storage identity. Changing any of them gives new keys, so stale entries are never
served; they are simply no longer read.

The root is a local folder or an fsspec URL (``s3://bucket/prefix``, credentials from
``storage_options`` or the ``AWS_*`` environment). Locally an entry is written to a temporary file
in the same folder and renamed into place, so a run killed mid-write never leaves half an entry;
on an object store a single PUT is atomic, so the entry is uploaded in one request.

:meth:`TensorCache.writer` gives a :class:`~tune_data.cache_writer.CacheWriter`: entries are
handed to one worker thread through a bounded queue, so encoding the next batch overlaps writing
(or uploading) the last, while at most ``max_pending`` entries wait in memory.

``compress_disk_cache=True`` stores each entry gzip-compressed (``<key>.safetensors.gz``,
``gunzip`` gives the plain safetensors file). Entries of either form are read back whatever the
flag, so switching it never re-encodes anything.

torch and safetensors are imported only when an entry is read or written (``tune-data[cache]``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import re
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from tune_data.cache_writer import CacheWriteError, CacheWriter

if TYPE_CHECKING:
    import torch

__all__ = ["TensorCache", "CacheStats", "CacheWriter", "CacheWriteError", "cache_root_for", "latent_entry_metadata"]

_INSTALL_HINT = 'the tensor cache needs torch and safetensors: pip install "tune-data[cache]"'
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIX = ".safetensors"
_GZ_SUFFIX = ".safetensors.gz"
#: gzip level: level 1 gets within 1 % of level 9's size on latents at a third of the time
#: (measured; see docs/data.md).
_GZ_LEVEL = 1


def _torch_modules() -> tuple[Any, Any]:
    try:
        import safetensors.torch as st
        import torch
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return torch, st


@attrs.define
class CacheStats:
    """Counters a caller (or a test) reads to see whether work was reused."""

    hits: int = 0
    """Entries read from disk."""
    misses: int = 0
    """Lookups through :meth:`TensorCache.get` / :meth:`TensorCache.get_or_compute` that found nothing."""
    writes: int = 0
    """Entries written."""


class TensorCache:
    """Tensors per item under ``root/namespace/``, keyed by :meth:`key`.

    ``namespace`` names what produced the tensors (``"vae-flux"``, ``"text-t5"``); ``settings``
    are the values that change them (``DatasetConfig.cache_settings()`` for latents). Several
    processes may share one cache: writes are atomic and identical keys hold identical content.
    """

    #: Temporary files older than this (seconds) are leftovers of a killed run and are removed.
    stale_tmp_age_s: float = 3600.0

    def __init__(
        self,
        root: str | os.PathLike[str],
        namespace: str,
        settings: Mapping[str, Any],
        *,
        compress_disk_cache: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        dataset: str | None = None,
    ) -> None:
        """``root``: a local folder or an fsspec URL such as ``s3://bucket/prefix``.

        ``compress_disk_cache``: write entries gzip-compressed. ``storage_options``: keyword
        arguments for the fsspec filesystem of a URL root (for ``s3://``, default: the ``AWS_*``
        environment, see :func:`tune_data.s3.s3_storage_options`). ``dataset``: the id of the
        dataset the cache belongs to, named in errors (a refused S3 credential says whose).
        """
        if not namespace:
            raise ValueError("TensorCache needs a non-empty namespace (what produced the tensors)")
        self.compress = bool(compress_disk_cache)
        self.dataset = dataset
        self.fs: Any = None
        self.url: str | None = None
        self._options: dict[str, Any] = {}
        root_text = os.fspath(root)
        if isinstance(root, os.PathLike) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/[^/]", root_text):
            # Path("s3://b/x") collapses to "s3:/b/x"; a caller that wrapped a URL in Path meant the URL.
            root_text = root_text.replace(":/", "://", 1)
        if "://" in root_text and not root_text.startswith("file://"):
            self.fs, self.url, self._options = _remote_filesystem(root_text, storage_options)
        elif root_text.startswith("file://"):
            root_text = root_text[len("file://") :]
        self.root = Path(root_text) if self.fs is None else root_text
        self.namespace = namespace
        self.settings = dict(settings)
        self.stats = CacheStats()
        try:
            self._settings_json = json.dumps(self.settings, sort_keys=True, separators=(",", ":"))
        except TypeError as exc:
            raise ValueError(f"cache settings must be JSON values: {exc}") from exc
        safe = _UNSAFE.sub("-", namespace).strip("-")[:60] or "cache"
        self.directory: Any = (
            self.root / safe if self.fs is None else f"{str(self.url).rstrip('/')}/{safe}"
        )
        self._swept: set[Path] = set()

    @property
    def is_remote(self) -> bool:
        """Whether the cache lives behind an fsspec URL (an object store) rather than a folder."""
        return self.fs is not None

    @property
    def hits(self) -> int:
        return self.stats.hits

    @property
    def misses(self) -> int:
        return self.stats.misses

    def key(self, item_id: str, identity: str) -> str:
        """The entry key of one item: a short hex hash of namespace, settings, id and identity."""
        payload = "\0".join((self.namespace, self._settings_json, item_id, identity))
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def path(self, key: str) -> Any:
        """Where an entry is written; the first two hex digits shard the files into 256 folders.

        A :class:`~pathlib.Path` for a local cache, a URL string for a remote one; with
        ``compress_disk_cache`` the name ends in ``.safetensors.gz``.
        """
        return self._location(key, self.compress)

    def _location(self, key: str, compressed: bool) -> Any:
        name = f"{key}{_GZ_SUFFIX if compressed else _SUFFIX}"
        if self.fs is None:
            return self.directory / key[:2] / name
        return f"{self.directory}/{key[:2]}/{name}"

    def _is_file(self, location: Any) -> bool:
        if self.fs is None:
            return location.is_file()
        # Not fs.isfile: it answers False for any error, so a refused credential would look like
        # an empty cache (and every image would be encoded again, to fail at the first write).
        try:
            info = self._remote(self.fs.info, location)
        except FileNotFoundError:
            return False
        return info.get("type") == "file"

    def _remote(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on the cache's filesystem; a refused credential or an unreachable store
        becomes one clear error naming the dataset, bucket and endpoint (never the secret)."""
        try:
            return call(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:
            clear = self._clear_error(exc)
            if clear is None:
                raise
            raise clear from None

    def _clear_error(self, exc: BaseException) -> Exception | None:
        if not str(self.url).startswith(("s3://", "s3a://")):
            return None
        from tune_data.s3 import _secrets, clear_s3_error

        owner = f"dataset {self.dataset!r} cache {self.url}" if self.dataset else f"cache {self.url}"
        bucket = str(self.url).split("://", 1)[1].split("/", 1)[0]
        return clear_s3_error(
            exc,
            owner=owner,
            bucket=bucket,
            endpoint=self._options.get("endpoint_url"),
            secrets=_secrets(self._options),
            fs=self.fs,
        )

    def _find(self, key: str) -> tuple[Any, bool] | None:
        """The stored entry of ``key`` and whether it is compressed (the configured form first)."""
        for compressed in (self.compress, not self.compress):
            location = self._location(key, compressed)
            if self._is_file(location):
                return location, compressed
        return None

    def has(self, key: str) -> bool:
        """Whether the entry is stored (temporary files of unfinished writes never count)."""
        return self._find(key) is not None

    def _read(self, key: str) -> tuple[Any, bool, bytes | None]:
        found = self._find(key)
        if found is None:
            raise KeyError(f"no cache entry {key} in {self.directory} (looked for {self.path(key)})")
        location, compressed = found
        if self.fs is None and not compressed:
            return location, compressed, None  # read in place (memory-mapped by safetensors)
        data = location.read_bytes() if self.fs is None else self._remote(self.fs.cat_file, location)
        return location, compressed, gzip.decompress(data) if compressed else data

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of an entry (on the CPU). A missing entry raises ``KeyError`` naming the file."""
        tensors = self.read(key)
        self.stats.hits += 1
        return tensors

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """:meth:`load` without counting a hit: for a reader thread reading ahead
        (:mod:`tune_data.prefetch`), whose user counts the hit when it uses the entry."""
        _, st = _torch_modules()
        location, _, data = self._read(key)
        return st.load_file(str(location), device="cpu") if data is None else st.load(data)

    def metadata(self, key: str) -> dict[str, str]:
        """The string metadata stored with an entry."""
        _torch_modules()
        location, _, data = self._read(key)
        if data is None:  # a local plain entry: read the header only, not the tensors
            with open(location, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            return dict(header.get("__metadata__") or {})
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        return dict(header.get("__metadata__") or {})

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or ``None`` (counted as a miss) when it is absent."""
        if not self.has(key):
            self.stats.misses += 1
            return None
        return self.load(key)

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Mapping[str, torch.Tensor]],
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The cached tensors, or ``compute()``'s result after saving it."""
        found = self.get(key)
        if found is not None:
            return found
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in compute().items()}
        self.save(key, tensors, metadata)
        return tensors

    def save(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        """Write an entry atomically and return where it is (see :meth:`path`).

        Locally: a temporary file in the same folder, then ``os.replace``. Remotely: one PUT of
        the whole entry. Tensors are detached, moved to the CPU and made contiguous. ``metadata``
        values must be strings (safetensors' rule).
        """
        torch, st = _torch_modules()
        if not tensors:
            raise ValueError(f"cache entry {key}: nothing to save (empty tensor dict)")
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"cache entry {key}: {name!r} is a {type(tensor).__name__}, not a tensor")
        for meta_key, value in (metadata or {}).items():
            if not isinstance(meta_key, str) or not isinstance(value, str):
                raise TypeError(
                    f"cache entry {key}: metadata must map str to str, got {meta_key!r}: {value!r}"
                )
        path = self.path(key)
        ready = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        meta = dict(metadata) if metadata else None
        if self.fs is not None:
            data = st.save(ready, metadata=meta)
            self._remote(self.fs.pipe_file, path, gzip.compress(data, _GZ_LEVEL) if self.compress else data)
            self.stats.writes += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sweep(path.parent)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            if self.compress:
                tmp.write_bytes(gzip.compress(st.save(ready, metadata=meta), _GZ_LEVEL))
            else:
                st.save_file(ready, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.stats.writes += 1
        return path

    def writer(self, max_pending: int = 8) -> CacheWriter:
        """A :class:`CacheWriter` saving into this cache on a worker thread (use it as a context
        manager: leaving the block waits for every entry and raises the first write error)."""
        return CacheWriter(self, max_pending=max_pending)

    def delete(self, key: str) -> bool:
        """Remove an entry (either form); whether there was one. Readers never see half a removal."""
        removed = False
        for compressed in (False, True):
            location = self._location(key, compressed)
            try:
                if self.fs is None:
                    location.unlink()
                else:
                    self._remote(self.fs.rm_file, location)
                removed = True
            except FileNotFoundError:
                pass
        return removed

    def check(self, key: str) -> str | None:
        """Why the entry cannot be used (``"missing"``, or the read error: a truncated or corrupt
        file), or ``None`` when every tensor in it reads back. Reads the whole entry."""
        if not self.has(key):
            return "missing"
        try:
            tensors = self.load(key)
            self.stats.hits -= 1  # a check is not a use
            for tensor in tensors.values():
                tensor.sum()  # touch every byte: a memory-mapped read is lazy
        except Exception as exc:  # safetensors, gzip and OS errors all mean "damaged"
            text = (str(exc) or type(exc).__name__).replace("\n", " ")
            return text[:200]
        return None

    def entries(self) -> list[tuple[str, int]]:
        """``(key, bytes)`` of every stored entry under this namespace, whatever its settings."""
        found: list[tuple[str, int]] = []
        if self.fs is None:
            if not self.directory.is_dir():
                return found
            paths = [(p, p.stat().st_size) for p in self.directory.glob("*/*") if p.is_file()]
            names = [(p.name, size) for p, size in paths]
        else:
            try:
                listing = self._remote(lambda: self.fs.find(self.directory, detail=True))
            except FileNotFoundError:
                return found
            names = [(path.rsplit("/", 1)[-1], int(info.get("size") or 0)) for path, info in listing.items()]
        for name, size in names:
            for suffix in (_GZ_SUFFIX, _SUFFIX):
                if name.endswith(suffix):
                    found.append((name[: -len(suffix)], size))
                    break
        return sorted(found)

    def _sweep(self, folder: Path) -> None:
        """Remove leftovers of killed writes in a shard folder, once per folder per cache object.

        Only old ones: another process sharing the cache may be writing a fresh one right now.
        """
        if folder in self._swept:
            return
        self._swept.add(folder)
        cutoff = time.time() - self.stale_tmp_age_s
        for tmp in folder.glob("*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass  # another process cleaned it first

    def __repr__(self) -> str:
        compressed = ", compress_disk_cache=True" if self.compress else ""
        return f"TensorCache({str(self.directory)!r}, settings={self._settings_json}{compressed})"


def latent_entry_metadata(item_id: str, identity: str, settings: Mapping[str, Any], model: str) -> dict[str, str]:
    """What a latent entry records about itself, so ``tune-data inspect`` can tell, without the
    model loaded, which kept image an entry belongs to (its key is a one-way hash)."""
    return {
        "item": item_id,
        "identity": identity,
        "settings": json.dumps(dict(settings), sort_keys=True, separators=(",", ":")),
        "model": model,
    }


def cache_root_for(dataset: Any, path: str) -> tuple[str, dict[str, Any] | None]:
    """``(root, storage_options)`` for a dataset's ``cache_dir_vae`` / ``cache_dir``, SimpleTuner-style.

    For a ``type: aws`` dataset a relative path is a prefix in the dataset's own bucket (as in
    SimpleTuner) and an ``s3://`` URL uses the dataset's credentials; anything else is returned as
    given (a local folder, or a URL using the environment's credentials).
    """
    is_url = "://" in path
    if getattr(dataset, "type", None) != "aws":
        return path, None
    from tune_data.s3 import s3_storage_options

    options = s3_storage_options(dataset)
    if is_url:
        return path, options if path.startswith(("s3://", "s3a://")) else None
    if os.path.isabs(path):
        return path, None
    return f"s3://{str(dataset.aws_bucket_name).strip('/')}/{path.strip('/')}", options


def _remote_filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str, dict[str, Any]]:
    """The fsspec filesystem of a cache URL, the URL and the options used; ``s3://`` gets tune's
    AWS settings."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        from tune_data.s3 import s3_filesystem, s3_storage_options

        if storage_options is None:
            options = s3_storage_options(None)
        fs = s3_filesystem(options, f"cache {url}")
    else:
        fs = fsspec.filesystem(protocol, **options)
    return fs, url, options
