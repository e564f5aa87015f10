//! The builder from the environment: one row per variable (the crate documentation's
//! table), its parser, and the `.env` file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CacheBuilder;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::MB;

/// Sets one field of a builder from the variable named by the first argument.
type Setter = fn(&mut CacheBuilder, &str, &str) -> Result<()>;

/// A [`Setter`] that stores `parse(name, value)` in `field`.
macro_rules! set {
    ($($field:ident).+ = $parse:expr) => {
        |b: &mut CacheBuilder, name: &str, value: &str| -> Result<()> {
            b.$($field).+ = $parse(name, value)?;
            Ok(())
        }
    };
}

/// Every environment variable the builder reads, one row each, in the order of the crate
/// documentation's table: the variable, and the builder field it sets through its parser.
pub(super) const ENVIRONMENT: &[(&str, Setter)] = &[
    (
        "IMAGE_SERVER",
        set!(image_server = |_, v: &str| ok(Some(v.to_owned()))),
    ),
    (
        "CACHE_DIR",
        set!(cache_dir = |_, v| ok(Some(expand_home(v)))),
    ),
    ("CACHE_MAX_SIZE_MB", set!(max_size_bytes = parse_mb)),
    ("CACHE_DEFAULT_TTL_HOURS", set!(default_ttl = parse_hours)),
    (
        "CACHE_SWEEP_INTERVAL",
        set!(sweep_interval = parse_duration),
    ),
    (
        "CACHE_STATE_SAVE_INTERVAL",
        set!(state_save_interval = parse_duration),
    ),
    ("CACHE_FILE_MODE", set!(file_mode = parse_mode)),
    ("CACHE_STALE_GRACE", set!(stale_grace = parse_duration)),
    ("CACHE_STALE_IF_ERROR", set!(stale_if_error = parse_bool)),
    ("CACHE_OFFLINE", set!(offline = parse_bool)),
    ("CACHE_RETRIES", set!(network.retries = parse_whole)),
    (
        "CACHE_RETRY_DELAY",
        set!(network.retry_base_delay = parse_duration),
    ),
    (
        "CACHE_RETRY_MAX_DELAY",
        set!(network.retry_max_delay = parse_duration),
    ),
    (
        "CACHE_OUTAGE_MEMORY",
        set!(network.outage_memory = parse_duration),
    ),
    (
        "CACHE_CONNECT_TIMEOUT",
        set!(network.connect_timeout = parse_duration),
    ),
    (
        "CACHE_READ_TIMEOUT",
        set!(network.read_timeout = parse_duration),
    ),
    (
        "CACHE_DOWNLOAD_TIMEOUT",
        set!(network.download_timeout = |n, v| parse_duration(n, v).map(Some)),
    ),
    (
        "CACHE_MAX_FILE_SIZE_MB",
        set!(max_file_size_bytes = parse_mb),
    ),
    (
        "CACHE_MAX_REDIRECTS",
        set!(network.max_redirects = parse_whole),
    ),
    (
        "CACHE_CA_CERT",
        set!(network.ca_certificate = |_, v| ok(Some(expand_home(v)))),
    ),
    (
        "CACHE_INSECURE_TLS",
        set!(network.insecure_tls = parse_bool),
    ),
    (
        "CACHE_KEEP_NO_STORE",
        set!(network.keep_no_store = parse_bool),
    ),
    (
        "CACHE_REFUSE_PRIVATE",
        set!(network.refuse_private = parse_bool),
    ),
    (
        "CACHE_HTTP_HEADERS",
        set!(network.http_headers.headers = super::http::HeaderSettings::parse_lines),
    ),
    (
        "CACHE_BEARER_TOKEN",
        set!(
            network.http_headers.bearer_token =
                |_, v: &str| ok(Some(super::http::Secret(v.trim().to_owned())))
        ),
    ),
    (
        "CACHE_BEARER_TOKEN_FILE",
        set!(network.http_headers.bearer_token_file = |_, v| ok(Some(expand_home(v)))),
    ),
    (
        "CACHE_IGNORE_QUERY_PARAMS",
        set!(ignore_query_params = parse_names),
    ),
    ("CACHE_LOCK", set!(exclusive_lock = parse_lock_mode)),
    ("CACHE_LOCK_WAIT", set!(lock_wait = parse_duration)),
    (
        "CACHE_SHARED_TIER",
        set!(tier.url = |_, v: &str| ok(Some(v.trim().to_owned()))),
    ),
    (
        "CACHE_SHARED_LEASE",
        set!(tier.lease = |n, v| parse_duration(n, v).map(Some)),
    ),
    (
        "CACHE_SHARED_WAIT",
        set!(tier.wait = |n, v| parse_duration(n, v).map(Some)),
    ),
];

