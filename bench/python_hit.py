"""The warm path from Python, side by side in one run (run by bench/python.sh):

    python bench/python_hit.py URL CACHE_DIR [CALLS]

Prints one Markdown row per way of asking for a cached file: imgcache's get_file with its
hold (the default), get_file with hold_seconds=0 (every call a first pin), get_cached_file,
the pinned form, and os.stat of the same file for scale; then fsspec's and pooch's warm calls
when they are installed.
"""

import os
import sys
import tempfile
import time


def per_call(fn, calls):
    fn()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main():
    url, cache_dir = sys.argv[1:3]
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
    from imgcache import ImageCacheManager

    held = ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=4096)
    path = held.get_file(url)
    loose = ImageCacheManager(cache_dir=cache_dir, max_cache_size_mb=4096, hold_seconds=0)

    def pinned():
        with held.open(url):
            pass

    # The original module functions, through the process-wide manager of the environment.
    import imgcache

    base, _, file_name = url.rpartition("/")
    os.environ["CACHE_DIR"] = cache_dir
    os.environ["CACHE_MAX_SIZE_MB"] = "4096"
    os.environ["IMAGE_SERVER"] = base + "/"
    imgcache.get_cached_file(url)

    rows = [
        ("imgcache get_file (default: held 10 s)", lambda: held.get_file(url), calls),
        ("imgcache get_cached_file", lambda: held.get_cached_file(url), calls),
        ("imgcache get_file(url, ttl_seconds=3600)", lambda: held.get_file(url, 3600), calls),
        ("imgcache.get_cached_file(url) (module)", lambda: imgcache.get_cached_file(url), calls),
        (
            "imgcache.get_cached_file(relative) (module, IMAGE_SERVER)",
            lambda: imgcache.get_cached_file(file_name),
            calls,
        ),
        ("imgcache get_file, hold_seconds=0", lambda: loose.get_file(url), calls // 10),
        ("imgcache `with open(url)`", pinned, calls // 10),
        ("os.stat of the cached file", lambda: os.stat(path), calls),
    ]
    try:
        import fsspec

        fs_dir = tempfile.mkdtemp()

        def fs():
            return fsspec.open_local(
                "filecache::" + url, filecache={"cache_storage": fs_dir, "expiry_time": 86400}
            )

        rows.append(("fsspec filecache open_local", fs, 200))
    except ImportError:
        pass
    try:
        import pooch

        pooch_dir = tempfile.mkdtemp()
        rows.append(
            (
                "pooch.retrieve (no hash)",
                lambda: pooch.retrieve(url, known_hash=None, path=pooch_dir, progressbar=False),
                200,
            )
        )
    except ImportError:
        pass
    base = None
    print("| call | per call | vs imgcache get_file |")
    print("|---|---|---|")
    for name, fn, n in rows:
        t = per_call(fn, max(n, 1))
        base = base or t
        print(f"| {name} | {t * 1e6:.2f} µs | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
