//! The pin: a committed entry held on behalf of callers ([`Pinned`], which every
//! [`CachedFile`](super::CachedFile) shares), let go to the index when the last holder goes;
//! and what making an entry safe to hand out found ([`Holding`]). The hit path, the
//! download, the tier and the commit all hand out files through it.

use std::sync::Arc;

use crate::index::{Entry, Removals};

/// A committed entry pinned on behalf of one or more callers: while it lives, eviction and
/// expiry leave the file alone.
pub(crate) struct Pinned {
    pub(super) entry: Arc<Entry>,
    home: Arc<dyn PinHome>,
}

/// What a pin is let go to: the index that counts pins (the engine, see `engine.rs`).
pub(super) trait PinHome: Send + Sync {
    /// Lets one pin of `entry` go; returns what that removed (a doomed version, entries
    /// the pin kept above the cap).
    fn let_go(&self, entry: &Arc<Entry>) -> Removals;

    /// Opens `entry`'s file afresh for reading: the very file this home holds, reached
    /// without following a link.
    fn open(&self, entry: &Entry) -> std::io::Result<std::fs::File>;
}

impl Pinned {
    /// Wraps an entry the index has just pinned, so that dropping it unpins.
    pub(super) fn new(entry: Arc<Entry>, home: Arc<dyn PinHome>) -> Arc<Pinned> {
        Arc::new(Pinned { entry, home })
    }

    /// See [`CachedFile::open`](super::CachedFile::open).
    pub(super) fn open(&self) -> std::io::Result<std::fs::File> {
        self.home.open(&self.entry)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let removed = self.home.let_go(&self.entry);
        if !removed.is_empty() {
            // Counted before the engine's record can close: the disposal holds the engine.
            removed.dispose_in_background_holding(Arc::clone(&self.home));
        }
    }
}

/// What the engine's `hold` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holding {
    /// Held by this process, intact, and still the entry on disk.
    Held,
    /// Its bytes were tampered with: counted and removed.
    Corrupt,
    /// Another process removed or replaced it (or is removing it now).
    Changed,
}
