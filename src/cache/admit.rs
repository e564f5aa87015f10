//! Admission: the one way in for `get`, `get_with`, `get_cached`, the stream forms and the
//! sidecar. It checks that the cache is open, resolves the URL, serves offline copies, tries
//! the hit path, and otherwise joins the running download of the URL or starts one. A caller
//! that waits on a download holds a [`Ticket`], which owns its share of the statistics: a
//! coalesced wait is counted when it joins, and exactly one miss (or, for a file another
//! process had committed, one hit) when the download ends or the caller goes away. What the
//! caller gets from the download's result, the digest a joined download was started without
//! included, is decided here too, once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::announce::Announcement;
use super::download;
use super::engine::{DownloadResult, Inner, Outcome};
use super::file::{CacheStatus, CachedFile, GetOptions};
use super::inflight::{Join, SharedTask};
use super::wants::{Want, Wants};
use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::events::Event;
use crate::index::Lookup;
use crate::key::Resolved;
use crate::stats::Counter;

/// What admission decided for one call.
pub(super) enum Admitted {
    /// A fresh, intact entry (or, offline, a copy of any age), pinned.
    Hit(CachedFile),
    /// A download to wait on, started by this call or joined.
    Download(Ticket),
}

/// One caller's place in a download. Dropped without [`conclude`](Self::conclude) (a caller
/// that went away, a stream read only in part), it still counts the caller's miss.
pub(super) struct Ticket {
    inner: Arc<Inner>,
    task: SharedTask<DownloadResult>,
    /// [`CacheStatus::Downloaded`] for the call that started the download,
    /// [`CacheStatus::Coalesced`] for one that joined it.
    status: CacheStatus,
    /// What the download's callers ask of it, and its progress.
    wants: Arc<Wants>,
    /// Whether this call asked for a new download.
    force: bool,
    counted: bool,
}

/// What a caller gets from the end of its download.
pub(super) enum Conclusion {
    File(CachedFile),
    /// The download was refused for the digests of the callers it knew, and this caller,
    /// which joined too late to be asked, takes what arrived: it must download it itself.
    /// The refusal is kept for a caller that cannot start again (a stream that has read).
    DownloadAgain(Error),
    Failed(Error),
}

impl Inner {
    /// A closed cache admits nothing.
    pub(super) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Shutdown, "the cache was shut down"));
        }
        Ok(())
    }

    /// Admits a call: a hit, or the download to wait on. `force` skips the hit path.
    pub(super) fn admit(
        self: &Arc<Self>,
        url: &str,
        options: &GetOptions,
    ) -> Result<(Arc<Resolved>, Admitted)> {
        self.check_open()?;
        let resolved = self.resolver.resolve(url)?;
        if self.config.offline {
            let file = self.get_offline(&resolved, options)?;
            return Ok((resolved, Admitted::Hit(file)));
        }
        if !options.force
            && let Some(hit) = self.try_hit(&resolved, options)
        {
            return Ok((resolved, Admitted::Hit(hit)));
        }
        let admitted = self.join_or_start(&resolved, options, options.force);
        Ok((resolved, admitted))
    }

    /// Admits a call that never downloads: the hit path alone.
    pub(super) fn admit_cached(
        self: &Arc<Self>,
        url: &str,
        options: &GetOptions,
    ) -> Option<CachedFile> {
        if options.force {
            return None;
        }
        self.check_open().ok()?;
        let resolved = self.resolver.resolve(url).ok()?;
        self.try_hit(&resolved, options)
    }

    /// Waits for an admitted call's file: its hit, or the end of its download, downloading
    /// again (forced) when the download was refused for other callers' digests only.
    ///
    /// # Cancel safety
    /// Cancel safe: the download goes on in its own task; the ticket counts the miss.
    pub(super) async fn settle(
        self: &Arc<Self>,
        resolved: &Arc<Resolved>,
        options: &GetOptions,
        mut admitted: Admitted,
    ) -> Result<CachedFile> {
        loop {
            let mut ticket = match admitted {
                Admitted::Hit(file) => return Ok(file),
                Admitted::Download(ticket) => ticket,
            };
            let result = match &options.progress {
                None => ticket.task.clone().await,
                Some(report) => ticket.wait_reporting(report).await,
            };
            match ticket.conclude(resolved, options, result) {
                Conclusion::File(file) => {
                    if let Some(report) = &options.progress
                        && !matches!(file.status(), CacheStatus::Hit | CacheStatus::Stale)
                    {
                        (report.0)(file.size(), Some(file.size()));
                    }
                    return Ok(file);
                }
                Conclusion::Failed(e) => return Err(e),
                Conclusion::DownloadAgain(_) => {
                    admitted = self.join_or_start(resolved, options, true);
                }
            }
        }
    }

    /// Joins the running download of this key, or starts one. A download may have committed
    /// between the caller's lookup and taking the slot; it clears its slot only after
    /// committing, so looking again under the slot is enough.
    fn join_or_start(
        self: &Arc<Self>,
        resolved: &Arc<Resolved>,
        options: &GetOptions,
        force: bool,
    ) -> Admitted {
        let mut recheck = !force;
        let want = Want::of(options, self.default_ttl_ms.load(Ordering::Relaxed));
        loop {
            let join = self.inflight.join_or_start(
                &resolved.key,
                || {
                    if !recheck {
                        return None;
                    }
                    let max_age = options.ttl.map(duration_ms);
                    match self
                        .index
                        .lookup(&resolved.key, self.config.now_ms(), max_age)
                    {
                        Lookup::Hit(entry) => Some(entry),
                        Lookup::Stale(_) | Lookup::Missing => None,
                    }
                },
                || {
                    let announcement = Announcement::new(&self.events, &resolved.display);
                    Arc::new(Wants::new(want.clone(), announcement))
                },
                |wants| {
                    download::run_download(Arc::clone(self), (**resolved).clone(), force, wants)
                },
                |why| Err(Error::new(ErrorKind::Internal, format!("download {why}"))),
            );
            let (task, status, wants) = match join {
                Join::Joined(task, wants) => {
                    wants.add(want);
                    self.counters.add(Counter::CoalescedWaits, 1);
                    self.events.emit(|| Event::CoalescedWait {
                        url: resolved.display.clone(),
                    });
                    (task, CacheStatus::Coalesced, wants)
                }
                Join::Started(task, wants) => (task, CacheStatus::Downloaded, wants),
                Join::Found(entry) => match self.accept_hit(entry, options) {
                    Some(hit) => return Admitted::Hit(hit),
                    // The entry failed its check or has another digest: download after all.
                    None => {
                        recheck = false;
                        continue;
                    }
                },
            };
            return Admitted::Download(Ticket {
                inner: Arc::clone(self),
                task,
                status,
                wants,
                force,
                counted: false,
            });
        }
    }
}

