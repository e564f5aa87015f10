//! [`FileStream`]: a file's bytes while it is being cached. A reader joins the download (or
//! starts it), reads what the writer has put in the temp file (by offset, through a handle
//! of its own) and waits on the download's progress for the rest; it never holds the
//! download back, and holds at most one chunk in memory. Its last byte and its end come only
//! after the commit, and only if the bytes it handed out are those of the committed file: a
//! download that fails, restarts after bytes were read, or ends with another file, ends
//! the stream with an error.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::watch;

use super::admit::{Admitted, Conclusion, Ticket};
use super::engine::{DownloadResult, Inner};
use super::file::{CacheStatus, CachedFile, GetOptions};
use super::wants::Progress;
use crate::error::{Error, Result};
use crate::key::Resolved;

/// The largest chunk a stream reads at once.
const CHUNK: usize = 256 * 1024;

/// A file's bytes as they are cached: a [`Stream`] of chunks and an [`AsyncRead`], from
/// [`ImageCache::get_stream`](crate::ImageCache::get_stream).
///
/// On a hit it reads the committed file. On a miss it starts reading as soon as the
/// download's first bytes are in its temp file, with any number of other readers, each at
/// its own pace; it ends after the commit, with an error if the download fails or its bytes
/// were not those committed. While it lives, the committed file is pinned.
pub struct FileStream {
    inner: BoxStream<'static, io::Result<Bytes>>,
    len: Option<u64>,
    status: CacheStatus,
    ended_with: Arc<std::sync::OnceLock<CachedFile>>,
    /// The origin said not to store the file being read.
    not_stored: Arc<std::sync::atomic::AtomicBool>,
    /// What [`AsyncRead`] has not handed out yet of the last chunk.
    left: Bytes,
}

impl std::fmt::Debug for FileStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStream")
            .field("len", &self.len)
            .field("status", &self.status)
            .finish()
    }
}

impl FileStream {
    /// The file's length when known: the committed size, or the origin's `Content-Length`
    /// of the download being read (of the range, for [`get_stream_range`](crate::ImageCache::get_stream_range)).
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// Whether the stream has nothing to read: a known length of zero.
    pub fn is_empty(&self) -> bool {
        self.len == Some(0)
    }

    /// The file the download ended with, once it has (its status says how it was had: a
    /// stale copy when the origin failed, for one).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn ended_with(&self) -> Option<&CachedFile> {
        self.ended_with.get()
    }

    /// Whether the origin said not to store the file being read (`Cache-Control:
    /// no-store`; see [`CacheStatus::NotStored`]), as far as the stream has read (known from
    /// its first byte on): a program that passes the bytes on should say so to its own
    /// clients, as the sidecar does.
    pub fn not_stored(&self) -> bool {
        self.not_stored.load(std::sync::atomic::Ordering::Acquire)
            || self
                .ended_with()
                .is_some_and(|f| f.status() == CacheStatus::NotStored)
    }

    /// [`CacheStatus::Hit`] for a committed file; [`CacheStatus::Downloaded`] when this
    /// stream started the download, [`CacheStatus::Coalesced`] when it joined one.
    pub fn status(&self) -> CacheStatus {
        self.status
    }
}

impl Stream for FileStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.left.is_empty() {
            return Poll::Ready(Some(Ok(std::mem::take(&mut self.left))));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

impl AsyncRead for FileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.left.is_empty() {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(chunk))) => self.left = chunk,
            }
        }
        let n = self.left.len().min(buf.remaining());
        let chunk = self.left.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

/// Where a stream reads from.
struct Reader {
    inner: Arc<Inner>,
    resolved: Arc<Resolved>,
    options: GetOptions,
    status: CacheStatus,
    /// This reader's place in the download, until it ends.
    ticket: Option<Ticket>,
    progress: Option<watch::Receiver<Progress>>,
    /// The temp file being read (its device and inode) and the generation it belongs to.
    /// No handle is kept between reads: one is taken from `progress` for each, so that a
    /// reader that stops reading holds no deleted temp file of a failed download.
    reading: Option<Reading>,
    /// After the commit: the file, pinned, and a handle on it.
    committed: Option<(CachedFile, Arc<File>)>,
    /// A hit, opened at the first read: a caller that takes it as a file (the sidecar's
    /// hits) never opens it here.
    hit: Option<CachedFile>,
    start: u64,
    pos: u64,
    end: Option<u64>,
    /// The file's length this stream announced (a sidecar sends it as Content-Length):
    /// another length later (a retry's other version, a stale copy) ends it in an error.
    announced: Option<u64>,
    /// The end, or the error, once reached: every later poll says it again.
    finished: Option<Option<String>>,
    /// The file the download ended with, as soon as it is known (for the sidecar, which
    /// answers a stale copy as a file).
    ended_with: Arc<std::sync::OnceLock<CachedFile>>,
    /// Set once the download's progress says the origin forbade storing the file.
    not_stored: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Reading {
    dev: u64,
    ino: u64,
    generation: u32,
}

fn identity(file: &File) -> io::Result<(u64, u64)> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

fn past_the_end() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the range starts past the end of the file",
    )
}

