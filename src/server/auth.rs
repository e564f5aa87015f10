//! Who may use the server: the admin token, the dashboard's login, and the refusal of
//! cross-site requests that change the cache.
//!
//! With an admin token set, every route but the dashboard page and its login requires it, as
//! `Authorization: Bearer <token>` (scripts) or as the cookie that `POST /api/login` sets
//! (the dashboard: `HttpOnly`, `SameSite=Strict`, scoped to the router's mount point, so the
//! token is never in a URL or readable by the page's script). Whether or not a token is set,
//! a request that changes something (anything but `GET` and `HEAD`) from another site is
//! refused: browsers say where a request comes from in `Sec-Fetch-Site` and `Origin`, which a
//! page on another site cannot forge.

use std::sync::Arc;

use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::hmac;
use serde::Deserialize;

use super::{ApiError, AppResult, AppState, JsonBody};

/// The cookie the dashboard's login sets.
const COOKIE: &str = "imgcache_token";

/// Routes that answer without the token: the page, which shows the login form, and the
/// login itself.
fn is_open(path: &str) -> bool {
    matches!(path, "/" | "/api/login" | "/api/logout")
}

/// The layer in front of every route: refuses cross-site changes, then requires the token.
pub(super) async fn guard(
    State(st): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    // Without a token the server is for this machine alone: a page on another site that made
    // its name resolve to 127.0.0.1 (DNS rebinding) would otherwise be "same origin".
    if st.token.is_none()
        && !request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_none_or(is_loopback_host)
    {
        return ApiError(
            StatusCode::FORBIDDEN,
            "without an admin token this server answers only requests addressed to localhost"
                .into(),
        )
        .into_response();
    }
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes && from_another_site(request.headers()) {
        return ApiError(
            StatusCode::FORBIDDEN,
            "a request from another site may not change the cache".into(),
        )
        .into_response();
    }
    if !is_open(request.uri().path())
        && let Err(e) = authorize(&st, request.headers())
    {
        return e.into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header names this machine: `localhost`, a 127.0.0.0/8 address or `[::1]`,
/// with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the browser says the request comes from a page of another origin.
fn from_another_site(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        // `none` is the user's own action (a typed URL, a bookmark).
        return !matches!(site, "same-origin" | "none");
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (None, _) => false,
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
            !origin_host.eq_ignore_ascii_case(host)
        }
        // An `Origin` (or `null`) with no `Host` to compare it to.
        (Some(_), None) => true,
    }
}

/// The login cookie's value for `token`: hex HMAC-SHA256 of the token under the router's
/// key, which comes from the operating system's generator. A cookie that leaks gives nothing
/// to search the token with offline, and stops working when the server restarts.
fn session_cookie(key: &hmac::Key, token: &str) -> String {
    hex::encode(hmac::sign(key, token.as_bytes()))
}

/// Whether `given` is the login cookie of `token` (compared in constant time).
fn is_session_cookie(key: &hmac::Key, given: &str, token: &str) -> bool {
    hex::decode(given).is_ok_and(|tag| hmac::verify(key, token.as_bytes(), &tag).is_ok())
}

/// Whether `given` is `token`, in time independent of both: their HMACs are compared in
/// constant time, so that not even the token's length shows.
fn is_token(key: &hmac::Key, given: &str, token: &str) -> bool {
    let expected = hmac::sign(key, token.as_bytes());
    hmac::verify(key, given.as_bytes(), expected.as_ref()).is_ok()
}

/// Accepts the token as a bearer token or as the login cookie (compared in constant time).
fn authorize(state: &AppState, headers: &HeaderMap) -> AppResult<()> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value);
    let ok = bearer.is_some_and(|given| is_token(&state.session_key, given, token))
        || cookie.is_some_and(|given| is_session_cookie(&state.session_key, given, token));
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the admin token (Authorization: Bearer <token>, or log in on the dashboard)"
                .into(),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Login {
    token: String,
}

