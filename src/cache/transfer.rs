//! One download across its attempts: the [`Transfer`] (temp file, writer thread, running
//! SHA-256, byte count), what it reserves against the cap, and the writer lock and part file
//! it may take over from a process that died.

use std::sync::{Arc, Mutex};

use super::announce::Announcement;
use super::engine::Inner;
use super::wants::Wants;
use crate::digest::Sha256;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::fetch;
use crate::key::Resolved;
use crate::stats::Counter;
use crate::store::locks::{KeyLock, Record};
use crate::store::{self, TempFile, Validators};

/// Bytes reserved for a download from its `Content-Length`; released if it never commits.
pub(super) struct Reservation {
    pub(super) inner: Arc<Inner>,
    pub(super) bytes: u64,
}

impl Reservation {
    /// Reserves `bytes` against the cap of the whole directory: under the directory's cap
    /// lock, with what every process has committed and reserved read fresh (every process
    /// record, a scan of the entries), and this process's reservation published before the
    /// lock is let go, so that two processes never both take the last free bytes. Heavy: a
    /// lock wait and a directory's worth of reads, on the blocking pool.
    pub(super) async fn take_under_cap_lock(inner: &Arc<Inner>, bytes: u64) -> Reservation {
        let mut reservation = Reservation {
            inner: Arc::clone(inner),
            bytes: 0,
        };
        reservation.grow(bytes).await;
        reservation
    }

    /// Adds `extra` bytes to the reservation, as [`take_under_cap_lock`] takes them: a
    /// download of unknown length grows its reservation ahead of the bytes that arrive.
    ///
    /// [`take_under_cap_lock`]: Reservation::take_under_cap_lock
    pub(super) async fn grow(&mut self, extra: u64) {
        // Counted here and in the index together, before any await: a deadline that drops
        // this future releases exactly what was added. Room is made on the blocking pool.
        self.inner.index.add_reservation(extra);
        self.bytes += extra;
        let this = Arc::clone(&self.inner);
        let _ = tokio::task::spawn_blocking(move || {
            let cap = this.layout.lock_cap();
            this.read_others();
            this.sync_from_disk();
            let removed = this.index.evict_to_cap();
            this.save_record();
            drop(cap);
            removed.dispose_now();
        })
        .await;
    }

