//! The event stream: what progress bars and dashboards see.

use std::time::Duration;

use crate::support::origin::{Origin, Route, volume};
use crate::support::{open_capped, open_without_retries, route_volumes};
use imgcache::{Event, Received, Subscription};

use crate::MB;

/// Every event waiting now.
fn drain(events: &mut Subscription) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(received) = events.try_recv() {
        match received {
            Received::Event(e) => out.push(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_reports_start_progress_and_finish_then_hits() {
    let origin = Origin::start().await;
    origin.route("p.nii.gz", Route::ok(volume(1, 3 * MB + 5)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_capped(dir.path(), 64 * MB as u64).await;
    let mut events = cache.subscribe();
    let url = origin.url("p.nii.gz");
    drop(cache.get(&url).await.unwrap());
    let seen = drain(&mut events);
    assert_eq!(
        seen.first(),
        Some(&Event::DownloadStarted {
            url: url.clone(),
            total: Some(3 * MB as u64 + 5)
        })
    );
    let progress: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Progress {
                received, total, ..
            } => {
                assert_eq!(*total, Some(3 * MB as u64 + 5));
                Some(*received)
            }
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 2, "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    match seen.last() {
        Some(Event::DownloadFinished { url: u, bytes, .. }) => {
            assert_eq!((u, *bytes), (&url, 3 * MB as u64 + 5));
        }
        other => panic!("expected DownloadFinished, got {other:?}"),
    }
    drop(cache.get(&url).await.unwrap());
    assert_eq!(drain(&mut events), [Event::Hit { url: url.clone() }]);
    // Events serialise for the dashboard.
    let json = serde_json::to_value(Event::Hit { url: url.clone() }).unwrap();
    assert_eq!(json["type"], "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_waits_failures_and_evictions_are_reported() {
    let origin = Origin::start().await;
    let (route, gate) = Route::ok(volume(2, MB)).gated();
    origin.route("c.nii.gz", route);
    origin.route("bad.nii.gz", Route::status(500));
    route_volumes(&origin, &["e1", "e2"], 3, MB);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let mut events = cache.subscribe();

    let url = origin.url("c.nii.gz");
    let first = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await.map(|_| ()) }
    });
    origin.wait_for_hits("c.nii.gz", 1).await;
    let second = tokio::spawn({
        let (cache, url) = (cache.clone(), url.clone());
        async move { cache.get(url).await.map(|_| ()) }
    });
    loop {
        if let Received::Event(Event::CoalescedWait { url: u }) = events.recv().await {
            assert_eq!(u, url);
            break;
        }
    }
    gate.add_permits(1);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();

    cache.get(origin.url("bad.nii.gz")).await.unwrap_err();
    let failed = drain(&mut events)
        .into_iter()
        .find_map(|e| match e {
            Event::DownloadFailed { url, error } => Some((url, error)),
            _ => None,
        })
        .expect("a DownloadFailed event");
    assert!(
        failed.0.ends_with("/bad.nii.gz") && failed.1.contains("500"),
        "{failed:?}"
    );

    drop(cache.get(origin.url("e1.nii.gz")).await.unwrap());
    drop(cache.get(origin.url("e2.nii.gz")).await.unwrap());
    drain(&mut events);
    cache.admin().set_max_size_bytes(MB as u64 + 1).unwrap();
    // The removals (and their events) finish on the blocking pool just after the call.
    let mut evicted = Vec::new();
    while evicted.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the eviction events arrive");
        if let Received::Event(Event::Evicted { url, .. }) = next {
            evicted.push(url);
        }
    }
    evicted.sort();
    assert!(
        evicted[0].ends_with("/c.nii.gz") && evicted[1].ends_with("/e1.nii.gz"),
        "{evicted:?}"
    );
    assert!(
        cache.get_cached(origin.url("e2.nii.gz")).is_some(),
        "the most recent stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_slows_nothing_and_learns_what_it_missed() {
    let origin = Origin::start().await;
    origin.route("h.nii.gz", Route::ok(volume(4, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_capped(dir.path(), 64 * MB as u64).await;
    let mut idle = cache.subscribe();
    let url = origin.url("h.nii.gz");
    // Far more events than the channel keeps; none of these calls waits for the subscriber.
    let work = async {
        for _ in 0..3000 {
            drop(cache.get(&url).await.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .expect("never blocked");
    match idle.recv().await {
        Received::Missed(n) => assert!(n > 1000, "{n}"),
        other => panic!("expected Missed, got {other:?}"),
    }
    assert!(matches!(
        idle.recv().await,
        Received::Event(Event::Hit { .. })
    ));
    drop(cache);
    // The subscription ends once the cache is gone (after the events still queued).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match idle.recv().await {
            Received::Closed => break,
            _ => assert!(std::time::Instant::now() < deadline),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_download_that_starts_ends_with_an_event_even_when_the_stale_copy_is_served() {
    use crate::support::origin::Fault;
    let origin = Origin::start().await;
    let body = volume(4, MB);
    let cut = Route::ok(body.clone())
        .fault(Fault::CloseAfter(MB / 2))
        .ignore_range();
    origin.route_seq("s.nii.gz", vec![Route::ok(body), cut]);
    let dir = tempfile::tempdir().unwrap();
    let (cache, clock) = open_without_retries(dir.path()).await;
    let url = origin.url("s.nii.gz");
    drop(cache.get(&url).await.unwrap());
    clock.advance(Duration::from_secs(48 * 3600));
    let mut events = cache.subscribe();
    let stale = cache.get(&url).await.unwrap();
    assert_eq!(stale.status(), imgcache::CacheStatus::Stale);
    let seen = drain(&mut events);
    let started = seen
        .iter()
        .position(|e| matches!(e, Event::DownloadStarted { .. }))
        .expect("the download started");
    // A dashboard that drew a row for it must see it end.
    assert!(
        seen[started..]
            .iter()
            .any(|e| matches!(e, Event::DownloadFailed { url: u, .. } if *u == url)),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_of_a_shared_download_gets_its_progress_and_a_hit_none() {
    use std::sync::{Arc, Mutex};

    use imgcache::{CacheStatus, GetOptions};
    type Reports = Arc<Mutex<Vec<(u64, Option<u64>)>>>;

    let len = 8 * MB + 3;
    let (route, gate) = Route::ok(volume(7, len)).pause_at(3 * MB);
    let origin = Origin::start().await;
    origin.route("g.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_capped(dir.path(), 64 * MB as u64).await;
    let cache = Arc::new(cache);
    let url = origin.url("g.nii.gz");
    let reporting = |seen: &Reports| {
        let seen = Arc::clone(seen);
        GetOptions::new().progress(move |done, total| seen.lock().unwrap().push((done, total)))
    };
    let (first, second) = (Arc::default(), Arc::default());
    let a = tokio::spawn({
        let (cache, url, options) = (Arc::clone(&cache), url.clone(), reporting(&first));
        async move { cache.get_with(url, options).await }
    });
    origin.wait_for_hits("g.nii.gz", 1).await;
    let b = tokio::spawn({
        let (cache, url, options) = (Arc::clone(&cache), url.clone(), reporting(&second));
        async move { cache.get_with(url, options).await }
    });
    // Both wait at 3 MiB of 8: each has seen part of it, then the rest.
    let partial = |seen: &Reports| {
        seen.lock()
            .unwrap()
            .iter()
            .any(|&(done, total)| done > 0 && done < len as u64 && total == Some(len as u64))
    };
    crate::support::wait_until(|| partial(&first) && partial(&second)).await;
    gate.add_permits(1);
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_eq!(
        (a.status(), b.status()),
        (CacheStatus::Downloaded, CacheStatus::Coalesced)
    );
    assert_eq!(origin.hits("g.nii.gz"), 1);
    for seen in [&first, &second] {
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.last(),
            Some(&(len as u64, Some(len as u64))),
            "{seen:?}"
        );
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
        // Every 1% (at least a MiB): a handful of reports for 8 MiB, not one per chunk.
        assert!((2..=12).contains(&seen.len()), "{seen:?}");
    }
    let hit_reports = Arc::default();
    let hit = cache.get_with(&url, reporting(&hit_reports)).await.unwrap();
    assert_eq!(hit.status(), CacheStatus::Hit);
    assert!(
        hit_reports.lock().unwrap().is_empty(),
        "a hit reports nothing"
    );
}
