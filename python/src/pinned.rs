//! `CachedFile`: a file pinned for as long as the Python object is open.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use imgcache::{CacheStatus, CachedFile};
use pyo3::prelude::*;

use crate::{new_path, process};

/// A cached file pinned for as long as this object is open: no eviction, expiry,
/// `invalidate` or `clear` (in any process) removes the file until it is closed.
///
/// An object inherited through a fork is closed in the child: the pin is the parent's.
#[pyclass(module = "imgcache._native", frozen, name = "CachedFile")]
pub(crate) struct Pinned {
    generation: u64,
    file: Mutex<Option<CachedFile>>,
    path: Py<PyAny>,
    fspath: String,
    url: String,
    size: u64,
    sha256: String,
    status: &'static str,
    fetched_at: f64,
    expires_at: f64,
    etag: Option<String>,
}

impl Pinned {
    pub(crate) fn new(py: Python<'_>, file: CachedFile) -> PyResult<Self> {
        let path = match new_path(py, file.path()) {
            Ok(path) => path.unbind(),
            Err(e) => {
                // The pin goes as it would on close: with the GIL released.
                py.detach(move || drop(file));
                return Err(e);
            }
        };
        Ok(Pinned {
            generation: process::generation(),
            path,
            fspath: file.path().to_string_lossy().into_owned(),
            url: file.url().to_owned(),
            size: file.size(),
            sha256: file.sha256().to_owned(),
            status: status_name(file.status()),
            fetched_at: unix_seconds(file.fetched_at()),
            expires_at: unix_seconds(file.expires_at()),
            etag: file.etag(),
            file: Mutex::new(Some(file)),
        })
    }

    fn inherited(&self) -> bool {
        self.generation != process::generation()
    }

    /// The pin, taken out; never in a forked child, where the mutex may have been held by a
    /// parent thread at the fork and the pin belongs to the parent.
    fn take(&self) -> Option<CachedFile> {
        if self.inherited() {
            return None;
        }
        self.file.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.inherited() {
            // The parent's pin, in the parent's index: dropping it here would take the
            // inherited index lock, which a parent thread may have held at the fork.
            if let Some(file) = self
                .file
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                std::mem::forget(file);
            }
            return;
        }
        if let Some(file) = self.take() {
            if crate::logs::in_handler() {
                // In a logging handler on a thread that may hold the index lock.
                std::thread::spawn(move || drop(file));
                return;
            }
            // Unpinning may take the core's index lock: never with the GIL held.
            Python::attach(|py| py.detach(move || drop(file)));
        }
    }
}

#[pymethods]
impl Pinned {
    #[getter]
    fn path(&self, py: Python<'_>) -> Py<PyAny> {
        self.path.clone_ref(py)
    }
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }
    #[getter]
    fn sha256(&self) -> &str {
        &self.sha256
    }
    /// "hit", "downloaded", "coalesced", "revalidated" or "stale".
    #[getter]
    fn status(&self) -> &str {
        self.status
    }
    /// Seconds since the epoch.
    #[getter]
    fn fetched_at(&self) -> f64 {
        self.fetched_at
    }
    #[getter]
    fn expires_at(&self) -> f64 {
        self.expires_at
    }
    #[getter]
    fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }
    #[getter]
    fn closed(&self) -> bool {
        self.inherited()
            || self
                .file
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
    }

    fn __fspath__(&self) -> &str {
        &self.fspath
    }

    /// Lets go of the pin (idempotent).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        process::in_handler()?;
        if let Some(file) = self.take() {
            py.detach(move || drop(file));
        }
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "imgcache.CachedFile(path={:?}, size={}, status={:?}{})",
            self.fspath,
            self.size,
            self.status,
            if self.closed() { ", closed" } else { "" }
        )
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub(crate) fn status_name(status: CacheStatus) -> &'static str {
    match status {
        CacheStatus::Hit => "hit",
        CacheStatus::Downloaded => "downloaded",
        CacheStatus::Coalesced => "coalesced",
        CacheStatus::Revalidated => "revalidated",
        CacheStatus::Stale => "stale",
        CacheStatus::Shared => "shared",
        CacheStatus::NotStored => "not_stored",
        _ => "other",
    }
}
