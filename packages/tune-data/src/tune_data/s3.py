"""The ``aws`` storage provider: images in Amazon S3 or any S3-compatible store, through s3fs.

A dataset entry names the bucket, an optional prefix, endpoint and region, and optionally the
credentials; whatever it leaves out comes from the standard ``AWS_*`` environment variables (and
then botocore's usual chain: profile, instance role). Credentials are never part of a repr, a log
line written by tune or an error message: errors raised through this provider are scrubbed of them.

s3fs is imported only when an ``aws`` dataset is opened (``pip install "tune-data[s3]"``).
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from tune_data.config import DatasetConfig
from tune_data.errors import DatasetConfigError
from tune_data.storage import FsspecStorage, normalise_extensions

__all__ = ["S3Storage", "s3_storage_options", "s3_filesystem", "scrub_secrets"]

_INSTALL_HINT = 'the aws storage provider needs s3fs: pip install "tune-data[s3]"'
_F = TypeVar("_F", bound=Callable[..., Any])


def _first(*values: str | None) -> str | None:
    return next((value for value in values if value), None)


def s3_storage_options(dataset: DatasetConfig | None = None) -> dict[str, Any]:
    """s3fs keyword arguments from a dataset's ``aws_*`` keys, falling back to ``AWS_*`` variables.

    With no dataset, only the environment is read (for an ``s3://`` cache folder, say). Keys
    left out let botocore find credentials its usual way (profile, instance role).
    """
    env = os.environ
    key = _first(dataset and dataset.aws_access_key_id, env.get("AWS_ACCESS_KEY_ID"))
    secret = _first(dataset and dataset.aws_secret_access_key, env.get("AWS_SECRET_ACCESS_KEY"))
    endpoint = _first(
        dataset and dataset.aws_endpoint_url, env.get("AWS_ENDPOINT_URL_S3"), env.get("AWS_ENDPOINT_URL")
    )
    region = _first(dataset and dataset.aws_region_name, env.get("AWS_REGION"), env.get("AWS_DEFAULT_REGION"))
    options: dict[str, Any] = {}
    if key and secret:
        options["key"], options["secret"] = key, secret
        token = env.get("AWS_SESSION_TOKEN") if not (dataset and dataset.aws_access_key_id) else None
        if token:
            options["token"] = token
    if endpoint:
        options["endpoint_url"] = endpoint
    if region:
        options["client_kwargs"] = {"region_name": region}
    if dataset is not None and dataset.aws_max_pool_connections:
        options["config_kwargs"] = {"max_pool_connections": dataset.aws_max_pool_connections}
    return options


def s3_filesystem(options: Mapping[str, Any]) -> Any:
    """A fresh ``s3fs.S3FileSystem`` (no shared instance, no stale listing cache between runs)."""
    try:
        import s3fs
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)


def _secrets(options: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(options[name]) for name in ("key", "secret", "token") if options.get(name))


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _scrubbed(method: _F) -> _F:
    """Re-raise errors from ``method`` without any credential in their message."""

    @functools.wraps(method)
    def wrapper(self: S3Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            text = str(exc)
            clean = scrub_secrets(text, self._secrets)
            if clean == text:
                raise
            try:
                replacement = type(exc)(clean)
            except Exception:
                replacement = OSError(clean)
            raise replacement from None

    return wrapper  # type: ignore[return-value]


class S3Storage(FsspecStorage):
    """Images under ``s3://aws_bucket_name/aws_data_prefix`` (``"type": "aws"``).

    Identity is the object's size and ETag, so a re-uploaded image with new content is measured
    and encoded again, and an unchanged one never is.
    """

    def __init__(self, dataset: DatasetConfig) -> None:
        self.dataset = dataset
        if not dataset.aws_bucket_name:
            raise DatasetConfigError(
                f"dataset {dataset.id!r}: aws_bucket_name is required for type 'aws' "
                "(the bucket holding the images)"
            )
        bucket = dataset.aws_bucket_name.strip().removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise DatasetConfigError(
                f"dataset {dataset.id!r}: aws_bucket_name must be a bare bucket name, got "
                f"{dataset.aws_bucket_name!r} (put folders in aws_data_prefix)"
            )
        prefix = dataset.aws_data_prefix.strip("/")
        options = s3_storage_options(dataset)
        self._secrets = _secrets(options)
        self._listed: dict[str, dict[str, Any]] = {}
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = options.get("endpoint_url")
        super().__init__(s3_filesystem(options), f"{bucket}/{prefix}" if prefix else bucket)

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` (for messages and reports; holds no credentials)."""
        return f"s3://{self.root}"

    @_scrubbed
    def list_files(self, extensions: Iterable[str] | None = None) -> list[str]:
        # One listing gives every object's size and ETag: keep them, so discovery's identity
        # check costs no request per object. The next listing replaces them.
        found = self.fs.find(self.root, withdirs=False, detail=True)
        self._listed = {self._relative(full): info for full, info in found.items()}
        wanted = normalise_extensions(extensions)
        return sorted(
            rel
            for rel in self._listed
            if not any(part.startswith(".") for part in rel.split("/"))
            and (wanted is None or posixpath.splitext(rel)[1].lower() in wanted)
        )

    @_scrubbed
    def identity(self, rel: str) -> str:
        info = self._listed.get(rel.replace("\\", "/").lstrip("/"))
        if info is not None and info.get("ETag"):
            return f"{info.get('size')}-{str(info['ETag']).strip(chr(34))}"
        return FsspecStorage.identity(self, rel)

    def invalidate(self) -> None:
        """Forget the last listing (identity then asks the store again)."""
        self._listed = {}

    #: s3fs serves calls from many threads through its event loop: discovery may examine
    #: several objects at once (see ``tune_data.discovery.REMOTE_DISCOVERY_THREADS``).
    concurrent_reads = True

    #: First fetch of :meth:`open_header`: enough for any image header (JPEG EXIF is at most
    #: 64 KiB); s3fs's default 50 MiB block would download the whole image to read its size.
    header_block_size = 256 * 1024

    @_scrubbed
    def open(self, rel: str, mode: str = "rb") -> Any:
        if mode != "rb":
            return FsspecStorage.open(self, rel, mode)
        return self._open_listed(rel)

    @_scrubbed
    def open_header(self, rel: str) -> Any:
        """``rel`` opened for reading its header: a small first fetch, no HEAD request when listed.

        Discovery uses it (when a provider has it) to measure images without downloading them.
        """
        return self._open_listed(rel, block_size=self.header_block_size)

    def _open_listed(self, rel: str, **options: Any) -> Any:
        # The listing holds the object's size and ETag: handing them to s3fs saves the HEAD
        # request it makes per file (at open for the size, at the first read for the ETag).
        info = self._listed.get(rel.replace("\\", "/").lstrip("/"))
        if info is None or not isinstance(info.get("size"), int):
            return self.fs.open(self._full(rel), "rb", **options)
        handle = self.fs.open(self._full(rel), "rb", size=info["size"], **options)
        handle.details = info
        return handle

    @_scrubbed
    def read_bytes(self, rel: str) -> bytes:
        # s3fs's cat_file asks for the size first (a HEAD); a listed object needs one GET only.
        if rel.replace("\\", "/").lstrip("/") not in self._listed:
            return FsspecStorage.read_bytes(self, rel)
        with self._open_listed(rel) as handle:
            return handle.read()

    exists = _scrubbed(FsspecStorage.exists)

    def describe(self) -> dict[str, Any]:
        """What ``tune-data inspect`` shows about this source (no credentials)."""
        return {
            "url": self.url,
            "endpoint": self.endpoint_url or "(AWS default)",
            "credentials": "from config"
            if self.dataset.aws_access_key_id
            else ("from environment" if self._secrets else "(botocore default chain)"),
        }

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage(url={self.url!r}{endpoint})"

