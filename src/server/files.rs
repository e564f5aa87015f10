//! The `/files` sidecar: `IMAGE_SERVER/{path}` through the cache, with `Range`, `ETag`,
//! `If-None-Match`, `Last-Modified` and `Cache-Status`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::Response;
use axum::routing::get;
use futures_util::StreamExt;
use headers::{ETag, HeaderMapExt, IfModifiedSince, IfNoneMatch, LastModified};
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ApiError, AppResult, AppState};

/// `GET` and `HEAD /files/{path}`.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/files/{*path}", get(files).head(files))
}
use crate::{CacheStatus, CachedFile};

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
    version: Version,
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
    let Some(server) = st.cache.image_server_url() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no image server is configured (IMAGE_SERVER)".into(),
        ));
    };
    // Joined as a path, so that `http:other-host/x` is a path on the image server and never
    // a URL of its own.
    let url = crate::key::below(server, raw, uri.query())?;
    let answer = if method == Method::HEAD {
        match st.cache.get_cached(url.as_str()) {
            Some(file) => serve_file(file, st.cache.now(), &method, &headers).await,
            None => head_from_origin(&st, url.as_str()).await,
        }
    } else {
        // One admission: a hit is answered as a file, a miss streamed as the download
        // brings it.
        serve_stream(&st, url.as_str(), version, &headers).await
    };
    // The error names the client's own path, never the origin's URL.
    answer.map_err(|ApiError(status, said)| ApiError(status, format!("{said} (for /files/{raw})")))
}

/// A file as a stream admits it: a committed file (a hit) is served as a file; one that is
/// not cached (or not fresh) is streamed while it is cached: the answer starts
/// with the download's first bytes, with the origin's length; every client joined to the
/// download reads at its own pace. A range inside what is on disk comes at once, one past
/// it waits for the rest. The body ends only after the commit; a download that fails
/// mid-body aborts the response, so that no client takes a partial file for a whole one.
async fn serve_stream(
    st: &AppState,
    url: &str,
    version: Version,
    headers: &HeaderMap,
) -> AppResult<Response> {
    let opened = st.cache.open_stream(url, crate::GetOptions::new()).await?;
    if opened.settled() {
        // A hit, a copy renewed by a 304, a stale one, a file another request committed:
        // served as a file, with its validators, ranges and conditionals.
        let file = opened.into_file().await?;
        return serve_file(file, st.cache.now(), &Method::GET, headers).await;
    }
    let opened_as = opened.status();
    let Some(total) = opened.total() else {
        // No length yet (a chunked origin): HTTP/1.1 and later frame the body, so a failure
        // shows as an aborted one; an HTTP/1.0 body ends where the connection closes, and an
        // error would look like a whole file. Such a client gets the committed file.
        if version <= Version::HTTP_10 {
            let file = opened.into_file().await?;
            return serve_file(file, st.cache.now(), &Method::GET, headers).await;
        }
        let framing = Framing {
            status: StatusCode::OK,
            start: 0,
            len: None,
            total: None,
        };
        return stream_response(st, headers, url, opened.range(0, None), opened_as, framing).await;
    };
    // An If-Range names a version by the ETag of a committed file (its SHA-256), which a
    // download in progress does not have yet: the whole file is sent, never a range of
    // what may be another version.
    let range = headers
        .get(header::RANGE)
        .filter(|_| !headers.contains_key(header::IF_RANGE))
        .map_or(RangeRequest::Ignore, |v| {
            v.to_str()
                .map_or(RangeRequest::Ignore, |v| parse_range(v, total))
        });
    match range {
        RangeRequest::Bytes(start, end) => {
            let part = opened.range(start, Some(end + 1));
            let framing = Framing {
                status: StatusCode::PARTIAL_CONTENT,
                start,
                len: Some(end - start + 1),
                total: Some(total),
            };
            stream_response(st, headers, url, part, opened_as, framing).await
        }
        RangeRequest::Unsatisfiable => Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(Body::empty())
            .map_err(internal),
        RangeRequest::Ignore => {
            let whole = opened.range(0, None);
            let framing = Framing {
                status: StatusCode::OK,
                start: 0,
                len: Some(total),
                total: Some(total),
            };
            stream_response(st, headers, url, whole, opened_as, framing).await
        }
    }
}

/// The status and the length of a streamed answer, and which part of the file it is.
struct Framing {
    status: StatusCode,
    start: u64,
    len: Option<u64>,
    total: Option<u64>,
}

