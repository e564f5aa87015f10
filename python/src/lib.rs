//! `imgcache._native`: the Rust core as Python objects. The package `imgcache` (pure Python,
//! beside this crate) wraps it in the original design's names; this module keeps the parts
//! that must be fast or must not hold the GIL.
//!
//! - Every call into the core runs with the GIL released (`Python::detach`), so that no
//!   Python thread ever holds the GIL while it waits on a lock of the core, and a core thread
//!   that logs (which takes the GIL) can never wait on such a thread. Pins are let go of
//!   (which may take the core's index lock) with the GIL released too, error paths included.
//! - A hit is tried first without entering the runtime (`get_cached_with`); a miss blocks on
//!   the runtime, waking every 100 ms for Python's signal handlers.
//! - A path that `get` returns stays pinned by its handle for `hold_seconds` (see `holds`),
//!   so that it is not evicted (by this process or another) between the call and the caller
//!   opening it; calling again within that time is the re-pin path of the core (an `fstat`
//!   and an `lstat`, no `open`/`flock`), and hands out the same `pathlib.Path` object.
//! - After a fork the child builds its runtime and each cache again, from the settings the
//!   parent had at the moment of the fork, and never drops (nor locks) what it inherited.

mod clock;
mod convert;
mod errors;
mod holds;
mod logs;
mod pinned;
mod process;
mod state;
mod stream;
mod wait;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use clock::ManualClock;
use imgcache::{CachedFile, ErrorKind, GetOptions, MB};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;

use errors::IntoPy as _;
use holds::{Held, Holds};
use pinned::Pinned;
use process::ForkLock;
use state::{HoldClock, Settings, State, let_go, let_go_of_old_holds, unpin};
use wait::{Asked, Waiting, options, seconds};

/// The longest `hold_seconds`: a hold is for the moment between a call and an `open`.
const MAX_HOLD: Duration = Duration::from_secs(24 * 3600);

static PATH_CLASS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn new_path<'py>(py: Python<'py>, path: &std::path::Path) -> PyResult<Bound<'py, PyAny>> {
    PATH_CLASS
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("pathlib")?.getattr("Path")?.unbind())
        })?
        .bind(py)
        .call1((path,))
}

fn closed_error() -> PyErr {
    errors::of_kind(ErrorKind::Shutdown, "the cache was closed")
}

/// A cache handle: the Rust `ImageCache` of this process for one configuration.
#[pyclass(module = "imgcache._native", frozen, weakref)]
struct Cache {
    settings: ArcSwap<Settings>,
    hold: Duration,
    state: ArcSwapOption<State>,
    /// Taken only to open the cache, once per process.
    opening: ForkLock,
    closed: AtomicBool,
}

