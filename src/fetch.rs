//! HTTP: the request, status mapping and error classification.

use reqwest::header::{self, HeaderMap};
use url::Url;

use crate::error::{Error, ErrorKind, Result};

/// What the response headers say about the body.
#[derive(Debug, Clone, Default)]
pub(crate) struct Validators {
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
}

/// Sends the GET. Bodies are asked for as stored (`Accept-Encoding: identity`): a `.nii.gz`
/// served with `Content-Encoding: gzip` must not be inflated. A non-2xx status is an error
/// carrying the status.
pub(crate) async fn start(client: &reqwest::Client, url: &Url) -> Result<reqwest::Response> {
    let response = client
        .get(url.clone())
        .header(header::ACCEPT_ENCODING, "identity")
        .send()
        .await
        .map_err(|e| classify(e, "request failed"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(Error::new(
            ErrorKind::HttpStatus,
            status.canonical_reason().unwrap_or("unexpected status"),
        )
        .with_status(status.as_u16()));
    }
    Ok(response)
}

/// The validators a later revalidation can send.
pub(crate) fn validators(headers: &HeaderMap) -> Validators {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    Validators {
        etag: text(header::ETAG),
        last_modified: text(header::LAST_MODIFIED),
    }
}

/// Maps a reqwest error before the body: connection trouble and timeouts are `Network`.
pub(crate) fn classify(err: reqwest::Error, what: &str) -> Error {
    let message = if err.is_timeout() {
        format!("{what}: timed out")
    } else if err.is_connect() {
        format!("{what}: cannot connect")
    } else {
        what.to_owned()
    };
    // reqwest's own message may include the URL with credentials; keep it as the source only
    // after removing the URL.
    Error::new(ErrorKind::Network, message).with_source(err.without_url())
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