/// The answer of [`serve_stream`], from its first chunk on.
async fn stream_response(
    st: &AppState,
    headers: &HeaderMap,
    url: &str,
    mut stream: crate::FileStream,
    opened_as: CacheStatus,
    framing: Framing,
) -> AppResult<Response> {
    let Framing {
        status,
        start,
        len,
        total,
    } = framing;
    // The first chunk before the answer: a download that fails before its first byte (a
    // 404 at the origin) is answered with its own status.
    let first = match stream.next().await {
        Some(Ok(chunk)) => Some(chunk),
        Some(Err(e)) => {
            return Err(
                match e.get_ref().and_then(|e| e.downcast_ref::<crate::Error>()) {
                    Some(cache_error) => ApiError::from(cache_error.clone()),
                    None => ApiError(StatusCode::BAD_GATEWAY, e.to_string()),
                },
            );
        }
        None => None,
    };
    // The download ended before the first chunk with another file than its own (the
    // expired copy, when the origin failed): answered as that file, with its validators.
    if let Some(file) = stream.ended_with()
        && !matches!(
            file.status(),
            CacheStatus::Downloaded | CacheStatus::Coalesced
        )
    {
        let file = file.clone();
        drop(stream);
        return serve_file(file, st.cache.now(), &Method::GET, headers).await;
    }
    let not_stored = stream.not_stored();
    let cache_status = match opened_as {
        _ if not_stored => "imgcache; fwd=miss; detail=no-store",
        CacheStatus::Coalesced => "imgcache; fwd=miss; collapsed; detail=streamed",
        CacheStatus::Downloaded => "imgcache; fwd=miss; detail=streamed",
        other => cache_status(other),
    };
    // The type from the file's name, never from a query string.
    let path = url::Url::parse(url)
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    let name = path.rsplit('/').next().unwrap_or_default();
    let mut response = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("cache-status", cache_status)
        .header(header::CONTENT_SECURITY_POLICY, FILES_CSP)
        .header(
            header::CONTENT_TYPE,
            content_type(std::path::Path::new(name)),
        );
    if let Some(len) = len {
        response = response.header(header::CONTENT_LENGTH, len);
    }
    if not_stored {
        // What the origin asked of every cache on the way.
        response = response.header(header::CACHE_CONTROL, "no-store");
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let (Some(len), Some(total)) = (len, total)
    {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", start + len - 1),
        );
    }
    let body = futures_util::stream::iter(first.map(Ok)).chain(stream);
    response.body(Body::from_stream(body)).map_err(internal)
}

/// Whether `If-Range` names this version (RFC 9110 13.1.5): a strong entity tag equal to
/// the file's, or a date equal to the Last-Modified it is served with. A weak tag, any other
/// date, or anything that is neither does not, and the whole file is the answer: a client
/// never splices the bytes of two versions.
fn if_range_names(value: &HeaderValue, sha256: &str, modified: SystemTime) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let value = value.trim();
    if let Some(tag) = value.strip_prefix('"') {
        return tag.strip_suffix('"') == Some(sha256);
    }
    if value.starts_with("W/") {
        return false;
    }
    httpdate::parse_http_date(value)
        .is_ok_and(|date| httpdate::fmt_http_date(date) == httpdate::fmt_http_date(modified))
}

async fn serve_file(
    file: CachedFile,
    now: SystemTime,
    method: &Method,
    headers: &HeaderMap,
) -> AppResult<Response> {
    let size = file.size();
    let etag: ETag = format!("\"{}\"", file.sha256())
        .parse()
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "bad digest".into()))?;
    let modified = file
        .last_modified()
        .and_then(|v| httpdate::parse_http_date(&v).ok())
        .unwrap_or_else(|| file.fetched_at());
    let last_modified = LastModified::from(modified);
    let cache_status = cache_status(file.status());
    let age = now
        .duration_since(file.fetched_at())
        .unwrap_or_default()
        .as_secs();
    let mut response = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header("cache-status", cache_status)
        .header(header::AGE, age)
        .header(header::CONTENT_SECURITY_POLICY, FILES_CSP);
    if file.status() == CacheStatus::NotStored {
        response = response.header(header::CACHE_CONTROL, "no-store");
    }
    let typed = response.headers_mut().expect("a fresh builder");
    typed.typed_insert(etag.clone());
    typed.typed_insert(last_modified);

    // RFC 9110 13.2.2: If-None-Match (compared weakly) decides; If-Modified-Since only
    // when there is none.
    let not_modified = match headers.typed_get::<IfNoneMatch>() {
        Some(if_none_match) => !if_none_match.precondition_passes(&etag),
        None => headers
            .typed_get::<IfModifiedSince>()
            .is_some_and(|since| !since.is_modified(modified)),
    };
    if not_modified {
        return response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(internal);
    }
    // A Range is honoured only if If-Range (when sent) still names this version; otherwise
    // the whole file is the answer.
    let range_applies = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| if_range_names(v, file.sha256(), modified));
    let range = headers
        .get(header::RANGE)
        .filter(|_| range_applies)
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
        .header(header::CONTENT_TYPE, content_type(file.path()))
        .header(header::CONTENT_LENGTH, len);
    if method == Method::HEAD {
        return response.body(Body::empty()).map_err(internal);
    }
    if len <= SMALL_BODY {
        // A small body is read at once, like the hit path's stat: three trips through the
        // blocking pool (open, seek, read) cost more than the read of a page-cached file.
        let bytes = read_range(&file, start, len)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        return response.body(Body::from(bytes)).map_err(internal);
    }
    let opening = file.clone();
    let f = tokio::task::spawn_blocking(move || opening.open())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut f = tokio::fs::File::from_std(f);
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

