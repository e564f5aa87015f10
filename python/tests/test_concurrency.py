"""Threads, processes and forks on one cold URL: one origin GET; the GIL is let go of."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import imgcache
from imgcache import ImageCacheManager

from conftest import Route, data_files, volume

MB = 1024 * 1024


def test_sixteen_threads_on_one_cold_url_make_one_get(origin, cache_dir):
    body = volume(1, 8 * MB)
    url = origin.route("t.nii.gz", Route(body, rate=40 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    barrier = threading.Barrier(16)
    paths, errors = [], []

    def one():
        barrier.wait()
        try:
            paths.append(m.get_file(url))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(paths) == 16 and len(set(paths)) == 1
    assert paths[0].read_bytes() == body
    assert origin.gets["t.nii.gz"] == 1
    # One download for sixteen requests: fifteen caused none, whether they hit or shared it.
    stats = m.get_stats()
    assert stats["reuse_rate"] == 15 / 16
    assert stats["hit_rate"] <= stats["reuse_rate"]


def test_a_download_lets_other_python_threads_run(origin, cache_dir):
    url = origin.route("slow.nii.gz", Route(volume(2, 2 * MB), rate=8 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    done = threading.Event()
    spins = [0]

    def spin():
        while not done.is_set():
            spins[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    started = time.perf_counter()
    m.get_file(url)
    took = time.perf_counter() - started
    done.set()
    t.join()
    # About 0.25 s of download: a thread starved of the GIL would count nearly nothing.
    assert took > 0.1
    assert spins[0] > 10_000


def _child_get(cache_dir, url, queue):
    m = ImageCacheManager(cache_dir=cache_dir)
    path = m.get_file(url)
    queue.put((str(path), path.stat().st_size))


def test_four_spawned_processes_on_one_cold_url_make_one_get(origin, cache_dir):
    body = volume(3, 16 * MB)
    url = origin.route("p.nii.gz", Route(body, rate=16 * MB))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child_get, args=(str(cache_dir), url, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({path for path, _ in results}) == 1
    assert all(size == len(body) for _, size in results)
    assert origin.gets["p.nii.gz"] == 1
    stats = ImageCacheManager(cache_dir=cache_dir).get_stats()
    assert stats["total_downloads"] == 1


def _forked_child(manager, url_b, ready, go_on, out):
    # The handle was made by the parent: it re-opens here on first use.
    path = manager.get_file(url_b)
    locks = [
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if imgcache._fork._holds_flock(fd)
    ]
    out.put((str(path), locks, os.getpid()))
    ready.set()
    go_on.wait(60)


def test_a_forked_child_never_keeps_the_parents_locks(origin, cache_dir):
    url_a = origin.route("a.nii.gz", Route(volume(4, MB)))
    url_b = origin.route("b.nii.gz", Route(volume(5, MB)))
    m = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)
    ctx = multiprocessing.get_context("fork")
    ready, go_on, out = ctx.Event(), ctx.Event(), ctx.Queue()
    with m.open(url_a) as held:
        child = ctx.Process(target=_forked_child, args=(m, url_b, ready, go_on, out))
        child.start()
        try:
            path_b, child_locks, child_pid = out.get(timeout=60)
            assert ready.wait(60)
            assert path_b.endswith("b.nii.gz")
            assert str(held.path) not in child_locks, "the parent's pin stayed in the parent"
            records = [p for p in child_locks if "/v1/procs/" in p]
            assert len(records) == 1, child_locks
            assert os.path.basename(records[0]).startswith(f"{child_pid}-"), (
                "the child's own record, not the parent's"
            )
            assert len([p for p in child_locks if p.endswith("/v1/lock")]) == 1
        except BaseException:
            go_on.set()
            raise
    # The parent lets go of a while the child (which inherited its descriptor) lives: a
    # lock the child kept would keep the file from being removed.
    try:
        assert m.invalidate(url_a)
        assert not held.path.exists()
        assert m.get_file(url_b).read_bytes() == volume(5, MB)
        assert origin.gets["b.nii.gz"] == 1, "the child's download is the parent's hit"
    finally:
        go_on.set()
        child.join(60)
    assert child.exitcode == 0


# The parent's CachedFile, reached in the child through this list rather than through the
# Process's arguments, so that the child can let go of the last reference and run its drop.
_INHERITED: list = []


def _report_after_fork(manager, user_fd, out):
    try:
        pinned = _INHERITED.pop()
        stats = manager.get_stats()
        try:
            os.fstat(user_fd)
            user_fd_open = True
        except OSError:
            user_fd_open = False
        out.put(
            {
                "max_size_mb": stats["max_size_mb"],
                "ttl": manager.default_ttl_seconds,
                "cache_dir": str(manager.cache_dir),
                "pinned_closed": pinned.closed,
                "pinned_readable": pinned.path.exists(),
                "user_fd_open": user_fd_open,
            }
        )
        pinned.close()  # the parent's pin: nothing to do here, and no hang
        del pinned  # the last reference: the inherited object is dropped here
        import gc

        gc.collect()
        out.put("dropped")
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(repr(e))


def test_a_forked_child_has_the_settings_of_the_moment_and_not_the_parents_pins(
    origin, cache_dir, monkeypatch
):
    import fcntl

    url = origin.route("f.nii.gz", Route(volume(6, MB)))
    m = ImageCacheManager(cache_dir=cache_dir)
    m.max_cache_size_bytes = 300 * MB
    m.default_ttl_seconds = 600
    # What the environment says after the manager was made is not what the child opens.
    monkeypatch.setenv("CACHE_DIR", str(cache_dir / "elsewhere"))
    monkeypatch.setenv("CACHE_MAX_SIZE_MB", "7")
    # The application's own lock beside the cache: the child keeps it.
    user_lock = open(cache_dir / "app.lock", "w")
    fcntl.flock(user_lock, fcntl.LOCK_EX)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    other = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)
    with m.open(url) as pinned:
        _INHERITED.append(pinned)
        try:
            child = ctx.Process(target=_report_after_fork, args=(m, user_lock.fileno(), out))
            child.start()
        finally:
            _INHERITED.clear()
        report = out.get(timeout=60)
        dropped = out.get(timeout=60)
        child.join(60)
        # The child closed and dropped its copy and exited: the parent's pin still holds
        # against a cap that would remove everything else.
        other.max_cache_size_bytes = 1
        assert pinned.path.read_bytes() == volume(6, MB)
    user_lock.close()
    assert child.exitcode == 0, report
    assert dropped == "dropped"
    assert report == {
        "max_size_mb": 300.0,
        "ttl": 600.0,
        "cache_dir": str(cache_dir),
        "pinned_closed": True,
        "pinned_readable": True,
        "user_fd_open": True,
    }
    assert not (cache_dir / "elsewhere").exists()
    # Let go of by the parent, the cap applies: at once by this cleanup, or by the parent
    # within its save interval when the other handle met the file still locked.
    deadline = time.monotonic() + 10
    while pinned.path.exists() and time.monotonic() < deadline:
        other.cleanup()
        time.sleep(0.02)
    assert not pinned.path.exists(), "let go of by the parent, the cap applies"


_pool_manager = None


def _pool_get(url):
    return str(_pool_manager.get_file(url))


def test_the_counts_of_forked_pool_workers_reach_the_parent(origin, cache_dir):
    # Workers of a fork Pool leave through os._exit: they must not take their counts along.
    global _pool_manager
    urls = [origin.route(f"p{i}.nii.gz", Route(volume(40 + i, 100_000))) for i in range(2)]
    _pool_manager = ImageCacheManager(cache_dir=cache_dir)
    try:
        ctx = multiprocessing.get_context("fork")
        pool = ctx.Pool(2)
        try:
            paths = pool.map(_pool_get, urls + urls, chunksize=1)
        finally:
            pool.close()
            pool.join()
        assert len(set(paths)) == 2
        stats = _pool_manager.get_stats()
        assert stats["hits"] + stats["misses"] == 4, stats
        assert stats["total_downloads"] == 2, stats
        assert stats["bytes_downloaded"] == 200_000, stats
        # Hits alone save nothing as they happen: the workers' exit does.
        pool = ctx.Pool(2)
        try:
            pool.map(_pool_get, urls + urls, chunksize=1)
        finally:
            pool.close()
            pool.join()
        after = _pool_manager.get_stats()
        assert after["hits"] == stats["hits"] + 4, after
        assert after["total_downloads"] == 2, after
    finally:
        _pool_manager = None


def _child_downloading(code, cache_dir, url, at_least):
    """A Python child running `code` (argv: cache_dir, url), once `at_least` bytes of its
    download are in a part file; and a function that counts the part files' bytes."""
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(cache_dir), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tmp = cache_dir / "v1" / "tmp"

    def part_bytes():
        parts = list(tmp.glob("*.part")) if tmp.exists() else []
        return sum(p.stat().st_size for p in parts)

    deadline = time.monotonic() + 60
    while part_bytes() < at_least:
        assert time.monotonic() < deadline, "the download never started"
        assert child.poll() is None, child.communicate()
        time.sleep(0.01)
    return child, part_bytes


