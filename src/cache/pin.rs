//! The pin: a committed entry held on behalf of callers ([`Pinned`], which every
//! [`CachedFile`](super::CachedFile) shares) and how an entry is made safe to hand out across
//! processes ([`Inner::hold`]: the data file's shared lock, its size and mtime, and its
//! meta.json still the one read). The hit path, the download, the tier and the commit all
//! hand out files through it.

use std::sync::Arc;

use super::Inner;
use crate::index::{Entry, Reason};
use crate::stats::Counter;
use crate::store;

/// A committed entry pinned on behalf of one or more callers: while it lives, eviction and
/// expiry leave the file alone.
pub(crate) struct Pinned {
    pub(super) entry: Arc<Entry>,
    pub(super) inner: Arc<Inner>,
}

impl Inner {
    /// Wraps an entry the index has just pinned, so that dropping it unpins.
    pub(super) fn pinned(self: &Arc<Self>, entry: Arc<Entry>) -> Arc<Pinned> {
        Arc::new(Pinned {
            entry,
            inner: Arc::clone(self),
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.inner.index.unpin(&self.entry).dispose_in_background();
        // The sweeper does not wake for an entry that pins keep past its grace; now it may be
        // free to go.
        if self
            .inner
            .index
            .past_grace(&self.entry, self.inner.config.now_ms())
        {
            self.inner.wake_sweeper.notify_one();
        }
    }
}

impl Inner {
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
                None => match store::hold(&entry.path, &entry.meta) {
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
                    .dispose_in_background();
                Holding::Corrupt
            }
            // Being removed by another process, or out of reach for now (an error that
            // proves nothing): a miss, and the entry stays; the caller's download finds what
            // the disk has under the URL's lock.
            Found::Busy if unchanged => Holding::Changed,
            // Already removed or replaced by another process.
            _ => {
                tracing::debug!(url = %entry.meta.url, "changed on disk by another process");
                self.index.forget(entry).dispose_in_background();
                Holding::Changed
            }
        }
    }
}

/// What [`Inner::hold`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holding {
    /// Held by this process, intact, and still the entry on disk.
    Held,
    /// Its bytes were tampered with: counted and removed.
    Corrupt,
    /// Another process removed or replaced it (or is removing it now).
    Changed,
}
