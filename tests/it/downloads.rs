//! Downloads against local origins: bytes as sent, errors, broken bodies, digests, refresh.

use std::sync::Arc;
use std::time::Duration;

use imgcache::{CacheStatus, ErrorKind, GetOptions};

use crate::support::origin::{Fault, Origin, Route, sha256_hex, volume};
use crate::support::{data_files, mode, open, open_without_retries, temp_files, wait_until};

use crate::MB;

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
    assert_eq!(mode(&crate::support::meta_of(file.path())), 0o600);

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
        serde_json::from_slice(&std::fs::read(crate::support::meta_of(file.path())).unwrap())
            .unwrap();
    assert_eq!(meta["sha256"], sha256_hex(&body));
    assert_eq!(meta["size"], body.len() as u64);
    assert_eq!(meta["etag"], "\"v1\"");
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
    let (cache, clock) = open_without_retries(dir.path()).await;
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
        if name == "no-answer" {
            // An origin that answered nothing is not asked again for a while (see outage.rs).
            let again = cache.get(origin.url(&path)).await.unwrap_err();
            assert_eq!(again.kind(), ErrorKind::Network, "{again}");
            assert_eq!(origin.hits(&path), 1, "{name}");
            clock.advance(std::time::Duration::from_secs(30));
        }
        let file = cache.get(origin.url(&path)).await.unwrap();
        assert_eq!(file.sha256(), sha256_hex(&body), "{name}");
        assert_eq!(origin.hits(&path), 2, "{name}");
    }
    assert_eq!(cache.stats().errors, cases.len() as u64 + 1);
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
    let cache = crate::support::builder(dir.path(), &clock)
        .network(|n| n.read_timeout(Duration::from_millis(300)))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_download_keeps_its_part_and_the_next_process_resumes_it() {
    let origin = Origin::start().await;
    let body = volume(91, 6 * MB);
    let (paused, gate) = Route::ok(body.clone()).etag("\"v1\"").pause_at(3 * MB);
    origin.route_seq(
        "s.nii.gz",
        vec![paused, Route::ok(body.clone()).etag("\"v1\"")],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("s.nii.gz");
    let waiting = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await }
    });
    wait_until(|| cache.stats().bytes_downloaded >= 3 * MB as u64).await;

    // An interpreter at exit: nothing waits for the download any more.
    assert_eq!(cache.admin().stop_downloads(), 1);
    assert!(waiting.await.unwrap().is_err(), "its caller is told");
    let part_of_3_mb = || {
        temp_files(dir.path()).iter().any(|p| {
            p.extension().is_some_and(|e| e == "part")
                && std::fs::metadata(dir.path().join("v1/tmp").join(p))
                    .unwrap()
                    .len()
                    == 3 * MB as u64
        })
    };
    wait_until(part_of_3_mb).await;
    cache.shutdown().await;
    drop(cache);
    drop(gate);

    // The next process resumes where this one stopped.
    let (cache, _clock) = open(dir.path()).await;
    let file = cache.get(&url).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("range"), Some("bytes=3145728-"));
    assert_eq!(cache.stats().resumes, 1);
}
