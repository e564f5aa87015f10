//! Many processes on one cache directory: one origin download per file across processes, a
//! dead downloader replaced and resumed, pins that hold across processes, the byte cap and
//! the statistics of the whole directory.
//!
//! The other processes are this test binary run again as `processes::worker` (see
//! [`worker`]); the test itself is one more process on the directory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::MB;
use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{as_child, data_files, finish_child, spawn_child, temp_files};
use imgcache::ImageCache;

const WORKER: &str = "processes::worker";

/// The other process. Opens the cache in `W_DIR` (cap `W_MAX_MB`), asks for every URL of
/// `W_URLS` from `W_TASKS` tasks at once, and writes one line per answer to `W_OUT`
/// (`<url> <sha256> <status> <path>`, renamed into place when complete). With `W_RELEASE`
/// it then holds the files until that file exists, and lingers `W_LINGER_MS` after.
#[test]
#[ignore = "run by the tests of this module as a child process"]
fn worker() {
    as_child(WORKER, async {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let dir = PathBuf::from(var("W_DIR"));
        let tasks: usize = var("W_TASKS").parse().unwrap_or(1);
        let max_mb: u64 = var("W_MAX_MB").parse().unwrap_or(1024);
        let cache = ImageCache::builder()
            .cache_dir(&dir)
            .max_size_bytes(max_mb * MB as u64)
            .sweep_interval(Duration::ZERO)
            .state_save_interval(Duration::from_millis(50))
            .network(|n| n.retry_base_delay(Duration::from_millis(1)))
            .build()
            .await
            .unwrap();
        let mut held = Vec::new();
        let mut lines = String::new();
        for url in var("W_URLS").split_whitespace() {
            let gets = (0..tasks).map(|_| {
                let cache = cache.clone();
                let url = url.to_owned();
                tokio::spawn(async move { cache.get(&url).await })
            });
            for got in futures_util::future::join_all(gets).await {
                let file = got.unwrap().unwrap();
                lines += &format!(
                    "{url} {} {:?} {}\n",
                    file.sha256(),
                    file.status(),
                    file.path().display()
                );
                held.push(file);
            }
        }
        let out = PathBuf::from(var("W_OUT"));
        std::fs::write(out.with_extension("new"), lines).unwrap();
        std::fs::rename(out.with_extension("new"), &out).unwrap();
        let release = var("W_RELEASE");
        if !release.is_empty() {
            while !Path::new(&release).exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        drop(held);
        let linger: u64 = var("W_LINGER_MS").parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(linger)).await;
    });
}

/// A worker's settings.
struct Job<'a> {
    dir: &'a Path,
    urls: Vec<String>,
    tasks: usize,
    max_mb: u64,
    release: Option<PathBuf>,
    linger_ms: u64,
}

impl<'a> Job<'a> {
    fn new(dir: &'a Path, urls: &[String]) -> Job<'a> {
        Job {
            dir,
            urls: urls.to_vec(),
            tasks: 1,
            max_mb: 1024,
            release: None,
            linger_ms: 0,
        }
    }

    /// Starts the worker; its answers go to the returned file.
    fn spawn(&self, out: &Path) -> Child {
        let env = [
            ("W_DIR", self.dir.display().to_string()),
            ("W_URLS", self.urls.join(" ")),
            ("W_TASKS", self.tasks.to_string()),
            ("W_MAX_MB", self.max_mb.to_string()),
            ("W_OUT", out.display().to_string()),
            (
                "W_RELEASE",
                self.release
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            ("W_LINGER_MS", self.linger_ms.to_string()),
        ];
        spawn_child(WORKER, &env)
    }
}

/// One answer a worker wrote.
#[derive(Debug)]
struct Answer {
    url: String,
    sha256: String,
    status: String,
    path: PathBuf,
}

fn answers(out: &Path) -> Vec<Answer> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let mut next = || parts.next().unwrap().to_owned();
            Answer {
                url: next(),
                sha256: next(),
                status: next(),
                path: PathBuf::from(next()),
            }
        })
        .collect()
}

/// Waits (bounded, real time) for `path` to exist.
fn wait_for_file(path: &Path) {
    wait_for(&format!("{} never appeared", path.display()), || {
        path.exists()
    });
}

