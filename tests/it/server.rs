//! The server (JSON API, metrics, the /files sidecar, the token rule) against a real HTTP
//! client, with the origin and the server both on 127.0.0.1.

use std::net::SocketAddr;

use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{builder, route_volumes};
use futures_util::future::join_all;
use imgcache::ImageCache;
use imgcache::server::{ServerOptions, router_with};
use reqwest::StatusCode;

use crate::MB;

/// The dashboard's own endpoints: the page under a mount point, its plots' history, the
/// downloads in progress and the entry table's search, sort and paging.
mod dashboard;
/// `serve`'s timeouts and cap on connections against raw TCP clients.
mod limits;

struct Server {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(cache: ImageCache, options: ServerOptions) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let app = router_with(cache, options);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        task,
    }
}

/// Sends `request` and decodes its JSON answer.
async fn json<T: serde::de::DeserializeOwned>(request: reqwest::RequestBuilder) -> T {
    request.send().await.unwrap().json().await.unwrap()
}

async fn setup(dir: &std::path::Path, origin: &Origin) -> ImageCache {
    let clock = std::sync::Arc::new(imgcache::ManualClock::new());
    builder(dir, &clock)
        .image_server(origin.url("data"))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_reads_and_changes_the_cache() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/a", "data/b"], 1, MB);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    drop(cache.get("a.nii.gz").await.unwrap());
    drop(cache.get("b.nii.gz").await.unwrap());
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", server.base);

    let stats: serde_json::Value = json(http.get(url("/api/stats"))).await;
    assert_eq!(stats["entries_count"], 2);
    assert_eq!(stats["total_downloads"], 2);
    let entries: Vec<serde_json::Value> = json(http.get(url("/api/entries"))).await;
    assert_eq!(entries.len(), 2);

    let a = origin.url("data/a.nii.gz");
    let r = http
        .delete(url("/api/entries"))
        .query(&[("url", &a)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(cache.get_cached(&a).is_none());
    let again = http
        .delete(url("/api/entries"))
        .query(&[("url", &a)])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = again.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("not cached"));

    let r = http
        .put(url("/api/config"))
        .json(&serde_json::json!({"ttl_hours": 2.5, "max_size_mb": 512}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let s = cache.stats();
    assert_eq!((s.default_ttl_hours, s.max_size_mb), (2.5, 512.0));
    let bad = http
        .put(url("/api/config"))
        .json(&serde_json::json!({"ttl_hours": -1, "max_size_mb": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        cache.stats().max_size_mb,
        512.0,
        "nothing changes on a bad request"
    );

    let r: serde_json::Value = json(http.post(url("/api/cleanup"))).await;
    assert_eq!(r["expired"], 0);
    let r: serde_json::Value = json(http.post(url("/api/clear"))).await;
    assert_eq!(r["removed"], 1);
    assert_eq!(cache.stats().entries_count, 0);

    let page = http
        .get(url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Clear cache") && page.contains("api/events"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/m"], 5, 1000);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache.clone(), ServerOptions::new()).await;
    drop(cache.get("m.nii.gz").await.unwrap());
    drop(cache.get("m.nii.gz").await.unwrap());
    let text = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Every counter of the cache's one table is exported, under its metric name.
    let table: Vec<serde_json::Value> =
        json(reqwest::Client::new().get(format!("{}/api/counters", server.base))).await;
    assert_eq!(table.len(), 20, "{table:?}");
    let stats = cache.stats();
    for row in &table {
        let (name, metric) = (
            row["name"].as_str().unwrap(),
            row["metric"].as_str().unwrap(),
        );
        let value = serde_json::to_value(&stats).unwrap()[name]
            .as_u64()
            .unwrap();
        let line = format!("imgcache_{metric}_total {value}");
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    for line in [
        "imgcache_hits_total 1",
        "imgcache_misses_total 1",
        "imgcache_downloads_total 1",
        "imgcache_entries 1",
        "imgcache_hit_rate 0.5",
        "imgcache_reuse_rate 0.5",
        "imgcache_download_duration_seconds_count 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_on_a_cold_file_make_one_origin_request() {
    let origin = Origin::start().await;
    let body = volume(10, 3 * MB);
    let (route, gate) = Route::ok(body.clone()).gated();
    origin.route("data/ct/cold.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/files/ct/cold.nii.gz", server.base);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                let status = r.headers()["cache-status"].to_str().unwrap().to_owned();
                (r.status(), status, r.bytes().await.unwrap())
            })
        })
        .collect();
    origin.wait_for_hits("data/ct/cold.nii.gz", 1).await;
    gate.add_permits(1);
    let mut coalesced = 0;
    for t in join_all(tasks).await {
        let (status, cache_status, bytes) = t.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sha256_hex(&bytes), sha256_hex(&body));
        assert!(cache_status.starts_with("imgcache; "), "{cache_status}");
        coalesced += usize::from(cache_status.starts_with("imgcache; fwd=miss; collapsed"));
    }
    assert_eq!(origin.hits("data/ct/cold.nii.gz"), 1);
    assert!(coalesced > 0);
    let hit = http.get(&url).send().await.unwrap();
    assert_eq!(hit.headers()["cache-status"], "imgcache; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_answers_ranges_head_and_conditional_requests() {
    let origin = Origin::start().await;
    let body = volume(11, 10_000);
    origin.route("data/r.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/files/r.nii.gz", server.base);

    // A miss is streamed: no digest to name it by yet.
    let cold = http.get(&url).send().await.unwrap();
    assert_eq!(
        cold.headers()["cache-status"],
        "imgcache; fwd=miss; detail=streamed"
    );
    assert_eq!(cold.headers()["content-length"], "10000");
    assert!(!cold.headers().contains_key("etag"));
    assert_eq!(cold.bytes().await.unwrap(), body);
    let full = http.get(&url).send().await.unwrap();
    assert_eq!(full.headers()["cache-status"], "imgcache; hit");
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", sha256_hex(&body)));
    assert!(full.headers().contains_key("last-modified"));
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    assert_eq!(full.bytes().await.unwrap(), body);

    for (range, start, end) in [
        ("bytes=0-9", 0, 9),
        ("bytes=9990-", 9990, 9999),
        ("bytes=-5", 9995, 9999),
        ("bytes=100-99999", 100, 9999),
    ] {
        let r = http.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {start}-{end}/10000"),
            "{range}"
        );
        assert_eq!(r.bytes().await.unwrap(), &body[start..=end], "{range}");
    }
    let r = http
        .get(&url)
        .header("range", "bytes=10000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */10000");
    let r = http
        .get(&url)
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "multiple ranges: the whole file"
    );

    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "10000");
    assert!(head.bytes().await.unwrap().is_empty());

    let not_modified = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    let other = http
        .get(&url)
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(origin.hits("data/r.nii.gz"), 1);

    let missing = http
        .get(format!("{}/files/absent.nii.gz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = missing.json().await.unwrap();
    let said = body["error"].as_str().unwrap();
    assert!(said.contains("404"), "{said}");
    // The client learns that its path failed, not where the origin is.
    let port = origin.addr().port().to_string();
    assert!(
        !said.contains(&port) && !said.contains("127.0.0.1") && !said.contains("http"),
        "the origin's address in an error body: {said}"
    );
    assert!(said.contains("absent.nii.gz"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_answers_conditionals_as_rfc_9110_says() {
    let origin = Origin::start().await;
    let body = volume(14, 10_000);
    origin.route(
        "data/c.nii.gz",
        Route::ok(body.clone()).header("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/files/c.nii.gz", server.base);
    let cold = http.get(&url).send().await.unwrap();
    assert_eq!(cold.bytes().await.unwrap(), body, "the miss, streamed");
    let full = http.get(&url).send().await.unwrap();
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(
        full.headers()["content-type"],
        "application/gzip",
        "from the file name"
    );
    assert_eq!(
        full.headers()["last-modified"],
        "Tue, 01 Dec 2026 10:00:00 GMT"
    );
    full.bytes().await.unwrap();
    let get = |name: &'static str, value: String| {
        let request = http.get(&url).header(name, value);
        async move { request.send().await.unwrap() }
    };

    // If-None-Match compares weakly, in a list too.
    for value in [
        format!("W/{etag}"),
        format!("\"x\", {etag}"),
        "*".to_owned(),
    ] {
        assert_eq!(
            get("if-none-match", value.clone()).await.status(),
            304,
            "{value}"
        );
    }
    // If-Modified-Since: 304 unless modified after the date; ignored beside If-None-Match.
    let since = |date: &str| get("if-modified-since", date.to_owned());
    assert_eq!(since("Tue, 01 Dec 2026 10:00:00 GMT").await.status(), 304);
    assert_eq!(since("Wed, 02 Dec 2026 10:00:00 GMT").await.status(), 304);
    assert_eq!(since("Mon, 30 Nov 2026 10:00:00 GMT").await.status(), 200);
    let both = http
        .get(&url)
        .header("if-none-match", "\"other\"")
        .header("if-modified-since", "Wed, 02 Dec 2026 10:00:00 GMT")
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 200, "If-None-Match decides");

    // If-Range: the range when it names this version, the whole file when it does not.
    let ranged = |if_range: String| {
        let request = http
            .get(&url)
            .header("range", "bytes=0-9")
            .header("if-range", if_range);
        async move { request.send().await.unwrap() }
    };
    let same = ranged(etag.clone()).await;
    assert_eq!(same.status(), 206);
    assert_eq!(same.bytes().await.unwrap(), &body[..10]);
    let changed = ranged("\"another-version\"".to_owned()).await;
    assert_eq!(changed.status(), 200);
    assert_eq!(changed.bytes().await.unwrap(), body, "the whole file");
    let weak = ranged(format!("W/{etag}")).await;
    assert_eq!(weak.status(), 200, "If-Range compares strongly");
    let dated = ranged("Tue, 01 Dec 2026 10:00:00 GMT".to_owned()).await;
    assert_eq!(dated.status(), 206);
    let old_date = ranged("Mon, 30 Nov 2026 10:00:00 GMT".to_owned()).await;
    assert_eq!(old_date.status(), 200);
    // RFC 9110 13.1.5: a date matches only when it is the Last-Modified itself. A later date
    // or garbage could splice two versions of a file.
    for other in [
        "Wed, 02 Dec 2026 10:00:00 GMT",
        "Tue, 01 Dec 2026 10:00:01 GMT",
        "not a date",
        "",
    ] {
        let answer = ranged(other.to_owned()).await;
        assert_eq!(answer.status(), 200, "If-Range: {other:?}");
        assert_eq!(
            answer.bytes().await.unwrap(),
            body,
            "the whole file for {other:?}"
        );
    }

    // Age: seconds since the file was fetched, by the cache's clock.
    let hit = http.get(&url).send().await.unwrap();
    let age: u64 = hit.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age < 60, "{age}");
    assert_eq!(origin.hits("data/c.nii.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_a_miss_asks_the_origin_with_a_head_and_downloads_nothing() {
    let origin = Origin::start().await;
    origin.route(
        "data/h.nii.gz",
        Route::ok(volume(15, 3 * MB)).etag("\"v1\""),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/files/h.nii.gz", server.base);
    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], (3 * MB).to_string());
    // No ETag: a GET's is the SHA-256 of the bytes, which a HEAD does not fetch.
    assert!(!head.headers().contains_key("etag"));
    assert_eq!(head.headers()["content-type"], "application/gzip");
    assert_eq!(
        head.headers()["cache-status"],
        "imgcache; fwd=miss; detail=head"
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "HEAD", "no GET: nothing downloaded");
    assert_eq!(cache.stats().entries_count, 0);
    assert_eq!(cache.stats().bytes_downloaded, 0);
    // A HEAD on a file that is not there says so.
    let missing = http
        .head(format!("{}/files/absent.nii.gz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_refuses_traversal_and_never_fetches_another_host() {
    let origin = Origin::start().await;
    origin.route("secret.nii.gz", Route::ok(volume(12, 100)));
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache, ServerOptions::new()).await;
    // Send the paths exactly as written (reqwest would normalise dot segments).
    for path in [
        "/files/../secret.nii.gz",
        "/files/a/%2e%2e/%2e%2e/secret.nii.gz",
        "/files/..%2fsecret.nii.gz",
        "/files/a%5c..%5csecret.nii.gz",
        "/files//evil.example/x.nii.gz",
        "/files/%2F%2Fevil.example/x",
    ] {
        let status = raw_get(&server.base, path).await;
        assert!(status == 400 || status == 404, "{path}: {status}");
    }
    assert_eq!(origin.total_hits(), 0, "nothing reached the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_path_that_looks_like_a_url_stays_on_the_image_server() {
    let origin = Origin::start().await;
    let victim = Origin::start().await;
    victim.route("secret.nii.gz", Route::ok(volume(13, 100)));
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache, ServerOptions::new()).await;
    let host = victim
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let paths = [
        format!("/files/http:{host}/secret.nii.gz"),
        format!("/files/https:{host}/secret.nii.gz"),
        format!("/files/HTTP:{host}/secret.nii.gz"),
        format!("/files/%68ttp:{host}/secret.nii.gz"),
        format!("/files/http%3a{host}/secret.nii.gz"),
        format!("/files/http:%2f%2f{host}/secret.nii.gz"),
        format!("/files/http:\\\\{host}\\secret.nii.gz"),
        format!("/files/http:%5c%5c{host}%5csecret.nii.gz"),
        format!("/files//{host}/secret.nii.gz"),
        format!("/files/%2f%2f{host}/secret.nii.gz"),
        "/files/file:/etc/passwd".to_owned(),
        "/files/file:%2fetc%2fpasswd".to_owned(),
    ];
    for path in &paths {
        let status = raw_get(&server.base, path).await;
        assert_ne!(status, 200, "{path} was served");
    }
    assert_eq!(victim.total_hits(), 0, "another host was reached");
}

/// A GET with the request line written by hand; returns the status code.
async fn raw_get(base: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The login cookie's value that a server answers for `token`.
async fn login_cookie(server: &Server, token: &str) -> String {
    let ok = reqwest::Client::new()
        .post(format!("{}/api/login", server.base))
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

// Current-thread: the routers are built on the test's thread, whose generator is seeded.
#[tokio::test]
async fn the_login_cookie_owes_nothing_to_a_seeded_generator() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let mut cookies = Vec::new();
    for _ in 0..2 {
        // A generator seeded from the clock can be searched offline: the secret must come
        // from the operating system.
        fastrand::seed(7);
        let server = serve(cache.clone(), ServerOptions::new().admin_token("s3cret")).await;
        cookies.push(login_cookie(&server, "s3cret").await);
    }
    assert_ne!(cookies[0], cookies[1], "two servers, one secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_guards_every_route_but_the_page_and_its_login() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/t"], 7, 1000);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache, ServerOptions::new().admin_token("s3cret")).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", server.base);
    for (method, path) in [
        ("GET", "/api/stats"),
        ("GET", "/api/entries"),
        ("GET", "/api/counters"),
        ("GET", "/api/history"),
        ("GET", "/api/downloads"),
        ("GET", "/api/events"),
        ("GET", "/metrics"),
        ("GET", "/files/t.nii.gz"),
        ("HEAD", "/files/t.nii.gz"),
        ("POST", "/api/clear"),
        ("POST", "/api/cleanup"),
        ("DELETE", "/api/entries?url=http://x/y"),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let denied = http.request(m.clone(), url(path)).send().await.unwrap();
        assert_eq!(denied.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let wrong = http
            .request(m.clone(), url(path))
            .bearer_auth("s3cre7")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let allowed = http
            .request(m, url(path))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_ne!(
            allowed.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        // Read to the end: a streamed miss is committed by its last byte.
        if method == "GET" && path.starts_with("/files/") {
            allowed.bytes().await.unwrap();
        }
    }
    assert_eq!(
        origin.hits("data/t.nii.gz"),
        1,
        "only the authorised request fetched"
    );
    let put = http
        .put(url("/api/config"))
        .json(&serde_json::json!({"ttl_hours": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::UNAUTHORIZED);
    // The page itself shows without the token (it asks for it).
    assert_eq!(
        http.get(url("/")).send().await.unwrap().status(),
        StatusCode::OK
    );

    // The login form's cookie: wrong token refused, right one set HttpOnly and SameSite=Strict.
    let login = |token: &str| {
        http.post(url("/api/login"))
            .json(&serde_json::json!({ "token": token }))
            .send()
    };
    assert_eq!(
        login("nope").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let ok = login("s3cret").await.unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["imgcache_token=", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains("s3cret"),
        "the cookie is not the token: {cookie}"
    );
    let value = cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("imgcache_token=")
        .to_owned();
    let with_cookie = http
        .get(url("/api/entries"))
        .header("cookie", format!("other=1; imgcache_token={value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(with_cookie.status(), StatusCode::OK);
    // The token itself as a cookie is not a login.
    let raw = http
        .get(url("/api/entries"))
        .header("cookie", "imgcache_token=s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::UNAUTHORIZED);
    // Any name reaches a server with a token (it may listen beyond loopback).
    let named = http
        .get(url("/api/stats"))
        .header("host", "images.example.org")
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), StatusCode::OK);
    let bad_cookie = http
        .get(url("/api/entries"))
        .header("cookie", "imgcache_token=s3cre7")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_cookie.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_json_error_too() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache, ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let config = format!("{}/api/config", server.base);
    for (body, content_type) in [
        ("{not json", "application/json"),
        (r#"{"ttl_hours": "soon"}"#, "application/json"),
        (r#"{"colour": 1}"#, "application/json"),
        (r#"{"ttl_hours": 1}"#, "text/plain"),
    ] {
        let answer = http
            .put(&config)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            answer.status().is_client_error(),
            "{body}: {}",
            answer.status()
        );
        let json: serde_json::Value = answer.json().await.unwrap();
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let no_url = http
        .delete(format!("{}/api/entries", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(no_url.status(), StatusCode::BAD_REQUEST);
    let json: serde_json::Value = no_url.json().await.unwrap();
    assert!(json["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_another_site_cannot_change_the_cache() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/c"], 8, 1000);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    drop(cache.get("c.nii.gz").await.unwrap());
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    let host = server.base.trim_start_matches("http://").to_owned();
    for (name, value) in [
        ("origin", "http://evil.example".to_owned()),
        ("origin", "null".to_owned()),
        ("sec-fetch-site", "cross-site".to_owned()),
    ] {
        let refused = http
            .post(format!("{}/api/clear", server.base))
            .header(name, value.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{name}: {value}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert!(body["error"].is_string());
    }
    assert_eq!(cache.stats().entries_count, 1, "nothing was cleared");
    // DNS rebinding: a page whose name now resolves to 127.0.0.1 is "same origin" with its
    // own name; without a token only requests addressed to localhost are answered.
    for path in ["/api/entries", "/api/stats", "/files/c.nii.gz"] {
        let rebound = http
            .get(format!("{}{path}", server.base))
            .header("host", "evil.example:8787")
            .send()
            .await
            .unwrap();
        assert_eq!(rebound.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let rebound_change = http
        .post(format!("{}/api/clear", server.base))
        .header("host", "evil.example:8787")
        .header("origin", "http://evil.example:8787")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound_change.status(), StatusCode::FORBIDDEN);
    assert_eq!(cache.stats().entries_count, 1);
    // A cross-site read is not a change: allowed.
    let read = http
        .get(format!("{}/api/stats", server.base))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    // The page's own requests (same origin) change it.
    let own = http
        .post(format!("{}/api/clear", server.base))
        .header("origin", format!("http://{host}"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::OK);
    assert_eq!(cache.stats().entries_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_security_headers_and_errors_no_local_paths() {
    let origin = Origin::start().await;
    route_volumes(&origin, &["data/e", "data/f"], 9, 1000);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache, ServerOptions::new()).await;
    let page = reqwest::get(format!("{}/", server.base)).await.unwrap();
    let h = page.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let stats = reqwest::get(format!("{}/api/stats", server.base))
        .await
        .unwrap();
    assert_eq!(stats.headers()["x-content-type-options"], "nosniff");
    // A cached file is never active content on this origin, whatever its type.
    let file = reqwest::get(format!("{}/files/e.nii.gz", server.base))
        .await
        .unwrap();
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(
        file.headers()["content-security-policy"],
        "sandbox; default-src 'none'"
    );
    assert_eq!(file.headers()["x-content-type-options"], "nosniff");
    file.bytes().await.unwrap();
    let head = reqwest::Client::new()
        .head(format!("{}/files/e.nii.gz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.headers()["content-security-policy"],
        "sandbox; default-src 'none'"
    );

    // A download that fails on the cache's own disk: the client learns nothing of its layout.
    let tmp = dir.path().join("v1/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let failed = reqwest::get(format!("{}/files/f.nii.gz", server.base))
        .await
        .unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    let body = failed.text().await.unwrap();
    assert!(body.contains("error"), "{body}");
    let dir_text = dir.path().to_str().unwrap();
    assert!(!body.contains(dir_text) && !body.contains("v1/"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_never_serves_bytes_behind_a_link_planted_while_it_runs() {
    let origin = Origin::start().await;
    // A small body is read at once, a large one streamed; each with its entry held by this
    // process and not.
    let cases = [
        ("s1.nii.gz", 20_000, false),
        ("s2.nii.gz", 20_000, true),
        ("l1.nii.gz", MB, false),
        ("l2.nii.gz", MB, true),
    ];
    for (i, (name, size, _)) in cases.iter().enumerate() {
        origin.route(
            &format!("data/{name}"),
            Route::ok(volume(71 + i as u64, *size)),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let server = serve(cache.clone(), ServerOptions::new()).await;
    let http = reqwest::Client::new();
    for (i, (name, size, hold)) in cases.into_iter().enumerate() {
        let body = volume(71 + i as u64, size);
        let url = format!("{}/files/{name}", server.base);
        assert_eq!(
            http.get(&url).send().await.unwrap().bytes().await.unwrap(),
            &body[..]
        );
        // Its directory moved out of the cache and a link put in its place, with another file
        // of the same size and mtime behind it.
        let held = cache.get(name).await.unwrap();
        let data = held.path().to_owned();
        let held = hold.then_some(held);
        let prefix = data.ancestors().nth(3).unwrap().to_owned();
        let outside = tempfile::tempdir().unwrap();
        let moved = outside.path().join("moved");
        std::fs::rename(&prefix, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &prefix).unwrap();
        let behind = moved.join(data.strip_prefix(&prefix).unwrap());
        let mtime = std::fs::metadata(&behind).unwrap().modified().unwrap();
        std::fs::remove_file(&behind).unwrap();
        std::fs::write(&behind, vec![b'v'; size]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&behind)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        // Name, inode, size and mtime of everything behind the link.
        let listing = |dir: &std::path::Path| -> Vec<_> {
            use std::os::unix::fs::MetadataExt;
            crate::support::files(dir)
                .into_iter()
                .map(|f| {
                    let md = std::fs::symlink_metadata(dir.join(&f)).unwrap();
                    (f, md.ino(), md.len(), md.mtime(), md.mtime_nsec())
                })
                .collect()
        };
        let before = listing(&moved);

        let answer = http.get(&url).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{name}");
        assert_eq!(
            answer.bytes().await.unwrap(),
            &body[..],
            "{name}: the cache's own bytes"
        );
        assert_eq!(std::fs::read(&behind).unwrap(), vec![b'v'; size], "{name}");
        assert_eq!(
            listing(&moved),
            before,
            "{name}: nothing written behind the link"
        );
        drop(held);
    }
}
