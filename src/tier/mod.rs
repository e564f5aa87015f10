//! The tier: one download per file for a fleet of hosts, through S3-compatible object
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
//! wins it; its holder renews it with a compare-and-swap on its ETag (`If-Match`) every quarter
//! of the lease time, each renewal a new ETag. No host compares its clock with another's: a
//! waiter takes a lease over (by the same compare-and-swap, so one waiter wins) once it has
//! seen the same ETag for a whole lease time by its own monotonic clock, or at once when the
//! holder marked it released. The holder downloads from the origin, commits locally, uploads
//! the blob (multipart, streamed from the committed file) and then the record, and marks the
//! lease released; the others wait for the record, and stream the blob to a local temp file,
//! hashed, committed only if the SHA-256 matches the record.
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
    ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, UpdateVersion,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use url::Url;

use crate::clock::Clock;
use crate::config::TierOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::key::Key;

mod lease;
pub(crate) use lease::{Lease, Seen, Take};

/// Part size of multipart uploads; two parts in flight at most, so that an upload holds
/// about three parts in memory whatever the file's size.
const PART_BYTES: usize = 8 * 1024 * 1024;
const PARTS_IN_FLIGHT: usize = 2;
/// A blob read that receives nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(20);
/// The largest record or lease object read: anything bigger is not one of ours.
const SMALL_OBJECT: u64 = 64 * 1024;

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

/// What the tier has of a URL.
pub(crate) enum Lookup {
    Missing,
    Found(Record),
    /// An object that is not a record (does not parse, no digest of 64 hex digits).
    Unsound,
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
    /// The longest one request for a small object (a record, a lease, a head) may take.
    op_timeout: Duration,
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
    pub(crate) fn open(settings: &TierOptions, clock: Arc<dyn Clock>) -> Result<Option<Tier>> {
        let Some(raw) = settings.url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let config_error = |what: String| Error::new(ErrorKind::Config, what);
        // The value is never shown: it may carry credentials.
        let url = Url::parse(raw.trim()).map_err(|e| {
            config_error(format!(
                "CACHE_SHARED_TIER must be s3://bucket/prefix ({e})"
            ))
        })?;
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
            return Err(config_error(
                "CACHE_SHARED_TIER takes no credentials or query: use AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY"
                    .to_owned(),
            ));
        }
        if url.scheme() != "s3" || url.host_str().is_none_or(str::is_empty) {
            return Err(config_error(format!(
                "CACHE_SHARED_TIER must be s3://bucket/prefix, not a {}: URL",
                url.scheme()
            )));
        }
        let lease = settings.lease.unwrap_or(TierOptions::DEFAULT_LEASE);
        let wait = settings.wait.unwrap_or(TierOptions::DEFAULT_WAIT);
        if lease < Duration::from_secs(1) {
            return Err(config_error(
                "the shared lease (CACHE_SHARED_LEASE) must be at least 1s".to_owned(),
            ));
        }
        if wait < lease {
            return Err(config_error(
                "the shared wait (CACHE_SHARED_WAIT) must be at least the lease time".to_owned(),
            ));
        }
        let bucket = url.host_str().unwrap_or_default().to_owned();
        let prefix = StorePath::from(url.path().trim_matches('/'));
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // No limit on a whole request (a blob is gigabytes), but one on each read.
            .with_timeout_disabled()
            .with_read_timeout(STALL)
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
            lease,
            wait,
            op_timeout: (lease / 3).clamp(Duration::from_secs(1), Duration::from_secs(10)),
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

