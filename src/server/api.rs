//! The JSON API and the server-sent events that keep the dashboard live.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, Json};
use axum::routing::{get, post, put};
use serde::Deserialize;

use super::{ApiError, AppResult, AppState, authorize};

/// The dashboard page and the `/api` routes.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/stats", get(api_stats))
        .route("/api/counters", get(api_counters))
        .route("/api/entries", get(api_entries).delete(api_invalidate))
        .route("/api/clear", post(api_clear))
        .route("/api/cleanup", post(api_cleanup))
        .route("/api/config", put(api_config))
        .route("/api/events", get(api_events))
}
use crate::{CounterInfo, MB, Received};

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn api_stats(State(st): State<Arc<AppState>>) -> Json<crate::Stats> {
    Json(st.cache.stats())
}

async fn api_entries(State(st): State<Arc<AppState>>) -> Json<Vec<crate::EntryInfo>> {
    Json(st.cache.entries())
}

/// The counters' table (name, Prometheus name, help), for the dashboard to label its figures.
async fn api_counters(State(st): State<Arc<AppState>>) -> Json<Vec<CounterInfo>> {
    Json(st.cache.stats().counters().map(|(info, _)| info).collect())
}

async fn api_clear(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> AppResult<Json<serde_json::Value>> {
    authorize(&st, &headers)?;
    let removed = st.cache.clear().await?;
    Ok(Json(serde_json::json!({ "removed": removed })))
}

async fn api_cleanup(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> AppResult<Json<crate::CleanupReport>> {
    authorize(&st, &headers)?;
    Ok(Json(st.cache.cleanup().await?))
}

#[derive(Deserialize)]
struct UrlQuery {
    url: String,
}

async fn api_invalidate(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<UrlQuery>,
) -> AppResult<Json<serde_json::Value>> {
    authorize(&st, &headers)?;
    if st.cache.invalidate(&q.url).await? {
        Ok(Json(serde_json::json!({ "removed": true })))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("not cached: {}", q.url),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigChange {
    ttl_hours: Option<f64>,
    max_size_mb: Option<f64>,
}

async fn api_config(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(change): Json<ConfigChange>,
) -> AppResult<Json<crate::Stats>> {
    authorize(&st, &headers)?;
    let positive = |v: f64, what: &str| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{what} must be a positive number"),
            ))
        }
    };
    // Validate both before changing either.
    let ttl = change
        .ttl_hours
        .map(|h| positive(h, "ttl_hours"))
        .transpose()?;
    let max = change
        .max_size_mb
        .map(|m| positive(m, "max_size_mb"))
        .transpose()?;
    if let Some(hours) = ttl {
        let ttl = Duration::try_from_secs_f64(hours * 3600.0)
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "ttl_hours is out of range".into()))?;
        st.cache.set_default_ttl(ttl)?;
    }
    if let Some(mb) = max {
        st.cache.set_max_size_bytes((mb * MB as f64) as u64)?;
    }
    Ok(Json(st.cache.stats()))
}

/// `stats` snapshots every half second, and each cache `event` as it happens.
async fn api_events(
    State(st): State<Arc<AppState>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let events = st.cache.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold(
        (events, tick, st),
        |(mut events, mut tick, st)| async move {
            let item = tokio::select! {
                received = events.recv() => match received {
                    Received::Event(e) => SseEvent::default().event("event").json_data(&e),
                    Received::Missed(_) => SseEvent::default().event("stats").json_data(st.cache.stats()),
                    Received::Closed => return None,
                },
                _ = tick.tick() => SseEvent::default().event("stats").json_data(st.cache.stats()),
            };
            let item = item.unwrap_or_else(|_| SseEvent::default().comment("unserialisable"));
            Some((Ok(item), (events, tick, st)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
