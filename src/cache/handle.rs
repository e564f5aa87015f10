//! [`ImageCache`]: the handle, what an application calls, in the original design's words:
//! `get` (`get_file`), its forms, `get_cached`, `refresh` (`download_and_cache`),
//! `invalidate`, `clear` (`clear_cache`), `cleanup`, `stats` (`get_stats`), `subscribe` and
//! `shutdown`. Each goes to the stage that does it; the operator's extras are on its views.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::engine::Inner;
use super::file::{CachedFile, CleanupReport, GetOptions};
use crate::config::CacheBuilder;
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::Result;
use crate::events::Subscription;
use crate::index::Reason;
use crate::stats::{Gauges, Stats};

/// The cache. Cheap to clone (one `Arc`): clone it into every task that needs it rather than
/// wrapping it in another `Arc`. When the last clone is dropped the background sweeper stops;
/// call [`shutdown`](Self::shutdown) to also wait for downloads and save state.
#[derive(Clone)]
pub struct ImageCache {
    pub(super) handle: Arc<Handle>,
}

/// Stops the sweeper when the last `ImageCache` clone goes. Download tasks and pinned files
/// hold `Inner` directly, so they finish normally.
pub(super) struct Handle {
    pub(super) inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.sweeper.cancel();
    }
}

impl CacheBuilder {
    /// Validates the settings, recovers the cache directory (off the async workers) and starts
    /// the background sweeper.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::{ErrorKind, ImageCache};
    ///
    /// let cache = ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// println!("{} entries recovered", cache.stats().entries_count);
    ///
    /// let err = ImageCache::builder().max_size_bytes(0).build().await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an invalid setting, [`ErrorKind::Locked`] when another process
    /// uses the directory, [`ErrorKind::Io`] when it cannot be created or read.
    ///
    /// # Panics
    /// When called outside a Tokio runtime.
    pub async fn build(self) -> Result<ImageCache> {
        let config = self.into_config()?;
        ImageCache::open(config).await
    }
}

impl fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.handle.inner;
        f.debug_struct("ImageCache")
            .field("cache_dir", &inner.config.cache_dir)
            .field("max_size_bytes", &inner.index.max())
            .field("entries", &inner.index.figures().entries)
            .finish()
    }
}

