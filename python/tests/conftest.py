"""A loopback origin (127.0.0.1, port 0) and a clean environment for every test."""

import hashlib
import http.server
import os
import random
import threading
import time
from collections import Counter
from typing import Dict, Optional

import pytest


class Route:
    def __init__(self, body: bytes = b"", status: int = 200, etag: Optional[str] = None,
                 rate: Optional[int] = None, cut_at: Optional[int] = None,
                 first_byte_delay: float = 0.0, no_answer: bool = False):
        self.body = body
        self.status = status
        self.etag = etag
        self.rate = rate  # bytes per second, or None for as fast as possible
        self.cut_at = cut_at  # send only this many bytes of a longer Content-Length
        self.first_byte_delay = first_byte_delay
        self.no_answer = no_answer  # hang up without a word, as a server that is down

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class Origin:
    """An HTTP server on 127.0.0.1 that counts the GET requests of each path."""

    def __init__(self) -> None:
        self.routes: Dict[str, Route] = {}
        self.gets: Counter = Counter()
        self.ranges = 0
        # (path, Authorization, X-Api-Key) of every GET.
        self.credentials: list = []
        self._lock = threading.Lock()
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                with origin._lock:
                    origin.gets[path] += 1
                    origin.credentials.append(
                        (path, self.headers.get("Authorization"), self.headers.get("X-Api-Key"))
                    )
                    if self.headers.get("Range"):
                        origin.ranges += 1
                route = origin.routes.get(path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.no_answer:
                    self.close_connection = True
                    return
                if route.first_byte_delay:
                    time.sleep(route.first_byte_delay)
                if route.status != 200:
                    self.send_response(route.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(route.body)))
                if route.etag:
                    self.send_header("ETag", route.etag)
                self.end_headers()
                body = route.body if route.cut_at is None else route.body[: route.cut_at]
                step = 64 * 1024
                for i in range(0, len(body), step):
                    try:
                        self.wfile.write(body[i : i + step])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if route.rate:
                        time.sleep(step / route.rate)
                if route.cut_at is not None:
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def route(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def volume(seed: int, size: int) -> bytes:
    """Deterministic bytes that look like nothing in particular."""
    return random.Random(seed).randbytes(size)


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.stop()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No setting of the machine's (or of a .env where pytest was started) leaks in."""
    for name in list(os.environ):
        if name.startswith("CACHE_") or name in ("IMAGE_SERVER", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    # One attempt: an error is an error at once.
    monkeypatch.setenv("CACHE_RETRIES", "0")
    import imgcache

    monkeypatch.setattr(imgcache, "_manager", None)
    # Nor a .env above the tests' own directory (a checkout's, a home directory's).
    monkeypatch.setattr(imgcache, "_callers_dir", lambda: None)
    yield


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    return d


def data_files(cache_dir) -> list:
    """The committed data files below cache_dir (everything but metadata, locks and temp)."""
    out = []
    entries = os.path.join(str(cache_dir), "v1", "entries")
    for root, _dirs, files in os.walk(entries):
        for f in files:
            if f != "meta.json":
                out.append(os.path.join(root, f))
    return sorted(out)
