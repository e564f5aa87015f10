//! How a Python call waits on the core: `timeout=` (the longest this call waits; the
//! download goes on for anyone else) and `progress=` (a callable taking bytes done and the
//! total, called on the caller's own thread, so that a Streamlit element it updates belongs
//! to the script's run; it runs inside the wait, so it must not call into imgcache). Ctrl-C
//! is checked every 100 ms, as in every wait.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcache::{CacheStatus, CachedFile, GetOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokio::sync::watch;

use crate::errors;
use crate::process::Process;

/// The least time between two calls of a progress callable (the last one always comes).
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// Bytes done and the total, when known.
type Report = (u64, Option<u64>);
/// The reports of the core to a waiting call: the latest one.
type Reports = watch::Receiver<Option<Report>>;

/// What a call that may download asked beyond its [`GetOptions`].
pub(crate) struct Asked {
    /// Download even if a fresh copy is cached.
    pub(crate) force: bool,
    /// Seconds the call waits at most.
    pub(crate) timeout: Option<f64>,
    /// A callable taking bytes done and the total (or `None`).
    pub(crate) progress: Option<Py<PyAny>>,
    /// A file larger than the cap is handed out uncached rather than refused.
    pub(crate) uncached_if_too_large: bool,
}

/// A `UserWarning` when `file` is larger than the cap `cap` and was handed out uncached.
pub(crate) fn warn_if_uncached(py: Python<'_>, file: &CachedFile, cap: u64) -> PyResult<()> {
    if file.status() != CacheStatus::NotStored || file.size() <= cap {
        return Ok(());
    }
    let message = format!(
        "{}: {:.1} MB is more than the cache's size cap ({:.1} MB): handed out uncached, and deleted when let go (keep it open with `with cache.open(url, uncached_if_too_large=True)`)",
        file.url(),
        file.size() as f64 / 1048576.0,
        cap as f64 / 1048576.0,
    );
    let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
    let message = std::ffi::CString::new(message).unwrap_or_default();
    PyErr::warn(py, &category, &message, 2)
}

/// What one call asked of its wait.
pub(crate) struct Waiting {
    timeout: Option<Duration>,
    progress: Option<(Py<PyAny>, Reports)>,
}

impl Waiting {
    /// `timeout` in seconds (positive), `progress` a callable. Returns the wait, and
    /// `options` with the core's report to it.
    pub(crate) fn new(
        timeout: Option<f64>,
        progress: Option<Py<PyAny>>,
        options: GetOptions,
    ) -> PyResult<(Waiting, GetOptions)> {
        let timeout = match timeout {
            None => None,
            Some(s) => match Duration::try_from_secs_f64(s) {
                Ok(d) if !d.is_zero() => Some(d),
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "timeout must be a positive number of seconds, not {s}"
                    )));
                }
            },
        };
        let (progress, options) = match progress {
            None => (None, options),
            Some(callable) => {
                let (tx, rx) = watch::channel(None);
                let tx = Arc::new(tx);
                let options = options.progress(move |done, total| {
                    tx.send_replace(Some((done, total)));
                });
                (Some((callable, rx)), options)
            }
        };
        Ok((Waiting { timeout, progress }, options))
    }

    /// Runs `fut` with the GIL released until it ends, the timeout passes (an error naming
    /// `url`; `fut` is cancel safe, the download goes on), a signal handler raises, or the
    /// progress callable raises.
    pub(crate) fn block_on<T: Send>(
        self,
        py: Python<'_>,
        process: &Process,
        url: &str,
        fut: impl Future<Output = T> + Send,
    ) -> PyResult<T> {
        let Waiting { timeout, progress } = self;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let (progress, mut reports) = match progress {
            Some((callable, rx)) => (Some(callable), Some(rx)),
            None => (None, None),
        };
        let progress = progress.as_ref();
        let mut last_report: Option<Instant> = None;
        // The last report made: one skipped for coming too soon after it is made at the end.
        let mut made: Option<Report> = None;
        let out = process.wait(py, fut, deadline, reports.as_mut(), |report| {
            if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
                last_report = Some(Instant::now());
                made = Some(report);
                call(progress, report)?;
            }
            Ok(())
        })?;
        let Some(out) = out else {
            return Err(errors::timeout(url, timeout.unwrap_or_default()));
        };
        // The last report (the whole file, which came with the end) is always made. Read as
        // the value, not as a change: the sender went with the call, which closed the channel.
        // Only a complete one: after a failure, the callable has no say over the error.
        let last = reports.as_ref().and_then(|rx| *rx.borrow());
        if let Some(report) = last
            && made != Some(report)
            && report.1 == Some(report.0)
        {
            call(progress, report)?;
        }
        Ok(out)
    }
}

/// Calls the progress callable with `(done, total)`.
fn call(progress: Option<&Py<PyAny>>, (done, total): Report) -> PyResult<()> {
    match progress {
        Some(callable) => Python::attach(|py| callable.call1(py, (done, total)).map(drop)),
        None => Ok(()),
    }
}

pub(crate) fn seconds(value: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        // The original design's `ttl_seconds or default`: 0 asks for the default.
        Some(0.0) => Ok(None),
        Some(s) => match Duration::try_from_secs_f64(s) {
            Ok(d) if !d.is_zero() => Ok(Some(d)),
            _ => Err(PyValueError::new_err(format!(
                "{what} must be a positive number of seconds, not {s}"
            ))),
        },
    }
}

pub(crate) fn options(
    ttl_seconds: Option<f64>,
    expected_sha256: Option<String>,
) -> PyResult<GetOptions> {
    let mut o = GetOptions::new();
    if let Some(ttl) = seconds(ttl_seconds, "ttl_seconds")? {
        o = o.ttl(ttl);
    }
    if let Some(sha) = expected_sha256 {
        o = o.expected_sha256(sha);
    }
    Ok(o)
}
