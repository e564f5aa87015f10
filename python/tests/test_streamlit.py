"""The example app under Streamlit's AppTest: the sidebar's figures, buttons and settings."""

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import imgcache  # noqa: E402

from conftest import Route, data_files, volume  # noqa: E402

APP = str(Path(__file__).parent.parent / "examples" / "viewer.py")
MB = 1024 * 1024


@pytest.fixture
def clock():
    return imgcache.ManualClock()


@pytest.fixture
def app(origin, cache_dir, monkeypatch, clock):
    origin.route("data/ct/1.nii.gz", Route(volume(1, 3 * MB)))
    origin.route("data/ct/2.nii.gz", Route(volume(2, MB)))
    monkeypatch.setenv("CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("IMAGE_SERVER", origin.url("data/"))
    monkeypatch.setenv("CACHE_MAX_SIZE_MB", "100")
    monkeypatch.setenv("VOLUMES", "ct/1.nii.gz,ct/2.nii.gz")
    # The process-wide manager the app uses, on a clock the test moves (for the holds).
    monkeypatch.setattr(imgcache, "_manager", imgcache.ImageCacheManager(clock=clock))
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    return at


def metric(at, label):
    return next(m.value for m in at.sidebar.metric if m.label == label)


def test_the_sidebar_shows_the_figures(app, origin):
    assert "Loaded 1.nii.gz: 3.0 MB" in app.success[0].value
    assert metric(app, "Files Cached") == "1"
    assert metric(app, "Cache Size") == "3.0 MB"
    assert metric(app, "Max Size") == "100.0 MB"
    assert metric(app, "Hit Rate") == "0.0%"
    assert app.sidebar.get("progress")[0].proto.value == 3
    # A rerun is a hit.
    app.run()
    assert metric(app, "Hit Rate") == "50.0%"
    assert metric(app, "Served Without Download") == "50.0%"
    assert origin.gets["data/ct/1.nii.gz"] == 1
    assert "Downloads in progress: 0" in app.sidebar.caption[0].value


def test_clear_cache_empties_the_cache(app, origin, cache_dir):
    app.selectbox(key="volume").select("ct/2.nii.gz").run()
    assert metric(app, "Files Cached") == "2"
    before = set(data_files(cache_dir))
    app.sidebar.button(key="imgcache_clear").click().run()
    assert not app.exception
    assert any("Cache cleared: 2 files removed" in s.value for s in app.sidebar.success)
    # Both files went (the app pins a volume only while it reads it); the rerun that
    # followed the click loaded the selected volume again.
    after = set(data_files(cache_dir))
    assert len(after) == 1 and not (before & after)
    assert origin.gets["data/ct/2.nii.gz"] == 2
    assert metric(app, "Files Cached") == "1"


def test_clean_up_expired_reports(app):
    app.sidebar.button(key="imgcache_cleanup").click().run()
    assert any("Expired files removed: 0" in s.value for s in app.sidebar.success)


def test_the_clean_up_message_says_what_went_why_and_what_stayed():
    from imgcache._sidebar import cleanup_message

    report = {"expired": 2, "evicted": 1, "bytes_freed": 3 * MB, "kept_in_use": 1}
    assert cleanup_message(report) == (
        "Expired files removed: 2; removed for the size cap: 1 (3.0 MB freed). "
        "Kept 1 expired, still in use: they go when let go"
    )
    nothing = {"expired": 0, "evicted": 0, "bytes_freed": 0, "kept_in_use": 0}
    assert cleanup_message(nothing) == "Expired files removed: 0 (0.0 MB freed)"


def test_the_ttl_and_size_inputs_apply_at_once(app, cache_dir):
    manager = imgcache.get_cache_manager()
    assert manager.default_ttl_seconds == 24 * 3600
    app.sidebar.number_input(key="imgcache_ttl_hours").set_value(2.0).run()
    assert manager.default_ttl_seconds == 2 * 3600
    # The file the app loads next is cached for two hours.
    app.selectbox(key="volume").select("ct/2.nii.gz").run()
    assert not app.exception
    entry = next(e for e in manager.entries.values() if e.url.endswith("ct/2.nii.gz"))
    assert entry.ttl_seconds == 2 * 3600
    # A 2 MB cap: the 3 MB volume cannot stay, the 1 MB one does.
    app.sidebar.number_input(key="imgcache_max_size_mb").set_value(2).run()
    assert manager.max_cache_size_bytes == 2 * MB
    assert metric(app, "Max Size") == "2.0 MB"
    assert [e.file_size for e in manager.entries.values()] == [MB]
    assert len(data_files(cache_dir)) == 1
    assert os.environ["CACHE_MAX_SIZE_MB"] == "100", "the environment is left alone"


def test_settings_beyond_the_inputs_range_still_show(origin, cache_dir, monkeypatch):
    origin.route("data/ct/1.nii.gz", Route(volume(1, MB)))
    monkeypatch.setenv("CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("IMAGE_SERVER", origin.url("data/"))
    monkeypatch.setenv("CACHE_DEFAULT_TTL_HOURS", str(24 * 365 * 100))
    monkeypatch.setenv("VOLUMES", "ct/1.nii.gz")
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.number_input(key="imgcache_ttl_hours").value == 24.0 * 365 * 10
    # Shown at the bound, not changed by being shown.
    assert imgcache.get_cache_manager().default_ttl_seconds == 24 * 365 * 100 * 3600
