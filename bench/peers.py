"""The Python peers' side of bench/peers.sh: one measurement per run, printed as seconds.

    python peers.py TOOL MODE URL CACHE_DIR [N] [SHA256]

TOOL: imgcache-python (the Python package, python/), pooch (with known_hash, as its
documentation recommends), pooch-nohash, fsspec (filecache), cached-path. MODE: cold, warm (seconds per call), concurrent (N threads at once).
"""

import hashlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def getter(tool, cache_dir, sha256):
    if tool == "imgcache-python":
        from imgcache import ImageCacheManager

        return ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=4096).get_file
    if tool in ("pooch", "pooch-nohash"):
        import pooch

        known = f"sha256:{sha256}" if tool == "pooch" else None

        def get(url):
            return pooch.retrieve(url, known_hash=known, path=cache_dir, progressbar=False)

        return get
    if tool == "fsspec":
        import fsspec

        def get(url):
            return fsspec.open_local(
                "filecache::" + url,
                filecache={"cache_storage": cache_dir, "expiry_time": 86400},
            )

        return get
    if tool == "cached-path":
        from cached_path import cached_path

        def get(url):
            return str(cached_path(url, cache_dir=cache_dir, quiet=True))

        return get
    raise SystemExit(f"unknown tool {tool}")


def main():
    tool, mode, url, cache_dir = sys.argv[1:5]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    sha256 = sys.argv[6] if len(sys.argv) > 6 else ""
    get = getter(tool, cache_dir, sha256)
    if mode == "cold":
        started = time.perf_counter()
        get(url)
        print(f"{time.perf_counter() - started:.9f}")
    elif mode == "warm":
        get(url)
        calls = n
        started = time.perf_counter()
        for _ in range(calls):
            get(url)
        print(f"{(time.perf_counter() - started) / calls:.9f}")
    elif mode == "concurrent":
        barrier = threading.Barrier(n)

        def one(_):
            barrier.wait()
            return get(url)

        started = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))
        print(f"{time.perf_counter() - started:.9f}")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
