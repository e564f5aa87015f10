//! The shared tier: one download per file for a fleet of hosts, through S3-compatible object
//! storage (AWS S3, MinIO, Ceph RGW, Garage, SeaweedFS), on the `object_store` crate.
//!
//! Layout below the tier's prefix:
//!
//! ```text
//! blobs/sha256/<hex>     the bytes, by content (two URLs with one content share a blob)
//! urls/<key>.json        one record per URL: sha256, size, validators, fetched and expiry time
//! leases/<key>.json      who downloads the URL from the origin for the fleet, and until when
//! ```
//!
//! A lease is taken with a conditional create (`If-None-Match: *`), so that exactly one host
//! wins it; its holder renews it with a compare-and-swap on its ETag (`If-Match`) every third
//! of the lease time, and a lease whose time has passed is taken over the same way, so that
//! one host replaces a holder that died. The holder downloads from the origin, commits
//! locally, uploads the blob (multipart, streamed from the committed file) and then the
//! record, and lets the lease go; the others wait for the record, and stream the blob to a
//! local temp file, hashed, committed only if the SHA-256 matches the record.
//!
//! The tier never makes the cache less available: any error of the tier (down, slow,
//! answering errors, a record or blob that does not check out) is counted, logged at WARN,
//! and the origin is asked.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use url::Url;

use crate::clock::Clock;
use crate::config::{DEFAULT_SHARED_LEASE, DEFAULT_SHARED_WAIT, TierSettings};
use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;

/// Part size of multipart uploads; two parts in flight at most, so that an upload holds
/// about three parts in memory whatever the file's size.
const PART_BYTES: usize = 8 * 1024 * 1024;
const PARTS_IN_FLIGHT: usize = 2;
/// A blob read that receives nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(20);

/// What the tier knows of one URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) version: u32,
    /// The URL as shown (no credentials, signing parameters redacted).
    pub(crate) url: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_modified: Option<String>,
    /// Milliseconds since the Unix epoch, by the clock of the host that wrote it.
    pub(crate) fetched_at: u64,
    pub(crate) expires_at: u64,
}

