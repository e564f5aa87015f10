//! One opaque, cheaply cloneable error type.
//!
//! A download's error is handed to every task that waited on it, so [`Error`] is an `Arc` inside:
//! cloning it is a reference-count increment. Its [`ErrorKind`] is what callers match on; the
//! URL (never with credentials), the path and the HTTP status are context.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A specialised `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for callers that react differently to different failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The URL could not be parsed, has a scheme other than http or https, is relative with no
    /// image server configured, or escapes the image server's path.
    InvalidUrl,
    /// The origin answered with a status other than 2xx; [`Error::status`] holds it.
    HttpStatus,
    /// The connection failed, was reset, or timed out.
    Network,
    /// The body was shorter or longer than its `Content-Length`, or otherwise incomplete.
    Incomplete,
    /// The SHA-256 of the downloaded bytes differs from the expected digest.
    ChecksumMismatch,
    /// The file is larger than the cache's size cap and cannot be cached.
    TooLarge,
    /// The disk is full.
    StorageFull,
    /// Another local I/O failure in the cache directory.
    Io,
    /// A configuration value is invalid; the message names the setting.
    Config,
    /// Another process holds this cache directory.
    Locked,
    /// The entry is not in the cache and the call may not download it (offline mode).
    NotCached,
    /// The cache was shut down.
    Shutdown,
    /// A bug: a download task panicked. The message says where.
    Internal,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::InvalidUrl => "invalid URL",
            ErrorKind::HttpStatus => "HTTP error status",
            ErrorKind::Network => "network error",
            ErrorKind::Incomplete => "incomplete download",
            ErrorKind::ChecksumMismatch => "SHA-256 mismatch",
            ErrorKind::TooLarge => "file larger than the cache",
            ErrorKind::StorageFull => "disk full",
            ErrorKind::Io => "I/O error",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Locked => "cache directory in use",
            ErrorKind::NotCached => "not cached",
            ErrorKind::Shutdown => "cache shut down",
            ErrorKind::Internal => "internal error",
        }
    }
}

/// A short description of the kind, as an [`Error`]'s `Display` begins with it: for a
/// caller that reports the kind alone (a table of failures, a metric label), without the
/// message, URL or path.
///
/// ```
/// use imgcache::ErrorKind;
///
/// assert_eq!(ErrorKind::ChecksumMismatch.to_string(), "SHA-256 mismatch");
/// assert_eq!(format!("[{:<14}]", ErrorKind::Network), "[network error ]");
/// ```
impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that width and alignment apply.
        f.pad(self.describe())
    }
}

/// The error of every fallible operation in this crate.
///
/// Cheap to clone (one `Arc`). `Display` prints this level only; [`std::error::Error::source`]
/// gives the underlying cause (an `io::Error`, a `reqwest::Error`, ...).
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    url: Option<String>,
    path: Option<PathBuf>,
    status: Option<u16>,
    retry_after: Option<std::time::Duration>,
    /// The SHA-256 the bytes had, for a [`ErrorKind::ChecksumMismatch`].
    actual_digest: Option<String>,
    /// The request failed after the server asked had answered with a redirect: that server
    /// is up (see the outage memory).
    after_redirect: bool,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                url: None,
                path: None,
                status: None,
                retry_after: None,
                actual_digest: None,
                after_redirect: false,
                source: None,
            }),
        }
    }

    fn map_inner(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                // Only reached on a shared error; rebuild a private copy of the context.
                let old = &self.inner;
                let mut inner = Inner {
                    kind: old.kind,
                    message: old.message.clone(),
                    url: old.url.clone(),
                    path: old.path.clone(),
                    status: old.status,
                    retry_after: old.retry_after,
                    actual_digest: old.actual_digest.clone(),
                    after_redirect: old.after_redirect,
                    source: Some(Box::new(self.clone())),
                };
                f(&mut inner);
                self.inner = Arc::new(inner);
            }
        }
        self
    }

    /// Attaches the digest the bytes had (a checksum mismatch).
    /// A digest that is not the one expected.
    pub(crate) fn checksum(expected: &str, actual: &str) -> Error {
        Error::new(
            ErrorKind::ChecksumMismatch,
            format!("expected {}, got {actual}", expected.trim()),
        )
        .with_actual_digest(actual)
    }

    pub(crate) fn with_actual_digest(self, sha256: &str) -> Self {
        self.map_inner(|i| i.actual_digest = Some(sha256.to_owned()))
    }

    /// The digest the bytes had, for a checksum mismatch.
    pub(crate) fn actual_digest(&self) -> Option<&str> {
        self.inner.actual_digest.as_deref()
    }

    /// Attaches the URL (already stripped of credentials).
    pub(crate) fn with_url(self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.map_inner(|i| i.url = Some(url))
    }

    pub(crate) fn with_path(self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.map_inner(|i| i.path = Some(path))
    }

    pub(crate) fn with_status(self, status: u16) -> Self {
        self.map_inner(|i| i.status = Some(status))
    }

    pub(crate) fn with_retry_after(self, after: std::time::Duration) -> Self {
        self.map_inner(|i| i.retry_after = Some(after))
    }

    pub(crate) fn with_after_redirect(self) -> Self {
        self.map_inner(|i| i.after_redirect = true)
    }

    /// Whether the server asked answered (with a redirect) before the request failed.
    pub(crate) fn after_redirect(&self) -> bool {
        self.inner.after_redirect
    }

    /// The delay the server asked for with `Retry-After`, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.inner.retry_after
    }

    pub(crate) fn with_source(
        self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.map_inner(|i| i.source = Some(Box::new(source)))
    }

    /// An I/O error, classified: a full disk becomes [`ErrorKind::StorageFull`].
    pub(crate) fn io(message: impl Into<String>, err: io::Error) -> Self {
        let kind = if err.kind() == io::ErrorKind::StorageFull {
            ErrorKind::StorageFull
        } else {
            ErrorKind::Io
        };
        Error::new(kind, message).with_source(err)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The URL the operation was about, without credentials.
    pub fn url(&self) -> Option<&str> {
        self.inner.url.as_deref()
    }

    /// The local path the operation was about.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The HTTP status, for [`ErrorKind::HttpStatus`].
    pub fn status(&self) -> Option<u16> {
        self.inner.status
    }

    /// Whether trying again later might succeed (network trouble, 5xx, 408, 429, an incomplete body).
    pub fn is_transient(&self) -> bool {
        match self.kind() {
            ErrorKind::Network | ErrorKind::Incomplete => true,
            ErrorKind::HttpStatus => {
                matches!(self.status(), Some(s) if s >= 500 || s == 408 || s == 429)
            }
            _ => false,
        }
    }
}