impl CacheBuilder {
    /// A builder whose settings come from the environment variables in the table of the crate
    /// documentation, and from a `.env` file in the current directory for variables the
    /// environment does not set. Setters called afterwards override them.
    ///
    /// ```no_run
    /// # async fn demo() -> imgcache::Result<()> {
    /// use imgcache::CacheBuilder;
    ///
    /// // The environment's settings, with one the program always wants.
    /// let cache = CacheBuilder::from_env()?.offline(true).build().await?;
    /// println!("{} entries in {}", cache.stats().entries_count, cache.admin().cache_dir().display());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the variable when a value cannot be parsed, or when the
    /// `.env` file exists but cannot be read.
    pub fn from_env() -> Result<Self> {
        Self::from_env_and_file(Path::new(".env"))
    }

    /// Like [`from_env`](Self::from_env), with the `.env` file at `dotenv` (ignored if absent).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// use imgcache::{CacheBuilder, ErrorKind};
    ///
    /// let dotenv = dir.path().join("imgcache.env");
    /// std::fs::write(&dotenv, "CACHE_MAX_SIZE_MB=lots\n")?;
    /// # if std::env::var_os("CACHE_MAX_SIZE_MB").is_none() { // the environment wins
    /// let err = CacheBuilder::from_env_and_file(&dotenv).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Config);
    /// assert!(err.to_string().contains("CACHE_MAX_SIZE_MB"));
    /// # }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_env_and_file(dotenv: &Path) -> Result<Self> {
        let file = read_dotenv(dotenv)?;
        let set = |v: &Option<String>| v.as_ref().is_some_and(|v| !v.trim().is_empty());
        // The image server and the secrets sent to it come from one place: a .env in the
        // current directory (a checkout of someone else's) may not point a token from the
        // environment at its own server, nor send a file of this user's as a token.
        let from_file =
            |name: &str| !set(&std::env::var(name).ok()) && set(&file.get(name).cloned());
        let from_env = |name: &str| set(&std::env::var(name).ok());
        let secrets = [
            "CACHE_HTTP_HEADERS",
            "CACHE_BEARER_TOKEN",
            "CACHE_BEARER_TOKEN_FILE",
        ];
        let secrets_from_env = secrets.iter().any(|n| from_env(n));
        let secrets_from_file = secrets.iter().any(|n| from_file(n));
        let server_from_env = from_env("IMAGE_SERVER");
        let server_from_file = from_file("IMAGE_SERVER");
        if (secrets_from_env && server_from_file) || (secrets_from_file && server_from_env) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "IMAGE_SERVER and the request headers (CACHE_HTTP_HEADERS, CACHE_BEARER_TOKEN, \
                     CACHE_BEARER_TOKEN_FILE) must come from the same place: one is set in the \
                     environment, the other in {}",
                    dotenv.display()
                ),
            ));
        }
        Self::from_lookup(|name| std::env::var(name).ok().or_else(|| file.get(name).cloned()))
    }

    pub(crate) fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut b = CacheBuilder::new();
        for (name, set) in ENVIRONMENT {
            if let Some(value) = var(name).filter(|v| !v.trim().is_empty()) {
                set(&mut b, name, &value)?;
            }
        }
        if b.tier.url.is_some() {
            b.tier.read_aws_variables(&var);
        }
        Ok(b)
    }
}

pub(super) fn expand_home(v: &str) -> PathBuf {
    match v.trim().strip_prefix("~/") {
        Some(rest) => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(rest),
            None => PathBuf::from(v.trim()),
        },
        None => PathBuf::from(v.trim()),
    }
}

