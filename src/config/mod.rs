//! [`CacheBuilder`]: every setting, its default, and the environment variables that set it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::fetch::{self, ClientSettings};
#[cfg(doc)]
use crate::key::DEFAULT_IGNORED_QUERY_PARAMS;
use crate::key::{self, UrlPolicy};
use crate::stats::MB;

mod env;
mod http;
mod network;
mod tier;

#[cfg(test)]
use env::{ENVIRONMENT, read_dotenv};
pub use network::NetworkOptions;
pub use tier::TierOptions;
/// Default size cap: 1024 MB.
pub const DEFAULT_MAX_SIZE_BYTES: u64 = 1024 * MB;
/// Default time to live: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default interval of the background sweep.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Default longest time between a hit and the saving of its access time: 5 seconds.
pub const DEFAULT_STATE_SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// Default permission bits of cached files.
pub const DEFAULT_FILE_MODE: u32 = 0o600;
/// Default time expired entries are kept for revalidation and stale fallback: 7 days.
pub const DEFAULT_STALE_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default longest wait for another process's download of the same file: 3 minutes.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(180);
/// Default largest file accepted: 16 GiB (the size cap applies too).
pub const DEFAULT_MAX_FILE_SIZE_BYTES: u64 = 16 * 1024 * MB;

/// Builds an [`ImageCache`](crate::ImageCache). Every setter documents its default; [`build`](Self::build)
/// validates them and never panics.
#[must_use = "a builder does nothing until .build().await"]
#[derive(Clone)]
pub struct CacheBuilder {
    cache_dir: Option<PathBuf>,
    max_size_bytes: u64,
    default_ttl: Duration,
    image_server: Option<String>,
    network: NetworkOptions,
    sweep_interval: Duration,
    sweep_on_open: bool,
    state_save_interval: Duration,
    file_mode: u32,
    max_file_size_bytes: u64,
    stale_grace: Duration,
    stale_if_error: bool,
    offline: bool,
    ignore_query_params: Option<Vec<String>>,
    exclusive_lock: bool,
    lock_wait: Duration,
    tier: TierOptions,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("cache_dir", &self.cache_dir)
            .field("max_size_bytes", &self.max_size_bytes)
            .field("default_ttl", &self.default_ttl)
            .field(
                "image_server",
                &self
                    .image_server
                    .as_deref()
                    .map(|s| self.url_policy().redact_text(s)),
            )
            .field("sweep_interval", &self.sweep_interval)
            .field("sweep_on_open", &self.sweep_on_open)
            .field("state_save_interval", &self.state_save_interval)
            .field("file_mode", &format_args!("{:o}", self.file_mode))
            .field("max_file_size_bytes", &self.max_file_size_bytes)
            .field("stale_grace", &self.stale_grace)
            .field("stale_if_error", &self.stale_if_error)
            .field("offline", &self.offline)
            .field("ignore_query_params", &self.ignore_query_params)
            .field("exclusive_lock", &self.exclusive_lock)
            .field("lock_wait", &self.lock_wait)
            .field("network", &self.network)
            .field("tier", &self.tier)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            cache_dir: None,
            max_size_bytes: DEFAULT_MAX_SIZE_BYTES,
            default_ttl: DEFAULT_TTL,
            image_server: None,
            network: NetworkOptions::default(),
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            sweep_on_open: true,
            state_save_interval: DEFAULT_STATE_SAVE_INTERVAL,
            file_mode: DEFAULT_FILE_MODE,
            max_file_size_bytes: DEFAULT_MAX_FILE_SIZE_BYTES,
            stale_grace: DEFAULT_STALE_GRACE,
            stale_if_error: true,
            offline: false,
            ignore_query_params: None,
            exclusive_lock: false,
            lock_wait: DEFAULT_LOCK_WAIT,
            tier: TierOptions::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The validated configuration an [`ImageCache`](crate::ImageCache) runs with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) cache_dir: PathBuf,
    pub(crate) max_size_bytes: u64,
    pub(crate) default_ttl: Duration,
    pub(crate) image_server: Option<Url>,
    pub(crate) http: fetch::Http,
    pub(crate) sweep_interval: Duration,
    pub(crate) sweep_on_open: bool,
    pub(crate) state_save_interval: Duration,
    pub(crate) file_mode: u32,
    pub(crate) dir_mode: u32,
    pub(crate) download_timeout: Option<Duration>,
    pub(crate) retries: u32,
    pub(crate) retry_base_delay: Duration,
    pub(crate) retry_max_delay: Duration,
    pub(crate) outage_memory: Duration,
    pub(crate) max_file_size_bytes: u64,
    pub(crate) stale_grace: Duration,
    pub(crate) stale_if_error: bool,
    /// Answers marked `no-store` (and `private`) kept all the same.
    pub(crate) keep_no_store: bool,
    /// `private` read as `no-store` (a cache that answers many clients).
    pub(crate) refuse_private: bool,
    pub(crate) offline: bool,
    pub(crate) url_policy: UrlPolicy,
    pub(crate) exclusive_lock: bool,
    pub(crate) lock_wait: Duration,
    pub(crate) tier: TierOptions,
    pub(crate) clock: Arc<dyn Clock>,
}

