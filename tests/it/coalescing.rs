//! Coalescing and cancellation: one download per URL however many callers, and callers that go away.

use std::time::Duration;

use futures_util::future::join_all;
use imgcache::{CacheStatus, ErrorKind, GetOptions, ImageCache};

use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{open, open_without_retries, temp_files, wait_until};

use crate::MB;

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
    // 99 of the 100 requests caused no download, whether they came early or late.
    assert_eq!(stats.reuse_rate, 0.99);
    assert!(stats.hit_rate < stats.reuse_rate);
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

/// Starts a download of `url` with `first` and joins it with `second`; returns both results.
async fn joined(
    cache: &ImageCache,
    origin: &Origin,
    path: &str,
    gate: &std::sync::Arc<tokio::sync::Semaphore>,
    first: GetOptions,
    second: GetOptions,
) -> (
    imgcache::Result<imgcache::CachedFile>,
    imgcache::Result<imgcache::CachedFile>,
) {
    let url = origin.url(path);
    let a = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get_with(url, first).await }
    });
    origin.wait_for_hits(path, 1).await;
    let waits = cache.stats().coalesced_waits;
    let b = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get_with(url, second).await }
    });
    wait_until(|| cache.stats().coalesced_waits == waits + 1).await;
    gate.add_permits(1);
    (a.await.unwrap(), b.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_digest_fails_that_caller_alone() {
    let origin = Origin::start().await;
    let body = volume(130, MB);
    let right = sha256_hex(&body);
    let wrong = "0".repeat(64);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let digest = |d: &str| GetOptions::new().expected_sha256(d);

    // A wrong digest started it; a caller without one joined: only the first fails.
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("a.nii.gz", route);
    let (a, b) = joined(
        &cache,
        &origin,
        "a.nii.gz",
        &gate,
        digest(&wrong),
        GetOptions::new(),
    )
    .await;
    assert_eq!(a.unwrap_err().kind(), ErrorKind::ChecksumMismatch);
    let b = b.expect("the caller without a digest gets the file");
    assert_eq!(std::fs::read(b.path()).unwrap(), body);
    assert_eq!(origin.hits("a.nii.gz"), 1, "one download for both");
    assert!(
        cache.get_cached(origin.url("a.nii.gz")).is_some(),
        "and it is cached"
    );

    // The right digest started it, a wrong one joined: the second fails, the file is kept.
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("b.nii.gz", route);
    let (a, b) = joined(
        &cache,
        &origin,
        "b.nii.gz",
        &gate,
        digest(&right),
        digest(&wrong),
    )
    .await;
    assert_eq!(a.unwrap().sha256(), right);
    assert_eq!(b.unwrap_err().kind(), ErrorKind::ChecksumMismatch);
    assert!(cache.get_cached(origin.url("b.nii.gz")).is_some());

    // Two wrong digests: both fail and nothing is cached.
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("c.nii.gz", route);
    let (a, b) = joined(
        &cache,
        &origin,
        "c.nii.gz",
        &gate,
        digest(&wrong),
        digest(&"1".repeat(64)),
    )
    .await;
    assert_eq!(a.unwrap_err().kind(), ErrorKind::ChecksumMismatch);
    assert_eq!(b.unwrap_err().kind(), ErrorKind::ChecksumMismatch);
    assert!(cache.get_cached(origin.url("c.nii.gz")).is_none());
    assert_eq!(origin.hits("c.nii.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_short_ttl_does_not_shorten_the_entry_for_the_others() {
    let origin = Origin::start().await;
    let (route, gate) = Route::ok(volume(131, MB)).gated();
    origin.route("t.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let short = GetOptions::new().ttl(Duration::from_secs(60));
    let (a, b) = joined(&cache, &origin, "t.nii.gz", &gate, short, GetOptions::new()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let lifetime =
        |f: &imgcache::CachedFile| f.expires_at().duration_since(f.fetched_at()).unwrap();
    assert_eq!(
        lifetime(&b),
        Duration::from_secs(24 * 3600),
        "the default TTL of the joined caller"
    );
    assert_eq!(a.path(), b.path());
}

/// Every way in is admitted the same way: a `get`, a stream read in part and dropped, a `get`
/// cancelled while it waits and a stream read to its end, all on one cold URL, make one
/// download, three coalesced waits and four misses, each counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_way_in_counts_its_miss_once() {
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    let origin = Origin::start().await;
    let body = volume(77, 3 * MB);
    let (route, gate) = Route::ok(body.clone()).pause_at(MB);
    origin.route("ways.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("ways.nii.gz");

    let first = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await }
    });
    origin.wait_for_hits("ways.nii.gz", 1).await;
    // A stream that reads a header from the bytes on disk, then goes away.
    let mut header = cache.get_stream(&url).await.unwrap();
    let mut head = [0u8; 352];
    header.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..], &body[..352]);
    drop(header);
    // A get that gives up while it waits.
    let cancelled = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await }
    });
    wait_until(|| cache.stats().coalesced_waits == 2).await;
    cancelled.abort();
    let _ = cancelled.await;
    // A stream read to its end.
    let whole = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move {
            let stream = cache.get_stream(url).await.unwrap();
            let chunks: Vec<_> = stream.collect().await;
            chunks
                .into_iter()
                .map(|c| c.unwrap())
                .collect::<Vec<_>>()
                .concat()
        }
    });
    wait_until(|| cache.stats().coalesced_waits == 3).await;
    gate.add_permits(1);

    let file = first.await.unwrap().unwrap();
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert_eq!(whole.await.unwrap(), body);
    let stats = cache.stats();
    assert_eq!(origin.hits("ways.nii.gz"), 1);
    assert_eq!(stats.total_downloads, 1);
    assert_eq!(stats.coalesced_waits, 3);
    assert_eq!((stats.hits, stats.misses), (0, 4));
    // Now a hit, through each way in, counted once each.
    let _ = cache.get(&url).await.unwrap();
    let _ = cache.get_cached(&url).unwrap();
    let stream = cache.get_stream(&url).await.unwrap();
    assert_eq!(stream.status(), CacheStatus::Hit);
    drop(stream);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (3, 4));
}
