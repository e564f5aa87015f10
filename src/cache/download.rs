//! The download: the task that one in-flight slot runs, as a [`Download`] that carries what
//! the callers asked for (the resolved URL, their wants, whether forced, when they asked)
//! through its steps. It takes the URL's writer lock, looks at the disk (another process may
//! have committed it), resumes a dead process's part file or asks the tier (`tier_read`),
//! then revalidates or downloads with retries: a [`Transfer`] keeps the temp file, the
//! running SHA-256 and the byte count across attempts, so that a cut-off body resumes with
//! `Range`. A finished transfer goes to the [`Commit`]; when the origin fails, the expired
//! copy is served. The download's events (one start, exactly one end) are its
//! announcement's, which a guard ends should the task be dropped.

use std::sync::Arc;
use std::time::Instant;

use super::announce::Announcement;
use super::commit::{Commit, renew};
use super::engine::{DownloadResult, Inner, Outcome};
use super::pin::{Holding, Pinned};
#[cfg(feature = "s3")]
use super::tier_read::{AfterTier, TierRead};
use super::transfer::{Resume, Step, Transfer};
use super::unstored;
use super::wants::Wants;
use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind};
use crate::fetch;
use crate::index::Entry;
use crate::key::Resolved;
use crate::stats::Counter;
use crate::store::locks::KeyLock;
use crate::store::{self, Validators};

/// The body of the download task that an in-flight slot runs (its slot is cleared however
/// it ends, a panic included: see `inflight`).
pub(super) async fn run_download(
    inner: Arc<Inner>,
    r: Resolved,
    force: bool,
    wants: Arc<Wants>,
) -> DownloadResult {
    // Dropped with the task if it never gets to the end (a panic, a runtime shut down).
    let stopped = StopGuard(wants.announcement());
    let download = Download {
        inner: &inner,
        r: &r,
        wants: &wants,
        force,
        asked_at: inner.config.now_ms(),
    };
    let result = download.run().await.map_err(|e| e.with_url(&r.display));
    // The temp file's handle goes with the download: a stream that never read leaves no
    // deleted file held open.
    wants.progress().send_modify(|p| p.file = None);
    if let Err(e) = &result {
        wants.announcement().failed(e);
        inner.counters.add(Counter::Errors, 1);
        tracing::warn!(url = %r.display, error = %e, "download failed");
    }
    wants
        .announcement()
        .done(result.as_ref().map(|(pinned, _)| pinned.entry.meta.size));
    std::mem::forget(stopped);
    result
}

/// Ends a download's announcement if its task is dropped before it is done.
struct StopGuard<'a>(&'a Announcement);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.0.stopped();
    }
}

/// One download task's work, and what its callers asked for.
struct Download<'a> {
    inner: &'a Arc<Inner>,
    r: &'a Resolved,
    /// What every caller of the download takes (digests, ages, TTL), its progress and its
    /// announcement.
    wants: &'a Wants,
    force: bool,
    /// When the callers asked, by the cache's clock.
    asked_at: u64,
}

