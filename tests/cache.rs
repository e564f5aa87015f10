//! The cache against local origins: downloads, coalescing, cancellation, errors, TTL, LRU,
//! pins, restart, recovery, integrity and hostile URLs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use imgcache::{CacheStatus, ErrorKind, GetOptions, ImageCache, Verification};
use support::origin::{Fault, Origin, Route, sha256_hex, volume};
use support::{
    data_files, files, mode, open, open_capped, open_without_retries, route_volumes, temp_files,
};

const MB: usize = 1024 * 1024;

#[tokio::test]
async fn first_get_downloads_and_second_is_a_hit() {
    let origin = Origin::start().await;
    let body = volume(1, 3 * MB + 17);
    origin.route("ct/0042.nii.gz", Route::ok(body.clone()).etag("\"v1\""));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;

    let file = cache.get(origin.url("ct/0042.nii.gz")).await.unwrap();
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(file.sha256(), sha256_hex(&body));
    assert_eq!(file.size(), body.len() as u64);
    assert_eq!(file.etag().as_deref(), Some("\"v1\""));
    assert!(file.path().starts_with(dir.path()));
    assert_eq!(file.path().file_name().unwrap(), "0042.nii.gz");
    assert_eq!(mode(file.path()), 0o600);
    assert_eq!(mode(file.path().parent().unwrap()), 0o700);
    assert_eq!(
        mode(&file.path().parent().unwrap().join("meta.json")),
        0o600
    );

    let again = cache.get(origin.url("ct/0042.nii.gz")).await.unwrap();
    assert_eq!(again.status(), CacheStatus::Hit);
    assert_eq!(again.path(), file.path());
    assert_eq!(origin.hits("ct/0042.nii.gz"), 1);

    let seen = &origin.seen()[0];
    assert_eq!(seen.header("accept-encoding"), Some("identity"));

    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.total_downloads), (1, 1, 1));
    assert_eq!(stats.hit_rate, 0.5);
    assert_eq!(stats.entries_count, 1);
    assert_eq!(stats.bytes_downloaded, body.len() as u64);
    assert_eq!(stats.bytes_served_from_cache, body.len() as u64);
    assert_eq!(stats.current_size_bytes, body.len() as u64);
    assert_eq!(stats.max_size_mb, 1024.0);
    assert!(temp_files(dir.path()).is_empty());

    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file.path().with_file_name("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["sha256"], sha256_hex(&body));
    assert_eq!(meta["size"], body.len() as u64);
    assert_eq!(meta["etag"], "\"v1\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_gets_make_one_request() {
    let origin = Origin::start().await;
    let body = volume(2, 4 * MB);
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("cold.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("cold.nii.gz");

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            let url = url.clone();
            tokio::spawn(async move { cache.get(url).await })
        })
        .collect();
    origin.wait_for_hits("cold.nii.gz", 1).await;
    gate.add_permits(1);
    let files: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();

    assert_eq!(origin.hits("cold.nii.gz"), 1);
    let first = files[0].path().to_owned();
    assert!(files.iter().all(|f| f.path() == first));
    assert!(files.iter().all(|f| f.sha256() == sha256_hex(&body)));
    assert_eq!(std::fs::read(&first).unwrap(), body);
    let downloaded = files
        .iter()
        .filter(|f| f.status() == CacheStatus::Downloaded)
        .count();
    let stats = cache.stats();
    assert_eq!(stats.total_downloads, 1);
    assert_eq!(stats.hits + stats.misses, 100);
    assert_eq!(stats.coalesced_waits, stats.misses - 1);
    assert_eq!(downloaded, 1);
    assert_eq!(stats.downloads_in_progress, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_first_caller_does_not_stop_the_download() {
    let origin = Origin::start().await;
    let body = volume(3, 2 * MB);
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("a.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("a.nii.gz");

    let first = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await }
    });
    origin.wait_for_hits("a.nii.gz", 1).await;
    let second = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await }
    });
    // A caller that gives up after a timeout is another form of cancellation.
    let third = tokio::time::timeout(Duration::from_millis(20), cache.get(&url)).await;
    assert!(
        third.is_err(),
        "the body is held, so the third caller times out"
    );
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    gate.add_permits(1);

    let file = second.await.unwrap().unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(origin.hits("a.nii.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_nobody_waits_for_still_completes_and_is_cached() {
    let origin = Origin::start().await;
    let body = volume(4, MB);
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("a.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("a.nii.gz");

    let only = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await }
    });
    origin.wait_for_hits("a.nii.gz", 1).await;
    only.abort();
    let _ = only.await;
    gate.add_permits(1);
    // Joins the download that is still running (or hits the entry it committed).
    let file = cache.get(&url).await.unwrap();
    assert_ne!(file.status(), CacheStatus::Downloaded);
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(origin.hits("a.nii.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_every_waiter_and_are_not_cached() {
    let origin = Origin::start().await;
    let (route, gate) = Route::status(503).gated();
    origin.route("flaky.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let url = origin.url("flaky.nii.gz");

    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (cache, url) = (cache.clone(), url.clone());
            tokio::spawn(async move { cache.get(url).await })
        })
        .collect();
    origin.wait_for_hits("flaky.nii.gz", 1).await;
    wait_until(|| cache.stats().coalesced_waits == 9).await;
    gate.add_permits(1);
    for result in join_all(tasks).await {
        let err = result.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::HttpStatus);
        assert_eq!(err.status(), Some(503));
        assert!(err.url().unwrap().ends_with("/flaky.nii.gz"));
    }
    assert_eq!(origin.hits("flaky.nii.gz"), 1);
    assert_eq!(cache.stats().errors, 1);
    assert_eq!(cache.stats().downloads_in_progress, 0);

    let body = volume(5, MB);
    origin.route("flaky.nii.gz", Route::ok(body.clone()));
    let file = cache.get(&url).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(origin.hits("flaky.nii.gz"), 2);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn not_found_and_refused_connections_are_clear_errors() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let err = cache.get(origin.url("missing.nii.gz")).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.status()),
        (ErrorKind::HttpStatus, Some(404))
    );
    assert!(!err.is_transient());

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = cache
        .get(format!("http://{closed}/x.nii.gz"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");
    assert!(err.is_transient());
    assert_eq!(cache.stats().entries_count, 0);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn broken_bodies_commit_nothing_and_the_next_call_downloads_again() {
    let origin = Origin::start().await;
    let body = volume(6, 2 * MB);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let cases = [
        ("close-0", Fault::CloseAfter(0)),
        ("close-half", Fault::CloseAfter(MB)),
        ("close-last-byte", Fault::CloseAfter(2 * MB - 1)),
        ("reset-half", Fault::ResetAfter(MB)),
        ("chunked-no-end", Fault::ChunkedNoEnd),
        ("no-answer", Fault::CloseImmediately),
    ];
    for (done, (name, fault)) in cases.into_iter().enumerate() {
        let path = format!("{name}.nii.gz");
        origin.route(&path, Route::ok(body.clone()).fault(fault));
        let err = cache.get(origin.url(&path)).await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Incomplete | ErrorKind::Network),
            "{name}: {err}"
        );
        assert!(err.is_transient(), "{name}");
        assert!(temp_files(dir.path()).is_empty(), "{name}: temp file left");
        assert_eq!(
            data_files(dir.path()).len(),
            done,
            "{name}: something committed"
        );
        origin.route(&path, Route::ok(body.clone()));
        let file = cache.get(origin.url(&path)).await.unwrap();
        assert_eq!(file.sha256(), sha256_hex(&body), "{name}");
        assert_eq!(origin.hits(&path), 2, "{name}");
    }
    assert_eq!(cache.stats().errors, cases.len() as u64);
}

