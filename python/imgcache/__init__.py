"""imgcache: a local disk cache for large remote files (NIfTI volumes), on a Rust core.

The original ``ImageCacheManager`` API, unchanged in its names, signatures and defaults::

    from imgcache import ImageCacheManager, get_cached_file, show_cache_controls

    path = get_cached_file("http://images.example/ct/0042.nii.gz")   # a pathlib.Path

Simultaneous requests for one file (threads, asyncio tasks, processes on one cache
directory) share one download; every file is hashed with SHA-256 while it streams and
committed atomically; entries expire after a TTL; least recently used files are evicted to
honour the size cap; statistics survive restarts. Configuration comes from the arguments,
else the environment (``IMAGE_SERVER``, ``CACHE_DIR``, ``CACHE_MAX_SIZE_MB``,
``CACHE_DEFAULT_TTL_HOURS``, ...), else a ``.env`` file, found as python-dotenv's
``find_dotenv`` finds it: in the directory of the script that makes the manager or in one
above it (so ``streamlit run app/app.py`` from anywhere finds ``app/.env`` or ``./.env``),
else in the current directory.
"""

import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Generator,
    List,
    Optional,
    Protocol,
    TypedDict,
    Union,
    cast,
)

from . import _errors, _fork, _native
from ._stream import FileReader
from ._errors import *  # noqa: F403 - the exception classes, listed in _errors.__all__
from ._native import CachedFile, ManualClock

__all__ = [
    "ImageCacheManager",
    "CacheEntry",
    "CachedFile",
    "FileReader",
    "ManualClock",
    "get_cache_manager",
    "get_file",
    "get_cached_file",
    "aget_cached_file",
    "clear_cache",
    "get_cache_stats",
    "CacheStats",
    "CleanupReport",
    "show_cache_controls",
    "streamlit_progress",
    "Progress",
    *_errors.__all__,
]

__version__ = "0.1.0"

# A library's logger: records go wherever the application sends them (the original design
# printed "Cached file: ..." at INFO; so does this, under "imgcache.core").
logging.getLogger("imgcache").addHandler(logging.NullHandler())

_MB = 1024 * 1024
StrPath = Union[str, "os.PathLike[str]"]


class _ProgressBar(Protocol):
    """What ``progress=`` takes besides a callable: a tqdm-like bar."""

    def update(self, n: int) -> Any: ...


#: What ``progress=`` takes: a callable ``(bytes_done, total_or_None)``, or a tqdm-like bar
#: (an object with ``update(n)``; its ``total`` is set when the length is known).
Progress = Union[Callable[[int, Optional[int]], Any], _ProgressBar]


def _reporter(progress: Optional[Progress]) -> Optional[Callable[[int, Optional[int]], Any]]:
    """``progress`` as the callable the core calls: a tqdm-like bar is updated by the bytes
    that arrived since the last report (and reset when a download starts again)."""
    if progress is None:
        return None
    bar = progress
    if not hasattr(bar, "update"):
        return cast(Callable[[int, Optional[int]], Any], progress)
    shown = [0]

    def report(done: int, total: Optional[int]) -> None:
        b: Any = bar
        if total is not None and getattr(b, "total", None) != total:
            try:
                b.total = total
            except AttributeError:
                pass
        if done < shown[0]:
            if hasattr(b, "reset"):
                b.reset(total=total)
            shown[0] = 0
        if done > shown[0]:
            b.update(done - shown[0])
            shown[0] = done

    return report


class _FromEnvironment(int):
    """A default the environment overrides: it shows (in ``help`` and ``inspect.signature``)
    as the original design's number, and is told apart from that number given explicitly."""


def _dotenv(given: Optional["StrPath"]) -> Optional[str]:
    """The ``.env`` file to read: ``given`` (which must exist), else the first ``.env`` in
    the directory of the code that called into imgcache or above it, else ``None`` (the
    core then reads ``.env`` in the current directory, as the command line does)."""
    if given is not None:
        if not os.path.isfile(given):
            raise ConfigError(f"dotenv={os.fspath(given)!r}: no such file")  # noqa: F405
        return os.fspath(given)
    start = _callers_dir()
    if start is None:
        return None
    # Upward no further than the home directory, and only through directories and files
    # that nobody else could have written: a .env planted in /tmp by another user must not
    # name the image server, or the token file whose first line is sent to it.
    home = os.path.realpath(os.path.expanduser("~"))
    here = os.path.realpath(start)
    while True:
        if not _ours(here):
            return None
        candidate = os.path.join(here, ".env")
        if os.path.isfile(candidate):
            return candidate if _ours(candidate) else None
        parent = os.path.dirname(here)
        if parent == here or here == home:
            return None
        here = parent


