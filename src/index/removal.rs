//! What leaves the index: expiry, eviction in LRU order under the cap, and the removal of
//! an entry (detached, retired while pinned, or its file claimed and moved to the trash).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Entry, Index, Reason, Removals, Removed, State};
use crate::key::Key;
use crate::store::Claim;

/// How many eviction candidates an eviction checks for files another process removed.
const PHANTOM_CHECKS: usize = 64;

impl Index {
    /// Removes unpinned entries past their expiry and grace period (no grace when
    /// `keep_grace` is false: an explicit cleanup), then evicts to honour the cap. Returns
    /// what was removed and the next instant an entry leaves its grace period.
    pub(crate) fn sweep(&self, now_ms: u64, keep_grace: bool) -> (Removals, Option<u64>) {
        let mut st = self.lock();
        let grace = |e: &Entry| if keep_grace { self.grace_of(e) } else { 0 };
        let expired: Vec<Key> = st
            .entries
            .values()
            .filter(|e| now_ms >= e.expires_at().saturating_add(grace(e)) && !e.is_pinned())
            .map(|e| e.key.clone())
            .collect();
        let mut removed = Vec::with_capacity(expired.len());
        for key in expired {
            removed.extend(self.try_remove_locked(&mut st, &key, Reason::Expired));
        }
        removed.extend(self.evict_locked(&mut st));
        // A pinned entry already past its grace is not a deadline: nothing can be done about
        // it until its last pin drops, which wakes the sweeper (see `Pinned`).
        let next = st
            .entries
            .values()
            .map(|e| e.expires_at().saturating_add(grace(e)))
            .filter(|deadline| *deadline > now_ms)
            .min();
        (self.removals(removed), next)
    }

    /// What [`sweep`](Self::sweep) at `now_ms` would remove, removing nothing: the unpinned
    /// entries past their grace, then the least recently used until the total fits the cap.
    /// The sweep itself may spare some of them (another process holding or renewing one).
    pub(crate) fn sweep_plan(&self, now_ms: u64, keep_grace: bool) -> Vec<(Arc<Entry>, Reason)> {
        let st = self.lock();
        let grace = |e: &Entry| if keep_grace { self.grace_of(e) } else { 0 };
        let mut total = self.total(&st);
        let mut plan: Vec<(Arc<Entry>, Reason)> = st
            .entries
            .values()
            .filter(|e| now_ms >= e.expires_at().saturating_add(grace(e)) && !e.is_pinned())
            .map(|e| (Arc::clone(e), Reason::Expired))
            .collect();
        let mut planned: std::collections::HashSet<Key> =
            plan.iter().map(|(e, _)| e.key.clone()).collect();
        for (e, _) in &plan {
            total = total.saturating_sub(e.meta.size);
        }
        let max = self.max();
        for key in self.eviction_order(&st) {
            if total <= max {
                break;
            }
            if let Some(e) = st.entries.get(&key)
                && planned.insert(key)
            {
                total = total.saturating_sub(e.meta.size);
                plan.push((Arc::clone(e), Reason::Evicted));
            }
        }
        plan
    }

    /// Committed bytes, doomed bytes and every live process's reservations.
    pub(super) fn total(&self, st: &State) -> u64 {
        // Saturating: other processes' reservations come from files anyone may have written.
        st.committed_bytes
            .saturating_add(st.doomed_bytes)
            .saturating_add(st.reserved_bytes)
            .saturating_add(self.others_reserved.load(Ordering::Relaxed))
    }

    /// Evicts unpinned entries, least recently used first, until the total fits the cap.
    /// Entries another process holds, or is downloading again, are skipped.
    pub(super) fn evict_locked(&self, st: &mut State) -> Vec<Removed> {
        let max = self.max();
        if self.total(st) <= max {
            return Vec::new();
        }
        let order = self.eviction_order(st);
        // Entries another process removed since the last scan count bytes no longer on disk:
        // forgotten first, so that they never make this process evict real files instead.
        // Only the first candidates are looked at (an lstat each, under the lock): those an
        // eviction would take, and the others' removals, which are of their least recently
        // used entries, are among them.
        let mut removed = Vec::new();
        for key in order.iter().take(PHANTOM_CHECKS) {
            if self.total(st) <= max {
                return removed;
            }
            let gone = st.entries.get(key).is_some_and(|e| {
                !e.is_pinned()
                    && matches!(
                        self.layout.lstat(&e.path),
                        Err(err) if err.kind() == io::ErrorKind::NotFound
                            || crate::store::behind_a_link(&err)
                    )
            });
            if gone && let Some(entry) = st.entries.remove(key) {
                st.committed_bytes -= entry.meta.size;
                removed.push(self.retire_locked(st, entry, Reason::Replaced));
            }
        }
        for key in order {
            if self.total(st) <= max {
                break;
            }
            removed.extend(self.try_remove_locked(st, &key, Reason::Evicted));
        }
        removed
    }

