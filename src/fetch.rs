//! HTTP: requests (plain, conditional, ranged), status mapping, retry delays.

use std::path::Path;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use url::Url;

use crate::error::{Error, ErrorKind, Result};
use crate::store::Validators;

/// How a request is made.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ask<'a> {
    /// The whole body.
    Whole,
    /// The whole body unless the copy described by these validators is still current (304).
    IfChanged(&'a Validators),
    /// The bytes from `offset` on, if the resource is still the one these validators describe.
    From(u64, &'a str),
}

/// The answer, before the body is read.
#[derive(Debug)]
pub(crate) enum Answer {
    /// 200: the whole body follows.
    Whole(reqwest::Response),
    /// 206 with a `Content-Range` starting at the offset asked for.
    Rest(reqwest::Response),
    /// 304: the cached copy is current.
    NotModified(Validators),
    /// The range cannot be used (416, or a 206 for other bytes): start again from zero.
    RangeRefused,
}

/// Sends one request. Bodies are asked for as stored (`Accept-Encoding: identity`): a
/// `.nii.gz` served with `Content-Encoding: gzip` must not be inflated.
pub(crate) async fn send(http: &Http, url: &Url, ask: Ask<'_>) -> Result<Answer> {
    let mut asked = HeaderMap::new();
    asked.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let value = |v: &str| {
        HeaderValue::from_str(v).map_err(|_| {
            Error::new(
                ErrorKind::Io,
                "a stored validator is not a valid header value",
            )
        })
    };
    match ask {
        Ask::Whole => {}
        Ask::IfChanged(v) => {
            if let Some(etag) = &v.etag {
                asked.insert(header::IF_NONE_MATCH, value(etag)?);
            }
            if let Some(lm) = &v.last_modified {
                asked.insert(header::IF_MODIFIED_SINCE, value(lm)?);
            }
        }
        Ask::From(offset, if_range) => {
            asked.insert(header::RANGE, value(&format!("bytes={offset}-"))?);
            asked.insert(header::IF_RANGE, value(if_range)?);
        }
    }
    let response = http
        .request(reqwest::Method::GET, url, &asked, "request failed")
        .await?;
    let status = response.status();
    match (status, ask) {
        (StatusCode::OK, _) => Ok(Answer::Whole(response)),
        (StatusCode::NOT_MODIFIED, Ask::IfChanged(old)) => {
            let mut fresh = validators(response.headers());
            // A 304 may omit validators that did not change.
            fresh.etag = fresh.etag.or_else(|| old.etag.clone());
            fresh.last_modified = fresh.last_modified.or_else(|| old.last_modified.clone());
            Ok(Answer::NotModified(fresh))
        }
        (StatusCode::PARTIAL_CONTENT, Ask::From(offset, if_range)) => {
            if rest_of_same_version(response.headers(), offset, if_range) {
                Ok(Answer::Rest(response))
            } else {
                Ok(Answer::RangeRefused)
            }
        }
        (StatusCode::RANGE_NOT_SATISFIABLE, Ask::From(..)) => Ok(Answer::RangeRefused),
        _ if status.is_success() => Err(Error::new(
            ErrorKind::HttpStatus,
            "unexpected success status for a GET",
        )
        .with_status(status.as_u16())),
        _ => Err(status_error(status, response.headers())),
    }
}

/// The error of a non-2xx answer: its status, and when to try again if the server said.
fn status_error(status: StatusCode, headers: &HeaderMap) -> Error {
    let mut err = Error::new(
        ErrorKind::HttpStatus,
        status.canonical_reason().unwrap_or("unexpected status"),
    )
    .with_status(status.as_u16());
    if let Some(after) = retry_after(headers, SystemTime::now()) {
        err = err.with_retry_after(after);
    }
    err
}

/// The `Cache-Control` directive by which the origin asks that its answer not be stored:
/// `no-store`, or (for a cache that answers many clients) an unqualified `private`. A
/// `private="field"` names fields only, and the answer may be stored without them; this
/// cache stores no header, so it stores that answer.
pub(crate) fn not_to_store(headers: &HeaderMap, refuse_private: bool) -> Option<&'static str> {
    let mut found = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        // An unreadable header is no directive.
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let name = directive.split('=').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("no-store") {
                return Some("no-store");
            }
            if refuse_private && directive.eq_ignore_ascii_case("private") {
                found = Some("private");
            }
        }
    }
    found
}

/// The validators a later revalidation or resume can send.
pub(crate) fn validators(headers: &HeaderMap) -> Validators {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    Validators {
        etag: text(header::ETAG),
        last_modified: text(header::LAST_MODIFIED),
    }
}

/// The first byte of `Content-Range: bytes START-END/TOTAL`.
fn content_range(headers: &HeaderMap) -> Option<(u64, u64)> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.trim().strip_prefix("bytes ")?;
    let (range, _) = range.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, end.trim().parse().ok()?))
}

