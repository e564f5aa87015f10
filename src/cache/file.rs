//! What callers hold and pass: [`CachedFile`] (its pin is `pin.rs`'s), [`GetOptions`],
//! [`CacheStatus`], and the report types of the public methods.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::pin::Pinned;
use crate::clock::from_unix_ms;
#[cfg(doc)]
use crate::error::ErrorKind;

/// How a [`CachedFile`] was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheStatus {
    /// From a committed entry, without touching the network (one this process had, or one
    /// another process had committed before the call).
    Hit,
    /// This call started the download.
    Downloaded,
    /// This call joined a download another call had started, in this process or (waiting on
    /// the URL's lock) in another one on the same directory.
    Coalesced,
    /// The entry had expired; a conditional request found it unchanged (304) and renewed it.
    Revalidated,
    /// The entry had expired and the origin failed (or the cache is offline): this is the
    /// expired copy.
    Stale,
    /// Another host of the fleet had downloaded it: read from the tier (see
    /// [`CacheBuilder::tier`](crate::CacheBuilder::tier)), checked against its
    /// SHA-256, and committed here.
    Shared,
    /// The origin said not to store its answer (`Cache-Control: no-store`, or `private` for
    /// a cache that answers many clients; see
    /// [`NetworkOptions::keep_no_store`](crate::NetworkOptions::keep_no_store)): downloaded
    /// and checked for this call and those that joined it, into a file of its own that goes
    /// when the last handle on it does. Nothing is kept: the next call downloads again.
    NotStored,
}

/// A file in the cache, complete and verified. Derefs to its [`Path`].
///
/// While any clone of it is alive its entry is pinned: eviction, expiry, `invalidate` and
/// `clear` never delete the file under it (a removed entry's file goes when the last
/// `CachedFile` does). A later download of the same URL (after expiry or `refresh`) is a new
/// version at a path of its own: the bytes at this path never change while it is held.
#[derive(Clone)]
pub struct CachedFile {
    pub(super) pinned: Arc<Pinned>,
    pub(super) status: CacheStatus,
}

impl CachedFile {
    /// The local path. Its file name is the URL's own (so it ends in `.nii.gz`).
    pub fn path(&self) -> &Path {
        &self.pinned.entry.path
    }

    /// Opens the file for reading, with a position of its own: the very file the cache
    /// checked and holds (the same inode), whatever has been done to its path since, a link
    /// planted on the way or another file put in its place. Opening [`path`](Self::path)
    /// yourself follows whatever is there when you open it.
    ///
    /// ```no_run
    /// # async fn run(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::io::Read;
    /// let file = cache.get("https://images.example.org/ct/0042.nii.gz").await?;
    /// let mut magic = [0u8; 2];
    /// file.open()?.read_exact(&mut magic)?;
    /// assert_eq!(magic, [0x1f, 0x8b]); // gzip
    /// # Ok(())
    /// # }
    /// ```
    pub fn open(&self) -> std::io::Result<std::fs::File> {
        self.pinned.open()
    }

    /// The URL, normalised and without credentials.
    pub fn url(&self) -> &str {
        &self.pinned.entry.meta.url
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.pinned.entry.meta.size
    }

    /// Hex SHA-256 of the bytes, computed while they were downloaded.
    pub fn sha256(&self) -> &str {
        &self.pinned.entry.meta.sha256
    }

    /// When the bytes were downloaded, or last confirmed current by the origin.
    pub fn fetched_at(&self) -> SystemTime {
        from_unix_ms(self.pinned.entry.fetched_at())
    }

    /// When the entry expires.
    pub fn expires_at(&self) -> SystemTime {
        from_unix_ms(self.pinned.entry.expires_at())
    }

    /// The origin's `ETag`, if it sent one.
    pub fn etag(&self) -> Option<String> {
        self.pinned.entry.validators().etag
    }

    /// The origin's `Last-Modified`, if it sent one.
    pub fn last_modified(&self) -> Option<String> {
        self.pinned.entry.validators().last_modified
    }

    /// Whether this call was a hit, started the download, or joined one.
    pub fn status(&self) -> CacheStatus {
        self.status
    }
}

impl Deref for CachedFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.path()
    }
}

impl AsRef<Path> for CachedFile {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedFile")
            .field("path", &self.path())
            .field("size", &self.size())
            .field("status", &self.status)
            .finish()
    }
}

