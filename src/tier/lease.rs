//! The leases of the tier: who downloads a URL from the origin for the fleet.
//! See the module above for how they are taken, renewed, taken over and released.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::{Tier, tier_error};
use crate::error::Result;
use crate::key::Key;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseBody {
    holder: String,
    /// By the holder's clock; for people reading the bucket (no host trusts another's clock).
    expires_at: u64,
    /// Let go of by its holder: the next host takes it at once.
    #[serde(default)]
    released: bool,
    /// New at each write, so that each renewal is a new ETag whatever the clocks say.
    #[serde(default)]
    nonce: u64,
}

/// A lease this host holds: renewed by its heartbeat until released.
pub(crate) struct Lease {
    tier: Arc<Tier>,
    key: Key,
    version: Arc<Mutex<UpdateVersion>>,
    /// Set by the heartbeat when another host took the lease over.
    lost: Arc<std::sync::atomic::AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// Whether another host has taken the lease over (this host's download is then one of
    /// two, and must not overwrite what the other publishes).
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Lets the lease go: the heartbeat stops (a renewal in flight is waited for), and the
    /// lease is marked released with a compare-and-swap, so that a lease another host has
    /// taken over meanwhile is left alone.
    pub(crate) async fn release(mut self) {
        self.stop.cancel();
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = heartbeat.await;
        }
        if self.is_lost() {
            return;
        }
        let version = self
            .version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let body = self.tier.lease_body(true);
        let _ = self
            .tier
            .bounded(self.tier.store.put_opts(
                &self.tier.lease_path(&self.key),
                body,
                PutOptions::from(PutMode::Update(version)),
            ))
            .await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Released or not, the heartbeat ends with the handle: a lease left behind lapses.
        self.stop.cancel();
    }
}

/// What a waiter remembers of a lease another host holds: the version it saw first and
/// when, by its own monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct Seen(Option<(Option<String>, Option<String>, Instant)>);

/// The outcome of trying to take a URL's lease.
pub(crate) enum Take {
    Taken(Lease),
    /// Another host holds it.
    Held,
}

impl Tier {
    /// Takes the lease of `key`: created if there is none; taken over (compare-and-swap on
    /// its version) if its holder released it, or if `seen` has watched the same version for
    /// a whole lease time. Otherwise [`Take::Held`], with `seen` brought up to date.
    pub(crate) async fn take_lease(self: &Arc<Self>, key: &Key, seen: &mut Seen) -> Result<Take> {
        let location = self.lease_path(key);
        for _ in 0..3 {
            let created = self
                .bounded(self.store.put_opts(
                    &location,
                    self.lease_body(false),
                    PutOptions::from(PutMode::Create),
                ))
                .await;
            match created {
                Ok(put) => return Ok(Take::Taken(self.hold(key, put.into()))),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(tier_error("cannot take the shared lease", e)),
            }
            let (bytes, version) = match self.get_small(&location).await {
                Ok(got) => got,
                // Removed meanwhile (a clear): create it again.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(tier_error("cannot read the shared lease", e)),
            };
            // A lease that does not parse names no live holder: as good as released.
            let released = bytes
                .and_then(|b| serde_json::from_slice::<LeaseBody>(&b).ok())
                .is_none_or(|l| l.released);
            let now = Instant::now();
            let lapsed = match &seen.0 {
                Some((e_tag, v, since)) if *e_tag == version.e_tag && *v == version.version => {
                    now.duration_since(*since) >= self.lease
                }
                _ => {
                    seen.0 = Some((version.e_tag.clone(), version.version.clone(), now));
                    false
                }
            };
            if !released && !lapsed {
                return Ok(Take::Held);
            }
            let taken = self
                .bounded(self.store.put_opts(
                    &location,
                    self.lease_body(false),
                    PutOptions::from(PutMode::Update(version)),
                ))
                .await;
            match taken {
                Ok(put) => {
                    if lapsed {
                        tracing::warn!(
                            key = key.as_str(),
                            "took over the shared lease of a host that stopped renewing it"
                        );
                    }
                    return Ok(Take::Taken(self.hold(key, put.into())));
                }
                // Another host took it first.
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(tier_error("cannot take over the shared lease", e)),
            }
        }
        Ok(Take::Held)
    }

    fn lease_body(&self, released: bool) -> PutPayload {
        let body = LeaseBody {
            holder: self.holder.clone(),
            expires_at: self.now_ms().saturating_add(self.lease.as_millis() as u64),
            released,
            nonce: fastrand::u64(..),
        };
        PutPayload::from(serde_json::to_vec(&body).expect("a lease always serialises"))
    }

    /// Starts the heartbeat of a lease just taken.
    fn hold(self: &Arc<Self>, key: &Key, version: UpdateVersion) -> Lease {
        let version = Arc::new(Mutex::new(version));
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = tokio_util::sync::CancellationToken::new();
        let heartbeat = {
            let (tier, key, version, lost, stop) = (
                Arc::clone(self),
                key.clone(),
                Arc::clone(&version),
                Arc::clone(&lost),
                stop.clone(),
            );
            tokio::spawn(async move {
                // At a fixed rate, each renewal bounded by the period: however slow one is,
                // a holder that lives writes at least every lease/4 plus a period, well
                // within the lease time that a waiter watches for.
                let every = tier.lease / 4;
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let current = version.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let renewed = tokio::time::timeout(
                        every,
                        tier.store.put_opts(
                            &tier.lease_path(&key),
                            tier.lease_body(false),
                            PutOptions::from(PutMode::Update(current)),
                        ),
                    )
                    .await;
                    match renewed {
                        Ok(Ok(put)) => {
                            *version.lock().unwrap_or_else(|e| e.into_inner()) = put.into();
                        }
                        Ok(Err(object_store::Error::Precondition { .. }))
                        | Ok(Err(object_store::Error::NotFound { .. })) => {
                            // A renewal that was applied but whose answer was lost leaves a
                            // newer version of this host's own: adopted, not given up.
                            match tier.own_lease(&key).await {
                                Some(own) => {
                                    *version.lock().unwrap_or_else(|e| e.into_inner()) = own;
                                }
                                None => {
                                    lost.store(true, std::sync::atomic::Ordering::Release);
                                    tracing::warn!(
                                        key = key.as_str(),
                                        "lost the shared lease to another host"
                                    );
                                    return;
                                }
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(key = key.as_str(), error = %e, "cannot renew the shared lease");
                        }
                        Err(_) => {
                            tracing::warn!(
                                key = key.as_str(),
                                "the renewal of the shared lease timed out"
                            );
                        }
                    }
                }
            })
        };
        Lease {
            tier: Arc::clone(self),
            key: key.clone(),
            version,
            lost,
            stop,
            heartbeat: Some(heartbeat),
        }
    }

    /// The version of `key`'s lease if it is still this host's, live.
    async fn own_lease(&self, key: &Key) -> Option<UpdateVersion> {
        let (bytes, version) = self.get_small(&self.lease_path(key)).await.ok()?;
        let body: LeaseBody = serde_json::from_slice(&bytes?).ok()?;
        (body.holder == self.holder && !body.released).then_some(version)
    }
}