/// Whether a 206 is the rest of the version the resume was bound to: it starts at `offset`,
/// runs to the end of the file when the total is given, and carries no validator other
/// than the one `If-Range` sent. An origin that ignores `If-Range` but honours `Range`
/// would otherwise splice a new version's tail onto the old one's head.
fn rest_of_same_version(headers: &HeaderMap, offset: u64, if_range: &str) -> bool {
    let Some((start, end)) = content_range(headers) else {
        return false;
    };
    let total = content_range_total(headers);
    if start != offset || end < start || total.is_some_and(|t| end.checked_add(1) != Some(t)) {
        return false;
    }
    let got = validators(headers);
    let sent_etag = if_range.starts_with('"') || if_range.starts_with("W/");
    if sent_etag {
        got.etag.is_none_or(|etag| etag == if_range)
    } else {
        got.last_modified.is_none_or(|lm| lm == if_range)
    }
}

/// The total length in `Content-Range: bytes START-END/TOTAL`, when known.
pub(crate) fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (_, total) = value.rsplit_once('/')?;
    total.trim().parse().ok()
}

/// `Retry-After` as a delay: seconds, or an HTTP date relative to `now`.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The delay before attempt `attempt + 1` (attempt counts from 1): exponential from `base`,
/// capped at `max`, with jitter in its upper half so that many clients do not retry in step.
/// A `Retry-After` from the server wins, capped at `max`.
pub(crate) fn backoff(
    attempt: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(fastrand::f64())
}

/// What a `HEAD` answer says of a file.
#[cfg(feature = "server")]
#[derive(Debug, Clone, Default)]
pub(crate) struct Head {
    pub(crate) content_length: Option<u64>,
    pub(crate) last_modified: Option<String>,
    /// The name the file would be cached under (set by the caller).
    pub(crate) file_name: String,
}

/// Sends a `HEAD`; a non-2xx answer is an error carrying its status, as for a `GET`.
#[cfg(feature = "server")]
pub(crate) async fn head(http: &Http, url: &Url) -> Result<Head> {
    let mut asked = HeaderMap::new();
    asked.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let response = http
        .request(reqwest::Method::HEAD, url, &asked, "HEAD request failed")
        .await?;
    let status = response.status();
    if !status.is_success() {
        return Err(status_error(status, response.headers()));
    }
    let text = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    Ok(Head {
        content_length: text(header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        last_modified: text(header::LAST_MODIFIED),
        file_name: String::new(),
    })
}

/// Maps a reqwest error before the body: connection trouble and timeouts are `Network`.
pub(crate) fn classify(err: reqwest::Error, what: &str) -> Error {
    let message = if err.is_timeout() {
        format!("{what}: timed out")
    } else if err.is_connect() {
        format!("{what}: cannot connect")
    } else if err.is_redirect() {
        format!("{what}: redirect refused")
    } else {
        what.to_owned()
    };
    let kind = if err.is_redirect() {
        ErrorKind::InvalidUrl
    } else {
        ErrorKind::Network
    };
    // reqwest's message may include the URL with credentials; keep it only without the URL.
    Error::new(kind, message).with_source(err.without_url())
}

/// Maps an error while reading the body: the body is incomplete.
pub(crate) fn body_error(err: reqwest::Error) -> Error {
    let message = if err.is_timeout() {
        "body stalled: timed out"
    } else {
        "connection failed mid-body"
    };
    Error::new(ErrorKind::Incomplete, message).with_source(err.without_url())
}

/// What the default client is built from.
pub(crate) struct ClientSettings<'a> {
    pub(crate) connect: Duration,
    pub(crate) read: Duration,
    pub(crate) ca_certificate: Option<&'a Path>,
    pub(crate) insecure: bool,
}

/// A change to the cache's own client builder (proxies, client certificates, pools), from
/// [`NetworkOptions::http_client_with`](crate::NetworkOptions::http_client_with).
pub(crate) type CustomizeClient =
    std::sync::Arc<dyn Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder + Send + Sync>;

/// The client and what the cache adds to every request: it follows redirects itself (at
/// most `max_redirects`, never from https to http) and sends the configured headers only to
/// the image server's origin, on the first request and on any redirect that stays there.
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    /// The configured headers and the one origin they go to.
    pub(crate) headers: Option<(url::Origin, HeaderMap)>,
    pub(crate) max_redirects: usize,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("headers", &self.header_names())
            .field("max_redirects", &self.max_redirects)
            .finish_non_exhaustive()
    }
}

