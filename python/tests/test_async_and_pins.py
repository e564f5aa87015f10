"""The asyncio path and the pinned form."""

import asyncio
import os
import time

import pytest

import imgcache
from imgcache import ImageCacheManager, ManualClock

from conftest import Route, data_files, volume

MB = 1024 * 1024


def test_many_awaits_on_one_cold_url_share_one_download(origin, cache_dir):
    body = volume(1, 4 * MB)
    url = origin.route("a.nii.gz", Route(body, rate=40 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)

    async def main():
        return await asyncio.gather(*(m.aget_file(url) for _ in range(8)))

    paths = asyncio.run(main())
    assert len(set(paths)) == 1 and paths[0].read_bytes() == body
    assert origin.gets["a.nii.gz"] == 1
    assert m.get_stats()["coalesced_waits"] == 7


def test_a_cancelled_await_leaves_the_download_running(origin, cache_dir):
    body = volume(2, 3 * MB)
    url = origin.route("c.nii.gz", Route(body, rate=10 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)

    async def main():
        task = asyncio.ensure_future(m.aget_file(url))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await m.aget_file(url)

    path = asyncio.run(main())
    assert path.read_bytes() == body
    assert origin.gets["c.nii.gz"] == 1


def test_async_errors_are_the_same_classes(origin, cache_dir):
    m = ImageCacheManager(cache_dir=cache_dir)

    async def main():
        await m.aget_file(origin.url("missing.nii.gz"))

    with pytest.raises(imgcache.HttpStatusError) as e:
        asyncio.run(main())
    assert e.value.status == 404


def test_a_pinned_file_outlives_eviction_invalidate_and_clear(origin, cache_dir):
    body = volume(3, MB)
    url = origin.route("p.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)
    other = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)
    with m.open(url) as f:
        assert isinstance(f, os.PathLike)
        assert os.fspath(f) == str(f.path)
        assert f.size == MB and f.status == "downloaded" and f.sha256 == Route(body).sha256
        other.clear_cache()
        m.max_cache_size_bytes = 1
        assert f.path.read_bytes() == body, "held: nothing removed it"
        assert m.get_stats()["pinned_entries"] >= 1
    assert f.closed
    # Let go of, over the cap: the background sweeper, woken by the let-go, removes it (the
    # let-go itself evicts nothing: its caller may still be handing the path on).
    deadline = time.monotonic() + 10
    while f.path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not f.path.exists(), "removed once let go of"
    assert data_files(cache_dir) == []


def test_async_open_pins_too(origin, cache_dir):
    url = origin.route("q.nii.gz", Route(volume(4, 1000)))
    m = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)

    async def main():
        f = await m.aopen(url)
        m.invalidate(url)
        assert f.path.exists()
        f.close()
        return f

    f = asyncio.run(main())
    assert not f.path.exists()


def test_async_with_aopen_pins_for_the_block(origin, cache_dir):
    url = origin.route("w.nii.gz", Route(volume(5, 1000)))
    m = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)

    async def main():
        async with m.aopen(url) as f:
            m.invalidate(url)
            assert f.path.read_bytes() == volume(5, 1000)
        assert f.closed
        return f

    f = asyncio.run(main())
    assert not f.path.exists(), "let go after the block, the invalidated file went"


def test_the_module_level_get_file_downloads_through_the_process_wide_manager(
    origin, cache_dir, monkeypatch
):
    monkeypatch.setenv("CACHE_DIR", str(cache_dir))
    url = origin.route("m.nii.gz", Route(volume(6, 1000)))
    path = imgcache.get_file(url)
    assert path.read_bytes() == volume(6, 1000)
    assert imgcache.get_cache_manager().get_cached_file(url) == path


def test_a_returned_path_is_held_against_another_processs_cap(origin, cache_dir):
    body = volume(10, MB)
    url = origin.route("h.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir, hold_seconds=60)
    other = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)
    path = m.get_file(url)
    assert m._cache.held == (1, MB)
    # Another handle on the directory (a process, for the cache) shrinks the cap: the
    # path just handed out stays until the caller has had its chance to open it.
    other.max_cache_size_bytes = 1
    assert path.read_bytes() == body
    assert m.get_file(url) == path and m._cache.held == (1, MB), "renewed, not doubled"
    m.close()
    other.cleanup()
    assert not path.exists(), "let go of, the cap applies"
    assert data_files(cache_dir) == []


def test_holds_keep_at_most_half_the_cap_so_the_cap_holds(origin, cache_dir):
    # The default hold, and files that together are twice the cap.
    urls = [origin.route(f"c{i}.nii.gz", Route(volume(40 + i, MB))) for i in range(6)]
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=3, clock=clock)
    assert m.hold_seconds == 10.0
    for i, url in enumerate(urls):
        path = m.get_file(url)
        assert path.read_bytes() == volume(40 + i, MB)
        files, held = m._cache.held
        assert held <= 3 * MB // 2 or files == 1, (files, held)
        assert m.get_stats()["current_size_bytes"] <= 3 * MB
        assert len(data_files(cache_dir)) <= 3
    assert [origin.gets[f"c{i}.nii.gz"] for i in range(6)] == [1] * 6
    # A smaller cap applies at once to what is not held, and to the held paths when their
    # holds end.
    files, held = m._cache.held
    m.max_cache_size_bytes = 1
    assert len(data_files(cache_dir)) == files and held > 0
    clock.advance(10)
    wait_for(lambda: data_files(cache_dir) == [])
    assert m._cache.held == (0, 0)


def test_invalidate_under_another_spelling_removes_the_file_when_its_hold_ends(
    origin, cache_dir
):
    url = origin.route("s.nii.gz", Route(volume(11, 1000)))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, clock=clock)
    path = m.get_file(url)
    spelled = url.replace("http://", "HTTP://").replace("/s.nii.gz", "/./s.nii.gz")
    assert m.invalidate(spelled) is True
    assert m.get_cached_file(url) is None
    assert path.read_bytes() == volume(11, 1000), "readable for its hold"
    clock.advance(10)
    wait_for(lambda: not path.exists())
    assert m._cache.held == (0, 0)
    assert m.get_file(url) != path and origin.gets["s.nii.gz"] == 2


def test_a_refreshed_url_keeps_the_hold_on_the_older_file(origin, cache_dir):
    url = origin.route("v.nii.gz", Route(volume(12, 1000)))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, clock=clock)
    old = m.get_file(url)
    origin.routes["v.nii.gz"] = Route(volume(13, 2000))
    new = m.download_and_cache(url)
    assert new != old and new.read_bytes() == volume(13, 2000)
    # The caller of the first get may not have opened its path yet.
    assert old.read_bytes() == volume(12, 1000)
    assert m._cache.held == (2, 3000)
    m.cleanup()
    assert old.exists(), "a cleanup leaves held paths"
    clock.advance(10)
    wait_for(lambda: not old.exists())
    assert new.exists()


def test_an_async_call_without_an_event_loop_takes_nothing(origin, cache_dir):
    url = origin.route("n.nii.gz", Route(volume(14, 1000)))
    m = ImageCacheManager(cache_dir=cache_dir)
    m.get_file(url)
    before = m.get_stats()["hits"]
    with pytest.raises(RuntimeError):
        m.aget_file(url)  # not awaited inside a running loop: refused at once
    with pytest.raises(RuntimeError):
        m.aopen(url)
    assert m.get_stats()["hits"] == before, "no hit was taken for a future never made"


def wait_for(condition, seconds: float = 10.0) -> None:
    """Holds end on the hold clock's next tick (a real-time timer): wait for it, bounded."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()
