//! Unit tests of the config.

use std::collections::HashMap;
use std::path::Path;

use super::*;

fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn every_variable_is_documented_in_the_crate_docs_and_the_readme() {
    let crate_docs = include_str!("../lib.rs");
    let readme = include_str!("../../README.md");
    for (name, _) in ENVIRONMENT {
        let cell = format!("`{name}`");
        assert!(
            crate_docs.contains(&cell),
            "{name} is not in the crate docs' table"
        );
        assert!(
            readme.contains(&cell),
            "{name} is not in the README's table"
        );
    }
    let names: std::collections::HashSet<_> = ENVIRONMENT.iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), ENVIRONMENT.len(), "a variable is listed twice");
}

#[test]
fn ignored_query_params_come_from_the_environment_and_credentials_stay_hidden() {
    let b = CacheBuilder::from_lookup(lookup(&[
        ("CACHE_IGNORE_QUERY_PARAMS", "token, sig"),
        ("IMAGE_SERVER", "http://alice:s3cret@img:8042/data"),
    ]))
    .unwrap();
    assert_eq!(
        b.ignore_query_params.as_deref(),
        Some(&["token".to_owned(), "sig".to_owned()][..])
    );
    let shown = format!("{b:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("alice"),
        "{shown}"
    );
    let none = CacheBuilder::from_lookup(lookup(&[("CACHE_IGNORE_QUERY_PARAMS", "none")]));
    assert_eq!(none.unwrap().ignore_query_params, Some(Vec::new()));
    assert!(
        CacheBuilder::new().ignore_query_params.is_none(),
        "the default list"
    );
}

#[test]
fn defaults_match_the_original_design() {
    let b = CacheBuilder::from_lookup(lookup(&[])).unwrap();
    assert_eq!(b.max_size_bytes, 1024 * 1024 * 1024);
    assert_eq!(b.default_ttl, Duration::from_secs(86_400));
    assert_eq!(b.file_mode, 0o600);
    assert!(b.image_server.is_none());
    let config = b.cache_dir("/tmp/x").into_config().unwrap();
    assert_eq!(config.dir_mode, 0o700);
}

#[test]
fn environment_values_are_read() {
    let b = CacheBuilder::from_lookup(lookup(&[
        ("IMAGE_SERVER", "http://img:8042/data"),
        ("CACHE_DIR", "/var/cache/imgs"),
        ("CACHE_MAX_SIZE_MB", "2048"),
        ("CACHE_DEFAULT_TTL_HOURS", "0.5"),
        ("CACHE_SWEEP_INTERVAL", "5s"),
        ("CACHE_FILE_MODE", "640"),
    ]))
    .unwrap();
    assert_eq!(b.max_size_bytes, 2048 * MB);
    assert_eq!(b.default_ttl, Duration::from_secs(1800));
    assert_eq!(b.sweep_interval, Duration::from_secs(5));
    assert_eq!(b.cache_dir.as_deref(), Some(Path::new("/var/cache/imgs")));
    let config = b.into_config().unwrap();
    assert_eq!(
        config.image_server.unwrap().as_str(),
        "http://img:8042/data/"
    );
    assert_eq!((config.file_mode, config.dir_mode), (0o640, 0o750));
}

#[test]
fn network_settings_are_read() {
    let b = CacheBuilder::from_lookup(lookup(&[
        ("CACHE_CONNECT_TIMEOUT", "5s"),
        ("CACHE_READ_TIMEOUT", "20s"),
        ("CACHE_DOWNLOAD_TIMEOUT", "1h"),
        ("CACHE_RETRIES", "7"),
        ("CACHE_RETRY_DELAY", "100ms"),
        ("CACHE_RETRY_MAX_DELAY", "10s"),
        ("CACHE_MAX_FILE_SIZE_MB", "4096"),
        ("CACHE_MAX_REDIRECTS", "3"),
        ("CACHE_STALE_GRACE", "2days"),
        ("CACHE_STALE_IF_ERROR", "0"),
        ("CACHE_OFFLINE", "yes"),
        ("CACHE_INSECURE_TLS", "false"),
    ]))
    .unwrap();
    assert_eq!(b.network.connect_timeout, Duration::from_secs(5));
    assert_eq!(b.network.read_timeout, Duration::from_secs(20));
    assert_eq!(b.network.download_timeout, Some(Duration::from_secs(3600)));
    assert_eq!((b.network.retries, b.network.max_redirects), (7, 3));
    assert_eq!(b.network.retry_base_delay, Duration::from_millis(100));
    assert_eq!(b.network.retry_max_delay, Duration::from_secs(10));
    assert_eq!(b.max_file_size_bytes, 4096 * MB);
    assert_eq!(b.stale_grace, Duration::from_secs(2 * 86_400));
    assert!(!b.stale_if_error && b.offline && !b.network.insecure_tls);
    let d = CacheBuilder::new();
    assert!(d.stale_if_error && !d.offline && d.network.retries == 3);
    assert_eq!(d.stale_grace, DEFAULT_STALE_GRACE);
}