    /// Unpinned entries in the order they are evicted: expired ones first (they are kept
    /// only for revalidation and fallback), then least recently used first (by the access
    /// times of every process, then by this process's order).
    pub(super) fn eviction_order(&self, st: &State) -> Vec<Key> {
        let now = self.now_ms();
        let mut candidates: Vec<(bool, u64, u64, Key)> = st
            .entries
            .values()
            .filter(|e| !e.is_pinned())
            .map(|e| {
                let last = e.last_access_ms.load(Ordering::Relaxed);
                (e.is_fresh(now), last, e.lru(), e.key.clone())
            })
            .collect();
        candidates.sort_unstable();
        candidates.into_iter().map(|(_, _, _, key)| key).collect()
    }

    /// Removes an unpinned entry if no other process holds its bytes or is changing it (an
    /// automatic removal skips such entries and goes on to the next).
    pub(super) fn try_remove_locked(
        &self,
        st: &mut State,
        key: &Key,
        reason: Reason,
    ) -> Option<Removed> {
        let entry = st.entries.get(key)?;
        if entry.is_pinned() {
            return None;
        }
        let claim = self.layout.claim(key, &entry.path)?;
        if !claim.key_free() {
            return None;
        }
        // Renewed by another process since this one read it: not this process's to expire
        // or evict on what it last knew; the next scan brings the renewal in.
        if self.layout.meta_stamp(key) != Some(entry.stamp())
            && self.layout.names_generation(key, &entry.meta.generation)
        {
            return None;
        }
        let entry = st.entries.remove(key)?;
        st.committed_bytes -= entry.meta.size;
        self.layout
            .withdraw(key, entry.stamp(), &entry.meta.generation);
        Some(self.trash_claimed(entry, reason, claim))
    }

    /// Accounts for an entry just taken out of the map and removes its meta.json (the entry
    /// is gone for every process), then its bytes or, when pinned, dooms it.
    pub(super) fn detach_locked(
        &self,
        st: &mut State,
        entry: Arc<Entry>,
        reason: Reason,
    ) -> Removed {
        st.committed_bytes -= entry.meta.size;
        self.layout
            .withdraw(&entry.key, entry.stamp(), &entry.meta.generation);
        self.retire_locked(st, entry, reason)
    }

    /// Removes the bytes of a version that no meta.json describes any more, or dooms it when
    /// pinned (its bytes then go with its last pin). Bytes another process holds stay; the
    /// scans of the disk remove them once they are free.
    pub(super) fn retire_locked(
        &self,
        st: &mut State,
        entry: Arc<Entry>,
        reason: Reason,
    ) -> Removed {
        // Doomed before the pin count is read; `unpin` decrements before it reads `doomed`.
        // With both SeqCst, either this sees the pin gone or `unpin` sees the doom.
        entry.doomed.store(true, Ordering::SeqCst);
        if entry.is_pinned() {
            st.doomed_bytes += entry.meta.size;
            let id = (entry.key.clone(), entry.meta.generation.clone());
            st.doomed.insert(id, Arc::clone(&entry));
            return Removed {
                entry,
                reason,
                trash: None,
            };
        }
        match self.layout.claim(&entry.key, &entry.path) {
            Some(claim) => self.trash_claimed(entry, reason, claim),
            None => Removed {
                entry,
                reason,
                trash: None,
            },
        }
    }

    /// Moves a claimed version's bytes away, unless a meta.json still describes them (one
    /// another process wrote since this process last read the disk).
    pub(super) fn trash_claimed(&self, entry: Arc<Entry>, reason: Reason, claim: Claim) -> Removed {
        let named = self
            .layout
            .names_generation(&entry.key, &entry.meta.generation);
        let trash = (!named)
            .then(|| self.layout.trash(&entry.key, &entry.path))
            .flatten();
        drop(claim);
        Removed {
            entry,
            reason,
            trash,
        }
    }
}
