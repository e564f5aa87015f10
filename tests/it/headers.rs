//! Request headers for authenticated image servers: sent to the image server's origin only,
//! never across a redirect to another host, and never shown.

use std::sync::Arc;

use imgcache::{ErrorKind, ManualClock};

use crate::support::builder;
use crate::support::origin::{Origin, Route, volume};

const KEY: &str = "k-9f2e7-secret";
const TOKEN: &str = "tok-c41d-secret";

fn header<'a>(seen: &'a crate::support::origin::Seen, name: &str) -> Option<&'a str> {
    seen.header(name)
}

/// What `origin` saw of `path`: each request's key and authorization.
fn credentials(origin: &Origin, path: &str) -> Vec<(Option<String>, Option<String>)> {
    origin
        .seen()
        .iter()
        .filter(|s| s.path == format!("/{path}"))
        .map(|s| {
            (
                header(s, "x-api-key").map(str::to_owned),
                header(s, "authorization").map(str::to_owned),
            )
        })
        .collect()
}

#[tokio::test]
async fn headers_reach_the_image_server_and_no_other_host() {
    let server = Origin::start().await;
    let other = Origin::start().await;
    let body = volume(1, 200_000);
    server.route("data/ct/1.nii.gz", Route::ok(body.clone()));
    server.route(
        "data/same.nii.gz",
        Route::status(302).header("Location", &server.url("data/ct/1.nii.gz")),
    );
    other.route("elsewhere.nii.gz", Route::ok(body.clone()));
    server.route(
        "data/moved.nii.gz",
        Route::status(307).header("Location", &other.url("elsewhere.nii.gz")),
    );
    other.route("direct.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let cache = builder(dir.path(), &clock)
        .image_server(server.url("data"))
        .network(|n| n.http_header("X-Api-Key", KEY))
        .network(|n| n.bearer_token(TOKEN))
        .build()
        .await
        .unwrap();
    let sent = (Some(KEY.to_owned()), Some(format!("Bearer {TOKEN}")));
    let none = (None, None);

    let file = cache.get("ct/1.nii.gz").await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(
        credentials(&server, "data/ct/1.nii.gz"),
        std::slice::from_ref(&sent)
    );

    // A redirect that stays on the image server's origin keeps them.
    drop(cache.get("same.nii.gz").await.unwrap());
    assert_eq!(
        credentials(&server, "data/same.nii.gz"),
        std::slice::from_ref(&sent)
    );
    assert_eq!(credentials(&server, "data/ct/1.nii.gz")[1], sent);

    // A redirect to another host goes without them; so does an absolute URL there.
    let file = cache.get("moved.nii.gz").await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(
        credentials(&server, "data/moved.nii.gz"),
        std::slice::from_ref(&sent)
    );
    assert_eq!(
        credentials(&other, "elsewhere.nii.gz"),
        std::slice::from_ref(&none)
    );
    drop(cache.get(other.url("direct.nii.gz")).await.unwrap());
    assert_eq!(credentials(&other, "direct.nii.gz"), [none]);
}

#[tokio::test]
async fn values_never_show_in_debug_errors_or_stats() {
    let server = Origin::start().await;
    server.route("data/locked.nii.gz", Route::status(401));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let builder = builder(dir.path(), &clock)
        .image_server(server.url("data"))
        .network(|n| n.http_header("X-Api-Key", KEY))
        .network(|n| n.bearer_token(TOKEN))
        .network(|n| n.retries(0));
    let shown = format!("{builder:?}");
    assert!(!shown.contains(KEY) && !shown.contains(TOKEN), "{shown}");
    let cache = builder.build().await.unwrap();
    let shown = format!("{cache:?}");
    assert!(!shown.contains(KEY) && !shown.contains(TOKEN), "{shown}");
    let err = cache.get("locked.nii.gz").await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(KEY) && !shown.contains(TOKEN), "{shown}");
    let stats = cache.stats();
    assert_eq!(stats.request_headers, ["authorization", "x-api-key"]);
    let json = serde_json::to_string(&stats).unwrap();
    assert!(!json.contains(KEY) && !json.contains(TOKEN), "{json}");
}

#[tokio::test]
async fn headers_need_an_image_server_and_valid_values() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let err = builder(dir.path(), &clock)
        .network(|n| n.bearer_token(TOKEN))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("IMAGE_SERVER"), "{err}");
    let err = builder(dir.path(), &clock)
        .image_server("http://127.0.0.1:9/")
        .network(|n| n.http_header("X-Api-Key", format!("{KEY}\r\nX-Injected: 1")))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.to_string().contains(KEY), "{err}");
    let err = builder(dir.path(), &clock)
        .image_server("http://127.0.0.1:9/")
        .network(|n| n.bearer_token_file(dir.path().join("absent")))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn the_environment_gives_headers_and_a_token_file() {
    let server = Origin::start().await;
    server.route("data/e.nii.gz", Route::ok(volume(2, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let dotenv = dir.path().join(".env");
    std::fs::write(
        &dotenv,
        format!(
            "IMAGE_SERVER={}\nCACHE_HTTP_HEADERS=\"X-Api-Key: {KEY}\"\nCACHE_BEARER_TOKEN_FILE={}\n",
            server.url("data"),
            token.display()
        ),
    )
    .unwrap();
    // A line the parser refuses is reported without its text.
    let broken = dir.path().join("broken.env");
    std::fs::write(&broken, format!("CACHE_BEARER_TOKEN=a b {TOKEN}\n")).unwrap();
    let err = imgcache::CacheBuilder::from_env_and_file(&broken).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    let cache = imgcache::CacheBuilder::from_env_and_file(&dotenv)
        .unwrap()
        .cache_dir(dir.path().join("cache"))
        .sweep_interval(std::time::Duration::ZERO)
        .build()
        .await
        .unwrap();
    drop(cache.get("e.nii.gz").await.unwrap());
    assert_eq!(
        credentials(&server, "data/e.nii.gz"),
        [(Some(KEY.to_owned()), Some(format!("Bearer {TOKEN}")))]
    );
}

#[tokio::test]
async fn a_client_given_whole_is_refused_and_a_customised_one_keeps_the_guard() {
    let server = Origin::start().await;
    let other = Origin::start().await;
    other.route("x.nii.gz", Route::ok(volume(3, 1000)));
    server.route(
        "data/x.nii.gz",
        Route::status(302).header("Location", &other.url("x.nii.gz")),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    // reqwest's rustls needs a process-wide crypto provider before a client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A client given whole may follow redirects itself, headers and all: refused.
    let err = builder(dir.path(), &clock)
        .image_server(server.url("data"))
        .network(|n| n.http_header("X-Api-Key", KEY))
        .network(|n| n.http_client(reqwest::Client::new()))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("http_client_with"), "{err}");
    // A customised client, even one told to follow redirects, leaves them to the cache.
    let cache = builder(dir.path(), &clock)
        .image_server(server.url("data"))
        .network(|n| n.http_header("X-Api-Key", KEY))
        .network(|n| n.bearer_token(TOKEN))
        .network(|n| n.http_client_with(|b| b.redirect(reqwest::redirect::Policy::limited(5))))
        .build()
        .await
        .unwrap();
    drop(cache.get("x.nii.gz").await.unwrap());
    assert_eq!(
        credentials(&server, "data/x.nii.gz"),
        [(Some(KEY.to_owned()), Some(format!("Bearer {TOKEN}")))]
    );
    assert_eq!(credentials(&other, "x.nii.gz"), [(None, None)]);
}