impl Cache {
    /// The cache of this process, opened again after a fork.
    fn state(&self, py: Python<'_>) -> PyResult<Arc<State>> {
        process::in_handler()?;
        logs::refresh_if_due(py);
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_error());
        }
        let now = process::generation();
        if let Some(s) = &*self.state.load()
            && s.generation == now
        {
            return Ok(Arc::clone(s));
        }
        process::nested()?;
        py.detach(|| {
            self.opening.with(|| {
                if let Some(s) = self.state.load_full()
                    && s.generation == now
                {
                    return Ok(s);
                }
                self.open_now(now)
            })
        })
    }

    fn open_now(&self, now: u64) -> PyResult<Arc<State>> {
        let process = process::current()
            .map_err(|e| errors::internal(format!("cannot start the runtime: {e}")))?;
        let settings = self.settings.load_full();
        let builder = settings.builder().py_err()?;
        let cache = process.runtime.block_on(builder.build()).py_err()?;
        self.settings.store(Arc::new(settings.resolved(&cache)));
        let state = Arc::new(State {
            generation: now,
            process: Arc::clone(&process),
            cap: AtomicU64::new(cache.stats().max_size_bytes),
            cache,
            holds: Mutex::new(Holds::default()),
            hold_clock: HoldClock::new(settings.clock.as_ref()),
        });
        if !self.hold.is_zero() {
            let every = (self.hold / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
            process
                .runtime
                .spawn(let_go_of_old_holds(Arc::downgrade(&state), every));
        }
        let old = self.state.swap(Some(Arc::clone(&state)));
        if let Some(old) = old {
            // The parent's cache, inherited through a fork: its tasks and threads are gone
            // and its locks are the parent's. Leaked, never dropped.
            std::mem::forget(old);
        }
        Ok(state)
    }

    /// Records a change of setting for a forked child.
    fn record(&self, change: impl Fn(&mut Settings)) {
        self.settings.rcu(|s| {
            let mut s = Settings::clone(s);
            change(&mut s);
            s
        });
    }

    /// Holds `file` under `url` for `hold` and returns its `pathlib.Path`.
    fn hand_out(
        &self,
        py: Python<'_>,
        state: &State,
        url: &str,
        file: CachedFile,
    ) -> PyResult<Py<PyAny>> {
        if self.hold.is_zero() {
            let path = new_path(py, file.path()).map(Bound::unbind);
            unpin(py, file);
            return path;
        }
        let until = state
            .hold_clock
            .now()
            .checked_add(self.hold)
            .unwrap_or_else(state::far_future);
        let renewed = state.lock_holds().renew(py, url, file, until);
        let file = match renewed {
            Ok((path, older)) => {
                unpin(py, older);
                return Ok(path);
            }
            Err(file) => file,
        };
        // Python code, so not under the lock: a racing call may hold the file meanwhile,
        // which `insert` sees.
        let path = match new_path(py, file.path()) {
            Ok(path) => path.unbind(),
            Err(e) => {
                unpin(py, file);
                return Err(e);
            }
        };
        let cap = state.cap.load(Ordering::Relaxed);
        let held = Held { file, path, until };
        let (path, gone) = state.lock_holds().insert(py, url, held, cap);
        let_go(py, gone);
        Ok(path)
    }

    fn get_file(
        &self,
        py: Python<'_>,
        url: &str,
        options: GetOptions,
        asked: Asked,
    ) -> PyResult<(Arc<State>, CachedFile)> {
        let state = self.state(py)?;
        let cache = &state.cache;
        let options = options
            .force(asked.force)
            .uncached_if_too_large(asked.uncached_if_too_large);
        let (waiting, options) = Waiting::new(asked.timeout, asked.progress, options)?;
        if let Some(hit) = py.detach(|| cache.get_cached_with(url, &options)) {
            return Ok((state, hit));
        }
        let file = waiting
            .block_on(py, &state.process, url, cache.get_with(url, options))?
            .py_err()?;
        wait::warn_if_uncached(py, &file, state.cap.load(Ordering::Relaxed))?;
        Ok((state, file))
    }

    /// The event loop's locals, the state and the hit for an asyncio call. The hit is tried
    /// on the caller's thread (it touches the disk, which a runtime thread must not wait
    /// on), after everything that can fail without an event loop.
    fn start_async(
        &self,
        py: Python<'_>,
        url: &str,
        options: &GetOptions,
    ) -> PyResult<(pyo3_async_runtimes::TaskLocals, Arc<State>, Unpinned)> {
        let locals = pyo3_async_runtimes::generic::get_current_locals::<process::AsyncRuntime>(py)?;
        let state = self.state(py)?;
        let hit = py.detach(|| state.cache.get_cached_with(url, options));
        Ok((locals, state, Unpinned(hit)))
    }
}

/// A hit carried into an asyncio future. Should the future be dropped before it runs (the
/// bridge failing to set it up, with the GIL held), the pin goes on a blocking thread of
/// the runtime, never with the GIL held.
struct Unpinned(Option<CachedFile>);

impl Drop for Unpinned {
    fn drop(&mut self) {
        if let Some(file) = self.0.take()
            && let Ok(process) = process::current()
        {
            process.runtime.spawn_blocking(move || drop(file));
        }
    }
}

/// The rest of an asyncio get: the hit, else the download (on a runtime thread, without
/// the GIL).
async fn finish_async(
    state: &State,
    url: &str,
    options: GetOptions,
    mut hit: Unpinned,
) -> PyResult<CachedFile> {
    match hit.0.take() {
        Some(hit) => Ok(hit),
        None => state.cache.get_with(url, options).await.py_err(),
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let Some(state) = self.state.swap(None) else {
            return;
        };
        if state.generation != process::generation() {
            // Inherited through a fork: never dropped (see `open_now`).
            std::mem::forget(state);
            return;
        }
        if logs::in_handler() {
            // In a logging handler on a thread that may hold one of the core's locks.
            std::thread::spawn(move || drop(state));
            return;
        }
        // Closing takes the core's locks: never with the GIL held.
        Python::attach(|py| py.detach(move || drop(state)));
    }
}

