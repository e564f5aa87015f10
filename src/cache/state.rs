//! state.json: the access times, LRU order and counters that survive a restart.
//!
//! Written atomically (temp file, fsync, rename) by the sweeper, by `shutdown`, and when the
//! cache is dropped; a missing or corrupt file gives empty state, never a failed start.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::Inner;
use crate::index::Entry;
use crate::stats::SavedCounters;
use crate::store::{Layout, Recovered};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct SavedState {
    version: u32,
    pub(super) counters: SavedCounters,
    entries: HashMap<String, SavedAccess>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct SavedAccess {
    last_access_ms: u64,
    /// Position in LRU order when saved.
    lru: u64,
    hits: u64,
}

impl SavedState {
    /// The entries recovery found, with their saved access times, hits and LRU positions
    /// (an entry the state does not know counts as last used when it was fetched).
    pub(super) fn entries_from(&self, recovered: Vec<Recovered>) -> Vec<Entry> {
        recovered
            .into_iter()
            .map(|r| {
                let saved = self.entries.get(r.key.as_str());
                let last = saved.map_or(r.meta.fetched_at, |s| s.last_access_ms);
                let hits = saved.map_or(0, |s| s.hits);
                let lru = saved.map_or(0, |s| s.lru);
                Entry::new(r.key, r.meta, r.path, last, lru, hits)
            })
            .collect()
    }
}

impl Inner {
    fn saved_state(&self) -> SavedState {
        SavedState {
            version: 1,
            counters: self.counters.save(),
            entries: self
                .index
                .entries()
                .iter()
                .map(|e| {
                    let access = SavedAccess {
                        last_access_ms: e.last_access_ms.load(Ordering::Relaxed),
                        lru: e.lru(),
                        hits: e.hits.load(Ordering::Relaxed),
                    };
                    (e.key.as_str().to_owned(), access)
                })
                .collect(),
        }
    }

    /// Writes state.json if anything changed (blocking).
    pub(super) fn save_state_now(&self) {
        if !self.counters.take_unsaved() {
            return;
        }
        let json = serde_json::to_vec(&self.saved_state()).expect("state always serialises");
        if let Err(e) = self
            .layout
            .write_atomic(&self.layout.state_path(), "state", &json)
        {
            self.counters.mark_unsaved();
            tracing::warn!(error = %e, "cannot save state.json");
        }
    }

    pub(super) async fn save_state_blocking(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || this.save_state_now()).await;
    }
}

/// Loads state.json; a missing or corrupt file gives empty state (with a WARN when corrupt).
pub(super) fn load(layout: &Layout) -> SavedState {
    let path = layout.state_path();
    // Generous: an entry's record is about 100 bytes.
    match crate::store::read_no_follow(&path, 256 << 20) {
        Ok(raw) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "state.json is corrupt; counters start from zero");
            SavedState::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SavedState::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read state.json");
            SavedState::default()
        }
    }
}
