//! `imgcache._native`: the Rust core as Python objects. The package `imgcache` (pure Python,
//! beside this crate) wraps it in the original design's names; this module keeps the parts
//! that must be fast or must not hold the GIL.
//!
//! - Every call into the core runs with the GIL released (`Python::detach`), so that no
//!   Python thread ever holds the GIL while it waits on a lock of the core, and a core thread
//!   that logs (which takes the GIL) can never wait on such a thread.
//! - A hit is tried first without entering the runtime (`get_cached_with`); a miss blocks on
//!   the runtime, waking every 100 ms for Python's signal handlers.
//! - A path that `get` returns stays pinned by its handle for `hold_seconds`, so that it is
//!   not evicted (by this process or another) between the call and the caller opening it;
//!   calling again within that time is the re-pin path of the core (an `fstat` and an
//!   `lstat`, no `open`/`flock`), and hands out the same `pathlib.Path` object.

mod convert;
mod errors;
mod logs;
mod process;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use imgcache::{CacheBuilder, CacheStatus, CachedFile, GetOptions, ImageCache, MB};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;

use errors::IntoPy as _;
use process::Process;

/// What a handle is built from; kept to build it again in a forked child.
#[derive(Clone)]
struct Settings {
    cache_dir: Option<PathBuf>,
    max_size_bytes: Option<u64>,
    default_ttl: Option<Duration>,
    image_server: Option<String>,
    offline: Option<bool>,
    dotenv: Option<PathBuf>,
    clock: Option<Arc<imgcache::ManualClock>>,
}

impl Settings {
    fn builder(&self) -> imgcache::Result<CacheBuilder> {
        let mut b = match &self.dotenv {
            Some(file) => CacheBuilder::from_env_and_file(file)?,
            None => CacheBuilder::from_env()?,
        };
        if let Some(dir) = &self.cache_dir {
            b = b.cache_dir(dir);
        }
        if let Some(bytes) = self.max_size_bytes {
            b = b.max_size_bytes(bytes);
        }
        if let Some(ttl) = self.default_ttl {
            b = b.default_ttl(ttl);
        }
        if let Some(server) = &self.image_server {
            b = b.image_server(server);
        }
        if let Some(offline) = self.offline {
            b = b.offline(offline);
        }
        if let Some(clock) = &self.clock {
            b = b.clock(Arc::clone(clock) as Arc<dyn imgcache::Clock>);
        }
        Ok(b)
    }
}

/// A path handed out by `get`, pinned for a while.
struct Held {
    file: CachedFile,
    path: Py<PyAny>,
    until: Instant,
}

/// One process's open cache behind a handle.
struct State {
    generation: u64,
    process: Arc<Process>,
    cache: ImageCache,
    held: Mutex<HashMap<String, Held>>,
}

impl State {
    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the holds `keep` rejects; the pins go with the GIL released.
    fn release(&self, py: Python<'_>, mut keep: impl FnMut(&str, &Held) -> bool) {
        let gone: Vec<Held> = {
            let mut held = self.lock_held();
            let doomed: Vec<String> = held
                .iter()
                .filter(|(url, h)| !keep(url, h))
                .map(|(url, _)| url.clone())
                .collect();
            doomed.iter().filter_map(|url| held.remove(url)).collect()
        };
        let (files, paths): (Vec<_>, Vec<_>) = gone.into_iter().map(|h| (h.file, h.path)).unzip();
        py.detach(move || drop(files));
        drop(paths);
    }
}

/// The async path of a get: a hit, else the download (on a runtime thread, without the GIL).
async fn fetch(state: &State, url: &str, options: GetOptions) -> PyResult<CachedFile> {
    match state.cache.get_cached_with(url, &options) {
        Some(hit) => Ok(hit),
        None => state.cache.get_with(url, options).await.py_err(),
    }
}

/// Lets go of the holds whose time is up, every `every`, while the state lives.
async fn let_go_of_old_holds(state: std::sync::Weak<State>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let now = Instant::now();
        let gone: Vec<Held> = {
            let mut held = state.lock_held();
            let old: Vec<String> = held
                .iter()
                .filter(|(_, h)| h.until <= now)
                .map(|(url, _)| url.clone())
                .collect();
            old.iter().filter_map(|url| held.remove(url)).collect()
        };
        // Off the GIL: the paths' references are let go of by PyO3 the next time any
        // thread holds it.
        drop(gone);
    }
}

