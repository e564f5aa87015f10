//! The background sweeper: expires entries past their TTL and grace, evicts down to the cap,
//! and saves state.json.
//!
//! `sweep_once` is plain synchronous work that returns the next deadline; the loop around it
//! sleeps until that deadline, the sweep interval, a wake-up or cancellation, whichever comes
//! first. The task is owned: its handle is kept, the cache's cancellation token stops it, and
//! [`ImageCache::shutdown`](crate::ImageCache::shutdown) waits for it.

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use crate::index::Removed;

impl Inner {
    /// Expires and evicts now; returns what was removed and the next instant an entry leaves
    /// its grace period.
    pub(super) fn sweep_now(&self) -> (Vec<Removed>, Option<u64>) {
        self.index.sweep(self.now_ms())
    }

    /// One sweep with its side effects (blocking): removals disposed of, state saved.
    fn sweep_once(&self) -> Option<u64> {
        let (removed, next) = self.sweep_now();
        self.dispose_now(removed);
        self.save_state_now();
        next
    }

    /// Starts the background task, unless the interval is zero.
    pub(super) fn start_sweeper(self: &Arc<Self>) {
        if self.config.sweep_interval.is_zero() {
            return;
        }
        let task = tokio::spawn(sweeper_loop(Arc::clone(self)));
        *self.sweeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Stops the background task and waits for it to end.
    pub(super) async fn stop_sweeper(&self) {
        self.cancel.cancel();
        let task = self
            .sweeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Sweeps at the next expiry or every `sweep_interval`, whichever comes first, and whenever
/// woken; stops when the cache is dropped or shut down.
async fn sweeper_loop(inner: Arc<Inner>) {
    let interval = inner.config.sweep_interval;
    loop {
        let this = Arc::clone(&inner);
        let next = tokio::task::spawn_blocking(move || this.sweep_once())
            .await
            .ok()
            .flatten();
        let until_expiry = next.map(|at| Duration::from_millis(at.saturating_sub(inner.now_ms())));
        let wait = until_expiry
            .map_or(interval, |d| d.min(interval))
            .max(Duration::from_millis(10));
        tokio::select! {
            () = inner.cancel.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            () = inner.wake_sweeper.notified() => {}
        }
    }
}
