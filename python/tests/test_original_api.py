"""Every call of the original ImageCacheManager design, its return types and its stats keys."""

import hashlib
import inspect
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import imgcache
from imgcache import CacheEntry, ImageCacheManager, ManualClock

from conftest import Route, data_files, volume

MB = 1024 * 1024
ORIGINAL_STATS_KEYS = {
    "entries_count",
    "current_size_mb",
    "max_size_mb",
    "hit_rate",
    "hits",
    "misses",
    "evictions",
    "total_downloads",
    "total_bytes_cached",
    "cache_dir",
}


def test_the_original_signatures_and_defaults(cache_dir, monkeypatch):
    shown = inspect.signature(ImageCacheManager)
    assert list(shown.parameters)[:4] == [
        "cache_dir",
        "max_cache_size_mb",
        "default_ttl_hours",
        "image_server_url",
    ]
    assert [shown.parameters[p].default for p in list(shown.parameters)[:4]] == [
        None,
        1024,
        24,
        None,
    ]
    assert "max_cache_size_mb: Optional[float] = 1024" in str(shown)
    assert "default_ttl_hours: Optional[float] = 24" in str(shown)
    # The defaults shown give way to the environment; the same numbers given do not.
    monkeypatch.setenv("CACHE_MAX_SIZE_MB", "64")
    monkeypatch.setenv("CACHE_DEFAULT_TTL_HOURS", "2")
    from_env = ImageCacheManager(cache_dir=cache_dir / "env")
    assert from_env.get_stats()["max_size_mb"] == 64.0
    assert from_env.default_ttl_seconds == 2 * 3600
    given = ImageCacheManager(cache_dir / "given", 1024, 24)
    assert given.get_stats()["max_size_mb"] == 1024.0
    assert given.default_ttl_seconds == 24 * 3600
    monkeypatch.delenv("CACHE_MAX_SIZE_MB")
    monkeypatch.delenv("CACHE_DEFAULT_TTL_HOURS")

    m = ImageCacheManager(cache_dir=cache_dir)
    stats = m.get_stats()
    assert stats["max_size_mb"] == 1024.0
    assert m.default_ttl_seconds == 24 * 3600
    assert m.max_cache_size_bytes == 1024 * MB
    assert m.cache_dir == cache_dir and isinstance(m.cache_dir, Path)
    # Positional, as the original was called.
    m2 = ImageCacheManager(str(cache_dir / "b"), 10, 2, "http://127.0.0.1:9/data/")
    assert m2.get_stats()["max_size_mb"] == 10.0
    assert m2.default_ttl_seconds == 2 * 3600
    assert m2.image_server_url == "http://127.0.0.1:9/data/"


def test_get_file_downloads_once_and_returns_a_path_with_the_bytes(origin, cache_dir):
    body = volume(1, 3 * MB)
    url = origin.route("ct/a.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir)

    first = m.get_file(url)
    assert isinstance(first, Path)
    assert first.name == "a.nii.gz"
    assert first.read_bytes() == body
    second = m.get_file(url)
    assert second == first
    assert origin.gets["ct/a.nii.gz"] == 1

    stats = m.get_stats()
    assert ORIGINAL_STATS_KEYS <= stats.keys()
    assert (stats["hits"], stats["misses"], stats["total_downloads"]) == (1, 1, 1)
    assert stats["hit_rate"] == 0.5
    assert stats["entries_count"] == 1
    assert stats["total_bytes_cached"] == len(body)
    assert stats["current_size_mb"] == pytest.approx(3.0)
    assert stats["cache_dir"] == str(cache_dir)
    assert isinstance(stats["hit_rate"], float) and isinstance(stats["entries_count"], int)
    # Mode 600, as the original stored them.
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o600


def test_get_cached_file_never_downloads(origin, cache_dir):
    url = origin.route("b.nii.gz", Route(volume(2, 1000)))
    m = ImageCacheManager(cache_dir=cache_dir)
    assert m.get_cached_file(url) is None
    assert origin.gets["b.nii.gz"] == 0
    path = m.get_file(url)
    assert m.get_cached_file(url) == path
    assert origin.gets["b.nii.gz"] == 1


def test_download_and_cache_downloads_even_when_cached(origin, cache_dir):
    url = origin.route("d.nii.gz", Route(volume(2, 1000)))
    m = ImageCacheManager(cache_dir=cache_dir)
    first = m.download_and_cache(url)
    assert isinstance(first, Path) and first.read_bytes() == volume(2, 1000)
    origin.routes["d.nii.gz"] = Route(volume(3, 1500))
    # As the original, which get_file called on a miss: a download, whatever is cached.
    again = m.download_and_cache(url)
    assert again.read_bytes() == volume(3, 1500)
    assert origin.gets["d.nii.gz"] == 2
    assert m.get_cached_file(url) == again


def test_ttl_seconds_is_the_oldest_a_cached_file_may_be(origin, cache_dir):
    url = origin.route("t.nii.gz", Route(volume(3, 1000)))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, clock=clock)
    m.get_file(url, ttl_seconds=60)
    clock.advance(30)
    assert m.get_cached_file(url) is not None
    assert m.get_cached_file(url, ttl_seconds=10) is None
    clock.advance(31)
    assert m.get_cached_file(url) is None, "past its own 60 s TTL"
    m.get_file(url)
    assert origin.gets["t.nii.gz"] == 2
    # The original's `ttl_seconds or default`: 0 means the default.
    assert m.get_cached_file(url, ttl_seconds=0) is not None
    with pytest.raises(ValueError):
        m.get_file(url, ttl_seconds=-1)


