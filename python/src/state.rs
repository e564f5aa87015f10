//! What one handle is built from ([`Settings`], kept so that a forked child opens the cache
//! its parent had) and the state of a cache open in this process ([`State`]: the core's handle
//! and the holds on the paths it handed out), with the ways pins are let go of off the GIL.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgcache::{CacheBuilder, CachedFile, ImageCache};
use pyo3::prelude::*;

use crate::holds::{Held, Holds};
use crate::process::Process;

/// What a handle is built from. After the first open it records what the cache resolved
/// (from the arguments, the environment and `.env`), and the setters record their changes,
/// so that a forked child opens the cache its parent had, whatever the environment says.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) cache_dir: Option<PathBuf>,
    pub(crate) max_size_bytes: Option<u64>,
    pub(crate) default_ttl: Option<Duration>,
    pub(crate) image_server: Option<String>,
    pub(crate) offline: Option<bool>,
    pub(crate) dotenv: Option<PathBuf>,
    pub(crate) clock: Option<Arc<imgcache::ManualClock>>,
}

impl Settings {
    pub(crate) fn builder(&self) -> imgcache::Result<CacheBuilder> {
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

    /// These settings with what `cache` resolved.
    pub(crate) fn resolved(&self, cache: &ImageCache) -> Settings {
        let stats = cache.stats();
        Settings {
            cache_dir: Some(cache.admin().cache_dir().to_owned()),
            max_size_bytes: Some(stats.max_size_bytes),
            default_ttl: Duration::try_from_secs_f64(stats.default_ttl_hours * 3600.0).ok(),
            image_server: cache.admin().image_server().map(str::to_owned),
            ..self.clone()
        }
    }
}

/// One process's open cache behind a handle.
pub(crate) struct State {
    pub(crate) generation: u64,
    pub(crate) process: Arc<Process>,
    pub(crate) cache: ImageCache,
    pub(crate) holds: Mutex<Holds>,
    /// The size cap, which bounds the holds.
    pub(crate) cap: AtomicU64,
    /// The time by which holds end.
    pub(crate) hold_clock: HoldClock,
}

/// The time by which holds end: the monotonic clock, or the cache's hand-moved one (a test
/// moves both the TTLs and the holds on).
pub(crate) struct HoldClock {
    manual: Option<(Arc<imgcache::ManualClock>, Instant, std::time::SystemTime)>,
}

impl HoldClock {
    pub(crate) fn new(manual: Option<&Arc<imgcache::ManualClock>>) -> HoldClock {
        use imgcache::Clock;
        HoldClock {
            manual: manual.map(|c| (Arc::clone(c), Instant::now(), c.now())),
        }
    }

    /// Now, as an instant: for a hand-moved clock, the instant it was made plus how far it
    /// has been moved since.
    pub(crate) fn now(&self) -> Instant {
        use imgcache::Clock;
        match &self.manual {
            None => Instant::now(),
            Some((clock, base, then)) => {
                let moved = clock.now().duration_since(*then).unwrap_or_default();
                base.checked_add(moved).unwrap_or_else(far_future)
            }
        }
    }
}

/// An instant no hold reaches: a century from now.
pub(crate) fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(100 * 365 * 86_400))
        .unwrap_or(now)
}

impl State {
    pub(crate) fn lock_holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets go of the holds `keep` rejects.
    pub(crate) fn release(&self, py: Python<'_>, keep: impl FnMut(&str, &Held) -> bool) {
        let gone = self.lock_holds().take(keep);
        let_go(py, gone);
    }

    /// Lets go of the holds on files that are no longer the current version of an entry
    /// (removed by `invalidate` under another spelling of the URL, or replaced).
    pub(crate) fn release_stale(&self, py: Python<'_>) {
        let current: HashSet<PathBuf> = py.detach(|| {
            self.cache
                .admin()
                .entries()
                .into_iter()
                .map(|e| e.path)
                .collect()
        });
        self.release(py, |_, h| current.contains(h.file.path()));
    }
}

/// Drops pins with the GIL released (letting go of the last pin of a retired version takes
/// the core's index lock), then their path objects.
pub(crate) fn let_go(py: Python<'_>, gone: Vec<Held>) {
    if gone.is_empty() {
        return;
    }
    let (files, paths): (Vec<_>, Vec<_>) = gone.into_iter().map(|h| (h.file, h.path)).unzip();
    py.detach(move || drop(files));
    drop(paths);
}

/// Drops one pin with the GIL released.
pub(crate) fn unpin(py: Python<'_>, file: CachedFile) {
    py.detach(move || drop(file));
}

/// Lets go of the holds whose time is up, every `every`, while the state lives.
pub(crate) async fn let_go_of_old_holds(state: std::sync::Weak<State>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let now = state.hold_clock.now();
        let gone = state.lock_holds().take(|_, h| h.until > now);
        // Off the GIL: the paths' references are let go of by PyO3 the next time any
        // thread holds it.
        drop(gone);
    }
}
