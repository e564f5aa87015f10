//! The tier in a download (see `crate::tier`): on a local miss, the tier's copy if it
//! has a fresh one; else this host's lease to download the file from the origin for the
//! fleet, after a bounded wait for a host that holds it; and after the download, the
//! upload, in the background.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::commit::Finished;
use super::engine::{Inner, Outcome};
use super::pin::Holding;
use super::pin::Pinned;
use super::transfer::{Reservation, Transfer};
use super::wants::Wants;
use crate::error::{Error, ErrorKind, Result};
use crate::key::Resolved;
use crate::stats::Counter;
use crate::store::Validators;
use crate::tier::{Lease, Lookup, Record, Seen, Take, Tier};

/// How a miss goes on after the tier was asked.
pub(super) enum AfterTier {
    /// Read from the tier and committed here ([`Outcome::Tier`]), or this host's copy
    /// renewed from the tier's record ([`Outcome::Revalidated`]).
    Served(Arc<Pinned>, Outcome),
    /// This host downloads from the origin for the fleet, under this lease; `replace` when
    /// the tier's blob failed its check and is to be uploaded again.
    Lease { lease: Lease, replace: bool },
    /// The origin, without the tier.
    Origin,
}

impl Inner {
    /// The tier and its state, for [`Stats`](crate::Stats).
    pub(super) fn tier_figures(&self) -> Option<(String, String)> {
        self.tier.as_ref().map(|t| (t.shown.clone(), t.state()))
    }

    fn tier_failed(&self, tier: &Tier, r: &Resolved, e: &Error, what: &str) {
        self.counters.add(Counter::TierErrors, 1);
        tier.failed(e);
        tracing::warn!(url = %r.display, error = %e, "{what}; asking the origin");
    }

    /// Whether a caller that asked at `asked_at` takes `record`: fresh by the cache's clock
    /// and every caller's maximum age, a digest some caller takes, and for a forced download
    /// fetched since the call.
    fn takes(&self, record: &Record, wants: &Wants, force: bool, asked_at: u64) -> bool {
        let now = self.config.now_ms();
        now < record.expires_at
            && wants
                .max_age_ms()
                .is_none_or(|age| now < record.fetched_at.saturating_add(age))
            && wants.check(&record.sha256).is_ok()
            && (!force || record.fetched_at >= asked_at)
    }