impl ImageCache {
    /// A builder with every default (see [`CacheBuilder`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .max_size_bytes(20 * 1024 * imgcache::MB)
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.stats().max_size_bytes, 20 * 1024 * imgcache::MB);
    /// # Ok(()) }
    /// ```
    pub fn builder() -> CacheBuilder {
        CacheBuilder::new()
    }

    /// A cache configured from the environment and `.env` (see [`CacheBuilder::from_env`]).
    ///
    /// ```no_run
    /// # async fn demo() -> imgcache::Result<()> {
    /// // CACHE_DIR=/var/cache/volumes IMAGE_SERVER=http://images:8042/data/ my-service
    /// let cache = imgcache::ImageCache::from_env().await?;
    /// println!("caching in {}", cache.admin().cache_dir().display());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`CacheBuilder::from_env`] and [`CacheBuilder::build`].
    pub async fn from_env() -> Result<ImageCache> {
        CacheBuilder::from_env()?.build().await
    }

    pub(super) fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }

    /// The local file for `url`, downloading it if it is missing or expired.
    ///
    /// `url` is absolute (`http://server/ct/0042.nii.gz`) or relative to the configured image
    /// server (`ct/0042.nii.gz`). Concurrent calls for one URL share one download.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// // Relative to the image server, or absolute ("http://images:8042/data/ct/0042.nii.gz").
    /// let file = cache.get("ct/0042.nii.gz").await?;
    /// println!("{} ({} bytes, {:?})", file.path().display(), file.size(), file.status());
    /// // While `file` lives, no eviction or invalidation deletes the bytes under the reader.
    /// let bytes = tokio::fs::read(&file).await?;
    /// assert_eq!(bytes.len() as u64, file.size());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidUrl`] for a URL that cannot be cached; for a failed download, the
    /// download's error ([`ErrorKind::HttpStatus`], [`ErrorKind::Network`],
    /// [`ErrorKind::Incomplete`], [`ErrorKind::TooLarge`], [`ErrorKind::StorageFull`], ...),
    /// the same for every caller that waited on it. Errors are not cached.
    ///
    /// # Cancel safety
    /// Cancel safe. The download runs in its own task: dropping this future (a timeout, a
    /// client that went away) does not stop it for other callers, and a download nobody
    /// waits for any more still completes and is cached.
    pub async fn get(&self, url: impl AsRef<str>) -> Result<CachedFile> {
        self.get_with(url, GetOptions::default()).await
    }

    /// [`get`](Self::get) with per-call options.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// use imgcache::{ErrorKind, GetOptions};
    ///
    /// let options = GetOptions::new()
    ///     .expected_sha256("5d41402abc4b2a76b9719d911017c592ae0e2d4d2f5b3f7a1c6c9e8e1d2b3c4d");
    /// match cache.get_with("ct/0042.nii.gz", options).await {
    ///     Ok(file) => println!("verified: {}", file.sha256()),
    ///     Err(e) if e.kind() == ErrorKind::ChecksumMismatch => eprintln!("wrong bytes: {e}"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get`](Self::get), and [`ErrorKind::ChecksumMismatch`] when
    /// [`GetOptions::expected_sha256`] does not match.
    ///
    /// # Cancel safety
    /// As [`get`](Self::get).
    pub async fn get_with(&self, url: impl AsRef<str>, options: GetOptions) -> Result<CachedFile> {
        let inner = self.inner();
        let (resolved, admitted) = inner.admit(url.as_ref(), &options)?;
        inner.settle(&resolved, &options, admitted).await
    }

    /// The cached file for `url` if a fresh, intact entry exists. Never touches the network.
    /// Counts a hit when it returns a file and nothing otherwise; `None` after [`shutdown`](Self::shutdown).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let url = "http://images.example:8042/data/ct/0042.nii.gz";
    /// match cache.get_cached(url) {
    ///     Some(file) => println!("cached at {}", file.path().display()),
    ///     None => println!("not cached: get() would download it"),
    /// }
    /// assert!(cache.get_cached(url).is_none()); // a new cache has nothing yet
    /// # Ok(()) }
    /// ```
    pub fn get_cached(&self, url: impl AsRef<str>) -> Option<CachedFile> {
        self.get_cached_with(url, &GetOptions::default())
    }

    /// [`get_cached`](Self::get_cached) with the options [`get_with`](Self::get_with) takes:
    /// [`GetOptions::ttl`] is the oldest an entry may be, [`GetOptions::expected_sha256`] must
    /// match, and [`GetOptions::force`] makes it `None`. The synchronous half of `get_with`,
    /// for callers that try the hit path before they enter a runtime.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// use std::time::Duration;
    /// use imgcache::GetOptions;
    ///
    /// let options = GetOptions::new().ttl(Duration::from_secs(600));
    /// let file = match cache.get_cached_with("ct/0042.nii.gz", &options) {
    ///     Some(file) => file,
    ///     None => cache.get_with("ct/0042.nii.gz", options).await?,
    /// };
    /// # Ok(()) }
    /// ```
    pub fn get_cached_with(
        &self,
        url: impl AsRef<str>,
        options: &GetOptions,
    ) -> Option<CachedFile> {
        self.inner().admit_cached(url.as_ref(), options)
    }

    /// Downloads `url` again even if a fresh entry exists, and replaces the entry (what the
    /// original design's `download_and_cache` does when called directly). Joins a download
    /// already running.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// // The origin has a new version of the file: fetch it now, not when the TTL runs out.
    /// let file = cache.refresh("ct/0042.nii.gz").await?;
    /// println!("{:?}: sha256 {}", file.status(), file.sha256());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get`](Self::get); on error the old entry is kept.
    ///
    /// # Cancel safety
    /// As [`get`](Self::get).
    pub async fn refresh(&self, url: impl AsRef<str>) -> Result<CachedFile> {
        self.get_with(url, GetOptions::default().force(true)).await
    }

    /// The image server as a parsed URL (for the sidecar, which joins paths below it).
    #[cfg(feature = "server")]
    pub(crate) fn image_server_url(&self) -> Option<&url::Url> {
        self.inner().config.image_server.as_ref()
    }

    /// The time by the cache's clock (for the sidecar's `Age`).
    #[cfg(feature = "server")]
    pub(crate) fn now(&self) -> std::time::SystemTime {
        self.inner().config.clock.now()
    }

    /// What the origin says of `url` to a `HEAD`, through the cache's client and guards;
    /// nothing is downloaded or cached.
    #[cfg(feature = "server")]
    pub(crate) async fn head_origin(&self, url: &str) -> Result<crate::fetch::Head> {
        let inner = self.inner();
        inner.check_open()?;
        let resolved = inner.resolver.resolve(url)?;
        if inner.config.offline {
            return Err(crate::Error::new(
                crate::ErrorKind::NotCached,
                "offline mode and the file is not cached",
            )
            .with_url(&resolved.display));
        }
        let mut head = crate::fetch::head(&inner.config.http, &resolved.request)
            .await
            .map_err(|e| e.with_url(&resolved.display))?;
        head.file_name.clone_from(&resolved.file_name);
        Ok(head)
    }

    /// Stops the sweeper, waits for running downloads, and saves access times and counters.
    /// Later calls to `get` fail with [`ErrorKind::Shutdown`]; cached files stay readable.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// use imgcache::ErrorKind;
    ///
    /// cache.shutdown().await;
    /// let err = cache.get("http://images.example/ct/0042.nii.gz").await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Shutdown);
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    /// Not cancel safe in the sense that the cache is closed as soon as this is first polled.
    /// Dropping it early only skips the waiting; state is also saved when the cache is dropped.
    pub async fn shutdown(&self) {
        let inner = self.inner();
        inner.closed.store(true, Ordering::SeqCst);
        inner.sweeper.stop().await;
        // Saved before the wait too, so that a caller that stops waiting (a deadline on
        // shutdown, a second Ctrl-C) loses nothing that was already known.
        inner.save_state_blocking().await;
        for download in inner.inflight.running() {
            let _ = download.await;
        }
        if inner.stopping.load(Ordering::SeqCst) {
            // Stopped downloads: their writers keep their part files (a flush and an fsync
            // each), given a bounded moment. Uploads to the tier are left to the next
            // holder of their lease.
            let started = std::time::Instant::now();
            while inner.writers.load(Ordering::SeqCst) > 0
                && started.elapsed() < std::time::Duration::from_secs(5)
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        } else {
            inner.wait_for_uploads().await;
        }
        inner.save_state_blocking().await;
        tracing::info!("cache shut down");
    }
}

