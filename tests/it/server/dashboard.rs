//! The dashboard's endpoints against a real HTTP client: the page mounted under a prefix and
//! every request it makes, the history its plots draw, the downloads in progress, and the
//! entry table's search, sort and paging.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use imgcache::ManualClock;
use imgcache::server::ServerOptions;
use reqwest::StatusCode;
use serde_json::{Value, json as j};

use super::{json, serve, setup};
use crate::MB;
use crate::support::origin::{Origin, Route, volume};
use crate::support::{builder, route_volumes};

fn ms(clock: &ManualClock) -> u64 {
    use imgcache::Clock;
    clock.now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Serves `app` on 127.0.0.1; returns its base URL (no trailing slash) and the task.
async fn serve_app(app: axum::Router) -> (String, super::Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let base = format!("http://{addr}");
    (base.clone(), super::Server { base, task })
}

/// The requests the page's script makes, as `(method, path)`: every `api("METHOD", "PATH"`
/// and `here("PATH")` in it, the path up to its query.
fn requests_of(page: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (open, method) in [("api(\"", None), ("here(\"", Some("GET"))] {
        for (at, _) in page.match_indices(open) {
            let rest = &page[at + open.len()..];
            let (method, rest) = match method {
                Some(m) => (m.to_owned(), rest),
                None => {
                    let (m, rest) = rest.split_once('"').unwrap();
                    (m.to_owned(), rest.trim_start_matches([',', ' ', '"']))
                }
            };
            let path = rest.split(['"', '?']).next().unwrap().to_owned();
            if path.starts_with("api/") && !found.contains(&(method.clone(), path.clone())) {
                found.push((method, path));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_under_cache_the_page_and_every_request_it_makes_answer() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/n"], 3, 1000);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    drop(cache.get("n.nii.gz").await.unwrap());
    // As the rustdoc of imgcache::server shows it.
    let app = axum::Router::new().nest("/cache", imgcache::server::router(cache.clone()));
    let (base, _server) = serve_app(app).await;
    let http = reqwest::Client::new();

    let page = http.get(format!("{base}/cache")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'sha256-")
    );
    let page = page.text().await.unwrap();
    let requests = requests_of(&page);
    for wanted in [
        "api/stats",
        "api/entries",
        "api/counters",
        "api/events",
        "api/history",
        "api/downloads",
    ] {
        assert!(
            requests.iter().any(|(_, p)| p == wanted),
            "the page no longer requests {wanted}: {requests:?}"
        );
    }
    // The page resolves them against its mount point with a trailing slash, /cache/, never
    // against / (where nothing answers).
    assert!(
        page.contains("location.pathname.replace(/\\/*$/, \"/\")"),
        "the page's base is its path with a trailing slash"
    );
    assert_eq!(
        http.get(format!("{base}/api/stats"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    for (method, path) in &requests {
        let url = format!("{base}/cache/{path}");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = http.request(m, &url);
        if method != "GET" {
            request = request.json(&serde_json::json!({}));
        }
        let answer = request.send().await.unwrap();
        let status = answer.status();
        if method == "GET" {
            assert_eq!(status, StatusCode::OK, "{method} {url}");
            if path == "api/events" {
                assert_eq!(answer.headers()["content-type"], "text/event-stream");
                continue;
            }
        }
        // Routed: an answer of the router's own (JSON, or no content), not axum's empty 404
        // or 405 for a path or method nothing serves.
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {url}");
        let body = answer.bytes().await.unwrap();
        assert!(
            status != StatusCode::NOT_FOUND || !body.is_empty(),
            "{method} {url}: nothing serves it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_samples_the_counters_by_the_caches_clock_and_keeps_them() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/h"], 4, 2000);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .image_server(origin.url("data"))
        .build()
        .await
        .unwrap();
    let t0 = ms(&clock);
    let options = ServerOptions::new().history_interval(Duration::from_millis(20));
    let server = serve(cache.clone(), options).await;
    let http = reqwest::Client::new();
    let history = || json::<Value>(http.get(format!("{}/api/history", server.base)));

    let first = history().await;
    assert_eq!(
        (first["interval_ms"].clone(), first["capacity"].clone()),
        (j!(20), j!(360))
    );
    let zero = j!({"t_ms": t0, "hits": 0, "misses": 0, "bytes_served_from_cache": 0, "bytes_downloaded": 0});
    assert_eq!(
        first["samples"][0], zero,
        "the sample taken when the router was built"
    );

    drop(cache.get("h.nii.gz").await.unwrap());
    drop(cache.get("h.nii.gz").await.unwrap());
    clock.advance(Duration::from_secs(10));
    let later = j!({"t_ms": t0 + 10_000, "hits": 1, "misses": 1,
        "bytes_served_from_cache": 2000, "bytes_downloaded": 2000});
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer = history().await;
        let samples = answer["samples"].as_array().unwrap();
        if samples.last() == Some(&later) {
            break answer;
        }
        assert!(Instant::now() < deadline, "no later sample: {answer}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        answer["samples"][0], zero,
        "the first stays: a reloaded page draws it too"
    );
    assert_eq!(answer["current"], later, "the counters now");
    let samples = answer["samples"].as_array().unwrap();
    assert!(samples.len() <= 360);
    assert!(
        samples
            .windows(2)
            .all(|w| w[0]["t_ms"].as_u64() <= w[1]["t_ms"].as_u64()),
        "oldest first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_in_progress_is_listed_with_its_speed_and_time_left() {
    let origin = Origin::start().await;
    // Progress is reported a mebibyte after the last report: held just short of 3 MiB, the
    // download reports twice, the second time at 2 MiB or more, and then no more.
    let (route, gate) = Route::ok(volume(6, 4 * MB)).pause_at(3 * MB - 1);
    origin.route("data/slow.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .image_server(origin.url("data"))
        .build()
        .await
        .unwrap();
    let t0 = ms(&clock);
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let downloads = || json::<Vec<Value>>(http.get(format!("{}/api/downloads", server.base)));
    assert!(downloads().await.is_empty());

    let getter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get("slow.nii.gz").await.map(drop) }
    });
    // Wait for that second report.
    let deadline = Instant::now() + Duration::from_secs(20);
    let received = loop {
        let list = downloads().await;
        if let Some(r) = list.first().and_then(|d| d["received"].as_u64())
            && r >= 2 * MB as u64
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no progress listed: {list:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let total = 4 * MB as u64;
    let list = downloads().await;
    assert_eq!(list.len(), 1, "{list:?}");
    let url = origin.url("data/slow.nii.gz");
    assert_eq!(
        list[0],
        j!({"url": url, "received": received, "total": total, "started_at_ms": t0,
            "elapsed_ms": 0, "bytes_per_sec": null, "eta_ms": null}),
        "no time has passed on the cache's clock: no speed yet"
    );

    clock.advance(Duration::from_secs(2));
    let list = downloads().await;
    let speed = received as f64 / 2.0;
    assert_eq!(list[0]["elapsed_ms"], 2000);
    assert_eq!(list[0]["bytes_per_sec"].as_f64(), Some(speed));
    let eta = ((total - received) as f64 / speed * 1000.0) as u64;
    assert_eq!(list[0]["eta_ms"].as_u64(), Some(eta));

    // Nothing more for longer than the speed's window: stalled, no time left to show.
    clock.advance(Duration::from_secs(8));
    let list = downloads().await;
    assert_eq!(list[0]["bytes_per_sec"].as_f64(), Some(0.0));
    assert_eq!(list[0]["eta_ms"], Value::Null);

    gate.add_permits(1);
    getter.await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !downloads().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the finished download is still listed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entries_are_searched_sorted_and_paged() {
    // Each download costs the cache a scan of its directory, so this is a few hundred; the
    // selection itself is timed at 10,000 entries in server::entries's own tests.
    const ENTRIES: usize = 200;
    let origin = Origin::start().await;
    let size_of = |i: usize| 16 + (i * 7919) % 1000;
    for i in 0..ENTRIES {
        let route = Route::ok(volume(i as u64, size_of(i)));
        origin.route(&format!("data/s/{i:05}.nii.gz"), route);
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let names: Vec<String> = (0..ENTRIES).map(|i| format!("s/{i:05}.nii.gz")).collect();
    for batch in names.chunks(64) {
        for got in futures_util::future::join_all(batch.iter().map(|n| cache.get(n))).await {
            drop(got.unwrap());
        }
    }
    for _ in 0..3 {
        drop(cache.get("s/00042.nii.gz").await.unwrap());
    }
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let get = |query: &str| {
        let url = format!("{}/api/entries{query}", server.base);
        let (http, query) = (http.clone(), query.to_owned());
        async move {
            let answer = http.get(url).send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK, "{query}");
            let total: usize = answer.headers()["x-total-count"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let page: Vec<Value> = answer.json().await.unwrap();
            (total, page)
        }
    };
    let url_of = |e: &Value| e["url"].as_str().unwrap().to_owned();

    // Without parameters: every entry, as before.
    let (total, all) = get("").await;
    assert_eq!((total, all.len()), (ENTRIES, ENTRIES));

    // A page of the table as the dashboard asks for it.
    let (total, page) = get("?sort=size&order=desc&offset=50&limit=50").await;
    assert_eq!(total, ENTRIES);
    let mut sizes: Vec<u64> = all.iter().map(|e| e["size"].as_u64().unwrap()).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let got: Vec<u64> = page.iter().map(|e| e["size"].as_u64().unwrap()).collect();
    assert_eq!(got, sizes[50..100], "the second page of the largest");

    let (total, page) = get("?q=S/0004&sort=url&limit=5").await;
    assert_eq!(total, 10, "00040 to 00049, whatever the case");
    let want: Vec<String> = (40..45)
        .map(|i| origin.url(&format!("data/s/{i:05}.nii.gz")))
        .collect();
    assert_eq!(page.iter().map(url_of).collect::<Vec<_>>(), want);
    let (_, last) = get("?q=S/0004&sort=url&offset=5&limit=50").await;
    assert_eq!(last.len(), 5, "the last page holds the rest");

    let (_, top) = get("?sort=hits&order=desc&limit=1").await;
    assert_eq!(url_of(&top[0]), origin.url("data/s/00042.nii.gz"));
    assert_eq!(top[0]["hits"], 3);

    let bad = http
        .get(format!("{}/api/entries?sort=sha256", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: Value = bad.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
}
