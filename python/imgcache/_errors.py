"""The exceptions of imgcache: one class per kind of failure, all below :class:`CacheError`.

Every instance carries ``url`` (never with credentials), ``status`` (the HTTP status, for
:class:`HttpStatusError`), ``is_transient`` (whether trying again later may succeed) and
``kind`` (a short name, as the Rust core's ``ErrorKind``). They pickle, so they cross
``multiprocessing`` boundaries intact.
"""

from typing import Any, Optional, Tuple

__all__ = [
    "CacheError",
    "InvalidUrlError",
    "HttpStatusError",
    "NotFoundError",
    "NetworkError",
    "DownloadTimeoutError",
    "IncompleteDownloadError",
    "ChecksumMismatchError",
    "TooLargeError",
    "StorageFullError",
    "CacheIOError",
    "ConfigError",
    "LockedError",
    "NotCachedError",
    "ShutdownError",
    "InternalError",
]


class CacheError(Exception):
    """A cache operation failed. The base of every imgcache exception."""

    kind = "other"

    def __init__(
        self,
        message: str,
        url: Optional[str] = None,
        status: Optional[int] = None,
        is_transient: bool = False,
        kind: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status = status
        self.is_transient = is_transient
        if kind is not None:
            self.kind = kind

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return (
            type(self),
            (self.message, self.url, self.status, self.is_transient, self.kind),
        )

    def __str__(self) -> str:
        return self.message


class InvalidUrlError(CacheError, ValueError):
    """The URL cannot be parsed, is not http(s), is relative with no image server, or
    escapes the image server's path."""

    kind = "invalid_url"


class HttpStatusError(CacheError):
    """The origin answered with a status other than 2xx (``status`` holds it)."""

    kind = "http_status"


class NotFoundError(HttpStatusError, FileNotFoundError, LookupError):
    """The origin has no such file (404 or 410): also a :class:`FileNotFoundError` (with
    ``errno`` ``ENOENT`` and ``filename`` the URL) and a :class:`LookupError`, as a missing
    file or key is elsewhere in Python."""

    kind = "http_status"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import errno

        self.errno = errno.ENOENT
        self.filename = self.url


class NetworkError(CacheError, ConnectionError):
    """The connection failed, was reset, or timed out."""

    kind = "network"


class DownloadTimeoutError(NetworkError, TimeoutError):
    """The call's ``timeout=`` passed before its file was there. The download goes on: a
    later call joins it, or finds the file. Also a :class:`TimeoutError`."""

    kind = "network"


class IncompleteDownloadError(CacheError):
    """The body was shorter or longer than its Content-Length."""

    kind = "incomplete"


class ChecksumMismatchError(CacheError):
    """The SHA-256 of the bytes differs from ``expected_sha256``; nothing was cached."""

    kind = "checksum_mismatch"


class TooLargeError(CacheError):
    """The file is larger than the cache's size cap (or its per-file limit)."""

    kind = "too_large"


class StorageFullError(CacheError, OSError):
    """The disk is full."""

    kind = "storage_full"


class CacheIOError(CacheError, OSError):
    """Another local I/O failure in the cache directory."""

    kind = "io"


class ConfigError(CacheError, ValueError):
    """A setting is invalid; the message names it."""

    kind = "config"


class LockedError(CacheError):
    """Another process holds the cache directory exclusively (``CACHE_LOCK=exclusive``)."""

    kind = "locked"


class NotCachedError(CacheError, LookupError):
    """Offline mode, and the file is not cached."""

    kind = "not_cached"


class ShutdownError(CacheError):
    """The cache was closed."""

    kind = "shutdown"


class InternalError(CacheError):
    """A bug in imgcache: please report it with the message."""

    kind = "internal"
