//! [`Admin`]: what an operator reads and changes of a running cache beside what an
//! application calls: its directory and image server, its entries one by one, what a cleanup
//! would remove, integrity checks, the counters, and the cap and TTL at run time. The
//! dashboard, the CLI and the Python package's controls are built on it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::engine::Inner;
use super::file::{EntryInfo, Verification, VerifyReport};
use super::handle::ImageCache;
use super::pin::Holding;
use super::removal::{CleanupPreview, entry_info};
use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::index::Reason;
use crate::key::Key;
use crate::stats::Counter;

/// The operator's view of a cache, from [`ImageCache::admin`]: a borrow, free to make.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
/// let admin = cache.admin();
/// println!("{} holds {} entries", admin.cache_dir().display(), admin.entries().len());
/// admin.set_max_size_bytes(512 * imgcache::MB)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy)]
pub struct Admin<'a> {
    cache: &'a ImageCache,
}

impl std::fmt::Debug for Admin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Admin").field(self.cache).finish()
    }
}

impl ImageCache {
    /// The operator's view: the directory, the entries one by one, dry runs, integrity
    /// checks, counters and settings at run time (see [`Admin`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// assert_eq!(cache.admin().cache_dir(), dir.path());
    /// # Ok(()) }
    /// ```
    pub fn admin(&self) -> Admin<'_> {
        Admin { cache: self }
    }
}