impl Ticket {
    /// Waits on the download, reporting what reaches its file (see [`GetOptions::progress`]).
    async fn wait_reporting(&self, report: &super::file::OnProgress) -> DownloadResult {
        const MIB: u64 = 1 << 20;
        let mut seen = self.wants.progress().subscribe();
        let task = self.task.clone();
        tokio::pin!(task);
        let mut last: Option<u64> = None;
        loop {
            tokio::select! {
                biased;
                result = &mut task => return result,
                changed = seen.changed() => {
                    if changed.is_err() {
                        return task.await;
                    }
                    let (done, total) = {
                        let p = seen.borrow_and_update();
                        (p.written, p.total)
                    };
                    let step = total.map_or(MIB, |t| (t / 100).max(MIB));
                    let due = match last {
                        None => true,
                        Some(last) => done < last || done >= last.saturating_add(step),
                    };
                    if due {
                        last = Some(done);
                        (report.0)(done, total);
                    }
                }
            }
        }
    }

    /// The download to wait on.
    pub(super) fn task(&self) -> &SharedTask<DownloadResult> {
        &self.task
    }

    /// Whether this call started the download or joined it.
    pub(super) fn status(&self) -> CacheStatus {
        self.status
    }

    /// What the download's callers share (their wants, and its progress).
    pub(super) fn wants(&self) -> &Arc<Wants> {
        &self.wants
    }

    /// What this caller gets from its download's result: the file with its status, checked
    /// against the caller's own digest. Counts the caller's miss, or its hit when another
    /// process had committed the file before the download asked.
    pub(super) fn conclude(
        &mut self,
        resolved: &Resolved,
        options: &GetOptions,
        result: DownloadResult,
    ) -> Conclusion {
        let inner = &self.inner;
        self.counted = true;
        let (pinned, outcome) = match result {
            Ok(done) => done,
            Err(e) => {
                inner.counters.add(Counter::Misses, 1);
                let refused_for_others = self.status == CacheStatus::Coalesced
                    && !self.force
                    && ((e.kind() == ErrorKind::ChecksumMismatch
                        && e.actual_digest()
                            .is_some_and(|sha| Want::accepts(options, sha)))
                        // Refused as larger than the cap before this caller, who takes it
                        // uncached, was asked.
                        || (e.kind() == ErrorKind::TooLarge && options.uncached_if_too_large));
                return if refused_for_others {
                    Conclusion::DownloadAgain(e)
                } else {
                    Conclusion::Failed(e)
                };
            }
        };
        let status = match outcome {
            Outcome::Downloaded => self.status,
            Outcome::Revalidated => CacheStatus::Revalidated,
            Outcome::Stale => CacheStatus::Stale,
            Outcome::Found => {
                inner.counters.add(Counter::Hits, 1);
                inner
                    .counters
                    .add(Counter::BytesServedFromCache, pinned.entry.meta.size);
                CacheStatus::Hit
            }
            Outcome::Waited => CacheStatus::Coalesced,
            #[cfg(feature = "s3")]
            Outcome::Tier => CacheStatus::Shared,
            Outcome::NotStored => CacheStatus::NotStored,
        };
        if outcome != Outcome::Found {
            inner.counters.add(Counter::Misses, 1);
        }
        let file = CachedFile { pinned, status };
        // A joined download that a caller took uncached, for a caller that did not ask.
        if status == CacheStatus::NotStored
            && !options.uncached_if_too_large
            && file.size() > inner.index.max()
        {
            return Conclusion::Failed(
                super::transfer::too_large(file.size(), inner.index.max())
                    .with_url(&resolved.display),
            );
        }
        if let Some(expected) = &options.expected_sha256 {
            // A joined download was started without this caller's digest.
            if !file.sha256().eq_ignore_ascii_case(expected.trim()) {
                return Conclusion::Failed(
                    Error::checksum(expected, file.sha256()).with_url(&resolved.display),
                );
            }
        }
        Conclusion::File(file)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A caller that leaves before its download ends (a timeout, a client that went
        // away, a stream that read a header) was a miss all the same.
        if !self.counted {
            self.inner.counters.add(Counter::Misses, 1);
        }
    }
}