/// A cached file is never active content on the dashboard's origin: an HTML or SVG file from
/// the image server runs no script and reaches nothing.
const FILES_CSP: &str = "sandbox; default-src 'none'";

/// Bodies up to this many bytes are read on the request's own task.
const SMALL_BODY: u64 = 64 * 1024;

/// `len` bytes of `file` from `start` (blocking; for small bodies).
fn read_range(file: &crate::CachedFile, start: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = file.open()?;
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(&mut bytes, start)?;
    Ok(bytes)
}

/// The content type a file name says (`.nii.gz` is gzip), else bytes.
fn content_type(path: &std::path::Path) -> String {
    mime_guess::from_path(path)
        .first_raw()
        .unwrap_or("application/octet-stream")
        .to_owned()
}

/// `HEAD` on a file that is not cached: the origin is asked with a `HEAD` of its own, and
/// nothing is downloaded or cached.
async fn head_from_origin(st: &AppState, url: &str) -> AppResult<Response> {
    let head = st.cache.head_origin(url).await?;
    // The content type a GET would send; no ETag, since a GET's is the SHA-256 of bytes not
    // yet fetched.
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("cache-status", "imgcache; fwd=miss; detail=head")
        .header(header::CONTENT_SECURITY_POLICY, FILES_CSP)
        .header(
            header::CONTENT_TYPE,
            content_type(std::path::Path::new(&head.file_name)),
        );
    if let Some(len) = head.content_length {
        response = response.header(header::CONTENT_LENGTH, len);
    }
    if let Some(value) = head.last_modified {
        response = response.header(header::LAST_MODIFIED, value);
    }
    response.body(Body::empty()).map_err(internal)
}

/// RFC 9211 `Cache-Status` for how a file was had.
fn cache_status(status: CacheStatus) -> &'static str {
    match status {
        CacheStatus::Hit => "imgcache; hit",
        // A request that joined another's download.
        CacheStatus::Coalesced => "imgcache; fwd=miss; collapsed",
        CacheStatus::Revalidated => "imgcache; fwd=stale; fwd-status=304",
        CacheStatus::Stale => "imgcache; fwd=stale; detail=origin-failed",
        CacheStatus::Shared => "imgcache; fwd=miss; detail=shared-tier",
        CacheStatus::NotStored => "imgcache; fwd=miss; detail=no-store",
        CacheStatus::Downloaded => "imgcache; fwd=miss",
    }
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
}

/// Property tests of the parsers that read what a client sends (`Range`, `If-Range`): any
/// input, no panic, and only what RFC 9110 allows.
#[cfg(test)]
mod outside_input {
    use std::time::{Duration, UNIX_EPOCH};

    use axum::http::HeaderValue;
    use proptest::prelude::*;

    use super::{RangeRequest, if_range_names, parse_range};

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn a_range_is_within_the_file_whatever_is_sent(value in "\\PC{0,40}|bytes=[0-9 ,-]{0,30}", size in 0u64..1 << 40) {
            if let RangeRequest::Bytes(start, end) = parse_range(&value, size) {
                prop_assert!(start <= end && end < size, "{value:?} of {size}: {start}-{end}");
            }
        }

        #[test]
        fn a_well_formed_range_is_served_as_asked(size in 1u64..1 << 40, a in 0u64..1 << 40, len in 0u64..1 << 20) {
            let start = a % size;
            let end = start.saturating_add(len).min(size - 1);
            prop_assert_eq!(parse_range(&format!("bytes={start}-{end}"), size), RangeRequest::Bytes(start, end));
        }

        #[test]
        fn if_range_names_a_version_only_by_its_own_validators(value in "\\PC{0,80}", secs in 0u64..4_000_000_000) {
            let modified = UNIX_EPOCH + Duration::from_secs(secs);
            let Ok(header) = HeaderValue::from_str(&value) else { return Ok(()) };
            if if_range_names(&header, SHA, modified) {
                let own_date = httpdate::fmt_http_date(modified);
                let trimmed = value.trim();
                prop_assert!(
                    trimmed == format!("\"{SHA}\"")
                        || httpdate::parse_http_date(trimmed).is_ok_and(|d| httpdate::fmt_http_date(d) == own_date),
                    "{value:?} named the version"
                );
            }
        }

        #[test]
        fn if_range_with_the_exact_validators_names_the_version(secs in 0u64..4_000_000_000) {
            let modified = UNIX_EPOCH + Duration::from_secs(secs);
            let date = HeaderValue::from_str(&httpdate::fmt_http_date(modified)).unwrap();
            prop_assert!(if_range_names(&date, SHA, modified));
            let later = HeaderValue::from_str(&httpdate::fmt_http_date(modified + Duration::from_secs(1))).unwrap();
            prop_assert!(!if_range_names(&later, SHA, modified));
            let tag = HeaderValue::from_str(&format!("\"{SHA}\"")).unwrap();
            prop_assert!(if_range_names(&tag, SHA, modified));
        }
    }
}