#[pymethods]
impl Cache {
    #[new]
    #[pyo3(signature = (cache_dir=None, max_size_bytes=None, default_ttl_seconds=None, image_server=None, *, offline=None, hold_seconds=10.0, dotenv=None, clock=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        cache_dir: Option<PathBuf>,
        max_size_bytes: Option<u64>,
        default_ttl_seconds: Option<f64>,
        image_server: Option<String>,
        offline: Option<bool>,
        hold_seconds: f64,
        dotenv: Option<PathBuf>,
        clock: Option<PyRef<'_, ManualClock>>,
    ) -> PyResult<Self> {
        let hold = match Duration::try_from_secs_f64(hold_seconds) {
            Ok(hold) if hold <= MAX_HOLD => hold,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "hold_seconds must be from 0 to {} (a day), not {hold_seconds}",
                    MAX_HOLD.as_secs()
                )));
            }
        };
        let settings = Settings {
            cache_dir,
            max_size_bytes,
            default_ttl: seconds(default_ttl_seconds, "default_ttl_seconds")?,
            image_server,
            offline,
            dotenv,
            clock: clock.map(|c| Arc::clone(&c.clock)),
        };
        let cache = Cache {
            settings: ArcSwap::from_pointee(settings),
            hold,
            state: ArcSwapOption::const_empty(),
            opening: ForkLock::new(),
            closed: AtomicBool::new(false),
        };
        // Opened now, so that a bad setting fails here rather than at the first get.
        cache.state(py)?;
        Ok(cache)
    }

    /// The local path of `url`, downloaded if it is not cached and fresh.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false, *, timeout=None, progress=None, uncached_if_too_large=false))]
    #[allow(clippy::too_many_arguments)]
    fn get(
        &self,
        py: Python<'_>,
        url: &str,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
        timeout: Option<f64>,
        progress: Option<Py<PyAny>>,
        uncached_if_too_large: bool,
    ) -> PyResult<Py<PyAny>> {
        if uncached_if_too_large && self.hold.is_zero() {
            // An uncached file goes with its last handle: without a hold, before the caller
            // could open the path.
            return Err(PyValueError::new_err(
                "uncached_if_too_large needs hold_seconds > 0 for a path; open() keeps the file for a block",
            ));
        }
        let options = options(ttl_seconds, expected_sha256)?;
        let asked = Asked {
            force,
            timeout,
            progress,
            uncached_if_too_large,
        };
        let (state, file) = self.get_file(py, url, options, asked)?;
        self.hand_out(py, &state, url, file)
    }

    /// The local path of `url` if it is cached and fresh; never touches the network.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None))]
    fn get_cached(
        &self,
        py: Python<'_>,
        url: &str,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let options = options(ttl_seconds, expected_sha256)?;
        let state = self.state(py)?;
        let cache = &state.cache;
        match py.detach(|| cache.get_cached_with(url, &options)) {
            Some(file) => Ok(Some(self.hand_out(py, &state, url, file)?)),
            None => Ok(None),
        }
    }

    /// `url`'s file, pinned until the returned object is closed.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false, *, timeout=None, progress=None, uncached_if_too_large=false))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        &self,
        py: Python<'_>,
        url: &str,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
        timeout: Option<f64>,
        progress: Option<Py<PyAny>>,
        uncached_if_too_large: bool,
    ) -> PyResult<Pinned> {
        let options = options(ttl_seconds, expected_sha256)?;
        let asked = Asked {
            force,
            timeout,
            progress,
            uncached_if_too_large,
        };
        let (_, file) = self.get_file(py, url, options, asked)?;
        Pinned::new(py, file)
    }

    /// `url`'s bytes as they are cached: a `Stream` whose reads start with the download's
    /// first bytes and end after the commit.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false, *, uncached_if_too_large=false))]
    fn stream(
        &self,
        py: Python<'_>,
        url: &str,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
        uncached_if_too_large: bool,
    ) -> PyResult<stream::Stream> {
        let options = options(ttl_seconds, expected_sha256)?
            .force(force)
            .uncached_if_too_large(uncached_if_too_large);
        let state = self.state(py)?;
        let opened = state
            .process
            .block_on(py, state.cache.get_stream_with(url, options))?
            .py_err()?;
        Ok(stream::Stream::new(Arc::clone(&state.process), opened))
    }

    /// `get` for asyncio: an awaitable of the path.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false))]
    fn aget<'py>(
        slf: Bound<'py, Self>,
        url: String,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let options = options(ttl_seconds, expected_sha256)?.force(force);
        let (locals, state, hit) = slf.get().start_async(py, &url, &options)?;
        let handle: Py<Cache> = slf.clone().unbind();
        pyo3_async_runtimes::generic::future_into_py_with_locals::<process::AsyncRuntime, _, _>(
            py,
            locals,
            async move {
                let file = finish_async(&state, &url, options, hit).await?;
                Python::attach(|py| handle.get().hand_out(py, &state, &url, file))
            },
        )
    }

    /// `open` for asyncio: an awaitable of the pinned file.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false))]
    fn aopen<'py>(
        &self,
        py: Python<'py>,
        url: String,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let options = options(ttl_seconds, expected_sha256)?.force(force);
        let (locals, state, hit) = self.start_async(py, &url, &options)?;
        pyo3_async_runtimes::generic::future_into_py_with_locals::<process::AsyncRuntime, _, _>(
            py,
            locals,
            async move {
                let file = finish_async(&state, &url, options, hit).await?;
                Python::attach(|py| Pinned::new(py, file))
            },
        )
    }

    /// Removes `url`'s entry; whether there was one. A held path stays readable until its
    /// hold ends (the core deletes a removed file when its last pin goes).
    fn invalidate(&self, py: Python<'_>, url: &str) -> PyResult<bool> {
        let state = self.state(py)?;
        let removed = state
            .process
            .block_on(py, state.cache.invalidate(url))?
            .py_err()?;
        Ok(removed)
    }

    /// Removes every entry; how many there were. Held paths stay until their holds end.
    fn clear(&self, py: Python<'_>) -> PyResult<u64> {
        let state = self.state(py)?;
        state.process.block_on(py, state.cache.clear())?.py_err()
    }

    /// Removes expired entries and enforces the cap now:
    /// `{expired, evicted, bytes_freed, kept_in_use}`. A held expired file is kept in use
    /// and goes when its hold ends.
    fn cleanup<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        let report = state
            .process
            .block_on(py, state.cache.cleanup())?
            .py_err()?;
        convert::record(py, &report)
    }

    /// Re-hashes `url`'s file: "ok", "corrupt" (removed) or "not_cached".
    fn verify<'py>(&self, py: Python<'py>, url: &str) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        let found = state
            .process
            .block_on(py, state.cache.admin().verify(url))?
            .py_err()?;
        state.release_stale(py);
        convert::record(py, &found)
    }

    /// Re-hashes every file: `{checked, corrupt, ...}`.
    fn verify_all<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        let report = state
            .process
            .block_on(py, state.cache.admin().verify_all())?
            .py_err()?;
        state.release_stale(py);
        convert::record(py, &report)
    }

    /// The figures, as a dict (the keys of the Rust `Stats`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        // The directory's figures as of now: what other processes (forked workers among
        // them) counted and saved is read first.
        let stats = state
            .process
            .block_on(py, state.cache.admin().stats_now())?;
        convert::record(py, &stats)
    }

    /// Every entry, most recently used first, as dicts.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let state = self.state(py)?;
        let entries = py.detach(|| state.cache.admin().entries());
        let list = PyList::empty(py);
        for e in &entries {
            list.append(convert::record(py, e)?)?;
        }
        Ok(list)
    }

    fn reset_stats(&self, py: Python<'_>) -> PyResult<()> {
        let state = self.state(py)?;
        py.detach(|| state.cache.admin().reset_stats());
        Ok(())
    }

    /// Sets the size cap; a smaller one evicts at once what nobody holds, and held paths
    /// when their holds end.
    fn set_max_size_bytes(&self, py: Python<'_>, bytes: u64) -> PyResult<()> {
        let state = self.state(py)?;
        py.detach(|| state.cache.admin().set_max_size_bytes(bytes))
            .py_err()?;
        state.cap.store(bytes, Ordering::Relaxed);
        self.record(|s| s.max_size_bytes = Some(bytes));
        Ok(())
    }

    fn set_default_ttl_seconds(&self, py: Python<'_>, seconds: f64) -> PyResult<()> {
        let state = self.state(py)?;
        let ttl = match Duration::try_from_secs_f64(seconds) {
            Ok(ttl) if !ttl.is_zero() => ttl,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "the TTL must be a positive number of seconds, not {seconds}"
                )));
            }
        };
        py.detach(|| state.cache.admin().set_default_ttl(ttl))
            .py_err()?;
        self.record(|s| s.default_ttl = Some(ttl));
        Ok(())
    }

    #[getter]
    fn max_size_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        let state = self.state(py)?;
        Ok(py.detach(|| state.cache.stats().max_size_bytes))
    }

    #[getter]
    fn default_ttl_seconds(&self, py: Python<'_>) -> PyResult<f64> {
        let state = self.state(py)?;
        Ok(py.detach(|| state.cache.stats().default_ttl_hours) * 3600.0)
    }

    #[getter]
    fn cache_dir<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        new_path(py, state.cache.admin().cache_dir())
    }

    #[getter]
    fn image_server(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let state = self.state(py)?;
        Ok(state
            .cache
            .admin()
            .image_server()
            .map(|s| state.cache.admin().redacted(s)))
    }

    #[getter]
    fn hold_seconds(&self) -> f64 {
        self.hold.as_secs_f64()
    }

    /// How many files the holds pin, and their bytes: `(files, bytes)`.
    #[getter]
    fn held(&self, py: Python<'_>) -> PyResult<(usize, u64)> {
        let state = self.state(py)?;
        let holds = state.lock_holds();
        Ok((holds.len(), holds.bytes()))
    }

    /// `url` without user-info and with signing query parameters redacted.
    fn redacted(&self, py: Python<'_>, url: &str) -> PyResult<String> {
        Ok(self.state(py)?.cache.admin().redacted(url))
    }

    /// Lets go of every path this handle holds and shuts the cache down: the figures are
    /// saved and later calls raise `ShutdownError`. It waits for the downloads running in
    /// this process, unless `stop_downloads` (at interpreter exit: nobody waits for them any
    /// more), which stops them with their part files kept for the next process to resume.
    #[pyo3(signature = (stop_downloads=false))]
    fn close(&self, py: Python<'_>, stop_downloads: bool) -> PyResult<()> {
        process::in_handler()?;
        process::nested()?;
        let state = self
            .state
            .load_full()
            .filter(|state| state.generation == process::generation());
        if stop_downloads && let Some(state) = &state {
            // Also after a close that a Ctrl-C interrupted while it waited for them.
            state.cache.admin().stop_downloads();
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some(state) = state else {
            return Ok(());
        };
        let gone = state.lock_holds().close();
        let_go(py, gone);
        state.process.block_on(py, state.cache.shutdown())?;
        Ok(())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn __repr__(&self) -> String {
        let settings = self.settings.load();
        let dir = settings.cache_dir.as_ref().map(|d| d.display().to_string());
        let server = self.state.load().as_ref().and_then(|s| {
            s.cache
                .admin()
                .image_server()
                .map(|u| s.cache.admin().redacted(u))
        });
        format!("imgcache.Cache(cache_dir={dir:?}, image_server={server:?})")
    }
}

/// Bytes in one MB, as `CACHE_MAX_SIZE_MB` counts them (2^20).
#[pyfunction]
fn mb() -> u64 {
    MB
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logs::install();
    m.add_class::<Cache>()?;
    m.add_class::<Pinned>()?;
    m.add_class::<ManualClock>()?;
    m.add_class::<stream::Stream>()?;
    m.add_function(wrap_pyfunction!(process::forked, m)?)?;
    m.add_function(wrap_pyfunction!(logs::refresh_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(mb, m)?)?;
    m.add("DEFAULT_MAX_SIZE_BYTES", imgcache::DEFAULT_MAX_SIZE_BYTES)?;
    m.add("DEFAULT_TTL_SECONDS", imgcache::DEFAULT_TTL.as_secs())?;
    Ok(())
}
