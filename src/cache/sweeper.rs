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
        #[cfg(test)]
        self.sweeps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::clock::{ManualClock, unix_ms};
    use crate::store::testing::{disk, key, put};
    use crate::{Clock, ImageCache};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweeper_sleeps_while_only_a_held_entry_is_past_its_grace() {
        let (dir, layout) = disk();
        let clock = Arc::new(ManualClock::new());
        let expires = unix_ms(clock.now()) + 1000;
        put(&layout, &key(1), b"abc", expires);
        let cache = ImageCache::builder()
            .cache_dir(dir.path())
            .clock(Arc::clone(&clock) as Arc<dyn Clock>)
            .sweep_interval(Duration::from_secs(3600))
            .stale_grace(Duration::from_secs(1))
            .build()
            .await
            .unwrap();
        let inner = Arc::clone(cache.inner());
        let held = inner.pinned(inner.index.pin_current(&key(1)).unwrap());
        clock.advance(Duration::from_secs(60));
        inner.wake_sweeper.notify_one();
        // Real time, bounded: a sweeper that took the held entry's past deadline for its
        // next would wake every 10 ms.
        let before = inner.sweeps.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let woke = inner.sweeps.load(Ordering::Relaxed) - before;
        assert!(
            woke <= 2,
            "the sweeper woke {woke} times for nothing it could do"
        );
        assert_eq!(inner.index.figures().entries, 1, "held, so kept");
        // The last pin dropping wakes it, and the entry goes.
        drop(held);
        for _ in 0..200 {
            if inner.index.figures().entries == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the released entry was never swept");
    }
}
