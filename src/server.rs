//! The admin dashboard, JSON API, Prometheus metrics and caching sidecar, as an axum
//! [`Router`] to serve alone (`imgcache serve`) or to mount in an existing application.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the dashboard: one page, no external assets, live through server-sent events |
//! | `GET /api/stats`, `GET /api/entries` | [`Stats`](crate::Stats) and [`EntryInfo`](crate::EntryInfo)s as JSON |
//! | `POST /api/clear`, `POST /api/cleanup` | remove every entry; expire and enforce the cap now |
//! | `DELETE /api/entries?url=...` | invalidate one entry |
//! | `PUT /api/config` | `{"ttl_hours": 24, "max_size_mb": 1024}` (either or both) |
//! | `GET /api/events` | server-sent events: `stats` snapshots and cache `event`s |
//! | `GET /metrics` | Prometheus text format |
//! | `GET`/`HEAD /files/{path}` | `IMAGE_SERVER/{path}` through the cache, with `Range`, `ETag`, `If-None-Match` and `Cache-Status` |
//!
//! Errors are JSON `{"error": "..."}` with a fitting status. When the router is built with an
//! admin token, the mutating routes require `Authorization: Bearer <token>`; [`check_listen`]
//! refuses to serve on a non-loopback address without one.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = imgcache::ImageCache::from_env().await?;
//! let app = axum::Router::new()
//!     .nest("/cache", imgcache::server::router(cache));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8787").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{delete, get, post, put};
use futures_util::StreamExt;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::{CacheStatus, CachedFile, ErrorKind, ImageCache, Received};

/// Settings of the [`router_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ServerOptions {
    /// When set, `POST`, `PUT` and `DELETE` under `/api` require `Authorization: Bearer` it.
    pub admin_token: Option<String>,
}

impl ServerOptions {
    /// Options with no admin token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`admin_token`](Self::admin_token).
    #[must_use]
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }
}

/// Refuses a listening address that other machines can reach unless an admin token guards the
/// mutating endpoints.
///
/// # Errors
/// A message saying why, for a non-loopback address without a token (or with an empty one).
pub fn check_listen(addr: SocketAddr, admin_token: Option<&str>) -> Result<(), String> {
    let has_token = admin_token.is_some_and(|t| !t.trim().is_empty());
    if addr.ip().is_loopback() || has_token {
        Ok(())
    } else {
        Err(format!(
            "{addr} is reachable from other machines: set an admin token \
             (--admin-token or IMGCACHE_ADMIN_TOKEN) or listen on 127.0.0.1"
        ))
    }
}

/// The router with no admin token (for loopback use).
pub fn router(cache: ImageCache) -> Router {
    router_with(cache, ServerOptions::default())
}

struct AppState {
    cache: ImageCache,
    token: Option<String>,
    /// Download durations in seconds, fed by the cache's events.
    durations: Histogram,
}

/// The router with `options`.
///
/// Called inside a Tokio runtime, it also starts a task that feeds the download-duration
/// histogram of `/metrics` from the cache's events; it ends when the cache is dropped.
pub fn router_with(cache: ImageCache, options: ServerOptions) -> Router {
    let durations = Histogram::new(exponential_buckets(0.01, 2.0, 16));
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let mut events = cache.subscribe();
        let histogram = durations.clone();
        rt.spawn(async move {
            loop {
                match events.recv().await {
                    Received::Event(crate::Event::DownloadFinished { elapsed_ms, .. }) => {
                        histogram.observe(elapsed_ms as f64 / 1000.0);
                    }
                    Received::Closed => break,
                    _ => {}
                }
            }
        });
    }
    let state = Arc::new(AppState {
        cache,
        token: options.admin_token.filter(|t| !t.trim().is_empty()),
        durations,
    });
    Router::new()
        .route("/", get(dashboard))
        .route("/api/stats", get(api_stats))
        .route("/api/entries", get(api_entries))
        .route("/api/entries", delete(api_invalidate))
        .route("/api/clear", post(api_clear))
        .route("/api/cleanup", post(api_cleanup))
        .route("/api/config", put(api_config))
        .route("/api/events", get(api_events))
        .route("/metrics", get(metrics))
        .route("/files/{*path}", get(files).head(files))
        .with_state(state)
}

type AppResult<T> = Result<T, ApiError>;

