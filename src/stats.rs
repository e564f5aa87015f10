//! Counters observed at every step, and the [`Stats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Cumulative counters. Relaxed atomics: each is an independent tally read for display, and no
/// other memory is published through them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) coalesced_waits: AtomicU64,
    pub(crate) total_downloads: AtomicU64,
    pub(crate) bytes_downloaded: AtomicU64,
    pub(crate) bytes_served_from_cache: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) expirations: AtomicU64,
    pub(crate) integrity_failures: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) revalidations: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) resumes: AtomicU64,
}

/// The counters as saved in state.json.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub(crate) struct SavedCounters {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) coalesced_waits: u64,
    pub(crate) total_downloads: u64,
    pub(crate) bytes_downloaded: u64,
    pub(crate) bytes_served_from_cache: u64,
    pub(crate) evictions: u64,
    pub(crate) expirations: u64,
    pub(crate) integrity_failures: u64,
    pub(crate) errors: u64,
    pub(crate) revalidations: u64,
    pub(crate) stale_served: u64,
    pub(crate) retries: u64,
    pub(crate) resumes: u64,
}

macro_rules! each_counter {
    ($m:ident) => {
        $m!(
            hits,
            misses,
            coalesced_waits,
            total_downloads,
            bytes_downloaded,
            bytes_served_from_cache,
            evictions,
            expirations,
            integrity_failures,
            errors,
            revalidations,
            stale_served,
            retries,
            resumes
        )
    };
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn save(&self) -> SavedCounters {
        macro_rules! save {
            ($($f:ident),*) => { SavedCounters { $($f: self.$f.load(Relaxed)),* } };
        }
        each_counter!(save)
    }

    pub(crate) fn restore(&self, saved: &SavedCounters) {
        macro_rules! restore {
            ($($f:ident),*) => {{ $(self.$f.store(saved.$f, Relaxed);)* }};
        }
        each_counter!(restore);
    }

    pub(crate) fn reset(&self) {
        self.restore(&SavedCounters::default());
    }
}

/// A snapshot of the cache's figures, as [`ImageCache::stats`](crate::ImageCache::stats)
/// returns them. Counters are cumulative across restarts (saved in state.json) until
/// [`ImageCache::reset_stats`](crate::ImageCache::reset_stats).
///
/// The first five fields are the original design's `get_stats()`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// `hits / (hits + misses)`, from 0.0 to 1.0; 0.0 before any request.
    pub hit_rate: f64,
    /// Committed entries.
    pub entries_count: u64,
    /// Bytes of committed entries (and of removed entries still pinned), in MB (2^20 bytes).
    pub current_size_mb: f64,
    /// The size cap in MB (2^20 bytes).
    pub max_size_mb: f64,
    /// Downloads completed and committed.
    pub total_downloads: u64,

    /// Requests answered from a committed entry without touching the network.
    pub hits: u64,
    /// Requests that were not hits: each either downloaded or joined a running download.
    pub misses: u64,
    /// Misses that joined a download another request had started.
    pub coalesced_waits: u64,
    /// Body bytes received from origins.
    pub bytes_downloaded: u64,
    /// Bytes of the files handed out by hits.
    pub bytes_served_from_cache: u64,
    /// Entries removed to honour the size cap.
    pub evictions: u64,
    /// Entries removed because their TTL passed.
    pub expirations: u64,
    /// Files that failed the size-and-mtime check or a full verification.
    pub integrity_failures: u64,
    /// Failed downloads (each counted once, however many callers waited on it).
    pub errors: u64,
    /// Expired entries renewed by a 304 answer to a conditional GET, without a download.
    pub revalidations: u64,
    /// Expired copies served because the origin failed (or in offline mode).
    pub stale_served: u64,
    /// Attempts repeated after a transient failure.
    pub retries: u64,
    /// Retries that continued a cut-off body with `Range` instead of starting again.
    pub resumes: u64,

    /// Bytes of committed entries (and of removed entries still pinned).
    pub current_size_bytes: u64,
    /// The size cap in bytes.
    pub max_size_bytes: u64,
    /// Bytes reserved by downloads in progress from their `Content-Length`.
    pub reserved_bytes: u64,
    /// Entries held by at least one live [`CachedFile`](crate::CachedFile).
    pub pinned_entries: u64,
    /// Downloads running now.
    pub downloads_in_progress: u64,
    /// TTL given to new entries, in hours.
    pub default_ttl_hours: f64,
    /// The cache directory.
    pub cache_dir: String,
}

pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / crate::config::MB as f64
}

pub(crate) fn hit_rate(hits: u64, misses: u64) -> f64 {
    match hits + misses {
        0 => 0.0,
        total => hits as f64 / total as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_restore_round_trips_every_counter() {
        let c = Counters::default();
        Counters::add(&c.hits, 3);
        Counters::add(&c.errors, 2);
        Counters::add(&c.bytes_downloaded, 1 << 40);
        let saved = c.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedCounters = serde_json::from_str(&json).unwrap();
        let d = Counters::default();
        d.restore(&back);
        assert_eq!(d.save(), saved);
        assert_eq!(d.bytes_downloaded.load(Relaxed), 1 << 40);
        // Older state files with fewer fields still load.
        let partial: SavedCounters = serde_json::from_str(r#"{"hits": 7}"#).unwrap();
        assert_eq!(partial.hits, 7);
        d.reset();
        assert_eq!(d.save(), SavedCounters::default());
    }

    #[test]
    fn hit_rate_is_a_fraction() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(3, 1), 0.75);
        assert_eq!(mb(3 * 1024 * 1024), 3.0);
    }
}
