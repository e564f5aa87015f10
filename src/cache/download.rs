//! The download engine: the task that one in-flight slot runs. It revalidates or downloads
//! with retries (a [`Transfer`] keeps the temp file, the running SHA-256 and the byte count
//! across attempts, so a cut-off body resumes with `Range`), reserves the file's
//! `Content-Length` against the cap, and commits: fsync, meta.json, then the index and the
//! store install the entry together. When the origin fails it falls back to the expired copy.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::file::GetOptions;
use super::hit::Holding;
use super::{DownloadResult, Inner, Outcome, checksum_error, duration_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::failpoint::failpoint;
use crate::fetch;
use crate::index::Entry;
use crate::key::{Key, Resolved};
use crate::stats::Counter;
use crate::store::locks::{KeyLock, Record};
use crate::store::{self, Layout, Meta, Recovered, TempFile, Validators};

/// The body of the download task that an in-flight slot runs (its slot is cleared however
/// it ends, a panic included: see `inflight`).
pub(super) async fn run_download(
    inner: Arc<Inner>,
    r: Resolved,
    force: bool,
    wants: Arc<Wants>,
) -> DownloadResult {
    let result = inner
        .fetch_entry(&r, force, &wants)
        .await
        .map_err(|e| e.with_url(&r.display));
    if let Err(e) = &result {
        inner.events.emit(|| Event::DownloadFailed {
            url: r.display.clone(),
            error: e.to_string(),
        });
        inner.counters.add(Counter::Errors, 1);
        tracing::warn!(url = %r.display, error = %e, "download failed");
    }
    result
}

impl Inner {
    /// The download task's work. First the URL's writer lock, so that one process in all
    /// downloads it (bounded by `CACHE_LOCK_WAIT`, after which this one downloads on its own
    /// and the first commit wins); then what is on disk, since another process may have
    /// committed it meanwhile; then revalidate or download with retries, resuming from the
    /// part file of a holder that died; and the expired copy when the origin fails.
    async fn fetch_entry(
        self: &Arc<Self>,
        r: &Resolved,
        force: bool,
        wants: &Wants,
    ) -> DownloadResult {
        let asked_at = self.now_ms();
        let lock = self
            .layout
            .lock_key(&r.key, self.config.lock_wait)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(url = %r.display, error = %e, "cannot take the download's lock; downloading without it");
                None
            });
        if lock.is_none() {
            self.counters.add(Counter::LockTimeouts, 1);
            tracing::warn!(
                url = %r.display,
                waited_ms = duration_ms(self.config.lock_wait),
                "another process has been downloading this file for longer than CACHE_LOCK_WAIT; downloading it here too"
            );
        }
        if let Some(found) = self.from_disk(r, force, wants, asked_at).await {
            return Ok(found);
        }
        let (lock, resume) = match lock {
            Some(mut lock) => {
                let resume = self.resumable(&mut lock, &r.key).await;
                (Some(lock), resume)
            }
            None => (None, None),
        };
        let previous = if force {
            None
        } else {
            self.index.current(&r.key)
        };
        let result = self
            .download_with_retries(r, wants, previous.as_ref(), lock, resume, asked_at)
            .await;
        match (result, previous) {
            (Err(e), Some(stale)) if self.config.stale_if_error && e.is_transient() => {
                if !self.index.pin_if_current(&stale) {
                    return Err(e);
                }
                let pinned = self.pinned(Arc::clone(&stale));
                if self.hold(&stale) != Holding::Held {
                    return Err(e);
                }
                self.counters.add(Counter::StaleServed, 1);
                tracing::warn!(
                    url = %r.display,
                    path = %stale.path.display(),
                    error = %e,
                    "origin failed; serving the expired copy"
                );
                Ok((pinned, Outcome::Stale))
            }
            (result, _) => result,
        }
    }

    /// Brings this process's entry for `r` in line with the disk, and returns it pinned if it
    /// will do: fresh, with a digest some caller takes, and (for a forced download) committed
    /// by another process after this one asked.
    async fn from_disk(
        self: &Arc<Self>,
        r: &Resolved,
        force: bool,
        wants: &Wants,
        asked_at: u64,
    ) -> Option<(Arc<super::file::Pinned>, Outcome)> {
        let before = self.index.current(&r.key).map(|e| e.stamp());
        let this = Arc::clone(self);
        let key = r.key.clone();
        let found = tokio::task::spawn_blocking(move || this.sync_key(&key))
            .await
            .ok()
            .flatten()?;
        // Committed by another process since this one asked.
        let newer = before != Some(found.stamp) && found.meta.fetched_at >= asked_at;
        let meta = &found.meta;
        let now = self.now_ms();
        let usable = now < meta.expires_at
            && wants
                .max_age_ms()
                .is_none_or(|age| now < meta.fetched_at.saturating_add(age))
            && wants.check(&meta.sha256).is_ok()
            && (!force || newer);
        if !usable {
            return None;
        }
        let entry = self.index.pin_current(&r.key)?;
        let pinned = self.pinned(Arc::clone(&entry));
        if entry.stamp() != found.stamp || self.hold(&entry) != Holding::Held {
            return None;
        }
        let outcome = if newer {
            Outcome::Joined
        } else {
            Outcome::Found
        };
        tracing::debug!(url = %r.display, "found on disk, committed by another process");
        Some((pinned, outcome))
    }

    /// Reads the entry of `key` from disk and puts it in the index in place of what the
    /// index had, if that differs (blocking).
    pub(super) fn sync_key(&self, key: &Key) -> Option<Recovered> {
        let found = self.layout.read_entry(key);
        let entry = found.as_ref().map(|f| {
            Entry::new(
                f.key.clone(),
                f.meta.clone(),
                f.path.clone(),
                f.meta.fetched_at,
                0,
                0,
            )
            .with_stamp(f.stamp)
        });
        let removed = self.index.replace_from_disk(key, entry);
        self.dispose_now(removed);
        found
    }

    /// The part file a dead holder of `key`'s writer lock left, if the download can resume
    /// from it: named by the lock's record, bound to a version by a validator, not held by
    /// anyone, and at least as long as the record says is durable. Its kept prefix is hashed
    /// again.
    async fn resumable(self: &Arc<Self>, lock: &mut KeyLock, key: &Key) -> Option<Resume> {
        let record = lock.record()?;
        let validators = Validators {
            etag: record.etag.clone(),
            last_modified: record.last_modified.clone(),
        };
        validators.if_range()?;
        let name = &record.part;
        let ours = name.starts_with(&format!("{}.", key.as_str()))
            && name.ends_with(".part")
            && !name.contains('/')
            && record.durable > 0;
        if !ours {
            return None;
        }
        let path = self.layout.temp_dir().join(name);
        let resume = tokio::task::spawn_blocking(move || Resume::open(path, record, validators))
            .await
            .ok()?;
        match resume {
            Ok(resume) => {
                tracing::info!(
                    part = %resume.temp.path().display(),
                    bytes = resume.received,
                    "taking over the download of a process that died"
                );
                Some(resume)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot resume from a dead download's part file");
                None
            }
        }
    }

    /// Attempts within the total deadline; on failure, waits until the writer has removed
    /// its temp file, so that an error never leaves one behind.
    async fn download_with_retries(
        self: &Arc<Self>,
        r: &Resolved,
        wants: &Wants,
        previous: Option<&Arc<Entry>>,
        lock: Option<KeyLock>,
        resume: Option<Resume>,
        asked_at: u64,
    ) -> DownloadResult {
        let mut transfer = Transfer::new(self, r, lock, asked_at);
        if let Some(resume) = resume {
            transfer.resume_from(resume);
        }
        let attempts = self.attempts(&mut transfer, r, wants, previous);
        let result = match self.config.download_timeout {
            Some(limit) => tokio::time::timeout(limit, attempts)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Network,
                        format!(
                            "download took longer than {}",
                            humantime::format_duration(limit)
                        ),
                    ))
                }),
            None => attempts.await,
        };
        if result.is_err() {
            transfer.abandon().await;
        }
        result
    }

    /// Attempts until the body is complete, a 304 renews `previous`, or a failure is final.
    async fn attempts(
        self: &Arc<Self>,
        transfer: &mut Transfer<'_>,
        r: &Resolved,
        wants: &Wants,
        previous: Option<&Arc<Entry>>,
    ) -> DownloadResult {
        let started = Instant::now();
        let mut revalidate = previous
            .map(|p| (p, p.validators()))
            .filter(|(_, v)| !v.is_empty());
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let step = transfer.attempt(revalidate.as_ref().map(|(_, v)| v)).await;
            match step {
                Ok(Step::Complete) => break,
                Ok(Step::NotModified(validators)) => {
                    let (entry, _) = revalidate.take().expect("a 304 answers a conditional GET");
                    let this = Arc::clone(self);
                    let entry = Arc::clone(entry);
                    let ttl = wants.ttl_ms();
                    // The renewal pins the entry; it is wrapped at once, on the blocking
                    // thread, so that a deadline that drops this future unpins it again.
                    let renewed = tokio::task::spawn_blocking(move || {
                        this.renew(&entry, validators, ttl)
                            .map(|ok| ok.then(|| this.pinned(entry)))
                    })
                    .await
                    .map_err(|e| {
                        Error::new(ErrorKind::Internal, format!("renewal failed: {e}"))
                    })??;
                    // The entry went away meanwhile: download it after all.
                    let Some(pinned) = renewed else { continue };
                    if self.hold(&pinned.entry) != Holding::Held {
                        continue;
                    }
                    self.counters.add(Counter::Revalidations, 1);
                    tracing::info!(url = %r.display, "revalidated: not modified");
                    return Ok((pinned, Outcome::Revalidated));
                }
                Err(e) if e.is_transient() && attempt <= self.config.retries => {
                    self.counters.add(Counter::Retries, 1);
                    let delay = fetch::backoff(
                        attempt,
                        self.config.retry_base_delay,
                        self.config.retry_max_delay,
                        e.retry_after(),
                    );
                    tracing::warn!(
                        url = %r.display,
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        received = transfer.received,
                        error = %e,
                        "download attempt failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        let (temp, file, sha256, validators) = transfer.finish().await?;
        let size = file.metadata().map(|m| m.len()).unwrap_or_default();
        if let Err(expected) = wants.check(&sha256) {
            self.counters.add(Counter::IntegrityFailures, 1);
            return Err(checksum_error(&expected, &sha256));
        }
        let now = self.now_ms();
        let meta = Meta {
            version: 1,
            url: r.display.clone(),
            file_name: r.file_name.clone(),
            sha256,
            size,
            mtime_ns: 0,
            etag: validators.etag,
            last_modified: validators.last_modified,
            fetched_at: now,
            expires_at: now.saturating_add(wants.ttl_ms()),
            generation: String::new(),
        };
        // The reservation goes with the commit: released by the index when the entry is in
        // place, by its own drop when the commit fails. The commit's pin is wrapped on the
        // blocking thread, so that a deadline that drops this future unpins it again.
        let reservation = transfer.reservation.take();
        let lock = transfer.lock.take();
        let asked_at = transfer.asked_at;
        let this = Arc::clone(self);
        let key = r.key.clone();
        let committed = tokio::task::spawn_blocking(move || {
            this.commit(key, temp, file, meta, reservation, lock, asked_at)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("commit failed: {e}")))??;
        let pinned = match committed {
            (pinned, Outcome::Downloaded) => pinned,
            // A process that downloaded without the lock found another's commit first.
            found => return Ok(found),
        };
        let entry = &pinned.entry;
        self.events.emit(|| Event::DownloadFinished {
            url: r.display.clone(),
            bytes: size,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
        tracing::info!(
            url = %r.display,
            path = %entry.path.display(),
            bytes = size,
            attempts = attempt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cached file"
        );
        Ok((pinned, Outcome::Downloaded))
    }

    fn ttl_ms(&self, options: &GetOptions) -> u64 {
        options
            .ttl
            .map_or_else(|| self.default_ttl_ms.load(Ordering::Relaxed), duration_ms)
    }

    /// Writes the renewed meta.json of `entry` and updates it in place (blocking).
    fn renew(&self, entry: &Arc<Entry>, validators: Validators, ttl_ms: u64) -> Result<bool> {
        let now = self.now_ms();
        let meta = Meta {
            fetched_at: now,
            // A caller that asked for fresher bytes (a short per-call TTL) confirms them
            // current; it does not shorten what the entry had for the others.
            expires_at: now.saturating_add(ttl_ms).max(entry.expires_at()),
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
                return Ok((pinned, Outcome::Joined));
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
        let now = self.now_ms();
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
        self.dispose_now(removed);
        Ok((self.pinned(entry), Outcome::Downloaded))
    }
}

/// What one caller of a download asked for: the digest it expects, and the TTL it gives an
/// entry it downloads.
#[derive(Debug, Clone)]
pub(super) struct Want {
    expected_sha256: Option<String>,
    ttl_ms: u64,
    /// The caller's own maximum age ([`GetOptions::ttl`]), if it gave one.
    max_age_ms: Option<u64>,
}

impl Want {
    pub(super) fn of(inner: &Inner, options: &GetOptions) -> Want {
        Want {
            expected_sha256: options
                .expected_sha256
                .as_deref()
                .map(|e| e.trim().to_owned()),
            ttl_ms: inner.ttl_ms(options),
            max_age_ms: options.ttl.map(duration_ms),
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
}

impl From<Want> for Wants {
    fn from(first: Want) -> Wants {
        Wants {
            list: Mutex::new(vec![first]),
        }
    }
}

impl Wants {
    pub(super) fn add(&self, want: Want) {
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(want);
    }

    /// Whether some caller takes `sha256`; if none does, the digest the first one expected.
    fn check(&self, sha256: &str) -> Result<(), String> {
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

    fn ttl_ms(&self) -> u64 {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|w| w.ttl_ms).max().unwrap_or_default()
    }

    /// The shortest maximum age a caller asked for: an entry found on disk must be younger.
    fn max_age_ms(&self) -> Option<u64> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().filter_map(|w| w.max_age_ms).min()
    }
}

/// Bytes reserved for a download from its `Content-Length`; released if it never commits.
struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `bytes` against the cap of the whole directory: under the directory's cap
    /// lock, with what every process has committed and reserved read fresh, and this
    /// process's reservation published before the lock is let go, so that two processes
    /// never both take the last free bytes.
    async fn new(inner: &Arc<Inner>, bytes: u64) -> Reservation {
        // Made before the await below, so that a deadline firing there still releases it
        // (the count is added by the blocking task, which runs to the end even then).
        let reservation = Reservation {
            inner: Arc::clone(inner),
            bytes,
        };
        let this = Arc::clone(inner);
        let _ = tokio::task::spawn_blocking(move || {
            let cap = this.layout.lock_cap();
            this.read_others();
            this.sync_from_disk();
            let removed = this.index.reserve(bytes);
            this.save_record();
            drop(cap);
            this.dispose_now(removed);
        })
        .await;
        reservation
    }

    /// Hands the reservation to the commit, which releases it under the index lock.
    fn disarm(mut self) -> u64 {
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.inner.index.release(self.bytes);
            self.inner.counters.mark_unsaved();
        }
    }
}

/// What one attempt achieved.
enum Step {
    /// The body is complete.
    Complete,
    /// 304: the expired copy is current.
    NotModified(Validators),
}

/// The URL's writer lock while this process downloads it, and the record in it that says
/// where a successor may resume from. Shared with the writer thread, which updates the
/// durable length as it fsyncs.
pub(super) struct WriterLock {
    lock: KeyLock,
    record: Record,
}

impl WriterLock {
    fn update(&mut self, change: impl FnOnce(&mut Record)) {
        change(&mut self.record);
        self.lock.write_record(&self.record);
    }
}

/// A dead download's part file, taken over: its kept prefix, hashed again.
pub(super) struct Resume {
    temp: TempFile,
    file: std::fs::File,
    hasher: Sha256,
    received: u64,
    validators: Validators,
    total: Option<u64>,
}

impl Resume {
    /// Takes the part file at `path` if no writer holds it, cuts it to its durable length
    /// and hashes that prefix (blocking).
    fn open(
        path: std::path::PathBuf,
        record: Record,
        validators: Validators,
    ) -> std::io::Result<Resume> {
        use std::io::{Read, Seek};
        let file = store::open_part(&path)?;
        let mut file = match store::locks::try_exclusive(file)? {
            store::locks::Try::Taken(file) => file,
            _ => return Err(std::io::Error::other("its writer is alive")),
        };
        let temp = TempFile::new(path);
        let md = file.metadata()?;
        if !md.is_file() || md.len() < record.durable {
            return Err(std::io::Error::other("shorter than its record says"));
        }
        file.set_len(record.durable)?;
        file.rewind()?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = record.durable;
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20) as usize])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(std::io::SeekFrom::End(0))?;
        Ok(Resume {
            temp,
            file,
            hasher,
            received: record.durable,
            validators,
            total: record.total,
        })
    }
}

/// One download across its attempts: the temp file, the writer, the running hash and the
/// byte count survive a cut-off body so that the next attempt can resume.
struct Transfer<'a> {
    inner: &'a Arc<Inner>,
    r: &'a Resolved,
    writer: Option<store::SpawnedWriter>,
    hasher: Sha256,
    received: u64,
    /// The full length, from `Content-Length` of the 200 (or `Content-Range` of a 206).
    total: Option<u64>,
    /// Of the version being downloaded: what `If-Range` binds a resume to.
    validators: Validators,
    /// `received` when progress was last reported.
    reported: u64,
    reservation: Option<Reservation>,
    /// The URL's writer lock; `None` when this process downloads without it.
    lock: Option<Arc<Mutex<WriterLock>>>,
    /// A dead download's part file to go on from, until the writer takes it.
    resumed: Option<(TempFile, std::fs::File)>,
    /// When the callers asked, by the cache's clock.
    asked_at: u64,
}