impl Record {
    /// A record that anything can be taken from: a digest of 64 hex digits.
    fn is_sound(&self) -> bool {
        self.sha256.len() == 64 && self.sha256.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseBody {
    holder: String,
    expires_at: u64,
}

/// A lease this host holds: renewed by its heartbeat until released.
pub(crate) struct Lease {
    tier: Arc<Tier>,
    key: Key,
    version: Arc<Mutex<UpdateVersion>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Lease {
    /// Lets the lease go: the heartbeat stops and the lease object is deleted (if it is
    /// still this host's).
    pub(crate) async fn release(self) {
        self.stop.cancel();
        let version = self
            .version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.tier.drop_lease(&self.key, &version).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Released or not, the heartbeat ends with the handle: a lease left behind expires.
        self.stop.cancel();
    }
}

/// The outcome of trying to take a URL's lease.
pub(crate) enum Take {
    Taken(Lease),
    /// Another host holds it.
    Held,
}

/// What the dashboard and stats show of the tier.
#[derive(Debug, Clone, Default)]
struct Health {
    last_error: Option<String>,
}

pub(crate) struct Tier {
    store: Arc<AmazonS3>,
    prefix: StorePath,
    /// `s3://bucket/prefix`, for display.
    pub(crate) shown: String,
    pub(crate) lease: Duration,
    pub(crate) wait: Duration,
    holder: String,
    clock: Arc<dyn Clock>,
    health: Mutex<Health>,
}

impl fmt::Debug for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tier").field("url", &self.shown).finish()
    }
}

fn tier_error(what: impl Into<String>, e: object_store::Error) -> Error {
    Error::new(ErrorKind::Network, what).with_source(e)
}

impl Tier {
    /// Connects the tier described by `settings` (no request is made yet).
    pub(crate) fn open(settings: &TierSettings, clock: Arc<dyn Clock>) -> Result<Option<Tier>> {
        let Some(raw) = settings.url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let config_error = |what: String| Error::new(ErrorKind::Config, what);
        let url = Url::parse(raw.trim()).map_err(|e| {
            config_error(format!(
                "CACHE_SHARED_TIER must be s3://bucket/prefix, not {raw:?}: {e}"
            ))
        })?;
        if url.scheme() != "s3" || url.host_str().is_none_or(str::is_empty) {
            return Err(config_error(format!(
                "CACHE_SHARED_TIER must be s3://bucket/prefix, not {raw:?}"
            )));
        }
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
            return Err(config_error(
                "CACHE_SHARED_TIER takes no credentials or query: use AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY"
                    .to_owned(),
            ));
        }
        let bucket = url.host_str().unwrap_or_default().to_owned();
        let prefix = StorePath::from(url.path().trim_matches('/'));
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout_disabled()
            .with_user_agent(
                concat!("imgcache/", env!("CARGO_PKG_VERSION"))
                    .parse()
                    .expect("a valid header value"),
            );
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_client_options(client)
            .with_retry(retry);
        for (key, value) in &settings.options {
            let parsed = key
                .to_ascii_lowercase()
                .parse()
                .map_err(|_| config_error(format!("{key} is not a setting of the S3 client")))?;
            builder = builder.with_config(parsed, value);
        }
        // Installs ring once per process (reqwest is built without a crypto provider).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = builder.build().map_err(|e| {
            Error::new(ErrorKind::Config, "cannot configure the shared tier").with_source(e)
        })?;
        Ok(Some(Tier {
            store: Arc::new(store),
            shown: format!("s3://{bucket}/{prefix}"),
            prefix,
            lease: settings.lease.unwrap_or(DEFAULT_SHARED_LEASE),
            wait: settings.wait.unwrap_or(DEFAULT_SHARED_WAIT),
            holder: format!(
                "{}-{}-{:016x}",
                hostname(),
                std::process::id(),
                fastrand::u64(..)
            ),
            clock,
            health: Mutex::new(Health::default()),
        }))
    }

    fn now_ms(&self) -> u64 {
        crate::clock::unix_ms(self.clock.now())
    }

    fn path(&self, parts: &[&str]) -> StorePath {
        let mut path = self.prefix.clone();
        for part in parts {
            path = path.clone().join(*part);
        }
        path
    }

    fn record_path(&self, key: &Key) -> StorePath {
        self.path(&["urls", &format!("{}.json", key.as_str())])
    }

    fn blob_path(&self, sha256: &str) -> StorePath {
        self.path(&["blobs", "sha256", &sha256.to_ascii_lowercase()])
    }

    fn lease_path(&self, key: &Key) -> StorePath {
        self.path(&["leases", &format!("{}.json", key.as_str())])
    }

    /// Notes an error of the tier for the dashboard.
    pub(crate) fn failed(&self, e: &Error) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = Some(e.to_string());
    }

    /// Notes that the tier answered.
    fn answered(&self) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if health.last_error.is_some() {
            health.last_error = None;
        }
    }

    /// "ok", or the last error while the tier fails.
    pub(crate) fn state(&self) -> String {
        match &self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
        {
            None => "ok".to_owned(),
            Some(e) => format!("failing: {e}"),
        }
    }

    /// The record of `key`, if the tier has a sound one.
    pub(crate) async fn record(&self, key: &Key) -> Result<Option<Record>> {
        let got = match self.store.get(&self.record_path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                self.answered();
                return Ok(None);
            }
            Err(e) => return Err(tier_error("cannot read the shared record", e)),
        };
        let bytes = got
            .bytes()
            .await
            .map_err(|e| tier_error("cannot read the shared record", e))?;
        self.answered();
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(record) if record.is_sound() => Ok(Some(record)),
            _ => Err(Error::new(
                ErrorKind::Network,
                "the shared record of this URL is not a record (ignored)",
            )),
        }
    }

    pub(crate) async fn put_record(&self, key: &Key, record: &Record) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("a record always serialises");
        self.store
            .put(&self.record_path(key), PutPayload::from(json))
            .await
            .map_err(|e| tier_error("cannot write the shared record", e))?;
        self.answered();
        Ok(())
    }

    /// The blob's bytes, as a stream whose chunks each arrive within [`STALL`].
    pub(crate) async fn blob(
        &self,
        sha256: &str,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes>>)> {
        let got = self
            .store
            .get(&self.blob_path(sha256))
            .await
            .map_err(|e| tier_error("cannot read the shared blob", e))?;
        self.answered();
        let size = got.meta.size;
        let stream = futures_util::stream::unfold(got.into_stream(), |mut inner| async move {
            let item = match tokio::time::timeout(STALL, inner.next()).await {
                Err(_) => Err(Error::new(ErrorKind::Incomplete, "the shared blob stalled")),
                Ok(None) => return None,
                Ok(Some(Err(e))) => Err(Error::new(
                    ErrorKind::Incomplete,
                    "the shared blob was cut off",
                )
                .with_source(e)),
                Ok(Some(Ok(bytes))) => Ok(bytes),
            };
            Some((item, inner))
        })
        .boxed();
        Ok((size, stream))
    }

    /// Uploads the file at `path` as the blob of `sha256`, unless the tier has a blob of that
    /// size already (the blob is named by its content). Multipart, streamed from the file:
    /// at most three parts are in memory at once.
    pub(crate) async fn upload_blob(
        &self,
        sha256: &str,
        size: u64,
        path: &std::path::Path,
        replace: bool,
    ) -> Result<bool> {
        let location = self.blob_path(sha256);
        if !replace {
            match self.store.head(&location).await {
                Ok(meta) if meta.size == size => return Ok(false),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(tier_error("cannot look for the shared blob", e)),
            }
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io("cannot read the file to upload", e).with_path(path))?;
        if size < PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf)
                .await
                .map_err(|e| Error::io("cannot read the file to upload", e).with_path(path))?;
            self.store
                .put(&location, PutPayload::from(buf))
                .await
                .map_err(|e| tier_error("cannot upload the shared blob", e))?;
            return Ok(true);
        }
        let upload = self
            .store
            .put_multipart(&location)
            .await
            .map_err(|e| tier_error("cannot start the shared upload", e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(Error::io("cannot read the file to upload", e).with_path(path));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(tier_error("cannot upload the shared blob", e));
            }
            writer.write(&buf[..n]);
        }
        writer
            .finish()
            .await
            .map_err(|e| tier_error("cannot finish the shared upload", e))?;
        self.answered();
        Ok(true)
    }

    pub(crate) async fn delete_blob(&self, sha256: &str) {
        let _ = self.store.delete(&self.blob_path(sha256)).await;
    }

    /// Takes the lease of `key`: created if there is none, taken over (compare-and-swap on
    /// its ETag) if its time has passed.
    pub(crate) async fn take_lease(self: &Arc<Self>, key: &Key) -> Result<Take> {
        let location = self.lease_path(key);
        for _ in 0..3 {
            let body = self.lease_body();
            let created = self
                .store
                .put_opts(&location, body, PutOptions::from(PutMode::Create))
                .await;
            match created {
                Ok(put) => return Ok(Take::Taken(self.hold(key, put.into()))),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(tier_error("cannot take the shared lease", e)),
            }
            let got = match self.store.get(&location).await {
                Ok(got) => got,
                // Let go of meanwhile: create it again.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(tier_error("cannot read the shared lease", e)),
            };
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got
                .bytes()
                .await
                .map_err(|e| tier_error("cannot read the shared lease", e))?;
            // A lease that does not parse is treated as expired: it names no live holder.
            let until = serde_json::from_slice::<LeaseBody>(&bytes).map_or(0, |l| l.expires_at);
            if self.now_ms() < until {
                return Ok(Take::Held);
            }
            let taken = self
                .store
                .put_opts(
                    &location,
                    self.lease_body(),
                    PutOptions::from(PutMode::Update(version)),
                )
                .await;
            match taken {
                Ok(put) => {
                    tracing::warn!(
                        key = key.as_str(),
                        "took over the shared lease of a host that stopped renewing it"
                    );
                    return Ok(Take::Taken(self.hold(key, put.into())));
                }
                // Another host took it over first.
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(tier_error("cannot take over the shared lease", e)),
            }
        }
        Ok(Take::Held)
    }

    fn lease_body(&self) -> PutPayload {
        let body = LeaseBody {
            holder: self.holder.clone(),
            expires_at: self.now_ms().saturating_add(self.lease.as_millis() as u64),
        };
        PutPayload::from(serde_json::to_vec(&body).expect("a lease always serialises"))
    }

    /// Starts the heartbeat of a lease just taken.
    fn hold(self: &Arc<Self>, key: &Key, version: UpdateVersion) -> Lease {
        let lease = Lease {
            tier: Arc::clone(self),
            key: key.clone(),
            version: Arc::new(Mutex::new(version)),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let (tier, key, version, stop) = (
            Arc::clone(self),
            key.clone(),
            Arc::clone(&lease.version),
            lease.stop.clone(),
        );
        tokio::spawn(async move {
            let every = (tier.lease / 3).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let current = version.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let renewed = tier
                    .store
                    .put_opts(
                        &tier.lease_path(&key),
                        tier.lease_body(),
                        PutOptions::from(PutMode::Update(current)),
                    )
                    .await;
                match renewed {
                    Ok(put) => *version.lock().unwrap_or_else(|e| e.into_inner()) = put.into(),
                    Err(object_store::Error::Precondition { .. }) => {
                        tracing::warn!(key = key.as_str(), "lost the shared lease to another host");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(key = key.as_str(), error = %e, "cannot renew the shared lease");
                    }
                }
            }
        });
        lease
    }

    /// Deletes the lease of `key` if it is still the version this host wrote.
    async fn drop_lease(&self, key: &Key, version: &UpdateVersion) {
        let location = self.lease_path(key);
        if let Ok(meta) = self.store.head(&location).await
            && meta.e_tag == version.e_tag
        {
            let _ = self.store.delete(&location).await;
        }
    }

    /// Removes the record of `key` (the blob stays: other URLs may share it).
    pub(crate) async fn forget(&self, key: &Key) -> Result<()> {
        match self.store.delete(&self.record_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(tier_error("cannot remove the shared record", e)),
        }
    }

    /// Removes everything below the tier's prefix; how many objects went.
    pub(crate) async fn clear(&self) -> Result<u64> {
        let listed: Vec<_> = self.store.list(Some(&self.prefix)).collect().await;
        let mut paths = Vec::new();
        for meta in listed {
            match meta {
                Ok(meta) => paths.push(Ok(meta.location)),
                Err(e) => return Err(tier_error("cannot list the shared tier", e)),
            }
        }
        let removed: Vec<_> = self
            .store
            .delete_stream(futures_util::stream::iter(paths).boxed())
            .collect()
            .await;
        let mut count = 0;
        for r in removed {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => count += 1,
                Err(e) => return Err(tier_error("cannot clear the shared tier", e)),
            }
        }
        Ok(count)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}