    /// `op` within the timeout of one small request: a tier that accepts the connection and
    /// never answers is a failing tier, not a hang.
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        match tokio::time::timeout(self.op_timeout, op).await {
            Ok(done) => done,
            Err(_) => Err(object_store::Error::Generic {
                store: "S3",
                source: format!("no answer within {:?}", self.op_timeout).into(),
            }),
        }
    }

    /// A small object (a record or a lease) and its version; the body of an object bigger
    /// than [`SMALL_OBJECT`] is never read (`None`: not one of ours).
    async fn get_small(
        &self,
        path: &StorePath,
    ) -> object_store::Result<(Option<Bytes>, UpdateVersion)> {
        self.bounded(async {
            let got = self.store.get(path).await?;
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            if got.meta.size > SMALL_OBJECT {
                return Ok((None, version));
            }
            Ok((Some(got.bytes().await?), version))
        })
        .await
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

    /// The record of `key`, if the tier has one.
    pub(crate) async fn record(&self, key: &Key) -> Result<Lookup> {
        let bytes = match self.get_small(&self.record_path(key)).await {
            Ok((bytes, _)) => bytes,
            Err(object_store::Error::NotFound { .. }) => {
                self.answered();
                return Ok(Lookup::Missing);
            }
            Err(e) => return Err(tier_error("cannot read the shared record", e)),
        };
        self.answered();
        let parsed = bytes.and_then(|b| serde_json::from_slice::<Record>(&b).ok());
        Ok(match parsed {
            Some(record) if record.is_sound() => Lookup::Found(record),
            _ => Lookup::Unsound,
        })
    }

    pub(crate) async fn put_record(&self, key: &Key, record: &Record) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("a record always serialises");
        self.bounded(
            self.store
                .put(&self.record_path(key), PutPayload::from(json)),
        )
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
        // Up to the first byte within the small-request timeout; then each chunk within STALL.
        let got = self
            .bounded(self.store.get(&self.blob_path(sha256)))
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
        file: std::fs::File,
        replace: bool,
    ) -> Result<bool> {
        let location = self.blob_path(sha256);
        if !replace {
            match self.bounded(self.store.head(&location)).await {
                Ok(meta) if meta.size == size => return Ok(false),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(tier_error("cannot look for the shared blob", e)),
            }
        }
        let mut file = tokio::fs::File::from_std(file);
        if size < PART_BYTES as u64 {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf)
                .await
                .map_err(|e| Error::io("cannot read the file to upload", e))?;
            stalled(self.store.put(&location, PutPayload::from(buf)))
                .await
                .map_err(|e| tier_error("cannot upload the shared blob", e))?;
            return Ok(true);
        }
        let upload = self
            .bounded(self.store.put_multipart(&location))
            .await
            .map_err(|e| tier_error("cannot start the shared upload", e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(Error::io("cannot read the file to upload", e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = stalled(writer.wait_for_capacity(PARTS_IN_FLIGHT)).await {
                let _ = tokio::time::timeout(STALL, writer.abort()).await;
                return Err(tier_error("cannot upload the shared blob", e));
            }
            writer.write(&buf[..n]);
        }
        stalled(writer.finish())
            .await
            .map_err(|e| tier_error("cannot finish the shared upload", e))?;
        self.answered();
        Ok(true)
    }

    pub(crate) async fn delete_blob(&self, sha256: &str) {
        let _ = self
            .bounded(self.store.delete(&self.blob_path(sha256)))
            .await;
    }

    /// Removes the record of `key` (the blob stays: other URLs may share it).
    pub(crate) async fn forget(&self, key: &Key) -> Result<()> {
        match self
            .bounded(self.store.delete(&self.record_path(key)))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(tier_error("cannot remove the shared record", e)),
        }
    }

    /// Removes the tier's blobs, records and leases (its three folders below the prefix,
    /// nothing else in the bucket); how many objects went.
    pub(crate) async fn clear(&self) -> Result<u64> {
        let mut count = 0;
        for folder in ["blobs", "urls", "leases"] {
            let below = self.path(&[folder]);
            let listed: Vec<_> =
                stalled(async { Ok(self.store.list(Some(&below)).collect::<Vec<_>>().await) })
                    .await
                    .map_err(|e| tier_error("cannot list the shared tier", e))?;
            let mut paths = Vec::new();
            for meta in listed {
                match meta {
                    Ok(meta) => paths.push(Ok(meta.location)),
                    Err(e) => return Err(tier_error("cannot list the shared tier", e)),
                }
            }
            let removed: Vec<_> = stalled(async {
                Ok(self
                    .store
                    .delete_stream(futures_util::stream::iter(paths).boxed())
                    .collect::<Vec<_>>()
                    .await)
            })
            .await
            .map_err(|e| tier_error("cannot clear the shared tier", e))?;
            for r in removed {
                match r {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => count += 1,
                    Err(e) => return Err(tier_error("cannot clear the shared tier", e)),
                }
            }
        }
        Ok(count)
    }
}

/// `op` within [`STALL`] times three: one step of an upload (a part of 8 MiB) or of a clear
/// that takes longer is a tier that stopped answering.
async fn stalled<T>(
    op: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    match tokio::time::timeout(STALL * 3, op).await {
        Ok(done) => done,
        Err(_) => Err(object_store::Error::Generic {
            store: "S3",
            source: format!("no progress within {:?}", STALL * 3).into(),
        }),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}
