//! What the callers of one download ask of it: each caller's expected digest, TTL and
//! maximum age, gathered while the download runs; and what they share of it: the progress
//! its readers follow and the guard of its events.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::announce::Announcement;
use super::file::GetOptions;
use crate::clock::duration_ms;
use crate::store::{OnWritten, Written};

/// What one caller of a download asked for: the digest it expects, and the TTL it gives an
/// entry it downloads.
#[derive(Debug, Clone)]
pub(super) struct Want {
    expected_sha256: Option<String>,
    ttl_ms: u64,
    /// The caller's own maximum age ([`GetOptions::ttl`]), if it gave one.
    max_age_ms: Option<u64>,
    /// It takes a file larger than the cap, uncached ([`GetOptions::uncached_if_too_large`]).
    uncached_ok: bool,
}

impl Want {
    /// What a caller with `options` asks, when the cache's default TTL is `default_ttl_ms`:
    /// the TTL it gives an entry it downloads is its own, or that default.
    pub(super) fn of(options: &GetOptions, default_ttl_ms: u64) -> Want {
        Want {
            expected_sha256: options
                .expected_sha256
                .as_deref()
                .map(|e| e.trim().to_owned()),
            ttl_ms: options.ttl.map_or(default_ttl_ms, duration_ms),
            max_age_ms: options.ttl.map(duration_ms),
            uncached_ok: options.uncached_if_too_large,
        }
    }

    /// Whether a caller with `options` takes bytes whose SHA-256 is `sha256`.
    pub(super) fn accepts(options: &GetOptions, sha256: &str) -> bool {
        options
            .expected_sha256
            .as_deref()
            .is_none_or(|e| e.trim().eq_ignore_ascii_case(sha256))
    }
}

/// What every caller joined to one download asked for, so that no caller's options decide
/// for the others: the bytes are committed if any of them takes their digest (each caller
/// checks its own), and the entry gets the longest TTL asked for.
#[derive(Debug)]
pub(super) struct Wants {
    // A std Mutex: pushed to once per joined caller, read once at the commit; never held
    // across an .await.
    list: Mutex<Vec<Want>>,
    /// Whether some caller takes a file larger than the cap uncached: read for every chunk
    /// of a download, so kept apart from the list's lock.
    uncached_ok: AtomicBool,
    /// What reaches the download's file, for its streaming readers.
    progress: Arc<tokio::sync::watch::Sender<Progress>>,
    /// The download's events: one start, one end.
    announcement: Announcement,
}

impl Wants {
    /// A new download's: its first caller's want, and the guard of its events.
    pub(super) fn new(first: Want, announcement: Announcement) -> Wants {
        Wants {
            uncached_ok: AtomicBool::new(first.uncached_ok),
            list: Mutex::new(vec![first]),
            progress: Arc::new(tokio::sync::watch::Sender::new(Default::default())),
            announcement,
        }
    }

    pub(super) fn announcement(&self) -> &Announcement {
        &self.announcement
    }

    pub(super) fn progress(&self) -> &Arc<tokio::sync::watch::Sender<Progress>> {
        &self.progress
    }

    pub(super) fn add(&self, want: Want) {
        if want.uncached_ok {
            self.uncached_ok.store(true, Ordering::Release);
        }
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(want);
    }

    /// Whether some caller takes `sha256`; if none does, the digest the first one expected.
    pub(super) fn check(&self, sha256: &str) -> Result<(), String> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let takes = |w: &Want| {
            w.expected_sha256
                .as_deref()
                .is_none_or(|e| e.eq_ignore_ascii_case(sha256))
        };
        if list.iter().any(takes) {
            return Ok(());
        }
        Err(list
            .iter()
            .find_map(|w| w.expected_sha256.clone())
            .unwrap_or_default())
    }

    /// Whether some caller takes a file larger than the cap, uncached.
    pub(super) fn uncached_ok(&self) -> bool {
        self.uncached_ok.load(Ordering::Acquire)
    }

    pub(super) fn ttl_ms(&self) -> u64 {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|w| w.ttl_ms).max().unwrap_or_default()
    }

    /// The shortest maximum age a caller asked for: an entry found on disk must be younger.
    pub(super) fn max_age_ms(&self) -> Option<u64> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().filter_map(|w| w.max_age_ms).min()
    }

    /// Whether the callers take, at `now`, a version fetched at `fetched_at` that expires at
    /// `expires_at` with this digest: fresh, within every caller's maximum age, and a digest
    /// some caller takes.
    pub(super) fn takes(&self, now: u64, expires_at: u64, fetched_at: u64, sha256: &str) -> bool {
        now < expires_at
            && self
                .max_age_ms()
                .is_none_or(|age| now < fetched_at.saturating_add(age))
            && self.check(sha256).is_ok()
    }
}

/// What the writer of a download has put in its file, for the streams reading it.
#[derive(Clone, Default, Debug)]
pub(crate) struct Progress {
    /// A handle on the file being written.
    pub(crate) file: Option<Arc<File>>,
    /// Bytes in the file.
    pub(crate) written: u64,
    /// The full length, once a response said it.
    pub(crate) total: Option<u64>,
    /// Times the file changed under its readers: another file opened (a resumed part, a
    /// fallback from the tier to the origin), or the download started again from
    /// byte zero. A reader that has read bytes of an earlier generation cannot go on.
    pub(crate) generation: u32,
    /// The origin said not to store this answer (`Cache-Control: no-store`): its readers
    /// tell their own clients so.
    pub(crate) not_stored: bool,
}

/// The writer's callback, publishing to `progress`.
pub(super) fn on_written(progress: Arc<watch::Sender<Progress>>) -> OnWritten {
    Box::new(move |w| {
        progress.send_modify(|p| match w {
            Written::Opened(file, len) => {
                p.file = Some(file);
                p.written = len;
                p.generation += 1;
            }
            Written::Bytes(n) => p.written = n,
            Written::Restarted => {
                p.written = 0;
                p.generation += 1;
            }
        });
    })
}
