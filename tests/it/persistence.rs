//! What survives a restart, what start-up recovery removes, integrity checks and the files on disk.

use std::sync::Arc;

use imgcache::{CacheStatus, ErrorKind, Verification};

use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{files, mode, open, temp_files};

use crate::MB;

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
        // The hit path too: a hit after the figures were saved would be lost.
        assert!(cache.get_cached(origin.url("a.nii.gz")).is_none());
    }
    let (cache, _clock) = open(dir.path()).await;
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.total_downloads), (1, 2, 2));
    assert_eq!(stats.entries_count, 2);
    assert_eq!(stats.current_size_bytes, 2 * MB as u64);
    assert_eq!(cache.admin().entries()[0].hits, 1);
    let a = cache.get(origin.url("a.nii.gz")).await.unwrap();
    assert_eq!(a.status(), CacheStatus::Hit);
    assert_eq!(origin.hits("a.nii.gz"), 1);
    drop(a);
    // b is the least recently used across the restart.
    cache.admin().set_max_size_bytes(MB as u64 + 1).unwrap();
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
async fn handles_share_a_directory_unless_one_asks_for_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _clock) = open(dir.path()).await;
    let clock = Arc::new(imgcache::ManualClock::new());
    let second = crate::support::builder(dir.path(), &clock)
        .build()
        .await
        .expect("a second handle shares the directory");
    let err = crate::support::builder(dir.path(), &clock)
        .exclusive_lock(true)
        .build()
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Locked,
        "not alone while others use it"
    );
    drop((first, second));
    let alone = crate::support::builder(dir.path(), &clock)
        .exclusive_lock(true)
        .build()
        .await
        .expect("alone once the others are gone");
    let err = crate::support::builder(dir.path(), &clock)
        .build()
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Locked,
        "nobody joins one that is alone"
    );
    drop(alone);
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
    let meta = |n: &str| crate::support::meta_of(&paths[n]);
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
    // The new download is a new version, with a path of its own.
    let path = again.path().to_owned();
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
        cache.admin().verify(origin.url("v.nii.gz")).await.unwrap(),
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

    let report = cache.admin().verify_all().await.unwrap();
    assert_eq!(report.checked, 2);
    assert_eq!(report.corrupt.len(), 1);
    assert!(report.corrupt[0].ends_with("/v.nii.gz"));
    assert!(!v.exists());
    assert_eq!(
        cache.admin().verify(origin.url("v.nii.gz")).await.unwrap(),
        Verification::NotCached
    );
    assert_eq!(cache.stats().integrity_failures, 1);
    assert_eq!(cache.stats().entries_count, 1);
}

#[tokio::test]
async fn shared_group_mode_is_configurable() {
    let origin = Origin::start().await;
    origin.route("m.nii.gz", Route::ok(volume(170, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = crate::support::builder(dir.path(), &clock)
        .file_mode(0o640)
        .build()
        .await
        .unwrap();
    let file = cache.get(origin.url("m.nii.gz")).await.unwrap();
    assert_eq!(mode(file.path()), 0o640);
    assert_eq!(mode(file.path().parent().unwrap()), 0o750);
}

#[tokio::test]
async fn recovery_counts_files_changed_behind_its_back_as_integrity_failures() {
    let origin = Origin::start().await;
    origin.route("a.nii.gz", Route::ok(volume(41, 10_000)));
    origin.route("b.nii.gz", Route::ok(volume(42, 10_000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let a = cache.get(origin.url("a.nii.gz")).await.unwrap();
    let b = cache.get(origin.url("b.nii.gz")).await.unwrap();
    let (a_path, b_meta) = (a.path().to_owned(), crate::support::meta_of(b.path()));
    drop((a, b));
    cache.shutdown().await;
    drop(cache);
    // One data file grows; another entry loses its meta.json (not an integrity failure).
    let mut bytes = std::fs::read(&a_path).unwrap();
    bytes.push(0);
    std::fs::write(&a_path, bytes).unwrap();
    std::fs::remove_file(b_meta).unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let stats = cache.stats();
    assert_eq!((stats.entries_count, stats.integrity_failures), (0, 1));
}

#[tokio::test]
async fn state_json_keeps_the_access_times_of_cached_entries_only() {
    let origin = Origin::start().await;
    for name in ["k0.nii.gz", "k1.nii.gz", "k2.nii.gz"] {
        origin.route(name, Route::ok(volume(60, 1000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let entries_saved = |dir: &std::path::Path| {
        let raw = std::fs::read(dir.join("v1/state.json")).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        state["entries"].as_object().map_or(0, |m| m.len())
    };
    let (cache, _clock) = open(dir.path()).await;
    for name in ["k0.nii.gz", "k1.nii.gz", "k2.nii.gz"] {
        drop(cache.get(origin.url(name)).await.unwrap());
    }
    cache.shutdown().await;
    drop(cache);
    assert_eq!(entries_saved(dir.path()), 3);
    // The next run removes two: state.json forgets them, rather than grow with every URL
    // ever cached.
    let (cache, _clock) = open(dir.path()).await;
    cache.invalidate(origin.url("k0.nii.gz")).await.unwrap();
    cache.invalidate(origin.url("k1.nii.gz")).await.unwrap();
    cache.shutdown().await;
    drop(cache);
    assert_eq!(entries_saved(dir.path()), 1, "what is cached, no more");
}
