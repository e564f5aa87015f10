//! The `imgcache` binary end to end, against a local origin.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::origin::{Origin, Route, sha256_hex, volume};

/// Runs the binary in `cwd` with a clean environment (no CACHE_* or IMAGE_SERVER from the
/// machine) and `HOME` inside the test directory.
pub(crate) async fn run(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgcache"));
    cmd.current_dir(cwd).args(args).env_clear();
    cmd.env("HOME", cwd.join("home"))
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("run imgcache")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Fixture {
    origin: Origin,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let origin = Origin::start().await;
        origin.route("ct/a.nii.gz", Route::ok(volume(1, 300_000)));
        origin.route("ct/b.nii.gz", Route::ok(volume(2, 200_000)));
        Fixture {
            origin,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    async fn run(&self, args: &[&str]) -> Output {
        let dir = self.cache_dir();
        let mut all = vec!["--cache-dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        run(self.dir.path(), &all, &[]).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_prints_one_path_per_url_in_order_and_shares_repeated_downloads() {
    let f = Fixture::new().await;
    let a = f.origin.url("ct/a.nii.gz");
    let b = f.origin.url("ct/b.nii.gz");
    let out = f.run(&["get", &b, &a, &b, &a]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<_> = stdout(&out).lines().map(PathBuf::from).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0], lines[2]);
    assert_eq!(lines[1], lines[3]);
    assert!(lines[0].ends_with("b.nii.gz") && lines[1].ends_with("a.nii.gz"));
    assert_eq!(
        sha256_hex(&std::fs::read(&lines[1]).unwrap()),
        sha256_hex(&volume(1, 300_000))
    );
    assert_eq!(f.origin.hits("ct/a.nii.gz"), 1);
    assert_eq!(f.origin.hits("ct/b.nii.gz"), 1);

    // A second run is served from disk.
    let again = f.run(&["get", &a]).await;
    assert_eq!(stdout(&again).trim(), lines[1].to_str().unwrap());
    assert_eq!(f.origin.hits("ct/a.nii.gz"), 1);

    let stats = f.run(&["stats", "--json"]).await;
    let s: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(s["total_downloads"], 2);
    assert_eq!(s["hits"], 1);
    assert_eq!(s["entries_count"], 2);
    assert!(s["coalesced_waits"].as_u64().unwrap() >= 1, "{s}");
    let text = stdout(&f.run(&["stats"]).await);
    assert!(
        text.contains("hit_rate") && text.contains("entries_count"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_never_prints_a_path_it_has_deleted() {
    let f = Fixture::new().await;
    f.origin.route("ct/c.nii.gz", Route::ok(volume(3, 2 << 20)));
    f.origin.route("ct/d.nii.gz", Route::ok(volume(4, 2 << 20)));
    let c = f.origin.url("ct/c.nii.gz");
    let d = f.origin.url("ct/d.nii.gz");
    // Two files of 2 MiB under a 3 MiB cap: over it until the caller is done with them.
    let out = f.run(&["--max-size", "3MiB", "get", &c, &d]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<_> = stdout(&out).lines().map(PathBuf::from).collect();
    assert_eq!(lines.len(), 2);
    for (path, seed) in lines.iter().zip([3, 4]) {
        assert_eq!(
            std::fs::read(path).ok(),
            Some(volume(seed, 2 << 20)),
            "{} was printed and is gone",
            path.display()
        );
    }
    // A file the image server says not to store has no path to print: its copy goes with
    // the command.
    f.origin.route(
        "ct/n.nii.gz",
        Route::ok(volume(5, 1000)).header("cache-control", "no-store"),
    );
    let n = f.origin.url("ct/n.nii.gz");
    let refused = f.run(&["get", &n]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(stdout(&refused).is_empty());
    assert!(
        stderr(&refused).contains("no-store"),
        "{}",
        stderr(&refused)
    );
    // The next run honours the cap.
    let clean = f.run(&["--max-size", "3MiB", "cleanup"]).await;
    assert!(clean.status.success(), "{}", stderr(&clean));
    let left = lines.iter().filter(|p| p.exists()).count();
    assert_eq!(left, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_fails_with_a_nonzero_exit_but_prints_what_worked() {
    let f = Fixture::new().await;
    let good = f.origin.url("ct/a.nii.gz");
    let bad = f.origin.url("ct/missing.nii.gz");
    let out = f.run(&["get", &good, &bad]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out).lines().count(), 1);
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    assert!(stderr(&out).contains("ct/missing.nii.gz"));

    let usage = f.run(&["get"]).await;
    assert_eq!(usage.status.code(), Some(2));
    let bad_ttl = f.run(&["--ttl", "soon", "stats"]).await;
    assert_eq!(bad_ttl.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_invalidate_clear_cleanup_and_verify() {
    let f = Fixture::new().await;
    let a = f.origin.url("ct/a.nii.gz");
    let b = f.origin.url("ct/b.nii.gz");
    assert!(f.run(&["get", &a, &b]).await.status.success());

    let ls = f.run(&["ls", "--json"]).await;
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(entries.len(), 2);
    for e in &entries {
        for field in ["url", "path", "size", "sha256", "expires_at_ms"] {
            assert!(!e[field].is_null(), "{field} missing in {e}");
        }
    }
    let text = stdout(&f.run(&["ls"]).await);
    assert!(text.contains(&a) && text.contains(&b), "{text}");

    let ok = f.run(&["verify"]).await;
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(stdout(&ok).contains("checked 2, corrupt 0"));

    // Flip a byte and restore the mtime: only a full verification can tell.
    let path = entries
        .iter()
        .find(|e| e["url"] == a.as_str())
        .map(|e| PathBuf::from(e["path"].as_str().unwrap()))
        .unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let bad = f.run(&["verify", &a]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(stdout(&bad).contains("corrupt"));
    assert!(!path.exists());

    let inv = f.run(&["invalidate", &b]).await;
    assert!(inv.status.success());
    let ls = f.run(&["ls", "--json"]).await;
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert!(entries.is_empty());

    assert!(f.run(&["get", &a, &b]).await.status.success());
    let cleared = f.run(&["clear"]).await;
    assert_eq!(stdout(&cleared).trim(), "removed 2 entries");

    assert!(f.run(&["--ttl", "1s", "get", &a]).await.status.success());
    let cleanup = f.run(&["cleanup"]).await;
    assert!(cleanup.status.success());
    assert!(
        stdout(&cleanup).starts_with("expired "),
        "{}",
        stdout(&cleanup)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_the_environment_and_dotenv_and_flags_win() {
    let origin = Origin::start().await;
    origin.route("data/ct/c.nii.gz", Route::ok(volume(3, 2 * 1024 * 1024)));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("from-dotenv");
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "IMAGE_SERVER={}\nCACHE_DIR={}\nCACHE_MAX_SIZE_MB=1\n",
            origin.url("data"),
            cache.display()
        ),
    )
    .unwrap();

    // The .env cap (1 MB) refuses the 2 MB file, relative to IMAGE_SERVER from .env.
    let out = run(dir.path(), &["get", "ct/c.nii.gz"], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("larger than the cache"),
        "{}",
        stderr(&out)
    );

    // The environment overrides .env; a flag overrides both.
    let out = run(
        dir.path(),
        &["get", "ct/c.nii.gz"],
        &[("CACHE_MAX_SIZE_MB", "8")],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).trim().starts_with(cache.to_str().unwrap()));
    let out = run(
        dir.path(),
        &["--max-size-mb", "1", "stats", "--json"],
        &[("CACHE_MAX_SIZE_MB", "8")],
    )
    .await;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["max_size_mb"], 1.0);
    assert_eq!(
        s["entries_count"], 1,
        "a command that only looks evicts nothing, even under a lowered cap"
    );
    let out = run(
        dir.path(),
        &["--max-size-mb", "1", "cleanup"],
        &[("CACHE_MAX_SIZE_MB", "8")],
    )
    .await;
    assert!(stdout(&out).contains("evicted 1"), "{}", stdout(&out));

    // A bad value names its variable.
    let out = run(
        dir.path(),
        &["stats"],
        &[("CACHE_DEFAULT_TTL_HOURS", "forever")],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("CACHE_DEFAULT_TTL_HOURS"),
        "{}",
        stderr(&out)
    );

    // With no CACHE_DIR anywhere, the default is ~/.cache/vista3d.
    std::fs::remove_file(dir.path().join(".env")).unwrap();
    let out = run(dir.path(), &["stats", "--json"], &[]).await;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let home = dir.path().join("home/.cache/vista3d");
    assert_eq!(s["cache_dir"], home.to_str().unwrap());
    let out = run(
        dir.path(),
        &["stats", "--json"],
        &[("XDG_CACHE_HOME", "/tmp/xdg-imgcache-test")],
    )
    .await;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["cache_dir"], "/tmp/xdg-imgcache-test/vista3d");
    let _ = std::fs::remove_dir_all("/tmp/xdg-imgcache-test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_is_not_an_error() {
    let f = Fixture::new().await;
    let a = f.origin.url("ct/a.nii.gz");
    assert!(f.run(&["get", &a]).await.status.success());
    let dir = f.cache_dir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .args(["--cache-dir", dir.to_str().unwrap(), "stats"])
        .current_dir(f.dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_warms_the_cache_from_a_file_or_stdin_with_bounded_jobs() {
    let f = Fixture::new().await;
    let list = f.dir.path().join("urls.txt");
    std::fs::write(
        &list,
        format!(
            "# volumes for tomorrow\n{}\n\n{}\n{}\n{}\n",
            f.origin.url("ct/a.nii.gz"),
            f.origin.url("ct/b.nii.gz"),
            f.origin.url("ct/missing.nii.gz"),
            f.origin.url("ct/a.nii.gz"),
        ),
    )
    .unwrap();
    let out = f
        .run(&["prefetch", "--jobs", "2", list.to_str().unwrap()])
        .await;
    assert_eq!(out.status.code(), Some(1), "one URL fails");
    let summary = stdout(&out);
    // The repeated URL either joins the running download or hits once it is committed.
    assert!(summary.starts_with("4 files: "), "{summary}");
    assert!(summary.trim_end().ends_with("1 failed"), "{summary}");
    assert!(
        stderr(&out).contains("ct/missing.nii.gz"),
        "{}",
        stderr(&out)
    );
    assert_eq!(f.origin.hits("ct/a.nii.gz"), 1);
    assert_eq!(f.origin.hits("ct/b.nii.gz"), 1);

    // From stdin, everything is cached now.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .args([
            "--cache-dir",
            f.cache_dir().to_str().unwrap(),
            "prefetch",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let urls = format!(
        "{}\n{}\n",
        f.origin.url("ct/a.nii.gz"),
        f.origin.url("ct/b.nii.gz")
    );
    tokio::io::AsyncWriteExt::write_all(&mut stdin, urls.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        "2 files: 0 fetched, 2 already cached, 0 failed"
    );

    let zero = f
        .run(&["prefetch", "--jobs", "0", list.to_str().unwrap()])
        .await;
    assert_eq!(zero.status.code(), Some(2), "--jobs 0 is a usage error");
}

/// Runs the binary under a pseudo-terminal (util-linux `script`) and returns what it drew.
async fn run_on_a_terminal(cwd: &Path, args: &[&str]) -> String {
    let command = std::iter::once(env!("CARGO_BIN_EXE_imgcache"))
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(cwd)
        .env("COLUMNS", "150")
        .output()
        .await
        .expect("util-linux script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bars_show_on_a_terminal_only() {
    let origin = Origin::start().await;
    // Slow enough (about 1.5 s) for the bar to be drawn several times.
    origin.route(
        "slow.nii.gz",
        Route::ok(volume(7, 12 * 1024 * 1024)).rate(8 * 1024 * 1024),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = origin.url("slow.nii.gz");
    let drawn = run_on_a_terminal(
        dir.path(),
        &["--cache-dir", cache.to_str().unwrap(), "get", &url],
    )
    .await;
    assert!(
        drawn.contains("slow.nii.gz") && drawn.contains("MiB/s"),
        "no bar drawn: {drawn:?}"
    );
    assert!(
        drawn.contains(&cache.display().to_string()),
        "the path is still printed"
    );

    std::fs::remove_dir_all(&cache).unwrap();
    let quiet = run_on_a_terminal(
        dir.path(),
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--quiet",
            "get",
            &url,
        ],
    )
    .await;
    assert!(!quiet.contains("MiB/s"), "--quiet drew a bar: {quiet:?}");

    std::fs::remove_dir_all(&cache).unwrap();
    let piped = run(
        dir.path(),
        &["--cache-dir", cache.to_str().unwrap(), "get", &url],
        &[],
    )
    .await;
    assert!(piped.status.success());
    assert!(
        !stderr(&piped).contains("MiB/s"),
        "a bar without a terminal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_public_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = run(
        dir.path(),
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "serve",
            "--listen",
            "0.0.0.0:0",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("admin token"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_signatures_never_reach_the_terminal() {
    let f = Fixture::new().await;
    let host = f.origin.url("").trim_start_matches("http://").to_owned();
    let bad = format!("http://alice:s3cret@{host}ct/missing.nii.gz?X-Amz-Signature=zz9zz");
    let out = f.run(&["get", &bad]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("ct/missing.nii.gz"), "{err}");
    for secret in ["alice", "s3cret", "zz9zz"] {
        assert!(!err.contains(secret), "{secret} in {err}");
    }

    // The serve banner shows the image server without its password.
    let cache = f.dir.path().join("serve-cache");
    let server = format!("http://alice:s3cret@{host}data/");
    let (mut child, _, banner) = start_serve(&f, &cache, &server).await;
    child.kill().await.unwrap();
    assert!(
        banner.contains("sidecar") && banner.contains(&host),
        "{banner}"
    );
    assert!(
        !banner.contains("s3cret") && !banner.contains("alice"),
        "{banner}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_soon_after_sigterm_with_dashboards_listening_and_saves_its_state() {
    // reqwest is built without a crypto provider of its own (the cache installs one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = Fixture::new().await;
    let cache = f.dir.path().join("serve-cache");
    let (mut child, base, _) = start_serve(&f, &cache, &f.origin.url("")).await;
    let file = reqwest::get(format!("{base}/files/ct/a.nii.gz"))
        .await
        .unwrap();
    assert_eq!(file.bytes().await.unwrap().len(), 300_000);
    let again = reqwest::get(format!("{base}/files/ct/a.nii.gz"))
        .await
        .unwrap();
    assert_eq!(again.bytes().await.unwrap().len(), 300_000);
    // A download that never ends: its bytes are held back by the origin.
    let (slow, _gate) = Route::ok(volume(9, 1 << 20)).gated_body();
    f.origin.route("ct/slow.nii.gz", slow);
    let stuck = tokio::spawn(reqwest::get(format!("{base}/files/ct/slow.nii.gz")));
    f.origin.wait_for_hits("ct/slow.nii.gz", 1).await;
    // Two dashboards listening.
    let events = [
        reqwest::get(format!("{base}/api/events")).await.unwrap(),
        reqwest::get(format!("{base}/api/events")).await.unwrap(),
    ];
    assert!(events.iter().all(|e| e.status().is_success()));
    let pid = child.id().unwrap().to_string();
    let started = std::time::Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
        .await
        .expect("serve still running 5 s after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?} after {:?}", started.elapsed());
    drop(events);
    stuck.abort();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("v1/state.json")).unwrap()).unwrap();
    assert_eq!(state["counters"]["total_downloads"], 1, "{state}");
    assert_eq!(state["counters"]["hits"], 1, "{state}");
}

/// Starts `imgcache serve` on 127.0.0.1 (port 0) with `IMAGE_SERVER` set; returns the child,
/// the server's base URL and the banner it printed (up to the sidecar's line).
async fn start_serve(
    f: &Fixture,
    cache: &Path,
    image_server: &str,
) -> (tokio::process::Child, String, String) {
    start_serve_with(f, cache, image_server, &[]).await
}

/// [`start_serve`] with more variables in its environment.
async fn start_serve_with(
    f: &Fixture,
    cache: &Path,
    image_server: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgcache"));
    command
        .args([
            "--cache-dir",
            cache.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_clear()
        .env("HOME", f.dir.path())
        .env("IMAGE_SERVER", image_server);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut base, mut banner) = (None, String::new());
    while let Ok(Some(line)) = lines.next_line().await {
        banner.push_str(&line);
        banner.push('\n');
        if let Some(rest) = line.strip_prefix("imgcache: dashboard on ") {
            base = rest
                .split_whitespace()
                .next()
                .map(|u| u.trim_end_matches('/').to_owned());
        }
        if line.contains("sidecar") || line.contains("/files/ is off") {
            break;
        }
    }
    let base = base.unwrap_or_else(|| panic!("serve printed no address: {banner}"));
    // Keep reading stderr so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, base, banner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_cuts_slow_clients_and_keeps_no_private_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // reqwest is built without a crypto provider of its own (the cache installs one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = Fixture::new().await;
    f.origin.route(
        "ct/p.nii.gz",
        Route::ok(volume(9, 100_000)).header("cache-control", "private"),
    );
    let cache = f.cache_dir();
    let (mut server, base, _) = start_serve_with(
        &f,
        &cache,
        &f.origin.url("ct/"),
        &[
            ("IMGCACHE_HEADER_TIMEOUT", "300ms"),
            ("IMGCACHE_SEND_TIMEOUT", "300ms"),
        ],
    )
    .await;
    let addr = base.trim_start_matches("http://").to_owned();
    // Twenty clients that send half their headers are cut.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    for stream in &mut slow {
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a half-sent request's connection stayed open");
    }
    // The sidecar answers many clients: a private answer is served and not kept.
    let answer = reqwest::get(format!("{base}/files/p.nii.gz"))
        .await
        .unwrap();
    assert_eq!(
        answer.headers()["cache-status"],
        "imgcache; fwd=miss; detail=no-store"
    );
    assert_eq!(answer.bytes().await.unwrap(), volume(9, 100_000));
    let stats = f.run(&["stats", "--json"]).await;
    let s: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(s["entries_count"], 0, "{s}");
    server.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_beside_a_running_serve_on_the_same_directory() {
    // reqwest is built without a crypto provider of its own (the cache installs one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = Fixture::new().await;
    let cache = f.cache_dir();
    let (mut server, base, _) = start_serve(&f, &cache, &f.origin.url("ct/")).await;
    // The server downloads one file through its sidecar.
    let served = reqwest::get(format!("{base}/files/a.nii.gz"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(served.as_ref(), volume(1, 300_000).as_slice());
    let a = f.origin.url("ct/a.nii.gz");
    let b = f.origin.url("ct/b.nii.gz");

    // The CLI finds the server's download on disk: no second origin GET.
    let got = f.run(&["get", &a, &b]).await;
    assert!(got.status.success(), "{}", stderr(&got));
    assert_eq!(f.origin.hits("ct/a.nii.gz"), 1);
    let ls = f.run(&["ls", "--json"]).await;
    assert!(ls.status.success(), "{}", stderr(&ls));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listed.len(), 2);
    let verify = f.run(&["verify"]).await;
    assert!(verify.status.success(), "{}", stderr(&verify));
    // The server's download is in the directory's statistics within its save interval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats = f.run(&["stats", "--json"]).await;
        assert!(stats.status.success(), "{}", stderr(&stats));
        let s: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
        if s["total_downloads"] == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for args in [&["invalidate", &a][..], &["cleanup"], &["clear"]] {
        let out = f.run(args).await;
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&f.run(&["ls", "--json"]).await.stdout)
            .unwrap()
            .len(),
        0
    );
    server.start_kill().unwrap();
    let _ = server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_command_on_the_paths_while_holding_them_and_passes_its_status_on() {
    let f = Fixture::new().await;
    let a = f.origin.url("ct/a.nii.gz");
    let b = f.origin.url("ct/b.nii.gz");
    // The command clears the cache from another process, then reads its files: they are held.
    let cache = f.cache_dir();
    let script = format!(
        "{bin} --cache-dir {dir} clear >/dev/null && cat \"$@\" | sha256sum && exit 7",
        bin = env!("CARGO_BIN_EXE_imgcache"),
        dir = cache.display()
    );
    let out = f
        .run(&["exec", &a, &b, "--", "sh", "-c", &script, "sh"])
        .await;
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let mut both = volume(1, 300_000);
    both.extend(volume(2, 200_000));
    assert!(
        stdout(&out).starts_with(&sha256_hex(&both)),
        "the command read both files whole after a clear: {}",
        stdout(&out)
    );
    // Let go when the command ended: the cleared versions are gone.
    assert!(crate::support::data_files(&cache).is_empty());

    let missing = f
        .run(&["exec", &f.origin.url("ct/none.nii.gz"), "--", "true"])
        .await;
    assert_eq!(
        missing.status.code(),
        Some(1),
        "a failed download runs nothing"
    );
    let usage = f.run(&["exec", &a]).await;
    assert_eq!(usage.status.code(), Some(2), "no command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_outlives_a_sigterm_and_passes_it_to_the_command_which_still_reads_its_files() {
    let f = Fixture::new().await;
    let a = f.origin.url("ct/a.nii.gz");
    let cache = f.cache_dir();
    // The command sends SIGTERM to imgcache (its parent), which must pass it on and keep
    // holding the file; then another process clears the cache, and the command reads.
    let script = format!(
        "trap 'echo got-term' TERM; kill -TERM $PPID; \
         i=0; while [ $i -lt 200 ]; do i=$((i+1)); done; \
         {bin} --cache-dir {dir} clear >/dev/null && sha256sum < \"$1\"",
        bin = env!("CARGO_BIN_EXE_imgcache"),
        dir = cache.display()
    );
    let out = f.run(&["exec", &a, "--", "sh", "-c", &script, "sh"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("got-term"), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&sha256_hex(&volume(1, 300_000))),
        "read whole after the signal and a clear: {}",
        stdout(&out)
    );
}
