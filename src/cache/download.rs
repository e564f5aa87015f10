//! The download engine: the task that one in-flight slot runs. It revalidates or downloads
//! with retries (a [`Transfer`] keeps the temp file, the running SHA-256 and the byte count
//! across attempts, so a cut-off body resumes with `Range`), reserves the file's
//! `Content-Length` against the cap, and commits: fsync, meta.json, then the index and the
//! store install the entry together. When the origin fails it falls back to the expired copy.

use std::sync::Arc;
use std::time::Instant;

use super::announce::Announcement;
use super::commit::Finished;
use super::engine::{DownloadResult, Inner, Outcome};
use super::pin::Holding;
use super::transfer::{Resume, Step, Transfer};
use super::wants::Wants;
use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind};
use crate::fetch;
use crate::index::Entry;
use crate::key::{Key, Resolved};
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
    let result = inner
        .fetch_entry(&r, force, &wants)
        .await
        .map_err(|e| e.with_url(&r.display));
    // The temp file's handle goes with the download: a stream that never read leaves no
    // deleted file held open.
    wants.progress().send_modify(|p| p.file = None);
    if let Err(e) = &result {
        wants.announcement().failed(e);
        inner.counters.add(Counter::Errors, 1);
        tracing::warn!(url = %r.display, error = %e, "download failed");
    }
    wants.announcement().done(&result);
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