def _ours(path: str) -> bool:
    """Whether only this user (or root) could have written ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid in (os.getuid(), 0) and not st.st_mode & 0o022


def _callers_dir() -> Optional[str]:
    """The directory of the first frame outside this package (the application's script),
    or ``None`` in an interactive session, as python-dotenv's ``find_dotenv``."""
    main = sys.modules.get("__main__")
    if main is None or not hasattr(main, "__file__"):
        # A REPL or a notebook: its cells' files are temporary.
        return None
    package = os.path.dirname(os.path.abspath(__file__))
    # Frames of the standard library and installed packages (an executor, a pool, a
    # Streamlit callback calling into imgcache) are not the application's.
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    roots.update(p for p in sys.path if "site-packages" in p or "dist-packages" in p)
    libraries = tuple(
        os.path.realpath(p).rstrip(os.sep) + os.sep
        for p in roots
        if p and os.path.realpath(p) != os.sep
    )
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<"):
            where = os.path.dirname(os.path.abspath(name))
            if where != package and not os.path.realpath(where + os.sep).startswith(libraries):
                return where
        frame = frame.f_back
    return None


class CacheStats(TypedDict):
    """What :meth:`ImageCacheManager.get_stats` returns: a plain ``dict`` with these keys
    (for editors and type checkers; the original design's keys first)."""

    hit_rate: float
    entries_count: int
    current_size_mb: float
    max_size_mb: float
    total_downloads: int
    total_bytes_cached: int
    cache_dir: str
    #: The share of requests that caused no download (hits and shared downloads).
    reuse_rate: float
    hits: int
    misses: int
    coalesced_waits: int
    bytes_downloaded: int
    bytes_served_from_cache: int
    evictions: int
    expirations: int
    integrity_failures: int
    errors: int
    revalidations: int
    stale_served: int
    retries: int
    resumes: int
    lock_timeouts: int
    shared_hits: int
    shared_uploads: int
    shared_errors: int
    records_refused: int
    not_stored: int
    current_size_bytes: int
    max_size_bytes: int
    reserved_bytes: int
    pinned_entries: int
    downloads_in_progress: int
    default_ttl_hours: float
    shared_tier: Optional[str]
    shared_tier_state: Optional[str]
    request_headers: List[str]


class CleanupReport(TypedDict):
    """What :meth:`ImageCacheManager.cleanup` returns."""

    expired: int
    evicted: int
    bytes_freed: int
    #: Expired files left because a caller holds them; they go when it lets go.
    kept_in_use: int


class _OpenLater:
    """What :meth:`ImageCacheManager.aopen` returns: awaited, the :class:`CachedFile`; as an
    async context manager, the file pinned for the block and let go after it."""

    def __init__(self, opening: Awaitable[CachedFile]) -> None:
        self._opening = opening
        self._file: Optional[CachedFile] = None

    def __await__(self) -> Generator[Any, None, CachedFile]:
        return self._opening.__await__()

    async def __aenter__(self) -> CachedFile:
        self._file = await self._opening
        return self._file

    async def __aexit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


_DEFAULT_SIZE_MB = _FromEnvironment(1024)
_DEFAULT_TTL_HOURS = _FromEnvironment(24)


@dataclass(frozen=True)
class CacheEntry:
    """One cached file, with the fields of the original design's ``CacheEntry``."""

    url: str
    local_path: str
    file_size: int
    created_at: float
    last_accessed: float
    access_count: int
    content_hash: str
    ttl_seconds: int
    expires_at: float
    pinned: bool

    def is_expired(self) -> bool:
        import time

        return time.time() >= self.expires_at


class ImageCacheManager:
    """A cache of remote files on local disk.

    ``cache_dir`` defaults to ``CACHE_DIR``, else ``~/.cache/vista3d``;
    ``max_cache_size_mb`` to ``CACHE_MAX_SIZE_MB``, else 1024; ``default_ttl_hours`` to
    ``CACHE_DEFAULT_TTL_HOURS``, else 24; ``image_server_url`` (which relative URLs resolve
    against) to ``IMAGE_SERVER``. An argument given wins over the environment, which wins
    over ``.env``.

    Beyond the original: ``offline`` serves only what is cached; ``hold_seconds`` (10, at
    most a day) is how long a path that :meth:`get_file` returns stays readable whatever
    other calls do, in any process: :meth:`clear_cache`, :meth:`invalidate`,
    :meth:`cleanup` and a smaller size cap remove the entry at once and its file when the
    hold ends, so that a reader that reopens the path lazily (``nib.load(path)``, then
    ``img.dataobj[...]``) finds it. Holds are a courtesy: together they keep at most half
    the size cap (and 64 files), and a newer hold beyond that lets the oldest go early. For
    a reader that lives longer, pin the file for as long as it needs it::

        with cache.open(url) as f:
            img = nib.load(f.path)
            data = img.get_fdata()
 ``dotenv`` names another ``.env`` file (one that does not exist is a
    :class:`ConfigError`); without it, the first ``.env`` in the calling script's directory or
    above is read, as python-dotenv's ``find_dotenv`` finds it. ``clock`` (a
    :class:`ManualClock`) lets a test move time on by hand.

    A forked child (``multiprocessing`` with "fork") uses the manager as it was at the fork,
    settings changed since its creation included: it opens the cache again on first use.
    """

    def __init__(
        self,
        cache_dir: Optional[StrPath] = None,
        max_cache_size_mb: Optional[float] = _DEFAULT_SIZE_MB,
        default_ttl_hours: Optional[float] = _DEFAULT_TTL_HOURS,
        image_server_url: Optional[str] = None,
        *,
        offline: Optional[bool] = None,
        hold_seconds: float = 10.0,
        dotenv: Optional[StrPath] = None,
        clock: Optional[ManualClock] = None,
    ) -> None:
        self._cache = _native.Cache(
            cache_dir=None if cache_dir is None else str(cache_dir),
            max_size_bytes=None
            if max_cache_size_mb is None or max_cache_size_mb is _DEFAULT_SIZE_MB
            else int(max_cache_size_mb * _MB),
            default_ttl_seconds=None
            if default_ttl_hours is None or default_ttl_hours is _DEFAULT_TTL_HOURS
            else float(default_ttl_hours) * 3600.0,
            image_server=image_server_url,
            offline=offline,
            hold_seconds=hold_seconds,
            dotenv=_dotenv(dotenv),
            clock=clock,
        )
        _fork.track(self._cache)
        # The hot path, bound once: ImageCacheManager.get_file is this plus one call.
        self._get = self._cache.get

    # -- the original API -------------------------------------------------------------------

    def get_file(
        self,
        url: str,
        ttl_seconds: Optional[float] = None,
        *,
        expected_sha256: Optional[str] = None,
        timeout: Optional[float] = None,
        progress: Optional[Progress] = None,
        uncached_if_too_large: bool = False,
    ) -> Path:
        """The local path of ``url``: from the cache if it is there and fresh, else
        downloaded (once, however many threads and processes ask at the same time).

        ``ttl_seconds`` is the TTL of a new entry and the oldest a cached one may be;
        ``expected_sha256`` refuses bytes with another digest (:class:`ChecksumMismatchError`).
        ``timeout`` is the most seconds this call waits (then
        :class:`DownloadTimeoutError`, also a ``TimeoutError``; the download goes on, and a
        later call joins it). ``progress`` is told of a download's bytes as they arrive: a
        callable ``(bytes_done, total_or_None)`` or a tqdm-like bar, called on this thread
        about ten times a second at most and once at the end; a hit calls nothing (see
        :func:`streamlit_progress`); it must not call into imgcache.
        ``uncached_if_too_large``: a file larger than the whole size cap is downloaded and
        handed out uncached, with a ``UserWarning`` (it is deleted when the hold ends: prefer
        :meth:`open`), instead of :class:`TooLargeError`.
        Raises a :class:`CacheError` subclass on failure."""
        if timeout is None and progress is None and not uncached_if_too_large:
            return self._get(url, ttl_seconds, expected_sha256)
        return self._cache.get(
            url,
            ttl_seconds,
            expected_sha256,
            timeout=timeout,
            progress=_reporter(progress),
            uncached_if_too_large=uncached_if_too_large,
        )

    def get_cached_file(self, url: str, ttl_seconds: Optional[float] = None) -> Optional[Path]:
        """The local path of ``url`` if it is cached and fresh (younger than
        ``ttl_seconds`` when given), else ``None``. Never touches the network.

        Not the module-level :func:`get_cached_file`, which downloads (as in the original
        design, where that function calls ``get_file``)."""
        return self._cache.get_cached(url, ttl_seconds)

    def download_and_cache(
        self,
        url: str,
        ttl_seconds: Optional[float] = None,
        *,
        expected_sha256: Optional[str] = None,
        timeout: Optional[float] = None,
        progress: Optional[Progress] = None,
    ) -> Path:
        """As in the original, downloads ``url`` and caches it, replacing what is cached
        (the original's :meth:`get_file` called it on a miss; call :meth:`get_file` for the
        cached copy). A download of ``url`` already running is joined, not repeated.
        ``timeout`` and ``progress`` as in :meth:`get_file`."""
        return self._cache.get(
            url, ttl_seconds, expected_sha256, True, timeout=timeout, progress=_reporter(progress)
        )

    def invalidate(self, url: str) -> bool:
        """Removes ``url``'s entry; returns whether there was one. A file that someone holds
        (a path :meth:`get_file` returned within ``hold_seconds``, :meth:`open`, another
        process) is deleted when it is let go of; the next :meth:`get_file` downloads it
        again."""
        return self._cache.invalidate(url)

    def clear_cache(self) -> int:
        """Removes every entry; returns how many there were. Held files (see
        ``hold_seconds`` and :meth:`open`) are deleted when let go of. The statistics are
        kept (they belong to the cache directory, which other processes share); see
        :meth:`reset_stats`."""
        return self._cache.clear()

    def get_stats(self) -> CacheStats:
        """The figures: the original keys (``hit_rate`` from 0.0 to 1.0, ``entries_count``,
        ``current_size_mb``, ``max_size_mb``, ``hits``, ``misses``, ``evictions``,
        ``total_downloads``, ``total_bytes_cached``, ``cache_dir``) and the rest of the
        Rust core's (``downloads_in_progress``, ``coalesced_waits``, ...), among them
        ``reuse_rate``: the share of requests that caused no download (hits, and requests
        that shared a download another one started), beside ``hit_rate``."""
        stats = self._cache.stats()
        stats["total_bytes_cached"] = stats["bytes_downloaded"]
        return cast(CacheStats, stats)

    def cleanup(self) -> CleanupReport:
        """Removes every expired entry that nobody holds and enforces the size cap now. (A
        background task does it every minute too, but keeps an expired copy for a grace
        period, 7 days by default, for offline use and outages; this call keeps none.)
        Returns ``{"expired": n, "evicted": n, "bytes_freed": n, "kept_in_use": n}``:
        ``kept_in_use`` counts the expired files still held (a path handed out within
        ``hold_seconds``, an ``open()``, another process); they go when let go of."""
        return cast(CleanupReport, self._cache.cleanup())

    # -- beyond the original ------------------------------------------------------------------

    def aget_file(
        self,
        url: str,
        ttl_seconds: Optional[float] = None,
        *,
        expected_sha256: Optional[str] = None,
    ) -> Awaitable[Path]:
        """:meth:`get_file` for asyncio: ``path = await cache.aget_file(url)``. Cancelling the
        await leaves the download running for everyone else."""
        return self._cache.aget(url, ttl_seconds, expected_sha256)

    def open(
        self,
        url: str,
        ttl_seconds: Optional[float] = None,
        *,
        expected_sha256: Optional[str] = None,
        timeout: Optional[float] = None,
        progress: Optional[Progress] = None,
        uncached_if_too_large: bool = False,
    ) -> CachedFile:
        """The file, pinned until closed: ``with cache.open(url) as f: nib.load(f)``.
        While the block runs no eviction, expiry, invalidate or clear (in any process)
        removes it. ``f`` is path-like (``os.fspath(f)``); ``f.path``, ``f.sha256``,
        ``f.size`` and ``f.status`` tell the rest. ``timeout``, ``progress`` and
        ``uncached_if_too_large`` as in :meth:`get_file` (an uncached file, ``f.status ==
        "not_stored"``, stays for the block and goes after it)."""
        return self._cache.open(
            url,
            ttl_seconds,
            expected_sha256,
            timeout=timeout,
            progress=_reporter(progress),
            uncached_if_too_large=uncached_if_too_large,
        )

    def open_stream(
        self,
        url: str,
        ttl_seconds: Optional[float] = None,
        *,
        expected_sha256: Optional[str] = None,
        buffer_size: int = 256 * 1024,
        uncached_if_too_large: bool = False,
    ) -> "io.BufferedReader":
        """The file's bytes as a file object, before its download ends: a NIfTI header can
        be read (``gzip.open(cache.open_stream(url)).read(352)``) while the rest is still
        arriving. Any number of readers share the one download, each at its own pace; reads
        end only after the file is committed, and a failed download raises its
        :class:`CacheError`, never a short read taken for the whole file. On a hit it reads
        the cached file. ``uncached_if_too_large``: a file larger than the size cap is read
        as it arrives and not kept."""
        stream = self._cache.stream(
            url, ttl_seconds, expected_sha256, uncached_if_too_large=uncached_if_too_large
        )
        return io.BufferedReader(FileReader(stream), buffer_size=buffer_size)

    def aopen(
        self,
        url: str,
        ttl_seconds: Optional[float] = None,
        *,
        expected_sha256: Optional[str] = None,
    ) -> "_OpenLater":
        """:meth:`open` for asyncio: ``f = await cache.aopen(url)``, or pinned for a block,
        ``async with cache.aopen(url) as f: ...``."""
        return _OpenLater(self._cache.aopen(url, ttl_seconds, expected_sha256))

    def refresh(
        self,
        url: str,
        *,
        expected_sha256: Optional[str] = None,
        timeout: Optional[float] = None,
        progress: Optional[Progress] = None,
    ) -> Path:
        """Downloads ``url`` again even if a fresh copy is cached, and replaces it: the Rust
        core's name for :meth:`download_and_cache`."""
        return self.download_and_cache(
            url, expected_sha256=expected_sha256, timeout=timeout, progress=progress
        )

    def verify(self, url: str) -> str:
        """Re-hashes ``url``'s file: ``"ok"``, ``"corrupt"`` (and removed) or
        ``"not_cached"``."""
        return self._cache.verify(url)

    def verify_all(self) -> Dict[str, Any]:
        """Re-hashes every file; corrupt ones are removed."""
        return self._cache.verify_all()

    def reset_stats(self) -> None:
        """Sets every counter to zero."""
        self._cache.reset_stats()

    def redacted(self, url: str) -> str:
        """``url`` as the cache shows it: without user-info, signing parameters redacted."""
        return self._cache.redacted(url)

    def close(self) -> None:
        """Saves the figures and closes the cache, after the downloads running in this
        process end; later calls raise :class:`ShutdownError`. Called for every open manager
        at interpreter exit, where it does not wait: a download nobody waits for any more
        (a Ctrl-C stopped its caller) stops, its part file kept, and the next process that
        asks for the file resumes it."""
        self._cache.close()

    def __enter__(self) -> "ImageCacheManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        # Leaving on Ctrl-C (or SystemExit): nobody waits for the downloads any more.
        if exc and exc[0] is not None and not issubclass(exc[0], Exception):
            self._cache.close(stop_downloads=True)
            return
        self.close()

    # -- the original attributes ------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        return self._cache.cache_dir

    @property
    def image_server_url(self) -> Optional[str]:
        return self._cache.image_server

    @property
    def max_cache_size_bytes(self) -> int:
        return self._cache.max_size_bytes

    @max_cache_size_bytes.setter
    def max_cache_size_bytes(self, value: int) -> None:
        """Applies at once: a smaller cap evicts what nobody holds now, and held files
        when let go of."""
        self._cache.set_max_size_bytes(int(value))

    @property
    def default_ttl_seconds(self) -> float:
        return self._cache.default_ttl_seconds

    @default_ttl_seconds.setter
    def default_ttl_seconds(self, value: float) -> None:
        """The TTL of entries downloaded from now on."""
        self._cache.set_default_ttl_seconds(float(value))

    @property
    def hold_seconds(self) -> float:
        return self._cache.hold_seconds

    @property
    def entries(self) -> Dict[str, CacheEntry]:
        """The cached files by URL, most recently used first (a snapshot)."""
        out: Dict[str, CacheEntry] = {}
        for e in self._cache.entries():
            out[e["url"]] = CacheEntry(
                url=e["url"],
                local_path=e["path"],
                file_size=e["size"],
                created_at=e["fetched_at_ms"] / 1000.0,
                last_accessed=e["last_access_ms"] / 1000.0,
                access_count=e["hits"],
                content_hash=e["sha256"],
                ttl_seconds=round((e["expires_at_ms"] - e["fetched_at_ms"]) / 1000.0),
                expires_at=e["expires_at_ms"] / 1000.0,
                pinned=e["pinned"],
            )
        return out

    def __repr__(self) -> str:
        return f"ImageCacheManager(cache_dir={str(self.cache_dir)!r})"


# -- the original module functions --------------------------------------------------------------

_manager: Optional[ImageCacheManager] = None
_manager_lock = threading.Lock()


def get_cache_manager() -> ImageCacheManager:
    """The process-wide manager, built from the environment on first use."""
    global _manager
    manager = _manager
    if manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = ImageCacheManager()
            manager = _manager
    return manager


def get_file(
    url: str,
    ttl_seconds: Optional[float] = None,
    *,
    timeout: Optional[float] = None,
    progress: Optional[Progress] = None,
) -> Path:
    """The local path of ``url`` through the process-wide manager, downloading it if
    needed: :meth:`ImageCacheManager.get_file` without a manager of one's own."""
    return get_cache_manager().get_file(url, ttl_seconds, timeout=timeout, progress=progress)


def get_cached_file(
    url: str,
    ttl_seconds: Optional[float] = None,
    *,
    timeout: Optional[float] = None,
    progress: Optional[Progress] = None,
) -> Path:
    """The local path of ``url`` through the process-wide manager, downloading it if needed
    (the original's module-level ``get_cached_file``, which calls ``get_file``; unlike the
    method :meth:`ImageCacheManager.get_cached_file`, which never downloads)."""
    return get_cache_manager().get_file(url, ttl_seconds, timeout=timeout, progress=progress)


def aget_cached_file(url: str, ttl_seconds: Optional[float] = None) -> Awaitable[Path]:
    """:func:`get_cached_file` for asyncio."""
    return get_cache_manager().aget_file(url, ttl_seconds)


def clear_cache() -> int:
    """Removes every entry of the process-wide manager."""
    return get_cache_manager().clear_cache()


def get_cache_stats() -> CacheStats:
    """The statistics of the process-wide manager (see :meth:`ImageCacheManager.get_stats`)."""
    return get_cache_manager().get_stats()


def show_cache_controls(
    manager: Optional[ImageCacheManager] = None, *, refresh_seconds: float = 3.0
) -> None:
    """The cache's sidebar in a Streamlit app: hit rate, files, size against the cap,
    downloads in progress, "Clear cache" and "Clean up expired" buttons, and the TTL and size
    cap, which apply at once. The figures re-run every ``refresh_seconds``. Needs the
    ``streamlit`` extra (``pip install 'imgcache-....whl[streamlit]'``, or ``pip install
    streamlit`` beside imgcache)."""
    from ._sidebar import show_cache_controls as show

    show(manager or get_cache_manager(), refresh_seconds=refresh_seconds)


def streamlit_progress(text: str = "Downloading") -> Callable[[int, Optional[int]], None]:
    """A ``progress=`` for a Streamlit app: a progress bar that appears when a download's
    first bytes arrive (a hit shows nothing), counts megabytes against the total, and goes
    when the file is there::

        path = imgcache.get_file(url, progress=imgcache.streamlit_progress("Loading CT"))

    Call it in the script's run (it draws where it is called, as ``st.progress`` does)."""
    from ._sidebar import streamlit_progress as make

    return make(text)