#[tokio::test]
async fn chunked_bodies_without_length_are_cached() {
    let origin = Origin::start().await;
    let body = volume(7, MB + 3);
    origin.route("c.nii.gz", Route::ok(body.clone()).fault(Fault::Chunked));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let file = cache.get(origin.url("c.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
}

#[tokio::test]
async fn a_stalled_body_times_out_and_releases_the_slot() {
    let origin = Origin::start().await;
    origin.route(
        "stall.nii.gz",
        Route::ok(volume(8, MB)).fault(Fault::StallAfterHeaders),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = support::builder(dir.path(), &clock)
        .read_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let err = cache.get(origin.url("stall.nii.gz")).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(cache.stats().downloads_in_progress, 0);
    assert_eq!(cache.stats().reserved_bytes, 0);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn entries_expire_by_the_controlled_clock() {
    let origin = Origin::start().await;
    origin.route("t.nii.gz", Route::ok(volume(9, MB)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = open(dir.path()).await;
    let url = origin.url("t.nii.gz");

    let first = cache.get(&url).await.unwrap();
    let ttl = first
        .expires_at()
        .duration_since(first.fetched_at())
        .unwrap();
    assert_eq!(ttl, Duration::from_secs(24 * 3600));
    drop(first);
    clock.advance(Duration::from_secs(23 * 3600));
    assert!(cache.get_cached(&url).is_some());
    clock.advance(Duration::from_secs(3600));
    assert!(
        cache.get_cached(&url).is_none(),
        "expired entries are not served"
    );

    // Kept for revalidation and stale fallback during the grace period (7 days by default).
    let report = cache.cleanup().await.unwrap();
    assert_eq!((report.expired, report.evicted), (0, 0));
    assert_eq!(data_files(dir.path()).len(), 1);
    clock.advance(imgcache::DEFAULT_STALE_GRACE);
    let report = cache.cleanup().await.unwrap();
    assert_eq!((report.expired, report.evicted), (1, 0));
    assert_eq!(report.bytes_freed, MB as u64);
    assert!(data_files(dir.path()).is_empty());
    assert_eq!(cache.stats().expirations, 1);

    let again = cache.get(&url).await.unwrap();
    assert_eq!(again.status(), CacheStatus::Downloaded);
    assert_eq!(origin.hits("t.nii.gz"), 2);
}

#[tokio::test]
async fn per_call_ttl_and_default_ttl_changes() {
    let origin = Origin::start().await;
    origin.route("t.nii.gz", Route::ok(volume(10, 1000)));
    origin.route("u.nii.gz", Route::ok(volume(11, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = open(dir.path()).await;
    let url = origin.url("t.nii.gz");

    let short = GetOptions::new().ttl(Duration::from_secs(60));
    let file = cache.get_with(&url, short.clone()).await.unwrap();
    assert_eq!(
        file.expires_at().duration_since(file.fetched_at()).unwrap(),
        Duration::from_secs(60)
    );
    clock.advance(Duration::from_secs(61));
    assert!(cache.get_cached(&url).is_none());
    cache.get_with(&url, short.clone()).await.unwrap();
    assert_eq!(origin.hits("t.nii.gz"), 2);

    // A per-call TTL shorter than an entry's age asks for fresher bytes.
    clock.advance(Duration::from_secs(30));
    cache
        .get_with(&url, GetOptions::new().ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(origin.hits("t.nii.gz"), 3);

    cache.set_default_ttl(Duration::from_secs(5)).unwrap();
    assert_eq!(
        cache.set_default_ttl(Duration::ZERO).unwrap_err().kind(),
        ErrorKind::Config
    );
    let u = cache.get(origin.url("u.nii.gz")).await.unwrap();
    assert_eq!(
        u.expires_at().duration_since(u.fetched_at()).unwrap(),
        Duration::from_secs(5)
    );
    assert!((cache.stats().default_ttl_hours - 5.0 / 3600.0).abs() < 1e-9);
}

#[tokio::test]
async fn least_recently_used_entries_are_evicted_to_honour_the_cap() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["a", "b", "c", "d"], 20, MB);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_capped(dir.path(), 3 * MB as u64 + 100).await;
    let get = |n: &str| cache.get(origin.url(&format!("{n}.nii.gz")));
    drop(get("a").await.unwrap());
    drop(get("b").await.unwrap());
    drop(get("c").await.unwrap());
    drop(get("a").await.unwrap()); // a is now more recent than b
    drop(get("d").await.unwrap());

    let names: Vec<_> = data_files(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["a.nii.gz", "c.nii.gz", "d.nii.gz"]);
    let stats = cache.stats();
    assert_eq!(stats.evictions, 1);
    assert!(stats.current_size_bytes <= stats.max_size_bytes);
    assert!(cache.get_cached(origin.url("b.nii.gz")).is_none());

    // Lowering the cap evicts at once, least recently used first.
    cache.set_max_size_bytes(MB as u64 + 100).unwrap();
    let entries = cache.entries();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].url.ends_with("/d.nii.gz"));
}

#[tokio::test]
async fn a_pinned_entry_survives_eviction_invalidate_and_clear() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["a", "b", "c"], 30, MB);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_capped(dir.path(), 2 * MB as u64 + 100).await;
    let url = |n: &str| origin.url(&format!("{n}.nii.gz"));
    let held = cache.get(url("a")).await.unwrap(); // least recently used, but pinned
    drop(cache.get(url("b")).await.unwrap());
    drop(cache.get(url("c")).await.unwrap());
    assert!(held.path().exists());
    assert!(
        cache.get_cached(url("b")).is_none(),
        "b was evicted instead of the pinned a"
    );
    assert_eq!(std::fs::read(held.path()).unwrap(), volume(30, MB));

    // Invalidating a held file removes the entry now and the bytes when it is released.
    assert!(cache.invalidate(url("a")).await.unwrap());
    assert!(cache.get_cached(url("a")).is_none());
    assert_eq!(std::fs::read(held.path()).unwrap(), volume(30, MB));
    assert_eq!(cache.stats().pinned_entries, 1);
    let path = held.path().to_owned();
    drop(held);
    wait_until(|| !path.exists()).await;
    assert!(!path.parent().unwrap().exists());

    let c = cache.get(url("c")).await.unwrap();
    assert_eq!(cache.clear().await.unwrap(), 1);
    assert!(c.path().exists());
    assert_eq!(cache.stats().entries_count, 0);
    let path = c.path().to_owned();
    drop(c);
    wait_until(|| !path.exists()).await;
    wait_until(|| temp_files(dir.path()).is_empty()).await;
    assert_eq!(cache.stats().current_size_bytes, 0);
}

/// Removal of a released file runs on the blocking pool; wait for it (bounded).
async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn files_larger_than_the_cap_are_refused() {
    let origin = Origin::start().await;
    origin.route("big.nii.gz", Route::ok(volume(40, 3 * MB)));
    origin.route(
        "big-chunked.nii.gz",
        Route::ok(volume(41, 3 * MB)).fault(Fault::Chunked),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = support::builder(dir.path(), &clock)
        .max_size_bytes(2 * MB as u64)
        .build()
        .await
        .unwrap();
    for name in ["big.nii.gz", "big-chunked.nii.gz"] {
        let err = cache.get(origin.url(name)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge, "{name}: {err}");
    }
    assert!(files(&dir.path().join("v1/entries")).is_empty());
    assert!(temp_files(dir.path()).is_empty());
    assert_eq!(cache.stats().reserved_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_downloads_reserve_space_and_never_overshoot_the_cap() {
    let origin = Origin::start().await;
    let mut gates = Vec::new();
    for i in 0..4u64 {
        let (route, gate) = Route::ok(volume(50 + i, MB)).gated_body();
        origin.route(&format!("{i}.nii.gz"), route);
        gates.push(gate);
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = support::builder(dir.path(), &clock)
        .max_size_bytes(2 * MB as u64 + 100)
        .build()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let (cache, url) = (cache.clone(), origin.url(&format!("{i}.nii.gz")));
            tokio::spawn(async move { cache.get(url).await.map(|f| f.size()) })
        })
        .collect();
    for i in 0..4 {
        origin.wait_for_hits(&format!("{i}.nii.gz"), 1).await;
    }
    // All four are reserved at once, from their Content-Length, before any body arrives.
    wait_until(|| cache.stats().reserved_bytes == 4 * MB as u64).await;
    for gate in &gates {
        gate.add_permits(1);
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), MB as u64);
    }
    let stats = cache.stats();
    assert_eq!(stats.reserved_bytes, 0);
    assert!(
        stats.current_size_bytes <= stats.max_size_bytes,
        "{stats:?}"
    );
    assert_eq!(stats.entries_count, 2);
    assert_eq!(data_files(dir.path()).len(), 2);
}

#[tokio::test]
async fn restart_keeps_entries_counters_and_lru_order() {
    let origin = Origin::start().await;
    origin.route("a.nii.gz", Route::ok(volume(60, MB)));
    origin.route("b.nii.gz", Route::ok(volume(61, MB)));
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _clock) = open(dir.path()).await;
        drop(cache.get(origin.url("a.nii.gz")).await.unwrap());
        drop(cache.get(origin.url("b.nii.gz")).await.unwrap());
        drop(cache.get(origin.url("a.nii.gz")).await.unwrap());
        cache.shutdown().await;
        let err = cache.get(origin.url("a.nii.gz")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Shutdown);
    }
    let (cache, _clock) = open(dir.path()).await;
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.total_downloads), (1, 2, 2));
    assert_eq!(stats.entries_count, 2);
    assert_eq!(stats.current_size_bytes, 2 * MB as u64);
    assert_eq!(cache.entries()[0].hits, 1);
    let a = cache.get(origin.url("a.nii.gz")).await.unwrap();
    assert_eq!(a.status(), CacheStatus::Hit);
    assert_eq!(origin.hits("a.nii.gz"), 1);
    drop(a);
    // b is the least recently used across the restart.
    cache.set_max_size_bytes(MB as u64 + 1).unwrap();
    assert!(cache.get_cached(origin.url("a.nii.gz")).is_some());
    assert!(cache.get_cached(origin.url("b.nii.gz")).is_none());
}

