//! What survives a restart and what the processes on one directory tell each other.
//!
//! - `v1/procs/<id>.json`, one per live process (its `<id>.lock` held exclusive for the
//!   process's life): the counters it counted since it started, the bytes it has reserved for
//!   downloads, and the access times and hits of the entries it touched. Written atomically
//!   every `state_save_interval` when something changed, and at each reservation.
//! - `v1/state.json`: the totals of the processes that are gone. A process folds its own
//!   record in when it closes; a record whose lock can be taken belongs to a process that
//!   died, and the first process to see it folds it in (under `v1/locks/state.lock`, and at
//!   most once: state.json lists the records it has folded).
//!
//! So every process's statistics are the cache's: state.json plus every live record. A
//! missing or corrupt file gives empty state, never a failed start.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::engine::Inner;
use super::procs::{ProcRecord, SavedAccess, SavedState};
use crate::index::Entry;
use crate::key::Key;
use crate::stats::{Counter, SavedCounters};
use crate::store::locks::{self, Try};
use crate::store::{self, Recovered};

impl Inner {
    /// This process's record as it stands.
    fn own_record(&self) -> ProcRecord {
        let started = self.procs.started_ms;
        ProcRecord {
            pid: std::process::id(),
            started_ms: started,
            counters: self.counters.save(),
            reserved_bytes: self.index.own_reserved(),
            entries: self
                .index
                .entries()
                .iter()
                .filter(|e| {
                    e.own_hits.load(Ordering::Relaxed) > 0
                        || e.last_access_ms.load(Ordering::Relaxed) >= started
                })
                .map(|e| {
                    let access = SavedAccess {
                        last_access_ms: e.last_access_ms.load(Ordering::Relaxed),
                        lru: e.lru(),
                        hits: e.own_hits.load(Ordering::Relaxed),
                    };
                    (e.key.as_str().to_owned(), access)
                })
                .collect(),
            reset_ms: self.procs.reset_ms.load(Ordering::Relaxed),
        }
    }

    /// Writes this process's record (blocking).
    pub(super) fn save_record(&self) {
        let json = serde_json::to_vec(&self.own_record()).expect("a record always serialises");
        if let Err(e) = self
            .layout
            .write_atomic(&self.procs.json_path(&self.layout), "proc", &json)
        {
            self.counters.mark_unsaved();
            tracing::warn!(error = %e, "cannot save this process's record");
        }
    }

    /// Saves this process's record if anything changed, folds the records of dead processes
    /// into state.json, and reads what the live ones counted, reserved and touched
    /// (blocking). Called every `state_save_interval` by the sweeper.
    pub(super) fn save_state_now(&self) {
        if self.counters.take_unsaved() {
            self.save_record();
        }
        self.read_others();
        self.sync_from_disk();
        store::tidy_temp(&self.layout);
    }

    /// Brings the index in line with the entries on disk, which other processes commit and
    /// remove (blocking): one `lstat` per entry, a read of the new and changed ones.
    pub(super) fn sync_from_disk(&self) {
        let scan = store::scan(&self.layout, &self.index.stamps());
        let changed = scan.changed.into_iter().map(Entry::found).collect();
        let removed = self.index.merge_from_disk(&scan.present, changed);
        removed.dispose_now();
    }

    /// Reads the entry of `key` from disk and puts it in the index in place of what the
    /// index had, if that differs (blocking).
    pub(super) fn sync_key(&self, key: &Key) -> Option<Recovered> {
        let found = self.layout.read_entry(key);
        let entry = found.clone().map(Entry::found);
        let removed = self.index.replace_from_disk(key, entry);
        removed.dispose_now();
        found
    }

