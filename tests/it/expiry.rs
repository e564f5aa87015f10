//! Time to live through the controlled clock, per call and by default, and the background sweeper.

use std::sync::Arc;
use std::time::Duration;

use imgcache::{CacheStatus, ErrorKind, GetOptions, ImageCache};

use crate::support::origin::{Origin, Route, volume};
use crate::support::{builder, data_files, open, wait_until};

use crate::MB;

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

    // The sweeper would keep it for revalidation and stale fallback during the grace period
    // (7 days by default); an explicit cleanup removes what expired, as its name says.
    let report = cache.cleanup().await.unwrap();
    assert_eq!(
        (report.expired, report.evicted, report.kept_in_use),
        (1, 0, 0)
    );
    assert_eq!(report.bytes_freed, MB as u64);
    assert!(data_files(dir.path()).is_empty());
    assert_eq!(cache.stats().expirations, 1);

    let again = cache.get(&url).await.unwrap();
    assert_eq!(again.status(), CacheStatus::Downloaded);
    assert_eq!(origin.hits("t.nii.gz"), 2);
}

#[tokio::test]
async fn an_explicit_cleanup_removes_every_expired_entry_nobody_holds() {
    let origin = Origin::start().await;
    let names = ["a.nii.gz", "b.nii.gz", "c.nii.gz"];
    for (i, name) in names.iter().enumerate() {
        origin.route(name, Route::ok(volume(20 + i as u64, 1000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    // A sweeper that runs only when woken (by an unpin), with the default grace of 7 days.
    let cache = builder(dir.path(), &clock)
        .sweep_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let short = GetOptions::new().ttl(Duration::from_secs(2));
    drop(
        cache
            .get_with(origin.url("a.nii.gz"), short.clone())
            .await
            .unwrap(),
    );
    let held = cache.get_with(origin.url("b.nii.gz"), short).await.unwrap();
    drop(cache.get(origin.url("c.nii.gz")).await.unwrap());
    clock.advance(Duration::from_millis(2500));

    // What a preview promises is what the cleanup does.
    let preview = cache.admin().cleanup_preview();
    let promised: Vec<&str> = preview.expired.iter().map(|e| e.url.as_str()).collect();
    assert_eq!(promised, [origin.url("a.nii.gz")]);
    let report = cache.cleanup().await.unwrap();
    assert_eq!(
        (report.expired, report.evicted, report.kept_in_use),
        (1, 0, 1)
    );
    assert_eq!(report.bytes_freed, 1000);
    assert_eq!(
        data_files(dir.path()).len(),
        2,
        "b (held) and c (fresh) stay"
    );
    assert_eq!(std::fs::read(held.path()).unwrap(), volume(21, 1000));
    // Let go, it goes without another cleanup: the sweep its unpin wakes gives it no grace
    // period (the sweeper's own would keep it 7 days), as the cleanup asked.
    drop(held);
    wait_until(|| data_files(dir.path()).len() == 1).await;
    assert_eq!(cache.stats().expirations, 2);
    let report = cache.cleanup().await.unwrap();
    assert_eq!((report.expired, report.kept_in_use), (0, 0));
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

    cache
        .admin()
        .set_default_ttl(Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        cache
            .admin()
            .set_default_ttl(Duration::ZERO)
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
    let u = cache.get(origin.url("u.nii.gz")).await.unwrap();
    assert_eq!(
        u.expires_at().duration_since(u.fetched_at()).unwrap(),
        Duration::from_secs(5)
    );
    assert!((cache.stats().default_ttl_hours - 5.0 / 3600.0).abs() < 1e-9);
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
    // Counted in this process's record on the directory, and in state.json once it closes.
    wait_until(|| {
        std::fs::read_dir(dir.path().join("v1/procs"))
            .unwrap()
            .count()
            == 2
    })
    .await;
    cache.shutdown().await;
    drop(cache);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("v1/state.json")).unwrap()).unwrap();
    assert_eq!(state["counters"]["expirations"], 1);
}

#[tokio::test]
async fn get_cached_with_takes_the_options_of_get_with_and_never_downloads() {
    let origin = Origin::start().await;
    origin.route("t.nii.gz", Route::ok(volume(12, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = open(dir.path()).await;
    let url = origin.url("t.nii.gz");
    let minute = GetOptions::new().ttl(Duration::from_secs(60));
    assert!(cache.get_cached_with(&url, &minute).is_none(), "cold");
    assert_eq!(origin.hits("t.nii.gz"), 0, "a lookup never downloads");

    let file = cache.get(&url).await.unwrap();
    let sha = file.sha256().to_owned();
    drop(file);
    clock.advance(Duration::from_secs(30));
    let hit = cache
        .get_cached_with(&url, &minute)
        .expect("30 s old, 60 s allowed");
    assert_eq!(hit.status(), CacheStatus::Hit);
    drop(hit);
    let ten_seconds = GetOptions::new().ttl(Duration::from_secs(10));
    assert!(
        cache.get_cached_with(&url, &ten_seconds).is_none(),
        "older than the per-call TTL"
    );
    let upper = sha.to_uppercase();
    assert!(
        cache
            .get_cached_with(&url, &GetOptions::new().expected_sha256(upper))
            .is_some()
    );
    let other = "0".repeat(64);
    assert!(
        cache
            .get_cached_with(&url, &GetOptions::new().expected_sha256(other))
            .is_none()
    );
    assert!(
        cache
            .get_cached_with(&url, &GetOptions::new().force(true))
            .is_none()
    );
    assert_eq!(origin.hits("t.nii.gz"), 1);
    assert_eq!(cache.stats().hits, 2, "only the two that returned a file");
}
