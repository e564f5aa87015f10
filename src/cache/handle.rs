//! The handle's figures and removals, as an application calls them: `stats` (the original
//! design's `get_stats`), `subscribe`, `invalidate`, `clear` (`clear_cache`) and `cleanup`.

use std::sync::atomic::Ordering;

use super::{CleanupReport, ImageCache};
use crate::error::Result;
use crate::events::Subscription;
use crate::index::Reason;
use crate::stats::{Gauges, Stats};

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

    /// Expires entries past their TTL and evicts to honour the cap, now. The background
    /// sweeper does the same periodically.
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
        let (removed, _) = inner.sweep_now();
        let mut report = CleanupReport::default();
        for r in removed.iter() {
            match r.reason {
                Reason::Expired => report.expired += 1,
                Reason::Evicted => report.evicted += 1,
                _ => continue,
            }
            report.bytes_freed += r.entry.meta.size;
        }
        removed.dispose_off_workers().await;
        inner.save_state_blocking().await;
        Ok(report)
    }
}