    /// Asks the tier before the origin. Every failure of the tier ends in
    /// [`AfterTier::Origin`], or in the lease (so that this host puts right what was wrong for
    /// the fleet): the tier never makes a get fail.
    pub(super) async fn through_tier(
        self: &Arc<Self>,
        r: &Resolved,
        force: bool,
        wants: &Wants,
        asked_at: u64,
    ) -> AfterTier {
        let Some(tier) = self.tier.clone() else {
            return AfterTier::Origin;
        };
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut taken: Option<Lease> = None;
        let mut seen = Seen::default();
        // A record that failed here (its blob missing, cut off, or not its bytes): skipped,
        // and put right by this host under the lease; a newer record is taken.
        let mut failed: Option<(String, u64)> = None;
        loop {
            let record = match tier.record(&r.key).await {
                Ok(Lookup::Found(record)) => Some(record),
                Ok(Lookup::Missing) => None,
                Ok(Lookup::Unsound) => {
                    let e = Error::new(ErrorKind::Network, "the shared record is not a record");
                    // Rewritten by this host under the lease.
                    self.tier_failed(&tier, r, &e, "ignoring it");
                    None
                }
                Err(e) => {
                    self.tier_failed(&tier, r, &e, "cannot read the shared tier");
                    return Self::lease_or_origin(taken, failed.is_some());
                }
            };
            let usable = record.filter(|rec| {
                failed.as_ref() != Some(&(rec.sha256.clone(), rec.fetched_at))
                    && self.takes(rec, wants, force, asked_at)
            });
            if let Some(record) = usable {
                match self.from_tier(&tier, r, &record, wants, asked_at).await {
                    Ok((pinned, outcome)) => {
                        if let Some(lease) = taken {
                            self.uploads.spawn(lease.release());
                        }
                        self.counters.add(Counter::TierHits, 1);
                        tracing::info!(url = %r.display, bytes = record.size, "read from the shared tier");
                        return AfterTier::Served(pinned, outcome);
                    }
                    Err(e)
                        if !matches!(
                            e.kind(),
                            ErrorKind::Network
                                | ErrorKind::Incomplete
                                | ErrorKind::ChecksumMismatch
                        ) =>
                    {
                        // This host's own limits or disk, not the tier's fault: the tier
                        // stays as it is, and the origin is asked.
                        tracing::warn!(url = %r.display, error = %e, "cannot take the shared copy here; asking the origin");
                        if let Some(lease) = taken {
                            self.uploads.spawn(lease.release());
                        }
                        return AfterTier::Origin;
                    }
                    Err(e) => {
                        if e.kind() == ErrorKind::ChecksumMismatch {
                            self.counters.add(Counter::IntegrityFailures, 1);
                            self.tier_failed(
                                &tier,
                                r,
                                &e,
                                "the shared blob failed its check and was removed",
                            );
                            tier.delete_blob(&record.sha256).await;
                        } else {
                            self.tier_failed(&tier, r, &e, "cannot read the shared blob");
                        }
                        failed = Some((record.sha256.clone(), record.fetched_at));
                        continue;
                    }
                }
            }
            // Taken, and the record looked at once more (a host may have just published it):
            // this host downloads.
            if taken.is_some() {
                return Self::lease_or_origin(taken, failed.is_some());
            }
            match tier.take_lease(&r.key, &mut seen).await {
                Ok(Take::Taken(lease)) => taken = Some(lease),
                Ok(Take::Held) => {
                    if started.elapsed() >= tier.wait {
                        self.counters.add(Counter::TierErrors, 1);
                        tracing::warn!(
                            url = %r.display,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "another host has been downloading this file for longer than CACHE_SHARED_WAIT; asking the origin"
                        );
                        return AfterTier::Origin;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    self.tier_failed(&tier, r, &e, "cannot take the shared lease");
                    return AfterTier::Origin;
                }
            }
        }
    }

    fn lease_or_origin(taken: Option<Lease>, replace: bool) -> AfterTier {
        match taken {
            Some(lease) => AfterTier::Lease { lease, replace },
            None => AfterTier::Origin,
        }
    }

    /// The local entry of `r` renewed from the fleet's record, when it holds the record's
    /// bytes (an expired copy that another host revalidated): nothing is streamed. As for a
    /// 304, the renewal pins the entry, and the pin is wrapped on the blocking thread.
    async fn renewed_from(self: &Arc<Self>, r: &Resolved, record: &Record) -> Option<Arc<Pinned>> {
        let entry = self.index.current(&r.key)?;
        if !entry.meta.sha256.eq_ignore_ascii_case(&record.sha256) || entry.meta.size != record.size
        {
            return None;
        }
        let this = Arc::clone(self);
        let validators = Validators {
            etag: record.etag.clone(),
            last_modified: record.last_modified.clone(),
        };
        // Never shortens what the entry had (a record of a host with a shorter TTL).
        let fetched_at = record.fetched_at.max(entry.fetched_at());
        let expires_at = record.expires_at.max(entry.expires_at());
        let renewing = Arc::clone(&entry);
        let pinned = tokio::task::spawn_blocking(move || {
            this.renew_to(&renewing, validators, fetched_at, expires_at)
                .map(|ok| ok.then(|| this.pinned(renewing)))
        })
        .await
        .ok()?
        .ok()??;
        if self.hold(&pinned.entry) != Holding::Held {
            return None;
        }
        Some(pinned)
    }

    /// Streams the blob of `record` to a temp file, hashed, and commits it if its SHA-256
    /// is the record's (and a caller's).
    async fn from_tier(
        self: &Arc<Self>,
        tier: &Tier,
        r: &Resolved,
        record: &Record,
        wants: &Wants,
        asked_at: u64,
    ) -> Result<(Arc<Pinned>, Outcome)> {
        if let Some(pinned) = self.renewed_from(r, record).await {
            tracing::debug!(url = %r.display, "renewed from the shared record");
            return Ok((pinned, Outcome::Revalidated));
        }
        let mut transfer = Transfer::new(self, r, None, asked_at).for_callers(wants);
        let limit = transfer.limit();
        if record.size > limit {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("{} bytes exceed the cache's size cap", record.size),
            ));
        }
        let (size, mut body) = tier.blob(&record.sha256).await?;
        if size != record.size {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "the shared blob has {size} bytes, its record says {}",
                    record.size
                ),
            ));
        }
        transfer.total = Some(size);
        transfer.validators = Validators {
            etag: record.etag.clone(),
            last_modified: record.last_modified.clone(),
        };
        transfer.reservation = Some(Reservation::take_under_cap_lock(self, size).await);
        wants.progress().send_modify(|p| p.total = Some(size));
        let started = Instant::now();
        transfer.start_writer();
        let received = async {
            while let Some(chunk) = body.next().await {
                transfer.push(chunk?).await?;
            }
            if transfer.received != size {
                return Err(Error::new(
                    ErrorKind::Incomplete,
                    format!(
                        "received {} of {size} bytes from the shared tier",
                        transfer.received
                    ),
                ));
            }
            Ok(())
        }
        .await;
        // A failure here is not the download's end: the origin is asked next, under the
        // same announcement.
        if let Err(e) = received {
            transfer.abandon().await;
            return Err(e);
        }
        let (temp, file, sha256, validators) = transfer.finish().await?;
        if !sha256.eq_ignore_ascii_case(&record.sha256) {
            // The temp file goes with `temp`.
            return Err(Error::checksum(&record.sha256, &sha256));
        }
        if let Err(expected) = wants.check(&sha256) {
            return Err(Error::checksum(&expected, &sha256));
        }
        let finished = Finished {
            temp,
            file,
            sha256,
            size,
            validators,
        };
        let (pinned, _) = self
            .commit_transfer(
                r,
                &mut transfer,
                finished,
                record.fetched_at,
                record.expires_at,
            )
            .await?;
        wants.announcement().finished(size, started.elapsed());
        Ok((pinned, Outcome::Tier))
    }
}
