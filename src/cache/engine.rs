//! The engine's state, `Inner`: what the stages share (the settings, the layout on disk, the
//! index, the in-flight downloads, the counters and events, this process's record, the tier),
//! each stage in a file of its own reaching only the parts it uses; how a download ends, for
//! its callers; and the primitives every stage hands files out through: pinning an entry and
//! holding it across processes (`hold`), and letting a pin go. Closing the process's record
//! when the last holder lets go is here too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use super::inflight::Inflight;
use super::pin::{Holding, PinHome, Pinned};
use super::sweeper::{Sweeper, Swept};
use super::uploads::Uploads;
use super::{procs, resolve, wants};
use crate::config::Config;
use crate::error::Result;
use crate::events::Events;
use crate::index::{Entry, Index, Reason, Removals};
use crate::key::Key;
use crate::stats::Counter;
use crate::stats::Counters;
use crate::store;
use crate::store::Layout;

/// What every caller of one download gets.
pub(super) type DownloadResult = Result<(Arc<Pinned>, Outcome)>;

/// How a download task ended, for its callers' [`CacheStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Downloaded,
    Revalidated,
    Stale,
    /// Another process had committed it before this one asked: a hit after all.
    Found,
    /// Another process downloaded it while this one waited.
    Waited,
    /// Read from the tier: another host had downloaded it.
    #[cfg(feature = "s3")]
    Tier,
    /// Downloaded, and handed out without being kept (the origin said `no-store`).
    NotStored,
}

pub(crate) struct Inner {
    pub(super) config: Config,
    pub(super) layout: Layout,
    pub(super) index: Index,
    pub(super) inflight: Arc<Inflight<Key, DownloadResult, Arc<wants::Wants>>>,
    pub(super) events: Arc<Events>,
    /// URLs as callers wrote them, resolved (see `resolve`).
    pub(super) resolver: resolve::Resolver,
    pub(super) counters: Arc<Counters>,
    pub(super) default_ttl_ms: AtomicU64,
    pub(super) closed: AtomicBool,
    /// Set by [`Admin::stop_downloads`](super::Admin::stop_downloads): a download stopped
    /// from now on keeps its part file for a later resume.
    pub(super) stopping: Arc<AtomicBool>,
    /// Writer threads alive: after a stop, shutdown gives them a moment to keep their part
    /// files (flush, fsync, the lock record's durable length).
    pub(super) writers: Arc<std::sync::atomic::AtomicUsize>,
    /// The background task and how it is woken and stopped (see `sweeper`).
    pub(super) sweeper: Sweeper,
    /// The lock on the cache directory (shared, or exclusive), released when the cache is
    /// dropped.
    pub(super) _lock: std::fs::File,
    /// This process's record on the directory, and what the others counted.
    pub(super) procs: procs::Procs,
    /// The tier, if one is configured (and the cache is not offline).
    #[cfg(feature = "s3")]
    pub(super) tier: Option<Arc<crate::tier::Tier>>,
    /// Uploads to the tier still running: shutdown waits for them.
    pub(super) uploads: Uploads,
    /// Origins that did not answer, remembered for `CACHE_OUTAGE_MEMORY`.
    pub(super) outages: super::outage::Outages,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Blocking work: a scan of the directory (versions this process let go that others
        // removed meanwhile are deleted now) and state.json written. On a worker of a
        // multi-thread runtime, the worker's other tasks move to another thread first; a
        // current-thread runtime has no other thread to give them, and there (as outside a
        // runtime, or on the blocking pool) it runs here.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            // block_in_place refuses, with a panic before it runs anything, on a thread that
            // may not block (a current-thread runtime's, with a multi-thread handle entered):
            // then the work runs here after all, and never twice.
            let mut ran = false;
            let moved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio::task::block_in_place(|| {
                    ran = true;
                    self.close_record_blocking();
                })
            }));
            if moved.is_ok() || ran {
                return;
            }
        }
        self.close_record_blocking();
    }
}

impl PinHome for Inner {
    fn let_go(&self, entry: &Arc<Entry>) -> Removals {
        let (removed, over_cap) = self.index.unpin(entry);
        // The sweeper does not wake for an entry that pins keep past its grace, nor evict for
        // the cap what is pinned; now it may be free to go. The unpin itself evicts nothing.
        if over_cap || (!entry.is_pinned() && self.index.past_grace(entry, self.config.now_ms())) {
            self.sweeper.wake();
        }
        removed
    }

    fn open(&self, entry: &Entry) -> std::io::Result<std::fs::File> {
        let held = entry.held.lock().unwrap_or_else(|e| e.into_inner());
        match &*held {
            Some(held) => self.layout.reopen(&entry.path, held),
            // Not reached for a handed-out pin (each passed `hold`): by the path, checked.
            None => {
                let file = self.layout.open_no_follow(&entry.path)?;
                if !store::still_intact(&file, &entry.meta) {
                    return Err(store::replaced());
                }
                store::blocking(file)
            }
        }
    }
}