def test_ctrl_c_exits_at_once_and_keeps_the_part_file(origin, cache_dir):
    # 8 MB at 256 KB/s: the download alone has half a minute to go when Ctrl-C comes.
    url = origin.route("slow.nii.gz", Route(volume(30, 8 * MB), etag='"v1"', rate=256 * 1024))
    code = (
        "import sys, imgcache\n"
        "imgcache.ImageCacheManager(cache_dir=sys.argv[1]).get_file(sys.argv[2])\n"
    )
    child, part_bytes = _child_downloading(code, cache_dir, url, 512 * 1024)
    child.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = child.communicate(timeout=60)
    took = time.monotonic() - sent
    assert b"KeyboardInterrupt" in err, err
    assert b"Exception ignored" not in err, err
    # Not the rest of the download (over 20 s): the exit does not wait for it.
    assert took < 10, f"{took:.1f} s to exit"
    assert part_bytes() >= 512 * 1024, "the part file is kept for a resume"


def test_ctrl_c_is_noticed_while_progress_reports_arrive(origin, cache_dir):
    # 60 MB at 20 MB/s: a progress report every 50 ms or so, faster than the 100 ms at which
    # Ctrl-C is checked; the download has seconds to go when Ctrl-C comes.
    url = origin.route("busy.nii.gz", Route(volume(31, 60 * MB), etag='"v1"', rate=20 * MB))
    code = (
        "import sys, imgcache\n"
        "m = imgcache.ImageCacheManager(cache_dir=sys.argv[1])\n"
        "m.get_file(sys.argv[2], progress=lambda done, total: None)\n"
    )
    child, part_bytes = _child_downloading(code, cache_dir, url, 4 * MB)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert b"KeyboardInterrupt" in err, err
    # Noticed while the reports came: the call did not run to the end of the download.
    assert data_files(cache_dir) == [], "the download ran to its end before Ctrl-C was seen"
    assert 4 * MB <= part_bytes() < 60 * MB, "the part file is kept for a resume"
