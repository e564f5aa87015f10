"""The shared tier from Python: two managers on two directories, standing for two hosts,
share one origin download through moto's S3 server on loopback (PyPI ``moto[s3,server]``).
Skipped where moto is not installed, unless ``IMGCACHE_REQUIRE_S3=1`` (as in CI)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imgcache import ImageCacheManager

from conftest import Route, volume

MB = 1024 * 1024


def _moto_server():
    beside = Path(sys.executable).parent / "moto_server"
    found = os.environ.get("IMGCACHE_MOTO_SERVER") or shutil.which("moto_server")
    return found or (str(beside) if beside.exists() else None)


@pytest.fixture
def tier(monkeypatch):
    server = _moto_server()
    if server is None:
        if os.environ.get("IMGCACHE_REQUIRE_S3") == "1":
            pytest.fail("IMGCACHE_REQUIRE_S3=1 and no moto_server")
        pytest.skip("no moto_server (pip install 'moto[s3,server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            req = urllib.request.Request(f"{endpoint}/imaging-fleet", method="PUT")
            urllib.request.urlopen(req, timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    for name, value in {
        "CACHE_SHARED_TIER": "s3://imaging-fleet/py",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "imgcache-test",
        "AWS_SECRET_ACCESS_KEY": "imgcache-test-secret",
    }.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    proc.kill()
    proc.wait()


def test_two_hosts_share_one_origin_download(origin, tmp_path, tier):
    body = volume(1, 2 * MB)
    url = origin.route("ct/s.nii.gz", Route(body))
    first = ImageCacheManager(cache_dir=tmp_path / "host-1")
    assert first.get_file(url).read_bytes() == body
    first.close()  # waits for its upload to the tier
    second = ImageCacheManager(cache_dir=tmp_path / "host-2")
    with second.open(url) as f:
        assert f.status == "shared"
        assert f.path.read_bytes() == body
    assert origin.gets["ct/s.nii.gz"] == 1
    stats = second.get_stats()
    assert (stats["shared_hits"], stats["shared_errors"]) == (1, 0)
    assert stats["shared_tier"] == "s3://imaging-fleet/py"
    assert stats["shared_tier_state"] == "ok"
    assert "imgcache-test-secret" not in repr(stats)
