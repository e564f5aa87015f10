//! The library's side of `bench/peers.sh`: one measurement per run, printed as seconds.
//!
//! ```text
//! cargo run --release --example peer_harness -- cold URL CACHE_DIR
//! cargo run --release --example peer_harness -- warm URL CACHE_DIR [CALLS]      # seconds per call
//! cargo run --release --example peer_harness -- concurrent URL CACHE_DIR [TASKS]
//! ```

use std::time::{Duration, Instant};

use imgcache::ImageCache;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, url, dir, rest @ ..] = args.as_slice() else {
        return Err("usage: peer_harness cold|warm|concurrent URL CACHE_DIR [N]".into());
    };
    let n: usize = rest.first().map_or(Ok(16), |s| s.parse())?;
    let cache = ImageCache::builder()
        .cache_dir(dir)
        .max_size_bytes(4 << 30)
        .sweep_interval(Duration::ZERO)
        .build()
        .await?;
    let seconds = match mode.as_str() {
        "cold" => {
            let started = Instant::now();
            cache.get(url).await?;
            started.elapsed().as_secs_f64()
        }
        "warm" => {
            cache.get(url).await?;
            let calls = if rest.is_empty() { 10_000 } else { n };
            let started = Instant::now();
            for _ in 0..calls {
                cache.get(url).await?;
            }
            started.elapsed().as_secs_f64() / calls as f64
        }
        "concurrent" => {
            let started = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (cache, url) = (cache.clone(), url.clone());
                    tokio::spawn(async move { cache.get(url).await.map(|f| f.size()) })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            started.elapsed().as_secs_f64()
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    println!("{seconds:.9}");
    cache.shutdown().await;
    Ok(())
}
