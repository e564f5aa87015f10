//! In-memory entries: lookup, LRU order, size totals, reservations and pins.
//!
//! The map and the directory must change together, so the index asks the store to install or
//! take away an entry's files while it holds its one lock: no lookup ever sees an entry whose
//! files are half there. The store's side of those critical sections is a few metadata
//! syscalls (rename, unlink, mkdir); deleting the bytes of a removed file (which can take
//! milliseconds for gigabytes) happens after the lock is released, from a trash name. The
//! index itself makes no file-system call.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::{Clock, unix_ms};
use crate::key::Key;
use crate::store::{Layout, Meta, Stamp, TempFile, Validators};

mod entry;
mod removal;
mod removals;
pub(crate) use entry::Entry;
pub(crate) use removals::{Disposer, Removals};

/// Why an entry left the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Evicted,
    Expired,
    Invalidated,
    Corrupt,
    Replaced,
}

/// An entry taken out of the index; `trash` (if any) still has to be deleted.
#[derive(Debug)]
pub(crate) struct Removed {
    pub(crate) entry: Arc<Entry>,
    pub(crate) reason: Reason,
    pub(crate) trash: Option<PathBuf>,
}

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Fresh; pinned on behalf of the caller.
    Hit(Arc<Entry>),
    /// Past its expiry (or the caller's maximum age) but within the grace period: usable
    /// for revalidation or as a fallback. Not pinned.
    Stale(Arc<Entry>),
    Missing,
}

/// Totals for the statistics.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub(crate) entries: u64,
    pub(crate) committed_bytes: u64,
    pub(crate) doomed_bytes: u64,
    pub(crate) reserved_bytes: u64,
    pub(crate) pinned: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Key, Arc<Entry>>,
    /// Removed or replaced but pinned, by key and version: each version has its own
    /// directory, so any number of them may wait for their holders.
    doomed: HashMap<(Key, String), Arc<Entry>>,
    committed_bytes: u64,
    doomed_bytes: u64,
    reserved_bytes: u64,
}

