//! The tier in a download (see `crate::tier`): on a local miss, the tier's copy if it
//! has a fresh one; else this host's lease to download the file from the origin for the
//! fleet, after a bounded wait for a host that holds it. A step of the download
//! (`download`), owning what its callers asked for; the upload after it is `tier_upload`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::commit::{Commit, renew};
use super::engine::{Inner, Outcome};
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

/// The tier's step of one download: what its callers asked for.
pub(super) struct TierRead<'a> {
    pub(super) inner: &'a Arc<Inner>,
    pub(super) r: &'a Resolved,
    pub(super) wants: &'a Wants,
    pub(super) force: bool,
    /// When the callers asked, by the cache's clock.
    pub(super) asked_at: u64,
}

impl TierRead<'_> {
    fn tier_failed(&self, tier: &Tier, e: &Error, what: &str) {
        self.inner.counters.add(Counter::TierErrors, 1);
        tier.failed(e);
        tracing::warn!(url = %self.r.display, error = %e, "{what}; asking the origin");
    }

    /// Whether the callers take `record`: fresh, with a digest some caller takes, and for a
    /// forced download fetched since the call.
    fn takes_record(&self, record: &Record) -> bool {
        let now = self.inner.config.now_ms();
        self.wants
            .takes(now, record.expires_at, record.fetched_at, &record.sha256)
            && (!self.force || record.fetched_at >= self.asked_at)
    }

    /// Asks the tier before the origin. Every failure of the tier ends in
    /// [`AfterTier::Origin`], or in the lease (so that this host puts right what was wrong for
    /// the fleet): the tier never makes a get fail.
    pub(super) async fn run(&self) -> AfterTier {
        let (inner, r) = (self.inner, self.r);
        let Some(tier) = inner.tier.clone() else {
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
                    self.tier_failed(&tier, &e, "ignoring it");
                    None
                }
                Err(e) => {
                    self.tier_failed(&tier, &e, "cannot read the shared tier");
                    return Self::lease_or_origin(taken, failed.is_some());
                }
            };
            let usable = record.filter(|rec| {
                failed.as_ref() != Some(&(rec.sha256.clone(), rec.fetched_at))
                    && self.takes_record(rec)
            });
            if let Some(record) = usable {
                match self.read_tier_copy(&tier, &record).await {
                    Ok((pinned, outcome)) => {
                        if let Some(lease) = taken {
                            inner.uploads.spawn(lease.release());
                        }
                        inner.counters.add(Counter::TierHits, 1);
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
                            inner.uploads.spawn(lease.release());
                        }
                        return AfterTier::Origin;
                    }
                    Err(e) => {
                        if e.kind() == ErrorKind::ChecksumMismatch {
                            inner.counters.add(Counter::IntegrityFailures, 1);
                            self.tier_failed(
                                &tier,
                                &e,
                                "the shared blob failed its check and was removed",
                            );
                            tier.delete_blob(&record.sha256).await;
                        } else {
                            self.tier_failed(&tier, &e, "cannot read the shared blob");
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
                        inner.counters.add(Counter::TierErrors, 1);
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
                    self.tier_failed(&tier, &e, "cannot take the shared lease");
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

    /// The local entry renewed from the fleet's record, when it holds the record's bytes (an
    /// expired copy that another host revalidated): nothing is streamed.
    async fn renewed_from(&self, record: &Record) -> Option<Arc<Pinned>> {
        let entry = self.inner.index.current(&self.r.key)?;
        if !entry.meta.sha256.eq_ignore_ascii_case(&record.sha256) || entry.meta.size != record.size
        {
            return None;
        }
        let validators = Validators {
            etag: record.etag.clone(),
            last_modified: record.last_modified.clone(),
        };
        // Never shortens what the entry had (a record of a host with a shorter TTL).
        let fetched_at = record.fetched_at.max(entry.fetched_at());
        let expires_at = record.expires_at.max(entry.expires_at());
        renew(self.inner, &entry, validators, fetched_at, expires_at)
            .await
            .ok()
            .flatten()
    }

    /// Streams the blob of `record` to a temp file, hashed, and commits it if its SHA-256
    /// is the record's (and a caller's).
    async fn read_tier_copy(&self, tier: &Tier, record: &Record) -> Result<(Arc<Pinned>, Outcome)> {
        let wants = self.wants;
        if let Some(pinned) = self.renewed_from(record).await {
            tracing::debug!(url = %self.r.display, "renewed from the shared record");
            return Ok((pinned, Outcome::Revalidated));
        }
        let mut transfer = Transfer::new(self.inner, self.r, wants, None, self.asked_at);
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
        transfer.reservation = Some(Reservation::take_under_cap_lock(self.inner, size).await);
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
        let finished = transfer.finish().await?;
        if !finished.sha256.eq_ignore_ascii_case(&record.sha256) {
            // The temp file goes with `finished`.
            return Err(Error::checksum(&record.sha256, &finished.sha256));
        }
        if let Err(expected) = wants.check(&finished.sha256) {
            return Err(Error::checksum(&expected, &finished.sha256));
        }
        let (pinned, _) = Commit::new(
            &mut transfer,
            finished,
            record.fetched_at,
            record.expires_at,
        )
        .run()
        .await?;
        wants.announcement().finished(size, started.elapsed());
        Ok((pinned, Outcome::Tier))
    }
}