/// A comma-separated list of names; `none` is the empty list.
fn parse_names(_name: &str, v: &str) -> Result<Option<Vec<String>>> {
    if v.trim().eq_ignore_ascii_case("none") {
        return Ok(Some(Vec::new()));
    }
    Ok(Some(
        v.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

fn ok<T>(value: T) -> Result<T> {
    Ok(value)
}

/// Hours, fractions allowed.
fn parse_hours(name: &str, v: &str) -> Result<Duration> {
    let hours = parse_number(name, v)?;
    Duration::try_from_secs_f64(hours * 3600.0).map_err(|_| config_error(name, v, "out of range"))
}

/// Octal permission bits, such as `600` or `0o640`.
fn parse_mode(name: &str, v: &str) -> Result<u32> {
    u32::from_str_radix(v.trim().trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| config_error(name, v, "expected octal such as 600"))
}

fn parse_number(name: &str, v: &str) -> Result<f64> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0)
        .ok_or_else(|| config_error(name, v, "expected a positive number"))
}

/// Megabytes (2^20 bytes, fractions allowed) as bytes.
fn parse_mb(name: &str, v: &str) -> Result<u64> {
    Ok((parse_number(name, v)? * MB as f64) as u64)
}

fn parse_whole<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| config_error(name, v, "expected a whole number"))
}

/// `90s`, `30m`, `24h`, `7days`.
fn parse_duration(name: &str, v: &str) -> Result<Duration> {
    // A bare number is seconds.
    if let Ok(seconds) = v.trim().parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| config_error(name, v, "expected a duration such as 30s or 5m"));
    }
    humantime::parse_duration(v.trim()).map_err(|e| config_error(name, v, &e.to_string()))
}

/// `shared` or `exclusive`, as whether the lock is exclusive.
fn parse_lock_mode(name: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "shared" => Ok(false),
        "exclusive" => Ok(true),
        _ => Err(config_error(name, v, "expected shared or exclusive")),
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(config_error(name, v, "expected 1 or 0 (true or false)")),
    }
}

fn config_error(name: &str, value: &str, why: &str) -> Error {
    Error::new(ErrorKind::Config, format!("{name}={value:?}: {why}"))
}

pub(super) fn read_dotenv(path: &Path) -> Result<HashMap<String, String>> {
    match dotenvy::from_path_iter(path) {
        Ok(iter) => iter
            .map(|item| {
                item.map_err(|e| match e {
                    // Its text may hold a secret (a token, a header): never shown.
                    dotenvy::Error::LineParse(..) => Error::new(
                        ErrorKind::Config,
                        format!(
                            "cannot parse {}: a line is not NAME=value (quote values with \
                             spaces; the line is not shown)",
                            path.display()
                        ),
                    ),
                    e => Error::new(
                        ErrorKind::Config,
                        format!("cannot parse {}", path.display()),
                    )
                    .with_source(e),
                })
            })
            .collect(),
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(HashMap::new())
        }
        Err(e) => Err(
            Error::new(ErrorKind::Config, format!("cannot read {}", path.display())).with_source(e),
        ),
    }
}

/// Property tests of the settings read from the environment: any value, no panic, and a
/// value accepted is the one written.
#[cfg(test)]
mod outside_input {
    use proptest::prelude::*;

    use super::{MB, parse_bool, parse_duration, parse_lock_mode, parse_mb, parse_whole};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn settings_never_panic(value in "\\PC{0,40}") {
            let _ = parse_mb("CACHE_MAX_SIZE_MB", &value);
            let _ = parse_duration("CACHE_SWEEP_INTERVAL", &value);
            let _ = parse_whole::<u32>("CACHE_RETRIES", &value);
            let _ = parse_bool("CACHE_OFFLINE", &value);
            let _ = parse_lock_mode("CACHE_LOCK", &value);
        }

        #[test]
        fn megabytes_are_read_as_written(mb in 1u64..1 << 30) {
            prop_assert_eq!(parse_mb("CACHE_MAX_SIZE_MB", &mb.to_string()).unwrap(), mb * MB);
        }

        #[test]
        fn durations_are_read_as_written(secs in 0u64..1 << 32) {
            prop_assert_eq!(parse_duration("CACHE_SWEEP_INTERVAL", &format!("{secs}s")).unwrap().as_secs(), secs);
        }
    }
}
