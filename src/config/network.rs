//! [`NetworkOptions`]: how the cache talks to the image server (the HTTP client and what it
//! sends, timeouts, retries, redirects and TLS), set through [`CacheBuilder::network`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::CacheBuilder;
use super::http::{HeaderSettings, Secret};
use crate::fetch;

/// How the cache talks to the image server: the HTTP client and what it sends, timeouts,
/// retries, redirects and TLS. Every setting has a default (below, on each setter), and
/// [`CacheBuilder::from_env`] reads the `CACHE_*` variables into it; change it with
/// [`CacheBuilder::network`], which hands over the builder's current options so that what
/// the environment set is kept.
///
/// ```
/// use std::time::Duration;
///
/// let builder = imgcache::ImageCache::builder().network(|n| {
///     n.read_timeout(Duration::from_secs(30))
///         .retries(5)
///         .http_client_with(|b| b.pool_max_idle_per_host(4))
/// });
/// ```
#[must_use]
#[derive(Clone)]
pub struct NetworkOptions {
    pub(super) http_client: Option<reqwest::Client>,
    pub(super) customize_client: Option<fetch::CustomizeClient>,
    pub(super) http_headers: HeaderSettings,
    pub(super) connect_timeout: Duration,
    pub(super) read_timeout: Duration,
    pub(super) download_timeout: Option<Duration>,
    pub(super) retries: u32,
    pub(super) retry_base_delay: Duration,
    pub(super) retry_max_delay: Duration,
    pub(super) outage_memory: Duration,
    pub(super) max_redirects: usize,
    pub(super) ca_certificate: Option<PathBuf>,
    pub(super) insecure_tls: bool,
    pub(super) keep_no_store: bool,
    pub(super) refuse_private: bool,
}

impl NetworkOptions {
    /// The connect timeout unless set: 30 s.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
    /// The read timeout unless set: 12 s, so that a body that stalls on every attempt fails
    /// within a minute with the default retries (4 attempts and their backoff: 51.5 s at
    /// most).
    pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(12);
    /// Retries after a transient failure unless set: 3.
    pub const DEFAULT_RETRIES: u32 = 3;
    /// The first retry's delay unless set: 500 ms.
    pub const DEFAULT_RETRY_BASE_DELAY: Duration = Duration::from_millis(500);
    /// The longest delay between retries unless set: 30 s.
    pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
    /// How long an origin that did not answer is remembered unless set: 30 s.
    pub const DEFAULT_OUTAGE_MEMORY: Duration = Duration::from_secs(30);
    /// Redirects followed unless set: 10.
    pub const DEFAULT_MAX_REDIRECTS: usize = 10;

    /// Every default.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            http_client: None,
            customize_client: None,
            http_headers: HeaderSettings::default(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            read_timeout: Self::DEFAULT_READ_TIMEOUT,
            download_timeout: None,
            retries: Self::DEFAULT_RETRIES,
            retry_base_delay: Self::DEFAULT_RETRY_BASE_DELAY,
            retry_max_delay: Self::DEFAULT_RETRY_MAX_DELAY,
            outage_memory: Self::DEFAULT_OUTAGE_MEMORY,
            max_redirects: Self::DEFAULT_MAX_REDIRECTS,
            ca_certificate: None,
            insecure_tls: false,
            keep_no_store: false,
            refuse_private: false,
        }
    }
}

impl fmt::Debug for NetworkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkOptions")
            .field("custom_http_client", &self.http_client.is_some())
            .field("customized_http_client", &self.customize_client.is_some())
            .field("http_headers", &self.http_headers)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("download_timeout", &self.download_timeout)
            .field("retries", &self.retries)
            .field("retry_base_delay", &self.retry_base_delay)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("outage_memory", &self.outage_memory)
            .field("max_redirects", &self.max_redirects)
            .field("ca_certificate", &self.ca_certificate)
            .field("insecure_tls", &self.insecure_tls)
            .field("keep_no_store", &self.keep_no_store)
            .field("refuse_private", &self.refuse_private)
            .finish()
    }
}

impl CacheBuilder {
    /// Changes how the cache talks to the image server: `edit` gets the builder's current
    /// [`NetworkOptions`] (what [`from_env`](Self::from_env) read, or the defaults) and
    /// returns the ones to use.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = imgcache::ImageCache::builder()
    ///     .image_server("https://images.example/data/")
    ///     .network(|n| n.bearer_token("s3cr3t").retries(0).connect_timeout(Duration::from_secs(5)));
    /// ```
    pub fn network(mut self, edit: impl FnOnce(NetworkOptions) -> NetworkOptions) -> Self {
        self.network = edit(self.network);
        self
    }
}