#[test]
fn a_missing_or_empty_ca_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = CacheBuilder::new()
        .cache_dir(dir.path())
        .network(|n| n.ca_certificate(dir.path().join("absent.pem")))
        .into_config()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    let err = CacheBuilder::new()
        .cache_dir(dir.path())
        .network(|n| n.ca_certificate(&empty))
        .into_config()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

#[test]
fn bad_values_name_their_variable() {
    for (name, value) in [
        ("CACHE_MAX_SIZE_MB", "lots"),
        ("CACHE_MAX_SIZE_MB", "-5"),
        ("CACHE_DEFAULT_TTL_HOURS", "NaN"),
        ("CACHE_SWEEP_INTERVAL", "often"),
        ("CACHE_FILE_MODE", "999"),
        ("CACHE_OFFLINE", "maybe"),
        ("CACHE_RETRIES", "-1"),
        ("CACHE_READ_TIMEOUT", "1 fortnight-ish"),
        ("CACHE_MAX_FILE_SIZE_MB", "0"),
    ] {
        let err = CacheBuilder::from_lookup(lookup(&[(name, value)])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains(name), "{err}");
    }
    let err = CacheBuilder::from_lookup(lookup(&[("IMAGE_SERVER", "not a url")]))
        .unwrap()
        .cache_dir("/tmp/x")
        .into_config()
        .unwrap_err();
    assert!(err.to_string().contains("IMAGE_SERVER"), "{err}");
}

#[test]
fn invalid_builder_settings_are_errors_not_panics() {
    let base = || CacheBuilder::new().cache_dir("/tmp/x");
    for b in [
        base().max_size_bytes(0),
        base().default_ttl(Duration::ZERO),
        base().file_mode(0o7777),
        base().file_mode(0o200),
        CacheBuilder::new().cache_dir(""),
    ] {
        assert_eq!(b.into_config().unwrap_err().kind(), ErrorKind::Config);
    }
}

#[test]
fn dotenv_file_fills_in_what_the_environment_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(
        &path,
        "CACHE_MAX_SIZE_MB=64\n# comment\nIMAGE_SERVER=http://from-file/\n",
    )
    .unwrap();
    let file = read_dotenv(&path).unwrap();
    let env = lookup(&[("IMAGE_SERVER", "http://from-env/")]);
    let b = CacheBuilder::from_lookup(|k| env(k).or_else(|| file.get(k).cloned())).unwrap();
    assert_eq!(b.max_size_bytes, 64 * MB);
    assert_eq!(b.image_server.as_deref(), Some("http://from-env/"));
    assert!(read_dotenv(&dir.path().join("absent")).unwrap().is_empty());
    std::fs::write(&path, "BROKEN LINE WITHOUT EQUALS\n").unwrap();
    assert_eq!(read_dotenv(&path).unwrap_err().kind(), ErrorKind::Config);
}

#[test]
fn a_body_stalled_on_every_attempt_fails_within_a_minute_by_default() {
    let b = CacheBuilder::new();
    let attempts = b.network.retries + 1;
    // Every attempt waits out the idle timeout; between them, the longest backoff.
    let backoff: Duration = (1..attempts)
        .map(|n| (b.network.retry_base_delay * (1 << (n - 1))).min(b.network.retry_max_delay))
        .sum();
    let worst = b.network.read_timeout * attempts + backoff;
    assert!(worst < Duration::from_secs(60), "{worst:?}");
    assert_eq!(b.network.read_timeout, NetworkOptions::DEFAULT_READ_TIMEOUT);
}

#[test]
fn a_bare_number_is_seconds() {
    let b = CacheBuilder::from_lookup(lookup(&[
        ("CACHE_READ_TIMEOUT", "7"),
        ("CACHE_RETRY_DELAY", "0.25"),
    ]))
    .unwrap();
    assert_eq!(b.network.read_timeout, Duration::from_secs(7));
    assert_eq!(b.network.retry_base_delay, Duration::from_millis(250));
    assert!(CacheBuilder::from_lookup(lookup(&[("CACHE_READ_TIMEOUT", "-3")])).is_err());
}