impl State {
    /// Whether `entry` is the current entry for its key.
    fn is_current(&self, entry: &Arc<Entry>) -> bool {
        self.entries
            .get(&entry.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
    }

    /// Takes `entry` out of the map if it is still the current entry for its key.
    fn take_current(&mut self, entry: &Arc<Entry>) -> Option<Arc<Entry>> {
        if !self.is_current(entry) {
            return None;
        }
        self.entries.remove(&entry.key)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Index {
    // A std Mutex rather than an async one or a sharded map: every critical section is short,
    // none spans an .await, and a lookup, an LRU touch and a pin must happen atomically.
    state: Mutex<State>,
    tick: AtomicU64,
    /// The size cap in bytes; changed at run time by `set_max`.
    max: AtomicU64,
    /// How long past expiry an entry is kept, in milliseconds.
    grace_ms: u64,
    /// What the other live processes have reserved for their downloads (from their procs
    /// files), counted against the cap.
    others_reserved: AtomicU64,
    clock: Arc<dyn Clock>,
    layout: Layout,
    /// Where what leaves the index is counted and deleted (see [`Removals`]).
    disposer: Arc<dyn Disposer>,
}

impl Index {
    pub(crate) fn new(
        layout: Layout,
        max: u64,
        grace_ms: u64,
        clock: Arc<dyn Clock>,
        disposer: Arc<dyn Disposer>,
    ) -> Index {
        Index {
            state: Mutex::new(State::default()),
            tick: AtomicU64::new(1),
            max: AtomicU64::new(max),
            grace_ms,
            others_reserved: AtomicU64::new(0),
            clock,
            layout,
            disposer,
        }
    }

    /// `removed` as a value that disposes of itself.
    fn removals(&self, removed: Vec<Removed>) -> Removals {
        Removals::new(removed, &self.disposer)
    }

    fn now_ms(&self) -> u64 {
        unix_ms(self.clock.now())
    }

    pub(crate) fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// How many entries are past their expiry at `now_ms` (after an explicit cleanup: those
    /// somebody holds).
    /// The expired entries left (held), each marked to lose its grace period: an explicit
    /// cleanup asked for them to go, so the sweep that their last unpin wakes removes them.
    pub(crate) fn mark_kept_expired(&self, now_ms: u64) -> u64 {
        let st = self.lock();
        let mut n = 0;
        for e in st.entries.values().filter(|e| now_ms >= e.expires_at()) {
            e.no_grace_at
                .store(e.expires_at().max(1), Ordering::Relaxed);
            n += 1;
        }
        n
    }

    /// Whether `entry` is past its expiry and grace period at `now_ms`: the sweep's to take.
    pub(crate) fn past_grace(&self, entry: &Entry, now_ms: u64) -> bool {
        now_ms >= entry.expires_at().saturating_add(self.grace_of(entry))
    }

    /// The grace period `entry` has after it expires: none once a cleanup asked for it.
    pub(super) fn grace_of(&self, entry: &Entry) -> u64 {
        if entry.no_grace_at.load(Ordering::Relaxed) == entry.expires_at().max(1) {
            0
        } else {
            self.grace_ms
        }
    }

    /// Changes the cap and evicts to honour it.
    pub(crate) fn set_max(&self, max: u64) -> Removals {
        let mut st = self.lock();
        self.max.store(max, Ordering::Relaxed);
        self.removals(self.evict_locked(&mut st))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every mutation is a
        // single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, entry: &Entry, now_ms: u64) {
        entry
            .tick
            .store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        entry.last_access_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Inserts entries found by recovery, oldest access first so that LRU order survives.
    pub(crate) fn load(&self, mut entries: Vec<Entry>) {
        entries.sort_by_key(|e| (e.last_access_ms.load(Ordering::Relaxed), e.lru()));
        let mut st = self.lock();
        for entry in entries {
            let ms = entry.last_access_ms.load(Ordering::Relaxed);
            self.touch(&entry, ms);
            st.committed_bytes += entry.meta.size;
            if let Some(old) = st.entries.insert(entry.key.clone(), Arc::new(entry)) {
                st.committed_bytes -= old.meta.size;
            }
        }
    }

    /// Looks `key` up; a fresh entry is touched and pinned.
    pub(crate) fn lookup(&self, key: &Key, now_ms: u64, max_age_ms: Option<u64>) -> Lookup {
        let st = self.lock();
        let Some(entry) = st.entries.get(key) else {
            return Lookup::Missing;
        };
        let expired = now_ms >= entry.expires_at()
            || max_age_ms.is_some_and(|age| now_ms >= entry.fetched_at().saturating_add(age));
        if expired {
            if now_ms >= entry.expires_at().saturating_add(self.grace_ms) {
                return Lookup::Missing;
            }
            return Lookup::Stale(Arc::clone(entry));
        }
        entry.pins.fetch_add(1, Ordering::SeqCst);
        self.touch(entry, now_ms);
        Lookup::Hit(Arc::clone(entry))
    }

    /// Pins `entry` (to serve it stale) if it is still the current entry for its key.
    pub(crate) fn pin_if_current(&self, entry: &Arc<Entry>) -> bool {
        let st = self.lock();
        if !st.is_current(entry) {
            return false;
        }
        entry.pins.fetch_add(1, Ordering::SeqCst);
        self.touch(entry, self.now_ms());
        true
    }

    /// Renews an entry after a 304: its new meta.json replaces the old one, expiry and
    /// validators change in place, and it is pinned for the download's callers. Returns false
    /// (changing nothing) when the entry was removed or replaced meanwhile, in this process
    /// or on disk by another.
    pub(crate) fn renew(
        &self,
        entry: &Arc<Entry>,
        meta: &Meta,
        meta_file: TempFile,
    ) -> io::Result<bool> {
        let st = self.lock();
        if !st.is_current(entry) || self.layout.meta_stamp(&entry.key) != Some(entry.stamp()) {
            return Ok(false);
        }
        let stamp = self.layout.replace_meta(&entry.key, meta_file)?;
        entry.set_stamp(stamp);
        entry.fetched_at.store(meta.fetched_at, Ordering::Relaxed);
        entry.expires_at.store(meta.expires_at, Ordering::Relaxed);
        *entry.validators.lock().unwrap_or_else(|e| e.into_inner()) = Validators {
            etag: meta.etag.clone(),
            last_modified: meta.last_modified.clone(),
        };
        entry.pins.fetch_add(1, Ordering::SeqCst);
        self.touch(entry, self.now_ms());
        drop(st);
        Ok(true)
    }

    /// Evicts unpinned entries (expired first, then least recently used) until `bytes` are
    /// freed or nothing is left to evict: room for a download that hit a full disk.
    pub(crate) fn make_room(&self, bytes: u64) -> Removals {
        let mut st = self.lock();
        let mut freed = 0;
        let mut removed = Vec::new();
        for key in self.eviction_order(&st) {
            if freed >= bytes {
                break;
            }
            if let Some(r) = self.try_remove_locked(&mut st, &key, Reason::Evicted) {
                freed += r.entry.meta.size;
                removed.push(r);
            }
        }
        self.removals(removed)
    }

    /// The current entry for `key` if it is fresh or within its grace period; not pinned.
    pub(crate) fn current(&self, key: &Key) -> Option<Arc<Entry>> {
        let now = self.now_ms();
        let st = self.lock();
        st.entries
            .get(key)
            .filter(|e| now < e.expires_at().saturating_add(self.grace_ms))
            .cloned()
    }

    /// Pins the current entry for `key`, fresh or not, without touching its LRU position.
    pub(crate) fn pin_current(&self, key: &Key) -> Option<Arc<Entry>> {
        let st = self.lock();
        let entry = st.entries.get(key)?;
        entry.pins.fetch_add(1, Ordering::SeqCst);
        Some(Arc::clone(entry))
    }

    /// Drops one pin. When it was the last, this process's lock on the file is released and
    /// a doomed entry's files are removed (unless another process holds them); nothing is
    /// evicted. Also says whether the cache is above the cap once the entry is free to go
    /// (read under the same lock): something is then for the sweeper to evict.
    pub(crate) fn unpin(&self, entry: &Arc<Entry>) -> (Removals, bool) {
        if entry.pins.fetch_sub(1, Ordering::SeqCst) != 1 {
            return (self.removals(Vec::new()), false);
        }
        let doomed = entry.doomed.load(Ordering::SeqCst);
        let mut st = self.lock();
        // Pins are only added under the index lock, so none can arrive while it is held.
        if !entry.is_pinned() {
            entry.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let mut removed = Vec::new();
        if doomed {
            let id = (entry.key.clone(), entry.meta.generation.clone());
            let ours = st.doomed.get(&id).is_some_and(|d| Arc::ptr_eq(d, entry));
            if ours && !entry.is_pinned() {
                st.doomed.remove(&id);
                st.doomed_bytes -= entry.meta.size;
                let trash = self
                    .layout
                    .claim(&entry.key, &entry.path)
                    .filter(|_| {
                        !self
                            .layout
                            .names_generation(&entry.key, &entry.meta.generation)
                    })
                    .and_then(|_claim| self.layout.trash(&entry.key, &entry.path));
                removed.push(Removed {
                    entry: Arc::clone(entry),
                    reason: Reason::Invalidated,
                    trash,
                });
            }
        }
        // No eviction here: the entry let go may be the one its caller is handing out (a path
        // printed, a file about to be opened). The cap is honoured by the next sweep,
        // reservation or commit.
        let over_cap = !entry.is_pinned() && self.total(&st) > self.max();
        (self.removals(removed), over_cap)
    }

    /// Reserves `bytes` for a download, evicting unpinned LRU entries to make room.
    /// Pinned entries may keep the total above the cap for a while.
    #[cfg(test)]
    pub(crate) fn reserve(&self, bytes: u64) -> Removals {
        self.add_reservation(bytes);
        self.evict_to_cap()
    }

    /// Counts `bytes` more as reserved, without evicting (see [`evict_to_cap`]).
    ///
    /// [`evict_to_cap`]: Index::evict_to_cap
    pub(crate) fn add_reservation(&self, bytes: u64) {
        self.lock().reserved_bytes += bytes;
    }

    /// Evicts unpinned entries, least recently used first, until what is counted fits the
    /// cap.
    pub(crate) fn evict_to_cap(&self) -> Removals {
        let mut st = self.lock();
        self.removals(self.evict_locked(&mut st))
    }

    /// Returns a reservation that was not committed.
    pub(crate) fn release(&self, bytes: u64) {
        let mut st = self.lock();
        st.reserved_bytes = st.reserved_bytes.saturating_sub(bytes);
    }

    /// What this process has reserved.
    pub(crate) fn own_reserved(&self) -> u64 {
        self.lock().reserved_bytes
    }

    /// Sets what the other live processes have reserved.
    pub(crate) fn set_others_reserved(&self, bytes: u64) {
        self.others_reserved.store(bytes, Ordering::Relaxed);
    }

    /// Commits a verified download: moves its data and meta into the entry directory and
    /// inserts it pinned once (for the download's callers). Releases `reserved` bytes and
    /// evicts to honour the cap. `held` is the data file, already locked shared.
    pub(crate) fn commit(
        &self,
        entry: Entry,
        data: TempFile,
        held: File,
        meta_file: TempFile,
        reserved: u64,
        now_ms: u64,
    ) -> io::Result<(Arc<Entry>, Removals)> {
        let entry = Arc::new(entry);
        let mut st = self.lock();
        // Installed first: should it fail, the map, the old entry and the reservation (which
        // its owner releases) are as they were.
        let stamp = self
            .layout
            .install(&entry.key, data, &entry.path, meta_file)?;
        entry.set_stamp(stamp);
        *entry.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
        st.reserved_bytes = st.reserved_bytes.saturating_sub(reserved);
        let removed = self.insert_pinned_locked(&mut st, &entry, now_ms);
        drop(st);
        self.layout.sync_entry(&entry.key);
        Ok((entry, self.removals(removed)))
    }

    fn insert_pinned_locked(
        &self,
        st: &mut State,
        entry: &Arc<Entry>,
        now_ms: u64,
    ) -> Vec<Removed> {
        let mut removed = Vec::new();
        // The old version, if any, is replaced: its meta.json is gone (the new one took its
        // place), its bytes stay in their own directory while a caller holds them.
        if let Some(old) = st.entries.remove(&entry.key) {
            st.committed_bytes -= old.meta.size;
            removed.push(self.retire_locked(st, old, Reason::Replaced));
        }
        entry.pins.fetch_add(1, Ordering::SeqCst);
        self.touch(entry, now_ms);
        st.committed_bytes += entry.meta.size;
        st.entries.insert(entry.key.clone(), Arc::clone(entry));
        removed.extend(self.evict_locked(st));
        removed
    }

    /// Takes `entry` out of the map because the disk no longer has it (another process
    /// removed or replaced it); its meta.json is not this process's to touch.
    pub(crate) fn forget(&self, entry: &Arc<Entry>) -> Removals {
        let mut st = self.lock();
        let Some(entry) = st.take_current(entry) else {
            return self.removals(Vec::new());
        };
        st.committed_bytes -= entry.meta.size;
        self.removals(vec![self.retire_locked(&mut st, entry, Reason::Replaced)])
    }

    /// The stamps of every entry, for a scan of the disk.
    pub(crate) fn stamps(&self) -> HashMap<Key, Stamp> {
        let st = self.lock();
        st.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.stamp()))
            .collect()
    }

    /// Brings the map in line with a scan of the disk: entries whose meta.json is gone are
    /// forgotten, `changed` ones (new, or with another meta.json) are put in place. Their
    /// access times are the larger of the two known.
    pub(crate) fn merge_from_disk(&self, present: &HashSet<Key>, changed: Vec<Entry>) -> Removals {
        let mut st = self.lock();
        // The scan ran without the lock: what changed since (a commit of this process, say)
        // is what the disk says now, checked again here (one lstat per entry concerned).
        let gone: Vec<Key> = st
            .entries
            .iter()
            .filter(|(k, e)| !present.contains(*k) && self.layout.meta_stamp(k) != Some(e.stamp()))
            .map(|(k, _)| k.clone())
            .collect();
        let changed: Vec<Entry> = changed
            .into_iter()
            .filter(|e| self.layout.meta_stamp(&e.key) == Some(e.stamp()))
            .collect();
        let mut removed = Vec::new();
        for key in gone {
            if let Some(entry) = st.entries.remove(&key) {
                st.committed_bytes -= entry.meta.size;
                removed.push(self.retire_locked(&mut st, entry, Reason::Replaced));
            }
        }
        for entry in changed {
            if let Some(old) = st.entries.get(&entry.key)
                && old.path == entry.path
            {
                old.renew_from(&entry);
                continue;
            }
            let entry = Arc::new(entry);
            if let Some(old) = st.entries.remove(&entry.key) {
                let last = old.last_access_ms.load(Ordering::Relaxed);
                entry.last_access_ms.fetch_max(last, Ordering::Relaxed);
                entry.tick.store(old.lru(), Ordering::Relaxed);
                st.committed_bytes -= old.meta.size;
                removed.push(self.retire_locked(&mut st, old, Reason::Replaced));
            } else {
                let ms = entry.last_access_ms.load(Ordering::Relaxed);
                self.touch(&entry, ms);
            }
            st.committed_bytes += entry.meta.size;
            st.entries.insert(entry.key.clone(), entry);
        }
        self.removals(removed)
    }

    /// Puts `found` (what the disk has for `key`) in place of the current entry, unless it
    /// is the same meta.json; `None` forgets the current entry.
    pub(crate) fn replace_from_disk(&self, key: &Key, found: Option<Entry>) -> Removals {
        let mut st = self.lock();
        let current_stamp = st.entries.get(key).map(|e| e.stamp());
        let found_stamp = found.as_ref().map(Entry::stamp);
        // Read without the lock: only what is still on disk counts.
        if current_stamp == found_stamp || self.layout.meta_stamp(key) != found_stamp {
            return self.removals(Vec::new());
        }
        if let (Some(old), Some(new)) = (st.entries.get(key), &found)
            && old.path == new.path
        {
            // The same bytes with a renewed meta.json (another process revalidated them).
            old.renew_from(new);
            return self.removals(Vec::new());
        }
        let mut removed = Vec::new();
        let mut last = None;
        if let Some(old) = st.entries.remove(key) {
            last = Some((old.last_access_ms.load(Ordering::Relaxed), old.lru()));
            st.committed_bytes -= old.meta.size;
            removed.push(self.retire_locked(&mut st, old, Reason::Replaced));
        }
        if let Some(entry) = found {
            match last {
                Some((ms, tick)) => {
                    entry.last_access_ms.fetch_max(ms, Ordering::Relaxed);
                    entry.tick.store(tick, Ordering::Relaxed);
                }
                None => self.touch(&entry, self.now_ms()),
            }
            st.committed_bytes += entry.meta.size;
            st.entries.insert(key.clone(), Arc::new(entry));
        }
        self.removals(removed)
    }

    /// Raises the access times of entries to what other processes recorded.
    pub(crate) fn merge_access(&self, access: &HashMap<String, u64>) {
        let st = self.lock();
        for (key, entry) in &st.entries {
            if let Some(ms) = access.get(key.as_str()) {
                entry.last_access_ms.fetch_max(*ms, Ordering::Relaxed);
            }
        }
    }

    /// Removes `key` (invalidate). A pinned entry's bytes stay until its last pin drops, and
    /// those another process holds until it lets them go.
    pub(crate) fn remove(&self, key: &Key, reason: Reason) -> Removals {
        let mut st = self.lock();
        let Some(entry) = st.entries.remove(key) else {
            return self.removals(Vec::new());
        };
        self.removals(vec![self.detach_locked(&mut st, entry, reason)])
    }

    /// Removes `entry` if it is still the current entry for its key (used after a failed
    /// integrity check, which must not remove a newer download).
    pub(crate) fn remove_exact(&self, entry: &Arc<Entry>, reason: Reason) -> Removals {
        let mut st = self.lock();
        let Some(entry) = st.take_current(entry) else {
            return self.removals(Vec::new());
        };
        self.removals(vec![self.detach_locked(&mut st, entry, reason)])
    }

    /// Removes every entry.
    pub(crate) fn clear(&self) -> Removals {
        let mut st = self.lock();
        let all: Vec<_> = st.entries.drain().map(|(_, e)| e).collect();
        let removed = all
            .into_iter()
            .map(|e| self.detach_locked(&mut st, e, Reason::Invalidated))
            .collect();
        self.removals(removed)
    }

    /// Every committed entry.
    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        self.lock().entries.values().cloned().collect()
    }

    pub(crate) fn figures(&self) -> Figures {
        let st = self.lock();
        Figures {
            entries: st.entries.len() as u64,
            committed_bytes: st.committed_bytes,
            doomed_bytes: st.doomed_bytes,
            reserved_bytes: st.reserved_bytes + self.others_reserved.load(Ordering::Relaxed),
            pinned: st.entries.values().filter(|e| e.is_pinned()).count() as u64
                + st.doomed.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
