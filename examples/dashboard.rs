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

    // With IMGCACHE_ADMIN_TOKEN set, the dashboard asks for it (a login form) and every route
    // but the page requires it.
    let mut options = imgcache::server::ServerOptions::new();
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