/// Per-call options for [`ImageCache::get_with`](crate::ImageCache::get_with).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GetOptions {
    /// Maximum age for this call, and the TTL of an entry this call downloads. A cached entry
    /// older than this is downloaded again. When several calls share one download the entry
    /// gets the longest TTL they asked for (each call still enforces its own maximum age).
    /// Default: the cache's default TTL.
    pub ttl: Option<Duration>,
    /// The SHA-256 the bytes must have (hex, either case). A download that does not match is
    /// an [`ErrorKind::ChecksumMismatch`] for this call and is not cached, unless another call
    /// sharing the download takes those bytes (one without a digest, or with theirs): one
    /// call's digest never fails the others. A cached entry that does not match is downloaded
    /// again.
    pub expected_sha256: Option<String>,
    /// Download even if a fresh entry exists (a download already running is joined).
    pub force: bool,
    /// Called while this call waits on a download (the one it started, or the one it
    /// joined): see [`GetOptions::progress`].
    pub progress: Option<OnProgress>,
    /// A file larger than the size cap is downloaded and handed out uncached (status
    /// [`CacheStatus::NotStored`], deleted when the last handle goes) instead of refused
    /// with [`ErrorKind::TooLarge`]. See [`GetOptions::uncached_if_too_large`].
    pub uncached_if_too_large: bool,
}

/// What [`GetOptions::progress`] calls: bytes in the file so far, and the full length when
/// a response said it.
#[derive(Clone)]
pub struct OnProgress(pub Arc<dyn Fn(u64, Option<u64>) + Send + Sync>);

impl fmt::Debug for OnProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnProgress(..)")
    }
}

impl GetOptions {
    /// Options with every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ttl`](Self::ttl).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets [`expected_sha256`](Self::expected_sha256).
    #[must_use]
    pub fn expected_sha256(mut self, hex: impl Into<String>) -> Self {
        self.expected_sha256 = Some(hex.into());
        self
    }

    /// Sets [`force`](Self::force).
    #[must_use]
    pub fn force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// Sets [`uncached_if_too_large`](Self::uncached_if_too_large): a volume larger than the
    /// whole cache can still be viewed. Its bytes do not count against the cap (nothing is
    /// evicted for it) and it is logged at WARN; it still needs the disk space, and
    /// `CACHE_MAX_FILE_SIZE_MB` still bounds it. A caller that joins such a download gets
    /// the same uncached file.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// use imgcache::{CacheStatus, GetOptions};
    ///
    /// let options = GetOptions::new().uncached_if_too_large(true);
    /// let file = cache.get_with("ct/whole-body-4gb.nii.gz", options).await?;
    /// if file.status() == CacheStatus::NotStored {
    ///     eprintln!("read it now: it goes when `file` is dropped");
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn uncached_if_too_large(mut self, allow: bool) -> Self {
        self.uncached_if_too_large = allow;
        self
    }

    /// Calls `report(done, total)` while this call waits on a download: every 1% of the
    /// length (at least every MiB), when a download starts again from an earlier byte (a
    /// retry the server would not resume, a fallback from the tier to the origin: `done`
    /// goes down), and once at the end with the full size. A hit calls nothing. It runs on
    /// the task that awaits the call, so it must be quick (update a bar, send to a
    /// channel); every caller of one shared download gets its own reports.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// use imgcache::GetOptions;
    ///
    /// let options = GetOptions::new().progress(|done, total| match total {
    ///     Some(total) => eprint!("\r{} of {} MiB", done >> 20, total >> 20),
    ///     None => eprint!("\r{} MiB", done >> 20),
    /// });
    /// let file = cache.get_with("ct/0042.nii.gz", options).await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn progress(mut self, report: impl Fn(u64, Option<u64>) + Send + Sync + 'static) -> Self {
        self.progress = Some(OnProgress(Arc::new(report)));
        self
    }
}

/// One entry as [`Admin::entries`](crate::Admin::entries) lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The URL, normalised and without credentials.
    pub url: String,
    /// The local file.
    pub path: PathBuf,
    /// Length in bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
    /// Download time, milliseconds since the Unix epoch.
    pub fetched_at_ms: u64,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// Last hit or download, milliseconds since the Unix epoch.
    pub last_access_ms: u64,
    /// Hits on this entry.
    pub hits: u64,
    /// Whether a live [`CachedFile`] holds it.
    pub pinned: bool,
}

/// What [`ImageCache::cleanup`](crate::ImageCache::cleanup) removed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupReport {
    /// Entries removed because their TTL passed.
    pub expired: u64,
    /// Entries removed to honour the size cap.
    pub evicted: u64,
    /// Bytes those entries held.
    pub bytes_freed: u64,
    /// Expired entries left in place: a caller (here or in another process) holds their
    /// file, or, rarely, another process was changing them at that instant. They have no
    /// grace period left: they go when let go (those held here, by the sweep that the last
    /// unpin wakes; others by the next cleanup or sweep).
    #[serde(default)]
    pub kept_in_use: u64,
}

/// The outcome of verifying one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Verification {
    /// The bytes hash to the recorded SHA-256.
    Ok,
    /// They do not (or the file is gone); the entry was removed.
    Corrupt,
    /// The URL has no entry.
    NotCached,
}

/// What [`Admin::verify_all`](crate::Admin::verify_all) found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Entries hashed.
    pub checked: u64,
    /// URLs of the entries that failed and were removed.
    pub corrupt: Vec<String>,
}
