//! The byte cap: LRU eviction, pins, files larger than the cap, reservations.

use std::sync::Arc;

use imgcache::ErrorKind;

use crate::support::origin::{Fault, Origin, Route, volume};
use crate::support::{data_files, files, open_capped, route_volumes, temp_files, wait_until};

use crate::MB;

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
    cache.admin().set_max_size_bytes(MB as u64 + 100).unwrap();
    let entries = cache.admin().entries();
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
    let cache = crate::support::builder(dir.path(), &clock)
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

#[tokio::test]
async fn a_file_larger_than_the_cap_is_handed_out_uncached_when_the_caller_allows() {
    use imgcache::{CacheStatus, GetOptions};

    let origin = Origin::start().await;
    origin.route("small.nii.gz", Route::ok(volume(42, MB)));
    origin.route("big.nii.gz", Route::ok(volume(43, 3 * MB)));
    origin.route(
        "big-chunked.nii.gz",
        Route::ok(volume(44, 3 * MB)).fault(Fault::Chunked),
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_capped(dir.path(), 2 * MB as u64).await;
    let small = cache.get(origin.url("small.nii.gz")).await.unwrap();
    let small_path = small.path().to_owned();
    drop(small);
    let allow = GetOptions::new().uncached_if_too_large(true);
    for (name, seed) in [("big.nii.gz", 43), ("big-chunked.nii.gz", 44)] {
        let big = cache
            .get_with(origin.url(name), allow.clone())
            .await
            .unwrap();
        assert_eq!(big.status(), CacheStatus::NotStored, "{name}");
        assert_eq!(std::fs::read(big.path()).unwrap(), volume(seed, 3 * MB));
        assert!(big.path().to_string_lossy().ends_with(name), "{name}");
        // Nothing was evicted for it (with a length or without), and it is not counted
        // against the cap.
        assert!(small_path.exists(), "{name}: the cached file stays");
        let stats = cache.stats();
        assert_eq!(
            (stats.entries_count, stats.current_size_bytes),
            (1, MB as u64)
        );
        assert_eq!((stats.reserved_bytes, stats.evictions), (0, 0));
        let path = big.path().to_owned();
        drop(big);
        wait_until(|| !path.exists()).await;
        assert!(cache.get_cached(origin.url(name)).is_none(), "{name}");
    }
    assert!(temp_files(dir.path()).is_empty());
    assert_eq!(cache.stats().not_stored, 2);
    // Without the option it is still refused.
    let err = cache.get(origin.url("big.nii.gz")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
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
    let cache = crate::support::builder(dir.path(), &clock)
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
    // Over the cap while the callers held their files; let go, they are evicted by the next
    // sweep (this cache's background sweep is off).
    cache.cleanup().await.unwrap();
    let stats = cache.stats();
    assert_eq!(stats.reserved_bytes, 0);
    assert!(
        stats.current_size_bytes <= stats.max_size_bytes,
        "{stats:?}"
    );
    assert_eq!(stats.entries_count, 2);
    assert_eq!(data_files(dir.path()).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_callers_that_take_a_file_uncached_get_it_uncached() {
    use imgcache::{CacheStatus, GetOptions};

    let (route, gate) = Route::ok(volume(45, 3 * MB)).gated();
    let origin = Origin::start().await;
    origin.route("shared-big.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open_capped(dir.path(), 2 * MB as u64).await.0);
    let url = origin.url("shared-big.nii.gz");
    // One caller that did not ask starts the download; one that asks joins it.
    let plain = tokio::spawn({
        let (cache, url) = (Arc::clone(&cache), url.clone());
        async move { cache.get(url).await }
    });
    origin.wait_for_hits("shared-big.nii.gz", 1).await;
    let allowing = tokio::spawn({
        let (cache, url) = (Arc::clone(&cache), url.clone());
        async move {
            let options = GetOptions::new().uncached_if_too_large(true);
            cache.get_with(url, options).await
        }
    });
    wait_until(|| cache.stats().coalesced_waits == 1).await;
    gate.add_permits(1);
    let err = plain.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    let file = allowing.await.unwrap().unwrap();
    assert_eq!(file.status(), CacheStatus::NotStored);
    assert_eq!(std::fs::read(file.path()).unwrap(), volume(45, 3 * MB));
    assert_eq!(origin.hits("shared-big.nii.gz"), 1);
}