static PATH_CLASS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn new_path<'py>(py: Python<'py>, path: &std::path::Path) -> PyResult<Bound<'py, PyAny>> {
    PATH_CLASS
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("pathlib")?.getattr("Path")?.unbind())
        })?
        .bind(py)
        .call1((path,))
}

fn seconds(value: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        // The original design's `ttl_seconds or default`: 0 asks for the default.
        Some(0.0) => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(PyValueError::new_err(format!(
            "{what} must be a positive number of seconds, not {s}"
        ))),
    }
}

fn options(ttl_seconds: Option<f64>, expected_sha256: Option<String>) -> PyResult<GetOptions> {
    let mut o = GetOptions::new();
    if let Some(ttl) = seconds(ttl_seconds, "ttl_seconds")? {
        o = o.ttl(ttl);
    }
    if let Some(sha) = expected_sha256 {
        o = o.expected_sha256(sha);
    }
    Ok(o)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn status_name(status: CacheStatus) -> &'static str {
    match status {
        CacheStatus::Hit => "hit",
        CacheStatus::Downloaded => "downloaded",
        CacheStatus::Coalesced => "coalesced",
        CacheStatus::Revalidated => "revalidated",
        CacheStatus::Stale => "stale",
        _ => "other",
    }
}

/// A cache handle: the Rust `ImageCache` of this process for one configuration.
#[pyclass(module = "imgcache._native", frozen, weakref)]
struct Cache {
    settings: Settings,
    hold: Duration,
    state: ArcSwapOption<State>,
    /// Taken only to open the cache, once per process.
    opening: Mutex<()>,
}

impl Cache {
    /// The cache of this process, opened again after a fork.
    fn state(&self, py: Python<'_>) -> PyResult<Arc<State>> {
        let now = process::generation();
        if let Some(s) = &*self.state.load()
            && s.generation == now
        {
            return Ok(Arc::clone(s));
        }
        py.detach(|| {
            let _opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = self.state.load_full()
                && s.generation == now
            {
                return Ok(s);
            }
            self.open_now(now)
        })
    }

