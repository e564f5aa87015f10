//! An origin that does not answer is remembered for `CACHE_OUTAGE_MEMORY`: the calls that
//! follow serve their stale copies, or fail, at once, with the reason, instead of each
//! paying for its retries.

use std::sync::Arc;
use std::time::Duration;

use imgcache::{CacheStatus, ErrorKind, GetOptions, ManualClock};

use crate::support::origin::{Fault, Origin, Route, volume};
use crate::support::{builder, open_without_retries};

#[tokio::test]
async fn an_origin_that_does_not_answer_is_not_asked_again_for_a_while() {
    let origin = Origin::start().await;
    origin.route("a.nii.gz", Route::ok(volume(1, 5000)));
    origin.route("b.nii.gz", Route::ok(volume(2, 5000)));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.outage_memory(Duration::from_secs(30)))
        .build()
        .await
        .unwrap();
    let hour = GetOptions::new().ttl(Duration::from_secs(3600));
    drop(
        cache
            .get_with(origin.url("a.nii.gz"), hour.clone())
            .await
            .unwrap(),
    );
    assert_eq!(origin.hits("a.nii.gz"), 1);

    // The server goes down (it accepts and hangs up), and a's copy expires.
    origin.route(
        "a.nii.gz",
        Route::ok(Vec::new()).fault(Fault::CloseImmediately),
    );
    origin.route(
        "b.nii.gz",
        Route::ok(Vec::new()).fault(Fault::CloseImmediately),
    );
    clock.advance(Duration::from_secs(3601));
    let stale = cache
        .get_with(origin.url("a.nii.gz"), hour.clone())
        .await
        .unwrap();
    assert_eq!(stale.status(), CacheStatus::Stale);
    assert_eq!(
        origin.hits("a.nii.gz"),
        1 + 4,
        "the first call pays for its retries"
    );
    drop(stale);

    // Within the memory: the stale copy at once, the miss's error at once, with the reason.
    clock.advance(Duration::from_secs(10));
    let stale = cache
        .get_with(origin.url("a.nii.gz"), hour.clone())
        .await
        .unwrap();
    assert_eq!(stale.status(), CacheStatus::Stale);
    drop(stale);
    let e = cache.get(origin.url("b.nii.gz")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network);
    assert!(e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains("did not answer 10s ago") && text.contains("not asked again for 20 s"),
        "{text}"
    );
    assert_eq!(origin.hits("a.nii.gz"), 5, "not asked");
    assert_eq!(origin.hits("b.nii.gz"), 0, "not asked");

    // After it, the origin is asked again; its answer forgets the outage.
    clock.advance(Duration::from_secs(20));
    origin.route("b.nii.gz", Route::ok(volume(2, 5000)));
    let b = cache.get(origin.url("b.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(b.path()).unwrap(), volume(2, 5000));
    assert_eq!(origin.hits("b.nii.gz"), 1);
    let stale = cache.get_with(origin.url("a.nii.gz"), hour).await.unwrap();
    assert_eq!(stale.status(), CacheStatus::Stale);
    assert_eq!(
        origin.hits("a.nii.gz"),
        5 + 4,
        "asked again, since b's answer"
    );
}

#[tokio::test]
async fn an_error_status_is_an_answer_and_a_zero_memory_remembers_nothing() {
    let origin = Origin::start().await;
    origin.route("s.nii.gz", Route::status(503));
    origin.route(
        "c.nii.gz",
        Route::ok(Vec::new()).fault(Fault::CloseImmediately),
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = open_without_retries(dir.path()).await;
    // 503s: the server is up; each call asks.
    for n in 1..=2 {
        let e = cache.get(origin.url("s.nii.gz")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::HttpStatus);
        assert_eq!(origin.hits("s.nii.gz"), n);
    }
    drop(cache);

    let off = builder(dir.path(), &clock)
        .network(|n| n.retries(0).outage_memory(Duration::ZERO))
        .build()
        .await
        .unwrap();
    for n in 1..=2 {
        let e = off.get(origin.url("c.nii.gz")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Network);
        assert_eq!(origin.hits("c.nii.gz"), n, "asked every time");
    }
}

#[tokio::test]
async fn a_redirect_to_a_server_that_is_down_is_an_answer_of_the_first() {
    let origin = Origin::start().await;
    // Somewhere that refuses connections: a port that was bound and let go.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere = format!("http://{}/r.nii.gz", gone.local_addr().unwrap());
    drop(gone);
    origin.route(
        "r.nii.gz",
        Route::status(302).header("Location", &elsewhere),
    );
    origin.route("ok.nii.gz", Route::ok(volume(3, 5000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let e = cache.get(origin.url("r.nii.gz")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network, "{e}");
    // The image server answered (with the redirect): it is not remembered as down.
    let ok = cache.get(origin.url("ok.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(ok.path()).unwrap(), volume(3, 5000));
    assert_eq!(origin.hits("ok.nii.gz"), 1);
}
