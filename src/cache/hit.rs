//! The hit path: a lookup that touches the LRU order and pins under the index lock, then one
//! `stat` (size and mtime against meta.json) and no re-hash. Also offline mode, which serves
//! what is cached, fresh or expired.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::engine::Inner;
use super::file::{CacheStatus, CachedFile, GetOptions};
use super::pin::Holding;
use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::index::{Entry, Lookup};
use crate::key::Resolved;
use crate::stats::Counter;

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
}