    fn open_now(&self, now: u64) -> PyResult<Arc<State>> {
        let process = process::current()
            .map_err(|e| errors::internal(format!("cannot start the runtime: {e}")))?;
        let builder = self.settings.builder().py_err()?;
        let cache = process.runtime.block_on(builder.build()).py_err()?;
        let state = Arc::new(State {
            generation: now,
            process: Arc::clone(&process),
            cache,
            held: Mutex::new(HashMap::new()),
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

    /// Pins `file` under `url` for `hold` and returns its `pathlib.Path`.
    fn hand_out(
        &self,
        py: Python<'_>,
        state: &State,
        url: &str,
        file: CachedFile,
    ) -> PyResult<Py<PyAny>> {
        let until = Instant::now() + self.hold;
        if self.hold.is_zero() {
            let path = new_path(py, file.path())?.unbind();
            py.detach(move || drop(file));
            return Ok(path);
        }
        // No Python code runs under the lock: it could let the GIL go to a thread that
        // then waits on the lock.
        let again = {
            let mut held = state.lock_held();
            match held.get_mut(url) {
                Some(h) if h.file.path() == file.path() => {
                    h.until = until;
                    Ok((h.path.clone_ref(py), std::mem::replace(&mut h.file, file)))
                }
                _ => Err(file),
            }
        };
        let path = match again {
            // The held map pins the same entry, so letting go of this pin is one atomic
            // decrement.
            Ok((path, _same)) => path,
            Err(file) => {
                let path = new_path(py, file.path())?.unbind();
                let held = Held {
                    file,
                    path: path.clone_ref(py),
                    until,
                };
                let old = state.lock_held().insert(url.to_owned(), held);
                // Perhaps the last pin of an older version: its removal takes the index lock.
                if let Some(old) = old {
                    let Held { file, path, .. } = old;
                    py.detach(move || drop(file));
                    drop(path);
                }
                path
            }
        };
        Ok(path)
    }

    fn get_file(
        &self,
        py: Python<'_>,
        url: &str,
        options: GetOptions,
        force: bool,
    ) -> PyResult<(Arc<State>, CachedFile)> {
        let state = self.state(py)?;
        let cache = &state.cache;
        let options = options.force(force);
        if let Some(hit) = py.detach(|| cache.get_cached_with(url, &options)) {
            return Ok((state, hit));
        }
        let file = state
            .process
            .block_on(py, cache.get_with(url, options))?
            .py_err()?;
        Ok((state, file))
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
        if !(hold_seconds.is_finite() && hold_seconds >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "hold_seconds must be zero or more, not {hold_seconds}"
            )));
        }
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
            settings,
            hold: Duration::from_secs_f64(hold_seconds),
            state: ArcSwapOption::const_empty(),
            opening: Mutex::new(()),
        };
        // Opened now, so that a bad setting fails here rather than at the first get.
        cache.state(py)?;
        Ok(cache)
    }

    /// The local path of `url`, downloaded if it is not cached and fresh.
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false))]
    fn get(
        &self,
        py: Python<'_>,
        url: &str,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
    ) -> PyResult<Py<PyAny>> {
        let options = options(ttl_seconds, expected_sha256)?;
        let (state, file) = self.get_file(py, url, options, force)?;
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
    #[pyo3(signature = (url, ttl_seconds=None, expected_sha256=None, force=false))]
    fn open(
        &self,
        py: Python<'_>,
        url: &str,
        ttl_seconds: Option<f64>,
        expected_sha256: Option<String>,
        force: bool,
    ) -> PyResult<Pinned> {
        let options = options(ttl_seconds, expected_sha256)?;
        let (_, file) = self.get_file(py, url, options, force)?;
        Pinned::new(py, file)
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
        let state = slf.get().state(py)?;
        let handle: Py<Cache> = slf.clone().unbind();
        pyo3_async_runtimes::generic::future_into_py::<process::AsyncRuntime, _, _>(
            py,
            async move {
                let file = fetch(&state, &url, options).await?;
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
        let state = self.state(py)?;
        pyo3_async_runtimes::generic::future_into_py::<process::AsyncRuntime, _, _>(
            py,
            async move {
                let file = fetch(&state, &url, options).await?;
                Python::attach(|py| Pinned::new(py, file))
            },
        )
    }

    /// Removes `url`'s entry; whether there was one.
    fn invalidate(&self, py: Python<'_>, url: &str) -> PyResult<bool> {
        let state = self.state(py)?;
        let named: Vec<String> = state
            .lock_held()
            .iter()
            .filter(|(typed, _)| typed.as_str() == url)
            .map(|(_, h)| h.file.url().to_owned())
            .collect();
        state.release(py, |typed, h| {
            typed != url && !named.iter().any(|n| n == h.file.url())
        });
        state
            .process
            .block_on(py, state.cache.invalidate(url))?
            .py_err()
    }

    /// Removes every entry; how many there were.
    fn clear(&self, py: Python<'_>) -> PyResult<u64> {
        let state = self.state(py)?;
        state.release(py, |_, _| false);
        state.process.block_on(py, state.cache.clear())?.py_err()
    }

    /// Removes expired entries and enforces the cap now: `{expired, evicted, bytes_freed}`.
    fn cleanup<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        // By the cache's clock: the holds of expired files go, so that cleanup can remove them.
        let now = match &self.settings.clock {
            Some(clock) => imgcache::Clock::now(&**clock),
            None => SystemTime::now(),
        };
        state.release(py, |_, h| h.file.expires_at() > now);
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
            .block_on(py, state.cache.verify(url))?
            .py_err()?;
        convert::record(py, &found)
    }

    /// Re-hashes every file: `{checked, corrupt, ...}`.
    fn verify_all<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        let report = state
            .process
            .block_on(py, state.cache.verify_all())?
            .py_err()?;
        convert::record(py, &report)
    }

    /// The figures, as a dict (the keys of the Rust `Stats`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state(py)?;
        let stats = py.detach(|| state.cache.stats());
        convert::record(py, &stats)
    }

    /// Every entry, most recently used first, as dicts.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let state = self.state(py)?;
        let entries = py.detach(|| state.cache.entries());
        let list = PyList::empty(py);
        for e in &entries {
            list.append(convert::record(py, e)?)?;
        }
        Ok(list)
    }

    fn reset_stats(&self, py: Python<'_>) -> PyResult<()> {
        let state = self.state(py)?;
        py.detach(|| state.cache.reset_stats());
        Ok(())
    }

    fn set_max_size_bytes(&self, py: Python<'_>, bytes: u64) -> PyResult<()> {
        let state = self.state(py)?;
        py.detach(|| state.cache.set_max_size_bytes(bytes)).py_err()
    }

    fn set_default_ttl_seconds(&self, py: Python<'_>, seconds: f64) -> PyResult<()> {
        let state = self.state(py)?;
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(PyValueError::new_err(format!(
                "the TTL must be a positive number of seconds, not {seconds}"
            )));
        }
        py.detach(|| {
            state
                .cache
                .set_default_ttl(Duration::from_secs_f64(seconds))
        })
        .py_err()
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
        new_path(py, state.cache.cache_dir())
    }

    #[getter]
    fn image_server(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let state = self.state(py)?;
        Ok(state.cache.image_server().map(|s| state.cache.redacted(s)))
    }

    #[getter]
    fn hold_seconds(&self) -> f64 {
        self.hold.as_secs_f64()
    }

    /// `url` without user-info and with signing query parameters redacted.
    fn redacted(&self, py: Python<'_>, url: &str) -> PyResult<String> {
        Ok(self.state(py)?.cache.redacted(url))
    }

    /// Lets go of every path this handle holds and shuts the cache down: the figures are
    /// saved and later calls raise `ShutdownError`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(state) = self.state.load_full() else {
            return Ok(());
        };
        if state.generation != process::generation() {
            return Ok(());
        }
        state.release(py, |_, _| false);
        state.process.block_on(py, state.cache.shutdown())?;
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let state = self.state(py)?;
        Ok(format!(
            "imgcache.Cache(cache_dir={:?}, image_server={:?})",
            state.cache.cache_dir().display().to_string(),
            state.cache.image_server().map(|s| state.cache.redacted(s))
        ))
    }
}