impl Inner {
    /// The download task's work. First the URL's writer lock, so that one process in all
    /// downloads it (bounded by `CACHE_LOCK_WAIT`, after which this one downloads on its own
    /// and the first commit wins); then what is on disk, since another process may have
    /// committed it meanwhile; then revalidate or download with retries, resuming from the
    /// part file of a holder that died; and the expired copy when the origin fails.
    async fn fetch_entry(
        self: &Arc<Self>,
        r: &Resolved,
        force: bool,
        wants: &Wants,
    ) -> DownloadResult {
        let asked_at = self.config.now_ms();
        let lock = self
            .layout
            .lock_key(&r.key, self.config.lock_wait)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(url = %r.display, error = %e, "cannot take the download's lock; downloading without it");
                None
            });
        if lock.is_none() {
            self.counters.add(Counter::LockTimeouts, 1);
            tracing::warn!(
                url = %r.display,
                waited_ms = duration_ms(self.config.lock_wait),
                "another process has been downloading this file for longer than CACHE_LOCK_WAIT; downloading it here too"
            );
        }
        if let Some(found) = self.from_disk(r, force, wants, asked_at).await {
            return Ok(found);
        }
        let (lock, resume) = match lock {
            Some(mut lock) => {
                let resume = self.resumable(&mut lock, &r.key).await;
                (Some(lock), resume)
            }
            None => (None, None),
        };
        // The fleet's copy, or this host's lease to download it for the fleet. Not when
        // resuming a dead process's download: the origin has the rest of those bytes.
        #[cfg(feature = "s3")]
        let lease = match resume {
            Some(_) => None,
            None => match self.through_tier(r, force, wants, asked_at).await {
                super::tier_read::AfterTier::Served(pinned, outcome) => {
                    return Ok((pinned, outcome));
                }
                super::tier_read::AfterTier::Lease { lease, replace } => Some((lease, replace)),
                super::tier_read::AfterTier::Origin => None,
            },
        };
        let previous = if force {
            None
        } else {
            self.index.current(&r.key)
        };
        let result = self
            .download_with_retries(r, wants, previous.as_ref(), lock, resume, asked_at)
            .await;
        #[cfg(feature = "s3")]
        if let Some((lease, replace)) = lease {
            self.publish(r, &result, lease, replace);
        }
        match (result, previous) {
            (Err(e), Some(stale)) if self.config.stale_if_error && e.is_transient() => {
                if !self.index.pin_if_current(&stale) {
                    return Err(e);
                }
                let pinned = self.pinned(Arc::clone(&stale));
                if self.hold(&stale) != Holding::Held {
                    return Err(e);
                }
                self.counters.add(Counter::StaleServed, 1);
                // The download announced by its start ended: a dashboard drops its row.
                wants.announcement().failed(&e);
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

    /// Brings this process's entry for `r` in line with the disk, and returns it pinned if it
    /// will do: fresh, with a digest some caller takes, and (for a forced download) committed
    /// by another process after this one asked.
    async fn from_disk(
        self: &Arc<Self>,
        r: &Resolved,
        force: bool,
        wants: &Wants,
        asked_at: u64,
    ) -> Option<(Arc<super::pin::Pinned>, Outcome)> {
        let before = self.index.current(&r.key).map(|e| e.stamp());
        let this = Arc::clone(self);
        let key = r.key.clone();
        let found = tokio::task::spawn_blocking(move || this.sync_key(&key))
            .await
            .ok()
            .flatten()?;
        // Committed by another process since this one asked.
        let newer = before != Some(found.stamp) && found.meta.fetched_at >= asked_at;
        let meta = &found.meta;
        let now = self.config.now_ms();
        let usable = now < meta.expires_at
            && wants
                .max_age_ms()
                .is_none_or(|age| now < meta.fetched_at.saturating_add(age))
            && wants.check(&meta.sha256).is_ok()
            && (!force || newer);
        if !usable {
            return None;
        }
        let entry = self.index.pin_current(&r.key)?;
        let pinned = self.pinned(Arc::clone(&entry));
        if entry.stamp() != found.stamp || self.hold(&entry) != Holding::Held {
            return None;
        }
        let outcome = if newer {
            Outcome::Waited
        } else {
            Outcome::Found
        };
        tracing::debug!(url = %r.display, "found on disk, committed by another process");
        Some((pinned, outcome))
    }

    /// The part file a dead holder of `key`'s writer lock left, if the download can resume
    /// from it: named by the lock's record, bound to a version by a validator, not held by
    /// anyone, and at least as long as the record says is durable. Its kept prefix is hashed
    /// again.
    async fn resumable(self: &Arc<Self>, lock: &mut KeyLock, key: &Key) -> Option<Resume> {
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
        let path = self.layout.temp_dir().join(&name);
        let usable = validators.if_range().is_some() && record.durable > 0;
        let layout = self.layout.clone();
        let key = key.clone();
        let max = self.index.max();
        let resume = tokio::task::spawn_blocking(move || {
            let resume = if usable {
                Resume::open(&layout, &key, path.clone(), record, validators, max)
            } else {
                Err(std::io::Error::other("nothing to resume from"))
            };
            // Of no use to anyone now (no validator, nothing durable, or refused): removed
            // while this process holds the URL's lock, unless another process holds it.
            if resume.is_err()
                && let Ok(store::locks::Try::Taken(lock)) = store::locks::try_exclusive_at(&path)
            {
                let _ = std::fs::remove_file(&path);
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
    async fn download_with_retries(
        self: &Arc<Self>,
        r: &Resolved,
        wants: &Wants,
        previous: Option<&Arc<Entry>>,
        lock: Option<KeyLock>,
        resume: Option<Resume>,
        asked_at: u64,
    ) -> DownloadResult {
        let mut transfer = Transfer::new(self, r, lock, asked_at).for_callers(wants);
        if let Some(resume) = resume {
            transfer.resume_from(resume);
        }
        let attempts = self.attempts(&mut transfer, r, wants, previous);
        let result = match self.config.download_timeout {
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
        if result.is_err() {
            transfer.abandon().await;
        }
        result
    }

    /// Attempts until the body is complete, a 304 renews `previous`, or a failure is final.
    async fn attempts(
        self: &Arc<Self>,
        transfer: &mut Transfer<'_>,
        r: &Resolved,
        wants: &Wants,
        previous: Option<&Arc<Entry>>,
    ) -> DownloadResult {
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
                    let this = Arc::clone(self);
                    let entry = Arc::clone(entry);
                    let ttl = wants.ttl_ms();
                    // The renewal pins the entry; it is wrapped at once, on the blocking
                    // thread, so that a deadline that drops this future unpins it again.
                    let renewed = tokio::task::spawn_blocking(move || {
                        this.renew(&entry, validators, ttl)
                            .map(|ok| ok.then(|| this.pinned(entry)))
                    })
                    .await
                    .map_err(|e| {
                        Error::new(ErrorKind::Internal, format!("renewal failed: {e}"))
                    })??;
                    // The entry went away meanwhile: download it after all.
                    let Some(pinned) = renewed else { continue };
                    if self.hold(&pinned.entry) != Holding::Held {
                        continue;
                    }
                    self.counters.add(Counter::Revalidations, 1);
                    tracing::info!(url = %r.display, "revalidated: not modified");
                    return Ok((pinned, Outcome::Revalidated));
                }
                Err(e) if e.is_transient() && attempt <= self.config.retries => {
                    self.counters.add(Counter::Retries, 1);
                    let delay = fetch::backoff(
                        attempt,
                        self.config.retry_base_delay,
                        self.config.retry_max_delay,
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
        let (temp, file, sha256, validators) = transfer.finish().await?;
        let size = file.metadata().map(|m| m.len()).unwrap_or_default();
        if let Err(expected) = wants.check(&sha256) {
            self.counters.add(Counter::IntegrityFailures, 1);
            return Err(Error::checksum(&expected, &sha256));
        }
        let now = self.config.now_ms();
        let finished = Finished {
            temp,
            file,
            sha256,
            size,
            validators,
        };
        let expires_at = now.saturating_add(wants.ttl_ms());
        let committed = self
            .commit_transfer(r, transfer, finished, now, expires_at)
            .await?;
        // Finished either way: committed here, or (downloading without the lock) another
        // process's commit of it found first.
        wants.announcement().finished(size, started.elapsed());
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