def test_refresh_downloads_again(origin, cache_dir):
    url = origin.route("r.nii.gz", Route(volume(4, 1000)))
    m = ImageCacheManager(cache_dir=cache_dir)
    m.get_file(url)
    origin.routes["r.nii.gz"] = Route(volume(5, 1200))
    fresh = m.refresh(url)
    assert fresh.read_bytes() == volume(5, 1200)
    assert origin.gets["r.nii.gz"] == 2


def test_invalidate_and_clear_cache_remove_the_files(origin, cache_dir):
    urls = [origin.route(f"{i}.nii.gz", Route(volume(10 + i, 2000))) for i in range(3)]
    m = ImageCacheManager(cache_dir=cache_dir)
    paths = [m.get_file(u) for u in urls]
    assert len(data_files(cache_dir)) == 3

    assert m.invalidate(urls[0]) is True
    assert m.invalidate(urls[0]) is False
    assert m.get_cached_file(urls[0]) is None

    assert m.clear_cache() == 2
    assert m.get_stats()["entries_count"] == 0
    m.get_file(urls[1])
    assert origin.gets["1.nii.gz"] == 2
    # The paths handed out stay for their hold (10 s): see test_returned_paths_stay_*.
    m.close()
    assert [p for p in paths if p.exists()] == []
    assert len(data_files(cache_dir)) == 1


def _wait_gone(path, seconds: float = 10.0) -> None:
    """Holds end on the hold clock's next tick (a real-time timer): wait for it, bounded."""
    import time

    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not path.exists(), f"{path} outlived its hold"


@pytest.mark.parametrize("remove", ["clear_cache", "invalidate", "cleanup", "max_size", "other"])
def test_returned_paths_stay_readable_for_their_hold(origin, cache_dir, remove):
    # nibabel reads a .nii.gz lazily, reopening it by path: p = get_file(u);
    # img = nib.load(p); clear_cache(); img.dataobj[...] must still read.
    body = volume(40, 3 * MB)
    url = origin.route("lazy.nii.gz", Route(body))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, default_ttl_hours=1, clock=clock, hold_seconds=30)
    path = m.get_file(url)
    if remove == "clear_cache":
        assert m.clear_cache() == 1
    elif remove == "invalidate":
        assert m.invalidate(url) is True
    elif remove == "cleanup":
        clock.advance(3600 + 1)
        assert m.cleanup() == {"expired": 0, "evicted": 0, "bytes_freed": 0, "kept_in_use": 1}
    elif remove == "max_size":
        m.max_cache_size_bytes = MB
    else:
        # Another tab's manager on the same directory clears it.
        other = ImageCacheManager(cache_dir=cache_dir, clock=clock, hold_seconds=0)
        assert other.clear_cache() == 1
        other.close()
    with open(path, "rb") as f:
        assert f.read() == body, "a returned path is readable for its hold time"
    clock.advance(31)
    _wait_gone(path)
    assert data_files(cache_dir) == []


