//! No task or file descriptor outlives the downloads that needed it, whatever the origin did.
//! The check runs in a child process of its own, so that the process's descriptor count is
//! this test's alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::origin::{Fault, Origin, Route, volume};
use crate::support::{as_child, builder, run_child, temp_files};
use imgcache::ManualClock;

use crate::MB;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn failures_leak_no_task_and_no_file_descriptor() {
    run_child("leaks::leak_check", &[]);
}

#[test]
#[ignore = "run in a child process by failures_leak_no_task_and_no_file_descriptor"]
fn leak_check() {
    as_child("leaks::leak_check", leak_check_body());
}

async fn leak_check_body() {
    let origin = Origin::start().await;
    let body = volume(1, 2 * MB);
    origin.route("ok.nii.gz", Route::ok(body.clone()).etag("\"1\""));
    origin.route(
        "reset.nii.gz",
        Route::ok(body.clone()).fault(Fault::ResetAfter(MB)),
    );
    origin.route(
        "stall.nii.gz",
        Route::ok(body.clone()).fault(Fault::StallAfterHeaders),
    );
    origin.route("down.nii.gz", Route::status(503));
    origin.route(
        "short.nii.gz",
        Route::ok(body.clone()).fault(Fault::CloseAfter(MB)),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .network(|n| n.read_timeout(Duration::from_millis(200)))
        .network(|n| n.retries(1))
        .build()
        .await
        .unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    // One warm-up download so that lazily created resources (the DNS resolver, the blocking
    // pool's threads) exist before the baseline.
    drop(cache.get(origin.url("ok.nii.gz")).await.unwrap());
    cache.invalidate(origin.url("ok.nii.gz")).await.unwrap();
    let (fds, tasks) = settle(|| (open_fds(), metrics.num_alive_tasks())).await;

    for round in 0..3 {
        for path in ["reset", "stall", "down", "short"] {
            let err = cache
                .get(origin.url(&format!("{path}.nii.gz")))
                .await
                .unwrap_err();
            assert!(err.is_transient(), "{round} {path}: {err}");
        }
        // Callers that give up early.
        let give_up = tokio::time::timeout(
            Duration::from_millis(20),
            cache.get(origin.url("stall.nii.gz")),
        )
        .await;
        assert!(give_up.is_err());
        let file = cache.get(origin.url("ok.nii.gz")).await.unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), body);
        drop(file);
        cache.invalidate(origin.url("ok.nii.gz")).await.unwrap();
    }
    // The abandoned stalled download still runs until its idle timeout; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().downloads_in_progress > 0 {
        assert!(Instant::now() < deadline, "a download never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (fds_after, tasks_after) = settle(|| (open_fds(), metrics.num_alive_tasks())).await;
    assert!(
        fds_after <= fds,
        "file descriptors leaked: {fds} before, {fds_after} after"
    );
    assert!(
        tasks_after <= tasks,
        "tasks leaked: {tasks} before, {tasks_after} after"
    );
    assert!(temp_files(dir.path()).is_empty());
    assert_eq!(cache.stats().reserved_bytes, 0);
}

/// Waits (bounded) until the counts stop falling (connections closing), then returns them.
async fn settle(counts: impl Fn() -> (usize, usize)) -> (usize, usize) {
    let mut last = counts();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counts();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}