impl Http {
    /// The names of the configured headers (never their values).
    pub(crate) fn header_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .headers
            .iter()
            .flat_map(|(_, map)| map.keys().map(|k| k.as_str().to_owned()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Sends `method` to `url` with `asked`, following redirects as the type says.
    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        url: &Url,
        asked: &HeaderMap,
        what: &str,
    ) -> Result<reqwest::Response> {
        let mut url = url.clone();
        let mut was_https = url.scheme() == "https";
        let mut hops = 0usize;
        loop {
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .headers(asked.clone());
            let authorised = match &self.headers {
                Some((origin, headers)) if url.origin() == *origin => {
                    request = request.headers(headers.clone());
                    true
                }
                _ => false,
            };
            let response = request.send().await.map_err(|e| {
                let e = classify(e, what);
                // The first server answered: it is not the one that is down.
                if hops > 0 { e.with_after_redirect() } else { e }
            })?;
            if authorised && response.url().origin() != url.origin() {
                // A client given by the caller followed a redirect itself, headers and all.
                return Err(Error::new(
                    ErrorKind::Config,
                    "the HTTP client followed a redirect to another origin itself: give one \
                     built with redirect(Policy::none()), or use http_client_with",
                ));
            }
            let status = response.status();
            let follow = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
            let location = response.headers().get(header::LOCATION).cloned();
            let Some(location) = location.filter(|_| follow) else {
                return Ok(response);
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|l| url.join(l).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidUrl,
                        format!("{what}: bad redirect location"),
                    )
                    .with_status(status.as_u16())
                })?;
            if was_https && next.scheme() == "http" {
                return Err(Error::new(
                    ErrorKind::InvalidUrl,
                    format!("{what}: refusing a redirect from https to http"),
                ));
            }
            hops += 1;
            if hops > self.max_redirects {
                return Err(Error::new(
                    ErrorKind::InvalidUrl,
                    format!("{what}: too many redirects"),
                ));
            }
            was_https |= next.scheme() == "https";
            url = next;
        }
    }
}