/// An error answered as JSON.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        let status = match e.kind() {
            ErrorKind::InvalidUrl => StatusCode::BAD_REQUEST,
            ErrorKind::HttpStatus if e.status() == Some(404) => StatusCode::NOT_FOUND,
            ErrorKind::HttpStatus | ErrorKind::Network | ErrorKind::Incomplete => {
                StatusCode::BAD_GATEWAY
            }
            ErrorKind::ChecksumMismatch | ErrorKind::TooLarge => StatusCode::BAD_GATEWAY,
            ErrorKind::NotCached => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Config => StatusCode::BAD_REQUEST,
            ErrorKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> AppResult<()> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare in time independent of where the strings differ.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer <admin token>".into(),
        ))
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn api_stats(State(st): State<Arc<AppState>>) -> Json<crate::Stats> {
    Json(st.cache.stats())
}

async fn api_entries(State(st): State<Arc<AppState>>) -> Json<Vec<crate::EntryInfo>> {
    Json(st.cache.entries())
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
        st.cache
            .set_max_size_bytes((mb * crate::MB as f64) as u64)?;
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

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;

    let s = st.cache.stats();
    let mut registry = prometheus_client::registry::Registry::with_prefix("imgcache");
    let counters: [(&str, &str, u64); 14] = [
        ("hits", "Requests answered from the cache", s.hits),
        ("misses", "Requests not answered from the cache", s.misses),
        (
            "coalesced_waits",
            "Misses that joined a running download",
            s.coalesced_waits,
        ),
        ("downloads", "Downloads committed", s.total_downloads),
        (
            "downloaded_bytes",
            "Body bytes received from origins",
            s.bytes_downloaded,
        ),
        (
            "served_bytes",
            "Bytes of files handed out by hits",
            s.bytes_served_from_cache,
        ),
        ("evictions", "Entries removed for the size cap", s.evictions),
        (
            "expirations",
            "Entries removed after their TTL",
            s.expirations,
        ),
        (
            "integrity_failures",
            "Files that failed a check",
            s.integrity_failures,
        ),
        ("errors", "Failed downloads", s.errors),
        (
            "revalidations",
            "Expired entries renewed by a 304",
            s.revalidations,
        ),
        ("stale_served", "Expired copies served", s.stale_served),
        (
            "retries",
            "Attempts repeated after a transient failure",
            s.retries,
        ),
        ("resumes", "Retries that resumed with Range", s.resumes),
    ];
    for (name, help, value) in counters {
        let c = Counter::<u64>::default();
        c.inc_by(value);
        registry.register(name, help, c);
    }
    let gauges: [(&str, &str, i64); 6] = [
        ("entries", "Committed entries", s.entries_count as i64),
        (
            "size_bytes",
            "Bytes of committed entries",
            s.current_size_bytes as i64,
        ),
        ("max_size_bytes", "The size cap", s.max_size_bytes as i64),
        (
            "reserved_bytes",
            "Bytes reserved by running downloads",
            s.reserved_bytes as i64,
        ),
        (
            "pinned_entries",
            "Entries held by callers",
            s.pinned_entries as i64,
        ),
        (
            "downloads_in_progress",
            "Downloads running",
            s.downloads_in_progress as i64,
        ),
    ];
    for (name, help, value) in gauges {
        let g = Gauge::<i64>::default();
        g.set(value);
        registry.register(name, help, g);
    }
    let rate = Gauge::<f64, AtomicU64>::default();
    rate.set(s.hit_rate);
    registry.register("hit_rate", "Hits over all requests (0 to 1)", rate);
    registry.register(
        "download_duration_seconds",
        "Time to download and commit a file",
        st.durations.clone(),
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

/// Whether the raw (still percent-encoded) sidecar path is one the origin may be asked for:
/// no `.` or `..` segments (however encoded), no encoded or back slashes, no empty segments.
fn safe_sidecar_path(raw: &str) -> bool {
    if raw.is_empty() || raw.contains('\\') {
        return false;
    }
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return false;
    }
    raw.split('/').all(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        !segment.is_empty() && decoded != "." && decoded != ".."
    })
}

/// `GET`/`HEAD /files/{path}`: the sidecar.
async fn files(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> AppResult<Response> {
    // A nested router sees its own path: /files/... even when mounted under a prefix.
    let raw = uri.path().strip_prefix("/files/").unwrap_or_default();
    if !safe_sidecar_path(raw) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("refused path: {raw}"),
        ));
    }
    let relative = match uri.query() {
        Some(q) => format!("{raw}?{q}"),
        None => raw.to_owned(),
    };
    if st.cache.image_server().is_none() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no image server is configured (IMAGE_SERVER)".into(),
        ));
    }
    let file = st.cache.get(&relative).await?;
    serve_file(file, &method, &headers).await
}

