//! After an entry leaves the index: it is counted, announced and logged, and the bytes that
//! the index moved to a trash name are deleted, off the index lock and, from async code, off
//! the async workers (deleting gigabytes can take milliseconds). And what a cleanup would
//! remove, for a dry run.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{EntryInfo, Inner};
use crate::events::Event;
use crate::index::{Entry, Reason, Removed};
use crate::stats::Counter;
use crate::store;

impl Inner {
    /// Counts and logs removals, then deletes their bytes (blocking).
    pub(crate) fn dispose_now(&self, removed: Vec<Removed>) {
        for r in removed {
            let m = &r.entry.meta;
            match r.reason {
                Reason::Evicted => {
                    self.counters.add(Counter::Evictions, 1);
                    self.events.emit(|| Event::Evicted {
                        url: m.url.clone(),
                        bytes: m.size,
                    });
                    tracing::info!(url = %m.url, bytes = m.size, "evicted (size cap)");
                }
                Reason::Expired => {
                    self.counters.add(Counter::Expirations, 1);
                    self.events.emit(|| Event::Expired {
                        url: m.url.clone(),
                        bytes: m.size,
                    });
                    tracing::info!(url = %m.url, bytes = m.size, "expired");
                }
                Reason::Invalidated | Reason::Corrupt | Reason::Replaced => {}
            }
            if let Some(trash) = &r.trash {
                store::remove_any(trash);
            }
            self.counters.mark_unsaved();
        }
    }

    /// [`dispose_now`](Self::dispose_now) on the blocking pool, waited for.
    pub(crate) async fn dispose_blocking(self: &Arc<Self>, removed: Vec<Removed>) {
        if removed.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || this.dispose_now(removed)).await;
    }

    /// [`dispose_now`](Self::dispose_now) on the blocking pool, not waited for (from `Drop`
    /// and other synchronous code); inline when there is no runtime.
    pub(crate) fn dispose_in_background(self: &Arc<Self>, removed: Vec<Removed>) {
        if removed.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let this = Arc::clone(self);
                rt.spawn_blocking(move || this.dispose_now(removed));
            }
            Err(_) => self.dispose_now(removed),
        }
    }
}

/// What [`ImageCache::cleanup`](super::ImageCache::cleanup) would remove now: from
/// [`Admin::cleanup_preview`](super::Admin::cleanup_preview), for a dry run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupPreview {
    /// Entries past their TTL (and grace period) that nobody holds.
    pub expired: Vec<EntryInfo>,
    /// Then the least recently used, until the total fits the size cap.
    pub evicted: Vec<EntryInfo>,
}

/// One entry as [`Admin::entries`](super::Admin::entries) lists it.
pub(super) fn entry_info(e: &Entry) -> EntryInfo {
    EntryInfo {
        url: e.meta.url.clone(),
        path: e.path.clone(),
        size: e.meta.size,
        sha256: e.meta.sha256.clone(),
        fetched_at_ms: e.fetched_at(),
        expires_at_ms: e.expires_at(),
        last_access_ms: e.last_access_ms.load(Ordering::Relaxed),
        hits: e.hits.load(Ordering::Relaxed),
        pinned: e.is_pinned(),
    }
}