impl ImageCache {
    /// A snapshot of the figures (the original design's `get_stats`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let stats = cache.stats();
    /// println!(
    ///     "{} entries, {:.1} of {:.0} MB, hit rate {:.0} %",
    ///     stats.entries_count,
    ///     stats.current_size_mb,
    ///     stats.max_size_mb,
    ///     stats.hit_rate * 100.0
    /// );
    /// assert_eq!(stats.hits + stats.misses, 0);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> Stats {
        let inner = self.inner();
        let f = inner.index.figures();
        inner.counters.stats(
            &inner.procs.others(),
            Gauges {
                entries_count: f.entries,
                current_size_bytes: f.committed_bytes + f.doomed_bytes,
                max_size_bytes: inner.index.max(),
                reserved_bytes: f.reserved_bytes,
                pinned_entries: f.pinned,
                downloads_in_progress: inner.inflight.len() as u64,
                default_ttl_hours: inner.default_ttl_ms.load(Ordering::Relaxed) as f64
                    / 3_600_000.0,
                cache_dir: inner.config.cache_dir.display().to_string(),
                shared_tier: inner.tier_figures(),
                request_headers: inner.config.http.header_names(),
            },
        )
    }

    /// A stream of [`Event`](crate::Event)s: downloads starting, progressing, finishing or failing, hits,
    /// coalesced waits, evictions and expirations. A subscriber that falls behind loses the
    /// oldest events; it never slows the cache down.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> Result<(), Box<dyn std::error::Error>> {
    /// use imgcache::{Event, Received};
    ///
    /// let mut events = cache.subscribe();
    /// tokio::spawn(async move {
    ///     loop {
    ///         match events.recv().await {
    ///             Received::Event(Event::Progress { url, received, total: Some(total) }) => {
    ///                 println!("{url}: {received} of {total} bytes")
    ///             }
    ///             Received::Event(event) => println!("{event:?}"),
    ///             Received::Missed(n) => println!("({n} events dropped)"),
    ///             Received::Closed | _ => break,
    ///         }
    ///     }
    /// });
    /// cache.get("ct/0042.nii.gz").await?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self) -> Subscription {
        self.inner().events.subscribe()
    }

    /// Removes the entry for `url`. Returns whether there was one. A file a caller still holds
    /// is deleted when it is released.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let url = "http://images.example:8042/data/ct/0042.nii.gz";
    /// let removed = cache.invalidate(url).await?;
    /// assert!(!removed); // there was no entry to remove
    /// assert!(cache.get_cached(url).is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidUrl`](crate::ErrorKind::InvalidUrl).
    pub async fn invalidate(&self, url: impl AsRef<str>) -> Result<bool> {
        let inner = self.inner();
        let resolved = inner.resolver.resolve(url.as_ref())?;
        let removed = inner.index.remove(&resolved.key, Reason::Invalidated);
        let found = !removed.is_empty();
        removed.dispose_off_workers().await;
        Ok(found)
    }

    /// Removes every entry and returns how many there were. Files callers still hold are
    /// deleted when released. Counters are kept (see [`Admin::reset_stats`](crate::Admin::reset_stats)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let removed = cache.clear().await?;
    /// println!("removed {removed} entries");
    /// assert_eq!(cache.stats().entries_count, 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// None today; the `Result` leaves room for I/O errors to be reported.
    pub async fn clear(&self) -> Result<u64> {
        let inner = self.inner();
        let removed = inner.index.clear();
        let n = removed.len() as u64;
        removed.dispose_off_workers().await;
        tracing::info!(entries = n, "cache cleared");
        Ok(n)
    }

    /// Removes every entry past its TTL that nobody holds and evicts to honour the cap, now,
    /// over the whole directory (what other processes committed, reserved and let go is read
    /// first), and removes the writer-lock files of URLs that no longer have an entry. The
    /// background sweeper does the same periodically, except that it keeps an expired entry
    /// for the grace period ([`CacheBuilder::stale_grace`](crate::CacheBuilder::stale_grace)) as a stale copy for offline use and
    /// outages; an explicit cleanup, like the original design's, keeps none. Expired entries a
    /// caller holds are counted in [`CleanupReport::kept_in_use`] and go when it lets go.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let cache = imgcache::ImageCache::builder().cache_dir(dir.path()).build().await?;
    /// let report = cache.cleanup().await?;
    /// println!(
    ///     "{} expired, {} evicted, {} bytes freed",
    ///     report.expired, report.evicted, report.bytes_freed
    /// );
    /// assert_eq!(report, imgcache::CleanupReport::default()); // nothing to do in a new cache
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// None today; the `Result` leaves room for I/O errors to be reported.
    pub async fn cleanup(&self) -> Result<CleanupReport> {
        let inner = self.inner();
        // The whole directory's: what other processes committed, reserved and let go.
        let this = Arc::clone(inner);
        let _ = tokio::task::spawn_blocking(move || {
            this.read_others();
            this.sync_from_disk();
        })
        .await;
        // Every expired entry nobody holds, grace or not: what the caller asked for.
        let now = inner.config.now_ms();
        let (removed, _) = inner.index.sweep(now, false);
        let mut report = CleanupReport::default();
        for r in removed.iter() {
            match r.reason {
                Reason::Expired => report.expired += 1,
                Reason::Evicted => report.evicted += 1,
                _ => continue,
            }
            report.bytes_freed += r.entry.meta.size;
        }
        report.kept_in_use = inner.index.mark_kept_expired(now);
        removed.dispose_off_workers().await;
        let this = Arc::clone(inner);
        let _ = tokio::task::spawn_blocking(move || this.remove_idle_locks()).await;
        inner.save_state_blocking().await;
        Ok(report)
    }
}
