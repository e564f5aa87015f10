//! The process-wide functions built from the environment. Alone in its own test binary because
//! it sets environment variables before the first use.

use imgcache::{clear_cache, get_cache_stats, get_cached_file};

mod support;
use support::origin::{Origin, Route, volume};

#[tokio::test]
async fn module_level_functions_use_one_cache_built_from_the_environment() {
    let origin = Origin::start().await;
    origin.route("data/ct/1.nii.gz", Route::ok(volume(1, 100_000)));
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: this test binary has one test and sets the variables before any thread reads them.
    unsafe {
        std::env::set_var("CACHE_DIR", dir.path());
        std::env::set_var("IMAGE_SERVER", origin.url("data"));
        std::env::set_var("CACHE_MAX_SIZE_MB", "16");
    }
    let file = get_cached_file("ct/1.nii.gz").await.unwrap();
    assert!(file.path().starts_with(dir.path()));
    assert_eq!(std::fs::read(file.path()).unwrap(), volume(1, 100_000));
    let again = get_cached_file(origin.url("data/ct/1.nii.gz"))
        .await
        .unwrap();
    assert_eq!(again.path(), file.path());
    assert_eq!(origin.hits("data/ct/1.nii.gz"), 1);

    let stats = get_cache_stats().await.unwrap();
    assert_eq!(stats.max_size_mb, 16.0);
    assert_eq!(
        (stats.hits, stats.total_downloads, stats.entries_count),
        (1, 1, 1)
    );
    drop((file, again));
    assert_eq!(clear_cache().await.unwrap(), 1);
    assert_eq!(get_cache_stats().await.unwrap().entries_count, 0);
}
