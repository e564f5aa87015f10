//! URLs: relative to the image server, hostile, with credentials, in any string form.

use std::sync::Arc;

use imgcache::{CacheStatus, ErrorKind};

use crate::support::origin::{Origin, Route, volume};
use crate::support::{files, open};

#[tokio::test]
async fn relative_urls_use_the_image_server() {
    let origin = Origin::start().await;
    let body = volume(120, 5000);
    origin.route("data/ct/0042.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(imgcache::ManualClock::new());
    let cache = crate::support::builder(dir.path(), &clock)
        .image_server(origin.url("data"))
        .build()
        .await
        .unwrap();
    let rel = cache.get("ct/0042.nii.gz").await.unwrap();
    let abs = cache.get(origin.url("data/ct/0042.nii.gz")).await.unwrap();
    assert_eq!(rel.path(), abs.path());
    assert_eq!(abs.status(), CacheStatus::Hit);
    assert_eq!(std::fs::read(rel.path()).unwrap(), body);
    for hostile in [
        "../secret.nii.gz",
        "/etc/passwd",
        "%2e%2e/x.nii.gz",
        "//evil/x",
    ] {
        let err = cache.get(hostile).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{hostile}");
    }
    assert_eq!(origin.total_hits(), 1);
}

#[tokio::test]
async fn hostile_urls_cannot_escape_the_cache_directory() {
    let origin = Origin::start().await;
    let long = format!("{}.nii.gz", "x".repeat(5000));
    let paths = [
        "a/..%2F..%2F..%2Fescape.nii.gz".to_owned(),
        "a%5C..%5C..%5Cescape.nii.gz".to_owned(),
        "dir/".to_owned(),
        "%00.nii.gz".to_owned(),
        "meta.json".to_owned(),
        long.clone(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    for (i, p) in paths.iter().enumerate() {
        let body = volume(130 + i as u64, 2000);
        // The origin sees the path as sent; route it exactly.
        origin.route(p, Route::ok(body.clone()));
        let file = cache.get(origin.url(p)).await.unwrap();
        let canonical = file.path().canonicalize().unwrap();
        assert!(
            canonical.starts_with(dir.path().canonicalize().unwrap().join("v1/entries")),
            "{p}"
        );
        assert!(file.path().file_name().unwrap().len() <= 120, "{p}");
        assert_ne!(file.path().file_name().unwrap(), "meta.json");
        assert_eq!(std::fs::read(file.path()).unwrap(), body, "{p}");
    }
    assert!(!dir.path().join("escape.nii.gz").exists());
    assert_eq!(cache.stats().entries_count, paths.len() as u64);

    for bad in [
        "ftp://h/x",
        "file:///etc/passwd",
        "",
        "http://",
        "no scheme",
    ] {
        assert_eq!(
            cache.get(bad).await.unwrap_err().kind(),
            ErrorKind::InvalidUrl,
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn credentials_are_sent_but_never_stored_or_shown() {
    let origin = Origin::start().await;
    origin.route("private.nii.gz", Route::ok(volume(140, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = format!("http://alice:s3cret@{}/private.nii.gz", origin.addr());
    let file = cache.get(&url).await.unwrap();
    let auth = origin.seen()[0].header("authorization").map(str::to_owned);
    assert_eq!(auth.as_deref(), Some("Basic YWxpY2U6czNjcmV0"));
    assert!(!file.url().contains("s3cret"));
    for f in files(dir.path()) {
        let text =
            String::from_utf8_lossy(&std::fs::read(dir.path().join(&f)).unwrap()).into_owned();
        assert!(!text.contains("s3cret"), "{f:?} holds the password");
    }
    // The same resource without credentials is the same entry.
    let plain = cache.get(origin.url("private.nii.gz")).await.unwrap();
    assert_eq!(plain.status(), CacheStatus::Hit);
    origin.route("private.nii.gz", Route::status(401));
    let other = format!("http://bob:hunter2@{}/other.nii.gz", origin.addr());
    let err = cache.get(&other).await.unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
}

#[tokio::test]
async fn urls_may_be_str_string_or_url() {
    let origin = Origin::start().await;
    origin.route("k.nii.gz", Route::ok(volume(180, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let text: String = origin.url("k.nii.gz");
    let parsed = url::Url::parse(&text).unwrap();
    let a = cache.get(text.as_str()).await.unwrap();
    let b = cache.get(text.clone()).await.unwrap();
    let c = cache.get(&parsed).await.unwrap();
    let d = cache.get(parsed).await.unwrap();
    assert!([&b, &c, &d].iter().all(|f| f.path() == a.path()));
    assert_eq!(origin.hits("k.nii.gz"), 1);
}

#[tokio::test]
async fn a_presigned_url_signed_again_is_a_hit_and_its_signature_is_never_shown() {
    let origin = Origin::start().await;
    let body = volume(43, 50_000);
    origin.route("ct/9.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let mut events = cache.subscribe();
    let signed = |sig: &str| {
        origin.url(&format!(
            "ct/9.nii.gz?X-Amz-Credential=AKIA%2F1&X-Amz-Date=20261202T000000Z&X-Amz-Signature={sig}"
        ))
    };
    let first = cache.get(signed("aaaa1111")).await.unwrap();
    let second = cache.get(signed("bbbb2222")).await.unwrap();
    assert_eq!(second.status(), CacheStatus::Hit, "signed again: a hit");
    assert_eq!(origin.hits("ct/9.nii.gz"), 1);
    assert_eq!(std::fs::read(second.path()).unwrap(), body);
    // The origin got the signature; nothing the cache shows or stores has it.
    assert!(origin.seen()[0].path.contains("X-Amz-Signature=aaaa1111"));
    let secrets = ["aaaa1111", "bbbb2222", "AKIA"];
    let mut shown = vec![first.url().to_owned(), format!("{first:?}")];
    shown.extend(cache.admin().entries().iter().map(|e| format!("{e:?}")));
    while let Some(imgcache::Received::Event(e)) = events.try_recv() {
        shown.push(serde_json::to_string(&e).unwrap());
    }
    for file in files(dir.path()) {
        shown.push(
            String::from_utf8_lossy(&std::fs::read(dir.path().join(file)).unwrap()).into_owned(),
        );
    }
    shown.push(cache.admin().redacted(signed("cccc3333")));
    for text in &shown {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} shown in {text}");
        }
    }
    assert!(
        first.url().contains("X-Amz-Signature=REDACTED"),
        "{}",
        first.url()
    );
    // What the dashboard shows can be handed back: it names the same entry.
    assert!(cache.invalidate(first.url()).await.unwrap());
}

/// Every file name `get` accepts survives a restart: get, reopen, hit.
#[test]
fn any_name_that_get_accepts_is_still_a_hit_after_a_restart() {
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::start());
    let body = volume(44, 1000);
    let strategy = "\\PC{1,200}|[a-z. ]{100,200}\\.nii\\.gz|[. ]{1,10}[a-z]{130,140}[. ]{1,10}";
    let mut runner = TestRunner::new(Config::with_cases(24));
    runner
        .run(&strategy, |name| {
            let segment: String =
                percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
                    .collect();
            let url = url::Url::parse(&origin.url(&format!("p/{segment}"))).unwrap();
            origin.route(url.path(), Route::ok(body.clone()));
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let (cache, _clock) = open(dir.path()).await;
                let file = cache.get(url.as_str()).await.unwrap();
                let path = file.path().to_owned();
                drop(file);
                cache.shutdown().await;
                drop(cache);
                let (cache, _clock) = open(dir.path()).await;
                let hit = cache.get_cached(url.as_str());
                assert!(hit.is_some(), "{name:?} ({path:?}) was lost at the restart");
                let hit = hit.unwrap();
                assert_eq!(hit.status(), CacheStatus::Hit);
                assert_eq!(hit.path(), path);
                assert_eq!(std::fs::read(hit.path()).unwrap(), body);
                if name.ends_with(".nii.gz") {
                    assert!(path.to_string_lossy().ends_with(".nii.gz"), "{path:?}");
                }
            });
            Ok(())
        })
        .unwrap();
}
