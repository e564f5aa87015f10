//! The commit: what a finished transfer becomes an entry through, and nothing else writes
//! one. A [`Commit`] owns what it installs (the temp file, its meta.json, the reservation
//! and the writer lock) and runs on the blocking pool: fsync'd bytes, meta.json, then the
//! version in the store and the index together, the reservation released with it. A
//! revalidation ([`renew`]) rewrites an entry's validators and expiry the same way.

use std::sync::{Arc, Mutex};

use super::engine::{DownloadResult, Inner, Outcome};
use super::pin::{Holding, Pinned};
use super::transfer::{Finished, Reservation, Transfer, WriterLock};
use crate::error::{Error, ErrorKind, Result};
use crate::failpoint::failpoint;
use crate::index::Entry;
use crate::key::Key;
use crate::stats::Counter;
use crate::store::{self, Layout, Meta, TempFile, Validators};

/// A finished transfer on its way into the cache, with everything it installs.
pub(super) struct Commit {
    inner: Arc<Inner>,
    key: Key,
    temp: TempFile,
    file: std::fs::File,
    meta: Meta,
    /// Released by the index when the entry is in place, by its own drop if the commit fails.
    reservation: Option<Reservation>,
    /// The URL's writer lock; `None` when the download went on without it.
    lock: Option<Arc<Mutex<WriterLock>>>,
    asked_at: u64,
}

impl Commit {
    /// What `transfer` finished with, to be stamped with these times. Takes the transfer's
    /// reservation and writer lock.
    pub(super) fn new(
        transfer: &mut Transfer<'_>,
        finished: Finished,
        fetched_at: u64,
        expires_at: u64,
    ) -> Commit {
        let r = transfer.r;
        let (temp, file, meta) = finished.into_parts(r, fetched_at, expires_at);
        Commit {
            inner: Arc::clone(transfer.inner),
            key: r.key.clone(),
            temp,
            file,
            meta,
            reservation: transfer.reservation.take(),
            lock: transfer.lock.take(),
            asked_at: transfer.asked_at,
        }
    }

    /// Commits on the blocking pool. The commit's pin is wrapped there, so that a deadline
    /// that drops this future unpins it again.
    pub(super) async fn run(self) -> DownloadResult {
        tokio::task::spawn_blocking(move || self.run_blocking())
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("commit failed: {e}")))?
    }

    /// Makes the temp file durable, writes meta.json, and moves both into place. Without the
    /// URL's writer lock (its holder took longer than `CACHE_LOCK_WAIT`), the first commit
    /// wins: an entry another process committed after this download began is taken
    /// instead, and these bytes are dropped.
    fn run_blocking(self) -> DownloadResult {
        let Commit {
            inner,
            key,
            temp,
            file,
            mut meta,
            reservation,
            lock,
            asked_at,
        } = self;
        let io_err = |what: &str, e| Error::io(what.to_owned(), e);
        // Downloaded without the lock: its holder may be gone by now.
        let late_lock = match lock {
            Some(_) => None,
            None => inner.layout.try_lock_key(&key).ok().flatten(),
        };
        if lock.is_none()
            && let Some(found) = inner.sync_key(&key)
            && found.meta.fetched_at >= asked_at
            && let Some(entry) = inner.index.pin_current(&key)
        {
            let pinned = inner.pinned(Arc::clone(&entry));
            if entry.stamp() == found.stamp && inner.hold(&entry) == Holding::Held {
                tracing::info!(url = %found.meta.url, "another process committed this file first; taking its copy");
                return Ok((pinned, Outcome::Waited));
            }
        }
        let md = file
            .metadata()
            .map_err(|e| io_err("cannot stat the download", e))?;
        // From "being written" to "held by this process": other processes may read it but
        // not delete it.
        file.lock_shared()
            .map_err(|e| io_err("cannot lock the download", e))?;
        meta.mtime_ns = store::mtime_ns(&md);
        failpoint("commit-before-meta");
        meta.generation = Layout::new_generation();
        let meta_temp = write_meta_temp(&inner.layout, &key, &meta)?;
        let path = inner.layout.data_path(&key, &meta);
        let now = inner.config.now_ms();
        let entry = Entry::new(key, meta, path, now, 0, 0);
        let reserved = reservation.as_ref().map_or(0, |r| r.bytes);
        let (entry, removed) = inner
            .index
            .commit(entry, temp, file, meta_temp, reserved, now)
            .map_err(|e| io_err("cannot commit the download", e))?;
        // Released by the index with the commit, and so in this process's record, which
        // carries the download's counts to the directory at once: a process may end without
        // a chance to save (a forked worker leaves through `os._exit`).
        reservation.map(Reservation::disarm);
        inner.counters.add(Counter::TotalDownloads, 1);
        inner.save_record();
        if let Some(lock) = lock {
            lock.lock()
                .unwrap_or_else(|e| e.into_inner())
                .lock
                .clear_record();
        }
        drop(late_lock);
        failpoint("commit-after-meta");
        removed.dispose_now();
        Ok((inner.pinned(entry), Outcome::Downloaded))
    }
}

/// Renews `entry` in place with these validators and times (a 304, or the tier's renewed
/// record): its meta.json rewritten, then the index. Returns it pinned and held, or `None`
/// when the entry went away meanwhile. The renewal pins the entry; the pin is wrapped on the
/// blocking thread, so that a deadline that drops this future unpins it again.
pub(super) async fn renew(
    inner: &Arc<Inner>,
    entry: &Arc<Entry>,
    validators: Validators,
    fetched_at: u64,
    expires_at: u64,
) -> Result<Option<Arc<Pinned>>> {
    let this = Arc::clone(inner);
    let entry = Arc::clone(entry);
    let pinned = tokio::task::spawn_blocking(move || {
        let meta = Meta {
            fetched_at,
            expires_at,
            etag: validators.etag,
            last_modified: validators.last_modified,
            ..entry.meta.clone()
        };
        let meta_temp = write_meta_temp(&this.layout, &entry.key, &meta)?;
        failpoint("renew");
        let renewed = this
            .index
            .renew(&entry, &meta, meta_temp)
            .map_err(|e| Error::io("cannot renew meta.json", e))?;
        Ok::<_, Error>(renewed.then(|| this.pinned(entry)))
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, format!("renewal failed: {e}")))??;
    Ok(pinned.filter(|p| inner.hold(&p.entry) == Holding::Held))
}

fn write_meta_temp(layout: &Layout, key: &Key, meta: &Meta) -> Result<TempFile> {
    let json = serde_json::to_vec_pretty(meta).expect("Meta always serialises");
    crate::failpoint::failpoint_error("write-meta")
        .map_err(|e| Error::io("cannot write meta.json", e))?;
    layout
        .write_temp(key.as_str(), "meta", &json)
        .map_err(|e| Error::io("cannot write meta.json", e))
}
