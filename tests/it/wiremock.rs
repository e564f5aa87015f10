//! The cache against wiremock: request headers, coalescing and status handling as a
//! standard HTTP mock sees them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use imgcache::{ErrorKind, ImageCache, ManualClock};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn cache(dir: &std::path::Path) -> ImageCache {
    ImageCache::builder()
        .cache_dir(dir)
        .sweep_interval(Duration::ZERO)
        .clock(Arc::new(ManualClock::new()))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_get_for_many_concurrent_callers() {
    let server = MockServer::start().await;
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    Mock::given(method("GET"))
        .and(path("/ct/0007.nii.gz"))
        .and(header("accept-encoding", "identity"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(body.clone())
                .set_delay(Duration::from_millis(200)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path()).await;
    let url = format!("{}/ct/0007.nii.gz", server.uri());
    let results = join_all((0..50).map(|_| {
        let (cache, url) = (cache.clone(), url.clone());
        tokio::spawn(async move { cache.get(url).await })
    }))
    .await;
    for r in results {
        let file = r.unwrap().unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), body);
    }
    assert_eq!(cache.stats().total_downloads, 1);
    // `expect(1)` is verified when the server drops.
}

#[tokio::test]
async fn statuses_map_to_error_kinds_and_are_retried_on_the_next_call() {
    let server = MockServer::start().await;
    Mock::given(path("/gone.nii.gz"))
        .respond_with(ResponseTemplate::new(410))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(path("/busy.nii.gz"))
        .respond_with(ResponseTemplate::new(429))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path()).await;
    for _ in 0..2 {
        let err = cache
            .get(format!("{}/gone.nii.gz", server.uri()))
            .await
            .unwrap_err();
        assert_eq!(
            (err.kind(), err.status()),
            (ErrorKind::HttpStatus, Some(410))
        );
        assert!(!err.is_transient());
    }
    let err = cache
        .get(format!("{}/busy.nii.gz", server.uri()))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(429));
    assert!(err.is_transient());
    assert_eq!(cache.stats().errors, 3);
}
