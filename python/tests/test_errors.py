"""One exception class per kind of failure, with url, status and is_transient; nothing cached."""

import pickle
import socket

import pytest

import imgcache
from imgcache import ImageCacheManager

from conftest import Route, data_files, volume


def test_http_statuses(origin, cache_dir):
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.HttpStatusError) as missing:
        m.get_file(origin.url("nothing.nii.gz"))
    e = missing.value
    assert (e.status, e.is_transient, e.kind) == (404, False, "http_status")
    assert e.url == origin.url("nothing.nii.gz")
    assert isinstance(e, imgcache.CacheError)

    url = origin.route("busy.nii.gz", Route(status=503))
    with pytest.raises(imgcache.HttpStatusError) as busy:
        m.get_file(url)
    assert (busy.value.status, busy.value.is_transient) == (503, True)
    assert data_files(cache_dir) == []
    assert m.get_stats()["errors"] == 2


def test_a_body_cut_short(origin, cache_dir):
    url = origin.route("cut.nii.gz", Route(volume(1, 400_000), cut_at=100_000))
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.IncompleteDownloadError) as cut:
        m.get_file(url)
    assert cut.value.is_transient
    assert data_files(cache_dir) == []


def test_a_checksum_mismatch_caches_nothing(origin, cache_dir):
    body = volume(2, 10_000)
    url = origin.route("sum.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.ChecksumMismatchError) as bad:
        m.get_file(url, expected_sha256="0" * 64)
    assert not bad.value.is_transient
    assert data_files(cache_dir) == []
    good = m.get_file(url, expected_sha256=Route(body).sha256)
    assert good.read_bytes() == body


def test_a_file_larger_than_the_cap(origin, cache_dir):
    url = origin.route("big.nii.gz", Route(volume(3, 2 * 1024 * 1024)))
    m = ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=1)
    with pytest.raises(imgcache.TooLargeError):
        m.get_file(url)
    assert data_files(cache_dir) == []


def test_bad_urls_are_value_errors_too(cache_dir):
    m = ImageCacheManager(cache_dir=cache_dir)
    for url in ["ftp://127.0.0.1/x.nii.gz", "not a url", "relative/with/no/server.nii.gz"]:
        with pytest.raises(imgcache.InvalidUrlError) as bad:
            m.get_file(url)
        assert isinstance(bad.value, ValueError)


def test_a_refused_connection_is_a_transient_network_error(cache_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.NetworkError) as refused:
        m.get_file(f"http://127.0.0.1:{port}/x.nii.gz")
    assert refused.value.is_transient and isinstance(refused.value, ConnectionError)


def test_offline_serves_only_what_is_cached(origin, cache_dir):
    url = origin.route("o.nii.gz", Route(volume(4, 100)))
    ImageCacheManager(cache_dir=cache_dir).get_file(url)
    offline = ImageCacheManager(cache_dir=cache_dir, offline=True)
    assert offline.get_file(url).read_bytes() == volume(4, 100)
    with pytest.raises(imgcache.NotCachedError):
        offline.get_file(origin.route("p.nii.gz", Route(b"x")))
    assert origin.gets["p.nii.gz"] == 0


def test_bad_settings_name_the_variable(cache_dir, monkeypatch):
    monkeypatch.setenv("CACHE_MAX_SIZE_MB", "lots")
    with pytest.raises(imgcache.ConfigError) as bad:
        ImageCacheManager(cache_dir=cache_dir)
    assert "CACHE_MAX_SIZE_MB" in str(bad.value)
    monkeypatch.delenv("CACHE_MAX_SIZE_MB")
    with pytest.raises(ValueError):
        ImageCacheManager(cache_dir=cache_dir, hold_seconds=-1)


def test_an_exclusive_lock_elsewhere_is_locked_error(cache_dir, monkeypatch):
    monkeypatch.setenv("CACHE_LOCK", "exclusive")
    first = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.LockedError):
        ImageCacheManager(cache_dir=cache_dir)
    first.close()


def test_exceptions_pickle_with_their_fields(origin, cache_dir):
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.HttpStatusError) as missing:
        m.get_file(origin.url("gone.nii.gz"))
    back = pickle.loads(pickle.dumps(missing.value))
    assert type(back) is imgcache.HttpStatusError
    assert (back.url, back.status, back.is_transient, str(back)) == (
        missing.value.url,
        404,
        False,
        str(missing.value),
    )


def test_user_info_never_appears_in_an_error(origin, cache_dir):
    m = ImageCacheManager(cache_dir=cache_dir)
    url = f"http://alice:s3cret@127.0.0.1:{origin.port}/private.nii.gz"
    with pytest.raises(imgcache.HttpStatusError) as e:
        m.get_file(url)
    assert "s3cret" not in str(e.value) and "s3cret" not in (e.value.url or "")
    assert "s3cret" not in m.redacted(url)
