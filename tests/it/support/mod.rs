//! Shared test fixtures: the scriptable origin and helpers to inspect a cache directory.
#![allow(dead_code)]

pub mod origin;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imgcache::{CacheBuilder, ImageCache, ManualClock};

/// A builder on `dir` with a manual clock, no background task (tests sweep explicitly, and
/// state is saved at shutdown and drop) and retry delays of a millisecond.
pub fn builder(dir: &Path, clock: &Arc<ManualClock>) -> CacheBuilder {
    ImageCache::builder()
        .cache_dir(dir)
        .sweep_interval(Duration::ZERO)
        .state_save_interval(Duration::ZERO)
        .network(|n| n.retry_base_delay(Duration::from_millis(1)))
        .network(|n| n.retry_max_delay(Duration::from_millis(5)))
        .clock(Arc::clone(clock) as Arc<dyn imgcache::Clock>)
}

/// [`builder`] with retries off: for tests of what a single failed attempt does.
pub async fn open_without_retries(dir: &Path) -> (ImageCache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir, &clock)
        .network(|n| n.retries(0))
        .build()
        .await
        .expect("build");
    (cache, clock)
}

pub async fn open(dir: &Path) -> (ImageCache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir, &clock).build().await.expect("build");
    (cache, clock)
}

/// Every file below `dir`, relative, sorted.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(items) = std::fs::read_dir(&d) else {
            continue;
        };
        for item in items.flatten() {
            let p = item.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_owned());
            }
        }
    }
    out.sort();
    out
}

/// Files in the temp directory (downloads in progress, trash).
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("v1/tmp"))
}

/// Data files of committed entries (excluding meta.json).
pub fn data_files(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("v1/entries"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "meta.json"))
        .collect()
}

/// The directory of the entry whose data file is `data`: its version's directory's parent
/// (entries keep each version in a directory of its own, named `g` and 16 hex digits).
pub fn entry_dir_of(data: &Path) -> PathBuf {
    let dir = data.parent().unwrap();
    let name = dir.file_name().unwrap().to_string_lossy();
    if name.len() == 17 && name.starts_with('g') {
        dir.parent().unwrap().to_owned()
    } else {
        dir.to_owned()
    }
}

/// The meta.json of the entry whose data file is `data`.
pub fn meta_of(data: &Path) -> PathBuf {
    entry_dir_of(data).join("meta.json")
}

pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Routes `<name>.nii.gz` for each of `names`: distinct volumes of `size` bytes, the i-th
/// made from seed `seed + i`.
pub fn route_volumes(origin: &origin::Origin, names: &[&str], seed: u64, size: usize) {
    for (i, name) in names.iter().enumerate() {
        origin.route(
            &format!("{name}.nii.gz"),
            origin::Route::ok(origin::volume(seed + i as u64, size)),
        );
    }
}

/// [`open`] with a size cap of `max_bytes`.
pub async fn open_capped(dir: &Path, max_bytes: u64) -> (ImageCache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir, &clock)
        .max_size_bytes(max_bytes)
        .build()
        .await
        .expect("build");
    (cache, clock)
}

/// Removal of a released file runs on the blocking pool; wait for it (bounded).
pub async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition not reached");
}

/// Runs the test `name` (its full path, such as `leaks::leak_check`) of this binary in a child
/// process of its own with `env` set, and asserts that it ran and passed. Such a test is
/// `#[ignore]`d and its body is [`as_child`], so that it does its work only as a child.
pub fn run_child(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    let out = child_command(name, env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("run the child");
    check_child(name, &out);
    out
}

/// Starts the test `name` as a child as [`run_child`] does, without waiting for it; see
/// [`finish_child`].
pub fn spawn_child(name: &str, env: &[(&str, String)]) -> std::process::Child {
    child_command(name, env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child")
}

/// Waits for a child [`spawn_child`] started and asserts that it did its work.
pub fn finish_child(name: &str, child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("wait for the child");
    check_child(name, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// This binary, set to run the test `name` alone as a child with `env`.
fn child_command<'a>(
    name: &str,
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("IMGCACHE_TEST_CHILD", name)
    .env_remove("IMGCACHE_FAILPOINT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Asserts that a child ran and passed (it printed its done marker).
fn check_child(name: &str, out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("{CHILD_DONE} {name}\n")),
        "the child {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a child prints when its work is done: a child that returned early (not started by
/// [`run_child`], or under another name) never prints it, so its parent fails.
const CHILD_DONE: &str = "imgcache-test-child-done:";

/// The body of a test meant to run only as the child that [`run_child`] starts for `name`:
/// runs `body` on a two-worker runtime and says it was done. In any other process (a plain
/// `cargo test -- --ignored`) it does nothing, and prints no marker.
pub fn as_child(name: &str, body: impl std::future::Future<Output = ()>) {
    if !std::env::var("IMGCACHE_TEST_CHILD").is_ok_and(|v| v == name) {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
    println!("{CHILD_DONE} {name}");
}
