//! The tier after the origin: a host that downloaded a file under the fleet's lease
//! publishes it (blob, then record) in the background, with retries, and lets the lease go;
//! the uploads are counted so that a flush or the shutdown can wait for them.

use std::sync::Arc;
use std::time::Duration;

use super::engine::{DownloadResult, Inner, Outcome};
use crate::error::Error;
use crate::key::Resolved;
use crate::stats::Counter;
use crate::tier::{Lease, Record};

/// Upload attempts, one second apart and doubling.
const UPLOAD_ATTEMPTS: u32 = 4;

impl Inner {
    /// After the origin was asked under the lease: publishes what was committed (in the
    /// background: the caller never waits for the tier), or lets the lease go.
    pub(super) fn publish(
        self: &Arc<Self>,
        r: &Resolved,
        result: &DownloadResult,
        lease: Lease,
        replace: bool,
    ) {
        let Some(tier) = self.tier.clone() else {
            return;
        };
        let pinned = match result {
            Ok((pinned, Outcome::Downloaded | Outcome::Revalidated)) => Arc::clone(pinned),
            _ => {
                self.uploads.spawn(lease.release());
                return;
            }
        };
        if lease.is_lost() {
            // Another host took the lease over and publishes its own download.
            self.uploads.spawn(lease.release());
            return;
        }
        let this = Arc::clone(self);
        let key = r.key.clone();
        let shown = r.display.clone();
        self.uploads.spawn(async move {
            let entry = &pinned.entry;
            let validators = entry.validators();
            let record = Record {
                version: 1,
                url: shown.clone(),
                sha256: entry.meta.sha256.clone(),
                size: entry.meta.size,
                etag: validators.etag,
                last_modified: validators.last_modified,
                fetched_at: entry.fetched_at(),
                expires_at: entry.expires_at(),
            };
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=UPLOAD_ATTEMPTS {
                if lease.is_lost() {
                    tracing::warn!(url = %shown, "lost the shared lease; leaving the publishing to its new holder");
                    break;
                }
                let sent = async {
                    // The very file the cache holds, never through a link planted since.
                    let file = pinned.open().map_err(|e| {
                        Error::io("cannot read the file to upload", e).with_path(&entry.path)
                    })?;
                    let uploaded = tier
                        .upload_blob(&record.sha256, record.size, file, replace)
                        .await?;
                    tier.put_record(&key, &record).await?;
                    Ok::<bool, Error>(uploaded)
                }
                .await;
                match sent {
                    Ok(uploaded) => {
                        this.counters.add(Counter::TierUploads, 1);
                        tracing::info!(url = %shown, bytes = record.size, blob = uploaded, "published to the shared tier");
                        break;
                    }
                    Err(e) => {
                        this.counters.add(Counter::TierErrors, 1);
                        tier.failed(&e);
                        tracing::warn!(url = %shown, attempt, error = %e, "cannot publish to the shared tier");
                        if attempt < UPLOAD_ATTEMPTS {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
            }
            drop(pinned);
            lease.release().await;
        });
    }

    /// Waits for the uploads still running (shutdown), at most the tier's wait.
    pub(super) async fn wait_for_uploads(&self) {
        let bound = self.tier.as_ref().map_or(Duration::ZERO, |t| t.wait);
        if tokio::time::timeout(bound, self.uploads.idle())
            .await
            .is_err()
        {
            tracing::warn!("shut down before every upload to the shared tier was done");
        }
    }
}