#[tokio::test]
async fn state_is_saved_when_the_cache_is_dropped_without_shutdown() {
    let origin = Origin::start().await;
    origin.route("a.nii.gz", Route::ok(volume(62, 1000)));
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _clock) = open(dir.path()).await;
        drop(cache.get(origin.url("a.nii.gz")).await.unwrap());
        drop(cache.get(origin.url("a.nii.gz")).await.unwrap());
    }
    let (cache, _clock) = open(dir.path()).await;
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(cache.stats().total_downloads, 1);
}

#[tokio::test]
async fn one_process_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let clock = Arc::new(imgcache::ManualClock::new());
    let err = support::builder(dir.path(), &clock)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked);
    drop(cache);
    support::builder(dir.path(), &clock).build().await.unwrap();
}

#[tokio::test]
async fn recovery_removes_orphans_and_keeps_valid_entries() {
    let origin = Origin::start().await;
    let names = [
        "good", "no-meta", "no-data", "bad-json", "short", "modified",
    ];
    for (i, n) in names.iter().enumerate() {
        origin.route(
            &format!("{n}.nii.gz"),
            Route::ok(volume(70 + i as u64, 100_000)),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut paths = std::collections::HashMap::new();
    {
        let (cache, _clock) = open(dir.path()).await;
        for n in names {
            let f = cache.get(origin.url(&format!("{n}.nii.gz"))).await.unwrap();
            paths.insert(n, f.path().to_owned());
        }
        cache.shutdown().await;
    }
    let meta = |n: &str| paths[n].with_file_name("meta.json");
    std::fs::remove_file(meta("no-meta")).unwrap();
    std::fs::remove_file(&paths["no-data"]).unwrap();
    std::fs::write(meta("bad-json"), b"{ not json").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths["short"])
        .unwrap();
    f.set_len(50_000).unwrap();
    drop(f);
    std::fs::write(&paths["modified"], volume(99, 100_000)).unwrap();
    let tmp = dir.path().join("v1/tmp");
    std::fs::write(tmp.join("abc.123.part"), b"partial").unwrap();
    std::fs::write(dir.path().join("v1/entries/stray.txt"), b"?").unwrap();
    std::fs::write(dir.path().join("v1/state.json"), b"garbage").unwrap();

    let (cache, _clock) = open(dir.path()).await;
    let stats = cache.stats();
    assert_eq!(stats.entries_count, 1);
    assert_eq!(stats.current_size_bytes, 100_000);
    assert_eq!(stats.hits, 0, "a corrupt state.json restarts the counters");
    assert!(temp_files(dir.path()).is_empty());
    let left = files(&dir.path().join("v1/entries"));
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(cache.get_cached(origin.url("good.nii.gz")).is_some());
    for n in &names[1..] {
        assert!(
            cache
                .get_cached(origin.url(&format!("{n}.nii.gz")))
                .is_none(),
            "{n}"
        );
        let again = cache.get(origin.url(&format!("{n}.nii.gz"))).await.unwrap();
        assert_eq!(
            again.sha256(),
            sha256_hex(&volume(
                71 + names[1..].iter().position(|x| x == n).unwrap() as u64,
                100_000
            ))
        );
    }
}

#[tokio::test]
async fn a_damaged_file_is_detected_on_the_hit_path_and_fetched_again() {
    let origin = Origin::start().await;
    let body = volume(80, MB);
    origin.route("d.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("d.nii.gz");
    let path = cache.get(&url).await.unwrap().path().to_owned();

    // Truncated.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(10)
        .unwrap();
    let again = cache.get(&url).await.unwrap();
    assert_eq!(again.status(), CacheStatus::Downloaded);
    assert_eq!(std::fs::read(again.path()).unwrap(), body);
    drop(again);
    // Rewritten with other bytes of the same length (mtime changes).
    std::fs::write(&path, volume(81, MB)).unwrap();
    let third = cache.get(&url).await.unwrap();
    assert_eq!(third.status(), CacheStatus::Downloaded);
    assert_eq!(std::fs::read(third.path()).unwrap(), body);
    assert_eq!(cache.stats().integrity_failures, 2);
    assert_eq!(origin.hits("d.nii.gz"), 3);
}

#[tokio::test]
async fn verify_finds_a_flipped_byte_that_the_cheap_check_cannot() {
    let origin = Origin::start().await;
    origin.route("v.nii.gz", Route::ok(volume(90, MB)));
    origin.route("w.nii.gz", Route::ok(volume(91, MB)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let v = cache
        .get(origin.url("v.nii.gz"))
        .await
        .unwrap()
        .path()
        .to_owned();
    drop(cache.get(origin.url("w.nii.gz")).await.unwrap());
    assert_eq!(
        cache.verify(origin.url("v.nii.gz")).await.unwrap(),
        Verification::Ok
    );

    // Flip one byte and restore the mtime, so size and mtime still match.
    let mtime = std::fs::metadata(&v).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&v).unwrap();
    bytes[MB / 2] ^= 0xff;
    std::fs::write(&v, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&v)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(
        cache.get_cached(origin.url("v.nii.gz")).is_some(),
        "the cheap check passes"
    );

    let report = cache.verify_all().await.unwrap();
    assert_eq!(report.checked, 2);
    assert_eq!(report.corrupt.len(), 1);
    assert!(report.corrupt[0].ends_with("/v.nii.gz"));
    assert!(!v.exists());
    assert_eq!(
        cache.verify(origin.url("v.nii.gz")).await.unwrap(),
        Verification::NotCached
    );
    assert_eq!(cache.stats().integrity_failures, 1);
    assert_eq!(cache.stats().entries_count, 1);
}

#[tokio::test]
async fn an_expected_digest_that_does_not_match_caches_nothing() {
    let origin = Origin::start().await;
    let body = volume(100, MB);
    origin.route("s.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("s.nii.gz");
    let wrong = "0".repeat(64);
    let err = cache
        .get_with(&url, GetOptions::new().expected_sha256(&wrong))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
    assert!(err.to_string().contains(&sha256_hex(&body)), "{err}");
    assert!(data_files(dir.path()).is_empty());
    assert!(temp_files(dir.path()).is_empty());

    let right = sha256_hex(&body).to_uppercase();
    let file = cache
        .get_with(&url, GetOptions::new().expected_sha256(&right))
        .await
        .unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    // A cached entry with another digest is downloaded again and still refused.
    let err = cache
        .get_with(&url, GetOptions::new().expected_sha256(&wrong))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
    assert!(cache.get_cached(&url).is_some(), "the good entry is kept");
}

#[tokio::test]
async fn refresh_replaces_the_entry_while_open_readers_keep_their_bytes() {
    let origin = Origin::start().await;
    let old = volume(110, MB);
    let new = volume(111, MB);
    origin.route("r.nii.gz", Route::ok(old.clone()).etag("\"1\""));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("r.nii.gz");
    let held = cache.get(&url).await.unwrap();
    let mut reader = std::fs::File::open(held.path()).unwrap();

    origin.route("r.nii.gz", Route::ok(new.clone()).etag("\"2\""));
    let fresh = cache.refresh(&url).await.unwrap();
    assert_eq!(fresh.status(), CacheStatus::Downloaded);
    assert_eq!(fresh.sha256(), sha256_hex(&new));
    assert_eq!(fresh.etag().as_deref(), Some("\"2\""));
    let mut kept = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut kept).unwrap();
    assert_eq!(kept, old, "an open reader keeps the old bytes");
    assert_eq!(std::fs::read(fresh.path()).unwrap(), new);
    drop(held);
    drop(fresh);
    assert_eq!(cache.stats().entries_count, 1);
    assert_eq!(cache.stats().current_size_bytes, MB as u64);
    assert_eq!(cache.get_cached(&url).unwrap().sha256(), sha256_hex(&new));
    assert_eq!(data_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn relative_urls_use_the_image_server() {
    let origin = Origin::start().await;
    let body = volume(120, 5000);
    origin.route("data/ct/0042.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = support::builder(dir.path(), &clock)
        .image_server(origin.url("data"))
        .build()
        .await
        .unwrap();
    let rel = cache.get("ct/0042.nii.gz").await.unwrap();
    let abs = cache.get(origin.url("data/ct/0042.nii.gz")).await.unwrap();
    assert_eq!(rel.path(), abs.path());
    assert_eq!(abs.status(), CacheStatus::Hit);
    assert_eq!(std::fs::read(rel.path()).unwrap(), body);
    for hostile in [
        "../secret.nii.gz",
        "/etc/passwd",
        "%2e%2e/x.nii.gz",
        "//evil/x",
    ] {
        let err = cache.get(hostile).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{hostile}");
    }
    assert_eq!(origin.total_hits(), 1);
}

#[tokio::test]
async fn hostile_urls_cannot_escape_the_cache_directory() {
    let origin = Origin::start().await;
    let long = format!("{}.nii.gz", "x".repeat(5000));
    let paths = [
        "a/..%2F..%2F..%2Fescape.nii.gz".to_owned(),
        "a%5C..%5C..%5Cescape.nii.gz".to_owned(),
        "dir/".to_owned(),
        "%00.nii.gz".to_owned(),
        "meta.json".to_owned(),
        long.clone(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    for (i, p) in paths.iter().enumerate() {
        let body = volume(130 + i as u64, 2000);
        // The origin sees the path as sent; route it exactly.
        origin.route(p, Route::ok(body.clone()));
        let file = cache.get(origin.url(p)).await.unwrap();
        let canonical = file.path().canonicalize().unwrap();
        assert!(
            canonical.starts_with(dir.path().canonicalize().unwrap().join("v1/entries")),
            "{p}"
        );
        assert!(file.path().file_name().unwrap().len() <= 120, "{p}");
        assert_ne!(file.path().file_name().unwrap(), "meta.json");
        assert_eq!(std::fs::read(file.path()).unwrap(), body, "{p}");
    }
    assert!(!dir.path().join("escape.nii.gz").exists());
    assert_eq!(cache.stats().entries_count, paths.len() as u64);

    for bad in [
        "ftp://h/x",
        "file:///etc/passwd",
        "",
        "http://",
        "no scheme",
    ] {
        assert_eq!(
            cache.get(bad).await.unwrap_err().kind(),
            ErrorKind::InvalidUrl,
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn credentials_are_sent_but_never_stored_or_shown() {
    let origin = Origin::start().await;
    origin.route("private.nii.gz", Route::ok(volume(140, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = format!("http://alice:s3cret@{}/private.nii.gz", origin.addr());
    let file = cache.get(&url).await.unwrap();
    let auth = origin.seen()[0].header("authorization").map(str::to_owned);
    assert_eq!(auth.as_deref(), Some("Basic YWxpY2U6czNjcmV0"));
    assert!(!file.url().contains("s3cret"));
    for f in files(dir.path()) {
        let text =
            String::from_utf8_lossy(&std::fs::read(dir.path().join(&f)).unwrap()).into_owned();
        assert!(!text.contains("s3cret"), "{f:?} holds the password");
    }
    // The same resource without credentials is the same entry.
    let plain = cache.get(origin.url("private.nii.gz")).await.unwrap();
    assert_eq!(plain.status(), CacheStatus::Hit);
    origin.route("private.nii.gz", Route::status(401));
    let other = format!("http://bob:hunter2@{}/other.nii.gz", origin.addr());
    let err = cache.get(&other).await.unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_sweeper_expires_entries() {
    let origin = Origin::start().await;
    origin.route("s.nii.gz", Route::ok(volume(150, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = ImageCache::builder()
        .cache_dir(dir.path())
        .clock(Arc::clone(&clock) as Arc<dyn imgcache::Clock>)
        .stale_grace(Duration::ZERO)
        .sweep_interval(Duration::from_millis(20))
        .build()
        .await
        .unwrap();
    drop(cache.get(origin.url("s.nii.gz")).await.unwrap());
    clock.advance(Duration::from_secs(25 * 3600));
    // The sweeper runs on its own schedule; wait (bounded) for it to act.
    wait_until(|| cache.stats().expirations == 1).await;
    assert!(data_files(dir.path()).is_empty());
    wait_until(|| dir.path().join("v1/state.json").exists()).await;
    cache.shutdown().await;
}

#[tokio::test]
async fn the_body_is_stored_exactly_as_sent() {
    // A .nii.gz served with Content-Encoding: gzip must not be inflated.
    let origin = Origin::start().await;
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    gz.extend_from_slice(&volume(160, 5000));
    origin.route(
        "g.nii.gz",
        Route::ok(gz.clone()).header("Content-Encoding", "gzip"),
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let file = cache.get(origin.url("g.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), gz);
}

#[tokio::test]
async fn shared_group_mode_is_configurable() {
    let origin = Origin::start().await;
    origin.route("m.nii.gz", Route::ok(volume(170, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = support::builder(dir.path(), &clock)
        .file_mode(0o640)
        .build()
        .await
        .unwrap();
    let file = cache.get(origin.url("m.nii.gz")).await.unwrap();
    assert_eq!(mode(file.path()), 0o640);
    assert_eq!(mode(file.path().parent().unwrap()), 0o750);
}

#[tokio::test]
async fn urls_may_be_str_string_or_url() {
    let origin = Origin::start().await;
    origin.route("k.nii.gz", Route::ok(volume(180, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let text: String = origin.url("k.nii.gz");
    let parsed = url::Url::parse(&text).unwrap();
    let a = cache.get(text.as_str()).await.unwrap();
    let b = cache.get(text.clone()).await.unwrap();
    let c = cache.get(&parsed).await.unwrap();
    let d = cache.get(parsed).await.unwrap();
    assert!([&b, &c, &d].iter().all(|f| f.path() == a.path()));
    assert_eq!(origin.hits("k.nii.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_that_fail_at_once_never_leave_a_temp_file() {
    // A failure right after the headers races the writer thread that creates the temp file;
    // the file must be removed whichever side wins.
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let body = volume(190, 100_000);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let path = format!("fail-{i}.nii.gz");
            origin.route(&path, Route::ok(body.clone()).fault(Fault::CloseAfter(10)));
            let (cache, url) = (cache.clone(), origin.url(&path));
            tokio::spawn(async move { cache.get(url).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err().kind(), ErrorKind::Incomplete);
    }
    wait_until(|| temp_files(dir.path()).is_empty()).await;
    assert!(data_files(dir.path()).is_empty());
}