fn started_again() -> io::Error {
    io::Error::other("the download started again after bytes were read: read again")
}

fn to_io(e: Error) -> io::Error {
    io::Error::other(e)
}

/// Reads up to `max` bytes at `pos` of `file`, off the async workers.
async fn read_at(file: &Arc<File>, pos: u64, max: u64) -> io::Result<Bytes> {
    let file = Arc::clone(file);
    let len = max.min(CHUNK as u64) as usize;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        let n = file.read_at(&mut buf, pos)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

impl Reader {
    /// The next chunk, `None` at the end (after the commit), or the error that ends it;
    /// after either, the same again.
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        if let Some(end) = &self.finished {
            return end.as_ref().map(|e| Err(io::Error::other(e.clone())));
        }
        let item = self.step().await;
        let finished = match &item {
            None => Some(None),
            Some(Err(e)) => Some(Some(e.to_string())),
            Some(Ok(_)) => None,
        };
        if finished.is_some() {
            self.finished = finished;
            // Nothing of the download is held once the stream has ended.
            self.progress = None;
            self.reading = None;
            self.committed = None;
            self.hit = None;
        }
        item
    }

    async fn step(&mut self) -> Option<io::Result<Bytes>> {
        if let Some(file) = self.hit.take() {
            match file.open() {
                Ok(handle) => self.committed = Some((file, Arc::new(handle))),
                Err(e) => {
                    let e = Error::io("cannot open the cached file", e).with_path(file.path());
                    return Some(Err(to_io(e)));
                }
            }
        }
        loop {
            let end = self.end;
            if let Some((cached, file)) = &self.committed {
                if self.start > cached.size() {
                    return Some(Err(past_the_end()));
                }
                if end.is_some_and(|e| self.pos >= e) {
                    return None;
                }
                let max = end.map_or(CHUNK as u64, |e| e - self.pos);
                return match read_at(file, self.pos, max).await {
                    Ok(chunk) if chunk.is_empty() => {
                        if end.is_some_and(|e| self.pos < e) {
                            return Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the range runs past the end of the file",
                            )));
                        }
                        None
                    }
                    Ok(chunk) => {
                        self.pos += chunk.len() as u64;
                        Some(Ok(chunk))
                    }
                    Err(e) => Some(Err(e)),
                };
            }
            let task = self.ticket.as_ref()?.task().clone();
            let progress = self.progress.as_mut()?;
            let mut now = progress.borrow_and_update().clone();
            if now.not_stored {
                self.not_stored
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            // The handle is dropped before any wait: a reader waiting for bytes holds no
            // temp file that a failing download has deleted.
            let file = now.file.take();
            // A later answer of another length, or of none (chunked), cannot be vouched for
            // at the length announced.
            if self.announced.is_some() && now.total != self.announced {
                return Some(Err(io::Error::other(
                    "the file's length changed during the download: read again",
                )));
            }
            if let Some(total) = now.total
                && self.start > total
            {
                return Some(Err(past_the_end()));
            }
            if self.reading.is_some_and(|r| r.generation != now.generation) {
                if self.pos > self.start {
                    return Some(Err(started_again()));
                }
                self.reading = None;
            }
            if self.reading.is_none()
                && let Some(file) = &file
            {
                let (dev, ino) = match identity(file) {
                    Ok(id) => id,
                    Err(e) => return Some(Err(e)),
                };
                self.reading = Some(Reading {
                    dev,
                    ino,
                    generation: now.generation,
                });
            }
            // The last byte (of the file, or of the range) is held back until the commit: a
            // client that counts bytes (a Content-Length) takes the answer for complete at
            // its last byte, which is then verified and committed.
            let stop = match (end, now.total) {
                (Some(e), Some(t)) => Some(e.min(t)),
                (e, t) => e.or(t),
            };
            let available = match stop {
                Some(stop) => now.written.min(stop.saturating_sub(1)),
                None => now.written,
            };
            if let Some(file) = file
                .as_ref()
                .filter(|_| self.reading.is_some() && self.pos < available)
            {
                match read_at(file, self.pos, available - self.pos).await {
                    Ok(chunk) if !chunk.is_empty() => {
                        self.pos += chunk.len() as u64;
                        return Some(Ok(chunk));
                    }
                    // Shorter than the writer said: it is being truncated (a restart, whose
                    // news comes next) or replaced; wait for the next change, not spin.
                    Ok(_) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            drop(file);
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() {
                        // The download's state went with it: its result says the rest.
                        self.progress = None;
                        let result = self.ticket.as_ref()?.task().clone().await;
                        if let Err(e) = self.download_ended(result) {
                            return Some(Err(e));
                        }
                    }
                }
                result = task => {
                    if let Err(e) = self.download_ended(result) {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// The download ended: the committed file is read from now on, if the bytes read so far
    /// are its bytes.
    fn download_ended(&mut self, result: DownloadResult) -> io::Result<()> {
        let file = self.file_of(result).map_err(to_io)?;
        let handle = file.open()?;
        if self.announced.is_some_and(|n| n != file.size()) {
            return Err(io::Error::other(
                "the file committed is not of the length announced: read again",
            ));
        }
        if self.pos > self.start {
            // Bytes were read from a temp file: it must be the file committed, in the
            // generation they were read in (a restart truncates the same inode).
            if let (Some(progress), Some(reading)) = (&self.progress, self.reading)
                && progress.borrow().generation != reading.generation
            {
                return Err(started_again());
            }
            let same = self
                .reading
                .is_some_and(|r| identity(&handle).is_ok_and(|id| id == (r.dev, r.ino)));
            if !same {
                return Err(io::Error::other(
                    "another download was committed than the one read: read again",
                ));
            }
        }
        self.reading = None;
        self.progress = None;
        let _ = self.ended_with.set(file.clone());
        self.committed = Some((file, Arc::new(handle)));
        Ok(())
    }
}

impl Reader {
    /// The file a download ended with, for this reader (its ticket counts the miss). A
    /// download refused for other callers' digests ends a stream that cannot start again.
    fn file_of(&mut self, result: DownloadResult) -> Result<CachedFile> {
        let Some(mut ticket) = self.ticket.take() else {
            return Err(Error::new(
                crate::ErrorKind::Internal,
                "the download ended twice",
            ));
        };
        match ticket.conclude(&self.resolved, &self.options, result) {
            Conclusion::File(file) => Ok(file),
            Conclusion::DownloadAgain(e) | Conclusion::Failed(e) => Err(e),
        }
    }
}

impl super::ImageCache {
    /// The bytes of `url` as a [`FileStream`] ([`Stream`] and [`AsyncRead`]): from the
    /// committed file on a hit; else from the download, starting as soon as its first bytes
    /// are on disk, joined by any number of readers. The stream ends after the commit; a
    /// download that fails (or whose bytes do not match an expected digest) ends every
    /// stream on it with an error, never a clean end after wrong or partial bytes.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::AsyncReadExt;
    ///
    /// let mut stream = cache.get_stream("ct/0042.nii.gz").await?;
    /// let mut header = [0u8; 352]; // a NIfTI-1 header, long before the download ends
    /// stream.read_exact(&mut header).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// An error of the download reaches the reader as an [`std::io::Error`] whose
    /// [`get_ref`](std::io::Error::get_ref) is the cache's [`Error`] (its kind, URL and
    /// status), as `e.get_ref().and_then(|e| e.downcast_ref::<imgcache::Error>())`.
    ///
    /// # Errors
    /// As [`get`](Self::get) for what can be known before the first byte: an invalid URL,
    /// a cache that is shut down, offline mode without a copy. Failures of the download come
    /// through the stream, as [`std::io::Error`]s wrapping the [`Error`].
    pub async fn get_stream(&self, url: impl AsRef<str>) -> Result<FileStream> {
        self.get_stream_with(url, GetOptions::default()).await
    }

    /// [`get_stream`](Self::get_stream) with per-call options.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// use imgcache::GetOptions;
    ///
    /// let sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    /// let options = GetOptions::new().expected_sha256(sha256);
    /// let mut stream = cache.get_stream_with("ct/0042.nii.gz", options).await?;
    /// let mut out = tokio::fs::File::create("/tmp/0042.nii.gz").await?;
    /// // Ends with an error, not a clean end, if the bytes do not match the digest.
    /// let copied = tokio::io::copy(&mut stream, &mut out).await?;
    /// println!("{copied} bytes, as expected");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get_stream`](Self::get_stream).
    pub async fn get_stream_with(
        &self,
        url: impl AsRef<str>,
        options: GetOptions,
    ) -> Result<FileStream> {
        self.get_stream_range(url, options, 0, None).await
    }

    /// [`get_stream_with`](Self::get_stream_with) from byte `start` to `end` (exclusive;
    /// `None` for the end of the file): bytes already on disk come at once, the rest as
    /// the download brings them.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// use imgcache::GetOptions;
    /// use tokio::io::AsyncReadExt;
    ///
    /// // The NIfTI-1 header only: 348 bytes and the 4 of its extension flag.
    /// let mut stream = cache
    ///     .get_stream_range("ct/0042.nii", GetOptions::new(), 0, Some(352))
    ///     .await?;
    /// let mut header = Vec::new();
    /// stream.read_to_end(&mut header).await?;
    /// assert_eq!(header.len(), 352);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get_stream`](Self::get_stream); a range past the end of the file ends the
    /// stream with an error.
    pub async fn get_stream_range(
        &self,
        url: impl AsRef<str>,
        options: GetOptions,
        start: u64,
        end: Option<u64>,
    ) -> Result<FileStream> {
        Ok(self.open_stream(url, options).await?.range(start, end))
    }

    /// A stream whose range is chosen once its length is known (the sidecar's `Range`).
    pub(crate) async fn open_stream(
        &self,
        url: impl AsRef<str>,
        options: GetOptions,
    ) -> Result<OpenedStream> {
        let inner = Arc::clone(self.inner());
        let (resolved, admitted) = inner.admit(url.as_ref(), &options)?;
        let mut reader = Reader {
            inner: Arc::clone(&inner),
            resolved,
            options,
            status: CacheStatus::Hit,
            ticket: None,
            progress: None,
            reading: None,
            committed: None,
            hit: None,
            start: 0,
            pos: 0,
            end: None,
            announced: None,
            finished: None,
            ended_with: Arc::default(),
            not_stored: Arc::default(),
        };
        match admitted {
            Admitted::Hit(file) => {
                reader.status = file.status();
                reader.announced = Some(file.size());
                reader.hit = Some(file);
            }
            Admitted::Download(ticket) => {
                let task = ticket.task().clone();
                let mut progress = ticket.wants().progress().subscribe();
                // The length, once the origin's answer gives it, or its file is open (an
                // answer without a length), or the download ends.
                reader.announced = loop {
                    let (total, open) = {
                        let now = progress.borrow_and_update();
                        (now.total, now.file.is_some())
                    };
                    if total.is_some() || open || task.peek().is_some() {
                        break total;
                    }
                    tokio::select! {
                        changed = progress.changed() => if changed.is_err() { break None },
                        _ = task.clone() => break progress.borrow().total,
                    }
                };
                reader.status = ticket.status();
                reader.ticket = Some(ticket);
                reader.progress = Some(progress);
            }
        }
        Ok(OpenedStream { reader })
    }
}

/// A [`FileStream`] before its range is chosen: its length is known (when the origin said
/// it), nothing is read yet.
pub(crate) struct OpenedStream {
    reader: Reader,
}

impl OpenedStream {
    /// The whole file's length, when known.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn total(&self) -> Option<u64> {
        self.reader.announced
    }

    /// How the stream was opened: a hit, or the download it started or joined.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn status(&self) -> CacheStatus {
        self.reader.status
    }

    /// Whether there is nothing to stream: a committed file (a hit, a stale copy), or a
    /// download that has ended (a 304 renewal, a failure).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn settled(&self) -> bool {
        self.reader.hit.is_some()
            || self.reader.committed.is_some()
            || self
                .reader
                .ticket
                .as_ref()
                .is_none_or(|t| t.task().peek().is_some())
    }

    /// The committed file, once the download ends: for a client that cannot take a body
    /// of unknown length.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) async fn into_file(self) -> Result<CachedFile> {
        let mut reader = self.reader;
        if let Some(file) = reader.hit.take() {
            return Ok(file);
        }
        if let Some((file, _)) = reader.committed.take() {
            return Ok(file);
        }
        let Some(ticket) = reader.ticket.take() else {
            return Err(Error::new(
                crate::ErrorKind::Io,
                "the download ended without a file",
            ));
        };
        let inner = Arc::clone(&reader.inner);
        inner
            .settle(
                &reader.resolved,
                &reader.options,
                Admitted::Download(ticket),
            )
            .await
    }

    /// The bytes from `start` to `end` (exclusive; `None` for the end of the file).
    pub(crate) fn range(self, start: u64, end: Option<u64>) -> FileStream {
        let mut reader = self.reader;
        let end = end.map(|e| e.max(start));
        reader.start = start;
        reader.pos = start;
        reader.end = end;
        let len = reader
            .announced
            .map(|t| end.unwrap_or(t).min(t).saturating_sub(start));
        let status = reader.status;
        let ended_with = Arc::clone(&reader.ended_with);
        let not_stored = Arc::clone(&reader.not_stored);
        let inner = futures_util::stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await?;
            Some((item, reader))
        });
        FileStream {
            // Fused: polled again after its end, it ends again.
            inner: Box::pin(futures_util::StreamExt::fuse(inner)),
            len,
            status,
            ended_with,
            not_stored,
            left: Bytes::new(),
        }
    }
}
