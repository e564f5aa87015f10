//! One Tokio runtime per process, rebuilt in a forked child.
//!
//! A child made by `fork` has one thread: the parent's runtime threads do not exist in it,
//! so the runtime it inherited can run nothing and must never be dropped (dropping it would
//! wait for those threads). `os.register_at_fork` calls [`forked`] in the child, which moves
//! the fork generation on; every handle compares its generation with it and builds what it
//! needs again, leaking (never dropping) what it had.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;
use pyo3_async_runtimes::generic::{ContextExt, JoinError, Runtime as PyRuntime};
use tokio::sync::watch;

/// Moved on by [`forked`] in each child.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The fork generation this process is in.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Called in the child after `os.fork()` (`os.register_at_fork(after_in_child=...)`).
#[pyfunction]
pub(crate) fn forked() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

pub(crate) struct Process {
    generation: u64,
    pub(crate) runtime: tokio::runtime::Runtime,
}

static PROCESS: ArcSwapOption<Process> = ArcSwapOption::const_empty();
/// Taken only to build a runtime, once per process.
static BUILDING: ForkLock = ForkLock::new();

/// A mutex that a forked child never inherits locked: a parent thread may hold a lock at the
/// moment another thread forks, and that thread does not exist in the child to let it go.
/// Each fork generation gets its own mutex; the parent's is left to the parent.
pub(crate) struct ForkLock(ArcSwapOption<(u64, Mutex<()>)>);

impl ForkLock {
    pub(crate) const fn new() -> Self {
        ForkLock(ArcSwapOption::const_empty())
    }

    /// Runs `f` with this generation's mutex held.
    pub(crate) fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        let now = generation();
        let lock = loop {
            let seen = self.0.load_full();
            if let Some(lock) = &seen
                && lock.0 == now
            {
                break Arc::clone(lock);
            }
            let fresh = Arc::new((now, Mutex::new(())));
            let before = self.0.compare_and_swap(&seen, Some(Arc::clone(&fresh)));
            let swapped = match (&*before, &seen) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if swapped {
                break fresh;
            }
        };
        let _held = lock.1.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }
}

/// Whether this thread is inside a runtime (a runtime thread, or a thread blocked on one),
/// where blocking on the runtime again would panic: a Python logging handler that the
/// core's events reach, or a signal handler run while a call waits, calling the cache.
pub(crate) fn nested() -> PyResult<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(reentered());
    }
    Ok(())
}

/// Refuses any call from a logging handler that one of the core's events reached: the
/// thread that logged may hold a lock of the core that the call would wait on.
pub(crate) fn in_handler() -> PyResult<()> {
    if crate::logs::in_handler() {
        return Err(reentered());
    }
    Ok(())
}

fn reentered() -> PyErr {
    crate::errors::of_kind(
        imgcache::ErrorKind::Internal,
        "an imgcache call cannot run inside another one (a logging handler that the \
         cache's own event reached, or a signal handler while a call waits): call it from \
         another thread, or use the asyncio methods from a signal handler",
    )
}

/// This process's runtime, built on first use (and again after a fork).
pub(crate) fn current() -> std::io::Result<Arc<Process>> {
    let now = generation();
    if let Some(p) = PROCESS.load_full()
        && p.generation == now
    {
        return Ok(p);
    }
    BUILDING.with(|| build(now))
}

fn build(now: u64) -> std::io::Result<Arc<Process>> {
    if let Some(p) = PROCESS.load_full()
        && p.generation == now
    {
        return Ok(p);
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("imgcache")
        .enable_all()
        .build()?;
    let fresh = Arc::new(Process {
        generation: now,
        runtime,
    });
    // The parent's runtime, inherited by a fork: its threads are gone, so it is leaked.
    std::mem::forget(PROCESS.swap(Some(Arc::clone(&fresh))));
    Ok(fresh)
}

impl Process {
    /// Runs `fut` to completion with the GIL released. Every 100 ms it takes the GIL back for
    /// a moment to let Python raise `KeyboardInterrupt` (or any signal handler's exception);
    /// the operation itself goes on in the background, as every cache operation is cancel
    /// safe.
    pub(crate) fn block_on<T: Send>(
        &self,
        py: Python<'_>,
        fut: impl Future<Output = T> + Send,
    ) -> PyResult<T> {
        let none: Option<&mut watch::Receiver<Option<()>>> = None;
        let out = self.wait(py, fut, None, none, |()| Ok(()))?;
        Ok(out.expect("a wait without a deadline ends with its future"))
    }

    /// [`block_on`](Self::block_on), ending at `deadline` too (with `None`), and handing each
    /// value that arrives on `reports` to `on_report` (on this thread, with the GIL
    /// released: it takes it if it needs it); an error of `on_report` ends the wait.
    pub(crate) fn wait<T: Send, R: Copy + Send + Sync>(
        &self,
        py: Python<'_>,
        fut: impl Future<Output = T> + Send,
        deadline: Option<tokio::time::Instant>,
        mut reports: Option<&mut watch::Receiver<Option<R>>>,
        mut on_report: impl FnMut(R) -> PyResult<()> + Send,
    ) -> PyResult<Option<T>> {
        nested()?;
        py.detach(|| {
            self.runtime.block_on(async {
                tokio::pin!(fut);
                // One timer for the whole wait: reports arriving faster than it must not
                // keep Ctrl-C from being checked.
                let mut signals = tokio::time::interval(Duration::from_millis(100));
                signals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                signals.tick().await;
                loop {
                    tokio::select! {
                        biased;
                        out = &mut fut => return Ok(Some(out)),
                        () = until(deadline) => return Ok(None),
                        Some(report) = changed(reports.as_deref_mut()) => on_report(report)?,
                        _ = signals.tick() => {
                            Python::attach(|py| py.check_signals())?;
                        }
                    }
                }
            })
        })
    }
}

/// The next value on `rx`, or never.
async fn changed<R: Copy>(rx: Option<&mut watch::Receiver<Option<R>>>) -> Option<R> {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            *rx.borrow_and_update()
        }
        None => std::future::pending().await,
    }
}

/// `deadline`, or never.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

tokio::task_local! {
    static TASK_LOCALS: std::cell::OnceCell<TaskLocals>;
}

/// The asyncio bridge's view of the runtime: tasks go to this process's runtime.
pub(crate) struct AsyncRuntime;

pub(crate) struct Join(tokio::task::JoinError);

impl JoinError for Join {
    fn is_panic(&self) -> bool {
        self.0.is_panic()
    }
    fn into_panic(self) -> Box<dyn std::any::Any + Send + 'static> {
        self.0.into_panic()
    }
}

type Joined = Pin<Box<dyn Future<Output = Result<(), Join>> + Send>>;

fn handle() -> tokio::runtime::Handle {
    // Only reached from a call that has just used `current()` successfully.
    current()
        .map(|p| p.runtime.handle().clone())
        .expect("the runtime was built by the call that spawns")
}

impl PyRuntime for AsyncRuntime {
    type JoinError = Join;
    type JoinHandle = Joined;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = handle().spawn(fut);
        Box::pin(async move { task.await.map_err(Join) })
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        let task = handle().spawn_blocking(f);
        Box::pin(async move { task.await.map_err(Join) })
    }
}

impl ContextExt for AsyncRuntime {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        let cell = std::cell::OnceCell::new();
        cell.set(locals).ok();
        Box::pin(TASK_LOCALS.scope(cell, fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        TASK_LOCALS
            .try_with(|c| c.get().cloned())
            .unwrap_or_default()
    }
}
