//! [`Removals`]: what leaves the index, as a value that disposes of itself. The index moves a
//! removed entry's bytes to a trash name under its lock; counting, announcing and deleting
//! them is the [`Disposer`]'s (the cache's: `cache/removal.rs`), done off the index lock and,
//! from async code, off the async workers. A caller may choose where that happens; one that
//! forgets still has it done, in the background, when the value is dropped.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::Removed;

/// Where removals go: counted, announced and logged, their trash deleted (blocking).
pub(crate) trait Disposer: fmt::Debug + Send + Sync + 'static {
    fn dispose(&self, removed: Vec<Removed>);
}

/// Entries the index has let go of, not yet counted nor deleted. Dropped, they are disposed
/// of in the background (on the blocking pool, or inline outside a runtime).
#[must_use = "removals are counted and their bytes deleted when disposed of: choose where \
              with dispose_now or dispose_off_workers, or drop them to do it in the background"]
pub(crate) struct Removals {
    removed: Vec<Removed>,
    /// `None` when there is nothing to dispose of: the hit path's unpin stays free of
    /// reference counting.
    disposer: Option<Arc<dyn Disposer>>,
}

impl fmt::Debug for Removals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.removed.iter().map(|r| (&r.entry.key, r.reason)))
            .finish()
    }
}

impl Removals {
    /// Nothing removed.
    pub(crate) fn none() -> Removals {
        Removals {
            removed: Vec::new(),
            disposer: None,
        }
    }

    pub(super) fn new(removed: Vec<Removed>, disposer: &Arc<dyn Disposer>) -> Removals {
        let disposer = (!removed.is_empty()).then(|| Arc::clone(disposer));
        Removals { removed, disposer }
    }

    /// Disposes of them on this thread: for blocking code (the sweeper, a commit on the
    /// blocking pool).
    pub(crate) fn dispose_now(mut self) {
        let removed = std::mem::take(&mut self.removed);
        if let Some(disposer) = &self.disposer {
            disposer.dispose(removed);
        }
    }

    /// Disposes of them on the blocking pool without waiting (inline outside a runtime), for
    /// synchronous code on an async worker such as a `Drop`, keeping `owner` alive until it
    /// is done: what they report to (the engine, whose record is saved when it closes) must
    /// outlive them. Dropping them does the same without an owner.
    pub(crate) fn dispose_in_background_holding<T: Send + 'static>(mut self, owner: T) {
        let removed = std::mem::take(&mut self.removed);
        let Some(disposer) = self.disposer.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || {
                    disposer.dispose(removed);
                    drop(owner);
                });
            }
            Err(_) => disposer.dispose(removed),
        }
    }

    /// Disposes of them on the blocking pool and waits: for async code that reports what
    /// it removed only once it is gone.
    pub(crate) async fn dispose_off_workers(mut self) {
        let removed = std::mem::take(&mut self.removed);
        let Some(disposer) = self.disposer.take() else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || disposer.dispose(removed)).await;
    }
}

impl Deref for Removals {
    type Target = [Removed];

    fn deref(&self) -> &[Removed] {
        &self.removed
    }
}

impl<'a> IntoIterator for &'a Removals {
    type Item = &'a Removed;
    type IntoIter = std::slice::Iter<'a, Removed>;

    fn into_iter(self) -> Self::IntoIter {
        self.removed.iter()
    }
}

impl Drop for Removals {
    fn drop(&mut self) {
        let removed = std::mem::take(&mut self.removed);
        let Some(disposer) = self.disposer.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || disposer.dispose(removed));
            }
            Err(_) => disposer.dispose(removed),
        }
    }
}
