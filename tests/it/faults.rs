//! The fault suite: a misbehaving origin on 127.0.0.1, and what callers get. Every case checks
//! the bytes and SHA-256 callers receive, the requests the origin saw, and that no temp file
//! is left behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::origin::{Fault, Origin, Route, sha256_hex, volume};
use crate::support::{builder, data_files, temp_files};
use imgcache::{CacheStatus, ErrorKind, ImageCache, ManualClock};

use crate::MB;

async fn cache(dir: &std::path::Path) -> (ImageCache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    (builder(dir, &clock).build().await.unwrap(), clock)
}

/// Asserts that `file` holds exactly `body`.
fn assert_bytes(file: &imgcache::CachedFile, body: &[u8]) {
    let on_disk = std::fs::read(file.path()).unwrap();
    assert_eq!(on_disk.len(), body.len());
    assert!(on_disk == body, "bytes differ");
    assert_eq!(file.sha256(), sha256_hex(body));
}

#[tokio::test]
async fn a_body_cut_off_midway_resumes_with_range_and_if_range() {
    let body = volume(1, 4 * MB);
    // Reset or close at 0 %, 50 % and 99.99 %: the next attempt continues where it stopped.
    let cuts = [
        ("reset-0", Fault::ResetAfter(0)),
        ("reset-half", Fault::ResetAfter(2 * MB)),
        ("reset-last", Fault::ResetAfter(4 * MB - 400)),
        ("close-half", Fault::CloseAfter(2 * MB)),
        ("chunked-no-end", Fault::ChunkedNoEnd),
    ];
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    for (name, fault) in cuts {
        let path = format!("{name}.nii.gz");
        origin.route_seq(
            &path,
            vec![
                Route::ok(body.clone()).etag("\"v1\"").fault(fault),
                Route::ok(body.clone()).etag("\"v1\""),
            ],
        );
        let file = cache.get(origin.url(&path)).await.unwrap();
        assert_bytes(&file, &body);
        // A chunked body that lost only its terminator had sent every byte: the resume asks
        // for bytes past the end, gets 416, and the download starts again from zero.
        let expected = if name == "chunked-no-end" { 3 } else { 2 };
        assert_eq!(origin.hits(&path), expected, "{name}");
        let second = origin
            .seen()
            .into_iter()
            .filter(|s| s.path == format!("/{path}"))
            .nth(1)
            .unwrap();
        if name == "reset-0" {
            assert_eq!(second.header("range"), None, "nothing to resume at 0 %");
        } else {
            let range = second.header("range").expect("resumed with Range");
            let offset: usize = range["bytes=".len()..range.len() - 1].parse().unwrap();
            assert!(offset > 0 && offset <= 4 * MB, "{name}: {range}");
            assert_eq!(second.header("if-range"), Some("\"v1\""), "{name}");
        }
        assert!(temp_files(dir.path()).is_empty(), "{name}");
    }
    let stats = cache.stats();
    assert_eq!(stats.resumes, 3);
    assert_eq!(stats.retries, 6);
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.total_downloads, 5);
}

