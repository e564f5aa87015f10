//! Counters observed at every step, and the [`Stats`] snapshot.
//!
//! The cumulative counters are listed once, in the `counters!` table below: from that one
//! list come the atomics the cache counts with, the record saved in state.json, the fields of
//! [`Stats`], and [`Stats::counters`], which the CLI's `stats`, the `/metrics` endpoint and the
//! dashboard read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// One mebibyte: `CACHE_MAX_SIZE_MB` counts these, as the original design did.
pub const MB: u64 = 1024 * 1024;

/// One cumulative counter of [`Stats`], as [`Stats::counters`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CounterInfo {
    /// The field of [`Stats`] (and of its JSON form) that holds the value.
    pub name: &'static str,
    /// The Prometheus name, below the `imgcache_` prefix and without the `_total` suffix.
    pub metric: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
}

macro_rules! counters {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident, $variant:ident, $metric:literal, $help:literal;
    )+) => {
        /// A cumulative counter, for [`Counters::add`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        // The tier's counters stay at zero without the s3 feature.
        #[cfg_attr(not(feature = "s3"), allow(dead_code))]
        pub(crate) enum Counter {
            $($variant,)+
        }

        /// Every counter, in the order of [`Stats`].
        #[cfg(test)]
        const ALL: [Counter; COUNT] = [$(Counter::$variant),+];
        const COUNT: usize = [$(stringify!($variant)),+].len();

        /// Every counter, in the order of [`Stats`].
        const TABLE: [CounterInfo; COUNT] = [$(CounterInfo {
            name: stringify!($field),
            metric: $metric,
            help: $help,
        }),+];

        /// The counters as saved in state.json.
        #[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
        #[serde(default)]
        pub(crate) struct SavedCounters {
            $(pub(crate) $field: u64,)+
        }

        impl SavedCounters {
            fn to_array(&self) -> [u64; COUNT] {
                [$(self.$field),+]
            }

            fn from_array(values: [u64; COUNT]) -> SavedCounters {
                let [$($field),+] = values;
                SavedCounters { $($field),+ }
            }

            /// Both tallies added, counter by counter.
            pub(crate) fn plus(&self, other: &SavedCounters) -> SavedCounters {
                let (a, b) = (self.to_array(), other.to_array());
                SavedCounters::from_array(std::array::from_fn(|i| a[i].saturating_add(b[i])))
            }
        }

        /// A snapshot of the cache's figures, as
        /// [`ImageCache::stats`](crate::ImageCache::stats) returns them. Counters are
        /// cumulative across restarts (saved in state.json) until
        /// [`Admin::reset_stats`](crate::Admin::reset_stats).
        ///
        /// The first five fields are the original design's `get_stats()`.
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        #[non_exhaustive]
        pub struct Stats {
            /// `hits / (hits + misses)`, from 0.0 to 1.0; 0.0 before any request.
            pub hit_rate: f64,
            /// Committed entries.
            pub entries_count: u64,
            /// Bytes of committed entries (and of removed entries still pinned), in MB
            /// (2^20 bytes).
            pub current_size_mb: f64,
            /// The size cap in MB (2^20 bytes).
            pub max_size_mb: f64,
            $($(#[doc = $doc])+ pub $field: u64,)+
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
            /// The tier (`s3://bucket/prefix`), if one is configured.
            pub shared_tier: Option<String>,
            /// The tier's state: `"ok"`, or `"failing: <the last error>"` while it
            /// fails (the origin is asked meanwhile).
            pub shared_tier_state: Option<String>,
            /// The names of the headers sent to the image server (`CACHE_HTTP_HEADERS`,
            /// `authorization` for a bearer token); their values are never shown.
            #[serde(default)]
            pub request_headers: Vec<String>,
            /// The share of requests that caused no transfer, from 0.0 to 1.0: hits, and
            /// misses that shared a download another request (in this process or another)
            /// started or were renewed by a 304: `1 - (total_downloads + errors + not_stored
            /// + shared_hits) / (hits + misses)`. Sixteen callers on one cold file make one
            /// download: a `hit_rate` of 0 and a `reuse_rate` of 15/16.
            #[serde(default)]
            pub reuse_rate: f64,
        }

        impl Stats {
            /// Every cumulative counter with its value, in a fixed order: the one table that
            /// the CLI's `stats`, the `/metrics` endpoint and the dashboard read.
            pub fn counters(&self) -> impl Iterator<Item = (CounterInfo, u64)> + use<> {
                TABLE.into_iter().zip([$(self.$field),+])
            }

            fn with_counters(saved: &SavedCounters, gauges: Gauges) -> Stats {
                Stats {
                    hit_rate: hit_rate(saved.hits, saved.misses),
                    entries_count: gauges.entries_count,
                    current_size_mb: mb(gauges.current_size_bytes),
                    max_size_mb: mb(gauges.max_size_bytes),
                    $($field: saved.$field,)+
                    current_size_bytes: gauges.current_size_bytes,
                    max_size_bytes: gauges.max_size_bytes,
                    reserved_bytes: gauges.reserved_bytes,
                    pinned_entries: gauges.pinned_entries,
                    downloads_in_progress: gauges.downloads_in_progress,
                    default_ttl_hours: gauges.default_ttl_hours,
                    cache_dir: gauges.cache_dir,
                    shared_tier: gauges.shared_tier.as_ref().map(|(url, _)| url.clone()),
                    shared_tier_state: gauges.shared_tier.map(|(_, state)| state),
                    request_headers: gauges.request_headers,
                    reuse_rate: reuse_rate(saved),
                }
            }
        }
    };
}

counters! {
    /// Downloads completed and committed.
    total_downloads, TotalDownloads, "downloads", "Downloads committed";
    /// Requests answered from a committed entry without touching the network.
    hits, Hits, "hits", "Requests answered from the cache";
    /// Requests that were not hits: each either downloaded or joined a running download.
    misses, Misses, "misses", "Requests not answered from the cache";
    /// Misses that joined a download another request had started.
    coalesced_waits, CoalescedWaits, "coalesced_waits", "Misses that joined a running download";
    /// Body bytes received from origins.
    bytes_downloaded, BytesDownloaded, "downloaded_bytes", "Body bytes received from origins";
    /// Bytes of the files handed out by hits.
    bytes_served_from_cache, BytesServedFromCache, "served_bytes", "Bytes of files handed out by hits";
    /// Entries removed to honour the size cap.
    evictions, Evictions, "evictions", "Entries removed for the size cap";
    /// Entries removed because their TTL passed.
    expirations, Expirations, "expirations", "Entries removed after their TTL";
    /// Files that failed the size-and-mtime check or a full verification.
    integrity_failures, IntegrityFailures, "integrity_failures", "Files that failed a check";
    /// Failed downloads (each counted once, however many callers waited on it).
    errors, Errors, "errors", "Failed downloads";
    /// Expired entries renewed by a 304 answer to a conditional GET, without a download.
    revalidations, Revalidations, "revalidations", "Expired entries renewed by a 304";
    /// Expired copies served because the origin failed (or in offline mode).
    stale_served, StaleServed, "stale_served", "Expired copies served";
    /// Attempts repeated after a transient failure.
    retries, Retries, "retries", "Attempts repeated after a transient failure";
    /// Retries that continued a cut-off body with `Range` instead of starting again.
    resumes, Resumes, "resumes", "Retries that resumed with Range";
    /// Downloads started here after waiting `CACHE_LOCK_WAIT` for another process's.
    lock_timeouts, LockTimeouts, "lock_timeouts", "Downloads started after waiting CACHE_LOCK_WAIT for another process";
    /// Misses answered from the tier (another host's download) instead of the origin.
    shared_hits, TierHits, "shared_hits", "Misses answered from the shared tier";
    /// Files (or renewed records) this host published to the tier for the fleet.
    shared_uploads, TierUploads, "shared_uploads", "Files published to the shared tier";
    /// Failures of the tier (down, slow, errors, a blob that failed its check); each
    /// time the origin was asked instead.
    shared_errors, TierErrors, "shared_errors", "Failures of the shared tier";
    /// Other processes' reservations ignored for being larger than the cap: forged or corrupt
    /// records (each counted once).
    records_refused, RecordsRefused, "records_refused", "Other processes' reservations ignored (larger than the cap)";
    /// Answers the origin said not to store (`Cache-Control: no-store`), handed out to their
    /// callers and not kept.
    not_stored, NotStored, "not_stored", "Answers handed out and not kept (Cache-Control: no-store)";
}

/// The figures of a [`Stats`] that are not counters: read from the index and the settings.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gauges {
    pub(crate) entries_count: u64,
    pub(crate) current_size_bytes: u64,
    pub(crate) max_size_bytes: u64,
    pub(crate) reserved_bytes: u64,
    pub(crate) pinned_entries: u64,
    pub(crate) downloads_in_progress: u64,
    pub(crate) default_ttl_hours: f64,
    pub(crate) cache_dir: String,
    /// The tier and its state.
    pub(crate) shared_tier: Option<(String, String)>,
    /// The names of the headers sent to the image server.
    pub(crate) request_headers: Vec<String>,
}