impl CacheBuilder {
    /// A builder with every default.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::CacheBuilder;
    ///
    /// let cache = CacheBuilder::new().cache_dir(dir.path()).build().await?;
    /// assert_eq!(cache.stats().max_size_bytes, imgcache::DEFAULT_MAX_SIZE_BYTES);
    /// # Ok(()) }
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Directory of the cache. Default: `$XDG_CACHE_HOME/vista3d`, else `~/.cache/vista3d`
    /// (env `CACHE_DIR`). Created with mode 0700 if missing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let volumes = dir.path().join("volumes"); // created at build
    /// let cache = imgcache::ImageCache::builder().cache_dir(&volumes).build().await?;
    /// assert_eq!(cache.admin().cache_dir(), volumes);
    /// assert!(volumes.is_dir());
    /// # Ok(()) }
    /// ```
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Size cap in bytes for committed files. Default 1024 MB (env `CACHE_MAX_SIZE_MB`).
    /// Least recently used entries are evicted to stay under it; a larger file is refused
    /// with [`ErrorKind::TooLarge`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::MB;
    ///
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .max_size_bytes(200 * 1024 * MB) // 200 GiB
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.stats().max_size_mb, 200.0 * 1024.0);
    /// # Ok(()) }
    /// ```
    pub fn max_size_bytes(mut self, bytes: u64) -> Self {
        self.max_size_bytes = bytes;
        self
    }

    /// Time to live of new entries. Default 24 hours (env `CACHE_DEFAULT_TTL_HOURS`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use std::time::Duration;
    ///
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .default_ttl(Duration::from_secs(7 * 24 * 3600)) // volumes change rarely
    ///     .build()
    ///     .await?;
    /// assert_eq!(cache.stats().default_ttl_hours, 168.0);
    /// # Ok(()) }
    /// ```
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Base URL that relative URLs are resolved against, such as `http://images:8042/data/`
    /// (env `IMAGE_SERVER`). Default: none, so only absolute URLs are accepted. A relative URL
    /// may not resolve outside this path.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::ErrorKind;
    ///
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .image_server("http://images.example:8042/data/")
    ///     .build()
    ///     .await?;
    /// // cache.get("ct/0042.nii.gz") fetches http://images.example:8042/data/ct/0042.nii.gz;
    /// // a path that climbs out of /data/ is refused before any request.
    /// let err = cache.get("../admin/config.json").await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::InvalidUrl);
    /// # Ok(()) }
    /// ```
    pub fn image_server(mut self, url: impl Into<String>) -> Self {
        self.image_server = Some(url.into());
        self
    }

    /// How often the background sweeper expires entries, enforces the cap and saves access
    /// times. Default 60 s (env `CACHE_SWEEP_INTERVAL`, e.g. `30s`); zero disables the
    /// background task ([`ImageCache::cleanup`](crate::ImageCache::cleanup) still works).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use std::time::Duration;
    ///
    /// // No background task: this program sweeps when it wants to.
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .sweep_interval(Duration::ZERO)
    ///     .build()
    ///     .await?;
    /// let report = cache.cleanup().await?;
    /// println!("{} expired, {} evicted", report.expired, report.evicted);
    /// # Ok(()) }
    /// ```
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// Whether [`build`](Self::build) expires and evicts at once (the cap may have been
    /// lowered since the last run). Default `true`. A tool that only looks (a dry run of
    /// what a cleanup would remove) opens with `false`; downloads still make room for
    /// themselves under the cap.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .max_size_bytes(1 << 20)
    ///     .sweep_on_open(false)
    ///     .build()
    ///     .await?;
    /// println!("{} entries would go", cache.admin().cleanup_preview().evicted.len());
    /// # Ok(()) }
    /// ```
    pub fn sweep_on_open(mut self, sweep: bool) -> Self {
        self.sweep_on_open = sweep;
        self
    }

    /// How soon access times, hits and counters that changed are saved to state.json, so that
    /// a crash loses at most this much of them. Default 5 s (env `CACHE_STATE_SAVE_INTERVAL`);
    /// zero saves only at [`shutdown`](crate::ImageCache::shutdown), when the cache is dropped
    /// and at each sweep. Saving writes one small file, and only when something changed.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // A busy cache on a slow disk: write state.json at most once a minute.
    /// let builder = imgcache::ImageCache::builder().state_save_interval(Duration::from_secs(60));
    /// ```
    pub fn state_save_interval(mut self, every: Duration) -> Self {
        self.state_save_interval = every;
        self
    }

    /// Permission bits of cached files. Default `0o600` (env `CACHE_FILE_MODE`, octal);
    /// directories get the same bits plus search permission (`0o600` gives `0o700`).
    /// Use `0o640` for a cache a group reads.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use std::os::unix::fs::PermissionsExt;
    ///
    /// let shared = dir.path().join("shared");
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(&shared)
    ///     .file_mode(0o640) // the group reads the volumes
    ///     .build()
    ///     .await?;
    /// let mode = std::fs::metadata(&shared)?.permissions().mode();
    /// assert_eq!(mode & 0o777, 0o750);
    /// # Ok(()) }
    /// ```
    pub fn file_mode(mut self, mode: u32) -> Self {
        self.file_mode = mode;
        self
    }

    /// Largest file accepted, so that an origin that sends without end cannot fill the disk.
    /// Default 16 GiB (env `CACHE_MAX_FILE_SIZE_MB`); the size cap limits files too.
    ///
    /// ```
    /// use imgcache::MB;
    ///
    /// // Nothing this service caches is over 4 GiB: anything bigger is a misbehaving origin.
    /// let builder = imgcache::ImageCache::builder().max_file_size_bytes(4 * 1024 * MB);
    /// ```
    pub fn max_file_size_bytes(mut self, bytes: u64) -> Self {
        self.max_file_size_bytes = bytes;
        self
    }

    /// How long expired entries are kept so that they can be revalidated (a conditional GET;
    /// 304 renews them without a download) or served when the origin fails. Default 7 days
    /// (env `CACHE_STALE_GRACE`). Space pressure evicts expired entries first.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // Keep expired volumes a month: an origin that is down for a weekend is survived.
    /// let builder = imgcache::ImageCache::builder()
    ///     .stale_grace(Duration::from_secs(30 * 24 * 3600));
    /// ```
    pub fn stale_grace(mut self, grace: Duration) -> Self {
        self.stale_grace = grace;
        self
    }

    /// Serve an expired copy, with a WARN, when the origin cannot be reached or answers 5xx.
    /// Default on (env `CACHE_STALE_IF_ERROR=0` turns it off).
    ///
    /// ```
    /// // Results must come from the current version: fail rather than serve an expired one.
    /// let builder = imgcache::ImageCache::builder().stale_if_error(false);
    /// ```
    pub fn stale_if_error(mut self, on: bool) -> Self {
        self.stale_if_error = on;
        self
    }

    /// Never touch the network: serve cached entries, fresh or expired, and fail a miss with
    /// [`ErrorKind::NotCached`]. Default off (env `CACHE_OFFLINE=1`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::ErrorKind;
    ///
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .offline(true)
    ///     .build()
    ///     .await?;
    /// let err = cache.get("http://images.example/ct/0042.nii.gz").await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::NotCached);
    /// # Ok(()) }
    /// ```
    pub fn offline(mut self, on: bool) -> Self {
        self.offline = on;
        self
    }

    /// Query parameters that sign a URL rather than name a file: left out of the cache key,
    /// so that a presigned URL signed again hits the same entry, and shown as `REDACTED` in
    /// meta.json, logs, events, errors, the dashboard and the API (they are still sent to the
    /// origin). Compared without case. Default [`DEFAULT_IGNORED_QUERY_PARAMS`]
    /// (env `CACHE_IGNORE_QUERY_PARAMS`, a comma-separated list; `none` for no parameter).
    /// Credentials in a URL's user-info are never part of a key nor shown, whatever this says.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .ignore_query_params(["token", "expires"])
    ///     .build()
    ///     .await?;
    /// let url = "https://images.example/ct/0042.nii.gz?token=abc123&series=2";
    /// assert_eq!(
    ///     cache.admin().redacted(url),
    ///     "https://images.example/ct/0042.nii.gz?token=REDACTED&series=2"
    /// );
    /// # Ok(()) }
    /// ```
    pub fn ignore_query_params<S: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = S>,
    ) -> Self {
        self.ignore_query_params = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Use the cache directory alone: opening it fails with [`ErrorKind::Locked`] while any
    /// other handle, in this process or another, has it open, and opening it elsewhere fails
    /// while this one does. Default off: any number of processes and handles share a
    /// directory (env `CACHE_LOCK=exclusive`, or `shared`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::{ErrorKind, ImageCache};
    ///
    /// let cache = ImageCache::builder().cache_dir(dir.path()).exclusive_lock(true).build().await?;
    /// let other = ImageCache::builder().cache_dir(dir.path()).build().await;
    /// assert_eq!(other.unwrap_err().kind(), ErrorKind::Locked);
    /// # Ok(()) }
    /// ```
    pub fn exclusive_lock(mut self, on: bool) -> Self {
        self.exclusive_lock = on;
        self
    }

    /// How long a download waits for another process that is downloading the same file
    /// before downloading it too (the first to commit wins). Default 3 minutes (env
    /// `CACHE_LOCK_WAIT`). A process that dies lets the waiters go at once, whatever this
    /// says: the kernel drops its locks.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // Workers on one host share the cache; a stuck worker delays the others 30 s at most.
    /// let builder = imgcache::ImageCache::builder().lock_wait(Duration::from_secs(30));
    /// ```
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    fn url_policy(&self) -> UrlPolicy {
        match &self.ignore_query_params {
            Some(names) => UrlPolicy::ignoring(names),
            None => UrlPolicy::default(),
        }
    }

    /// The clock used for expiry. Default: the system clock. Tests pass a
    /// [`ManualClock`](crate::ManualClock) and advance it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use imgcache::ManualClock;
    ///
    /// let clock = Arc::new(ManualClock::new());
    /// let cache = imgcache::ImageCache::builder()
    ///     .cache_dir(dir.path())
    ///     .clock(clock.clone())
    ///     .build()
    ///     .await?;
    /// // A test jumps past the default TTL instead of sleeping a day.
    /// clock.advance(Duration::from_secs(25 * 3600));
    /// let report = cache.cleanup().await?;
    /// assert_eq!(report.expired, 0); // nothing was cached to expire
    /// # Ok(()) }
    /// ```
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub(crate) fn into_config(self) -> Result<Config> {
        let url_policy = self.url_policy();
        let cache_dir = match self.cache_dir {
            Some(dir) => dir,
            None => default_cache_dir()?,
        };
        if cache_dir.as_os_str().is_empty() {
            return Err(Error::new(ErrorKind::Config, "CACHE_DIR is empty"));
        }
        if self.max_size_bytes == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "the size cap (CACHE_MAX_SIZE_MB) must be greater than zero",
            ));
        }
        if self.default_ttl.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "the TTL (CACHE_DEFAULT_TTL_HOURS) must be greater than zero",
            ));
        }
        if self.file_mode > 0o777 || self.file_mode & 0o600 != 0o600 {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "file mode {:o} must be at most 777 and let the owner read and write",
                    self.file_mode
                ),
            ));
        }
        let image_server = self
            .image_server
            .as_deref()
            .map(key::normalise_base)
            .transpose()?;
        if self.max_file_size_bytes == 0 {
            return Err(Error::new(
                ErrorKind::Config,
                "the largest file size (CACHE_MAX_FILE_SIZE_MB) must be greater than zero",
            ));
        }
        let client = match self.network.http_client.clone() {
            Some(client) => client,
            None => fetch::default_client(
                &ClientSettings {
                    connect: self.network.connect_timeout,
                    read: self.network.read_timeout,
                    ca_certificate: self.network.ca_certificate.as_deref(),
                    insecure: self.network.insecure_tls,
                },
                self.network.customize_client.as_ref(),
            )?,
        };
        let headers = if self.network.http_headers.is_empty() {
            None
        } else {
            if self.network.http_client.is_some() {
                // A client given whole may follow redirects itself, headers and all: the
                // cache could only notice once they had reached another host.
                return Err(Error::new(
                    ErrorKind::Config,
                    "request headers (CACHE_HTTP_HEADERS, CACHE_BEARER_TOKEN) cannot go with a \
                     client given by http_client, which may follow redirects itself: use \
                     http_client_with, which keeps them on the image server's origin",
                ));
            }
            let Some(server) = &image_server else {
                return Err(Error::new(
                    ErrorKind::Config,
                    "request headers (CACHE_HTTP_HEADERS, CACHE_BEARER_TOKEN) need an image \
                     server (IMAGE_SERVER): they are sent to its origin only",
                ));
            };
            Some((server.origin(), self.network.http_headers.build()?))
        };
        let http = fetch::Http {
            client,
            headers,
            max_redirects: self.network.max_redirects,
        };
        // Search permission wherever read permission is granted.
        let dir_mode = self.file_mode | ((self.file_mode & 0o444) >> 2);
        Ok(Config {
            url_policy,
            cache_dir,
            max_size_bytes: self.max_size_bytes,
            default_ttl: self.default_ttl,
            image_server,
            http,
            sweep_interval: self.sweep_interval,
            sweep_on_open: self.sweep_on_open,
            state_save_interval: self.state_save_interval,
            file_mode: self.file_mode,
            dir_mode,
            download_timeout: self.network.download_timeout,
            retries: self.network.retries,
            retry_base_delay: self.network.retry_base_delay,
            retry_max_delay: self.network.retry_max_delay,
            outage_memory: self.network.outage_memory,
            max_file_size_bytes: self.max_file_size_bytes,
            stale_grace: self.stale_grace,
            stale_if_error: self.stale_if_error,
            keep_no_store: self.network.keep_no_store,
            refuse_private: self.network.refuse_private,
            offline: self.offline,
            exclusive_lock: self.exclusive_lock,
            lock_wait: self.lock_wait,
            tier: self.tier,
            clock: self.clock,
        })
    }
}

/// `$XDG_CACHE_HOME/vista3d`, else `$HOME/.cache/vista3d`.
pub(crate) fn default_cache_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        let xdg = PathBuf::from(xdg);
        if xdg.is_absolute() {
            return Ok(xdg.join("vista3d"));
        }
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("vista3d")),
        None => Err(Error::new(
            ErrorKind::Config,
            "no CACHE_DIR given and neither XDG_CACHE_HOME nor HOME is set",
        )),
    }
}

#[cfg(test)]
mod tests;

impl Config {
    /// Now, by the cache's clock, in milliseconds since the epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        crate::clock::unix_ms(self.clock.now())
    }
}
