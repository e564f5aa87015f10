//! The cache at work, with no network beyond loopback.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts an image server inside the process on 127.0.0.1 that serves synthetic NIfTI-sized
//! volumes (10, 50 and 200 MB) at a remote server's bandwidth (100 MB/s; set `DEMO_MBPS` to
//! change it), then measures the first load and the cached load of each, and 32 concurrent
//! requests for one cold volume.

#[path = "../tests/it/support/origin.rs"]
mod origin;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use imgcache::ImageCache;
use origin::{Origin, Route, volume};

const MB: usize = 1024 * 1024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mbps: u64 = std::env::var("DEMO_MBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let origin = Origin::start().await;
    let sizes = [10, 50, 200];
    for (i, mb) in sizes.iter().enumerate() {
        let body = volume(i as u64, mb * MB);
        origin.route(
            &format!("ct_{mb:03}mb.nii.gz"),
            Route::ok(body).rate(mbps * MB as u64),
        );
    }
    origin.route(
        "ct_concurrent.nii.gz",
        Route::ok(volume(9, 50 * MB)).rate(mbps * MB as u64),
    );
    let dir = tempfile::tempdir()?;
    let cache = ImageCache::builder()
        .cache_dir(dir.path())
        .image_server(origin.base())
        .build()
        .await?;

    println!(
        "image server: {} ({mbps} MB/s), cache: {}",
        origin.base(),
        dir.path().display()
    );
    println!();
    println!(
        "{:<22}{:>8}{:>14}{:>14}{:>12}",
        "file", "size", "first load", "cached load", "speedup"
    );
    for mb in sizes {
        let name = format!("ct_{mb:03}mb.nii.gz");
        let started = Instant::now();
        let file = cache.get(&name).await?;
        let first = started.elapsed();
        drop(file);
        // The median of many hits: one is too short to time alone.
        let mut hits = Vec::with_capacity(101);
        for _ in 0..101 {
            let started = Instant::now();
            let file = cache.get(&name).await?;
            hits.push(started.elapsed());
            drop(file);
        }
        hits.sort();
        let cached = hits[hits.len() / 2];
        println!(
            "{:<22}{:>5} MB{:>14}{:>14}{:>11.0}x",
            name,
            mb,
            format!("{:.3} s", first.as_secs_f64()),
            format_duration(cached),
            first.as_secs_f64() / cached.as_secs_f64()
        );
    }

    let started = Instant::now();
    let results = join_all((0..32).map(|_| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get("ct_concurrent.nii.gz").await })
    }))
    .await;
    let wall = started.elapsed();
    let paths: std::collections::HashSet<_> = results
        .into_iter()
        .map(|r| {
            r.map_err(|e| e.to_string())
                .and_then(|r| r.map(|f| f.path().to_owned()).map_err(|e| e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    println!();
    println!(
        "32 concurrent requests for a cold 50 MB volume: {} origin request, {} file, {:.3} s",
        origin.hits("ct_concurrent.nii.gz"),
        paths.len(),
        wall.as_secs_f64()
    );
    let stats = cache.stats();
    println!(
        "stats: hit_rate {:.1} %, entries {}, {:.0} of {:.0} MB, {} downloads, {} coalesced waits",
        stats.hit_rate * 100.0,
        stats.entries_count,
        stats.current_size_mb,
        stats.max_size_mb,
        stats.total_downloads,
        stats.coalesced_waits
    );
    cache.shutdown().await;
    Ok(())
}

fn format_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}
