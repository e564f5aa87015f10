//! A stress test of the lock-and-commit protocol across processes.
//!
//! Worker processes ask for, hold, re-read, invalidate and clear a few files under a cap that
//! fits only some of them, while the test kills workers with SIGKILL at random moments and
//! starts new ones. No worker may ever be handed wrong bytes, a file a worker holds may never
//! change or vanish, no call may fail, and the directory left behind must be whole: every
//! entry right, the cap kept, no temp file or process record of a dead process left once a
//! live process has tidied, and no download counted twice.
//!
//! `STRESS_SECS` (default 6) sets how long the kills go on; `STRESS_SEED` (default 1) the
//! sequence of kills, delays and operations. The seed is printed so that a failure can be
//! run again with the same choices (timing still varies).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::MB;
use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{as_child, data_files, finish_child, spawn_child, temp_files};
use imgcache::{CachedFile, ImageCache};

const WORKER: &str = "stress::worker";
const FILE_BYTES: usize = 3 * MB;
const CAP_BYTES: u64 = 10 * MB as u64;

/// A small xorshift generator: the test and its workers need reproducible choices only.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn file_sha256(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => sha256_hex(&bytes),
        Err(e) => panic!("{} cannot be read: {e}", path.display()),
    }
}

/// Asserts that a file handed out is, and still is, the right file for its URL.
fn check(file: &CachedFile, want: &str, when: &str) {
    assert_eq!(
        file.sha256(),
        want,
        "{when}: wrong digest for {}",
        file.url()
    );
    let bytes = std::fs::read(file.path()).unwrap_or_else(|e| {
        panic!(
            "{when} ({:?}): {} cannot be read: {e}",
            file.status(),
            file.path().display()
        )
    });
    assert_eq!(
        sha256_hex(&bytes),
        want,
        "{when}: wrong bytes on disk for {} at {}",
        file.url(),
        file.path().display()
    );
}

/// The worker process: until `S_STOP` exists, picks an operation at random (seeded by
/// `S_SEED`) on the URLs of `S_URLS` (`url=sha256` pairs) in the cache at `S_DIR`, and checks
/// every file it is handed when it gets it and again when it lets it go.
#[test]
#[ignore = "run by the stress test as a child process"]
fn worker() {
    as_child(WORKER, async {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let urls: Vec<(String, String)> = var("S_URLS")
            .split_whitespace()
            .map(|pair| {
                let (url, sha) = pair.rsplit_once('=').unwrap();
                (url.to_owned(), sha.to_owned())
            })
            .collect();
        let stop = PathBuf::from(var("S_STOP"));
        let mut rng = Rng::new(var("S_SEED").parse().unwrap());
        let cache = ImageCache::builder()
            .cache_dir(var("S_DIR"))
            .max_size_bytes(CAP_BYTES)
            .sweep_interval(Duration::from_millis(30))
            .state_save_interval(Duration::from_millis(20))
            .network(|n| n.retry_base_delay(Duration::from_millis(1)))
            .build()
            .await
            .unwrap();
        let mut held: VecDeque<(CachedFile, String)> = VecDeque::new();
        let mut ops = 0u64;
        while !stop.exists() {
            ops += 1;
            let (url, sha) = &urls[rng.below(urls.len() as u64) as usize];
            match rng.below(100) {
                0..75 => {
                    let tasks = 1 + rng.below(3);
                    let gets = (0..tasks).map(|_| {
                        let cache = cache.clone();
                        let url = url.clone();
                        tokio::spawn(async move { cache.get(&url).await })
                    });
                    for got in futures_util::future::join_all(gets).await {
                        let file = got.unwrap().unwrap_or_else(|e| panic!("get {url}: {e}"));
                        check(&file, sha, "handed out");
                        held.push_back((file, sha.clone()));
                    }
                    while held.len() > 4 {
                        let (file, sha) = held.pop_front().unwrap();
                        check(&file, &sha, "held, then let go");
                    }
                }
                75..85 => {
                    cache.invalidate(url).await.unwrap();
                }
                85..89 => {
                    cache.clear().await.unwrap();
                }
                89..95 => {
                    cache.cleanup().await.unwrap();
                }
                _ => {
                    for (file, sha) in held.drain(..) {
                        check(&file, &sha, "held, then let go");
                    }
                }
            }
            for (file, sha) in &held {
                // Cheap enough to do for one of them every round.
                if rng.below(4) == 0 {
                    check(file, sha, "held");
                }
            }
        }
        for (file, sha) in held.drain(..) {
            check(&file, &sha, "held to the end");
        }
        println!("\nstress-ops={ops}");
    });
}

