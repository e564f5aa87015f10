"""One exception class per kind of failure, with url, status and is_transient; nothing cached."""

import errno
import logging
import pickle
import socket

import pytest

import imgcache
from imgcache import ImageCacheManager, ManualClock, _native

from conftest import Route, data_files, volume


def test_http_statuses(origin, cache_dir):
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.HttpStatusError) as missing:
        m.get_file(origin.url("nothing.nii.gz"))
    e = missing.value
    assert (e.status, e.is_transient, e.kind) == (404, False, "http_status")
    assert e.url == origin.url("nothing.nii.gz")
    assert isinstance(e, imgcache.CacheError)
    # A missing file is what Python code expects a missing file or key to be.
    assert isinstance(e, FileNotFoundError) and isinstance(e, LookupError)
    assert type(e) is imgcache.NotFoundError and str(e) == e.message
    assert (e.errno, e.filename) == (errno.ENOENT, e.url)
    with pytest.raises(FileNotFoundError):
        m.get_file(origin.url("nothing.nii.gz"))

    url = origin.route("busy.nii.gz", Route(status=503))
    with pytest.raises(imgcache.HttpStatusError) as busy:
        m.get_file(url)
    assert (busy.value.status, busy.value.is_transient) == (503, True)
    assert data_files(cache_dir) == []
    assert m.get_stats()["errors"] == 3, "two 404s (errors are not cached) and a 503"


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
    assert type(back) is imgcache.NotFoundError
    assert (back.url, back.status, back.is_transient, str(back)) == (
        missing.value.url,
        404,
        False,
        str(missing.value),
    )


SECRETS = ("s3cret", "sigsecret", "credsecret")


def _shows_no_secret(text):
    return not any(secret in str(text) for secret in SECRETS)


def test_credentials_and_signatures_never_appear(origin, cache_dir, caplog):
    signed = "private.nii.gz?X-Amz-Signature=sigsecret&X-Amz-Credential=credsecret"
    origin.route(signed, Route(volume(3, 1000)))
    url = f"http://alice:s3cret@127.0.0.1:{origin.port}/{signed}"
    missing = f"http://alice:s3cret@127.0.0.1:{origin.port}/gone.nii.gz?Signature=sigsecret"
    m = ImageCacheManager(cache_dir=cache_dir, image_server_url=f"http://bob:s3cret@127.0.0.1:{origin.port}/")
    with caplog.at_level(logging.DEBUG, logger="imgcache"):
        _native.refresh_log_level()
        with pytest.raises(imgcache.HttpStatusError) as e:
            m.get_file(missing)
        with m.open(url) as f:
            shown = [f.url, repr(f)]
        m.get_file(url)
    _native.refresh_log_level()
    assert _shows_no_secret(e.value) and _shows_no_secret(e.value.url or "")
    assert _shows_no_secret(pickle.loads(pickle.dumps(e.value)))
    assert "alice" not in f.url and "127.0.0.1" in f.url
    shown += [m.redacted(url), m.image_server_url, repr(m), repr(m._cache)]
    shown += [list(m.entries), [vars(x) for x in m.entries.values()], m.get_stats()]
    assert all(_shows_no_secret(x) for x in shown), shown
    assert caplog.records, "the events were logged"
    for record in caplog.records:
        assert _shows_no_secret(record.getMessage()), record.getMessage()
        assert _shows_no_secret(getattr(record, "imgcache", "")), record.imgcache


def test_durations_out_of_range_are_value_errors(origin, cache_dir):
    url = origin.route("d.nii.gz", Route(volume(4, 100)))
    for hold in (-1, 2 * 24 * 3600, 1e30, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ImageCacheManager(cache_dir=cache_dir, hold_seconds=hold)
    with pytest.raises(ValueError):
        ImageCacheManager(cache_dir=cache_dir, default_ttl_hours=1e30)
    m = ImageCacheManager(cache_dir=cache_dir)
    for ttl in (-1, 1e30, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            m.get_file(url, ttl_seconds=ttl)
        with pytest.raises(ValueError):
            m.default_ttl_seconds = ttl
    with pytest.raises(ValueError):
        ManualClock().advance(1e30)
    assert origin.gets["d.nii.gz"] == 0
    # A TTL of a thousand years is a number like any other.
    assert m.get_file(url, ttl_seconds=1000 * 365 * 24 * 3600).read_bytes() == volume(4, 100)


def test_a_blocking_call_inside_a_logging_handler_raises_instead_of_panicking(origin, cache_dir):
    first = origin.route("n1.nii.gz", Route(volume(5, 100)))
    second = origin.route("n2.nii.gz", Route(volume(6, 100)))
    m = ImageCacheManager(cache_dir=cache_dir)
    seen = []

    class Reentrant(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Cached file") and not seen:
                # A blocking call, and one that would only take a lock of the core: the
                # thread that logged may hold it.
                for call in (lambda: m.get_file(second), m.get_stats, lambda: m.entries):
                    try:
                        seen.append(call())
                    except BaseException as e:  # noqa: BLE001 - what it raised is the point
                        seen.append(e)

    handler = Reentrant(level=logging.INFO)
    core = logging.getLogger("imgcache.core")
    core.addHandler(handler)
    core.setLevel(logging.INFO)
    try:
        _native.refresh_log_level()
        path = m.get_file(first)
    finally:
        core.removeHandler(handler)
        core.setLevel(logging.NOTSET)
        _native.refresh_log_level()
    assert path.read_bytes() == volume(5, 100)
    assert len(seen) == 3
    assert all(isinstance(e, imgcache.InternalError) for e in seen), seen
    assert "inside another" in str(seen[0])
    # The handle is unharmed.
    assert m.get_file(second).read_bytes() == volume(6, 100)
