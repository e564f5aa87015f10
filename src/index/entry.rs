//! One committed entry: its meta, freshness, access times, pins and this process's lock on
//! its data file.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::key::Key;
use crate::store::{Meta, Stamp, Validators};

/// One committed entry. Its bytes (and so `meta`'s url, sha256, size and mtime) never change:
/// a new download makes a new `Entry`. Its freshness does change in place when a 304 renews
/// it, so that the pins on it keep protecting the one file.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: Key,
    /// As committed; read expiry and validators through the accessors, which see renewals.
    pub(crate) meta: Meta,
    pub(crate) path: PathBuf,
    pub(super) fetched_at: AtomicU64,
    pub(super) expires_at: AtomicU64,
    // A std Mutex: read when listing or revalidating, written on a 304; never held long.
    pub(super) validators: Mutex<Validators>,
    /// Wall-clock milliseconds of the last hit or commit; persisted in state.json.
    pub(crate) last_access_ms: AtomicU64,
    /// Position in LRU order (larger is more recent).
    pub(super) tick: AtomicU64,
    /// Hits on this entry, persisted.
    pub(crate) hits: AtomicU64,
    /// Of those, the hits of this process since it started.
    pub(crate) own_hits: AtomicU64,
    /// Live `CachedFile`s. Incremented only under the index lock (so eviction, which checks it
    /// under the lock, never races a new pin); decremented anywhere.
    pub(super) pins: AtomicUsize,
    /// Removed from the map (or replaced by a newer version) while pinned: its bytes go
    /// when the last pin does.
    pub(super) doomed: AtomicBool,
    /// An explicit cleanup found it expired (at this expiry) but held: it has no grace period
    /// left, and the sweep that its last unpin wakes removes it. A renewal, which moves the
    /// expiry, ends the mark. Zero: no mark.
    pub(super) no_grace_at: AtomicU64,
    /// This process's shared lock on the data file while it has pins, so that no other
    /// process deletes the file (see `store::hold`). Taken by the first pin, released by the
    /// last, under the index lock.
    pub(crate) held: Mutex<Option<File>>,
    /// Of the meta.json this entry was read from or wrote (see [`Stamp`]).
    pub(super) stamp: [AtomicU64; 4],
}

impl Entry {
    /// `lru` orders entries loaded with equal access times (their saved LRU position).
    pub(crate) fn new(
        key: Key,
        meta: Meta,
        path: PathBuf,
        last_access_ms: u64,
        lru: u64,
        hits: u64,
    ) -> Entry {
        Entry {
            key,
            fetched_at: AtomicU64::new(meta.fetched_at),
            expires_at: AtomicU64::new(meta.expires_at),
            validators: Mutex::new(Validators {
                etag: meta.etag.clone(),
                last_modified: meta.last_modified.clone(),
            }),
            meta,
            path,
            last_access_ms: AtomicU64::new(last_access_ms),
            tick: AtomicU64::new(lru),
            hits: AtomicU64::new(hits),
            own_hits: AtomicU64::new(0),
            pins: AtomicUsize::new(0),
            doomed: AtomicBool::new(false),
            no_grace_at: AtomicU64::new(0),
            held: Mutex::new(None),
            stamp: Default::default(),
        }
    }

    /// An entry found on disk (by recovery or a scan), last used when it was fetched, with no
    /// hits: the saved access times, if any, are merged in by the caller.
    pub(crate) fn found(r: crate::store::Recovered) -> Entry {
        let last = r.meta.fetched_at;
        Entry::new(r.key, r.meta, r.path, last, 0, 0).with_stamp(r.stamp)
    }

    /// The entry, as read from a meta.json stamped `stamp`.
    #[must_use]
    pub(crate) fn with_stamp(self, stamp: Stamp) -> Entry {
        self.set_stamp(stamp);
        self
    }

    pub(crate) fn stamp(&self) -> Stamp {
        Stamp {
            ino: self.stamp[0].load(Ordering::Relaxed),
            mtime_ns: self.stamp[1].load(Ordering::Relaxed),
            len: self.stamp[2].load(Ordering::Relaxed),
            dev: self.stamp[3].load(Ordering::Relaxed),
        }
    }

    pub(super) fn set_stamp(&self, stamp: Stamp) {
        self.stamp[0].store(stamp.ino, Ordering::Relaxed);
        self.stamp[1].store(stamp.mtime_ns, Ordering::Relaxed);
        self.stamp[2].store(stamp.len, Ordering::Relaxed);
        self.stamp[3].store(stamp.dev, Ordering::Relaxed);
    }

    /// Takes the freshness of `newer`, the same version as read from a renewed meta.json.
    pub(super) fn renew_from(&self, newer: &Entry) {
        self.set_stamp(newer.stamp());
        self.fetched_at.store(newer.fetched_at(), Ordering::Relaxed);
        self.expires_at.store(newer.expires_at(), Ordering::Relaxed);
        *self.validators.lock().unwrap_or_else(|e| e.into_inner()) = newer.validators();
    }

    /// Milliseconds since the epoch of the download or the last renewal.
    pub(crate) fn fetched_at(&self) -> u64 {
        self.fetched_at.load(Ordering::Relaxed)
    }

    /// Milliseconds since the epoch when the entry expires.
    pub(crate) fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    pub(crate) fn validators(&self) -> Validators {
        self.validators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at()
    }

    /// Position in LRU order: larger is more recent.
    pub(crate) fn lru(&self) -> u64 {
        self.tick.load(Ordering::Relaxed)
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::SeqCst) > 0
    }
}