async fn serve_file(file: CachedFile, method: &Method, headers: &HeaderMap) -> AppResult<Response> {
    let size = file.size();
    let etag = format!("\"{}\"", file.sha256());
    let last_modified = file
        .last_modified()
        .unwrap_or_else(|| httpdate::fmt_http_date(file.fetched_at()));
    let cache_status = match file.status() {
        CacheStatus::Hit => "imgcache; hit".to_owned(),
        CacheStatus::Coalesced => "imgcache; fwd=miss; detail=coalesced".to_owned(),
        CacheStatus::Revalidated => "imgcache; fwd=stale; fwd-status=304".to_owned(),
        CacheStatus::Stale => "imgcache; fwd=stale; detail=origin-failed".to_owned(),
        _ => "imgcache; fwd=miss".to_owned(),
    };
    let mut response = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, last_modified)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("cache-status", cache_status);
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if if_none_match.is_some_and(|v| v.trim() == "*" || v.split(',').any(|t| t.trim() == etag)) {
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(internal);
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, size));
    let (status, start, len) = match range {
        None | Some(RangeRequest::Ignore) => (StatusCode::OK, 0, size),
        Some(RangeRequest::Unsatisfiable) => {
            return response
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .map_err(internal);
        }
        Some(RangeRequest::Bytes(start, end)) => {
            response =
                response.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    response = response
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len);
    if method == Method::HEAD {
        return response.body(Body::empty()).map_err(internal);
    }
    let mut f = tokio::fs::File::open(file.path())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // The stream owns the CachedFile, so the entry stays pinned until the body is sent.
    let body =
        tokio_util::io::ReaderStream::with_capacity(f.take(len), 256 * 1024).map(move |chunk| {
            let _pinned = &file;
            chunk
        });
    response.body(Body::from_stream(body)).map_err(internal)
}

fn internal(e: axum::http::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Inclusive byte positions.
    Bytes(u64, u64),
    Unsatisfiable,
    /// Malformed or multiple ranges: serve the whole file (RFC 9110 allows ignoring Range).
    Ignore,
}

fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    if spec.contains(',') {
        return RangeRequest::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => Some((start, end.min(size.saturating_sub(1)))),
        (Ok(start), Err(_)) if b.is_empty() => Some((start, size.saturating_sub(1))),
        (Err(_), Ok(suffix)) if a.is_empty() => {
            if suffix == 0 {
                return RangeRequest::Unsatisfiable;
            }
            Some((size.saturating_sub(suffix), size.saturating_sub(1)))
        }
        _ => return RangeRequest::Ignore,
    };
    match parsed {
        Some((start, end)) if start < size && start <= end => RangeRequest::Bytes(start, end),
        _ => RangeRequest::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_as_rfc_9110_says() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-9", 100), Bytes(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Bytes(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Bytes(90, 99));
        assert_eq!(parse_range("bytes=-500", 100), Bytes(0, 99));
        assert_eq!(parse_range("bytes=50-5000", 100), Bytes(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=9-2", 100), Ignore);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ignore);
        assert_eq!(parse_range("items=0-1", 100), Ignore);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
    }

    #[test]
    fn sidecar_paths_cannot_leave_the_image_server() {
        for ok in [
            "ct/0042.nii.gz",
            "a/b/c.nii.gz",
            "name%20with%20space.nii.gz",
        ] {
            assert!(safe_sidecar_path(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/../../x",
            "a/%2e%2e/x",
            "a/%2E%2E/x",
            "a%2fb",
            "a%2Fb",
            "a%5cb",
            "a\\b",
            "./x",
            "a//b",
            "x%00.nii.gz",
        ] {
            assert!(!safe_sidecar_path(bad), "{bad}");
        }
    }

    #[test]
    fn non_loopback_addresses_need_a_token() {
        let local: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        let v6: SocketAddr = "[::1]:8787".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8787".parse().unwrap();
        assert!(check_listen(local, None).is_ok());
        assert!(check_listen(v6, None).is_ok());
        assert!(check_listen(any, None).is_err());
        assert!(check_listen(any, Some("  ")).is_err());
        assert!(check_listen(any, Some("s3cret")).is_ok());
    }
}
