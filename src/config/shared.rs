//! The shared tier's settings: `CACHE_SHARED_TIER`, `CACHE_SHARED_LEASE`,
//! `CACHE_SHARED_WAIT`, the AWS variables, and the builder's `shared_*` options.

use std::fmt;
use std::time::Duration;

use super::CacheBuilder;
#[cfg(doc)]
use super::{DEFAULT_SHARED_LEASE, DEFAULT_SHARED_WAIT};

/// How the shared tier is configured: `CACHE_SHARED_TIER` and the AWS variables, or
/// [`CacheBuilder::shared_tier`] and its siblings.
#[derive(Clone, Default)]
pub(crate) struct TierSettings {
    /// `s3://bucket/prefix`.
    pub(crate) url: Option<String>,
    /// `object_store` configuration keys (`aws_endpoint`, `aws_access_key_id`, ...).
    pub(crate) options: Vec<(String, String)>,
    pub(crate) lease: Option<Duration>,
    pub(crate) wait: Option<Duration>,
}

impl fmt::Debug for TierSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The option keys only: their values hold credentials.
        f.debug_struct("TierSettings")
            .field("url", &self.url)
            .field(
                "options",
                &self.options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("lease", &self.lease)
            .field("wait", &self.wait)
            .finish()
    }
}

/// The AWS variables the shared tier reads (from the environment or `.env`), as the
/// `object_store` settings they set. Read only when `CACHE_SHARED_TIER` is set.
const AWS_VARIABLES: &[&str] = &[
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
    "AWS_SKIP_SIGNATURE",
];

impl TierSettings {
    /// Reads the AWS variables (from the environment or `.env`) into the S3 client's
    /// settings, under their `object_store` names.
    pub(super) fn read_aws_variables(&mut self, var: &impl Fn(&str) -> Option<String>) {
        for name in AWS_VARIABLES {
            if let Some(value) = var(name).filter(|v| !v.trim().is_empty()) {
                self.options.push((name.to_ascii_lowercase(), value));
            }
        }
    }
}

impl CacheBuilder {
    /// The shared tier: a fleet's cache on S3-compatible object storage, as
    /// `s3://bucket/prefix` (env `CACHE_SHARED_TIER`). Default: none. A local miss asks the
    /// tier before the origin; one host in the fleet downloads each file from the origin and
    /// uploads it, under a lease, while the others wait for it and read it from the tier.
    /// The endpoint and credentials come from the AWS variables (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...) or
    /// [`shared_tier_option`](Self::shared_tier_option). Needs the `s3` feature.
    ///
    /// ```no_run
    /// # async fn demo() -> imgcache::Result<()> {
    /// let cache = imgcache::ImageCache::builder()
    ///     .shared_tier("s3://imaging-cache/fleet")
    ///     .shared_tier_option("aws_endpoint", "http://minio.internal:9000")
    ///     .shared_tier_option("aws_allow_http", "true")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn shared_tier(mut self, url: impl Into<String>) -> Self {
        self.shared.url = Some(url.into());
        self
    }

    /// One setting of the S3 client, by its `object_store` name (`aws_endpoint`,
    /// `aws_region`, `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`,
    /// `aws_allow_http`, ...); wins over the AWS variable of the same meaning. Used with
    /// [`shared_tier`](Self::shared_tier) only, which needs the `s3` feature.
    ///
    /// ```
    /// let builder = imgcache::ImageCache::builder()
    ///     .shared_tier("s3://imaging-cache/fleet")
    ///     .shared_tier_option("aws_region", "eu-central-1")
    ///     .shared_tier_option("aws_secret_access_key", "wJalrXUtnFEMI");
    /// // The keys are shown, never their values.
    /// assert!(!format!("{builder:?}").contains("wJalrXUtnFEMI"));
    /// ```
    pub fn shared_tier_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into().to_ascii_lowercase();
        self.shared.options.retain(|(k, _)| *k != key);
        self.shared.options.push((key, value.into()));
        self
    }

    /// How long a host's lease on a URL lasts without a renewal (its heartbeat renews it
    /// every quarter of this): how soon a host that died while downloading for the fleet is
    /// replaced. Default [`DEFAULT_SHARED_LEASE`], 30 s (env `CACHE_SHARED_LEASE`). Used
    /// with [`shared_tier`](Self::shared_tier) only, which needs the `s3` feature.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // Hosts that die often (spot instances): another takes over their download in 10 s.
    /// let builder = imgcache::ImageCache::builder()
    ///     .shared_tier("s3://imaging-cache/fleet")
    ///     .shared_lease(Duration::from_secs(10));
    /// ```
    pub fn shared_lease(mut self, lease: Duration) -> Self {
        self.shared.lease = Some(lease);
        self
    }

    /// The longest a host waits for another host's download before it asks the origin
    /// itself. Default [`DEFAULT_SHARED_WAIT`], 10 minutes (env `CACHE_SHARED_WAIT`); a
    /// lease that lapses is taken over at once. Used with [`shared_tier`](Self::shared_tier)
    /// only, which needs the `s3` feature.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // A fast origin: after 2 minutes of waiting on another host, download it here.
    /// let builder = imgcache::ImageCache::builder()
    ///     .shared_tier("s3://imaging-cache/fleet")
    ///     .shared_wait(Duration::from_secs(120));
    /// ```
    pub fn shared_wait(mut self, wait: Duration) -> Self {
        self.shared.wait = Some(wait);
        self
    }
}
