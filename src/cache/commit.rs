//! The commit: what a finished transfer becomes an entry through, and nothing else writes
//! one. It checks the callers' digests, writes meta.json, then installs the version in the
//! store and the index together (the reservation goes with it); a revalidation renews an
//! entry's validators and expiry the same way.

use std::sync::{Arc, Mutex};

use super::engine::{DownloadResult, Inner, Outcome};
use super::pin::Holding;
use super::transfer::{Reservation, Transfer, WriterLock};
use crate::error::{Error, ErrorKind, Result};
use crate::failpoint::failpoint;
use crate::index::Entry;
use crate::key::{Key, Resolved};
use crate::stats::Counter;
use crate::store::{self, Layout, Meta, TempFile, Validators};

impl Inner {
    /// Commits what a transfer finished with these times: meta.json, then the index and the
    /// store. The reservation goes with the commit (released by the index when the entry is
    /// in place, by its own drop when the commit fails); the commit's pin is wrapped on the
    /// blocking thread, so that a deadline that drops this future unpins it again.
    pub(super) async fn commit_transfer(
        self: &Arc<Self>,
        r: &Resolved,
        transfer: &mut Transfer<'_>,
        finished: Finished,
        fetched_at: u64,
        expires_at: u64,
    ) -> DownloadResult {
        let Finished {
            temp,
            file,
            sha256,
            size,
            validators,
        } = finished;
        let meta = Meta {
            version: 1,
            url: r.display.clone(),
            file_name: r.file_name.clone(),
            sha256,
            size,
            mtime_ns: 0,
            etag: validators.etag,
            last_modified: validators.last_modified,
            fetched_at,
            expires_at,
            generation: String::new(),
        };
        let reservation = transfer.reservation.take();
        let lock = transfer.lock.take();
        let asked_at = transfer.asked_at;
        let this = Arc::clone(self);
        let key = r.key.clone();
        tokio::task::spawn_blocking(move || {
            this.commit(key, temp, file, meta, reservation, lock, asked_at)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("commit failed: {e}")))?
    }

    /// Writes the renewed meta.json of `entry` and updates it in place (blocking).
    pub(super) fn renew(
        &self,
        entry: &Arc<Entry>,
        validators: Validators,
        ttl_ms: u64,
    ) -> Result<bool> {
        let now = self.config.now_ms();
        // A caller that asked for fresher bytes (a short per-call TTL) confirms them
        // current; it does not shorten what the entry had for the others.
        let expires_at = now.saturating_add(ttl_ms).max(entry.expires_at());
        self.renew_to(entry, validators, now, expires_at)
    }

    /// Writes `entry`'s meta.json with these validators and times, and updates it in place
    /// (blocking): a 304 here, or the fleet's renewed record.
    pub(super) fn renew_to(
        &self,
        entry: &Arc<Entry>,
        validators: Validators,
        fetched_at: u64,
        expires_at: u64,
    ) -> Result<bool> {
        let meta = Meta {
            fetched_at,
            expires_at,
            etag: validators.etag,
            last_modified: validators.last_modified,
            ..entry.meta.clone()
        };
        let meta_temp = self.write_meta_temp(&entry.key, &meta)?;
        failpoint("renew");
        self.index
            .renew(entry, &meta, meta_temp)
            .map_err(|e| Error::io("cannot renew meta.json", e))
    }

    fn write_meta_temp(&self, key: &Key, meta: &Meta) -> Result<TempFile> {
        let json = serde_json::to_vec_pretty(meta).expect("Meta always serialises");
        crate::failpoint::failpoint_error("write-meta")
            .map_err(|e| Error::io("cannot write meta.json", e))?;
        self.layout
            .write_temp(key.as_str(), "meta", &json)
            .map_err(|e| Error::io("cannot write meta.json", e))
    }

    /// Makes the temp file durable, writes meta.json, and moves both into place (blocking).
    /// Without the URL's writer lock (its holder took longer than `CACHE_LOCK_WAIT`), the
    /// first commit wins: an entry another process committed after this download began is
    /// taken instead, and these bytes are dropped.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        self: &Arc<Self>,
        key: Key,
        temp: TempFile,
        file: std::fs::File,
        mut meta: Meta,
        reservation: Option<Reservation>,
        lock: Option<Arc<Mutex<WriterLock>>>,
        asked_at: u64,
    ) -> DownloadResult {
        let io_err = |what: &str, e| Error::io(what.to_owned(), e);
        // Downloaded without the lock: its holder may be gone by now.
        let late_lock = match lock {
            Some(_) => None,
            None => self.layout.try_lock_key(&key).ok().flatten(),
        };
        if lock.is_none()
            && let Some(found) = self.sync_key(&key)
            && found.meta.fetched_at >= asked_at
            && let Some(entry) = self.index.pin_current(&key)
        {
            let pinned = self.pinned(Arc::clone(&entry));
            if entry.stamp() == found.stamp && self.hold(&entry) == Holding::Held {
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
        let meta_temp = self.write_meta_temp(&key, &meta)?;
        let path = self.layout.data_path(&key, &meta);
        let now = self.config.now_ms();
        let entry = Entry::new(key, meta, path, now, 0, 0);
        let reserved = reservation.as_ref().map_or(0, |r| r.bytes);
        let (entry, removed) = self
            .index
            .commit(entry, temp, file, meta_temp, reserved, now)
            .map_err(|e| io_err("cannot commit the download", e))?;
        // Released by the index with the commit, and so in this process's record.
        reservation.map(Reservation::disarm);
        self.save_record();
        if let Some(lock) = lock {
            lock.lock()
                .unwrap_or_else(|e| e.into_inner())
                .lock
                .clear_record();
        }
        drop(late_lock);
        failpoint("commit-after-meta");
        self.counters.add(Counter::TotalDownloads, 1);
        removed.dispose_now();
        Ok((self.pinned(entry), Outcome::Downloaded))
    }
}

/// A transfer's complete temp file, open, with its digest, length and validators.
pub(super) struct Finished {
    pub(super) temp: TempFile,
    pub(super) file: std::fs::File,
    pub(super) sha256: String,
    pub(super) size: u64,
    pub(super) validators: Validators,
}