    /// Hands the reservation to the commit, which releases it under the index lock.
    pub(super) fn disarm(mut self) -> u64 {
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

/// A transfer's complete temp file, open, with its digest, length and validators.
pub(super) struct Finished {
    pub(super) temp: TempFile,
    pub(super) file: std::fs::File,
    pub(super) sha256: String,
    pub(super) size: u64,
    pub(super) validators: Validators,
}

impl Finished {
    /// The temp file, its handle, and the meta.json that describes it as a download of `r`
    /// stamped with these times (its mtime and generation are set where it is installed).
    pub(super) fn into_parts(
        self,
        r: &Resolved,
        fetched_at: u64,
        expires_at: u64,
    ) -> (TempFile, std::fs::File, store::Meta) {
        let meta = store::Meta {
            version: 1,
            url: r.display.clone(),
            file_name: r.file_name.clone(),
            sha256: self.sha256,
            size: self.size,
            mtime_ns: 0,
            etag: self.validators.etag,
            last_modified: self.validators.last_modified,
            fetched_at,
            expires_at,
            generation: String::new(),
        };
        (self.temp, self.file, meta)
    }
}

/// The least a download of unknown length reserves ahead of its bytes.
const UNKNOWN_LENGTH_STEP: u64 = 4 << 20;

/// What one attempt achieved.
pub(super) enum Step {
    /// The body is complete.
    Complete,
    /// 304: the expired copy is current.
    NotModified(Validators),
}

/// The URL's writer lock while this process downloads it, and the record in it that says
/// where a successor may resume from. Shared with the writer thread, which updates the
/// durable length as it fsyncs.
pub(super) struct WriterLock {
    pub(super) lock: KeyLock,
    record: Record,
}

impl WriterLock {
    pub(super) fn update(&mut self, change: impl FnOnce(&mut Record)) {
        change(&mut self.record);
        self.lock.write_record(&self.record);
    }
}

/// A dead download's part file, taken over: its kept prefix, hashed again.
pub(super) struct Resume {
    pub(super) temp: TempFile,
    pub(super) file: std::fs::File,
    pub(super) hasher: Sha256,
    pub(super) received: u64,
    pub(super) validators: Validators,
    pub(super) total: Option<u64>,
}

impl Resume {
    /// Takes the part file at `path` if no writer holds it, moves it to a name of this
    /// process's own (so that no other successor, even where locks do nothing, writes into
    /// the same file), cuts it to its durable length and hashes that prefix (blocking).
    /// Refused: anything but a regular file of this user with one link, still at `path`, a
    /// record longer than the file, the origin's length, or the cap.
    pub(super) fn open(
        layout: &store::Layout,
        key: &crate::key::Key,
        path: std::path::PathBuf,
        record: Record,
        validators: Validators,
        max_bytes: u64,
    ) -> std::io::Result<Resume> {
        use std::io::{Read, Seek};
        use std::os::unix::fs::MetadataExt;
        let refuse = |why: &str| Err(std::io::Error::other(why.to_owned()));
        let file = store::open_part(layout, &path)?;
        let mut file = match store::locks::try_exclusive(file)? {
            store::locks::Try::Taken(file) => file,
            _ => return refuse("its writer is alive"),
        };
        let md = file.metadata()?;
        let at_path = layout.lstat(&path)?;
        if !md.is_file()
            || md.nlink() != 1
            || md.uid() != rustix::process::geteuid().as_raw()
            || (md.dev(), md.ino()) != (at_path.dev(), at_path.ino())
        {
            return refuse("not a part file of this cache's own");
        }
        if md.len() < record.durable
            || record.durable > max_bytes
            || record.total.is_some_and(|total| record.durable > total)
        {
            return refuse("its record does not fit the file");
        }
        let temp = layout.temp_file(layout.temp_path(key, "part"));
        layout.rename(&path, temp.path())?;
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
pub(super) struct Transfer<'a> {
    pub(super) inner: &'a Arc<Inner>,
    pub(super) r: &'a Resolved,
    pub(super) writer: Option<store::SpawnedWriter>,
    pub(super) hasher: Sha256,
    pub(super) received: u64,
    /// The full length, from `Content-Length` of the 200 (or `Content-Range` of a 206).
    pub(super) total: Option<u64>,
    /// Of the version being downloaded: what `If-Range` binds a resume to.
    pub(super) validators: Validators,
    /// `received` when progress was last reported.
    pub(super) reported: u64,
    /// Whether the origin answered an attempt (with any status): it is reachable.
    pub(super) answered: bool,
    /// Larger than the size cap, and a caller takes it uncached: no reservation, and handed
    /// out as an answer not stored.
    pub(super) oversize: bool,
    /// What the callers ask (whether one takes a file larger than the cap).
    wants: &'a Wants,
    pub(super) reservation: Option<Reservation>,
    /// The URL's writer lock; `None` when this process downloads without it.
    pub(super) lock: Option<Arc<Mutex<WriterLock>>>,
    /// A dead download's part file to go on from, until the writer takes it.
    pub(super) resumed: Option<(TempFile, std::fs::File)>,
    /// When the callers asked, by the cache's clock.
    pub(super) asked_at: u64,
    /// The `Cache-Control` directive by which the origin said not to store this answer.
    pub(super) not_to_store: Option<&'static str>,
    /// What the readers of this download in progress see (see `stream`).
    progress: Arc<tokio::sync::watch::Sender<super::wants::Progress>>,
    /// The guard of the download's events, which says when its bytes start.
    announcement: &'a Announcement,
}

impl<'a> Transfer<'a> {
    /// A transfer of `r` for callers who asked at `asked_at` and want `wants`: its readers see
    /// what reaches the file, and its announcement says when the bytes start. `lock` is the
    /// URL's writer lock, if taken.
    pub(super) fn new(
        inner: &'a Arc<Inner>,
        r: &'a Resolved,
        wants: &'a Wants,
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
            answered: false,
            oversize: false,
            wants,
            reservation: None,
            lock: lock.map(|lock| {
                Arc::new(Mutex::new(WriterLock {
                    lock,
                    record: Record::default(),
                }))
            }),
            resumed: None,
            asked_at,
            not_to_store: None,
            progress: Arc::clone(wants.progress()),
            announcement: wants.announcement(),
        }
    }

    /// Tells the readers the full length, once a response said it.
    fn publish_total(&self) {
        let total = self.total;
        self.progress.send_if_modified(|p| {
            let changed = p.total != total;
            p.total = total;
            changed
        });
    }

    /// Goes on from a dead download's part file.
    pub(super) fn resume_from(&mut self, resume: Resume) {
        self.hasher = resume.hasher;
        self.received = resume.received;
        self.reported = resume.received;
        self.validators = resume.validators;
        self.total = resume.total;
        self.resumed = Some((resume.temp, resume.file));
    }

    /// Updates the lock's record, if this process holds the lock.
    pub(super) fn record(&self, change: impl FnOnce(&mut Record)) {
        if let Some(lock) = &self.lock {
            lock.lock()
                .unwrap_or_else(|e| e.into_inner())
                .update(change);
        }
    }

    pub(super) fn limit(&self) -> u64 {
        let file_limit = self.inner.config.max_file_size_bytes;
        if self.wants.uncached_ok() {
            return file_limit;
        }
        self.inner.index.max().min(file_limit)
    }

    /// Whether `bytes` are more than the cap while a caller takes them uncached: then the
    /// download holds no reservation (nothing is evicted for a file that is not kept).
    fn goes_uncached(&mut self, bytes: u64) -> bool {
        if !self.oversize && bytes > self.inner.index.max() && self.wants.uncached_ok() {
            self.oversize = true;
            self.reservation = None;
        }
        self.oversize
    }

    /// Forgets the bytes received so far (the next body starts at zero).
    pub(super) async fn restart(&mut self) -> Result<()> {
        self.hasher = Sha256::new();
        self.received = 0;
        self.reported = 0;
        self.oversize = false;
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
    pub(super) async fn abandon(&mut self) {
        if let Some(writer) = self.writer.take() {
            drop(writer.tx);
            let _ = writer.done.await;
        }
    }

    /// The writer thread stopped early; its error says why (a full disk, usually).
    pub(super) async fn writer_failure(&mut self) -> Error {
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
    pub(super) async fn attempt(&mut self, revalidate: Option<&Validators>) -> Result<Step> {
        let client = &self.inner.config.http;
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
        let sent = fetch::send(client, url, ask).await;
        if sent.as_ref().map_or_else(
            |e| e.kind() == ErrorKind::HttpStatus || e.after_redirect(),
            |_| true,
        ) {
            self.answered = true;
        }
        let mut response = match sent? {
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
                if self.reservation.is_none() && !self.goes_uncached(self.total.unwrap_or(0)) {
                    // A download taken over from a dead process starts with a 206.
                    let limit = self.limit();
                    if let Some(total) = self.total.filter(|t| *t > limit) {
                        return Err(too_large(total, limit));
                    }
                    let wanted = self.total.unwrap_or(0);
                    self.reservation =
                        Some(Reservation::take_under_cap_lock(self.inner, wanted).await);
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
                let config = &self.inner.config;
                self.not_to_store = if config.keep_no_store {
                    None
                } else {
                    fetch::not_to_store(response.headers(), config.refuse_private)
                };
                let not_stored = self.not_to_store.is_some();
                self.progress.send_if_modified(|p| {
                    let changed = p.not_stored != not_stored;
                    p.not_stored = not_stored;
                    changed
                });
                let limit = self.limit();
                if let Some(total) = self.total.filter(|t| *t > limit) {
                    return Err(too_large(total, limit));
                }
                let wanted = self.total.unwrap_or(0);
                if !self.goes_uncached(wanted)
                    && self.reservation.as_ref().map(|r| r.bytes) != Some(wanted)
                {
                    self.reservation = None; // releases the old amount first
                    self.reservation =
                        Some(Reservation::take_under_cap_lock(self.inner, wanted).await);
                }
                response
            }
        };
        self.publish_total();
        self.start_writer();
        while let Some(chunk) = response.chunk().await.map_err(fetch::body_error)? {
            self.inner
                .counters
                .add(Counter::BytesDownloaded, chunk.len() as u64);
            self.push(chunk).await?;
        }
        if let Some(total) = self.total.filter(|t| *t != self.received) {
            return Err(Error::new(
                ErrorKind::Incomplete,
                format!("received {} of {total} bytes", self.received),
            ));
        }
        Ok(Step::Complete)
    }

    /// Starts the writer thread on a new temp file (or the part file taken over), once.
    pub(super) fn start_writer(&mut self) {
        if self.writer.is_some() {
            return;
        }
        self.announcement.started(self.total);
        let (temp, existing) = match self.resumed.take() {
            Some((temp, file)) => (temp, Some(file)),
            None => (
                self.inner
                    .layout
                    .temp_file(self.inner.layout.temp_path(&self.r.key, "part")),
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
        // An answer not to be stored leaves nothing for a successor to resume.
        let resumable = self.not_to_store.is_none() && !self.oversize;
        self.record(|rec| {
            if !resumable {
                *rec = Record::default();
                return;
            }
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
            removed.dispose_now();
            freed
        });
        self.writer = Some(store::spawn_writer(
            &self.inner.layout,
            temp,
            existing,
            make_room,
            on_sync,
            super::wants::on_written(Arc::clone(&self.progress)),
            store::WriterWatch {
                keep: resumable.then(|| Arc::clone(&self.inner.stopping)),
                live: Arc::clone(&self.inner.writers),
            },
        ));
    }

    /// Without a length, the reservation stays ahead of the bytes received: when they reach
    /// it, it grows by a quarter of them (at least [`UNKNOWN_LENGTH_STEP`]), so that what
    /// is on disk never outgrows what the cap counts, and a 2 GB body takes about thirty
    /// reservations.
    async fn reserve_ahead(&mut self, limit: u64) {
        let reserved = self.reservation.as_ref().map_or(0, |r| r.bytes);
        if self.received <= reserved {
            return;
        }
        let step = (self.received / 4).max(UNKNOWN_LENGTH_STEP);
        let wanted = self
            .received
            .saturating_add(step)
            .min(limit)
            .max(self.received);
        match &mut self.reservation {
            Some(reservation) => reservation.grow(wanted - reserved).await,
            None => {
                self.reservation = Some(Reservation::take_under_cap_lock(self.inner, wanted).await);
            }
        }
    }

    /// Takes one chunk of the body: counted against the limits, hashed, and handed to the
    /// writer (started by [`start_writer`](Self::start_writer)).
    pub(super) async fn push(&mut self, chunk: bytes::Bytes) -> Result<()> {
        let limit = self.limit();
        self.received += chunk.len() as u64;
        if self.received > limit {
            return Err(too_large(self.received, limit));
        }
        // Without a length, a download a caller takes uncached reserves nothing as it goes
        // (it may end over the cap, and nothing is evicted for it); if it ends within the
        // cap, its commit makes room as a commit does.
        if self.total.is_none() && !self.goes_uncached(self.received) && !self.wants.uncached_ok() {
            self.reserve_ahead(limit).await;
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
        let Some(writer) = self.writer.as_ref() else {
            return Err(Error::new(ErrorKind::Internal, "no writer"));
        };
        if writer.tx.send(store::WriteOp::Data(chunk)).await.is_err() {
            return Err(self.writer_failure().await);
        }
        Ok(())
    }

    /// Closes the writer (which fsyncs) and returns the temp file, open, with the digest, the
    /// length and the validators of the version received.
    pub(super) async fn finish(&mut self) -> Result<Finished> {
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
        let size = file
            .metadata()
            .map_err(|e| Error::io("cannot stat the download", e))?
            .len();
        Ok(Finished {
            temp,
            file,
            sha256: std::mem::take(&mut self.hasher).hex(),
            size,
            validators: std::mem::take(&mut self.validators),
        })
    }
}

pub(super) fn too_large(bytes: u64, max: u64) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!("{bytes} bytes exceed the cache's size cap of {max} bytes"),
    )
}
