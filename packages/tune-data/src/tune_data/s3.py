"""The ``aws`` storage provider: images in Amazon S3 or any S3-compatible store, through s3fs.

A dataset entry names the bucket, an optional prefix, endpoint and region, and optionally the
credentials; whatever it leaves out comes from the standard ``AWS_*`` environment variables (and
then botocore's usual chain: profile, instance role). Credentials are never part of a repr, a log
line written by tune or an error message: errors raised through this provider are scrubbed of them.

Failures a run should survive or explain:

- A store that drops connections or restarts: every request is retried by botocore's
  ``standard`` retry mode (exponential backoff with jitter, at most 20 s apart) up to
  ``aws_max_attempts`` times (default ``AWS_MAX_ATTEMPTS``, else 10). The first failed attempt
  logs one warning, the first success after it another ("reachable again"), and the run goes on
  where it was; when the attempts run out, :class:`S3UnreachableError` names the dataset and the
  endpoint.
- Credentials the store refuses: :class:`S3AccessError`, one line naming the dataset, the
  bucket, the store's error code and the keys to check, without the secret and without the
  botocore traceback chain.

s3fs is imported only when an ``aws`` dataset is opened (``pip install "tune-data[s3]"``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from tune_data.config import DatasetConfig
from tune_data.errors import DatasetConfigError
from tune_data.storage import FsspecStorage, normalise_extensions

__all__ = [
    "clear_s3_error",
    "S3Storage",
    "S3AccessError",
    "S3UnreachableError",
    "DEFAULT_MAX_ATTEMPTS",
    "s3_storage_options",
    "s3_filesystem",
    "scrub_secrets",
]

log = logging.getLogger(__name__)

#: Attempts per request when neither ``aws_max_attempts`` nor ``AWS_MAX_ATTEMPTS`` says: with the
#: standard mode's backoff (random up to 2**attempt s, capped at 20 s) about a minute in all.
DEFAULT_MAX_ATTEMPTS = 10

#: Error codes meaning "these credentials may not do this" (wrong key id, wrong secret, expired
#: session token, a key without rights on the bucket).
_ACCESS_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
        "403",  # a refused HEAD request has no body, so botocore knows only the status
    }
)


class S3AccessError(DatasetConfigError, PermissionError):
    """The store refused the dataset's credentials (a ``ValueError``: the user's config is wrong,
    and a ``PermissionError``, as s3fs raises for the same failure)."""


class S3UnreachableError(ConnectionError):
    """The store stayed unreachable through every retry of a request."""


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
    config: dict[str, Any] = {"retries": {"max_attempts": _max_attempts(dataset), "mode": "standard"}}
    if dataset is not None and dataset.aws_max_pool_connections:
        config["max_pool_connections"] = dataset.aws_max_pool_connections
    options["config_kwargs"] = config
    return options


def _max_attempts(dataset: DatasetConfig | None) -> int:
    if dataset is not None and dataset.aws_max_attempts:
        return int(dataset.aws_max_attempts)
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "")))
    except ValueError:
        return DEFAULT_MAX_ATTEMPTS


class _RetryMonitor:
    """A botocore ``needs-retry`` handler that makes an outage visible without flooding the log.

    botocore does the retrying (this handler returns ``None``, so it never changes a decision);
    it only logs the first failed attempt of an outage and the first success after it.
    """

    def __init__(self, label: str, endpoint: str, max_attempts: int, secrets: Iterable[str]) -> None:
        self.label = label
        self.endpoint = endpoint
        self.max_attempts = max_attempts
        self.secrets = tuple(secrets)
        self.failing_since: float | None = None
        self.failures = 0
        self._lock = threading.Lock()

    def __call__(self, attempts: int = 1, response: Any = None, caught_exception: Any = None, **_: Any) -> None:
        status = getattr(response[0], "status_code", 0) if response else 0
        failed = caught_exception is not None or status >= 500 or status == 429
        with self._lock:
            if failed:
                self.failures += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    reason = caught_exception if caught_exception is not None else f"HTTP {status}"
                    log.warning(
                        "%s: S3 request to %s failed (%s); retrying with backoff, up to %d attempts per "
                        "request (aws_max_attempts)",
                        self.label, self.endpoint, scrub_secrets(str(reason), self.secrets), self.max_attempts,
                    )
            elif self.failing_since is not None:
                waited = time.monotonic() - self.failing_since
                self.failing_since = None
                log.warning("%s: S3 store %s reachable again after %.1f s; resuming", self.label, self.endpoint, waited)


def s3_filesystem(options: Mapping[str, Any], label: str = "S3") -> Any:
    """A fresh ``s3fs.S3FileSystem`` (no shared instance, no stale listing cache between runs).

    Its requests retry as ``options["config_kwargs"]["retries"]`` says (see
    :func:`s3_storage_options`), and an outage is logged once under ``label`` (the dataset, say).
    The filesystem's ``tune_retry_monitor`` attribute holds the counters.
    """
    try:
        import aiobotocore.session
        import s3fs
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    options = dict(options)
    retries = dict((options.get("config_kwargs") or {}).get("retries") or {})
    monitor = _RetryMonitor(
        label,
        str(options.get("endpoint_url") or "(AWS default endpoint)"),
        int(retries.get("max_attempts") or _max_attempts(None)),
        _secrets(options),
    )
    # Handlers registered on the session reach every client s3fs creates from it.
    session = options.pop("session", None) or aiobotocore.session.AioSession()
    session.register("needs-retry.s3", monitor)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, session=session, **options)
    fs.tune_retry_monitor = monitor
    return fs


def _secrets(options: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(options[name]) for name in ("key", "secret", "token") if options.get(name))


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind ``exc`` (s3fs keeps botocore's ClientError as the cause)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
        name = type(current).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return name
        current = current.__cause__ or current.__context__
    return None


def _is_unreachable(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        return False
    return isinstance(exc, BotoConnectionError)


def clear_s3_error(
    exc: BaseException, *, owner: str, bucket: str, endpoint: str | None, secrets: Iterable[str], fs: Any = None
) -> Exception | None:
    """A clear error for a refused credential or an endpoint down past every retry, else None.

    ``owner`` starts the message (``dataset 'pets'``, ``dataset 'pets' cache s3://b/c``); the
    bucket and endpoint are named, the credentials never (``secrets`` are scrubbed from the
    server's text). ``fs``: the filesystem, whose retry monitor knows how many attempts were made.
    """
    where = f"bucket {bucket!r} at {endpoint or 'the AWS default endpoint'}"
    code = _error_code(exc)
    if code in _ACCESS_CODES or code in ("NoCredentialsError", "PartialCredentialsError"):
        server = scrub_secrets(str(exc).replace("\n", " "), secrets)
        if code in ("NoCredentialsError", "PartialCredentialsError"):
            cause = "no complete credentials were found"
        elif code == "AccessDenied":
            cause = "the credentials are valid but may not read this bucket, or they are wrong"
        else:
            cause = "the access key id or the secret access key is wrong (or the session token expired)"
        return S3AccessError(
            f"{owner}: the S3 store refused access to {where}: {code} ({server}). "
            f"Likely cause: {cause}; check aws_access_key_id and aws_secret_access_key in the dataset "
            "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment)."
        )
    if _is_unreachable(exc):
        attempts = getattr(getattr(fs, "tune_retry_monitor", None), "max_attempts", "?")
        return S3UnreachableError(
            f"{owner}: cannot reach the S3 store for {where} after {attempts} attempts "
            f"({scrub_secrets(str(exc), secrets)}); raise aws_max_attempts to wait longer"
        )
    return None


def _translated(storage: S3Storage, exc: Exception) -> Exception | None:
    return clear_s3_error(
        exc,
        owner=f"dataset {storage.dataset.id!r}",
        bucket=storage.bucket,
        endpoint=storage.endpoint_url,
        secrets=storage._secrets,
        fs=storage.fs,
    )


def _scrubbed(method: _F) -> _F:
    """Re-raise errors from ``method`` as :func:`_translated` says, never with a credential in them."""

    @functools.wraps(method)
    def wrapper(self: S3Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            clear = _translated(self, exc)
            if clear is not None:
                raise clear from None
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
        super().__init__(s3_filesystem(options, f"dataset {dataset.id!r}"), f"{bucket}/{prefix}" if prefix else bucket)

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

