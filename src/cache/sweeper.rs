//! The sweeper stage: the background task that expires entries past their TTL and grace,
//! evicts down to the cap, and saves state.json. It owns its task, its wake-up and its
//! cancellation ([`Sweeper`]).
//!
//! It sees the engine only as [`Swept`]: a sweep is plain synchronous work that returns the
//! next deadline; the loop around it
//! sleeps until that deadline, the sweep interval, a wake-up or cancellation, whichever comes
//! first. The task is owned: its handle is kept, the cache's cancellation token stops it, and
//! [`ImageCache::shutdown`](crate::ImageCache::shutdown) waits for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the sweeper works on (the engine), seen only through this.
pub(super) trait Swept: Send + Sync + 'static {
    /// The sweeper's own state.
    fn sweeper(&self) -> &Sweeper;
    /// Expires and evicts now, disposes of what went, tidies and saves state.json
    /// (blocking); returns the next instant an entry leaves its grace period.
    fn sweep(&self) -> Option<u64>;
    /// Expires and evicts now and disposes of what went, nothing more (blocking): what a
    /// wake-up asks for (a pin let go over the cap or past its grace).
    fn evict(&self);
    /// Saves state.json if anything changed (blocking).
    fn save_state(&self);
    /// Now, by the cache's clock.
    fn now_ms(&self) -> u64;
}

/// The sweeper's own state: its task, what wakes it and what stops it.
#[derive(Default)]
pub(super) struct Sweeper {
    // A std Mutex: taken once at start and once at shutdown, never across an .await.
    task: Mutex<Option<JoinHandle<()>>>,
    wake: Notify,
    cancel: CancellationToken,
    /// Sweeps run, for the tests.
    #[cfg(test)]
    pub(super) sweeps: std::sync::atomic::AtomicU64,
}

impl Sweeper {
    /// Starts the background task of `owner`, unless both its intervals are zero.
    pub(super) fn start<T: Swept>(owner: &Arc<T>, sweep_every: Duration, save_every: Duration) {
        if sweep_every.is_zero() && save_every.is_zero() {
            return;
        }
        let task = tokio::spawn(sweeper_loop(Arc::clone(owner), sweep_every, save_every));
        *owner
            .sweeper()
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    /// Sweeps soon: something may be free to go (a pin let go past its grace, a lower cap).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stops the task without waiting (the last handle went).
    pub(super) fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Stops the background task and waits for it to end.
    pub(super) async fn stop(&self) {
        self.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Sweeps at the next expiry or every `sweep_every`, whichever comes first, and expires and
/// evicts whenever woken; between sweeps, saves state.json every `save_every` if anything
/// changed. Stops when the cache is dropped or shut down.
async fn sweeper_loop<T: Swept>(owner: Arc<T>, sweep_every: Duration, save_every: Duration) {
    let mut next_sweep = (!sweep_every.is_zero()).then(Instant::now);
    let mut woken = false;
    loop {
        let sweep = next_sweep.is_some_and(|at| Instant::now() >= at);
        #[cfg(test)]
        if sweep || woken {
            owner
                .sweeper()
                .sweeps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let this = Arc::clone(&owner);
        let next_expiry = tokio::task::spawn_blocking(move || {
            if sweep {
                this.sweep()
            } else if woken {
                // Light: many let-gos may wake it in a row; the scans wait for their time.
                this.evict();
                None
            } else {
                this.save_state();
                None
            }
        })
        .await
        .ok()
        .flatten();
        woken = false;
        if sweep {
            let until_expiry = next_expiry
                .map(|at| Duration::from_millis(at.saturating_sub(owner.now_ms())))
                .unwrap_or(sweep_every);
            next_sweep = Some(Instant::now() + until_expiry.min(sweep_every));
        }
        let mut wait = next_sweep.map_or(Duration::MAX, |at| at - Instant::now());
        if !save_every.is_zero() {
            wait = wait.min(save_every);
        }
        let sweeper = owner.sweeper();
        tokio::select! {
            () = sweeper.cancel.cancelled() => break,
            () = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            // Only a cache that sweeps at all evicts when woken.
            () = sweeper.wake.notified() => woken = next_sweep.is_some(),
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
            .state_save_interval(Duration::ZERO)
            .stale_grace(Duration::from_secs(1))
            .build()
            .await
            .unwrap();
        let inner = Arc::clone(cache.inner());
        let held = inner.pinned(inner.index.pin_current(&key(1)).unwrap());
        clock.advance(Duration::from_secs(60));
        inner.sweeper.wake();
        // Real time, bounded: a sweeper that took the held entry's past deadline for its
        // next would wake every 10 ms.
        let before = inner.sweeper.sweeps.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let woke = inner.sweeper.sweeps.load(Ordering::Relaxed) - before;
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

#[cfg(test)]
mod saving {
    use std::time::Duration;

    use crate::ImageCache;
    use crate::store::Layout;
    use crate::store::testing::put;

    /// This process's record on the directory, as saved, if it is there.
    fn saved(dir: &std::path::Path) -> serde_json::Value {
        std::fs::read_dir(dir.join("v1/procs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|item| item.path().extension().is_some_and(|e| e == "json"))
            .find_map(|item| serde_json::from_slice(&std::fs::read(item.path()).ok()?).ok())
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hit_reaches_disk_within_the_save_interval_without_a_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), 0o600, 0o700);
        let url = "http://h/ct/1.nii.gz";
        let key = crate::key::resolve(url, None).unwrap().key;
        std::fs::create_dir_all(dir.path().join("v1/tmp")).unwrap();
        put(&layout, &key, b"abc", u64::MAX / 2);
        let cache = ImageCache::builder()
            .cache_dir(dir.path())
            .sweep_interval(Duration::ZERO)
            .state_save_interval(Duration::from_millis(50))
            .build()
            .await
            .unwrap();
        assert!(cache.get_cached(url).is_some());
        // Bounded polling: the hit is saved by the background task, not at exit.
        for _ in 0..400 {
            let state = saved(dir.path());
            if state["counters"]["hits"] == 1 && state["entries"][key.as_str()]["hits"] == 1 {
                drop(cache);
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the record never got the hit: {}", saved(dir.path()));
    }
}