#[tokio::test]
async fn a_server_that_ignores_range_restarts_from_zero_without_appending() {
    let origin = Origin::start().await;
    let body = volume(2, 3 * MB);
    origin.route_seq(
        "x.nii.gz",
        vec![
            Route::ok(body.clone())
                .etag("\"a\"")
                .fault(Fault::CloseAfter(MB)),
            Route::ok(body.clone()).etag("\"a\"").ignore_range(),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    let file = cache.get(origin.url("x.nii.gz")).await.unwrap();
    assert_bytes(&file, &body);
    assert_eq!(origin.hits("x.nii.gz"), 2);
    assert_eq!(cache.stats().resumes, 0);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn without_a_validator_a_partial_is_never_resumed() {
    let origin = Origin::start().await;
    let body = volume(3, 2 * MB);
    origin.route_seq(
        "n.nii.gz",
        vec![
            Route::ok(body.clone()).fault(Fault::CloseAfter(MB)),
            Route::ok(body.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    let file = cache.get(origin.url("n.nii.gz")).await.unwrap();
    assert_bytes(&file, &body);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("range"), None);
}

#[tokio::test]
async fn the_origin_changing_between_cut_and_resume_restarts_with_the_new_version() {
    let origin = Origin::start().await;
    let old = volume(4, 2 * MB);
    let new = volume(5, 2 * MB + 123);
    origin.route_seq(
        "c.nii.gz",
        vec![
            Route::ok(old.clone())
                .etag("\"old\"")
                .fault(Fault::ResetAfter(MB)),
            // If-Range names "old", so the server answers 200 with the whole new version.
            Route::ok(new.clone()).etag("\"new\""),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    let file = cache.get(origin.url("c.nii.gz")).await.unwrap();
    assert_bytes(&file, &new);
    assert_eq!(file.etag().as_deref(), Some("\"new\""));
    assert_eq!(origin.seen()[1].header("if-range"), Some("\"old\""));
    assert_eq!(cache.stats().resumes, 0);
}

#[tokio::test]
async fn a_refused_range_416_restarts_from_zero() {
    let origin = Origin::start().await;
    let body = volume(6, 2 * MB);
    let shorter = volume(7, 1000);
    origin.route_seq(
        "r.nii.gz",
        vec![
            Route::ok(body.clone())
                .etag("\"1\"")
                .fault(Fault::CloseAfter(MB)),
            // Still "1" but now shorter than the offset asked for: 416.
            Route::ok(shorter.clone()).etag("\"1\""),
            Route::ok(body.clone()).etag("\"1\""),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    let file = cache.get(origin.url("r.nii.gz")).await.unwrap();
    assert_bytes(&file, &body);
    assert_eq!(origin.hits("r.nii.gz"), 3);
    assert!(
        origin.seen()[2].header("range").is_none(),
        "restarted from zero"
    );
}

#[tokio::test]
async fn a_weak_etag_resumes_only_with_last_modified() {
    let origin = Origin::start().await;
    let body = volume(8, 2 * MB);
    let date = "Tue, 24 Nov 2026 10:00:00 GMT";
    origin.route_seq(
        "w.nii.gz",
        vec![
            Route::ok(body.clone())
                .etag("W/\"weak\"")
                .last_modified(date)
                .fault(Fault::CloseAfter(MB)),
            Route::ok(body.clone())
                .etag("W/\"weak\"")
                .last_modified(date),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    let file = cache.get(origin.url("w.nii.gz")).await.unwrap();
    assert_bytes(&file, &body);
    assert_eq!(origin.seen()[1].header("if-range"), Some(date));
    assert_eq!(cache.stats().resumes, 1);
}

#[tokio::test]
async fn service_unavailable_n_times_then_success() {
    let origin = Origin::start().await;
    let body = volume(9, MB);
    origin.route_seq(
        "u.nii.gz",
        vec![
            Route::status(503),
            Route::status(502),
            Route::status(429),
            Route::ok(body.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = cache(dir.path()).await;
    let file = cache.get(origin.url("u.nii.gz")).await.unwrap();
    assert_bytes(&file, &body);
    assert_eq!(origin.hits("u.nii.gz"), 4);
    assert_eq!(cache.stats().retries, 3);
}

#[tokio::test]
async fn retries_are_bounded_and_client_errors_are_not_retried() {
    let origin = Origin::start().await;
    origin.route("down.nii.gz", Route::status(500));
    origin.route("missing.nii.gz", Route::status(404));
    origin.route("denied.nii.gz", Route::status(403));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.retries(2))
        .build()
        .await
        .unwrap();
    let err = cache.get(origin.url("down.nii.gz")).await.unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert_eq!(origin.hits("down.nii.gz"), 3, "1 attempt + 2 retries");
    for (path, status) in [("missing.nii.gz", 404), ("denied.nii.gz", 403)] {
        let err = cache.get(origin.url(path)).await.unwrap_err();
        assert_eq!(
            (err.kind(), err.status()),
            (ErrorKind::HttpStatus, Some(status))
        );
        assert_eq!(origin.hits(path), 1, "{path} is not retried");
    }
    assert_eq!(cache.stats().errors, 3);
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let origin = Origin::start().await;
    let body = volume(10, 1000);
    origin.route_seq(
        "later.nii.gz",
        vec![
            Route::status(503).header("Retry-After", "1"),
            Route::ok(body.clone()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.retry_max_delay(Duration::from_secs(5)))
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let file = cache.get(origin.url("later.nii.gz")).await.unwrap();
    // A lower bound only: the wait cannot be shorter than the server asked.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_bytes(&file, &body);
    assert_eq!(origin.hits("later.nii.gz"), 2);
}

#[tokio::test]
async fn a_stalled_or_trickling_origin_fails_in_bounded_time() {
    let origin = Origin::start().await;
    origin.route(
        "stall.nii.gz",
        Route::ok(volume(11, MB)).fault(Fault::StallAfterHeaders),
    );
    // One byte every 50 ms never trips the idle timeout; the total deadline catches it.
    origin.route(
        "trickle.nii.gz",
        Route::ok(volume(12, MB)).piece(1).rate(20),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.read_timeout(Duration::from_millis(300)))
        .network(|n| n.download_timeout(Duration::from_secs(2)))
        .network(|n| n.retries(1))
        .build()
        .await
        .unwrap();
    let err = cache.get(origin.url("stall.nii.gz")).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(origin.hits("stall.nii.gz"), 2);
    let err = cache.get(origin.url("trickle.nii.gz")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network);
    assert!(err.to_string().contains("longer than"), "{err}");
    let stats = cache.stats();
    assert_eq!((stats.downloads_in_progress, stats.reserved_bytes), (0, 0));
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test]
async fn a_server_that_sends_without_end_cannot_fill_the_disk() {
    let origin = Origin::start().await;
    origin.route(
        "endless.nii.gz",
        Route::ok(volume(13, 3 * MB)).fault(Fault::Chunked),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .max_file_size_bytes(MB as u64)
        .build()
        .await
        .unwrap();
    let err = cache.get(origin.url("endless.nii.gz")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    assert_eq!(origin.hits("endless.nii.gz"), 1, "too large is not retried");
    assert!(temp_files(dir.path()).is_empty());
    assert!(data_files(dir.path()).is_empty());
}

#[tokio::test]
async fn not_modified_renews_the_entry_without_a_download() {
    let origin = Origin::start().await;
    let body = volume(14, 2 * MB);
    origin.route("v.nii.gz", Route::ok(body.clone()).etag("\"same\""));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = cache(dir.path()).await;
    let url = origin.url("v.nii.gz");
    let first = cache.get(&url).await.unwrap();
    let first_expiry = first.expires_at();
    drop(first);
    clock.advance(Duration::from_secs(25 * 3600));
    let renewed = cache.get(&url).await.unwrap();
    assert_eq!(renewed.status(), CacheStatus::Revalidated);
    assert_bytes(&renewed, &body);
    assert!(renewed.expires_at() > first_expiry);
    assert_eq!(origin.seen()[1].header("if-none-match"), Some("\"same\""));
    let stats = cache.stats();
    assert_eq!(stats.revalidations, 1);
    assert_eq!(stats.bytes_downloaded, body.len() as u64, "no second body");
    assert_eq!(stats.total_downloads, 1);
    // The renewal is on disk: a restart keeps the new expiry.
    let expiry = renewed.expires_at();
    drop(renewed);
    cache.shutdown().await;
    drop(cache);
    let (cache, _clock) = self::cache(dir.path()).await;
    let entry = &cache.admin().entries()[0];
    assert_eq!(
        std::time::UNIX_EPOCH + Duration::from_millis(entry.expires_at_ms),
        expiry
    );
}

#[tokio::test]
async fn last_modified_alone_revalidates_with_if_modified_since() {
    let origin = Origin::start().await;
    let date = "Mon, 23 Nov 2026 08:00:00 GMT";
    origin.route("lm.nii.gz", Route::ok(volume(15, 1000)).last_modified(date));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = cache(dir.path()).await;
    drop(cache.get(origin.url("lm.nii.gz")).await.unwrap());
    clock.advance(Duration::from_secs(25 * 3600));
    let file = cache.get(origin.url("lm.nii.gz")).await.unwrap();
    assert_eq!(file.status(), CacheStatus::Revalidated);
    assert_eq!(origin.seen()[1].header("if-modified-since"), Some(date));
}

#[tokio::test]
async fn a_changed_etag_replaces_the_entry_while_open_readers_keep_their_bytes() {
    let origin = Origin::start().await;
    let old = volume(16, 2 * MB);
    let new = volume(17, 2 * MB);
    origin.route("e.nii.gz", Route::ok(old.clone()).etag("\"1\""));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = cache(dir.path()).await;
    let url = origin.url("e.nii.gz");
    let held = cache.get(&url).await.unwrap();
    let mut reader = std::fs::File::open(held.path()).unwrap();
    origin.route("e.nii.gz", Route::ok(new.clone()).etag("\"2\""));
    clock.advance(Duration::from_secs(25 * 3600));
    let fresh = cache.get(&url).await.unwrap();
    assert_eq!(fresh.status(), CacheStatus::Downloaded);
    assert_bytes(&fresh, &new);
    let mut kept = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut kept).unwrap();
    assert!(kept == old, "an open reader keeps the old bytes");
    assert_eq!(cache.stats().revalidations, 0);
    // The holder's path still holds the old version; it goes when released.
    assert_ne!(held.path(), fresh.path());
    assert_eq!(std::fs::read(held.path()).unwrap(), old);
    assert_eq!(data_files(dir.path()).len(), 2);
    drop(held);
    assert_eq!(data_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn an_entry_without_validators_is_downloaded_again_when_expired() {
    let origin = Origin::start().await;
    origin.route("plain.nii.gz", Route::ok(volume(18, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = cache(dir.path()).await;
    drop(cache.get(origin.url("plain.nii.gz")).await.unwrap());
    clock.advance(Duration::from_secs(25 * 3600));
    let file = cache.get(origin.url("plain.nii.gz")).await.unwrap();
    assert_eq!(file.status(), CacheStatus::Downloaded);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].header("if-none-match").is_none() && seen[1].header("if-modified-since").is_none()
    );
}

#[tokio::test]
async fn an_expired_copy_is_served_when_the_origin_fails() {
    let origin = Origin::start().await;
    let body = volume(19, MB);
    origin.route("s.nii.gz", Route::ok(body.clone()).etag("\"s\""));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = cache(dir.path()).await;
    let url = origin.url("s.nii.gz");
    drop(cache.get(&url).await.unwrap());
    clock.advance(Duration::from_secs(25 * 3600));

    origin.route("s.nii.gz", Route::status(503));
    let stale = cache.get(&url).await.unwrap();
    assert_eq!(stale.status(), CacheStatus::Stale);
    assert_bytes(&stale, &body);
    assert_eq!(cache.stats().stale_served, 1);
    assert_eq!(
        origin.hits("s.nii.gz"),
        1 + 4,
        "the failure was retried first"
    );

    // The origin gone altogether.
    let port = origin.addr().port();
    drop(origin);
    let gone = cache
        .get(format!("http://127.0.0.1:{port}/s.nii.gz"))
        .await
        .unwrap();
    assert_eq!(gone.status(), CacheStatus::Stale);
    assert_eq!(cache.stats().stale_served, 2);

    // Past the grace period nothing is served.
    clock.advance(imgcache::DEFAULT_STALE_GRACE);
    let err = cache
        .get(format!("http://127.0.0.1:{port}/s.nii.gz"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Network);
}

#[tokio::test]
async fn stale_fallback_can_be_turned_off() {
    let origin = Origin::start().await;
    origin.route("s.nii.gz", Route::ok(volume(20, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .stale_if_error(false)
        .build()
        .await
        .unwrap();
    drop(cache.get(origin.url("s.nii.gz")).await.unwrap());
    clock.advance(Duration::from_secs(25 * 3600));
    origin.route("s.nii.gz", Route::status(503));
    let err = cache.get(origin.url("s.nii.gz")).await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert_eq!(cache.stats().stale_served, 0);
}

#[tokio::test]
async fn offline_mode_never_touches_the_network() {
    let origin = Origin::start().await;
    let body = volume(21, 1000);
    origin.route("o.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _clock) = cache(dir.path()).await;
        drop(cache.get(origin.url("o.nii.gz")).await.unwrap());
        cache.shutdown().await;
    }
    let clock = Arc::new(ManualClock::new());
    let offline = builder(dir.path(), &clock)
        .offline(true)
        .build()
        .await
        .unwrap();
    let fresh = offline.get(origin.url("o.nii.gz")).await.unwrap();
    assert_eq!(fresh.status(), CacheStatus::Hit);
    drop(fresh);
    clock.advance(Duration::from_secs(25 * 3600));
    let stale = offline.get(origin.url("o.nii.gz")).await.unwrap();
    assert_eq!(stale.status(), CacheStatus::Stale);
    assert_bytes(&stale, &body);
    let err = offline.get(origin.url("other.nii.gz")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotCached);
    assert_eq!(origin.total_hits(), 1, "only the first, online, download");
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let origin = Origin::start().await;
    let body = volume(22, 1000);
    origin.route("real.nii.gz", Route::ok(body.clone()));
    origin.route(
        "moved.nii.gz",
        Route::status(302).header("Location", &origin.url("real.nii.gz")),
    );
    origin.route(
        "loop.nii.gz",
        Route::status(302).header("Location", &origin.url("loop.nii.gz")),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.max_redirects(3))
        .build()
        .await
        .unwrap();
    let file = cache.get(origin.url("moved.nii.gz")).await.unwrap();
    assert_bytes(&file, &body);
    assert!(
        file.url().ends_with("/moved.nii.gz"),
        "the entry is keyed by the URL asked for"
    );
    let err = cache.get(origin.url("loop.nii.gz")).await.unwrap_err();
    assert!(err.to_string().contains("redirect"), "{err}");
    assert_eq!(
        origin.hits("loop.nii.gz"),
        4,
        "the first request and 3 redirects"
    );
}

#[tokio::test]
async fn space_pressure_evicts_expired_entries_before_fresh_ones() {
    let origin = Origin::start().await;
    crate::support::route_volumes(&origin, &["old", "fresh", "new"], 30, MB);
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = crate::support::open_capped(dir.path(), 2 * MB as u64 + 100).await;
    let url = |n: &str| origin.url(&format!("{n}.nii.gz"));
    // "fresh" is the least recently used, but "old" has expired (a short per-call TTL).
    drop(cache.get(url("fresh")).await.unwrap());
    let short = imgcache::GetOptions::new().ttl(Duration::from_secs(60));
    drop(cache.get_with(url("old"), short).await.unwrap());
    clock.advance(Duration::from_secs(120));
    drop(cache.get(url("new")).await.unwrap());
    assert!(
        cache.get_cached(url("fresh")).is_some(),
        "the fresh entry stays"
    );
    let urls: Vec<String> = cache.admin().entries().into_iter().map(|e| e.url).collect();
    assert!(!urls.iter().any(|u| u.ends_with("/old.nii.gz")), "{urls:?}");
    assert_eq!(cache.stats().evictions, 1);
}

#[tokio::test]
async fn a_revalidation_asked_for_by_a_short_ttl_does_not_shorten_the_entry() {
    let origin = Origin::start().await;
    origin.route("s.nii.gz", Route::ok(volume(18, MB)).etag("\"same\""));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = cache(dir.path()).await;
    let url = origin.url("s.nii.gz");
    let first = cache.get(&url).await.unwrap();
    let expiry = first.expires_at();
    drop(first);
    clock.advance(Duration::from_secs(3600));
    // Fresher than an hour is asked for: a conditional GET, answered 304.
    let checked = cache
        .get_with(
            &url,
            imgcache::GetOptions::new().ttl(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert_eq!(checked.status(), CacheStatus::Revalidated);
    assert!(
        checked.expires_at() >= expiry,
        "the entry keeps its own expiry"
    );
    drop(checked);
    let later = cache.get(&url).await.unwrap();
    assert_eq!(later.status(), CacheStatus::Hit);
    assert_eq!(origin.hits("s.nii.gz"), 2);
}