/// The cumulative counters, and whether state.json is behind them.
///
/// Relaxed atomics: each is an independent tally read for display, and no other memory is
/// published through them.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    values: [AtomicU64; COUNT],
    /// Counters or access times changed since state.json was last written.
    unsaved: AtomicBool,
}

impl Counters {
    /// Counts `n` and marks the state unsaved, in one call.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        if n > 0 {
            self.values[counter as usize].fetch_add(n, Relaxed);
            self.unsaved.store(true, Relaxed);
        }
    }

    /// Marks the state unsaved without counting (an access time changed).
    pub(crate) fn mark_unsaved(&self) {
        self.unsaved.store(true, Relaxed);
    }

    /// Whether anything changed since the last call; clears the mark.
    pub(crate) fn take_unsaved(&self) -> bool {
        self.unsaved.swap(false, Relaxed)
    }

    pub(crate) fn save(&self) -> SavedCounters {
        SavedCounters::from_array(std::array::from_fn(|i| self.values[i].load(Relaxed)))
    }

    pub(crate) fn restore(&self, saved: &SavedCounters) {
        for (value, saved) in self.values.iter().zip(saved.to_array()) {
            value.store(saved, Relaxed);
        }
    }

    /// Every counter back to zero (and the state unsaved, so that the zeros are written).
    pub(crate) fn reset(&self) {
        self.restore(&SavedCounters::default());
        self.mark_unsaved();
    }

    /// The snapshot: these counters plus `others` (what the rest of the processes on the
    /// directory counted, and those before them), beside the `gauges`.
    pub(crate) fn stats(&self, others: &SavedCounters, gauges: Gauges) -> Stats {
        Stats::with_counters(&self.save().plus(others), gauges)
    }
}

pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB as f64
}

/// See [`Stats::reuse_rate`]. Counted from transfers, which each count once (a waiter's own
/// count may land before or after its download's), and never below 0.
fn reuse_rate(c: &SavedCounters) -> f64 {
    let requests = c.hits.saturating_add(c.misses);
    let transfers = c
        .total_downloads
        .saturating_add(c.errors)
        .saturating_add(c.not_stored)
        .saturating_add(c.shared_hits)
        .min(requests);
    hit_rate(requests - transfers, transfers)
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
        assert!(!c.take_unsaved());
        c.add(Counter::Hits, 3);
        c.add(Counter::Errors, 2);
        c.add(Counter::BytesDownloaded, 1 << 40);
        assert!(c.take_unsaved(), "counting marks the state unsaved");
        assert!(!c.take_unsaved());
        let saved = c.save();
        assert_eq!((saved.hits, saved.errors), (3, 2));
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedCounters = serde_json::from_str(&json).unwrap();
        let d = Counters::default();
        d.restore(&back);
        assert_eq!(d.save(), saved);
        assert_eq!(d.save().bytes_downloaded, 1 << 40);
        // Older state files with fewer fields still load.
        let partial: SavedCounters = serde_json::from_str(r#"{"hits": 7}"#).unwrap();
        assert_eq!(partial.hits, 7);
        d.reset();
        assert_eq!(d.save(), SavedCounters::default());
        assert!(d.take_unsaved(), "a reset is saved");
    }

    #[test]
    fn the_table_lists_each_counter_once_with_its_stats_field() {
        let c = Counters::default();
        // Give every counter a distinct value, then read it back through the table.
        let all = ALL;
        for (i, counter) in all.iter().enumerate() {
            c.add(*counter, 100 + i as u64);
        }
        let stats = c.stats(&SavedCounters::default(), Gauges::default());
        let json = serde_json::to_value(&stats).unwrap();
        let rows: Vec<_> = stats.counters().collect();
        assert_eq!(rows.len(), COUNT);
        let mut names = std::collections::HashSet::new();
        for (i, (info, value)) in rows.iter().enumerate() {
            assert_eq!(*value, 100 + i as u64, "{}", info.name);
            assert_eq!(json[info.name], *value, "{} is a field of Stats", info.name);
            assert!(names.insert(info.metric), "{} listed twice", info.metric);
            assert!(!info.help.is_empty());
        }
    }

    #[test]
    fn hit_rate_is_a_fraction() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(3, 1), 0.75);
        assert_eq!(mb(3 * 1024 * 1024), 3.0);
        let c = Counters::default();
        c.add(Counter::Hits, 1);
        c.add(Counter::Misses, 3);
        let s = c.stats(
            &SavedCounters::default(),
            Gauges {
                max_size_bytes: 2 * MB,
                ..Gauges::default()
            },
        );
        assert_eq!((s.hit_rate, s.max_size_mb), (0.25, 2.0));
        // Of the three misses, two joined the third's download.
        c.add(Counter::CoalescedWaits, 2);
        c.add(Counter::TotalDownloads, 1);
        let s = c.stats(&SavedCounters::default(), Gauges::default());
        assert_eq!((s.hit_rate, s.reuse_rate), (0.25, 0.75));
        // A failed download is a transfer too; more transfers than requests (counts of
        // other processes landing first) is 0, not below.
        c.add(Counter::Errors, 1);
        assert_eq!(
            c.stats(&SavedCounters::default(), Gauges::default())
                .reuse_rate,
            0.5
        );
        c.add(Counter::TotalDownloads, 5);
        assert_eq!(
            c.stats(&SavedCounters::default(), Gauges::default())
                .reuse_rate,
            0.0
        );
    }
}