impl Swept for Inner {
    fn sweeper(&self) -> &Sweeper {
        &self.sweeper
    }

    fn sweep(&self) -> Option<u64> {
        self.layout.warn_if_replaced();
        let (removed, next) = self.sweep_now();
        removed.dispose_now();
        self.remove_idle_locks();
        self.save_state_now();
        next
    }

    fn evict(&self) {
        let (removed, _) = self.sweep_now();
        removed.dispose_now();
    }

    fn save_state(&self) {
        self.save_state_now();
    }

    fn now_ms(&self) -> u64 {
        self.config.now_ms()
    }
}

impl Inner {
    /// The sweeper's sweep, now: expires and evicts; returns what was removed and the next
    /// instant an entry leaves its grace period (expired entries stay that long, as stale
    /// copies for offline use and outages; an explicit cleanup keeps none).
    pub(super) fn sweep_now(&self) -> (Removals, Option<u64>) {
        self.index.sweep(self.config.now_ms(), true)
    }

    /// Removes the writer-lock files of URLs with no entry here, no holder and nothing to
    /// resume (blocking: a scan of `locks/`).
    pub(super) fn remove_idle_locks(&self) -> usize {
        let removed = self
            .layout
            .remove_idle_locks(|key| self.index.current(key).is_some());
        if removed > 0 {
            tracing::debug!(removed, "removed the lock files of URLs without an entry");
        }
        removed
    }

    /// Starts the background sweeper, unless both its intervals are zero.
    pub(super) fn start_sweeper(self: &Arc<Self>) {
        Sweeper::start(
            self,
            self.config.sweep_interval,
            self.config.state_save_interval,
        );
    }

    /// Wraps an entry the index has just pinned, so that dropping it unpins.
    pub(super) fn pinned(self: &Arc<Self>, entry: Arc<Entry>) -> Arc<Pinned> {
        Pinned::new(entry, Arc::clone(self) as Arc<dyn PinHome>)
    }
    /// Makes a pinned entry safe to hand out across processes, with plain syscalls rather
    /// than a trip through the blocking pool (cargo bench --bench cache -- hit):
    ///
    /// - the first pin of the entry in this process opens the data file and takes its shared
    ///   lock, so that no other process deletes it while this one holds it, and checks its
    ///   size and mtime (`open`, `flock`, `fstat`); later pins re-check the held file
    ///   (`fstat`);
    /// - then the meta.json on disk must still be the one the entry was read from (`lstat`):
    ///   another process may have removed or replaced the entry.
    ///
    /// Otherwise the entry is taken out of the index: counted as an integrity failure when its
    /// bytes were tampered with, silently when another process changed it. The caller
    /// downloads (or finds the other process's version on disk).
    pub(super) fn hold(self: &Arc<Self>, entry: &Arc<Entry>) -> Holding {
        #[derive(PartialEq)]
        enum Found {
            Intact,
            Busy,
            Bad,
        }
        let found = {
            let mut held = entry.held.lock().unwrap_or_else(|e| e.into_inner());
            match &*held {
                Some(file) if store::still_intact(file, &entry.meta) => Found::Intact,
                Some(_) => Found::Bad,
                None => match self.layout.hold(&entry.path, &entry.meta) {
                    store::Hold::Held(file) => {
                        *held = Some(file);
                        Found::Intact
                    }
                    store::Hold::Busy => Found::Busy,
                    store::Hold::Bad => Found::Bad,
                },
            }
        };
        let unchanged = self.layout.meta_stamp(&entry.key) == Some(entry.stamp());
        match found {
            Found::Intact if unchanged => Holding::Held,
            Found::Bad if unchanged => {
                self.counters.add(Counter::IntegrityFailures, 1);
                tracing::warn!(
                    url = %entry.meta.url,
                    path = %entry.path.display(),
                    "cached file is missing or was modified; downloading it again"
                );
                self.index
                    .remove_exact(entry, Reason::Corrupt)
                    .dispose_in_background_holding(Arc::clone(self));
                Holding::Corrupt
            }
            // Being removed by another process, or out of reach for now (an error that
            // proves nothing): a miss, and the entry stays; the caller's download finds what
            // the disk has under the URL's lock.
            Found::Busy if unchanged => Holding::Changed,
            // Already removed or replaced by another process.
            _ => {
                tracing::debug!(url = %entry.meta.url, "changed on disk by another process");
                self.index
                    .forget(entry)
                    .dispose_in_background_holding(Arc::clone(self));
                Holding::Changed
            }
        }
    }
}
