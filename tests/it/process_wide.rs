//! The process-wide functions built from the environment. They run in a child process, whose
//! environment is set before the first use, as a user's would be.

use imgcache::{clear_cache, get_cache_stats, get_cached_file};

use crate::support::origin::{Origin, Route, volume};
use crate::support::{as_child, run_child};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_level_functions_use_one_cache_built_from_the_environment() {
    let origin = Origin::start().await;
    origin.route("data/ct/1.nii.gz", Route::ok(volume(1, 100_000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache_dir, server) = (dir.path().to_owned(), origin.url("data"));
    tokio::task::spawn_blocking(move || {
        run_child(
            "process_wide::the_module_level_functions",
            &[
                ("CACHE_DIR", cache_dir.to_str().unwrap()),
                ("IMAGE_SERVER", &server),
                ("CACHE_MAX_SIZE_MB", "16"),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(
        origin.hits("data/ct/1.nii.gz"),
        1,
        "one download for two gets"
    );
}

#[test]
#[ignore = "run in a child process by module_level_functions_use_one_cache_built_from_the_environment"]
fn the_module_level_functions() {
    as_child("process_wide::the_module_level_functions", async {
        let dir = std::env::var("CACHE_DIR").unwrap();
        let server = std::env::var("IMAGE_SERVER").unwrap();
        let file = get_cached_file("ct/1.nii.gz").await.unwrap();
        assert!(file.path().starts_with(&dir));
        assert_eq!(std::fs::read(file.path()).unwrap(), volume(1, 100_000));
        let again = get_cached_file(format!("{server}/ct/1.nii.gz"))
            .await
            .unwrap();
        assert_eq!(again.path(), file.path());

        let stats = get_cache_stats().await.unwrap();
        assert_eq!(stats.max_size_mb, 16.0);
        assert_eq!(
            (stats.hits, stats.total_downloads, stats.entries_count),
            (1, 1, 1)
        );
        drop((file, again));
        assert_eq!(clear_cache().await.unwrap(), 1);
        assert_eq!(get_cache_stats().await.unwrap().entries_count, 0);
    });
}
