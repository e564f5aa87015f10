"""How a call waits: timeout=, progress= (a callable, a tqdm-like bar, a Streamlit bar), and
an image server that does not answer, remembered for a while."""

import threading

import pytest

import imgcache
from imgcache import DownloadTimeoutError, ImageCacheManager, ManualClock, NetworkError

from conftest import Route, data_files, volume

MB = 1024 * 1024


def test_a_call_waits_no_longer_than_its_timeout_and_the_download_goes_on(origin, cache_dir):
    body = volume(1, 2 * MB)
    release = threading.Event()

    class Slow(Route):
        @property
        def first_byte_delay(self):  # the origin answers once the test lets it
            release.wait(30)
            return 0.0

        @first_byte_delay.setter
        def first_byte_delay(self, _):
            pass

    url = origin.route("slow.nii.gz", Slow(body))
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(DownloadTimeoutError) as caught:
        m.get_file(url, timeout=0.2)
    e = caught.value
    assert isinstance(e, TimeoutError) and isinstance(e, NetworkError)
    assert e.is_transient and e.url == url and "timeout" in str(e)
    # The download went on: the next call joins it, and the origin was asked once.
    release.set()
    path = m.get_file(url, timeout=30)
    assert path.read_bytes() == body
    assert origin.gets["slow.nii.gz"] == 1
    with pytest.raises(ValueError):
        m.get_file(url, timeout=0)


def test_progress_reports_the_bytes_of_a_download_and_nothing_for_a_hit(origin, cache_dir):
    body = volume(2, 4 * MB)
    url = origin.route("p.nii.gz", Route(body, rate=16 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    seen = []
    caller = threading.get_ident()

    def report(done, total):
        assert threading.get_ident() == caller, "called on the caller's thread"
        seen.append((done, total))

    path = m.get_file(url, progress=report)
    assert path.read_bytes() == body
    assert seen[-1] == (len(body), len(body))
    assert any(0 < done < len(body) for done, _ in seen), seen
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:])), seen
    assert all(total == len(body) for _, total in seen)
    hit = []
    assert m.get_file(url, progress=lambda d, t: hit.append(d)) == path
    assert hit == []


def test_a_tqdm_like_bar_is_updated_to_the_total(origin, cache_dir):
    body = volume(3, 3 * MB)
    url = origin.route("t.nii.gz", Route(body, rate=12 * MB))

    class Bar:
        def __init__(self):
            self.total = None
            self.n = 0
            self.updates = 0

        def update(self, n):
            self.n += n
            self.updates += 1

    bar = Bar()
    m = ImageCacheManager(cache_dir=cache_dir)
    with m.open(url, progress=bar) as f:
        assert f.size == len(body)
    assert (bar.total, bar.n) == (len(body), len(body))
    assert bar.updates >= 2


def test_a_progress_callable_that_raises_stops_the_call_not_the_download(origin, cache_dir):
    body = volume(4, 4 * MB)
    url = origin.route("r.nii.gz", Route(body, rate=16 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)

    def stop(done, total):
        raise KeyError("enough")

    with pytest.raises(KeyError):
        m.get_file(url, progress=stop)
    assert m.get_file(url).read_bytes() == body
    assert origin.gets["r.nii.gz"] == 1


def test_streamlit_progress_shows_a_bar_while_bytes_arrive_and_clears_it():
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    def app(finish: bool):
        import imgcache

        report = imgcache.streamlit_progress("Loading CT")
        report(3 * 1024 * 1024, 12 * 1024 * 1024)
        if finish:
            report(12 * 1024 * 1024, 12 * 1024 * 1024)

    at = AppTest.from_function(app, args=(False,)).run()
    assert not at.exception, at.exception
    bar = at.get("progress")[0]
    assert bar.proto.value == 25 and bar.proto.text == "Loading CT: 3 of 12 MB"
    at = AppTest.from_function(app, args=(True,)).run()
    assert not at.exception and at.get("progress") == []


def test_an_image_server_that_does_not_answer_is_remembered(origin, cache_dir, monkeypatch):
    monkeypatch.setenv("CACHE_OUTAGE_MEMORY", "30s")
    kept = origin.route("k.nii.gz", Route(volume(5, 1000)))
    missing = origin.route("m.nii.gz", Route(volume(6, 1000)))
    clock = ManualClock()
    m = ImageCacheManager(cache_dir=cache_dir, default_ttl_hours=1, clock=clock)
    path = m.get_file(kept)
    # The server goes down: it hangs up on every request.
    origin.route("k.nii.gz", Route(no_answer=True))
    origin.route("m.nii.gz", Route(no_answer=True))
    clock.advance(3601)
    # The first call finds the server down and serves the expired copy.
    assert m.get_file(kept) == path
    clock.advance(5)
    # Then, for 30 s, the copy at once and a miss fails at once, saying why.
    assert m.get_file(kept) == path
    with pytest.raises(NetworkError) as caught:
        m.get_file(missing)
    assert "did not answer 5s ago" in str(caught.value), str(caught.value)
    assert "CACHE_OUTAGE_MEMORY" in str(caught.value)
    assert m.get_stats()["stale_served"] == 2
    assert origin.gets["k.nii.gz"] == 2 and origin.gets["m.nii.gz"] == 0
    assert len(data_files(cache_dir)) == 1


def test_a_volume_larger_than_the_cap_is_viewed_uncached_when_the_caller_allows(
    origin, cache_dir
):
    body = volume(7, 3 * MB)
    url = origin.route("whole-body.nii.gz", Route(body))
    m = ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=2, hold_seconds=0)
    with pytest.raises(imgcache.TooLargeError):
        m.get_file(url)
    with pytest.raises(ValueError, match="hold_seconds"):
        m.get_file(url, uncached_if_too_large=True)  # a path that would be gone at once
    with pytest.warns(UserWarning, match="more than the cache's size cap"):
        with m.open(url, uncached_if_too_large=True) as f:
            assert f.status == "not_stored" and f.path.read_bytes() == body
            assert f.path.name == "whole-body.nii.gz"
    assert not f.path.exists(), "uncached: gone when let go"
    with m.open_stream(url, uncached_if_too_large=True) as s:
        assert s.read() == body
    assert data_files(cache_dir) == []
    assert m.get_stats()["current_size_bytes"] == 0
    assert m.get_stats()["not_stored"] == 2