    /// See [`save_state_now`](Self::save_state_now): the reading half.
    pub(super) fn read_others(&self) {
        let dir = self.layout.procs_dir();
        let Ok(items) = self.layout.read_dir(&dir) else {
            return;
        };
        let own = format!("{}.json", self.procs.id);
        let mut dead = Vec::new();
        let mut live = Vec::new();
        let mut locks_alone = Vec::new();
        let names: HashSet<String> = items
            .iter()
            .map(|item| item.file_name().to_string_lossy().into_owned())
            .collect();
        for name in &names {
            let Some(id) = name.strip_suffix(".json") else {
                if let Some(id) = name.strip_suffix(".lock")
                    && id != self.procs.id
                    && !names.contains(&format!("{id}.json"))
                {
                    locks_alone.push(dir.join(name));
                }
                continue;
            };
            if *name == own {
                continue;
            }
            let Ok(raw) = self.layout.read_no_follow(&dir.join(name), 64 << 20) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<ProcRecord>(&raw) else {
                continue;
            };
            // Dead when its lock could be taken or is gone, or is not a lock file at all (a
            // link, planted): another error proves nothing.
            let lock = dir.join(format!("{id}.lock"));
            let planted = self.layout.lstat(&lock).is_ok_and(|md| !md.is_file());
            let alive = !planted
                && !matches!(
                    self.layout.try_exclusive_at(&lock),
                    Ok(Try::Taken(_) | Try::Gone)
                );
            if alive {
                live.push((id.to_owned(), record));
            } else {
                dead.push((id.to_owned(), record));
            }
        }
        // A process that died before it wrote its first record; removed under its lock.
        for path in locks_alone {
            if let Ok(Try::Taken(lock)) = self.layout.try_exclusive_at(&path) {
                let _ = self.layout.remove_file(&path);
                drop(lock);
            }
        }
        // Never later than now: a record from the future would keep its entries first in LRU
        // order for ever, here and, once folded, in state.json.
        let now = self.config.now_ms();
        for (_, record) in &mut dead {
            for access in record.entries.values_mut() {
                access.last_access_ms = access.last_access_ms.min(now);
            }
        }
        let state = if dead.is_empty() {
            super::procs::load(&self.layout)
        } else {
            let (state, saved) = self.with_state(|state| {
                for (id, record) in &dead {
                    state.fold(id, record);
                }
            });
            // Only once they are in state.json (its list of folded records keeps a second
            // reader from counting them again meanwhile).
            if saved {
                for (id, _) in &dead {
                    let _ = self.layout.remove_file(&dir.join(format!("{id}.json")));
                    let _ = self.layout.remove_file(&dir.join(format!("{id}.lock")));
                }
            }
            state
        };
        // Another process reset the counters: what this one counted before goes too.
        if state.reset_ms > self.procs.reset_ms.load(Ordering::Relaxed) {
            self.procs.reset_ms.store(state.reset_ms, Ordering::Relaxed);
            self.counters.reset();
        }
        let mut others = state.counters.clone();
        let mut reserved = 0;
        let mut access: HashMap<String, u64> = HashMap::new();
        // A process killed after it saved its record: its access times (the hits it served)
        // count here too, not only in state.json, which this process read before.
        for (_, record) in &dead {
            for (key, a) in &record.entries {
                let ms = access.entry(key.clone()).or_default();
                *ms = (*ms).max(a.last_access_ms.min(now));
            }
        }
        let cap = self.index.max();
        for (id, record) in &live {
            // No download reserves more than the cap: a reservation beyond it is forged or
            // corrupt (or of a process that runs with a larger cap), and would make this one
            // evict every entry. Ignored, counted and logged once; the record's counters and
            // access times still count.
            let reserved_bytes = if record.reserved_bytes > cap {
                let first = self
                    .procs
                    .refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone());
                if first {
                    self.counters.add(Counter::RecordsRefused, 1);
                    tracing::warn!(
                        record = %dir.join(format!("{id}.json")).display(),
                        reserved_bytes = record.reserved_bytes,
                        cap,
                        "ignoring another process's reservation: it is larger than the cap"
                    );
                }
                0
            } else {
                record.reserved_bytes
            };
            if record.reset_ms >= state.reset_ms {
                others = others.plus(&record.counters);
            }
            reserved = u64::saturating_add(reserved, reserved_bytes);
            for (key, a) in &record.entries {
                let ms = access.entry(key.clone()).or_default();
                *ms = (*ms).max(a.last_access_ms.min(now));
            }
        }
        *self.procs.others.lock().unwrap_or_else(|e| e.into_inner()) = others;
        self.index.set_others_reserved(reserved);
        self.index.merge_access(&access);
    }

    /// At close (blocking): brings the index in line with the disk, then folds this
    /// process's record into state.json and removes it.
    pub(super) fn close_record_blocking(&self) {
        self.sync_from_disk();
        self.fold_own_record();
    }

    /// Folds this process's record into state.json and removes it (blocking).
    fn fold_own_record(&self) {
        let record = self.own_record();
        let id = self.procs.id.clone();
        let (_, saved) = self.with_state(|state| state.fold(&id, &record));
        if !saved {
            // Left for the next process to fold, as a dead process's record.
            return;
        }
        let _ = self.layout.remove_file(&self.procs.json_path(&self.layout));
        let _ = self
            .layout
            .remove_file(&self.layout.procs_dir().join(format!("{id}.lock")));
    }

    /// Zeroes the counters of every process on the directory: state.json's, this process's
    /// at once, the others' at their next reading (blocking).
    pub(super) fn reset_all_counters(&self) {
        let now = self
            .config
            .now_ms()
            .max(self.procs.reset_ms.load(Ordering::Relaxed) + 1);
        self.with_state(|state| {
            state.counters = SavedCounters::default();
            state.reset_ms = now;
        });
        self.procs.reset_ms.store(now, Ordering::Relaxed);
        self.counters.reset();
        *self.procs.others.lock().unwrap_or_else(|e| e.into_inner()) = SavedCounters::default();
        self.save_record();
    }

    /// Reads, changes and writes state.json under its lock; returns what was written.
    /// Changes state.json under its lock; returns it, and whether it was written. Access
    /// times of entries no longer in the cache are dropped, so that it does not grow with
    /// every URL ever cached.
    fn with_state(&self, change: impl FnOnce(&mut SavedState)) -> (SavedState, bool) {
        let lock_path = self.layout.locks_dir().join("state.lock");
        let lock = self
            .layout
            .open_lock_file(&lock_path)
            .ok()
            .and_then(|file| locks::lock_bounded(file, "state.lock"));
        if lock.is_none() {
            tracing::debug!("cannot lock state.json; writing it anyway");
        }
        let mut state = super::procs::load(&self.layout);
        state.version = 1;
        change(&mut state);
        let known: HashSet<Key> = self.index.stamps().into_keys().collect();
        // Also kept: entries another process committed that this one has not scanned yet.
        state.entries.retain(|key, _| {
            Key::parse(key)
                .is_some_and(|key| known.contains(&key) || self.layout.meta_stamp(&key).is_some())
        });
        let json = serde_json::to_vec(&state).expect("state always serialises");
        let saved = match self
            .layout
            .write_atomic(&self.layout.state_path(), "state", &json)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot save state.json");
                false
            }
        };
        drop(lock);
        (state, saved)
    }

    pub(super) async fn save_state_blocking(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || this.save_state_now()).await;
    }
}
