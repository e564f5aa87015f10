//! Answers the origin marks `Cache-Control: no-store` (and `private`, for a cache that answers
//! many clients): handed out to their callers, never kept.

use imgcache::{CacheStatus, ImageCache};

use crate::MB;
use crate::support::origin::{Origin, Route, volume};
use crate::support::{builder, data_files, temp_files, wait_until};

async fn open(
    dir: &std::path::Path,
    edit: impl FnOnce(imgcache::NetworkOptions) -> imgcache::NetworkOptions,
) -> ImageCache {
    let clock = std::sync::Arc::new(imgcache::ManualClock::new());
    builder(dir, &clock).network(edit).build().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_marked_no_store_is_handed_out_and_not_kept() {
    let origin = Origin::start().await;
    let body = volume(100, 2 * MB);
    origin.route(
        "p.nii.gz",
        Route::ok(body.clone()).header("cache-control", "max-age=600, no-store"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), |n| n).await;
    let url = origin.url("p.nii.gz");
    let first = cache.get(&url).await.unwrap();
    assert_eq!(first.status(), CacheStatus::NotStored);
    assert_eq!(
        std::fs::read(first.path()).unwrap(),
        body,
        "the caller has its bytes"
    );
    assert_eq!(first.sha256(), crate::support::origin::sha256_hex(&body));
    assert!(cache.get_cached(&url).is_none(), "nothing kept");
    assert!(data_files(dir.path()).is_empty());
    let stats = cache.stats();
    assert_eq!(
        (stats.entries_count, stats.not_stored, stats.total_downloads),
        (0, 1, 0)
    );
    // The next call asks the origin again, while the first still holds its own file.
    let second = cache.get(&url).await.unwrap();
    assert_eq!(origin.hits("p.nii.gz"), 2);
    assert_ne!(first.path(), second.path());
    assert!(first.path().exists() && second.path().exists());
    let path = first.path().to_owned();
    drop(first);
    assert!(!path.exists(), "gone with its last handle");
    assert!(!path.parent().unwrap().exists(), "and its directory");
    drop(second);
    wait_until(|| temp_files(dir.path()).is_empty()).await;
    assert!(
        temp_files(dir.path()).is_empty(),
        "{:?}",
        temp_files(dir.path())
    );
    assert_eq!(
        cache.stats().reserved_bytes,
        0,
        "the reservation went with it"
    );
    assert!(
        crate::support::files(&dir.path().join("v1/locks"))
            .iter()
            .all(|p| p.file_name().is_some_and(|n| n == "cap.lock")
                || std::fs::metadata(dir.path().join("v1/locks").join(p))
                    .unwrap()
                    .len()
                    == 0),
        "no record to resume from"
    );

    // Callers that join the download share its file.
    let (a, b) = tokio::join!(cache.get(&url), cache.get(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(origin.hits("p.nii.gz"), 3);
    assert_eq!(a.path(), b.path());
    assert_eq!(b.status(), CacheStatus::NotStored);
    drop((a, b));

    // An operator may choose to keep such answers.
    let dir = tempfile::tempdir().unwrap();
    let kept = open(dir.path(), |n| n.keep_no_store(true)).await;
    let file = kept.get(&url).await.unwrap();
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert!(kept.get_cached(&url).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_is_kept_by_one_application_and_not_by_a_cache_of_many_clients() {
    let origin = Origin::start().await;
    origin.route(
        "q.nii.gz",
        Route::ok(volume(101, MB)).header("cache-control", "private, max-age=60"),
    );
    let url = origin.url("q.nii.gz");
    let dir = tempfile::tempdir().unwrap();
    let own = open(dir.path(), |n| n).await;
    assert_eq!(
        own.get(&url).await.unwrap().status(),
        CacheStatus::Downloaded
    );
    assert!(own.get_cached(&url).is_some());

    let dir = tempfile::tempdir().unwrap();
    let many = open(dir.path(), |n| n.refuse_private(true)).await;
    assert_eq!(
        many.get(&url).await.unwrap().status(),
        CacheStatus::NotStored
    );
    assert!(many.get_cached(&url).is_none());
}

#[cfg(feature = "server")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_streams_a_no_store_answer_and_says_so() {
    let origin = Origin::start().await;
    let body = volume(102, 3 * MB);
    origin.route(
        "data/s.nii.gz",
        Route::ok(body.clone()).header("cache-control", "no-store"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(imgcache::ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .image_server(origin.url("data"))
        .build()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = imgcache::server::router(cache.clone());
    let server = tokio::spawn(async move {
        let limits = imgcache::server::Limits::new();
        imgcache::server::serve(listener, app, limits, std::future::pending())
            .await
            .unwrap()
    });
    let http = reqwest::Client::new();
    for round in 0..2 {
        let answer = http
            .get(format!("http://{addr}/files/s.nii.gz"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.headers()["cache-control"],
            "no-store",
            "round {round}"
        );
        assert_eq!(
            answer.headers()["cache-status"],
            "imgcache; fwd=miss; detail=no-store"
        );
        assert_eq!(answer.bytes().await.unwrap(), body);
    }
    assert_eq!(origin.hits("data/s.nii.gz"), 2, "asked again each time");
    assert_eq!(cache.stats().entries_count, 0);
    wait_until(|| temp_files(dir.path()).is_empty()).await;
    assert!(temp_files(dir.path()).is_empty());
    server.abort();
}
