//! [`TierOptions`]: the tier's settings (`CACHE_SHARED_TIER`, `CACHE_SHARED_LEASE`,
//! `CACHE_SHARED_WAIT` and the AWS variables), set through [`CacheBuilder::tier`].

use std::fmt;
use std::time::Duration;

use super::CacheBuilder;

/// The tier: object storage that a fleet of hosts shares, asked after the local disk and
/// before the origin (the `s3` feature). Read from `CACHE_SHARED_TIER` and the AWS variables
/// by [`CacheBuilder::from_env`]; changed with [`CacheBuilder::tier`], which hands over the
/// builder's current options so that what the environment set is kept.
///
/// ```
/// let builder = imgcache::ImageCache::builder()
///     .tier(|t| t.url("s3://imaging-cache/fleet").option("aws_region", "eu-central-1"));
/// ```
#[must_use]
#[derive(Clone, Default)]
pub struct TierOptions {
    /// `s3://bucket/prefix`.
    pub(crate) url: Option<String>,
    /// `object_store` configuration keys (`aws_endpoint`, `aws_access_key_id`, ...).
    pub(crate) options: Vec<(String, String)>,
    pub(crate) lease: Option<Duration>,
    pub(crate) wait: Option<Duration>,
}

impl fmt::Debug for TierOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The option keys only: their values hold credentials.
        f.debug_struct("TierOptions")
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

/// The AWS variables the tier reads (from the environment or `.env`), as the
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

impl TierOptions {
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

impl TierOptions {
    /// How long a lease lasts unless set: 30 s.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// The longest wait for another host's download unless set: 10 minutes.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);

    /// No tier: the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tier: a fleet's cache on S3-compatible object storage, as
    /// `s3://bucket/prefix` (env `CACHE_SHARED_TIER`). Default: none. A local miss asks the
    /// tier before the origin; one host in the fleet downloads each file from the origin and
    /// uploads it, under a lease, while the others wait for it and read it from the tier.
    /// The endpoint and credentials come from the AWS variables (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...) or
    /// [`option`](Self::option). Needs the `s3` feature.
    ///
    /// ```no_run
    /// # async fn demo() -> imgcache::Result<()> {
    /// let cache = imgcache::ImageCache::builder()
    ///     .tier(|t| {
    ///         t.url("s3://imaging-cache/fleet")
    ///             .option("aws_endpoint", "http://minio.internal:9000")
    ///             .option("aws_allow_http", "true")
    ///     })
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// One setting of the S3 client, by its `object_store` name (`aws_endpoint`,
    /// `aws_region`, `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`,
    /// `aws_allow_http`, ...); wins over the AWS variable of the same meaning. Used with
    /// [`url`](Self::url) only, which needs the `s3` feature.
    ///
    /// ```
    /// let options = imgcache::TierOptions::new()
    ///     .url("s3://imaging-cache/fleet")
    ///     .option("aws_region", "eu-central-1")
    ///     .option("aws_secret_access_key", "wJalrXUtnFEMI");
    /// // The keys are shown, never their values.
    /// assert!(!format!("{options:?}").contains("wJalrXUtnFEMI"));
    /// ```
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into().to_ascii_lowercase();
        self.options.retain(|(k, _)| *k != key);
        self.options.push((key, value.into()));
        self
    }

    /// How long a host's lease on a URL lasts without a renewal (its heartbeat renews it
    /// every quarter of this): how soon a host that died while downloading for the fleet is
    /// replaced. Default [`DEFAULT_LEASE`](Self::DEFAULT_LEASE), 30 s (env `CACHE_SHARED_LEASE`). Used
    /// with [`url`](Self::url) only, which needs the `s3` feature.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // Hosts that die often (spot instances): another takes over their download in 10 s.
    /// let options = imgcache::TierOptions::new()
    ///     .url("s3://imaging-cache/fleet")
    ///     .lease(Duration::from_secs(10));
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The longest a host waits for another host's download before it asks the origin
    /// itself. Default [`DEFAULT_WAIT`](Self::DEFAULT_WAIT), 10 minutes (env `CACHE_SHARED_WAIT`); a
    /// lease that lapses is taken over at once. Used with [`url`](Self::url)
    /// only, which needs the `s3` feature.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // A fast origin: after 2 minutes of waiting on another host, download it here.
    /// let options = imgcache::TierOptions::new()
    ///     .url("s3://imaging-cache/fleet")
    ///     .wait(Duration::from_secs(120));
    /// ```
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }
}

impl CacheBuilder {
    /// Changes the tier's settings: `edit` gets the builder's current [`TierOptions`] (what
    /// [`from_env`](Self::from_env) read, or none) and returns the ones to use.
    ///
    /// ```
    /// let builder = imgcache::ImageCache::builder()
    ///     .tier(|t| t.url("s3://imaging-cache/fleet").option("aws_allow_http", "true"));
    /// ```
    pub fn tier(mut self, edit: impl FnOnce(TierOptions) -> TierOptions) -> Self {
        self.tier = edit(self.tier);
        self
    }
}
