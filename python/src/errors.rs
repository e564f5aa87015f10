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
    Python::attach(|py| match build(py, e) {
        Ok(err) => err,
        Err(import) => import,
    })
}

fn build(py: Python<'_>, e: &Error) -> PyResult<PyErr> {
    let module = MODULE.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("imgcache._errors")?.unbind())
    })?;
    let (class, kind) = class_name(e.kind());
    let class = module.bind(py).getattr(class)?.cast_into::<PyType>()?;
    let instance = class.call1((message(e), e.url(), e.status(), e.is_transient(), kind))?;
    Ok(PyErr::from_value(instance))
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
