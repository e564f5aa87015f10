//! The cache's dashboard, API, metrics and sidecar mounted in an existing axum application.
//!
//! ```text
//! cargo run --example dashboard            # then open the printed URL
//! cargo run --example dashboard -- 8788    # on a chosen port
//! ```
//!
//! A stand-in image server starts inside the process (loopback only) with three volumes; the
//! application serves a page of its own at `/` and the cache under `/cache`, nested as the
//! rustdoc of `imgcache::server` shows: the dashboard at `/cache` (and `/cache/`), the API at
//! `/cache/api/...`, metrics at `/cache/metrics` and the sidecar at `/cache/files/PATH`. It
//! runs until stdin closes or Ctrl-C.
//!
//! The image server also has `pet_0100.nii.gz` (16 MiB at 4 MiB/s: fetch
//! `/cache/files/pet_0100.nii.gz` to watch a download in progress). For the browser test:
//! `IMGCACHE_EXAMPLE_ENTRIES=200` also caches that many small files (`small/s_0000.nii.gz`,
//! ...), for the entry table's search, sort and paging; `IMGCACHE_EXAMPLE_HISTORY_MS=1000`
//! samples the plots' history every second instead of every 10 s.

#[path = "../tests/it/support/origin.rs"]
mod origin;

use std::time::Duration;

use axum::Router;
use axum::response::{Html, Redirect};
use axum::routing::get;
use imgcache::ImageCache;
use origin::{Origin, Route, volume};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::args().nth(1).map_or(Ok(0), |p| p.parse())?;
    let images = Origin::start().await;
    for (i, (name, mb)) in [
        ("ct_0042.nii.gz", 12),
        ("ct_0043.nii.gz", 30),
        ("mr_0007.nii.gz", 6),
    ]
    .into_iter()
    .enumerate()
    {
        let route = Route::ok(volume(i as u64, mb << 20)).etag(&format!("\"v{i}\""));
        images.route(&format!("studies/{name}"), route.rate(200 << 20));
    }
    let slow = Route::ok(volume(9, 16 << 20)).etag("\"v9\"");
    images.route("studies/pet_0100.nii.gz", slow.rate(4 << 20));
    let small = env_number("IMGCACHE_EXAMPLE_ENTRIES")?.unwrap_or(0);
    for i in 0..small {
        // Sizes from 1 KiB to 64 KiB, in no order.
        let route = Route::ok(volume(100 + i, 1024 + (i * 7919 % 64) as usize * 1024));
        images.route(&format!("studies/small/s_{i:04}.nii.gz"), route);
    }
    let dir = tempfile::tempdir()?;
    let cache = ImageCache::builder()
        .cache_dir(dir.path())
        .image_server(images.url("studies"))
        .max_size_bytes(100 << 20)
        .sweep_interval(Duration::from_secs(5))
        .build()
        .await?;
    for name in ["ct_0042.nii.gz", "ct_0043.nii.gz", "mr_0007.nii.gz"] {
        cache.get(name).await?;
    }
    cache.get("ct_0042.nii.gz").await?; // a hit, so the figures are not all zero
    let names: Vec<String> = (0..small)
        .map(|i| format!("small/s_{i:04}.nii.gz"))
        .collect();
    for batch in names.chunks(16) {
        for got in futures_util::future::join_all(batch.iter().map(|n| cache.get(n))).await {
            got?;
        }
    }
    // Every seventh small file has a hit, the 21st of them twice.
    for (i, name) in names.iter().enumerate().step_by(7) {
        for _ in 0..1 + usize::from(i % 21 == 0) {
            cache.get(name).await?;
        }
    }

    // With IMGCACHE_ADMIN_TOKEN set, the dashboard asks for it (a login form) and every route
    // but the page requires it.
    let mut options = imgcache::server::ServerOptions::new();
    if let Some(ms) = env_number("IMGCACHE_EXAMPLE_HISTORY_MS")? {
        options = options.history_interval(Duration::from_millis(ms));
    }
    if let Ok(token) = std::env::var("IMGCACHE_ADMIN_TOKEN") {
        options = options.admin_token(token);
    }

    // The application: its own routes, and the cache mounted under /cache.
    let app = Router::new()
        .route(
            "/",
            get(|| async { Html("<h1>Viewer</h1><p><a href=\"/cache\">Cache</a></p>") }),
        )
        // `nest("/cache", ...)` serves the page at /cache alone; /cache/ leads there too.
        .route("/cache/", get(|| async { Redirect::permanent("/cache") }))
        .nest(
            "/cache",
            imgcache::server::router_with(cache.clone(), options),
        );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("dashboard: http://{}/cache", listener.local_addr()?);
    let stop = async {
        let mut sink = Vec::new();
        let mut stdin = tokio::io::stdin();
        tokio::select! {
            _ = stdin.read_to_end(&mut sink) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(imgcache::server::nodelay(listener), app)
        .with_graceful_shutdown(stop)
        .await?;
    cache.shutdown().await;
    Ok(())
}

/// A whole number from the environment, if the variable is set.
fn env_number(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Ok(v) => v.parse().map(Some).map_err(|e| format!("{name}={v}: {e}")),
        Err(_) => Ok(None),
    }
}