impl NetworkOptions {
    /// The HTTP client to download with, as given. Default: a client built by the cache
    /// with rustls, the platform's root certificates, no automatic decompression, the
    /// timeouts below and the extra CA of [`ca_certificate`](Self::ca_certificate).
    ///
    /// A client given here loses what the cache builds into its own: the
    /// [`connect_timeout`](Self::connect_timeout) and [`read_timeout`](Self::read_timeout),
    /// the extra CA, [`danger_accept_invalid_certs`](Self::danger_accept_invalid_certs) and
    /// the user agent. It keeps the redirect guards only if it does not follow redirects
    /// itself (build it with
    /// `redirect(reqwest::redirect::Policy::none())`: the cache then follows them, refusing
    /// https-to-http). With [`http_header`](Self::http_header)s or a bearer token it is
    /// refused ([`ErrorKind::Config`](crate::ErrorKind::Config) at build): a client that follows redirects itself
    /// would carry them to the next host before the cache could see it. It should not
    /// decompress bodies: the cache stores bytes exactly as sent. To
    /// add a proxy or a client certificate and keep every guard, use
    /// [`http_client_with`](Self::http_client_with) instead.
    ///
    /// ```
    /// // reqwest's rustls needs a crypto provider (the cache installs ring for its own).
    /// let _ = rustls::crypto::ring::default_provider().install_default();
    /// let client = reqwest::Client::builder()
    ///     .redirect(reqwest::redirect::Policy::none())
    ///     .build()?;
    /// let builder = imgcache::ImageCache::builder().network(|n| n.http_client(client));
    /// # Ok::<(), reqwest::Error>(())
    /// ```
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
        self
    }

    /// Changes the cache's own client builder before it is built: a proxy, a client
    /// certificate, pool sizes. The cache's guards are applied around it: its timeouts and
    /// extra CA first (the closure may change them), then, whatever the closure did, no
    /// automatic redirects (the cache follows them itself, as [`http_client`](Self::http_client)
    /// says) and no decompression.
    ///
    /// ```
    /// let options = imgcache::NetworkOptions::new()
    ///     .http_client_with(|b| b.pool_max_idle_per_host(4).tcp_nodelay(true));
    /// ```
    pub fn http_client_with(
        mut self,
        customize: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder + Send + Sync + 'static,
    ) -> Self {
        self.customize_client = Some(Arc::new(customize));
        self
    }

    /// A header sent with every request to the image server's origin (its scheme, host and
    /// port; see [`image_server`](CacheBuilder::image_server)), and to no other: a redirect to
    /// another host goes without it. For servers that want a key (`X-Api-Key`) or a cookie.
    /// The value is never shown: `Debug`, errors, logs, the dashboard and the API name the
    /// header only. Env `CACHE_HTTP_HEADERS`, one `Name: value` a line. Needs an image
    /// server; a later header of the same name replaces an earlier one.
    ///
    /// ```
    /// let options = imgcache::NetworkOptions::new()
    ///     .http_header("X-Api-Key", "k-1234");
    /// assert!(!format!("{options:?}").contains("k-1234"));
    /// ```
    pub fn http_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.http_headers
            .headers
            .push((name.into(), Secret(value.into())));
        self
    }

    /// `Authorization: Bearer <token>` for the image server's origin only, as
    /// [`http_header`](Self::http_header) sends its headers (env `CACHE_BEARER_TOKEN`).
    ///
    /// ```
    /// let options = imgcache::NetworkOptions::new()
    ///     .bearer_token("eyJhbGciOi...");
    /// ```
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.http_headers.bearer_token = Some(Secret(token.into()));
        self
    }

    /// The bearer token read from a file when the cache is built (surrounding whitespace
    /// trimmed), for secrets mounted as files (env `CACHE_BEARER_TOKEN_FILE`). A token given
    /// by [`bearer_token`](Self::bearer_token) wins.
    ///
    /// ```
    /// let options = imgcache::NetworkOptions::new()
    ///     .bearer_token_file("/run/secrets/orthanc-token");
    /// ```
    pub fn bearer_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.http_headers.bearer_token_file = Some(path.into());
        self
    }

    /// Connect timeout of the default HTTP client. Default 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // An image server on the local network: give up on an unreachable one quickly.
    /// let options = imgcache::NetworkOptions::new()
    ///     .connect_timeout(Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Idle read timeout of the default HTTP client: a body that sends nothing for this long
    /// fails, and is retried like any transient failure. Default 12 s (env
    /// `CACHE_READ_TIMEOUT`), so that a body stalled on every attempt fails within a minute
    /// with the default retries.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // An origin that pauses for a long while before large files (a PACS assembling them).
    /// let options = imgcache::NetworkOptions::new().read_timeout(Duration::from_secs(60));
    /// ```
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Total time one download may take, retries included; none by default
    /// (env `CACHE_DOWNLOAD_TIMEOUT`, e.g. `30m`). Catches an origin that trickles bytes too
    /// slowly for the idle timeout to fire.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // No 2 GB volume takes longer than 20 minutes here, retries included.
    /// let options = imgcache::NetworkOptions::new()
    ///     .download_timeout(Duration::from_secs(20 * 60));
    /// ```
    pub fn download_timeout(mut self, timeout: Duration) -> Self {
        self.download_timeout = Some(timeout);
        self
    }

    /// How long an origin whose download failed on the network (after its retries: refused,
    /// reset, timed out) is remembered as down. Meanwhile a download from it fails at once,
    /// saying when and why it last failed, and an expired copy is served at once instead of
    /// after the retries; the first download after that time asks again, and any answer
    /// from the origin (an error status included) forgets the outage. Default 30 s (env
    /// `CACHE_OUTAGE_MEMORY`); zero turns it off.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // A viewer on a flaky link: ask a silent server again after 5 s.
    /// let options = imgcache::NetworkOptions::new().outage_memory(Duration::from_secs(5));
    /// ```
    pub fn outage_memory(mut self, memory: Duration) -> Self {
        self.outage_memory = memory;
        self
    }

    /// How many times a transient failure (connect error, timeout, 408, 429, 5xx, a body cut
    /// off midway) is retried. Default 3 (env `CACHE_RETRIES`); 0 turns retries off. A body
    /// cut off midway resumes with `Range` where the server allows it.
    ///
    /// ```
    /// // Fail fast: a caller that retries itself (a job queue) wants the first error.
    /// let options = imgcache::NetworkOptions::new().retries(0);
    /// ```
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// First retry delay, doubled at each attempt with jitter. Default 500 ms
    /// (env `CACHE_RETRY_DELAY`).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // Retries about 1 s, 2 s, 4 s, 8 s and 16 s after each failure.
    /// let options = imgcache::NetworkOptions::new()
    ///     .retries(5)
    ///     .retry_base_delay(Duration::from_secs(1));
    /// ```
    pub fn retry_base_delay(mut self, delay: Duration) -> Self {
        self.retry_base_delay = delay;
        self
    }

    /// Longest retry delay, including one asked for by `Retry-After`. Default 30 s
    /// (env `CACHE_RETRY_MAX_DELAY`).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // Never wait more than 5 s between attempts, even when a 429 asks for longer.
    /// let options = imgcache::NetworkOptions::new().retry_max_delay(Duration::from_secs(5));
    /// ```
    pub fn retry_max_delay(mut self, delay: Duration) -> Self {
        self.retry_max_delay = delay;
        self
    }

    /// Redirects followed per request. Default 10 (env `CACHE_MAX_REDIRECTS`). A redirect
    /// from https to http is always refused.
    ///
    /// ```
    /// // A presigned URL answers with one redirect to the object store; more is a loop.
    /// let options = imgcache::NetworkOptions::new().max_redirects(2);
    /// ```
    pub fn max_redirects(mut self, n: usize) -> Self {
        self.max_redirects = n;
        self
    }

    /// A PEM file of CA certificates trusted in addition to the platform's roots, for an
    /// image server with a self-signed or private certificate (env `CACHE_CA_CERT`). Applies
    /// to the default HTTP client only.
    ///
    /// ```
    /// // The hospital's own CA signed the image server's certificate.
    /// let options = imgcache::NetworkOptions::new()
    ///     .ca_certificate("/etc/ssl/certs/hospital-ca.pem");
    /// ```
    pub fn ca_certificate(mut self, pem_file: impl Into<PathBuf>) -> Self {
        self.ca_certificate = Some(pem_file.into());
        self
    }

    /// Accept any TLS certificate. Dangerous: only for a test server you control. Logs a WARN
    /// at start-up (env `CACHE_INSECURE_TLS=1`). Applies to the default HTTP client only.
    ///
    /// ```
    /// // A throwaway test server with a self-signed certificate, never production.
    /// let options = imgcache::NetworkOptions::new()
    ///     .danger_accept_invalid_certs(true);
    /// ```
    pub fn danger_accept_invalid_certs(mut self, on: bool) -> Self {
        self.insecure_tls = on;
        self
    }

    /// Keep answers the origin marks `Cache-Control: no-store` (and `private`) like any
    /// other. Default: off (env `CACHE_KEEP_NO_STORE=1`): such an answer is downloaded for
    /// its callers into a file of its own that goes with their last handle
    /// ([`CacheStatus::NotStored`](crate::CacheStatus::NotStored)), logged once at INFO and
    /// counted in `not_stored`; nothing is kept, published to the tier, or resumed.
    ///
    /// ```
    /// let options = imgcache::NetworkOptions::new().keep_no_store(true);
    /// ```
    pub fn keep_no_store(mut self, on: bool) -> Self {
        self.keep_no_store = on;
        self
    }

    /// Treat `Cache-Control: private` as `no-store`: for a cache that answers many clients,
    /// as `imgcache serve`'s sidecar does (it turns this on). Default: off (env
    /// `CACHE_REFUSE_PRIVATE=1`): one application's own cache may keep what is private to
    /// it.
    ///
    /// ```
    /// let options = imgcache::NetworkOptions::new().refuse_private(true);
    /// ```
    pub fn refuse_private(mut self, on: bool) -> Self {
        self.refuse_private = on;
        self
    }
}
