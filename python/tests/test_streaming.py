"""``open_stream``: a file object on the bytes while they are cached."""

import gzip
import io
import threading

import pytest

import imgcache
from imgcache import ImageCacheManager

from conftest import Route, volume

MB = 1024 * 1024


def test_bytes_arrive_before_the_download_ends(origin, cache_dir):
    body = volume(1, 8 * MB)
    url = origin.route("ct/s.nii.gz", Route(body, rate=8 * MB))  # a second to download
    m = ImageCacheManager(cache_dir=cache_dir)
    with m.open_stream(url) as f:
        assert isinstance(f, io.BufferedReader)
        head = f.read(64 * 1024)
        assert head == body[: len(head)] and len(head) > 0
        stats = m.get_stats()
        assert (stats["entries_count"], stats["downloads_in_progress"]) == (0, 1)
        rest = f.read()
        assert f.read() == b"" and f.read(10) == b"", "the end repeats"
    assert head + rest == body
    assert m.get_stats()["entries_count"] == 1, "the end came after the commit"
    with m.open_stream(url) as again:
        assert again.raw.status == "hit" and again.raw.length == len(body)
        assert again.read() == body
    assert origin.gets["ct/s.nii.gz"] == 1


def test_a_gzip_header_reads_from_the_stream(origin, cache_dir):
    payload = volume(2, 2 * MB)
    url = origin.route("ct/g.nii.gz", Route(gzip.compress(payload), rate=4 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    with gzip.GzipFile(fileobj=m.open_stream(url)) as g:
        assert g.read(352) == payload[:352]


def test_readers_in_threads_share_one_download(origin, cache_dir):
    body = volume(3, 6 * MB)
    url = origin.route("ct/t.nii.gz", Route(body, rate=12 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    got, errors = [], []

    def reader():
        try:
            with m.open_stream(url) as f:
                got.append(f.read())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 4 and all(g == body for g in got)
    assert origin.gets["ct/t.nii.gz"] == 1


def test_a_cut_body_raises_instead_of_a_short_read(origin, cache_dir):
    url = origin.route("cut.nii.gz", Route(volume(4, 4 * MB), cut_at=MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    with pytest.raises(imgcache.IncompleteDownloadError):
        with m.open_stream(url) as f:
            while f.read(256 * 1024):
                pass
    assert m.get_stats()["entries_count"] == 0


def test_two_threads_on_one_stream_never_lose_bytes(origin, cache_dir):
    body = volume(5, 4 * MB)
    url = origin.route("ct/shared.nii.gz", Route(body, rate=8 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    f = m.open_stream(url)
    raw = f.raw
    chunks, done = [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                chunk = raw._stream.read(40_000)
            except RuntimeError as e:
                assert "another thread" in str(e)
                continue
            if not chunk:
                done.set()
                return
            chunks.append(chunk)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(c) for c in chunks) == len(body), "every byte handed out once"
    assert all(body.find(c) >= 0 for c in chunks)
    f.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_closing_the_parents_stream_leaves_it_alone(origin, cache_dir):
    import os

    body = volume(6, 4 * MB)
    url = origin.route("ct/fork.nii.gz", Route(body, rate=8 * MB))
    m = ImageCacheManager(cache_dir=cache_dir)
    f = m.open_stream(url)
    head = f.read(1000)
    pid = os.fork()
    if pid == 0:  # the child: its copy of the parent's stream is not its own
        code = 0
        try:
            try:
                f.raw._stream.read(10)
                code = 3
            except RuntimeError:
                pass
            f.close()
            del f
        except BaseException:  # noqa: BLE001 - the exit code says it
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert head + f.read() == body
    f.close()
    assert m.get_stats()["entries_count"] == 1
