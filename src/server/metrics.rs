//! `/metrics`: every counter of the cache's one table, the gauges, and a histogram of download
//! durations fed by the cache's events.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::AppState;
use crate::{Event, ImageCache, Received};

/// The download-duration histogram and the task that feeds it. The task is owned: it stops
/// when this is dropped (with the router that holds it), or when the cache is.
pub(super) struct Metrics {
    /// Download durations in seconds.
    durations: Histogram,
    _stop: DropGuard,
}

impl Metrics {
    /// Starts the feeding task when called inside a Tokio runtime (outside one the histogram
    /// stays empty).
    pub(super) fn start(cache: &ImageCache) -> Metrics {
        let durations = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let stop = CancellationToken::new();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut events = cache.subscribe();
            let histogram = durations.clone();
            let stopped = stop.clone();
            rt.spawn(async move {
                loop {
                    let received = tokio::select! {
                        () = stopped.cancelled() => break,
                        received = events.recv() => received,
                    };
                    match received {
                        Received::Event(Event::DownloadFinished { elapsed_ms, .. }) => {
                            histogram.observe(elapsed_ms as f64 / 1000.0);
                        }
                        Received::Closed => break,
                        _ => {}
                    }
                }
            });
        }
        Metrics {
            durations,
            _stop: stop.drop_guard(),
        }
    }
}

/// `GET /metrics`.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

/// `GET /metrics` in the OpenMetrics text format.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let s = st.cache.stats();
    let mut registry = prometheus_client::registry::Registry::with_prefix("imgcache");
    for (info, value) in s.counters() {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        registry.register(info.metric, info.help, c);
    }
    let gauges: [(&str, &str, u64); 6] = [
        ("entries", "Committed entries", s.entries_count),
        (
            "size_bytes",
            "Bytes of committed entries",
            s.current_size_bytes,
        ),
        ("max_size_bytes", "The size cap", s.max_size_bytes),
        (
            "reserved_bytes",
            "Bytes reserved by running downloads",
            s.reserved_bytes,
        ),
        (
            "pinned_entries",
            "Entries held by callers",
            s.pinned_entries,
        ),
        (
            "downloads_in_progress",
            "Downloads running",
            s.downloads_in_progress,
        ),
    ];
    for (name, help, value) in gauges {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, g);
    }
    let rate = Gauge::<f64, AtomicU64>::default();
    rate.set(s.hit_rate);
    registry.register("hit_rate", "Hits over all requests (0 to 1)", rate);
    let reuse = Gauge::<f64, AtomicU64>::default();
    reuse.set(s.reuse_rate);
    registry.register(
        "reuse_rate",
        "Requests that caused no download, hits and shared waits, over all requests (0 to 1)",
        reuse,
    );
    registry.register(
        "download_duration_seconds",
        "Time to download and commit a file",
        st.metrics.durations.clone(),
    );
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