impl<'a> Transfer<'a> {
    fn new(
        inner: &'a Arc<Inner>,
        r: &'a Resolved,
        lock: Option<KeyLock>,
        asked_at: u64,
    ) -> Transfer<'a> {
        Transfer {
            inner,
            r,
            writer: None,
            hasher: Sha256::new(),
            received: 0,
            total: None,
            validators: Validators::default(),
            reported: 0,
            reservation: None,
            lock: lock.map(|lock| {
                Arc::new(Mutex::new(WriterLock {
                    lock,
                    record: Record::default(),
                }))
            }),
            resumed: None,
            asked_at,
        }
    }

    /// Goes on from a dead download's part file.
    fn resume_from(&mut self, resume: Resume) {
        self.hasher = resume.hasher;
        self.received = resume.received;
        self.reported = resume.received;
        self.validators = resume.validators;
        self.total = resume.total;
        self.resumed = Some((resume.temp, resume.file));
    }

    /// Updates the lock's record, if this process holds the lock.
    fn record(&self, change: impl FnOnce(&mut Record)) {
        if let Some(lock) = &self.lock {
            lock.lock()
                .unwrap_or_else(|e| e.into_inner())
                .update(change);
        }
    }

    fn limit(&self) -> u64 {
        self.inner
            .index
            .max()
            .min(self.inner.config.max_file_size_bytes)
    }

    /// Forgets the bytes received so far (the next body starts at zero).
    async fn restart(&mut self) -> Result<()> {
        self.hasher = Sha256::new();
        self.received = 0;
        self.reported = 0;
        // A part file taken over and not yet written to: dropped (and removed).
        self.resumed = None;
        if let Some(writer) = &self.writer
            && writer.tx.send(store::WriteOp::Restart).await.is_err()
        {
            return Err(self.writer_failure().await);
        }
        Ok(())
    }

    /// Stops the writer and waits until it has removed the temp file.
    async fn abandon(&mut self) {
        if let Some(writer) = self.writer.take() {
            drop(writer.tx);
            let _ = writer.done.await;
        }
    }

    /// The writer thread stopped early; its error says why (a full disk, usually).
    async fn writer_failure(&mut self) -> Error {
        let Some(writer) = self.writer.take() else {
            return Error::new(ErrorKind::Internal, "no writer");
        };
        let err = match writer.done.await {
            Ok(Err(e)) => Error::io("cannot write the download", e),
            Ok(Ok(_)) => Error::new(ErrorKind::Internal, "writer stopped early"),
            Err(e) => Error::new(ErrorKind::Internal, format!("writer failed: {e}")),
        };
        err.with_path(writer.path)
    }

    /// One request and as much of its body as arrives.
    async fn attempt(&mut self, revalidate: Option<&Validators>) -> Result<Step> {
        let client = &self.inner.config.http_client;
        let url = &self.r.request;
        let if_range = self.validators.if_range().map(str::to_owned);
        let ask = match (&if_range, self.received) {
            (Some(v), n) if n > 0 => fetch::Ask::From(n, v),
            (None, n) if n > 0 => {
                // Nothing binds the partial to a version of the file: start again.
                self.restart().await?;
                fetch::Ask::Whole
            }
            _ => revalidate.map_or(fetch::Ask::Whole, fetch::Ask::IfChanged),
        };
        let mut response = match fetch::send(client, url, ask).await? {
            fetch::Answer::NotModified(v) => return Ok(Step::NotModified(v)),
            fetch::Answer::RangeRefused => {
                self.restart().await?;
                return Err(Error::new(
                    ErrorKind::Incomplete,
                    "the server refused to resume; starting again",
                ));
            }
            fetch::Answer::Rest(response) => {
                let total = fetch::content_range_total(response.headers());
                if total.is_some() && self.total.is_some() && total != self.total {
                    self.restart().await?;
                    return Err(Error::new(
                        ErrorKind::Incomplete,
                        "the file changed length between attempts; starting again",
                    ));
                }
                self.total = self.total.or(total);
                if self.reservation.is_none() {
                    // A download taken over from a dead process starts with a 206.
                    let limit = self.limit();
                    if let Some(total) = self.total.filter(|t| *t > limit) {
                        return Err(too_large(total, limit));
                    }
                    let wanted = self.total.unwrap_or(0);
                    self.reservation = Some(Reservation::new(self.inner, wanted).await);
                }
                self.inner.counters.add(Counter::Resumes, 1);
                tracing::info!(url = %self.r.display, offset = self.received, "resuming");
                response
            }
            fetch::Answer::Whole(response) => {
                if self.received > 0 {
                    self.restart().await?;
                }
                self.validators = fetch::validators(response.headers());
                self.total = response.content_length();
                let limit = self.limit();
                if let Some(total) = self.total.filter(|t| *t > limit) {
                    return Err(too_large(total, limit));
                }
                let wanted = self.total.unwrap_or(0);
                if self.reservation.as_ref().map(|r| r.bytes) != Some(wanted) {
                    self.reservation = None; // releases the old amount first
                    self.reservation = Some(Reservation::new(self.inner, wanted).await);
                }
                response
            }
        };
        if self.writer.is_none() {
            self.inner.events.emit(|| Event::DownloadStarted {
                url: self.r.display.clone(),
                total: self.total,
            });
            let (temp, existing) = match self.resumed.take() {
                Some((temp, file)) => (temp, Some(file)),
                None => (
                    TempFile::new(self.inner.layout.temp_path(&self.r.key, "part")),
                    None,
                ),
            };
            let part = temp
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let durable = if existing.is_some() { self.received } else { 0 };
            let (validators, total) = (self.validators.clone(), self.total);
            self.record(|rec| {
                *rec = Record {
                    part,
                    etag: validators.etag,
                    last_modified: validators.last_modified,
                    total,
                    durable,
                };
            });
            let lock = self.lock.clone();
            let on_sync: store::OnSync = Box::new(move |n| {
                if let Some(lock) = &lock {
                    lock.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .update(|rec| rec.durable = n);
                }
            });
            let inner = Arc::clone(self.inner);
            let make_room: store::MakeRoom = Box::new(move |bytes| {
                let removed = inner.index.make_room(bytes);
                let freed = !removed.is_empty();
                if freed {
                    tracing::warn!(
                        bytes,
                        entries = removed.len(),
                        "disk full: evicting to make room"
                    );
                }
                inner.dispose_now(removed);
                freed
            });
            self.writer = Some(store::spawn_writer(
                &self.inner.layout,
                temp,
                existing,
                make_room,
                on_sync,
            ));
        }
        let limit = self.limit();
        while let Some(chunk) = response.chunk().await.map_err(fetch::body_error)? {
            self.received += chunk.len() as u64;
            self.inner
                .counters
                .add(Counter::BytesDownloaded, chunk.len() as u64);
            if self.received > limit {
                return Err(too_large(self.received, limit));
            }
            if self.received >= self.reported + crate::events::PROGRESS_STEP
                && self.inner.events.wanted()
            {
                self.reported = self.received;
                self.inner.events.emit(|| Event::Progress {
                    url: self.r.display.clone(),
                    received: self.received,
                    total: self.total,
                });
            }
            if self.total.is_some_and(|t| self.received > t) {
                return Err(Error::new(
                    ErrorKind::Incomplete,
                    "body longer than Content-Length",
                ));
            }
            self.hasher.update(&chunk);
            let writer = self.writer.as_ref().expect("created above");
            if writer.tx.send(store::WriteOp::Data(chunk)).await.is_err() {
                return Err(self.writer_failure().await);
            }
        }
        if let Some(total) = self.total.filter(|t| *t != self.received) {
            return Err(Error::new(
                ErrorKind::Incomplete,
                format!("received {} of {total} bytes", self.received),
            ));
        }
        Ok(Step::Complete)
    }

    /// Closes the writer (which fsyncs) and returns the temp file, the open file, the digest
    /// and the validators of the version received.
    async fn finish(&mut self) -> Result<(TempFile, std::fs::File, String, Validators)> {
        let Some(writer) = self.writer.take() else {
            return Err(Error::new(ErrorKind::Internal, "no body was received"));
        };
        // `Finish` lets the writer flush, fsync and hand back the file.
        let _ = writer.tx.send(store::WriteOp::Finish).await;
        drop(writer.tx);
        let (temp, file) = match writer.done.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return Err(Error::io("cannot write the download", e).with_path(writer.path));
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("writer failed: {e}"),
                ));
            }
        };
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok((temp, file, sha256, std::mem::take(&mut self.validators)))
    }
}

fn too_large(bytes: u64, max: u64) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!("{bytes} bytes exceed the cache's size cap of {max} bytes"),
    )
}