/// A cached file pinned for as long as this object is open: no eviction, expiry,
/// `invalidate` or `clear` (in any process) removes the file until it is closed.
#[pyclass(module = "imgcache._native", frozen, name = "CachedFile")]
struct Pinned {
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
    fn new(py: Python<'_>, file: CachedFile) -> PyResult<Self> {
        Ok(Pinned {
            path: new_path(py, file.path())?.unbind(),
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

    fn take(&self) -> Option<CachedFile> {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(file) = self.take() {
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
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    fn __fspath__(&self) -> &str {
        &self.fspath
    }

    /// Lets go of the pin (idempotent).
    fn close(&self, py: Python<'_>) {
        if let Some(file) = self.take() {
            py.detach(move || drop(file));
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
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

/// A clock that moves only when told to, for tests of expiry: pass it as `clock=`.
#[pyclass(module = "imgcache._native", frozen)]
struct ManualClock {
    clock: Arc<imgcache::ManualClock>,
}

#[pymethods]
impl ManualClock {
    #[new]
    fn new() -> Self {
        ManualClock {
            clock: Arc::new(imgcache::ManualClock::new()),
        }
    }

    /// Moves the clock on by `seconds`.
    fn advance(&self, seconds: f64) -> PyResult<()> {
        let by = seconds_or_zero(seconds)?;
        self.clock.advance(by);
        Ok(())
    }
}

fn seconds_or_zero(s: f64) -> PyResult<Duration> {
    if s.is_finite() && s >= 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(PyValueError::new_err(format!(
            "expected zero or more seconds, not {s}"
        )))
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
    m.add_function(wrap_pyfunction!(process::forked, m)?)?;
    m.add_function(wrap_pyfunction!(logs::refresh_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(mb, m)?)?;
    m.add("DEFAULT_MAX_SIZE_BYTES", imgcache::DEFAULT_MAX_SIZE_BYTES)?;
    m.add("DEFAULT_TTL_SECONDS", imgcache::DEFAULT_TTL.as_secs())?;
    Ok(())
}
