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
    /// The stream and what is left of its last chunk, under one lock so that two threads
    /// never split a chunk between them; the stream is taken out while a read runs (so
    /// that no lock is held across it).
    state: Mutex<State>,
    len: Option<u64>,
    status: &'static str,
}

enum State {
    Idle(FileStream, bytes::Bytes),
    Busy,
    Closed,
}

impl Stream {
    pub(crate) fn new(process: Arc<Process>, stream: FileStream) -> Stream {
        Stream {
            generation: process::generation(),
            process,
            len: stream.len(),
            status: crate::pinned::status_name(stream.status()),
            state: Mutex::new(State::Idle(stream, bytes::Bytes::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the stream, and takes it out unless a read has it (which lets it go when it
    /// ends).
    fn take(&self) -> Option<FileStream> {
        match std::mem::replace(&mut *self.lock(), State::Closed) {
            State::Idle(stream, _) => Some(stream),
            State::Busy | State::Closed => None,
        }
    }

    /// Lets the stream go: in this process off the GIL (its drop may touch the disk); a
    /// parent's, inherited through a fork, is never dropped here.
    fn release(&self, stream: FileStream) {
        if self.generation == process::generation() {
            Python::attach(|py| py.detach(move || drop(stream)));
        } else {
            std::mem::forget(stream);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // No lock taken: in a forked child, another thread of the parent may have held it.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let State::Idle(stream, _) = std::mem::replace(state, State::Closed) {
            self.release(stream);
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
        let mut stream = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, State::Busy) {
                State::Idle(stream, mut left) if !left.is_empty() => {
                    let chunk = left.split_to(size.min(left.len()));
                    *state = State::Idle(stream, left);
                    return Ok(PyBytes::new(py, &chunk));
                }
                State::Idle(stream, _) => stream,
                other => {
                    let closed = matches!(other, State::Closed);
                    *state = other;
                    return Err(PyRuntimeError::new_err(if closed {
                        "the stream is closed"
                    } else {
                        "the stream is being read by another thread"
                    }));
                }
            }
        };
        let next = self.process.block_on(py, async { stream.next().await });
        let (result, left) = match next {
            Err(e) => (Err(e), bytes::Bytes::new()),
            Ok(None) => (Ok(PyBytes::new(py, b"")), bytes::Bytes::new()),
            Ok(Some(Err(e))) => (Err(io_error(e)), bytes::Bytes::new()),
            Ok(Some(Ok(mut chunk))) => {
                let rest = chunk.split_off(size.min(chunk.len()));
                (Ok(PyBytes::new(py, &chunk)), rest)
            }
        };
        {
            let mut state = self.lock();
            if matches!(*state, State::Busy) {
                *state = State::Idle(stream, left);
                return result;
            }
        }
        // Closed by another thread while this read ran.
        py.detach(move || drop(stream));
        result
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

    /// Stops reading; the download goes on for everyone else. A read running in another
    /// thread ends first; the stream is let go after it.
    fn close(&self) {
        if let Some(stream) = self.take() {
            self.release(stream);
        }
    }
}
