//! The hit path: a lookup that touches the LRU order and pins under the index lock, then one
//! `stat` (size and mtime against meta.json) and no re-hash. Also offline mode, which serves
//! what is cached, fresh or expired.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Inner;
use super::file::{CacheStatus, CachedFile, GetOptions};
use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::index::{Entry, Lookup, Reason};
use crate::key::Resolved;
use crate::stats::Counter;
use crate::store;

impl Inner {
    /// Offline: serve what is cached, fresh or expired; a miss is [`ErrorKind::NotCached`].
    pub(super) fn get_offline(
        self: &Arc<Self>,
        r: &Resolved,
        options: &GetOptions,
    ) -> Result<CachedFile> {
        let not_cached = || {
            Error::new(
                ErrorKind::NotCached,
                "offline mode and the file is not cached",
            )
            .with_url(&r.display)
        };
        let max_age = options.ttl.map(duration_ms);
        let entry = match self.index.lookup(&r.key, self.config.now_ms(), max_age) {
            Lookup::Hit(entry) => return self.accept_hit(entry, options).ok_or_else(not_cached),
            Lookup::Stale(entry) if self.index.pin_if_current(&entry) => entry,
            Lookup::Stale(_) | Lookup::Missing => return Err(not_cached()),
        };
        let mut file = self.accept_hit(entry, options).ok_or_else(not_cached)?;
        file.status = CacheStatus::Stale;
        self.counters.add(Counter::StaleServed, 1);
        tracing::warn!(url = %r.display, "offline mode: serving an expired copy");
        Ok(file)
    }

    /// The hit path: lookup and pin under the index lock, then one `stat` for the cheap check.
    pub(super) fn try_hit(
        self: &Arc<Self>,
        resolved: &Resolved,
        options: &GetOptions,
    ) -> Option<CachedFile> {
        let max_age = options.ttl.map(duration_ms);
        let entry = match self
            .index
            .lookup(&resolved.key, self.config.now_ms(), max_age)
        {
            Lookup::Hit(entry) => entry,
            Lookup::Stale(_) | Lookup::Missing => return None,
        };
        self.accept_hit(entry, options)
    }

    pub(super) fn accept_hit(
        self: &Arc<Self>,
        entry: Arc<Entry>,
        options: &GetOptions,
    ) -> Option<CachedFile> {
        let pinned = self.pinned(Arc::clone(&entry));
        let entry = &entry;
        if let Some(expected) = &options.expected_sha256
            && !entry.meta.sha256.eq_ignore_ascii_case(expected.trim())
        {
            return None;
        }
        if self.hold(entry) != Holding::Held {
            drop(pinned);
            return None;
        }
        self.counters.add(Counter::Hits, 1);
        self.counters
            .add(Counter::BytesServedFromCache, entry.meta.size);
        entry.hits.fetch_add(1, Ordering::Relaxed);
        entry.own_hits.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(url = %entry.meta.url, path = %entry.path.display(), "cache hit");
        self.events.emit(|| Event::Hit {
            url: entry.meta.url.clone(),
        });
        Some(CachedFile {
            pinned,
            status: CacheStatus::Hit,
        })
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
