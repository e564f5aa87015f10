//! The admin dashboard, JSON API, Prometheus metrics and caching sidecar, as an axum
//! [`Router`] to serve alone (`imgcache serve`) or to mount in an existing application.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the dashboard: one page, no external assets, live through server-sent events |
//! | `GET /api/stats`, `GET /api/entries` | [`Stats`](crate::Stats) and [`EntryInfo`](crate::EntryInfo)s as JSON |
//! | `GET /api/entries?q=ct_&sort=size&order=desc&offset=0&limit=50` | one page of the entries whose URL contains `q`, sorted by `url`, `size`, `fetched_at_ms`, `expires_at_ms`, `last_access_ms` or `hits`; `X-Total-Count` says how many match |
//! | `GET /api/counters` | the counters' table ([`CounterInfo`](crate::CounterInfo)s): name, Prometheus name, help |
//! | `GET /api/history` | the plots' last hour: hits, misses, bytes served from cache and bytes downloaded, sampled every 10 s |
//! | `GET /api/downloads` | the downloads in progress: bytes received and expected, speed, time left |
//! | `POST /api/clear`, `POST /api/cleanup` | remove every entry; expire and enforce the cap now |
//! | `DELETE /api/entries?url=...` | invalidate one entry |
//! | `PUT /api/config` | `{"ttl_hours": 24, "max_size_mb": 1024}` (either or both) |
//! | `GET /api/events` | server-sent events: `stats` snapshots and cache `event`s |
//! | `GET /metrics` | Prometheus text format |
//! | `GET`/`HEAD /files/{path}` | `IMAGE_SERVER/{path}` through the cache, with `Range`, `ETag`, `If-None-Match` and `Cache-Status` |
//!
//! | `POST /api/login`, `POST /api/logout` | `{"token": "..."}`: the dashboard's login cookie |
//!
//! Errors are JSON `{"error": "..."}` with a fitting status, and never name a local path nor
//! the image server's address (a `/files` error names the client's own path).
//! When the router is built with an admin token, every route but the page and its login
//! requires it, as `Authorization: Bearer <token>` or the login cookie; [`check_listen`]
//! refuses to serve on a non-loopback address without one. A change (`POST`, `PUT`,
//! `DELETE`) from another site is always refused. Responses carry `nosniff` and
//! `no-referrer`; the page a strict Content-Security-Policy.
//!
//! Mounted under a prefix, the dashboard is at the prefix, with or without a trailing slash
//! (`nest("/cache", ...)` serves it at `/cache`, `nest("/cache/", ...)` at `/cache/`): its
//! requests go to the mount point's `api/...` either way.
//!
//! [`serve`] serves a router as a reverse proxy would: a header timeout (30 s), a request
//! body timeout (60 s), an idle timeout (75 s), a send timeout after which a client that
//! reads nothing is cut and the file it held let go (60 s), and a cap on connections that
//! keeps descriptors for the cache's own files ([`Limits`]). `imgcache serve` uses it. Mounted in an application of your own
//! served by `axum::serve`, which has none of these, put it behind a proxy that has them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = imgcache::ImageCache::from_env().await?;
//! let app = axum::Router::new()
//!     .nest("/cache", imgcache::server::router(cache));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8787").await?;
//! imgcache::server::serve(listener, app, imgcache::server::Limits::new(), std::future::pending())
//!     .await?;
//! # Ok(()) }
//! ```

mod api;
mod auth;
mod downloads;
mod entries;
mod files;
mod history;
mod metrics;
mod serve;

pub use serve::{Limits, serve};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::{ErrorKind, ImageCache};
use downloads::Downloads;
use history::History;
use metrics::Metrics;

