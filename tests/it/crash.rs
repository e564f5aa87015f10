//! Crash safety: a child process is killed with SIGKILL mid-download, or aborted at each step
//! of the commit (failpoints, built with `IMGCACHE_FAILPOINTS=1`); the cache reopened on the same
//! directory serves no partial file, removes the orphans, and downloads again.
//!
//! The child is this test binary itself, run as `--exact crash::crash_child --ignored`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::origin::{Origin, Route, sha256_hex, volume};
#[cfg(imgcache_failpoints)]
use crate::support::{data_files, files};
use crate::support::{open, temp_files};
use imgcache::CacheStatus;

use crate::MB;

/// The child: opens the cache in `IMGCACHE_CRASH_DIR` and gets (or refreshes) the URL.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn crash_child() {
    let (Ok(dir), Ok(url)) = (
        std::env::var("IMGCACHE_CRASH_DIR"),
        std::env::var("IMGCACHE_CRASH_URL"),
    ) else {
        return;
    };
    let refresh = std::env::var("IMGCACHE_CRASH_REFRESH").is_ok();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let cache = imgcache::ImageCache::builder()
            .cache_dir(&dir)
            .sweep_interval(Duration::ZERO)
            .build()
            .await
            .unwrap();
        let file = if refresh {
            cache.refresh(&url).await
        } else {
            cache.get(&url).await
        };
        println!("child got {:?}", file.map(|f| f.path().to_owned()));
    });
}

fn spawn_child(dir: &Path, url: &str, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash::crash_child", "--ignored", "--nocapture"])
        .env("IMGCACHE_CRASH_DIR", dir)
        .env("IMGCACHE_CRASH_URL", url)
        .env_remove("IMGCACHE_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn the child")
}

/// Waits (bounded) for the child to end and returns whether it ended by a signal.
fn wait_child(mut child: Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().is_none();
        }
        assert!(Instant::now() < deadline, "the child did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_leaves_nothing_to_serve() {
    let origin = Origin::start().await;
    let body = volume(1, 8 * MB);
    // Slow enough that the download is surely in progress when the child is killed.
    origin.route(
        "k.nii.gz",
        Route::ok(body.clone()).etag("\"k\"").rate(4 * MB as u64),
    );
    let dir = tempfile::tempdir().unwrap();
    let url = origin.url("k.nii.gz");
    let mut child = spawn_child(dir.path(), &url, &[]);

    // Wait until part of the body is on disk, then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partial = temp_files(dir.path()).iter().any(|p| {
            p.extension().is_some_and(|e| e == "part")
                && std::fs::metadata(dir.path().join("v1/tmp").join(p)).is_ok_and(|m| m.len() > 0)
        });
        if partial {
            break;
        }
        assert!(Instant::now() < deadline, "the child never started writing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    assert!(wait_child(child), "killed by a signal");
    assert!(
        !temp_files(dir.path()).is_empty(),
        "the crash left a partial file"
    );

    let (cache, _clock) = open(dir.path()).await;
    assert_eq!(cache.stats().entries_count, 0);
    assert!(
        temp_files(dir.path()).is_empty(),
        "recovery removed the partial file"
    );
    assert!(cache.get_cached(&url).is_none());
    origin.route("k.nii.gz", Route::ok(body.clone()).etag("\"k\""));
    let file = cache.get(&url).await.unwrap();
    assert_eq!(file.status(), CacheStatus::Downloaded);
    assert_eq!(file.sha256(), sha256_hex(&body));
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
}

#[cfg(imgcache_failpoints)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_each_step_of_the_commit_is_recovered() {
    let origin = Origin::start().await;
    let body = volume(2, 3 * MB);
    origin.route("c.nii.gz", Route::ok(body.clone()));
    let url = origin.url("c.nii.gz");
    // (failpoint, whether the entry survives the crash)
    let steps = [
        ("commit-before-meta", false),
        ("commit-after-data", false),
        ("commit-after-meta", true),
    ];
    for (step, survives) in steps {
        let dir = tempfile::tempdir().unwrap();
        let hits_before = origin.hits("c.nii.gz");
        let child = spawn_child(dir.path(), &url, &[("IMGCACHE_FAILPOINT", step)]);
        assert!(wait_child(child), "{step}: the child aborted");
        assert_eq!(origin.hits("c.nii.gz"), hits_before + 1);
        let leftovers = files(dir.path());
        assert!(!leftovers.is_empty(), "{step}: the crash left files");

        let (cache, _clock) = open(dir.path()).await;
        assert!(
            temp_files(dir.path()).is_empty(),
            "{step}: temp files removed"
        );
        let entries = cache.stats().entries_count;
        assert_eq!(entries, u64::from(survives), "{step}");
        assert_eq!(
            data_files(dir.path()).len(),
            usize::from(survives),
            "{step}: orphans removed"
        );
        let file = cache.get(&url).await.unwrap();
        let expected = if survives {
            CacheStatus::Hit
        } else {
            CacheStatus::Downloaded
        };
        assert_eq!(file.status(), expected, "{step}");
        assert_eq!(std::fs::read(file.path()).unwrap(), body, "{step}");
    }
}

#[cfg(imgcache_failpoints)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_replacing_an_entry_never_pairs_old_meta_with_new_bytes() {
    let origin = Origin::start().await;
    let old = volume(3, 2 * MB);
    let new = volume(4, 2 * MB);
    origin.route("r.nii.gz", Route::ok(old.clone()));
    let url = origin.url("r.nii.gz");
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _clock) = open(dir.path()).await;
        drop(cache.get(&url).await.unwrap());
        cache.shutdown().await;
    }
    origin.route("r.nii.gz", Route::ok(new.clone()));
    let child = spawn_child(
        dir.path(),
        &url,
        &[
            ("IMGCACHE_FAILPOINT", "commit-after-data"),
            ("IMGCACHE_CRASH_REFRESH", "1"),
        ],
    );
    assert!(wait_child(child));
    let (cache, _clock) = open(dir.path()).await;
    // The new bytes were in their own version's directory, not yet named by meta.json: the
    // old version is intact and served, the new one's leftovers are gone.
    let kept = cache.get_cached(&url).expect("the old version survives");
    assert_eq!(kept.sha256(), sha256_hex(&old));
    assert_eq!(std::fs::read(kept.path()).unwrap(), old);
    assert_eq!(data_files(dir.path()).len(), 1);
    drop(kept);
    let file = cache.refresh(&url).await.unwrap();
    assert_eq!(file.sha256(), sha256_hex(&new));
    assert_eq!(std::fs::read(file.path()).unwrap(), new);
}
