//! A 1 GiB download with the origin in another process: peak resident memory, wall time and
//! this process's CPU time, for the cache and, side by side, for a plain reqwest stream
//! written to a file without hashing.
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! The origin runs in a child process (this binary again), so the figures are the client's
//! alone. The cache runs first, so the peak RSS (`VmHWM`) read after it is its own. Target:
//! under 64 MiB.

#[path = "../tests/it/support/origin.rs"]
mod origin;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

fn report(what: &str, wall: Duration, cpu: f64) {
    println!(
        "{what}: {:.2} s, {:.0} MiB/s, CPU {:.2} s",
        wall.as_secs_f64(),
        SIZE as f64 / MIB as f64 / wall.as_secs_f64(),
        cpu
    );
}
const SIZE: usize = 1024 * 1024 * 1024;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of this process, from /proc/self/stat (in clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the name: state is field 0, utime field 11, stime field 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var_os("IMGCACHE_BENCH_ORIGIN").is_some() {
        // Child: serve 1 GiB until the parent closes our stdin.
        rt.block_on(async {
            let origin = origin::Origin::start().await;
            origin.route("big.nii.gz", origin::Route::ok(origin::volume(7, SIZE)));
            println!("{}", origin.url("big.nii.gz"));
            tokio::task::spawn_blocking(|| {
                let mut sink = Vec::new();
                let _ = std::io::stdin().read_to_end(&mut sink);
            })
            .await
            .unwrap();
        });
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("IMGCACHE_BENCH_ORIGIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let cache = imgcache::ImageCache::builder()
            .cache_dir(dir.path())
            .max_size_bytes(2 * SIZE as u64)
            .sweep_interval(Duration::ZERO)
            .build()
            .await
            .unwrap();
        let plain = dir.path().join("plain.bin");
        let client = reqwest::Client::new();
        // Alternate the two so that neither always runs on a warmer machine.
        for round in 1..=3 {
            let before = status_kib("VmRSS:");
            let cpu = cpu_seconds();
            let started = Instant::now();
            let file = cache.get(&url).await.unwrap();
            let elapsed = started.elapsed();
            let cpu = cpu_seconds() - cpu;
            assert_eq!(file.size(), SIZE as u64);
            report(&format!("round {round}: imgcache get"), elapsed, cpu);
            if round == 1 {
                // Read before the baseline runs, so the peak is the cache's own.
                let peak = status_kib("VmHWM:");
                println!(
                    "round 1: imgcache get: RSS before {:.1} MiB, peak {:.1} MiB (target < 64 MiB)",
                    before as f64 / 1024.0,
                    peak as f64 / 1024.0,
                );
            }
            drop(file);
            cache.invalidate(&url).await.unwrap();

            let cpu = cpu_seconds();
            let started = Instant::now();
            let mut response = client.get(&url).send().await.unwrap();
            let out = tokio::fs::File::create(&plain).await.unwrap();
            let mut out = tokio::io::BufWriter::with_capacity(MIB as usize, out);
            while let Some(chunk) = response.chunk().await.unwrap() {
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                    .await
                    .unwrap();
            }
            tokio::io::AsyncWriteExt::flush(&mut out).await.unwrap();
            out.get_ref().sync_data().await.unwrap();
            report(
                &format!("round {round}: reqwest to file, no hash"),
                started.elapsed(),
                cpu_seconds() - cpu,
            );
            tokio::fs::remove_file(&plain).await.unwrap();
        }
    });
    drop(child.stdin.take());
    let _ = child.wait();
}
