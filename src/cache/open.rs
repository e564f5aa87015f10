//! Opening a cache: the directory's lock and recovery (off the async workers), the index,
//! the tier, and the background sweeper.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use super::engine::Inner;
use super::handle::{Handle, ImageCache};
use super::inflight::Inflight;
use super::removal::Disposal;
use super::sweeper::Sweeper;
use super::uploads::Uploads;
use super::{procs, resolve};
use crate::clock::duration_ms;
use crate::clock::unix_ms;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Events;
use crate::index::Index;
use crate::stats::{Counter, Counters};
use crate::store::{self, Layout};

impl ImageCache {
    pub(crate) async fn open(config: Config) -> Result<ImageCache> {
        let layout = Layout::new(&config.cache_dir, config.file_mode, config.dir_mode);
        let opened = {
            let layout = layout.clone();
            let exclusive = config.exclusive_lock;
            let now = unix_ms(config.clock.now());
            tokio::task::spawn_blocking(move || -> Result<_> {
                let lock = layout.open(exclusive)?;
                if let Some(kind) = layout.network_file_system() {
                    tracing::warn!(
                        cache_dir = %layout.root.display(),
                        file_system = kind,
                        "the cache directory is on a network file system: locks may not reach other hosts, so a file may be downloaded twice (the bytes handed out are still complete and verified)"
                    );
                }
                let report = store::recover(&layout)?;
                let state = procs::load(&layout);
                let procs = procs::Procs::start(&layout, now, &state).map_err(|e| {
                    Error::io("cannot create this process's record", e)
                        .with_path(layout.procs_dir())
                })?;
                Ok((lock, report, state, procs))
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("recovery panicked: {e}")))??
        };
        let (lock, report, state, procs) = opened;
        let counters = Arc::new(Counters::default());
        let events = Arc::new(Events::new());
        let index = Index::new(
            layout.clone(),
            config.max_size_bytes,
            duration_ms(config.stale_grace),
            Arc::clone(&config.clock),
            Arc::new(Disposal::new(&counters, &events, &layout)),
        );
        let recovered = report.entries.len();
        index.load(state.entries_from(report.entries, config.now_ms()));
        if report.removed > 0 {
            counters.mark_unsaved();
        }
        counters.add(Counter::IntegrityFailures, report.integrity_failures);
        #[cfg(feature = "s3")]
        let tier = if config.offline {
            None
        } else {
            crate::tier::Tier::open(&config.tier, Arc::clone(&config.clock))?.map(Arc::new)
        };
        #[cfg(not(feature = "s3"))]
        if config.tier.url.is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "CACHE_SHARED_TIER needs imgcache built with the s3 feature",
            ));
        }
        let inner = Arc::new(Inner {
            #[cfg(feature = "s3")]
            tier,
            uploads: Uploads::default(),
            outages: super::outage::Outages::new(config.outage_memory),
            default_ttl_ms: AtomicU64::new(duration_ms(config.default_ttl)),
            layout,
            index,
            inflight: Arc::new(Inflight::new()),
            events,
            resolver: resolve::Resolver::new(
                config.image_server.clone(),
                config.url_policy.clone(),
            ),
            counters,
            closed: AtomicBool::new(false),
            stopping: Arc::new(AtomicBool::new(false)),
            writers: Arc::default(),
            sweeper: Sweeper::default(),
            _lock: lock,
            procs,
            config,
        });
        tracing::info!(
            cache_dir = %inner.config.cache_dir.display(),
            entries = recovered,
            removed = report.removed,
            "cache opened"
        );
        // What the processes still running have counted and reserved.
        {
            let this = Arc::clone(&inner);
            let _ = tokio::task::spawn_blocking(move || this.read_others()).await;
        }
        // The cap may have been lowered since the last run.
        if inner.config.sweep_on_open {
            let (removed, _) = inner.sweep_now();
            removed.dispose_off_workers().await;
        }
        inner.start_sweeper();
        Ok(ImageCache {
            handle: Arc::new(Handle { inner }),
        })
    }
}