impl Error {
    /// The [`Display`](fmt::Display) text without the local path or the URL: for answers to
    /// clients that have no business knowing the cache's layout or where its origin is.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn to_string_for_client(&self) -> String {
        self.clone()
            .map_inner(|i| {
                i.path = None;
                i.url = None;
            })
            .to_string()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.write_str(i.kind.describe())?;
        if let Some(status) = i.status {
            write!(f, " {status}")?;
        }
        if !i.message.is_empty() {
            write!(f, ": {}", i.message)?;
        }
        if let Some(url) = &i.url {
            write!(f, " (url: {url})")?;
        }
        if let Some(path) = &i.path {
            write!(f, " (path: {})", path.display())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &i.kind).field("message", &i.message);
        if let Some(url) = &i.url {
            d.field("url", url);
        }
        if let Some(path) = &i.path {
            d.field("path", path);
        }
        if let Some(status) = i.status {
            d.field("status", &status);
        }
        if let Some(source) = &i.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_kind_status_and_context_but_not_source() {
        let err = Error::new(ErrorKind::HttpStatus, "origin refused")
            .with_status(404)
            .with_url("http://h/a.nii.gz")
            .with_source(io::Error::other("deep cause"));
        let text = err.to_string();
        assert_eq!(
            text,
            "HTTP error status 404: origin refused (url: http://h/a.nii.gz)"
        );
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains("deep cause")
        );
        assert!(!err.is_transient());
        assert!(
            Error::new(ErrorKind::HttpStatus, "")
                .with_status(503)
                .is_transient()
        );
    }

    #[test]
    fn a_kind_displays_as_an_error_of_it_begins() {
        let kinds = [
            ErrorKind::InvalidUrl,
            ErrorKind::HttpStatus,
            ErrorKind::Network,
            ErrorKind::Incomplete,
            ErrorKind::ChecksumMismatch,
            ErrorKind::TooLarge,
            ErrorKind::StorageFull,
            ErrorKind::Io,
            ErrorKind::Config,
            ErrorKind::Locked,
            ErrorKind::NotCached,
            ErrorKind::Shutdown,
            ErrorKind::Internal,
        ];
        let mut seen = std::collections::HashSet::new();
        for kind in kinds {
            let text = kind.to_string();
            assert!(!text.is_empty());
            assert!(
                seen.insert(text.clone()),
                "{kind:?} displays as another kind: {text}"
            );
            let err = Error::new(kind, "details").with_url("http://h/a.nii.gz");
            assert!(err.to_string().starts_with(&format!("{text}: details")));
        }
        assert_eq!(
            ErrorKind::TooLarge.to_string(),
            "file larger than the cache"
        );
        assert_eq!(format!("{:>12}|", ErrorKind::Io), "   I/O error|");
    }

    #[test]
    fn full_disk_is_its_own_kind() {
        let err = Error::io("write", io::Error::from(io::ErrorKind::StorageFull));
        assert_eq!(err.kind(), ErrorKind::StorageFull);
        assert_eq!(Error::io("x", io::Error::other("y")).kind(), ErrorKind::Io);
    }

    #[test]
    fn context_on_a_shared_error_keeps_the_original() {
        let a = Error::new(ErrorKind::Network, "reset");
        let b = a.clone().with_url("http://h/x");
        assert_eq!(a.url(), None);
        assert_eq!(b.url(), Some("http://h/x"));
        assert_eq!(b.kind(), ErrorKind::Network);
    }
}