/// The client the cache downloads with unless it is given one: rustls with ring, the
/// platform's roots (and an extra CA), no decompression, timeouts, and redirects that never
/// go from https to http.
pub(crate) fn default_client(
    settings: &ClientSettings<'_>,
    customize: Option<&CustomizeClient>,
) -> Result<reqwest::Client> {
    // reqwest is built without a bundled crypto provider; install ring once per process.
    // An error means one is installed already, which is what we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("imgcache/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(settings.connect)
        .read_timeout(settings.read)
        // HTTP/2's flow control bounds a stream to one window per round trip: hyper's 2 MiB
        // is 40 MiB/s at 50 ms (a cold 200 MiB took 6.8 s beside 1.16 s for curl). 32 MiB a
        // stream, 64 MiB a connection, as curl gives itself: 1.21 s (bench/network.sh).
        // hyper's adaptive window took 2.4 s, its estimate growing a round trip at a time.
        // It is also what a connection may buffer while the disk writer lags.
        .http2_initial_stream_window_size(32 << 20)
        .http2_initial_connection_window_size(64 << 20);
    if let Some(customize) = customize {
        builder = customize(builder);
    }
    // Whatever the customisation did: redirects are followed by `Http::request` (which
    // refuses https-to-http and keeps the configured headers on the image server's origin),
    // and bodies are stored as sent.
    builder = builder
        .redirect(reqwest::redirect::Policy::none())
        .no_gzip()
        .no_brotli()
        .no_deflate()
        .no_zstd();
    if let Some(path) = settings.ca_certificate {
        let pem = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                "cannot read the CA certificate (CACHE_CA_CERT)",
            )
            .with_path(path)
            .with_source(e)
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                "CACHE_CA_CERT holds no valid PEM certificate",
            )
            .with_path(path)
            .with_source(e)
        })?;
        if certs.is_empty() {
            return Err(
                Error::new(ErrorKind::Config, "CACHE_CA_CERT holds no PEM certificate")
                    .with_path(path),
            );
        }
        builder = builder.tls_certs_merge(certs);
    }
    if settings.insecure {
        tracing::warn!("TLS certificate verification is OFF (CACHE_INSECURE_TLS)");
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .map_err(|e| Error::new(ErrorKind::Config, "cannot build the HTTP client").with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn content_range_is_parsed() {
        let h = headers(&[("content-range", "bytes 100-199/200")]);
        assert_eq!(content_range(&h), Some((100, 199)));
        assert_eq!(content_range_total(&h), Some(200));
        let h = headers(&[("content-range", "bytes 5-9/*")]);
        assert_eq!(
            (content_range(&h), content_range_total(&h)),
            (Some((5, 9)), None)
        );
        assert_eq!(content_range(&headers(&[("content-range", "junk")])), None);
    }

    #[test]
    fn a_partial_answer_must_be_the_rest_of_the_version_asked_for() {
        let tag = "\"v1\"";
        let range = ("content-range", "bytes 100-199/200");
        let same = headers(&[range, ("etag", tag)]);
        assert!(rest_of_same_version(&same, 100, tag));
        assert!(
            rest_of_same_version(&headers(&[range]), 100, tag),
            "no validator to compare"
        );
        // The origin ignored If-Range and sent another version's tail.
        let other = headers(&[range, ("etag", "\"v2\"")]);
        assert!(!rest_of_same_version(&other, 100, tag));
        assert!(!rest_of_same_version(&same, 50, tag), "another offset");
        let short = headers(&[("content-range", "bytes 100-149/200"), ("etag", tag)]);
        assert!(!rest_of_same_version(&short, 100, tag), "not to the end");
        let date = "Tue, 24 Nov 2026 10:00:00 GMT";
        let newer = headers(&[range, ("last-modified", "Wed, 25 Nov 2026 10:00:00 GMT")]);
        assert!(!rest_of_same_version(&newer, 100, date));
        let same_date = headers(&[range, ("last-modified", date)]);
        assert!(rest_of_same_version(&same_date, 100, date));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Tue, 24 Nov 2026 10:00:00 GMT").unwrap();
        let h = headers(&[("retry-after", "7")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let h = headers(&[("retry-after", "Tue, 24 Nov 2026 10:00:30 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        let h = headers(&[("retry-after", "Tue, 24 Nov 2026 09:00:00 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..=10 {
            let d = backoff(attempt, base, max, None);
            let full = (base * 2u32.pow(attempt - 1)).min(max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            backoff(1, base, max, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(backoff(1, base, max, Some(Duration::from_secs(60))), max);
        assert!(backoff(u32::MAX, base, max, None) <= max);
    }

    #[test]
    fn no_store_and_private_are_read_from_every_cache_control_header() {
        let h = |values: &[&str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            map
        };
        assert_eq!(not_to_store(&h(&["no-store"]), false), Some("no-store"));
        assert_eq!(
            not_to_store(&h(&["max-age=60, No-Store"]), false),
            Some("no-store")
        );
        assert_eq!(
            not_to_store(&h(&["max-age=60", "no-store"]), false),
            Some("no-store")
        );
        assert_eq!(
            not_to_store(&h(&["private"]), false),
            None,
            "one application's own"
        );
        assert_eq!(
            not_to_store(&h(&["private, max-age=5"]), true),
            Some("private")
        );
        assert_eq!(not_to_store(&h(&["private=\"set-cookie\""]), true), None);
        assert_eq!(not_to_store(&h(&["no-cache", "public"]), true), None);
        assert_eq!(not_to_store(&h(&[]), true), None);
    }

    #[test]
    fn if_range_prefers_a_strong_etag() {
        let v = |etag: Option<&str>, lm: Option<&str>| Validators {
            etag: etag.map(str::to_owned),
            last_modified: lm.map(str::to_owned),
        };
        assert_eq!(v(Some("\"a\""), Some("date")).if_range(), Some("\"a\""));
        assert_eq!(v(Some("W/\"a\""), Some("date")).if_range(), Some("date"));
        assert_eq!(v(Some("W/\"a\""), None).if_range(), None);
        assert!(v(None, None).is_empty());
    }
}

/// Property tests of what the cache reads from an origin's headers (`Content-Range`,
/// `Retry-After`, `Cache-Control`): any value, no panic.
#[cfg(test)]
mod outside_input {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use reqwest::header::{self, HeaderMap, HeaderValue};

    use super::{content_range_total, not_to_store, retry_after, validators};

    fn with(name: header::HeaderName, value: &str) -> Option<HeaderMap> {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_str(value).ok()?);
        Some(map)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn origin_headers_never_panic(value in "\\PC{0,80}") {
            for name in [header::CONTENT_RANGE, header::RETRY_AFTER, header::CACHE_CONTROL, header::ETAG] {
                if let Some(map) = with(name, &value) {
                    let _ = content_range_total(&map);
                    let _ = retry_after(&map, UNIX_EPOCH + Duration::from_secs(1 << 31));
                    let _ = not_to_store(&map, true);
                    let _ = validators(&map);
                }
            }
        }

        #[test]
        fn a_content_range_gives_its_total(start in 0u64..1 << 50, len in 1u64..1 << 30, extra in 0u64..1 << 30) {
            let total = start + len + extra;
            let map = with(header::CONTENT_RANGE, &format!("bytes {start}-{}/{total}", start + len - 1)).unwrap();
            prop_assert_eq!(content_range_total(&map), Some(total));
        }

        #[test]
        fn no_store_is_found_among_any_other_directives(before in "[a-z=0-9 ,-]{0,30}", after in "[a-z=0-9 ,-]{0,30}") {
            let map = with(header::CACHE_CONTROL, &format!("{before},no-store,{after}")).unwrap();
            prop_assert_eq!(not_to_store(&map, false), Some("no-store"));
        }
    }
}