def test_cleanup_removes_expired_files_by_the_clock(origin, cache_dir):
    url = origin.route("e.nii.gz", Route(volume(6, 5000)))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, default_ttl_hours=1, clock=clock, hold_seconds=0)
    path = m.get_file(url)
    assert m.cleanup() == {"expired": 0, "evicted": 0, "bytes_freed": 0, "kept_in_use": 0}
    # The background sweeper keeps an expired copy for a grace period (7 days by default);
    # an explicit cleanup removes it as soon as it expired, as the original design did.
    clock.advance(3600 + 1)
    report = m.cleanup()
    assert report == {"expired": 1, "evicted": 0, "bytes_freed": 5000, "kept_in_use": 0}
    assert not path.exists()
    assert m.get_stats()["expirations"] == 1


def test_cleanup_removes_held_expired_files_when_their_hold_ends(origin, cache_dir):
    url = origin.route("h.nii.gz", Route(volume(6, 5000)))
    fresh_url = origin.route("f.nii.gz", Route(volume(7, 5000)))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, default_ttl_hours=1, clock=clock, hold_seconds=600)
    path = m.get_file(url)
    clock.advance(3600 + 1)
    fresh = m.get_file(fresh_url)
    assert m.cleanup()["kept_in_use"] == 1
    assert path.exists(), "held: kept until the hold ends"
    # The hold's end wakes the background sweeper, which gives it no grace period.
    clock.advance(600)
    _wait_gone(path)
    assert m.get_stats()["expirations"] == 1
    assert fresh.exists()


def test_settings_apply_at_once(origin, cache_dir):
    urls = [origin.route(f"s{i}.nii.gz", Route(volume(20 + i, MB))) for i in range(3)]
    # Without holds: the paths handed out are not kept from the smaller cap.
    m = ImageCacheManager(cache_dir=cache_dir, hold_seconds=0)
    for u in urls:
        m.get_file(u)
    m.max_cache_size_bytes = 2 * MB
    assert m.max_cache_size_bytes == 2 * MB
    stats = m.get_stats()
    assert stats["entries_count"] == 2 and stats["evictions"] == 1
    assert len(data_files(cache_dir)) == 2
    assert m.get_cached_file(urls[0]) is None, "the least recently used went"

    m.default_ttl_seconds = 120
    assert m.default_ttl_seconds == 120
    fresh = origin.route("new.nii.gz", Route(volume(30, 10)))
    m.get_file(fresh)
    entry = m.entries[fresh]
    assert entry.ttl_seconds == 120
    with pytest.raises(imgcache.ConfigError):
        m.max_cache_size_bytes = 0