fn spawn_worker(dir: &Path, urls: &str, stop: &Path, seed: u64) -> Child {
    spawn_child(
        WORKER,
        &[
            ("S_DIR", dir.display().to_string()),
            ("S_URLS", urls.to_owned()),
            ("S_STOP", stop.display().to_string()),
            ("S_SEED", seed.to_string()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_killed_at_random_never_see_wrong_bytes_nor_leave_a_broken_directory() {
    let env_or = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seed = env_or("STRESS_SEED", 1);
    let secs = env_or("STRESS_SECS", 6);
    eprintln!("stress: STRESS_SEED={seed} STRESS_SECS={secs}");
    let mut rng = Rng::new(seed);

    // Six files of 3 MB under a 10 MB cap, at 30 MB/s (a tenth of a second each): downloads,
    // evictions and kills overlap all the time. Four can be resumed (they have an ETag), two
    // cannot and start again from zero.
    let origin = Origin::start().await;
    let mut want = HashMap::new();
    let mut pairs = Vec::new();
    for i in 0..6u64 {
        let name = format!("s{i}.nii.gz");
        let body = volume(900 + i, FILE_BYTES);
        let mut route = Route::ok(body.clone()).rate(30 * MB as u64);
        if i < 4 {
            route = route.etag(&format!("\"s{i}\""));
        }
        origin.route(&name, route);
        let url = origin.url(&name);
        pairs.push(format!("{url}={}", sha256_hex(&body)));
        want.insert(url, sha256_hex(&body));
    }
    let urls = pairs.join(" ");
    let dir = tempfile::tempdir().unwrap();
    let ctl = tempfile::tempdir().unwrap();
    let stop = ctl.path().join("stop");

    let mut next_seed = seed * 1000;
    let mut spawn = || {
        next_seed += 1;
        spawn_worker(dir.path(), &urls, &stop, next_seed)
    };
    let mut workers: Vec<Child> = (0..5).map(|_| spawn()).collect();
    let mut kills = 0;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(30 + rng.below(300)));
        let victim = rng.below(workers.len() as u64) as usize;
        if let Ok(Some(status)) = workers[victim].try_wait() {
            let out = workers.swap_remove(victim).wait_with_output().unwrap();
            panic!(
                "a worker ended by itself ({status}):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        workers[victim].kill().unwrap();
        workers[victim].wait().unwrap();
        kills += 1;
        workers[victim] = spawn();
    }
    std::fs::write(&stop, b"").unwrap();
    let mut ops = 0u64;
    for child in workers {
        let out = finish_child(WORKER, child);
        ops += out
            .lines()
            .find_map(|l| l.split_once("stress-ops=").map(|(_, n)| n))
            .and_then(|n| n.parse::<u64>().ok())
            .expect("the worker said how much it did");
    }
    let gets = origin.total_hits();
    eprintln!("stress: {kills} kills, {ops} operations by the survivors, {gets} origin requests");
    assert!(
        kills >= secs as usize,
        "the test killed too little: {kills}"
    );

    // What is left: a whole directory.
    let cache = ImageCache::builder()
        .cache_dir(dir.path())
        .max_size_bytes(CAP_BYTES)
        .sweep_interval(Duration::ZERO)
        .state_save_interval(Duration::ZERO)
        .build()
        .await
        .unwrap();
    for entry in cache.admin().entries() {
        assert_eq!(file_sha256(&entry.path), want[&entry.url], "{}", entry.url);
    }
    let report = cache.admin().verify_all().await.unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    let stats = cache.stats();
    assert!(
        stats.total_downloads <= gets as u64,
        "{} downloads counted for {gets} origin requests: some were counted twice",
        stats.total_downloads
    );
    for (url, sha) in &want {
        let file = cache.get(url).await.unwrap();
        check(&file, sha, "after the run");
    }
    cache.cleanup().await.unwrap();
    let on_disk: u64 = data_files(dir.path())
        .iter()
        .map(|p| {
            std::fs::metadata(dir.path().join("v1/entries").join(p))
                .unwrap()
                .len()
        })
        .sum();
    assert!(
        on_disk <= CAP_BYTES,
        "{on_disk} bytes on disk, cap {CAP_BYTES}"
    );
    let temps = temp_files(dir.path());
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    drop(cache);
    let procs: Vec<_> = std::fs::read_dir(dir.path().join("v1/procs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(procs.is_empty(), "process records left: {procs:?}");
}
