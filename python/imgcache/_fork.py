"""Forks and interpreter exit.

A child made by ``os.fork`` (``multiprocessing``'s "fork" start method, data-loader workers)
inherits the parent's file descriptors, and with them the parent's ``flock`` locks on the
cache directory: the lock that marks the parent alive, the locks that pin the files it holds,
the locks of its downloads. Closing a copy never releases a lock the parent still has open,
so the child closes every inherited descriptor that holds an ``flock`` on a file of a
cache directory's store (``<cache_dir>/v1/``, where the cache keeps its data and locks),
right after the fork. Descriptors of the application (a file it opened in the cache, a lock
of its own beside it) are left alone. The Rust side starts a fresh runtime and re-opens
each cache the first time the child uses it, and never drops what it inherited.

One race is left, and it is harmless: a parent thread that opens a lock file at the moment
of the fork and locks it just after leaves the child a descriptor that held no lock when the
child looked. The child then keeps that lock of the parent's alive until it exits: a file
the parent lets go of stays pinned, or a parent that died looks alive, that long. Nothing is
ever removed early because of it.
"""

import atexit
import os
import threading
import weakref
from typing import Set

from . import _native

# The stores (``<realpath of cache_dir>/v1``) of the caches opened in this process.
_dirs: Set[str] = set()
_dirs_lock = threading.Lock()
_caches: "weakref.WeakSet[_native.Cache]" = weakref.WeakSet()


def track(cache: "_native.Cache") -> None:
    """Remembers an open cache: its directory for forks, itself for exit."""
    store = os.path.join(os.path.realpath(str(cache.cache_dir)), "v1")
    with _dirs_lock:
        _dirs.add(store)
    _caches.add(cache)
    _close_at_worker_exit()


class _Hook:
    """What ``multiprocessing.util.register_after_fork`` holds (weakly) for this module."""


_hook = _Hook()
_hooked = False


def _close_at_worker_exit() -> None:
    """Makes every ``multiprocessing`` child close the caches when it ends: its workers
    leave through ``os._exit``, which runs no ``atexit`` handler, but they run
    ``multiprocessing``'s own finalizers first. Closing saves the child's counts and access
    times for the parent to read (each download's counts are saved when it ends anyway).
    A child made by "fork" gets the finalizer from an after-fork hook (``multiprocessing``
    clears the parent's finalizers in the child); one made by "spawn" or "forkserver" makes
    its caches itself, and gets it here."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    import multiprocessing
    import multiprocessing.util

    multiprocessing.util.register_after_fork(_hook, lambda _: _finalize_here())
    if multiprocessing.parent_process() is not None:
        _finalize_here()


def _finalize_here() -> None:
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _close_all, exitpriority=100)


def _holds_flock(fd: str) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            return any(line.startswith(b"lock:") and b"FLOCK" in line for line in info)
    except OSError:
        return False


def close_inherited_locks() -> int:
    """Closes the descriptors of this process that hold an flock below a tracked cache
    store; returns how many. Only ever run in a freshly forked child."""
    dirs = tuple(d.rstrip("/") + "/" for d in _dirs)
    if not dirs:
        return 0
    closed = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(dirs) and _holds_flock(fd):
            try:
                os.close(int(fd))
                closed += 1
            except OSError:
                pass
    return closed


def _after_fork_in_child() -> None:
    global _dirs_lock
    # The lock may have been held by a parent thread at the moment of the fork.
    _dirs_lock = threading.Lock()
    _native.forked()
    close_inherited_locks()


def _close_all() -> None:
    """At exit: closes every cache without waiting for the downloads nobody waits for any
    more (a Ctrl-C while one ran): they stop, their part files kept, and the next process
    that asks for the file resumes it."""
    for cache in list(_caches):
        try:
            cache.close(stop_downloads=True)
        except BaseException:  # noqa: BLE001 - exit must go on, a second Ctrl-C included
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all)
