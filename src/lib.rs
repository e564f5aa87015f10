//! A local disk cache for large remote files, such as NIfTI volumes on an image server: it
//! turns a URL into a local path, downloading each file once.
//!
//! # How data travels
//!
//! Each stage is a file of its own, named in the margin, and owns what it uses:
//!
//! ```text
//! get(url) ─> admission: open? resolve (remembered), hit?            cache/admit.rs
//!            resolve: key, request, redacted name                    cache/resolve.rs
//!            hit: lookup, touch LRU, pin, one stat ──hit──> CachedFile cache/hit.rs
//!                             │miss/expired
//!                             v
//!          in-flight map: join the running download or spawn one     cache/inflight.rs
//!          a Ticket per caller (one miss, one coalesced wait)        cache/admit.rs
//!          what the callers ask (digest, TTL, maximum age), the      cache/wants.rs
//!          progress streams read, the events' guard                  cache/announce.rs
//!                             v
//!          download task, a `Download` carrying what the callers     cache/download.rs
//!          asked: writer lock, another process's commit?, resume,
//!          revalidation, stale copy if the origin fails
//!          the tier (feature `s3`) before the origin                 cache/tier_read.rs
//!          a `Transfer` across attempts: temp file, hash, byte       cache/transfer.rs
//!          count, reservation under the cap, retries, Range
//!                             v
//!          fetch: reqwest stream, Accept-Encoding: identity, status  fetch.rs
//!          mapping, conditional and ranged requests, backoff
//!                             v
//!          store: temp file, SHA-256 and length while streaming,     store/
//!          fsync, install (a version's own directory, meta.json last)
//!                             v
//!          a `Commit` owning what it installs (temp file, meta.json, cache/commit.rs
//!          reservation, writer lock); a 304's renewal
//!          index insert (size accounting, LRU eviction)              index/
//!          the upload to the tier, in the background                 cache/tier_upload.rs
//!          ─> every ticket concludes with the same result            cache/admit.rs
//!
//! the shared state and the pin primitives (hold, let go)             cache/engine.rs, pin.rs
//! removals: a value that disposes of itself, counted and deleted     index/removals.rs,
//!                                                                    cache/removal.rs
//! sweeper (background task): expire, evict to the cap, save          cache/sweeper.rs
//! this process's record, the others', state.json                     cache/procs.rs, state.rs
//! start-up recovery: valid entries kept, the rest removed            store/recover.rs
//! counters (one table) and the Stats snapshot                        stats.rs
//! settings, their option types and the environment table             config/
//! the handle; the Admin and TierAdmin views                          cache/handle.rs,
//!                                                                    admin.rs, tier_admin.rs
//! streams of a file while it downloads                               cache/stream.rs
//! dashboard, JSON API, /metrics, /files (feature `server`)           server/
//! ```
//!
//! ## A cold `get`, file by file
//!
//! Each stage's file is entered once, top to bottom; the layers below the stages (`index/`,
//! `store/`, `fetch.rs`, the engine's pin in `cache/engine.rs`, this process's record in
//! `cache/state.rs`, the removals' disposal) are called from several stages and return at
//! once.
//!
//! 1. `cache/handle.rs`: [`ImageCache::get`] is `get_with` with default options.
//! 2. `cache/admit.rs`: the cache is open; the URL resolved (`cache/resolve.rs`); the hit
//!    path (`cache/hit.rs`) misses; the in-flight map (`cache/inflight.rs`) has no download
//!    of the key, so one is spawned with a new `Wants` (`cache/wants.rs`) and its
//!    `Announcement` (`cache/announce.rs`); the call holds a `Ticket` and waits.
//! 3. `cache/download.rs`, in the download's task: a `Download` takes the URL's writer lock,
//!    looks at the disk (`cache/state.rs` reads the key again), finds no part file to resume.
//! 4. `cache/tier_read.rs` (with a tier): no fresh copy; this host takes the lease.
//! 5. `cache/transfer.rs`: the `Transfer`'s attempts. The reservation takes the directory's cap lock and
//!    reads the other processes' records (`cache/state.rs`); `fetch.rs` sends the request;
//!    `store/writer.rs` writes, hashes and syncs on its own thread; the announcement says
//!    the download started.
//! 6. `cache/commit.rs`: the `Commit`, on the blocking pool: meta.json, then `index/` and
//!    `store/` install the version together; the announcement says it finished.
//! 7. `cache/tier_upload.rs` (with a tier): the upload, in the background.
//! 8. Back in `cache/admit.rs`: each ticket concludes with the result, its status and its
//!    caller's digest, counting one miss.
//!
//! On disk (`<cache_dir>/v1/...`): `entries/<k[0..2]>/<key>/<gen>/<file name>` holds the bytes
//! of one version, `entries/<k[0..2]>/<key>/meta.json` the current version's URL, SHA-256,
//! size, mtime, validators and expiry;
//! `tmp/` holds downloads in progress; `state.json` access times and counters. `key` is the hex
//! SHA-256 of the normalised URL (credentials and fragment removed). Files are created 0600 and
//! directories 0700 unless [`CacheBuilder::file_mode`] says otherwise.
//!
//! # Several processes
//!
//! Any number of processes and handles share a cache directory (unless one asks for it alone
//! with [`CacheBuilder::exclusive_lock`]). A download takes its URL's writer lock
//! (`locks/<k[0..2]>/<key>.lock`) and reads the disk again first, so one process in all
//! downloads a file and the others find it committed; a process that dies is replaced at once
//! and its part file resumed. A file handed out is held by a shared `flock` on its data file
//! while any [`CachedFile`] of it lives in the process, and no process deletes a file it cannot
//! lock exclusive. Counters, reservations and access times go through one record per process
//! (`procs/`), folded into `state.json` when the process ends. The README's "Several
//! processes" says what holds on local disks and what on network file systems.
//!
//! # Quick start
//!
//! ```no_run
//! # async fn demo() -> imgcache::Result<()> {
//! let cache = imgcache::ImageCache::builder()
//!     .cache_dir("/tmp/volumes")
//!     .image_server("http://images.example:8042/data/")
//!     .build()
//!     .await?;
//! let file = cache.get("ct/0042.nii.gz").await?; // downloads once
//! println!("{} ({} bytes, sha256 {})", file.path().display(), file.size(), file.sha256());
//! let again = cache.get("ct/0042.nii.gz").await?; // a hit: no network, no re-hash
//! assert_eq!(again.path(), file.path());
//! println!("hit rate {:.0} %", cache.stats().hit_rate * 100.0);
//! cache.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # The handle and its views
//!
//! [`ImageCache`] has what an application calls, in the original design's words: `get`
//! (`get_file`), [`get_with`](ImageCache::get_with), [`get_cached`](ImageCache::get_cached),
//! the stream forms, [`refresh`](ImageCache::refresh) (`download_and_cache`),
//! [`invalidate`](ImageCache::invalidate), [`clear`](ImageCache::clear) (`clear_cache`),
//! [`cleanup`](ImageCache::cleanup), [`stats`](ImageCache::stats) (`get_stats`),
//! [`subscribe`](ImageCache::subscribe) and [`shutdown`](ImageCache::shutdown). What an
//! operator adds lives on two views: [`ImageCache::admin`] ([`Admin`]: the directory, entries
//! one by one, dry runs, integrity checks, counters, the cap and the TTL at run time) and
//! [`ImageCache::tier`] ([`TierAdmin`]: fleet-wide removals, waiting for uploads). The builder
//! groups the image server's client, timeouts and retries in [`NetworkOptions`]
//! ([`CacheBuilder::network`]) and the tier's settings in [`TierOptions`]
//! ([`CacheBuilder::tier`]).
//!
//! # Guarantees
//!
//! - A path handed to a caller holds complete bytes whose SHA-256 is recorded in its meta.json.
//!   Short bodies, bodies longer than `Content-Length`, non-2xx answers and digests that differ
//!   from [`GetOptions::expected_sha256`] commit nothing and leave no temp file.
//! - A crash at any instant loses at most downloads in progress and the access times since the
//!   last save. On start, temp files, bytes without meta, meta without bytes and unreadable
//!   meta are removed (each with a WARN) and the size total is recomputed.
//! - One download per URL at a time, however many tasks ask; errors reach every waiter and are
//!   never cached.
//! - Committed bytes stay under the size cap except while pinned entries hold them; a download
//!   reserves its `Content-Length` first; a file larger than the cap is
//!   [`ErrorKind::TooLarge`].
//!
//! # Cancel safety
//!
//! Every download runs in a task of its own, owned by the cache. Dropping the future of
//! [`ImageCache::get`] (a timeout, a client that disconnected) never cancels the download for
//! the other callers, and a download that nobody waits for any more still completes and is
//! cached. The in-flight slot is cleared on every exit path, a panic included.
//!
//! # Configuration from the environment
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `IMAGE_SERVER` | none | base URL for relative URLs |
//! | `CACHE_DIR` | `$XDG_CACHE_HOME/vista3d`, else `~/.cache/vista3d` | cache directory |
//! | `CACHE_MAX_SIZE_MB` | `1024` | size cap in MB (2^20 bytes) |
//! | `CACHE_DEFAULT_TTL_HOURS` | `24` | time to live of new entries (fractions allowed) |
//! | `CACHE_SWEEP_INTERVAL` | `60s` | background sweep period (`0s` disables) |
//! | `CACHE_STATE_SAVE_INTERVAL` | `5s` | longest time before changed access times and counters are saved |
//! | `CACHE_FILE_MODE` | `600` | permission bits of cached files (octal) |
//! | `CACHE_STALE_GRACE` | `7days` | expired entries kept for revalidation and stale fallback |
//! | `CACHE_STALE_IF_ERROR` | `1` | serve an expired copy when the origin fails |
//! | `CACHE_OFFLINE` | `0` | never touch the network |
//! | `CACHE_KEEP_NO_STORE` | `0` | keep answers marked `Cache-Control: no-store` (and `private`) |
//! | `CACHE_REFUSE_PRIVATE` | `0` (`1` for `imgcache serve`) | treat `private` as `no-store` |
//! | `CACHE_RETRIES` | `3` | retries of transient failures |
//! | `CACHE_RETRY_DELAY`, `CACHE_RETRY_MAX_DELAY` | `500ms`, `30s` | backoff bounds |
//! | `CACHE_OUTAGE_MEMORY` | `30s` | how long an origin that did not answer is not asked again |
//! | `CACHE_CONNECT_TIMEOUT`, `CACHE_READ_TIMEOUT` | `30s`, `12s` | connect and idle timeouts |
//! | `CACHE_DOWNLOAD_TIMEOUT` | none | total time of one download, retries included |
//! | `CACHE_MAX_FILE_SIZE_MB` | `16384` | largest file accepted |
//! | `CACHE_MAX_REDIRECTS` | `10` | redirects followed (never https to http) |
//! | `CACHE_CA_CERT` | none | extra CA certificates (PEM) |
//! | `CACHE_INSECURE_TLS` | `0` | accept any certificate (dangerous) |
//! | `CACHE_HTTP_HEADERS` | none | request headers, one `Name: value` a line, for the image server's origin only |
//! | `CACHE_BEARER_TOKEN` | none | `Authorization: Bearer` token for the image server's origin only |
//! | `CACHE_BEARER_TOKEN_FILE` | none | a file holding that token (a mounted secret) |
//! | `CACHE_IGNORE_QUERY_PARAMS` | [`DEFAULT_IGNORED_QUERY_PARAMS`] | query parameters left out of the key and redacted (`none` for none) |
//! | `CACHE_LOCK` | `shared` | `exclusive` to use the directory alone |
//! | `CACHE_LOCK_WAIT` | `3m` | longest wait for another process's download of the same file |
//! | `CACHE_SHARED_TIER` | none | `s3://bucket/prefix`: the fleet's tier (with the `AWS_*` variables; `s3` feature) |
//! | `CACHE_SHARED_LEASE` | `30s` | lease time of a host downloading for the fleet (renewed every quarter of it) |
//! | `CACHE_SHARED_WAIT` | `10m` | longest wait for another host's download before asking the origin |
//!
//! Read by [`CacheBuilder::from_env`], [`ImageCache::from_env`] and the process-wide functions
//! below; a `.env` file in the current directory supplies variables the environment lacks.
//!
//! # Process-wide cache
//!
//! The [`global`] module ([`get_cached_file`], [`clear_cache`] and [`get_cache_stats`], also at
//! the root) uses one cache built from the environment on first use, as the original design's
//! module-level functions did. It lives in the runtime that first used it.
//!
//! # Features
//!
//! - `s3` (default): the tier on S3-compatible object storage (`CACHE_SHARED_TIER`).
//! - `server`: `server::router`, the dashboard, JSON API, Prometheus metrics and the
//!   `/files` sidecar as an axum router.
//!
//! The default features pull in no command-line or server dependency: the `imgcache` binary
//! is the workspace's `imgcache-cli` package (`cli/`), which turns `server` on for itself.
//!
//! The crash tests' abort points are not a feature (a dependent crate could switch a feature
//! on for everyone): they need `--cfg imgcache_failpoints`, which `IMGCACHE_FAILPOINTS=1`
//! at build time sets.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
// On docs.rs (`--cfg docsrs`), items gated on a feature say which.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cache;
mod clock;
mod config;
mod digest;
mod error;
mod events;
mod failpoint;
mod fetch;
pub mod global;
mod index;
mod key;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;
mod stats;
mod store;
#[cfg(feature = "s3")]
mod tier;

