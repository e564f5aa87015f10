//! The paths `get` hands out, each pinned for a while after the call.
//!
//! A path returned to Python is only a name: between the call and the caller's `open` (or
//! a lazy reader's later reopening) the size cap, a clear or an invalidate (of this process
//! or another) could remove the file. So the handle keeps the file's pin for
//! `hold_seconds`, whatever other calls do (the core deletes a removed file when its last
//! pin goes), and a call within that time hands out the same `pathlib.Path` object again.
//! Holds are a courtesy, never a second cache: together they pin at most half the size cap
//! (and at most [`MAX_HOLDS`] files); a new hold lets go of the oldest ones beyond that, so
//! that a cap always stays enforceable.
//!
//! No Python code runs while the map's lock is held (Python code can let the GIL go to a
//! thread that then waits on the lock), and the pins taken out of the map are dropped with
//! the GIL released by the caller: dropping the last pin of a replaced version takes the
//! core's index lock.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use imgcache::CachedFile;
use pyo3::prelude::*;

/// The bytes a held file counts against the holds' half of the cap: none for one handed out
/// uncached (it is not in the cache, and may be larger than the whole cap).
fn counted(file: &CachedFile) -> u64 {
    if file.status() == imgcache::CacheStatus::NotStored {
        0
    } else {
        file.size()
    }
}

/// The most files the holds of one handle pin at once.
pub(crate) const MAX_HOLDS: usize = 64;

pub(crate) struct Held {
    pub(crate) file: CachedFile,
    pub(crate) path: Py<PyAny>,
    pub(crate) until: Instant,
}

/// The holds of one handle, by the URL as the caller typed it, one per file.
#[derive(Default)]
pub(crate) struct Holds {
    by_url: HashMap<String, Vec<Held>>,
    count: usize,
    /// The sum of the sizes of the held files (each read when its pin went in).
    bytes: u64,
    /// Set by `close`: no hold is added after it.
    closed: bool,
}

impl Holds {
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Lets go of every hold and takes no more: a call that raced `close` gets its path
    /// without a hold.
    pub(crate) fn close(&mut self) -> Vec<Held> {
        self.closed = true;
        self.take(|_, _| false)
    }

    /// Renews the hold of `url` on `file`'s path, if there is one: the hold keeps `file`
    /// (the newer pin) and gives back the one it had, with its path object.
    pub(crate) fn renew(
        &mut self,
        py: Python<'_>,
        url: &str,
        file: CachedFile,
        until: Instant,
    ) -> Result<(Py<PyAny>, CachedFile), CachedFile> {
        let Some(held) = self
            .by_url
            .get_mut(url)
            .and_then(|list| list.iter_mut().find(|h| h.file.path() == file.path()))
        else {
            return Err(file);
        };
        held.until = held.until.max(until);
        // The same path is the same version, so the same size; a tampered meta.json could
        // say otherwise, and the count follows the pin it keeps.
        self.bytes = self.bytes.saturating_sub(counted(&held.file)) + counted(&file);
        let old = std::mem::replace(&mut held.file, file);
        Ok((held.path.clone_ref(py), old))
    }

    /// Adds a hold, or renews the one a racing call added meanwhile (whose path object is
    /// then the one handed out). Returns the path to hand out and the pins let go of: the
    /// oldest holds beyond the bounds, and a replaced pin.
    pub(crate) fn insert(
        &mut self,
        py: Python<'_>,
        url: &str,
        held: Held,
        max_bytes: u64,
    ) -> (Py<PyAny>, Vec<Held>) {
        let Held { file, path, until } = held;
        if self.closed {
            let handed = path.clone_ref(py);
            return (handed, vec![Held { file, path, until }]);
        }
        let kept = file.path().to_owned();
        let (path, mut gone) = match self.renew(py, url, file, until) {
            Ok((theirs, replaced)) => (
                theirs,
                vec![Held {
                    file: replaced,
                    path,
                    until,
                }],
            ),
            Err(file) => {
                self.count += 1;
                self.bytes += counted(&file);
                let handed = path.clone_ref(py);
                self.by_url
                    .entry(url.to_owned())
                    .or_default()
                    .push(Held { file, path, until });
                (handed, Vec::new())
            }
        };
        while self.count > 1 && (self.count > MAX_HOLDS || self.bytes > max_bytes / 2) {
            match self.remove_oldest(&kept) {
                Some(old) => gone.push(old),
                None => break,
            }
        }
        (path, gone)
    }

    /// Takes out every hold `keep` rejects.
    pub(crate) fn take(&mut self, mut keep: impl FnMut(&str, &Held) -> bool) -> Vec<Held> {
        let mut gone = Vec::new();
        self.by_url.retain(|url, list| {
            let mut i = 0;
            while i < list.len() {
                if keep(url, &list[i]) {
                    i += 1;
                } else {
                    gone.push(list.swap_remove(i));
                }
            }
            !list.is_empty()
        });
        self.count -= gone.len();
        let freed = gone.iter().map(|h| counted(&h.file)).sum::<u64>();
        self.bytes = self.bytes.saturating_sub(freed);
        gone
    }

    /// The hold that ends first, other than those of `kept` (the file just handed out).
    fn remove_oldest(&mut self, kept: &Path) -> Option<Held> {
        let (url, i) = self
            .by_url
            .iter()
            .flat_map(|(url, list)| list.iter().enumerate().map(move |(i, h)| (url, i, h)))
            .filter(|(_, _, h)| h.file.path() != kept)
            .min_by_key(|(_, _, h)| h.until)
            .map(|(url, i, _)| (url.clone(), i))?;
        let list = self.by_url.get_mut(&url)?;
        let held = list.swap_remove(i);
        if list.is_empty() {
            self.by_url.remove(&url);
        }
        self.count -= 1;
        self.bytes = self.bytes.saturating_sub(counted(&held.file));
        Some(held)
    }
}
