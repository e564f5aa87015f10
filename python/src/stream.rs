//! `Stream`: a file's bytes while it is being cached (`imgcache.FileReader` wraps it in a
//! file object). Each read blocks on the runtime with the GIL released.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use imgcache::FileStream;
use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::process::{self, Process};

#[pyclass(module = "imgcache._native", frozen, name = "Stream")]
pub(crate) struct Stream {
    generation: u64,
    process: Arc<Process>,
    /// Taken out while a read runs (so that no lock is held across it).
    stream: Mutex<Option<FileStream>>,
    /// Left of the last chunk.
    left: Mutex<bytes::Bytes>,
    len: Option<u64>,
    status: &'static str,
}

impl Stream {
    pub(crate) fn new(process: Arc<Process>, stream: FileStream) -> Stream {
        Stream {
            generation: process::generation(),
            process,
            len: stream.len(),
            status: crate::pinned::status_name(stream.status()),
            stream: Mutex::new(Some(stream)),
            left: Mutex::new(bytes::Bytes::new()),
        }
    }

    fn lock_left(&self) -> std::sync::MutexGuard<'_, bytes::Bytes> {
        self.left.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.generation != process::generation() {
            // The parent's stream, on the parent's runtime: never dropped here.
            if let Some(stream) = self
                .stream
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                std::mem::forget(stream);
            }
        }
    }
}

fn io_error(e: std::io::Error) -> PyErr {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<imgcache::Error>())
    {
        Some(cache_error) => crate::errors::to_py(cache_error),
        None => PyOSError::new_err(e.to_string()),
    }
}

#[pymethods]
impl Stream {
    /// Up to `size` bytes (a chunk, whatever is next); `b""` at the end, which comes only
    /// after the file is committed. A failed download raises its `CacheError`.
    #[pyo3(signature = (size=262144))]
    fn read<'py>(&self, py: Python<'py>, size: usize) -> PyResult<Bound<'py, PyBytes>> {
        if self.generation != process::generation() {
            return Err(PyRuntimeError::new_err(
                "this stream belongs to the process that opened it (before a fork)",
            ));
        }
        process::in_handler()?;
        let size = size.max(1);
        {
            let mut left = self.lock_left();
            if !left.is_empty() {
                let n = size.min(left.len());
                let chunk = left.split_to(n);
                return Ok(PyBytes::new(py, &chunk));
            }
        }
        let Some(mut stream) = self.stream.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Err(PyRuntimeError::new_err(
                "the stream is closed, or being read by another thread",
            ));
        };
        let next = self.process.block_on(py, async { stream.next().await });
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        match next? {
            None => Ok(PyBytes::new(py, b"")),
            Some(Err(e)) => Err(io_error(e)),
            Some(Ok(mut chunk)) => {
                let n = size.min(chunk.len());
                let rest = chunk.split_off(n);
                *self.lock_left() = rest;
                Ok(PyBytes::new(py, &chunk))
            }
        }
    }

    /// The file's length when known (the origin's `Content-Length` while downloading).
    #[getter]
    fn len(&self) -> Option<u64> {
        self.len
    }

    /// "hit", "downloaded" (this stream started the download) or "coalesced".
    #[getter]
    fn status(&self) -> &str {
        self.status
    }

    /// Stops reading; the download goes on for everyone else.
    fn close(&self, py: Python<'_>) {
        let taken = self.stream.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(stream) = taken
            && self.generation == process::generation()
        {
            py.detach(move || drop(stream));
        }
    }
}
