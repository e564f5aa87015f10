//! Many processes on one cold URL: 4 processes of 16 tasks each against one process of 16
//! tasks, on a 200 MB file, with the origin in a process of its own.
//!
//! ```text
//! cargo bench --bench processes
//! ```
//!
//! Every worker process opens the cache first and waits for a start signal, so the figures
//! leave out process start-up: the time is from the signal to the last task's answer in any
//! process. After a round to warm up, the two cases alternate in seven rounds, each on a new
//! directory and a new URL; the medians are compared.
//! Target: 4 x 16 within 1.2x of 1 x 16, with one origin GET per round.

#[path = "../tests/it/support/origin.rs"]
mod origin;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SIZE: usize = 200 * 1000 * 1000;
const ROUNDS: usize = 7;
const TASKS: usize = 16;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Child: serves one 200 MB body under `ROUNDS * 2` names until stdin closes, then prints
/// how many requests each name had.
fn serve() {
    runtime().block_on(async {
        let origin = origin::Origin::start().await;
        let body = origin::volume(11, SIZE);
        let names: Vec<String> = (0..=ROUNDS * 2).map(|i| format!("r{i}.nii.gz")).collect();
        for name in &names {
            origin.route(name, origin::Route::ok(body.clone()).etag("\"r\""));
        }
        println!("{}", origin.base());
        tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await
        .unwrap();
        let hits: Vec<String> = names.iter().map(|n| origin.hits(n).to_string()).collect();
        println!("{}", hits.join(" "));
    });
}

/// Child: opens the cache, says so, waits for a line on stdin, asks for the URL from
/// `TASKS` tasks at once, and prints the instant the last answer came and the statuses.
fn work(dir: &str, url: &str) {
    runtime().block_on(async {
        let cache = imgcache::ImageCache::builder()
            .cache_dir(dir)
            .max_size_bytes(4 * SIZE as u64)
            .sweep_interval(Duration::ZERO)
            .build()
            .await
            .unwrap();
        println!("ready");
        std::io::stdout().flush().unwrap();
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
        })
        .await
        .unwrap();
        let gets = (0..TASKS).map(|_| {
            let cache = cache.clone();
            let url = url.to_owned();
            tokio::spawn(async move { cache.get(&url).await.map(|f| f.status()) })
        });
        let statuses: Vec<_> = futures_util::future::join_all(gets)
            .await
            .into_iter()
            .map(|s| format!("{:?}", s.unwrap().unwrap()))
            .collect();
        println!("done {} {}", now_ns(), statuses.join(","));
    });
}

struct Worker {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

fn spawn_worker(dir: &Path, url: &str) -> Worker {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("IMGCACHE_BENCH_WORKER", dir)
        .env("IMGCACHE_BENCH_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    Worker { child, out }
}

fn line(out: &mut impl BufRead) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

/// Runs `processes` workers on a new directory; returns the seconds from the start signal to
/// the last answer, and how many callers downloaded.
fn round(processes: usize, url: &str) -> (f64, usize) {
    // The last round's writeback is done before this one starts.
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let mut workers: Vec<Worker> = (0..processes)
        .map(|_| spawn_worker(dir.path(), url))
        .collect();
    for w in &mut workers {
        assert_eq!(line(&mut w.out), "ready");
    }
    let start = now_ns();
    for w in &mut workers {
        writeln!(w.child.stdin.as_mut().unwrap()).unwrap();
    }
    let mut last = start;
    let mut downloaded = 0;
    let mut ends = Vec::new();
    for mut w in workers {
        let done = line(&mut w.out);
        let mut parts = done.split(' ').skip(1);
        let end: u128 = parts.next().unwrap().parse().unwrap();
        ends.push((end - start) as f64 / 1e9);
        last = last.max(end);
        downloaded += parts.next().unwrap().matches("Downloaded").count();
        assert!(w.child.wait().unwrap().success());
    }
    if std::env::var_os("IMGCACHE_BENCH_VERBOSE").is_some() {
        println!("  each process done at {ends:.3?} s");
    }
    ((last - start) as f64 / 1e9, downloaded)
}

fn main() {
    if std::env::var_os("IMGCACHE_BENCH_ORIGIN").is_some() {
        return serve();
    }
    if let (Ok(dir), Ok(url)) = (
        std::env::var("IMGCACHE_BENCH_WORKER"),
        std::env::var("IMGCACHE_BENCH_URL"),
    ) {
        return work(&dir, &url);
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut origin = Command::new(std::env::current_exe().unwrap())
        .env("IMGCACHE_BENCH_ORIGIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut origin_out = BufReader::new(origin.stdout.take().unwrap());
    let base = line(&mut origin_out);
    round(4, &format!("{base}r{}.nii.gz", 2 * ROUNDS));
    let mut one = Vec::new();
    let mut four = Vec::new();
    for r in 0..ROUNDS {
        let (secs, downloaded) = round(1, &format!("{base}r{}.nii.gz", 2 * r));
        println!(
            "round {}: 1 process x {TASKS} tasks: {secs:.3} s, {downloaded} downloaded",
            r + 1
        );
        one.push(secs);
        let (secs, downloaded) = round(4, &format!("{base}r{}.nii.gz", 2 * r + 1));
        println!(
            "round {}: 4 processes x {TASKS} tasks: {secs:.3} s, {downloaded} downloaded",
            r + 1
        );
        four.push(secs);
    }
    drop(origin.stdin.take());
    let hits = line(&mut origin_out);
    let _ = origin.wait();
    println!("origin requests per URL (1 and 4 alternating, then the warm-up): {hits}");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0])
    };
    let ((one, one_min), (four, four_min)) = (median(&mut one), median(&mut four));
    println!(
        "median: 1 x {TASKS}: {one:.3} s ({:.0} MB/s); 4 x {TASKS}: {four:.3} s; ratio {:.2}x (target within 1.2x)",
        SIZE as f64 / 1e6 / one,
        four / one
    );
    println!(
        "fastest: 1 x {TASKS}: {one_min:.3} s; 4 x {TASKS}: {four_min:.3} s; ratio {:.2}x",
        four_min / one_min
    );
}