/// The path the router is mounted at (`/` alone, `/cache/` nested), from the full request
/// path and the router's own: the cookie is scoped to it.
fn mount_point(original: &str, own: &str) -> String {
    let prefix = original.strip_suffix(own).unwrap_or("");
    format!("{}/", prefix.trim_end_matches('/'))
}

/// `POST /api/login` `{"token": "..."}`: sets the cookie when the token is right.
pub(super) async fn login(
    State(st): State<Arc<AppState>>,
    OriginalUri(original): OriginalUri,
    JsonBody(login): JsonBody<Login>,
) -> AppResult<Response> {
    let Some(token) = &st.token else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if !is_token(&st.session_key, login.token.trim(), token) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong admin token".into(),
        ));
    }
    let path = mount_point(original.path(), "/api/login");
    // Not the token itself: a value derived from it and a secret of this server's, so that a
    // cookie that leaks (to another server on this host name) gives away no token and stops
    // working when this server restarts.
    let value = session_cookie(&st.session_key, token);
    let cookie = format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path={path}");
    Ok(([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response())
}

/// `POST /api/logout`: removes the cookie.
pub(super) async fn logout(OriginalUri(original): OriginalUri) -> Response {
    let path = mount_point(original.path(), "/api/logout");
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path={path}; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cross_site_requests_are_told_apart_from_same_site_ones() {
        assert!(!from_another_site(&headers(&[])), "curl sends neither");
        assert!(!from_another_site(&headers(&[(
            "sec-fetch-site",
            "same-origin"
        )])));
        assert!(!from_another_site(&headers(&[("sec-fetch-site", "none")])));
        assert!(from_another_site(&headers(&[(
            "sec-fetch-site",
            "cross-site"
        )])));
        assert!(from_another_site(&headers(&[(
            "sec-fetch-site",
            "same-site"
        )])));
        let same = [
            ("origin", "http://127.0.0.1:8787"),
            ("host", "127.0.0.1:8787"),
        ];
        assert!(!from_another_site(&headers(&same)));
        let other = [
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8787"),
        ];
        assert!(from_another_site(&headers(&other)));
        assert!(from_another_site(&headers(&[
            ("origin", "null"),
            ("host", "h")
        ])));
    }

    #[test]
    fn only_this_machine_is_a_loopback_host() {
        for host in [
            "localhost",
            "LOCALHOST:8787",
            "127.0.0.1",
            "127.0.0.1:8787",
            "127.9.9.9:1",
            "[::1]:8787",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8787",
            "10.0.0.1:8787",
            "localhost.evil.example",
            "[::2]:80",
            "0.0.0.0:8787",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn the_cookie_is_scoped_to_the_mount_point() {
        assert_eq!(mount_point("/api/login", "/api/login"), "/");
        assert_eq!(mount_point("/cache/api/login", "/api/login"), "/cache/");
        assert_eq!(mount_point("/a/b/api/login", "/api/login"), "/a/b/");
    }

    #[test]
    fn tokens_compare_whole() {
        let key = super::super::new_session_key();
        let same = |a: &str, b: &str| is_token(&key, a, b);
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cre", "s3cret") && !same("s3cret!", "s3cret") && !same("", "x"));
    }

    #[test]
    fn the_cookie_is_the_tokens_hmac_under_a_key_of_the_servers() {
        let key = super::super::new_session_key();
        let cookie = session_cookie(&key, "s3cret");
        assert_eq!(cookie.len(), 64);
        assert!(is_session_cookie(&key, &cookie, "s3cret"));
        assert!(!is_session_cookie(&key, &cookie, "other"));
        assert!(
            !is_session_cookie(&key, "s3cret", "s3cret"),
            "the token is no cookie"
        );
        assert!(!is_session_cookie(&key, "zz", "s3cret"));
        let other = super::super::new_session_key();
        assert!(
            !is_session_cookie(&other, &cookie, "s3cret"),
            "another server's key"
        );
        // Not a plain digest of the token.
        use sha2::Digest;
        assert_ne!(cookie, hex::encode(sha2::Sha256::digest(b"s3cret")));
    }
}