/// Waits (bounded, real time) for `cond`.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes of the committed data files in the cache at `dir`.
fn bytes_on_disk(dir: &Path) -> u64 {
    data_files(dir)
        .iter()
        .map(|p| {
            std::fs::metadata(dir.join("v1/entries").join(p))
                .unwrap()
                .len()
        })
        .sum()
}

async fn open_here(dir: &Path, max_bytes: u64) -> ImageCache {
    ImageCache::builder()
        .cache_dir(dir)
        .max_size_bytes(max_bytes)
        .sweep_interval(Duration::ZERO)
        .state_save_interval(Duration::ZERO)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_of_sixteen_tasks_make_one_origin_get() {
    let origin = Origin::start().await;
    let body = volume(700, 6 * MB);
    // Slow enough (about a second) that every process asks while the download runs.
    origin.route(
        "one.nii.gz",
        Route::ok(body.clone()).etag("\"1\"").rate(6 * MB as u64),
    );
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let mut job = Job::new(dir.path(), &[origin.url("one.nii.gz")]);
    job.tasks = 16;
    let children: Vec<(PathBuf, Child)> = (0..4)
        .map(|i| {
            let out = outs.path().join(format!("{i}.txt"));
            let child = job.spawn(&out);
            (out, child)
        })
        .collect();
    let mut all = Vec::new();
    for (out, child) in children {
        finish_child(WORKER, child);
        all.extend(answers(&out));
    }
    assert_eq!(all.len(), 64);
    assert!(all.iter().all(|a| a.sha256 == sha256_hex(&body)));
    assert_eq!(
        origin.hits("one.nii.gz"),
        1,
        "one origin GET for 4 x 16 callers"
    );
    let paths: HashSet<&PathBuf> = all.iter().map(|a| &a.path).collect();
    assert_eq!(paths.len(), 1, "one file for all");
    assert_eq!(std::fs::read(all[0].path.as_path()).unwrap(), body);
    let downloaded = all.iter().filter(|a| a.status == "Downloaded").count();
    assert_eq!(
        downloaded, 1,
        "one caller downloaded; the others joined or hit"
    );
    assert!(temp_files(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_downloader_is_replaced_at_once_and_resumed_from_its_part_file() {
    let origin = Origin::start().await;
    let len = 40 * MB;
    let body = volume(701, len);
    origin.route(
        "big.nii.gz",
        Route::ok(body.clone()).etag("\"big\"").rate(10 * MB as u64),
    );
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path(), &[origin.url("big.nii.gz")]);
    let mut first = job.spawn(&outs.path().join("first.txt"));
    // Past the first fsync (every 16 MiB): a successor may resume from there.
    wait_for("the first downloader never got far", || {
        temp_files(dir.path()).iter().any(|p| {
            std::fs::metadata(dir.path().join("v1/tmp").join(p))
                .is_ok_and(|m| m.len() > 22 * MB as u64)
        })
    });
    let waiters: Vec<(PathBuf, Child)> = (0..3)
        .map(|i| {
            let out = outs.path().join(format!("{i}.txt"));
            let child = job.spawn(&out);
            (out, child)
        })
        .collect();
    // The waiters are waiting on the lock: give them time to start, then kill the holder.
    std::thread::sleep(Duration::from_millis(300));
    first.kill().unwrap();
    first.wait().unwrap();
    let mut all = Vec::new();
    for (out, child) in waiters {
        finish_child(WORKER, child);
        all.extend(answers(&out));
    }
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|a| a.sha256 == sha256_hex(&body)));
    assert_eq!(std::fs::read(all[0].path.as_path()).unwrap(), body);
    let sent = origin.body_bytes();
    assert!(
        sent < len * 3 / 2,
        "the origin sent {sent} bytes for a file of {len}: the successor did not resume"
    );
    let ranges: Vec<_> = origin
        .seen()
        .into_iter()
        .filter_map(|s| s.header("range").map(str::to_owned))
        .collect();
    assert_eq!(ranges.len(), 1, "one resumed request: {ranges:?}");
    assert_eq!(origin.hits("big.nii.gz"), 2);
    let left = temp_files(dir.path());
    assert!(left.is_empty(), "no temp file is left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_in_one_process_survives_clear_invalidate_and_eviction_from_another() {
    let origin = Origin::start().await;
    let held_body = volume(702, 2 * MB);
    let kept_body = volume(703, 2 * MB);
    origin.route("held.nii.gz", Route::ok(held_body.clone()).etag("\"h\""));
    origin.route("kept.nii.gz", Route::ok(kept_body.clone()).etag("\"k\""));
    for i in 0..4 {
        origin.route(&format!("o{i}.nii.gz"), Route::ok(volume(710 + i, 2 * MB)));
    }
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let release = outs.path().join("release");
    let mut job = Job::new(
        dir.path(),
        &[origin.url("held.nii.gz"), origin.url("kept.nii.gz")],
    );
    job.release = Some(release.clone());
    job.linger_ms = 3000;
    let out = outs.path().join("a.txt");
    let a = job.spawn(&out);
    wait_for_file(&out);
    let held = answers(&out);
    assert!(held[0].url.ends_with("held.nii.gz") && held[1].url.ends_with("kept.nii.gz"));
    let (held_path, kept_path) = (held[0].path.clone(), held[1].path.clone());

    // Process B (this one).
    let b = open_here(dir.path(), 1024 * MB as u64).await;
    assert_eq!(b.stats().entries_count, 2, "B sees A's entries");
    assert!(b.invalidate(origin.url("held.nii.gz")).await.unwrap());
    assert_eq!(
        std::fs::read(&held_path).unwrap(),
        held_body,
        "held through invalidate"
    );
    // A process that starts now recovers the directory: the invalidated entry's bytes have
    // no meta.json, but A holds them.
    drop(open_here(dir.path(), 1024 * MB as u64).await);
    assert_eq!(
        std::fs::read(&held_path).unwrap(),
        held_body,
        "held through another process's recovery"
    );
    let again = b.get(origin.url("held.nii.gz")).await.unwrap();
    assert_ne!(again.path(), held_path, "a new version of its own");
    drop(again);
    assert_eq!(b.clear().await.unwrap(), 2);
    assert_eq!(
        std::fs::read(&held_path).unwrap(),
        held_body,
        "held through clear"
    );
    assert_eq!(
        std::fs::read(&kept_path).unwrap(),
        kept_body,
        "held through clear"
    );
    drop(open_here(dir.path(), 1024 * MB as u64).await);
    assert_eq!(
        std::fs::read(&kept_path).unwrap(),
        kept_body,
        "held through another process's recovery"
    );
    drop(b);
    std::fs::write(&release, b"").unwrap();
    // A lets its files go and, within its save interval, removes what nobody names.
    wait_for("A never removed the versions it let go", || {
        !held_path.exists() && !kept_path.exists()
    });
    finish_child(WORKER, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_in_one_process_skips_a_file_another_holds() {
    let origin = Origin::start().await;
    let held_body = volume(720, 4 * MB);
    origin.route("h.nii.gz", Route::ok(held_body.clone()));
    for i in 0..3 {
        origin.route(&format!("e{i}.nii.gz"), Route::ok(volume(721 + i, 4 * MB)));
    }
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let release = outs.path().join("release");
    let mut job = Job::new(dir.path(), &[origin.url("h.nii.gz")]);
    job.release = Some(release.clone());
    let out = outs.path().join("a.txt");
    let a = job.spawn(&out);
    wait_for_file(&out);
    let held_path = answers(&out)[0].path.clone();

    // B: a 10 MB cap, and three more 4 MB files. The held one is least recently used but is
    // skipped; B's own go instead.
    let b = open_here(dir.path(), 10 * MB as u64).await;
    for i in 0..3 {
        drop(b.get(origin.url(&format!("e{i}.nii.gz"))).await.unwrap());
    }
    assert!(b.stats().evictions >= 1);
    assert_eq!(std::fs::read(&held_path).unwrap(), held_body);
    let current = |b: &ImageCache| b.admin().entries().iter().any(|e| e.path == held_path);
    assert!(current(&b), "the held entry is still current");
    std::fs::write(&release, b"").unwrap();
    finish_child(WORKER, a);
    // Now free: the next eviction takes it.
    b.admin().set_max_size_bytes(5 * MB as u64).unwrap();
    b.cleanup().await.unwrap();
    assert!(!current(&b) && !held_path.exists(), "taken once let go");
    let on_disk = bytes_on_disk(dir.path());
    assert!(on_disk <= 5 * MB as u64, "{on_disk} bytes on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_filling_one_cap_stay_under_it() {
    let origin = Origin::start().await;
    let urls: Vec<String> = (0..8)
        .map(|i| {
            let name = format!("f{i}.nii.gz");
            origin.route(
                &name,
                Route::ok(volume(730 + i, 20 * MB)).rate(80 * MB as u64),
            );
            origin.url(&name)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let children: Vec<(PathBuf, Child)> = [&urls[..4], &urls[4..]]
        .iter()
        .enumerate()
        .map(|(i, urls)| {
            let mut job = Job::new(dir.path(), urls);
            job.max_mb = 50;
            let out = outs.path().join(format!("{i}.txt"));
            (out.clone(), job.spawn(&out))
        })
        .collect();
    for (out, child) in children {
        finish_child(WORKER, child);
        assert_eq!(answers(&out).len(), 4);
    }
    // Each held its four files to the end: over the cap until they let go. Letting go evicts
    // nothing by itself (a caller may be handing the paths on); the next process that sweeps
    // (here, on opening) honours the cap.
    let next = ImageCache::builder()
        .cache_dir(dir.path())
        .max_size_bytes(50 * MB as u64)
        .sweep_interval(Duration::ZERO)
        .build()
        .await
        .unwrap();
    let on_disk = bytes_on_disk(dir.path());
    assert!(
        on_disk <= 50 * MB as u64,
        "{on_disk} bytes on disk, cap 50 MB"
    );
    assert!(on_disk >= 20 * MB as u64, "something stays");
    drop(next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_process_sees_the_counters_of_both_others() {
    let origin = Origin::start().await;
    origin.route("s1.nii.gz", Route::ok(volume(740, MB)));
    origin.route("s2.nii.gz", Route::ok(volume(741, MB)));
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let release = outs.path().join("release");
    let mut running = Vec::new();
    for (i, name) in ["s1.nii.gz", "s2.nii.gz"].iter().enumerate() {
        let mut job = Job::new(dir.path(), &[origin.url(name)]);
        job.tasks = 3;
        job.release = Some(release.clone());
        let out = outs.path().join(format!("{i}.txt"));
        running.push((out.clone(), job.spawn(&out)));
    }
    for (out, _) in &running {
        wait_for_file(out);
    }
    // Both are alive; their records reach the disk within their save interval (50 ms).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = open_here(dir.path(), 1024 * MB as u64).await;
        let s = c.stats();
        if s.total_downloads == 2 && s.hits + s.misses == 6 {
            assert_eq!(s.entries_count, 2);
            break;
        }
        assert!(Instant::now() < deadline, "never saw both: {s:?}");
        drop(c);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&release, b"").unwrap();
    for (_, child) in running {
        finish_child(WORKER, child);
    }
    // Gone, and folded into state.json: still counted.
    let c = open_here(dir.path(), 1024 * MB as u64).await;
    assert_eq!(c.stats().total_downloads, 2);
    assert_eq!(c.stats().hits + c.stats().misses, 6);
}

#[tokio::test]
async fn a_process_killed_before_its_first_record_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_here(dir.path(), MB as u64).await);
    let procs = dir.path().join("v1/procs");
    // One died before it wrote its record (its lock is free); one is starting (it holds it).
    let dead = procs.join("4000000-1-00000000.lock");
    let starting = procs.join("4000001-1-00000000.lock");
    std::fs::write(&dead, b"").unwrap();
    std::fs::write(&starting, b"").unwrap();
    let held = std::fs::File::open(&starting).unwrap();
    held.lock().unwrap();
    let cache = open_here(dir.path(), MB as u64).await;
    assert!(!dead.exists(), "the dead process's lock is removed");
    assert!(starting.exists(), "a live process's lock stays");
    drop(cache);
    drop(held);
}
