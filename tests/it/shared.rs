//! The shared tier against a real S3-compatible server on loopback: moto's server
//! (`moto_server -H 127.0.0.1 -p PORT`, PyPI `moto[s3,server]`), one per test. Its
//! conditional creates and `If-Match` updates are atomic, which the leases rely on.
//!
//! The server is found at `$IMGCACHE_MOTO_SERVER`, else as `moto_server` on the `PATH`. Where
//! neither exists these tests say so and pass, unless `IMGCACHE_REQUIRE_S3=1` (set by
//! `.ci/run`, which installs moto), where they fail.
//!
//! Hosts are cache directories: in this process (with a clock the test moves), or, where a
//! host must run at the same time as the others or be killed, this binary run again as
//! `shared::host`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgcache::{CacheBuilder, CacheStatus, ImageCache, ManualClock};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::MB;
use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{as_child, finish_child, spawn_child};

const HOST: &str = "shared::host";
const KEY_ID: &str = "imgcache-test";
const SECRET: &str = "imgcache-test-secret";
/// The lease time of the hosts: short, and still eight renewals of slack.
const LEASE: Duration = Duration::from_secs(2);

/// A moto server on 127.0.0.1, killed when dropped.
struct Moto {
    child: Child,
    port: u16,
    bucket: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("IMGCACHE_MOTO_SERVER") {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

impl Moto {
    /// Starts a server with one bucket; `None` (the test passes, saying why) when moto is
    /// not installed and not required.
    async fn start() -> Option<Moto> {
        let Some(server) = moto_server() else {
            assert!(
                std::env::var("IMGCACHE_REQUIRE_S3").as_deref() != Ok("1"),
                "IMGCACHE_REQUIRE_S3=1 and no moto_server: pip install 'moto[s3,server]'"
            );
            eprintln!("skipped: no moto_server (pip install 'moto[s3,server]')");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            port,
            bucket: "imaging-fleet".to_owned(),
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let made = client
                .put(format!("{}/{}", moto.endpoint(), moto.bucket))
                .send()
                .await;
            if made.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(moto)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("s3://{}/fleet", self.bucket)
    }

    /// The environment a host process reads the tier from.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CACHE_SHARED_TIER", self.url()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_owned()),
        ]
    }

    /// A host's builder on `dir`: the tier with explicit credentials (never the instance
    /// metadata address), a short lease.
    fn host(&self, dir: &Path) -> CacheBuilder {
        ImageCache::builder()
            .cache_dir(dir)
            .sweep_interval(Duration::ZERO)
            .network(|n| n.retry_base_delay(Duration::from_millis(1)))
            .tier(|t| t.url(self.url()))
            .tier(|t| t.option("aws_endpoint", self.endpoint()))
            .tier(|t| t.option("aws_allow_http", "true"))
            .tier(|t| t.option("aws_region", "us-east-1"))
            .tier(|t| t.option("aws_access_key_id", KEY_ID))
            .tier(|t| t.option("aws_secret_access_key", SECRET))
            .tier(|t| t.lease(LEASE))
    }

    /// The bucket, as the tests reach into it.
    fn store(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(SECRET)
            .build()
            .unwrap()
    }

    /// The leases of the bucket that are not marked released.
    async fn live_leases(&self) -> usize {
        let mut live = 0;
        for name in self.objects().await {
            if name.starts_with("fleet/leases/") {
                let body = self
                    .store()
                    .get(&StorePath::from(name))
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                let lease: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if lease["released"] != serde_json::Value::Bool(true) {
                    live += 1;
                }
            }
        }
        live
    }

    async fn objects(&self) -> Vec<String> {
        use futures_util::StreamExt;
        let mut names: Vec<String> = self
            .store()
            .list(None)
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await;
        names.sort();
        names
    }
}

/// The other host. Opens the cache in `H_DIR` with the tier of the environment, gets
/// `H_URL` once `H_GO` exists, writes `<sha256> <status>` to `H_OUT`, and shuts down (which
/// waits for its upload).
#[test]
#[ignore = "run by the tests of this module as a child process"]
fn host() {
    as_child(HOST, async {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let cache = CacheBuilder::from_env()
            .unwrap()
            .cache_dir(var("H_DIR"))
            .sweep_interval(Duration::ZERO)
            .network(|n| n.retry_base_delay(Duration::from_millis(1)))
            .build()
            .await
            .unwrap();
        let go = PathBuf::from(var("H_GO"));
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let file = cache.get(var("H_URL")).await.unwrap();
        let line = format!("{} {:?}\n", file.sha256(), file.status());
        let out = PathBuf::from(var("H_OUT"));
        std::fs::write(out.with_extension("tmp"), line).unwrap();
        std::fs::rename(out.with_extension("tmp"), out).unwrap();
        drop(file);
        cache.shutdown().await;
    });
}

fn spawn_host(moto: &Moto, dir: &Path, url: &str, go: &Path, out: &Path) -> Child {
    let mut env = moto.env();
    env.extend([
        ("H_DIR", dir.display().to_string()),
        ("H_URL", url.to_owned()),
        ("H_GO", go.display().to_string()),
        ("H_OUT", out.display().to_string()),
        ("CACHE_SHARED_LEASE", "2s".to_owned()),
    ]);
    spawn_child(HOST, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_asking_at_once_make_one_origin_get() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(1, 8 * MB);
    origin.route("ct/1.nii.gz", Route::ok(body.clone()).rate(20 * MB as u64));
    let root = tempfile::tempdir().unwrap();
    let go = root.path().join("go");
    let hosts: Vec<(Child, PathBuf)> = (0..3)
        .map(|i| {
            let out = root.path().join(format!("out-{i}"));
            let dir = root.path().join(format!("host-{i}"));
            (
                spawn_host(&moto, &dir, &origin.url("ct/1.nii.gz"), &go, &out),
                out,
            )
        })
        .collect();
    // All three open their caches, then ask at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&go, b"").unwrap();
    let mut statuses = Vec::new();
    for (child, out) in hosts {
        finish_child(HOST, child);
        let line = std::fs::read_to_string(out).unwrap();
        let (sha, status) = line.trim().split_once(' ').unwrap();
        assert_eq!(sha, sha256_hex(&body));
        statuses.push(status.to_owned());
    }
    statuses.sort();
    assert_eq!(
        origin.hits("ct/1.nii.gz"),
        1,
        "one origin GET for the fleet"
    );
    assert_eq!(statuses, ["Downloaded", "Shared", "Shared"]);
    let objects = moto.objects().await;
    assert!(
        objects.contains(&format!("fleet/blobs/sha256/{}", sha256_hex(&body))),
        "{objects:?}"
    );
    assert_eq!(
        objects
            .iter()
            .filter(|o| o.starts_with("fleet/urls/"))
            .count(),
        1
    );
    assert_eq!(moto.live_leases().await, 0, "the lease was let go of");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_killed_mid_download_is_replaced_after_the_lease_time() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(2, 4 * MB);
    // The first host's download crawls; the one that takes over gets it at once.
    origin.route_seq(
        "ct/2.nii.gz",
        vec![
            Route::ok(body.clone()).rate(256 * 1024),
            Route::ok(body.clone()),
        ],
    );
    let root = tempfile::tempdir().unwrap();
    let go = root.path().join("go");
    std::fs::write(&go, b"").unwrap();
    let url = origin.url("ct/2.nii.gz");
    let mut first = spawn_host(
        &moto,
        &root.path().join("a"),
        &url,
        &go,
        &root.path().join("out-a"),
    );
    origin.wait_for_hits("ct/2.nii.gz", 1).await;
    // The lease is the first host's now.
    assert_eq!(moto.live_leases().await, 1);
    first.kill().unwrap();
    let _ = first.wait();
    let started = Instant::now();
    let second = moto.host(&root.path().join("b")).build().await.unwrap();
    let file = second.get(&url).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert_eq!(
        origin.hits("ct/2.nii.gz"),
        2,
        "the dead holder's GET and this one"
    );
    // Taken over once the lease had gone unrenewed for a lease time, not before.
    assert!(started.elapsed() >= LEASE, "{:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "taken over once the lease lapsed"
    );
    second.tier().flush().await;
    let third = moto.host(&root.path().join("c")).build().await.unwrap();
    let shared = third.get(&url).await.unwrap();
    assert_eq!(shared.status(), CacheStatus::Shared);
    assert_eq!(origin.hits("ct/2.nii.gz"), 2);
    assert_eq!(moto.live_leases().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_tier_stopped_gets_still_succeed_from_the_origin() {
    let Some(mut moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let (a_body, b_body) = (volume(3, MB), volume(4, MB));
    origin.route("a.nii.gz", Route::ok(a_body.clone()));
    origin.route("b.nii.gz", Route::ok(b_body.clone()));
    let root = tempfile::tempdir().unwrap();
    let one = moto.host(&root.path().join("one")).build().await.unwrap();
    drop(one.get(origin.url("a.nii.gz")).await.unwrap());
    one.tier().flush().await;
    assert_eq!(one.stats().shared_uploads, 1);
    // The tier goes away mid-run.
    moto.child.kill().unwrap();
    moto.child.wait().unwrap();
    let two = moto.host(&root.path().join("two")).build().await.unwrap();
    let a = two.get(origin.url("a.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(a.path()).unwrap(), a_body);
    assert_eq!(a.status(), CacheStatus::Downloaded);
    let b = one.get(origin.url("b.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(b.path()).unwrap(), b_body);
    one.tier().flush().await;
    assert_eq!(origin.hits("a.nii.gz"), 2);
    let stats = two.stats();
    assert!(stats.shared_errors >= 1, "{stats:?}");
    assert_eq!(stats.shared_hits, 0);
    assert!(stats.shared_tier_state.unwrap().starts_with("failing"));
    assert!(
        one.stats().shared_errors >= 1,
        "its failed read of the tier is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_altered_in_the_bucket_is_detected_and_not_served() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(5, 2 * MB);
    origin.route("x.nii.gz", Route::ok(body.clone()));
    let root = tempfile::tempdir().unwrap();
    let one = moto.host(&root.path().join("one")).build().await.unwrap();
    drop(one.get(origin.url("x.nii.gz")).await.unwrap());
    one.tier().flush().await;
    // Same length, other bytes: only the hash tells.
    let blob = StorePath::from(format!("fleet/blobs/sha256/{}", sha256_hex(&body)));
    let mut altered = body.clone();
    altered[MB] ^= 0xff;
    moto.store()
        .put(&blob, PutPayload::from(altered))
        .await
        .unwrap();
    let two = moto.host(&root.path().join("two")).build().await.unwrap();
    let file = two.get(origin.url("x.nii.gz")).await.unwrap();
    assert_eq!(
        std::fs::read(file.path()).unwrap(),
        body,
        "the origin's bytes"
    );
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert_eq!(origin.hits("x.nii.gz"), 2);
    let stats = two.stats();
    assert_eq!((stats.integrity_failures, stats.shared_hits), (1, 0));
    assert!(stats.shared_errors >= 1);
    // The host that found it put the right bytes back for the fleet.
    two.tier().flush().await;
    let repaired = moto
        .store()
        .get(&blob)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&repaired), sha256_hex(&body));
    let three = moto.host(&root.path().join("three")).build().await.unwrap();
    assert_eq!(
        three.get(origin.url("x.nii.gz")).await.unwrap().status(),
        CacheStatus::Shared
    );
    assert_eq!(origin.hits("x.nii.gz"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_an_altered_blob_never_ends_cleanly_with_its_bytes() {
    use futures_util::StreamExt;
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(6, 4 * MB);
    origin.route("s.nii.gz", Route::ok(body.clone()));
    let root = tempfile::tempdir().unwrap();
    let one = moto.host(&root.path().join("one")).build().await.unwrap();
    drop(one.get(origin.url("s.nii.gz")).await.unwrap());
    one.tier().flush().await;
    let blob = StorePath::from(format!("fleet/blobs/sha256/{}", sha256_hex(&body)));
    let mut altered = body.clone();
    altered[3 * MB] ^= 0xff;
    moto.store()
        .put(&blob, PutPayload::from(altered.clone()))
        .await
        .unwrap();
    // The stream reads the tier's temp file until the digest fails, then the download
    // falls back to the origin in a new file: what it read cannot go on into that one.
    let two = moto.host(&root.path().join("two")).build().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(two.get_stream(origin.url("s.nii.gz")).await.unwrap());
    }
    for mut stream in streams {
        let mut got = Vec::new();
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => got.extend_from_slice(&chunk),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            assert!(body.starts_with(&got) || altered.starts_with(&got));
        } else {
            assert!(
                got == body,
                "a clean end comes only after the origin's bytes"
            );
        }
    }
    let file = two.get(origin.url("s.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(two.stats().integrity_failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_a_304_revalidation_go_through_the_tier() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(6, MB);
    origin.route("e.nii.gz", Route::ok(body.clone()).etag("\"v1\""));
    let clock = Arc::new(ManualClock::new());
    let root = tempfile::tempdir().unwrap();
    let hour = Duration::from_secs(3600);
    let host = |name: &str| {
        moto.host(&root.path().join(name))
            .default_ttl(hour)
            .clock(Arc::clone(&clock) as Arc<dyn imgcache::Clock>)
            .build()
    };
    let one = host("one").await.unwrap();
    drop(one.get(origin.url("e.nii.gz")).await.unwrap());
    one.tier().flush().await;
    clock.advance(2 * hour);
    // Expired for the fleet: this host revalidates it under the lease, with a 304.
    let renewed = one.get(origin.url("e.nii.gz")).await.unwrap();
    assert_eq!(renewed.status(), CacheStatus::Revalidated);
    one.tier().flush().await;
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some("\"v1\""));
    // Another host follows the renewed record: no request to the origin.
    let two = host("two").await.unwrap();
    let followed = two.get(origin.url("e.nii.gz")).await.unwrap();
    assert_eq!(followed.status(), CacheStatus::Shared);
    assert_eq!(std::fs::read(followed.path()).unwrap(), body);
    assert_eq!(followed.expires_at(), renewed.expires_at());
    assert_eq!(origin.seen().len(), 2);
    assert_eq!(
        (one.stats().shared_uploads, two.stats().shared_hits),
        (2, 1)
    );
    // What the dashboard and `imgcache stats` show of the tier.
    let stats = two.stats();
    assert_eq!(
        stats.shared_tier.as_deref(),
        Some("s3://imaging-fleet/fleet")
    );
    assert_eq!(stats.shared_tier_state.as_deref(), Some("ok"));

    // Both copies expire; one host revalidates for the fleet, and the other, which holds
    // the same bytes, renews its copy from the record instead of reading the blob again.
    let kept = followed.path().to_owned();
    drop((renewed, followed));
    clock.advance(2 * hour);
    let again = one.get(origin.url("e.nii.gz")).await.unwrap();
    assert_eq!(again.status(), CacheStatus::Revalidated);
    one.tier().flush().await;
    let renewed_there = two.get(origin.url("e.nii.gz")).await.unwrap();
    assert_eq!(renewed_there.status(), CacheStatus::Revalidated);
    assert_eq!(renewed_there.expires_at(), again.expires_at());
    assert_eq!(origin.seen().len(), 3, "the one 304 of this round");
    assert_eq!(
        renewed_there.path(),
        kept,
        "the same file, not the blob read again"
    );
    // No pin is left behind by the renewal: the file goes when it is let go of.
    let path = renewed_there.path().to_owned();
    drop(renewed_there);
    assert_eq!(two.stats().pinned_entries, 0);
    assert!(two.invalidate(origin.url("e.nii.gz")).await.unwrap());
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_clear_shared_reach_the_fleet_and_plain_ones_stay_local() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    origin.route("i.nii.gz", Route::ok(volume(7, MB)));
    let root = tempfile::tempdir().unwrap();
    let one = moto.host(&root.path().join("one")).build().await.unwrap();
    let url = origin.url("i.nii.gz");
    drop(one.get(&url).await.unwrap());
    one.tier().flush().await;
    assert!(one.invalidate(&url).await.unwrap());
    let two = moto.host(&root.path().join("two")).build().await.unwrap();
    assert_eq!(
        two.get(&url).await.unwrap().status(),
        CacheStatus::Shared,
        "plain invalidate is local"
    );
    assert!(two.tier().invalidate(&url).await.unwrap());
    let three = moto.host(&root.path().join("three")).build().await.unwrap();
    assert_eq!(
        three.get(&url).await.unwrap().status(),
        CacheStatus::Downloaded
    );
    three.tier().flush().await;
    assert_eq!(origin.hits("i.nii.gz"), 2);
    // What else the bucket holds is not the tier's to remove.
    for other in ["fleet/notes.txt", "archive/ct/1.nii.gz"] {
        moto.store()
            .put(&StorePath::from(other), PutPayload::from_static(b"keep"))
            .await
            .unwrap();
    }
    let (local, objects) = three.tier().clear().await.unwrap();
    assert_eq!(local, 1);
    assert!(
        objects >= 3,
        "the blob, the record and the lease: {objects}"
    );
    assert_eq!(
        moto.objects().await,
        ["archive/ct/1.nii.gz", "fleet/notes.txt"]
    );
    // Offline uses neither the tier nor the origin.
    let offline = moto
        .host(&root.path().join("offline"))
        .offline(true)
        .build()
        .await
        .unwrap();
    assert!(offline.stats().shared_tier.is_none());
    assert!(offline.get(&url).await.is_err());
    assert_eq!(origin.hits("i.nii.gz"), 2);
}

#[tokio::test]
async fn a_bad_tier_setting_is_a_config_error_and_credentials_never_show() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "http://bucket/x",
        "s3://",
        "s3://key:secret@bucket/x",
        "not a url",
    ] {
        let err = ImageCache::builder()
            .cache_dir(dir.path())
            .tier(|t| t.url(bad))
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), imgcache::ErrorKind::Config, "{bad}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    for (lease, wait) in [
        (Duration::ZERO, Duration::from_secs(60)),
        (Duration::from_secs(30), Duration::from_secs(5)),
    ] {
        let err = ImageCache::builder()
            .cache_dir(dir.path())
            .tier(|t| t.url("s3://bucket/x"))
            .tier(|t| t.lease(lease))
            .tier(|t| t.wait(wait))
            .build()
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            imgcache::ErrorKind::Config,
            "{lease:?} {wait:?}"
        );
    }
    let builder = ImageCache::builder()
        .tier(|t| t.url("s3://bucket/x"))
        .tier(|t| t.option("aws_secret_access_key", "hunter2"));
    assert!(!format!("{builder:?}").contains("hunter2"));
    let err = ImageCache::builder()
        .cache_dir(dir.path())
        .tier(|t| t.url("s3://bucket/x"))
        .tier(|t| t.option("aws_no_such_setting", "1"))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), imgcache::ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_slower_than_its_lease_keeps_it_by_its_heartbeat() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(8, 2 * MB);
    // 4 s to download: twice the lease, renewed every quarter of it.
    origin.route("slow.nii.gz", Route::ok(body.clone()).rate(512 * 1024));
    let root = tempfile::tempdir().unwrap();
    let one = moto.host(&root.path().join("one")).build().await.unwrap();
    let two = moto.host(&root.path().join("two")).build().await.unwrap();
    let url = origin.url("slow.nii.gz");
    let first = tokio::spawn({
        let (one, url) = (one.clone(), url.clone());
        async move { one.get(&url).await }
    });
    origin.wait_for_hits("slow.nii.gz", 1).await;
    let second = two.get(&url).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        origin.hits("slow.nii.gz"),
        1,
        "nobody took over a lease still renewed"
    );
    assert_eq!(first.status(), CacheStatus::Downloaded);
    assert_eq!(second.status(), CacheStatus::Shared);
    assert_eq!(std::fs::read(second.path()).unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_a_host_whose_clock_runs_ahead_is_taken_over_after_a_lease_time() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let origin = Origin::start().await;
    let body = volume(9, MB);
    origin.route("f.nii.gz", Route::ok(body.clone()));
    let root = tempfile::tempdir().unwrap();
    let host = moto.host(&root.path().join("one")).build().await.unwrap();
    let url = origin.url("f.nii.gz");
    // Learn the URL's key from a first download, then leave a lease of a dead host whose
    // clock said the year 292 million.
    drop(host.get(&url).await.unwrap());
    host.tier().flush().await;
    let lease = moto
        .objects()
        .await
        .into_iter()
        .find(|o| o.starts_with("fleet/leases/"))
        .unwrap();
    assert!(host.tier().invalidate(&url).await.unwrap());
    moto.store()
        .put(
            &StorePath::from(lease),
            PutPayload::from_static(br#"{"holder":"gone","expires_at":18446744073709551615}"#),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let file = host.get(&url).await.unwrap();
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert!(started.elapsed() >= LEASE, "{:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(origin.hits("f.nii.gz"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_that_never_answers_is_a_failing_tier_not_a_hang() {
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let origin = Origin::start().await;
    let body = volume(10, MB);
    origin.route("q.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::builder()
        .cache_dir(dir.path())
        .sweep_interval(Duration::ZERO)
        .tier(|t| t.url("s3://imaging-fleet/fleet"))
        .tier(|t| t.option("aws_endpoint", format!("http://127.0.0.1:{port}")))
        .tier(|t| t.option("aws_allow_http", "true"))
        .tier(|t| t.option("aws_region", "us-east-1"))
        .tier(|t| t.option("aws_access_key_id", KEY_ID))
        .tier(|t| t.option("aws_secret_access_key", SECRET))
        .tier(|t| t.lease(LEASE))
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let file = tokio::time::timeout(Duration::from_secs(60), cache.get(origin.url("q.nii.gz")))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let stats = cache.stats();
    assert!(stats.shared_errors >= 1);
    assert!(stats.shared_tier_state.unwrap().starts_with("failing"));
    held.abort();
}