def test_entries_have_the_original_fields(origin, cache_dir):
    body = volume(7, 4321)
    url = origin.route("x.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir)
    path = m.get_file(url)
    m.get_file(url)
    entries = m.entries
    assert list(entries) == [url]
    e = entries[url]
    assert isinstance(e, CacheEntry)
    assert e.local_path == str(path)
    assert e.file_size == len(body)
    assert e.content_hash == hashlib.sha256(body).hexdigest()
    assert e.ttl_seconds == 24 * 3600
    assert e.access_count == 1
    assert e.created_at <= e.last_accessed
    assert not e.is_expired()


def test_relative_urls_resolve_against_the_image_server(origin, cache_dir):
    origin.route("data/ct/1.nii.gz", Route(volume(8, 100)))
    m = ImageCacheManager(cache_dir=cache_dir, image_server_url=origin.url("data/"))
    assert m.get_file("ct/1.nii.gz").read_bytes() == volume(8, 100)


def test_the_module_functions_use_the_environment(origin, cache_dir, monkeypatch):
    origin.route("data/v.nii.gz", Route(volume(9, 2 * MB)))
    monkeypatch.setenv("CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("IMAGE_SERVER", origin.url("data/"))
    monkeypatch.setenv("CACHE_MAX_SIZE_MB", "64")
    monkeypatch.setenv("CACHE_DEFAULT_TTL_HOURS", "2")

    path = imgcache.get_cached_file("v.nii.gz")
    assert isinstance(path, Path) and path.read_bytes() == volume(9, 2 * MB)
    assert str(path).startswith(str(cache_dir))
    assert imgcache.get_cache_manager() is imgcache.get_cache_manager()
    stats = imgcache.get_cache_stats()
    assert stats["max_size_mb"] == 64.0 and stats["entries_count"] == 1
    assert imgcache.get_cache_manager().default_ttl_seconds == 2 * 3600
    assert imgcache.clear_cache() == 1
    assert path.read_bytes() == volume(9, 2 * MB), "held for its hold time"
    imgcache.get_cache_manager().close()
    assert data_files(cache_dir) == [], "let go of, it goes"
    # An argument wins over the environment.
    assert ImageCacheManager(max_cache_size_mb=8).get_stats()["max_size_mb"] == 8.0


def test_a_dotenv_file_configures_what_the_environment_does_not(origin, tmp_path, monkeypatch):
    origin.route("data/d.nii.gz", Route(volume(10, 100)))
    dot_dir = tmp_path / "from-dotenv"
    (Path.cwd() / ".env").write_text(
        f"CACHE_DIR={dot_dir}\nIMAGE_SERVER={origin.url('data/')}\nCACHE_MAX_SIZE_MB=32\n"
    )
    monkeypatch.setenv("CACHE_MAX_SIZE_MB", "16")
    m = ImageCacheManager()
    assert m.cache_dir == dot_dir
    assert m.get_stats()["max_size_mb"] == 16.0, "the environment wins over .env"
    assert m.get_file("d.nii.gz").read_bytes() == volume(10, 100)


def _app_with_dotenv(origin, tmp_path, mode):
    """Runs ``<tmp>/project/app/app.py`` from another directory, with a .env in ``project``
    (a directory of mode ``mode``) naming a cache directory and the image server."""
    origin.route("data/d.nii.gz", Route(volume(12, 100)))
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    project.chmod(mode)
    cache = tmp_path / "cache-from-dotenv"
    (project / ".env").write_text(f"CACHE_DIR={cache}\nIMAGE_SERVER={origin.url('data/')}\n")
    script = project / "app" / "app.py"
    script.write_text("import imgcache\nprint(imgcache.ImageCacheManager().get_file('d.nii.gz'))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = subprocess.run(
        [sys.executable, str(script)],
        cwd=elsewhere,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return ran, cache


def test_a_dotenv_above_the_script_is_found_from_any_directory(origin, tmp_path):
    # `streamlit run app/app.py` from the parent directory, or `python app/app.py` from
    # anywhere: the .env next to or above the script configures it, as with python-dotenv.
    ran, cache = _app_with_dotenv(origin, tmp_path, 0o755)
    assert ran.returncode == 0, ran.stderr
    path = Path(ran.stdout.strip())
    assert path.read_bytes() == volume(12, 100)
    assert path.is_relative_to(cache)


def test_a_dotenv_others_could_write_is_not_read(origin, tmp_path):
    # A .env in a directory another user could write (as /tmp) names no image server.
    ran, cache = _app_with_dotenv(origin, tmp_path, 0o777)
    assert ran.returncode != 0 and "InvalidUrlError" in ran.stderr, ran.stderr
    assert not cache.exists()
    assert origin.gets["data/d.nii.gz"] == 0


def test_a_dotenv_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(imgcache.ConfigError, match="no such file"):
        ImageCacheManager(dotenv=tmp_path / "missing.env")


def test_close_saves_and_later_calls_raise(origin, cache_dir):
    url = origin.route("c.nii.gz", Route(volume(11, 100)))
    with ImageCacheManager(cache_dir=cache_dir) as m:
        m.get_file(url)
        m.get_file(url)
    with pytest.raises(imgcache.ShutdownError):
        m.get_file(origin.route("other.nii.gz", Route(b"x")))
    # A cached URL too: the hit path does not outlive close.
    with pytest.raises(imgcache.ShutdownError):
        m.get_file(url)
    with pytest.raises(imgcache.ShutdownError):
        m.get_cached_file(url)
    m.close()  # again: nothing happens
    again = ImageCacheManager(cache_dir=cache_dir)
    stats = again.get_stats()
    assert (stats["hits"], stats["total_downloads"], stats["entries_count"]) == (1, 1, 1)


def test_the_typed_dicts_name_every_key(origin, cache_dir):
    # Editors and type checkers see get_stats()'s and cleanup()'s keys: every one of them.
    m = ImageCacheManager(cache_dir=cache_dir)
    m.get_file(origin.route("k.nii.gz", Route(volume(13, 100))))
    assert set(imgcache.CacheStats.__annotations__) == set(m.get_stats())
    assert set(imgcache.CleanupReport.__annotations__) == set(m.cleanup())
