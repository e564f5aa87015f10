//! The pin: a committed entry held on behalf of callers ([`Pinned`], which every
//! [`CachedFile`](super::CachedFile) shares), let go to the index when the last holder goes;
//! and what making an entry safe to hand out found ([`Holding`]). The hit path, the
//! download, the tier and the commit all hand out files through it.

use std::sync::Arc;

use crate::index::Entry;

/// A committed entry pinned on behalf of one or more callers: while it lives, eviction and
/// expiry leave the file alone.
pub(crate) struct Pinned {
    pub(super) entry: Arc<Entry>,
    home: Arc<dyn PinHome>,
}

/// What a pin is let go to: the index that counts pins (the engine, see `engine.rs`).
pub(super) trait PinHome: Send + Sync {
    fn let_go(&self, entry: &Arc<Entry>);
}

impl Pinned {
    /// Wraps an entry the index has just pinned, so that dropping it unpins.
    pub(super) fn new(entry: Arc<Entry>, home: Arc<dyn PinHome>) -> Arc<Pinned> {
        Arc::new(Pinned { entry, home })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.home.let_go(&self.entry);
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