impl<'a> Download<'a> {
    /// The tier's step of this download (see `tier_read`).
    #[cfg(feature = "s3")]
    fn tier_read(&self) -> TierRead<'a> {
        TierRead {
            inner: self.inner,
            r: self.r,
            wants: self.wants,
            force: self.force,
            asked_at: self.asked_at,
        }
    }

    /// The origin whose outages are remembered: scheme, host and port of the URL asked.
    fn origin(&self) -> String {
        self.r.request.origin().ascii_serialization()
    }

    /// First the URL's writer lock, so that one process in all downloads it (bounded by
    /// `CACHE_LOCK_WAIT`, after which this one downloads on its own and the first commit
    /// wins); then what is on disk, since another process may have committed it meanwhile;
    /// then revalidate or download with retries, resuming from the part file of a holder
    /// that died; and the expired copy when the origin fails.
    async fn run(&self) -> DownloadResult {
        let (inner, r) = (self.inner, self.r);
        let lock = inner
            .layout
            .lock_key(&r.key, inner.config.lock_wait)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(url = %r.display, error = %e, "cannot take the download's lock; downloading without it");
                None
            });
        if lock.is_none() {
            inner.counters.add(Counter::LockTimeouts, 1);
            tracing::warn!(
                url = %r.display,
                waited_ms = duration_ms(inner.config.lock_wait),
                "another process has been downloading this file for longer than CACHE_LOCK_WAIT; downloading it here too"
            );
        }
        if let Some(found) = self.found_on_disk().await {
            return Ok(found);
        }
        // An origin remembered as down is not asked (the fleet's tier still is), and a dead
        // process's part file is left as it is for when it answers again.
        let down = inner
            .outages
            .check(&self.origin(), inner.config.now_ms())
            .err();
        let (lock, resume) = match lock {
            Some(mut lock) if down.is_none() => {
                let resume = self.resumable(&mut lock).await;
                (Some(lock), resume)
            }
            lock => (lock, None),
        };
        // The fleet's copy, or this host's lease to download it for the fleet. Not when
        // resuming a dead process's download: the origin has the rest of those bytes.
        #[cfg(feature = "s3")]
        let lease = match resume {
            Some(_) => None,
            None => match self.tier_read().run().await {
                AfterTier::Served(pinned, outcome) => {
                    return Ok((pinned, outcome));
                }
                AfterTier::Lease { lease, replace } => Some((lease, replace)),
                AfterTier::Origin => None,
            },
        };
        let previous = if self.force {
            None
        } else {
            inner.index.current(&r.key)
        };
        let result = match down {
            Some(e) => Err(e),
            None => self.with_retries(previous.as_ref(), lock, resume).await,
        };
        #[cfg(feature = "s3")]
        if let Some((lease, replace)) = lease {
            inner.publish(r, &result, lease, replace);
        }
        match (result, previous) {
            (Err(e), Some(stale)) if inner.config.stale_if_error && e.is_transient() => {
                if !inner.index.pin_if_current(&stale) {
                    return Err(e);
                }
                let pinned = inner.pinned(Arc::clone(&stale));
                if inner.hold(&stale) != Holding::Held {
                    return Err(e);
                }
                inner.counters.add(Counter::StaleServed, 1);
                // The download announced by its start ended: a dashboard drops its row.
                self.wants.announcement().failed(&e);
                tracing::warn!(
                    url = %r.display,
                    path = %stale.path.display(),
                    error = %e,
                    "origin failed; serving the expired copy"
                );
                Ok((pinned, Outcome::Stale))
            }
            (result, _) => result,
        }
    }

    /// Brings this process's entry for the URL in line with the disk, and returns it pinned
    /// if it will do: fresh, with a digest some caller takes, and (for a forced download)
    /// committed by another process after this one asked.
    async fn found_on_disk(&self) -> Option<(Arc<Pinned>, Outcome)> {
        let inner = self.inner;
        let before = inner.index.current(&self.r.key).map(|e| e.stamp());
        let this = Arc::clone(inner);
        let key = self.r.key.clone();
        let found = tokio::task::spawn_blocking(move || this.sync_key(&key))
            .await
            .ok()
            .flatten()?;
        // Committed by another process since this one asked.
        let newer = before != Some(found.stamp) && found.meta.fetched_at >= self.asked_at;
        let meta = &found.meta;
        let usable = self.wants.takes(
            inner.config.now_ms(),
            meta.expires_at,
            meta.fetched_at,
            &meta.sha256,
        ) && (!self.force || newer);
        if !usable {
            return None;
        }
        let entry = inner.index.pin_current(&self.r.key)?;
        let pinned = inner.pinned(Arc::clone(&entry));
        if entry.stamp() != found.stamp || inner.hold(&entry) != Holding::Held {
            return None;
        }
        let outcome = if newer {
            Outcome::Waited
        } else {
            Outcome::Found
        };
        tracing::debug!(url = %self.r.display, "found on disk, committed by another process");
        Some((pinned, outcome))
    }

    /// The part file a dead holder of the URL's writer lock left, if the download can resume
    /// from it: named by the lock's record, bound to a version by a validator, not held by
    /// anyone, and at least as long as the record says is durable. Its kept prefix is hashed
    /// again.
    async fn resumable(&self, lock: &mut KeyLock) -> Option<Resume> {
        let inner = self.inner;
        let key = &self.r.key;
        let record = lock.record()?;
        let validators = Validators {
            etag: record.etag.clone(),
            last_modified: record.last_modified.clone(),
        };
        let name = record.part.clone();
        let ours = name.starts_with(&format!("{}.", key.as_str()))
            && name.ends_with(".part")
            && !name.contains('/');
        if !ours {
            return None;
        }
        let path = inner.layout.temp_dir().join(&name);
        let usable = validators.if_range().is_some() && record.durable > 0;
        let layout = inner.layout.clone();
        let key = key.clone();
        let max = inner.index.max();
        let resume = tokio::task::spawn_blocking(move || {
            let resume = if usable {
                Resume::open(&layout, &key, path.clone(), record, validators, max)
            } else {
                Err(std::io::Error::other("nothing to resume from"))
            };
            // Of no use to anyone now (no validator, nothing durable, or refused): removed
            // while this process holds the URL's lock, unless another process holds it.
            if resume.is_err()
                && let Ok(store::locks::Try::Taken(lock)) = layout.try_exclusive_at(&path)
            {
                let _ = layout.remove_file(&path);
                drop(lock);
            }
            resume
        })
        .await
        .ok()?;
        match resume {
            Ok(resume) => {
                // Its new name, should this process die before its writer records it.
                let mut record = lock.record().unwrap_or_default();
                if let Some(name) = resume.temp.path().file_name().and_then(|n| n.to_str()) {
                    record.part = name.to_owned();
                    lock.write_record(&record);
                }
                tracing::info!(
                    part = %resume.temp.path().display(),
                    bytes = resume.received,
                    "taking over the download of a process that died"
                );
                Some(resume)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot resume from a dead download's part file");
                None
            }
        }
    }

    /// Attempts within the total deadline; on failure, waits until the writer has removed
    /// its temp file, so that an error never leaves one behind.
    async fn with_retries(
        &self,
        previous: Option<&Arc<Entry>>,
        lock: Option<KeyLock>,
        resume: Option<Resume>,
    ) -> DownloadResult {
        let started_ms = self.inner.config.now_ms();
        let mut transfer = Transfer::new(self.inner, self.r, self.wants, lock, self.asked_at);
        if let Some(resume) = resume {
            transfer.resume_from(resume);
        }
        let attempts = self.attempts(&mut transfer, previous);
        let result = match self.inner.config.download_timeout {
            Some(limit) => tokio::time::timeout(limit, attempts)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Network,
                        format!(
                            "download took longer than {}",
                            humantime::format_duration(limit)
                        ),
                    ))
                }),
            None => attempts.await,
        };
        self.inner.outages.after(
            &self.origin(),
            started_ms,
            self.inner.config.now_ms(),
            &result,
            transfer.answered,
        );
        if result.is_err() {
            transfer.abandon().await;
        }
        result
    }

    /// Attempts until the body is complete, a 304 renews `previous`, or a failure is final.
    async fn attempts(
        &self,
        transfer: &mut Transfer<'a>,
        previous: Option<&Arc<Entry>>,
    ) -> DownloadResult {
        let (inner, r) = (self.inner, self.r);
        let started = Instant::now();
        let mut revalidate = previous
            .map(|p| (p, p.validators()))
            .filter(|(_, v)| !v.is_empty());
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let step = transfer.attempt(revalidate.as_ref().map(|(_, v)| v)).await;
            match step {
                Ok(Step::Complete) => break,
                Ok(Step::NotModified(validators)) => {
                    let (entry, _) = revalidate.take().expect("a 304 answers a conditional GET");
                    let now = inner.config.now_ms();
                    // A caller that asked for fresher bytes (a short per-call TTL) confirms
                    // them current; it does not shorten what the entry had for the others.
                    let expires_at = now
                        .saturating_add(self.wants.ttl_ms())
                        .max(entry.expires_at());
                    // The entry went away meanwhile: download it after all.
                    let Some(pinned) = renew(inner, entry, validators, now, expires_at).await?
                    else {
                        continue;
                    };
                    inner.counters.add(Counter::Revalidations, 1);
                    tracing::info!(url = %r.display, "revalidated: not modified");
                    return Ok((pinned, Outcome::Revalidated));
                }
                Err(e) if e.is_transient() && attempt <= inner.config.retries => {
                    inner.counters.add(Counter::Retries, 1);
                    let delay = fetch::backoff(
                        attempt,
                        inner.config.retry_base_delay,
                        inner.config.retry_max_delay,
                        e.retry_after(),
                    );
                    tracing::warn!(
                        url = %r.display,
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        received = transfer.received,
                        error = %e,
                        "download attempt failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        let finished = transfer.finish().await?;
        let size = finished.size;
        if let Err(expected) = self.wants.check(&finished.sha256) {
            inner.counters.add(Counter::IntegrityFailures, 1);
            return Err(Error::checksum(&expected, &finished.sha256));
        }
        let now = inner.config.now_ms();
        let expires_at = now.saturating_add(self.wants.ttl_ms());
        if transfer.not_to_store.is_some() || transfer.oversize {
            let (directive, oversize) = (transfer.not_to_store, transfer.oversize);
            let pinned = unstored::hand_out(transfer, finished, now, expires_at)?;
            self.wants.announcement().finished(size, started.elapsed());
            inner.counters.add(Counter::NotStored, 1);
            match directive {
                Some(directive) => tracing::info!(
                    url = %r.display,
                    directive,
                    bytes = size,
                    "the origin said not to store this file: handed out, not kept"
                ),
                None if oversize => tracing::warn!(
                    url = %r.display,
                    bytes = size,
                    max_size_bytes = inner.index.max(),
                    "larger than the cache's size cap: handed out uncached, deleted when let go"
                ),
                None => {}
            }
            return Ok((pinned, Outcome::NotStored));
        }
        let committed = Commit::new(transfer, finished, now, expires_at)
            .run()
            .await?;
        // Finished either way: committed here, or (downloading without the lock) another
        // process's commit of it found first.
        self.wants.announcement().finished(size, started.elapsed());
        let pinned = match committed {
            (pinned, Outcome::Downloaded) => pinned,
            found => return Ok(found),
        };
        let entry = &pinned.entry;
        tracing::info!(
            url = %r.display,
            path = %entry.path.display(),
            bytes = size,
            attempts = attempt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cached file"
        );
        Ok((pinned, Outcome::Downloaded))
    }
}