/// Settings of the [`router_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// When set, every route but the dashboard page and its login requires it, as
    /// `Authorization: Bearer <token>` or as the cookie the page's login form sets.
    pub admin_token: Option<String>,
    /// How often the counters that the dashboard plots (`GET /api/history`) are sampled:
    /// every 10 s by default. The last 360 samples are kept, an hour at the default; zero
    /// keeps only the one taken when the router is built.
    pub history_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            admin_token: None,
            history_interval: history::DEFAULT_INTERVAL,
        }
    }
}

impl ServerOptions {
    /// Options with no admin token and the history sampled every 10 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`admin_token`](Self::admin_token).
    #[must_use]
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    /// Sets [`history_interval`](Self::history_interval).
    #[must_use]
    pub fn history_interval(mut self, every: Duration) -> Self {
        self.history_interval = every;
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

/// `listener` with `TCP_NODELAY` set on every connection it accepts: serve the router through
/// it (`axum::serve(imgcache::server::nodelay(listener), app)`). Without it a small response
/// on a keep-alive connection can wait for the delayed ACK of the one before (Nagle's
/// algorithm), about 40 ms a request: a viewer that reads a series of small files would crawl.
pub fn nodelay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    fn set(stream: &mut TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    }
    listener.tap_io(set)
}

/// The router with no admin token (for loopback use).
pub fn router(cache: ImageCache) -> Router {
    router_with(cache, ServerOptions::default())
}

struct AppState {
    cache: ImageCache,
    token: Option<String>,
    /// A key of this router's, from the operating system's generator: the login cookie is
    /// the token's HMAC under it.
    session_key: ring::hmac::Key,
    metrics: Metrics,
    /// The counters sampled for the dashboard's plots.
    history: History,
    /// The downloads in progress, followed from the cache's events.
    downloads: Downloads,
}

/// A key from the operating system's generator.
fn new_session_key() -> ring::hmac::Key {
    let rng = ring::rand::SystemRandom::new();
    ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
        .expect("the operating system's random generator works")
}

/// The router with `options`.
///
/// Called inside a Tokio runtime, it also starts a task that feeds the download-duration
/// histogram of `/metrics` from the cache's events, one that follows the downloads in
/// progress from them, and one that samples the counters for the dashboard's plots; they end
/// when the router (every clone of it) is dropped, the first two also when the cache is.
pub fn router_with(cache: ImageCache, options: ServerOptions) -> Router {
    let state = Arc::new(AppState {
        metrics: Metrics::start(&cache),
        history: History::start(&cache, options.history_interval),
        downloads: Downloads::start(&cache),
        cache,
        token: options.admin_token.filter(|t| !t.trim().is_empty()),
        session_key: new_session_key(),
    });
    api::routes()
        .merge(metrics::routes())
        .merge(history::routes())
        .merge(downloads::routes())
        .merge(files::routes())
        .route("/api/login", post(auth::login))
        .route("/api/logout", post(auth::logout))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::guard,
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
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

/// [`axum::Json`] whose rejection (a malformed or mistyped body) is an [`ApiError`], so that
/// it too is answered as JSON.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError(rejection.status(), rejection.body_text())),
        }
    }
}

/// [`axum::extract::Query`] whose rejection is an [`ApiError`].
struct QueryArgs<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(QueryArgs(value)),
            Err(rejection) => Err(ApiError(rejection.status(), rejection.body_text())),
        }
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
        // Never a local path or the origin's address: a sidecar's clients are not the
        // cache's operators.
        ApiError(status, e.to_string_for_client())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_accepted_through_nodelay_have_it_set() {
        use axum::serve::Listener;
        let mut listener = nodelay(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(TcpStream::connect(addr));
        let (stream, _) = listener.accept().await;
        assert!(
            stream.nodelay().unwrap(),
            "TCP_NODELAY on the accepted stream"
        );
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = tokio::spawn(TcpStream::connect(plain.local_addr().unwrap()));
        let (stream, _) = plain.accept().await.unwrap();
        assert!(
            !stream.nodelay().unwrap(),
            "off by default: the wrapper is what sets it"
        );
        drop((client.await, other.await));
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
