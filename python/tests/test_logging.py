"""The core's events in Python logging, under the logger "imgcache"."""

import logging

from imgcache import ImageCacheManager, _native

from conftest import Route, volume


def test_a_download_logs_cached_file_at_info(origin, cache_dir, caplog):
    url = origin.route("l.nii.gz", Route(volume(1, 12345)))
    with caplog.at_level(logging.INFO, logger="imgcache"):
        _native.refresh_log_level()
        path = ImageCacheManager(cache_dir=cache_dir).get_file(url)
    cached = [r for r in caplog.records if r.getMessage().startswith("Cached file")]
    assert len(cached) == 1, [r.getMessage() for r in caplog.records]
    record = cached[0]
    assert record.name == "imgcache.core" and record.levelno == logging.INFO
    assert f"path={path}" in record.getMessage()
    assert record.imgcache["path"] == str(path)
    # Numbers stay numbers.
    assert record.imgcache["bytes"] == 12345


def test_nothing_is_logged_below_the_loggers_level(origin, cache_dir, caplog):
    url = origin.route("q.nii.gz", Route(volume(2, 100)))
    with caplog.at_level(logging.WARNING, logger="imgcache"):
        _native.refresh_log_level()
        m = ImageCacheManager(cache_dir=cache_dir)
        m.get_file(url)
        m.get_file(url)
    assert [r for r in caplog.records if r.name.startswith("imgcache")] == []
    with caplog.at_level(logging.DEBUG, logger="imgcache"):
        _native.refresh_log_level()
        m.get_file(url)
    assert any(r.getMessage().startswith("Cache hit") for r in caplog.records)
    _native.refresh_log_level()


def test_a_level_set_in_python_applies_to_the_next_call(origin, cache_dir, caplog):
    url = origin.route("n.nii.gz", Route(volume(3, 100)))
    m = ImageCacheManager(cache_dir=cache_dir)
    with caplog.at_level(logging.WARNING, logger="imgcache"):
        m.get_file(url)
        m.get_file(url)
    assert [r for r in caplog.records if r.name.startswith("imgcache")] == []
    # No refresh_log_level(), no waiting: setLevel (as basicConfig(level=...)) applies now.
    logging.getLogger("imgcache").setLevel(logging.DEBUG)
    try:
        m.get_file(url)
        hits = [r for r in caplog.records if r.getMessage().startswith("Cache hit")]
        assert len(hits) == 1, [r.getMessage() for r in caplog.records]
        logging.getLogger("imgcache").setLevel(logging.WARNING)
        m.get_file(url)
        hits = [r for r in caplog.records if r.getMessage().startswith("Cache hit")]
        assert len(hits) == 1, "back to WARNING: the next hit is not logged"
    finally:
        logging.getLogger("imgcache").setLevel(logging.NOTSET)
        _native.refresh_log_level()


def test_warnings_reach_python(origin, cache_dir, caplog):
    url = origin.route("w.nii.gz", Route(status=500))
    with caplog.at_level(logging.WARNING, logger="imgcache"):
        _native.refresh_log_level()
        try:
            ImageCacheManager(cache_dir=cache_dir).get_file(url)
        except Exception:  # noqa: BLE001 - the log is what this test reads
            pass
    assert any(r.levelno == logging.WARNING for r in caplog.records if r.name == "imgcache.core")
