"""The asyncio path and the pinned form."""

import asyncio
import os

import pytest

import imgcache
from imgcache import ImageCacheManager

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


def test_a_returned_path_is_held_for_hold_seconds(origin, cache_dir):
    urls = [origin.route(f"h{i}.nii.gz", Route(volume(10 + i, MB))) for i in range(2)]
    m = ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=1.5, hold_seconds=60)
    first = m.get_file(urls[0])
    second = m.get_file(urls[1])
    # Over the cap, but both were handed out within the last minute: neither is removed.
    assert first.exists() and second.exists()
    assert m.get_stats()["entries_count"] == 2
    loose = ImageCacheManager(cache_dir=cache_dir / "loose", max_cache_size_mb=1.5, hold_seconds=0)
    loose.get_file(urls[0])
    loose.get_file(urls[1])
    assert loose.get_stats()["entries_count"] == 1, "without holds the cap applies at once"
