//! The removals stage: after an entry leaves the index (as a [`Removals`] value that
//! disposes of itself), it is counted, announced and logged, and the bytes that the index
//! moved to a trash name are deleted, off the index lock and, from async code, off the async
//! workers (deleting gigabytes can take milliseconds). It owns the counters and events it
//! reports to, nothing else. And what a cleanup would remove, for a dry run.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::file::EntryInfo;
use crate::events::{Event, Events};
#[cfg(doc)]
use crate::index::Removals;
use crate::index::{Disposer, Entry, Reason, Removed};
use crate::stats::{Counter, Counters};
use crate::store::Layout;

/// Where the index's removals go: counted, announced and logged, then their bytes deleted.
/// It holds only the counters, the events and the directory, so that a [`Removals`] value can
/// dispose of itself wherever it is dropped.
#[derive(Debug)]
pub(crate) struct Disposal {
    counters: Arc<Counters>,
    events: Arc<Events>,
    layout: Layout,
}

impl Disposal {
    pub(super) fn new(counters: &Arc<Counters>, events: &Arc<Events>, layout: &Layout) -> Disposal {
        Disposal {
            counters: Arc::clone(counters),
            events: Arc::clone(events),
            layout: layout.clone(),
        }
    }
}

impl Disposer for Disposal {
    fn dispose(&self, removed: Vec<Removed>) {
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
                self.layout.remove_any(trash);
            }
            self.counters.mark_unsaved();
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