impl<'a> Admin<'a> {
    /// The cache directory.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// assert_eq!(cache.admin().cache_dir(), dir.path());
    /// # Ok(()) }
    /// ```
    pub fn cache_dir(&self) -> &'a Path {
        &self.cache.inner().config.cache_dir
    }

    /// The image server relative URLs resolve against, if one is configured.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .image_server("http://images.example:8042/data/")
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.admin().image_server(), Some("http://images.example:8042/data/"));
    /// # Ok(()) }
    /// ```
    pub fn image_server(&self) -> Option<&'a str> {
        self.cache
            .inner()
            .config
            .image_server
            .as_ref()
            .map(url::Url::as_str)
    }

    /// `url` as the cache shows it, fit for a log or a terminal: without user name, password
    /// or fragment, and with the values of the query parameters that sign it (see
    /// [`CacheBuilder::ignore_query_params`](crate::CacheBuilder::ignore_query_params)) redacted. Text that is not a URL comes back with
    /// anything that looks like user-info removed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let url = "https://reader:s3cret@bucket.example/ct/0042.nii.gz?X-Amz-Signature=abc123";
    /// assert_eq!(
    ///     cache.admin().redacted(url),
    ///     "https://bucket.example/ct/0042.nii.gz?X-Amz-Signature=REDACTED"
    /// );
    /// # Ok(()) }
    /// ```
    pub fn redacted(&self, url: impl AsRef<str>) -> String {
        self.cache
            .inner()
            .config
            .url_policy
            .redact_text(url.as_ref())
    }

    /// Every committed entry, most recently used first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// for entry in cache.admin().entries() {
    ///     println!("{:>12} bytes  {} hits  {}", entry.size, entry.hits, entry.url);
    /// }
    /// let total: u64 = cache.admin().entries().iter().map(|e| e.size).sum();
    /// assert_eq!(total, cache.stats().current_size_bytes);
    /// # Ok(()) }
    /// ```
    pub fn entries(&self) -> Vec<EntryInfo> {
        let mut all = self.cache.inner().index.entries();
        all.sort_by_key(|e| std::cmp::Reverse(e.lru()));
        all.iter().map(|e| entry_info(e)).collect()
    }

    /// The entry of `url`, fresh or expired, if there is one (what
    /// [`invalidate`](ImageCache::invalidate) would remove).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// assert!(cache.admin().entry("http://images.example.org/ct/1.nii.gz")?.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidUrl`](crate::ErrorKind::InvalidUrl).
    pub fn entry(&self, url: impl AsRef<str>) -> crate::Result<Option<EntryInfo>> {
        let inner = self.cache.inner();
        let key = inner.resolver.resolve(url.as_ref())?.key.clone();
        Ok(inner
            .index
            .entries()
            .iter()
            .find(|e| e.key == key)
            .map(|e| entry_info(e)))
    }

    /// What [`cleanup`](ImageCache::cleanup) would remove now, removing nothing: the expired
    /// entries nobody holds, then the least recently used until the total fits the cap. The
    /// cleanup itself may spare some (one another process holds or has just renewed) and
    /// then evict others in their place to reach the cap.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let preview = cache.admin().cleanup_preview();
    /// let bytes: u64 = preview.expired.iter().chain(&preview.evicted).map(|e| e.size).sum();
    /// println!("cleanup would free {bytes} bytes");
    /// assert!(preview.expired.is_empty() && preview.evicted.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn cleanup_preview(&self) -> CleanupPreview {
        let inner = self.cache.inner();
        let mut preview = CleanupPreview::default();
        for (entry, reason) in inner.index.sweep_plan(inner.config.now_ms(), false) {
            match reason {
                Reason::Expired => preview.expired.push(entry_info(&entry)),
                _ => preview.evicted.push(entry_info(&entry)),
            }
        }
        preview
    }

    /// Re-hashes the file of `url` and compares it with the recorded SHA-256. A corrupt entry
    /// is removed and counted as an integrity failure.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// use imgcache::Verification;
    ///
    /// let url = "http://images.example:8042/data/ct/0042.nii.gz";
    /// match cache.admin().verify(url).await? {
    ///     Verification::Ok => println!("intact"),
    ///     Verification::Corrupt => println!("corrupt: removed, the next get downloads it again"),
    ///     _ => println!("not cached"),
    /// }
    /// assert_eq!(cache.admin().verify(url).await?, Verification::NotCached);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidUrl`].
    pub async fn verify(self, url: impl AsRef<str>) -> Result<Verification> {
        let inner = self.cache.inner();
        let resolved = inner.resolver.resolve(url.as_ref())?;
        Ok(inner.verify_key(&resolved.key).await)
    }

    /// [`verify`](Self::verify) for every entry, one at a time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let report = cache.admin().verify_all().await?;
    /// println!("{} files checked", report.checked);
    /// for url in &report.corrupt {
    ///     eprintln!("corrupt, removed: {url}");
    /// }
    /// assert!(report.corrupt.is_empty());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// None today; the `Result` leaves room for I/O errors to be reported.
    pub async fn verify_all(self) -> Result<VerifyReport> {
        let inner = self.cache.inner();
        let mut report = VerifyReport::default();
        for entry in inner.index.entries() {
            match inner.verify_key(&entry.key).await {
                Verification::Ok => report.checked += 1,
                Verification::Corrupt => {
                    report.checked += 1;
                    report.corrupt.push(entry.meta.url.clone());
                }
                Verification::NotCached => {}
            }
        }
        Ok(report)
    }

    /// Sets every counter to zero.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// # let _ = cache.get_cached("http://images.example/ct/0042.nii.gz");
    /// cache.admin().reset_stats();
    /// let stats = cache.stats();
    /// assert_eq!((stats.hits, stats.misses, stats.total_downloads), (0, 0, 0));
    /// # Ok(()) }
    /// ```
    pub fn reset_stats(&self) {
        self.cache.inner().reset_all_counters();
    }

    /// [`ImageCache::stats`] with what every other process on the directory counted up to
    /// now: their records are read first (a read of `procs/` on the blocking pool).
    /// `stats()` itself uses what the last periodic reading found (every
    /// `state_save_interval`), so that it never touches the disk.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let stats = cache.admin().stats_now().await;
    /// assert_eq!(stats.total_downloads, 0);
    /// # Ok(()) }
    /// ```
    pub async fn stats_now(self) -> crate::Stats {
        let inner = std::sync::Arc::clone(self.cache.inner());
        let _ = tokio::task::spawn_blocking(move || inner.read_others()).await;
        self.cache.stats()
    }

    /// Stops every download running in this process, for a process that is about to end
    /// and should not wait for them (an interpreter at exit, a second Ctrl-C): each keeps
    /// its part file, everything written made durable, and its URL's lock record names it,
    /// so that the next process to ask for the URL resumes with `Range` where this one
    /// stopped, as after a crash. Their callers get an error. Downloads started later run as
    /// usual (and keep their part file too if stopped). Returns how many were stopped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// // At the end of a program that must not wait for downloads nobody needs any more:
    /// cache.admin().stop_downloads();
    /// cache.shutdown().await; // saves what it knows; nothing left to wait for
    /// # Ok(()) }
    /// ```
    pub fn stop_downloads(&self) -> usize {
        let inner = self.cache.inner();
        inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let stopped = inner.inflight.abort_all();
        if stopped > 0 {
            tracing::info!(
                downloads = stopped,
                "downloads stopped; their part files are kept for a resume"
            );
        }
        stopped
    }

    /// Changes the size cap at run time and evicts at once to honour it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// use imgcache::{ErrorKind, MB};
    ///
    /// cache.admin().set_max_size_bytes(512 * MB)?; // evicts down to 512 MB at once
    /// assert_eq!(cache.stats().max_size_bytes, 512 * MB);
    /// assert_eq!(cache.admin().set_max_size_bytes(0).unwrap_err().kind(), ErrorKind::Config);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for zero.
    pub fn set_max_size_bytes(&self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "the size cap must be greater than zero",
            ));
        }
        let inner = self.cache.inner();
        inner
            .index
            .set_max(bytes)
            .dispose_in_background_holding(Arc::clone(inner));
        inner.sweeper.wake();
        Ok(())
    }

    /// Changes the TTL given to entries downloaded from now on (existing entries keep the
    /// expiry recorded when they were downloaded; pass [`GetOptions::ttl`](crate::GetOptions::ttl) to demand
    /// fresher bytes for one call).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// use std::time::Duration;
    ///
    /// cache.admin().set_default_ttl(Duration::from_secs(6 * 3600))?;
    /// assert_eq!(cache.stats().default_ttl_hours, 6.0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for zero.
    pub fn set_default_ttl(&self, ttl: Duration) -> Result<()> {
        if ttl.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "the TTL must be greater than zero",
            ));
        }
        self.cache
            .inner()
            .default_ttl_ms
            .store(duration_ms(ttl), Ordering::Relaxed);
        Ok(())
    }
}

