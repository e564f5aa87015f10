//! `GET /api/history`: what the dashboard's plots draw. The cumulative counters they need
//! (hits, misses, bytes served from cache, bytes downloaded) are sampled every ten seconds by
//! default into a ring of [`CAPACITY`] samples (the last hour), kept by the router so that a
//! page loaded or reloaded at any time draws the whole hour at once.
//!
//! Samples carry the time of the cache's clock; the page turns successive samples into a hit
//! rate and byte rates per interval.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Json;
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::AppState;
use crate::ImageCache;
use crate::clock::unix_ms;

/// Samples kept: an hour at the default interval.
pub(super) const CAPACITY: usize = 360;
/// How often the counters are sampled unless [`ServerOptions::history_interval`] says
/// otherwise.
///
/// [`ServerOptions::history_interval`]: super::ServerOptions::history_interval
pub(super) const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The cumulative counters at one time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(super) struct Sample {
    /// When, by the cache's clock: milliseconds since the Unix epoch.
    t_ms: u64,
    hits: u64,
    misses: u64,
    bytes_served_from_cache: u64,
    bytes_downloaded: u64,
}

impl Sample {
    fn of(cache: &ImageCache) -> Sample {
        let s = cache.stats();
        Sample {
            t_ms: unix_ms(cache.now()),
            hits: s.hits,
            misses: s.misses,
            bytes_served_from_cache: s.bytes_served_from_cache,
            bytes_downloaded: s.bytes_downloaded,
        }
    }
}

/// The newest [`CAPACITY`] samples, oldest first.
#[derive(Debug, Default)]
struct Ring(VecDeque<Sample>);

impl Ring {
    fn push(&mut self, sample: Sample) {
        if self.0.len() == CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(sample);
    }
}

/// The ring and the task that fills it; the task stops when this is dropped (with the router
/// that holds it).
pub(super) struct History {
    ring: Arc<Mutex<Ring>>,
    interval: Duration,
    _stop: DropGuard,
}

impl History {
    /// Takes the first sample now and, inside a Tokio runtime and unless `interval` is zero,
    /// starts a task that takes one every `interval`.
    pub(super) fn start(cache: &ImageCache, interval: Duration) -> History {
        let cache = cache.clone();
        Self::start_with(move || Sample::of(&cache), interval)
    }

    fn start_with(sample: impl Fn() -> Sample + Send + 'static, interval: Duration) -> History {
        let ring = Arc::new(Mutex::new(Ring::default()));
        lock(&ring).push(sample());
        let stop = CancellationToken::new();
        // At most a day between samples: a "never" written as Duration::MAX would overflow
        // the timer (zero is the way to say never).
        let interval = interval.min(Duration::from_secs(86_400));
        if let Ok(rt) = tokio::runtime::Handle::try_current()
            && !interval.is_zero()
        {
            let (ring, stopped) = (Arc::clone(&ring), stop.clone());
            rt.spawn(async move {
                let start = tokio::time::Instant::now() + interval;
                let mut tick = tokio::time::interval_at(start, interval);
                // A late tick is one sample late, never a burst of them.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stopped.cancelled() => break,
                        _ = tick.tick() => lock(&ring).push(sample()),
                    }
                }
            });
        }
        History {
            ring,
            interval,
            _stop: stop.drop_guard(),
        }
    }

    fn samples(&self) -> Vec<Sample> {
        lock(&self.ring).0.iter().copied().collect()
    }
}

fn lock(ring: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    ring.lock().unwrap_or_else(|e| e.into_inner())
}

/// `GET /api/history`.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/api/history", get(api_history))
}

/// The answer of `GET /api/history`.
#[derive(Serialize)]
struct HistoryAnswer {
    /// How often a sample is taken, in milliseconds (0: only the first one).
    interval_ms: u64,
    /// How many samples are kept at most.
    capacity: usize,
    /// The samples, oldest first.
    samples: Vec<Sample>,
    /// The counters now, for the plots to reach the present between samples.
    current: Sample,
}

async fn api_history(State(st): State<Arc<AppState>>) -> Json<HistoryAnswer> {
    Json(HistoryAnswer {
        interval_ms: u64::try_from(st.history.interval.as_millis()).unwrap_or(u64::MAX),
        capacity: CAPACITY,
        samples: st.history.samples(),
        current: Sample::of(&st.cache),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn sample(n: u64) -> Sample {
        Sample {
            t_ms: n * 10_000,
            hits: n,
            misses: 0,
            bytes_served_from_cache: 0,
            bytes_downloaded: 0,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_in_order() {
        let mut ring = Ring::default();
        for n in 0..CAPACITY as u64 + 40 {
            ring.push(sample(n));
        }
        assert_eq!(ring.0.len(), CAPACITY);
        assert_eq!(ring.0.front(), Some(&sample(40)), "the oldest went first");
        assert_eq!(ring.0.back(), Some(&sample(CAPACITY as u64 + 39)));
        assert!(
            ring.0
                .iter()
                .zip(ring.0.iter().skip(1))
                .all(|(a, b)| a.t_ms < b.t_ms)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sample_is_taken_at_start_then_every_interval_until_dropped() {
        let taken = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&taken);
        let history = History::start_with(
            move || sample(counter.fetch_add(1, Ordering::SeqCst)),
            Duration::from_secs(10),
        );
        assert_eq!(history.samples(), vec![sample(0)], "one at start");
        tokio::time::sleep(Duration::from_millis(9_999)).await;
        assert_eq!(history.samples().len(), 1, "none before the interval");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(history.samples(), vec![sample(0), sample(1), sample(2)]);
        drop(history);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            taken.load(Ordering::SeqCst),
            3,
            "the task stopped with the history"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_keeps_the_first_sample_alone() {
        let history = History::start_with(|| sample(7), Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(history.samples(), vec![sample(7)]);
    }
}
