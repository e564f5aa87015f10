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
use super::{DownloadResult, Inner, Outcome, checksum_error, duration_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::failpoint::failpoint;
use crate::fetch;
use crate::index::Entry;
use crate::key::{Key, Resolved};
use crate::stats::Counter;
use crate::store::{self, Layout, Meta, TempFile, Validators};

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
    /// The download task's work: revalidate or download with retries, and fall back to the
    /// expired copy when the origin fails.
    async fn fetch_entry(
        self: &Arc<Self>,
        r: &Resolved,
        force: bool,
        wants: &Wants,
    ) -> DownloadResult {
        let previous = if force {
            None
        } else {
            self.index.current(&r.key)
        };
        let result = self
            .download_with_retries(r, wants, previous.as_ref())
            .await;
        match (result, previous) {
            (Err(e), Some(stale)) if self.config.stale_if_error && e.is_transient() => {
                if !self.index.pin_if_current(&stale) {
                    return Err(e);
                }
                self.counters.add(Counter::StaleServed, 1);
                tracing::warn!(
                    url = %r.display,
                    path = %stale.path.display(),
                    error = %e,
                    "origin failed; serving the expired copy"
                );
                Ok((self.pinned(stale), Outcome::Stale))
            }
            (result, _) => result,
        }
    }

    /// Attempts within the total deadline; on failure, waits until the writer has removed
    /// its temp file, so that an error never leaves one behind.
    async fn download_with_retries(
        self: &Arc<Self>,
        r: &Resolved,
        wants: &Wants,
        previous: Option<&Arc<Entry>>,
    ) -> DownloadResult {
        let mut transfer = Transfer::new(self, r);
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
        let this = Arc::clone(self);
        let key = r.key.clone();
        let pinned = tokio::task::spawn_blocking(move || {
            this.commit(key, temp, file, meta, reservation)
                .map(|entry| this.pinned(entry))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("commit failed: {e}")))??;
        let entry = &pinned.entry;
        self.counters.add(Counter::TotalDownloads, 1);
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
    fn commit(
        &self,
        key: Key,
        temp: TempFile,
        file: std::fs::File,
        mut meta: Meta,
        reservation: Option<Reservation>,
    ) -> Result<Arc<Entry>> {
        let io_err = |what: &str, e| Error::io(what.to_owned(), e);
        let md = file
            .metadata()
            .map_err(|e| io_err("cannot stat the download", e))?;
        drop(file);
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
            .commit(entry, temp, meta_temp, reserved, now)
            .map_err(|e| io_err("cannot commit the download", e))?;
        // Released by the index with the commit.
        reservation.map(Reservation::disarm);
        failpoint("commit-after-meta");
        self.dispose_now(removed);
        Ok(entry)
    }
}

/// What one caller of a download asked for: the digest it expects, and the TTL it gives an
/// entry it downloads.
#[derive(Debug, Clone)]
pub(super) struct Want {
    expected_sha256: Option<String>,
    ttl_ms: u64,
}

impl Want {
    pub(super) fn of(inner: &Inner, options: &GetOptions) -> Want {
        Want {
            expected_sha256: options
                .expected_sha256
                .as_deref()
                .map(|e| e.trim().to_owned()),
            ttl_ms: inner.ttl_ms(options),
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
}

/// Bytes reserved for a download from its `Content-Length`; released if it never commits.
struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Reservation {
    async fn new(inner: &Arc<Inner>, bytes: u64) -> Reservation {
        let removed = inner.index.reserve(bytes);
        // Made before the await below, so that a deadline firing there still releases it.
        let reservation = Reservation {
            inner: Arc::clone(inner),
            bytes,
        };
        inner.dispose_blocking(removed).await;
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
}

impl<'a> Transfer<'a> {
    fn new(inner: &'a Arc<Inner>, r: &'a Resolved) -> Transfer<'a> {
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
            let temp = TempFile::new(self.inner.layout.temp_path(&self.r.key, "part"));
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
            self.writer = Some(store::spawn_writer(&self.inner.layout, temp, make_room));
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