impl Inner {
    /// Re-hashes the current entry of `key` (blocking pool) against its recorded digest; a
    /// corrupt one is removed and counted.
    async fn verify_key(self: &Arc<Self>, key: &Key) -> Verification {
        let Some(entry) = self.index.pin_current(key) else {
            return Verification::NotCached;
        };
        let pinned = self.pinned(Arc::clone(&entry));
        match self.hold(&entry) {
            Holding::Held => {}
            Holding::Corrupt => return Verification::Corrupt,
            Holding::Changed => return Verification::NotCached,
        }
        let path = pinned.entry.path.clone();
        let layout = self.layout.clone();
        let hashed = tokio::task::spawn_blocking(move || layout.hash_file(&path)).await;
        let entry = Arc::clone(&pinned.entry);
        let intact = matches!(&hashed, Ok(Ok((sha, len))) if *sha == entry.meta.sha256 && *len == entry.meta.size);
        if intact {
            return Verification::Ok;
        }
        self.counters.add(Counter::IntegrityFailures, 1);
        tracing::warn!(url = %entry.meta.url, path = %entry.path.display(), "verification failed; entry removed");
        let removed = self.index.remove_exact(&entry, Reason::Corrupt);
        drop(pinned);
        removed.dispose_off_workers().await;
        Verification::Corrupt
    }
}
