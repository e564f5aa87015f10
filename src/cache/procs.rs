//! The per-process record and state.json, as data: this process's record and lock
//! ([`Procs`]), what a record holds, and state.json's totals, loaded at open. What is done with
//! them (saving, reading the others', folding) is `state.rs`'s.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::index::Entry;
use crate::stats::SavedCounters;
use crate::store::locks::{self, Try};
use crate::store::{Layout, Recovered};

/// How many folded record names state.json remembers (so that none is folded twice).
const FOLDED_KEPT: usize = 256;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct SavedState {
    pub(super) version: u32,
    pub(super) counters: SavedCounters,
    pub(super) entries: HashMap<String, SavedAccess>,
    /// The process records already folded in, newest last.
    pub(super) folded: Vec<String>,
    /// When the counters were last reset (milliseconds since the epoch).
    pub(super) reset_ms: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct SavedAccess {
    pub(super) last_access_ms: u64,
    /// Position in LRU order when saved.
    pub(super) lru: u64,
    pub(super) hits: u64,
}

/// One live process's record.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct ProcRecord {
    pub(super) pid: u32,
    pub(super) started_ms: u64,
    /// Counted by this process since it started (or since the reset it last saw).
    pub(super) counters: SavedCounters,
    /// Reserved for its downloads in progress.
    pub(super) reserved_bytes: u64,
    /// Last access and hits (by this process) of the entries it touched.
    pub(super) entries: HashMap<String, SavedAccess>,
    /// The `reset_ms` of state.json this process last applied.
    pub(super) reset_ms: u64,
}

/// This process's own record and what it knows of the others.
pub(super) struct Procs {
    pub(super) id: String,
    /// Held exclusive while the process lives: a record whose lock can be taken is a dead
    /// process's.
    pub(super) _lock: File,
    /// Counted by every other process, and those before them: state.json's totals plus the
    /// live records.
    pub(super) others: Mutex<SavedCounters>,
    /// The counters reset this process last applied.
    pub(super) reset_ms: std::sync::atomic::AtomicU64,
    pub(super) started_ms: u64,
    /// Records of other processes ignored (a reservation beyond the cap), by name: each is
    /// counted and logged once.
    pub(super) refused: Mutex<std::collections::HashSet<String>>,
}

impl Procs {
    /// Creates this process's record and takes its lock (blocking).
    pub(super) fn start(
        layout: &Layout,
        now_ms: u64,
        state: &SavedState,
    ) -> std::io::Result<Procs> {
        let id = format!("{}-{now_ms}-{:08x}", std::process::id(), fastrand::u32(..));
        // Locked before it is renamed into place: a free lock in `procs` is always a dead
        // process's, which any process may remove at once.
        let temp = layout.unique_temp("proc", "lock");
        let lock = match locks::try_exclusive(layout.open_lock_file(&temp)?)? {
            Try::Taken(file) => file,
            _ => return Err(std::io::Error::other("a fresh process record is locked")),
        };
        if let Err(e) = layout.rename(&temp, &layout.procs_dir().join(format!("{id}.lock"))) {
            let _ = layout.remove_file(&temp);
            return Err(e);
        }
        Ok(Procs {
            id,
            _lock: lock,
            others: Mutex::new(state.counters.clone()),
            reset_ms: std::sync::atomic::AtomicU64::new(state.reset_ms),
            started_ms: now_ms,
            refused: Mutex::default(),
        })
    }

    pub(super) fn others(&self) -> SavedCounters {
        self.others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn json_path(&self, layout: &Layout) -> PathBuf {
        layout.procs_dir().join(format!("{}.json", self.id))
    }
}

impl SavedState {
    /// The entries recovery found, with their saved access times, hits and LRU positions
    /// (an entry the state does not know counts as last used when it was fetched).
    /// The recovered entries with what state.json saved of them; no access time later than
    /// `now` (a record from the future would keep its entries first in LRU order for ever).
    pub(super) fn entries_from(&self, recovered: Vec<Recovered>, now: u64) -> Vec<Entry> {
        recovered
            .into_iter()
            .map(|r| {
                let saved = self.entries.get(r.key.as_str());
                let last = saved
                    .map_or(r.meta.fetched_at, |s| s.last_access_ms)
                    .min(now);
                let hits = saved.map_or(0, |s| s.hits);
                let lru = saved.map_or(0, |s| s.lru);
                Entry::new(r.key, r.meta, r.path, last, lru, hits).with_stamp(r.stamp)
            })
            .collect()
    }

    /// Adds a process's record to the totals, once.
    pub(super) fn fold(&mut self, name: &str, record: &ProcRecord) {
        if self.folded.iter().any(|f| f == name) {
            return;
        }
        if record.reset_ms >= self.reset_ms {
            self.counters = self.counters.plus(&record.counters);
        }
        for (key, access) in &record.entries {
            let saved = self.entries.entry(key.clone()).or_default();
            saved.last_access_ms = saved.last_access_ms.max(access.last_access_ms);
            saved.lru = saved.lru.max(access.lru);
            saved.hits = saved.hits.saturating_add(access.hits);
        }
        self.folded.push(name.to_owned());
        if self.folded.len() > FOLDED_KEPT {
            self.folded.remove(0);
        }
    }
}

/// Loads state.json; a missing or corrupt file gives empty state (with a WARN when corrupt).
pub(super) fn load(layout: &Layout) -> SavedState {
    let path = layout.state_path();
    // Generous: an entry's record is about 100 bytes.
    match layout.read_no_follow(&path, 256 << 20) {
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

/// Property tests of the records other processes leave (state.json, process records): any
/// bytes, no panic.
#[cfg(test)]
mod outside_input {
    use proptest::prelude::*;

    use super::{ProcRecord, load};
    use crate::store::testing::disk;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_state_json_loads_or_starts_afresh(bytes in proptest::collection::vec(any::<u8>(), 0..300), json in "\\{\"(counters|entries|reset_ms|folded)\": ?(\\{\\}|\\[\\]|[0-9]{1,22}|\"[a-z]{0,5}\"|null)\\}") {
            let (_dir, layout) = disk();
            for raw in [bytes.as_slice(), json.as_bytes()] {
                std::fs::write(layout.state_path(), raw).unwrap();
                let _ = load(&layout);
            }
        }

        #[test]
        fn any_process_record_parses_or_is_skipped(json in "\\{\"(pid|reserved_bytes|entries|counters|started_ms)\": ?(\\{\\}|[0-9]{1,22}|-1|\"x\"|null)\\}") {
            let _ = serde_json::from_str::<ProcRecord>(&json);
        }
    }
}
