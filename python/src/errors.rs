//! The cache's errors as Python exceptions: one class per [`ErrorKind`], all below
//! `imgcache.CacheError`, defined in `imgcache/_errors.py` (so that they pickle and carry
//! `url`, `status`, `is_transient` and `kind`).

use std::error::Error as _;

use imgcache::{Error, ErrorKind};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The name of the Python class for `kind`, and the `kind` attribute's value.
pub(crate) fn class_name(kind: ErrorKind) -> (&'static str, &'static str) {
    match kind {
        ErrorKind::InvalidUrl => ("InvalidUrlError", "invalid_url"),
        ErrorKind::HttpStatus => ("HttpStatusError", "http_status"),
        ErrorKind::Network => ("NetworkError", "network"),
        ErrorKind::Incomplete => ("IncompleteDownloadError", "incomplete"),
        ErrorKind::ChecksumMismatch => ("ChecksumMismatchError", "checksum_mismatch"),
        ErrorKind::TooLarge => ("TooLargeError", "too_large"),
        ErrorKind::StorageFull => ("StorageFullError", "storage_full"),
        ErrorKind::Io => ("CacheIOError", "io"),
        ErrorKind::Config => ("ConfigError", "config"),
        ErrorKind::Locked => ("LockedError", "locked"),
        ErrorKind::NotCached => ("NotCachedError", "not_cached"),
        ErrorKind::Shutdown => ("ShutdownError", "shutdown"),
        ErrorKind::Internal => ("InternalError", "internal"),
        _ => ("CacheError", "other"),
    }
}

static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The error and its causes, as one line: what `str(exc)` shows.
fn message(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// `e` as an instance of its Python class.
pub(crate) fn to_py(e: &Error) -> PyErr {
    let status = e.status();
    exception(e.kind(), &message(e), e.url(), status, e.is_transient())
}

/// An exception of `kind`'s class that the core did not raise (a handle used after `close`,
/// a call the package refuses), with no URL or status.
pub(crate) fn of_kind(kind: ErrorKind, message: &str) -> PyErr {
    exception(kind, message, None, None, false)
}

/// The error of a call whose `timeout=` passed: a `NetworkError` and a `TimeoutError`.
pub(crate) fn timeout(url: &str, after: std::time::Duration) -> PyErr {
    let message = format!(
        "no file within the call's timeout of {:.1} s; the download goes on, and a later call joins it or finds the file",
        after.as_secs_f64()
    );
    made(
        ("DownloadTimeoutError", "network"),
        &message,
        Some(url),
        None,
        true,
    )
}

fn exception(
    kind: ErrorKind,
    message: &str,
    url: Option<&str>,
    status: Option<u16>,
    transient: bool,
) -> PyErr {
    let class = match (kind, status) {
        // A missing file is a FileNotFoundError and a LookupError too.
        (ErrorKind::HttpStatus, Some(404 | 410)) => ("NotFoundError", "http_status"),
        _ => class_name(kind),
    };
    made(class, message, url, status, transient)
}

/// An instance of the class named `class`, of kind `name`.
fn made(
    (class, name): (&str, &str),
    message: &str,
    url: Option<&str>,
    status: Option<u16>,
    transient: bool,
) -> PyErr {
    Python::attach(|py| {
        let made = (|| -> PyResult<PyErr> {
            let module = MODULE.get_or_try_init(py, || {
                Ok::<_, PyErr>(py.import("imgcache._errors")?.unbind())
            })?;
            let class = module.bind(py).getattr(class)?.cast_into::<PyType>()?;
            let instance = class.call1((message, url, status, transient, name))?;
            Ok(PyErr::from_value(instance))
        })();
        // The classes failed to import: that error says more than any other.
        made.unwrap_or_else(|import| import)
    })
}

/// A bug in this package rather than a failure of the cache.
pub(crate) fn internal(what: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("imgcache: {what}"))
}

pub(crate) trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for imgcache::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(|e| to_py(&e))
    }
}
