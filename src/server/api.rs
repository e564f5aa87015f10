//! The JSON API and the server-sent events that keep the dashboard live.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json};
use axum::routing::{get, post, put};
use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::entries::api_entries;
use super::{ApiError, AppResult, AppState, JsonBody, QueryArgs};

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

/// The page, one file with its style and script inline.
const PAGE: &str = include_str!("dashboard.html");

/// The page's Content-Security-Policy: its own inline style and script, named by their
/// SHA-256, and requests to its own origin only; no other script, frame or form target.
fn content_security_policy() -> &'static str {
    static CSP: LazyLock<String> = LazyLock::new(|| {
        let digest = |open: &str, close: &str| {
            let start = PAGE.find(open).expect("the page has the element") + open.len();
            let end = start + PAGE[start..].find(close).expect("and its end");
            BASE64_STANDARD.encode(Sha256::digest(&PAGE.as_bytes()[start..end]))
        };
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            digest("<script>", "</script>"),
            digest("<style>", "</style>"),
        )
    });
    &CSP
}

async fn dashboard() -> impl IntoResponse {
    (
        [(header::CONTENT_SECURITY_POLICY, content_security_policy())],
        Html(PAGE),
    )
}

async fn api_stats(State(st): State<Arc<AppState>>) -> Json<crate::Stats> {
    Json(st.cache.stats())
}

/// The counters' table (name, Prometheus name, help), for the dashboard to label its figures.
async fn api_counters(State(st): State<Arc<AppState>>) -> Json<Vec<CounterInfo>> {
    Json(st.cache.stats().counters().map(|(info, _)| info).collect())
}

async fn api_clear(State(st): State<Arc<AppState>>) -> AppResult<Json<serde_json::Value>> {
    let removed = st.cache.clear().await?;
    Ok(Json(serde_json::json!({ "removed": removed })))
}

async fn api_cleanup(State(st): State<Arc<AppState>>) -> AppResult<Json<crate::CleanupReport>> {
    Ok(Json(st.cache.cleanup().await?))
}

#[derive(Deserialize)]
struct UrlQuery {
    url: String,
}

async fn api_invalidate(
    State(st): State<Arc<AppState>>,
    QueryArgs(q): QueryArgs<UrlQuery>,
) -> AppResult<Json<serde_json::Value>> {
    if st.cache.invalidate(&q.url).await? {
        Ok(Json(serde_json::json!({ "removed": true })))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("not cached: {}", st.cache.admin().redacted(&q.url)),
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
    JsonBody(change): JsonBody<ConfigChange>,
) -> AppResult<Json<crate::Stats>> {
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
        st.cache.admin().set_default_ttl(ttl)?;
    }
    if let Some(mb) = max {
        st.cache
            .admin()
            .set_max_size_bytes((mb * MB as f64) as u64)?;
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