pub use cache::{
    Admin, CacheStatus, CachedFile, CleanupPreview, CleanupReport, EntryInfo, FileStream,
    GetOptions, ImageCache, OnProgress, TierAdmin, Verification, VerifyReport,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    CacheBuilder, DEFAULT_FILE_MODE, DEFAULT_LOCK_WAIT, DEFAULT_MAX_FILE_SIZE_BYTES,
    DEFAULT_MAX_SIZE_BYTES, DEFAULT_STALE_GRACE, DEFAULT_STATE_SAVE_INTERVAL,
    DEFAULT_SWEEP_INTERVAL, DEFAULT_TTL, NetworkOptions, TierOptions,
};
pub use error::{Error, ErrorKind, Result};
pub use events::{Event, Received, Subscription};
pub use key::DEFAULT_IGNORED_QUERY_PARAMS;
pub use stats::{CounterInfo, MB, Stats};

// The original design's module-level names, at the root where its users look for them.
pub use global::{clear_cache, default_cache, get_cache_stats, get_cached_file};

#[cfg(test)]
mod send_sync {
    use super::*;

    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}

    #[allow(dead_code)]
    fn handles_and_futures_are_send_and_sync(cache: ImageCache, file: CachedFile) {
        assert_send_sync(&cache);
        assert_send_sync(&file);
        assert_send_sync(&cache.stats());
        assert_send_sync(&Error::new(ErrorKind::Io, ""));
        assert_send(&cache.get("x"));
        assert_send(&cache.get_with("x", GetOptions::new()));
        assert_send(&cache.refresh("x"));
        assert_send(&cache.invalidate("x"));
        assert_send(&cache.clear());
        assert_send(&cache.cleanup());
        // A view's futures borrow the cache, not the view: they can be kept and awaited later.
        let verify_all = cache.admin().verify_all();
        let flush = cache.tier().flush();
        assert_send(&verify_all);
        assert_send(&flush);
        assert_send(&cache.shutdown());
        let mut events = cache.subscribe();
        assert_send(&events.recv());
        assert_send_sync(&events);
        assert_send(&get_cached_file("x"));
    }
}

/// The README's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
