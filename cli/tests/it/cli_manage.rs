//! The command line for a big cache: sizes with units, `ls` sorted, filtered and totalled,
//! dry runs and confirmations, `clear --older-than`, `invalidate --prefix`, registries with
//! SHA-256, completions, and no colour where it does not belong.

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;

use crate::support::origin::{Origin, Route, sha256_hex, volume};

const KIB: usize = 1024;

use crate::cli::run;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Under a pseudo-terminal (util-linux `script`), with `input` typed at it; what it drew.
async fn on_a_terminal(cwd: &Path, shell_command: &str, input: &str) -> String {
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", shell_command, "/dev/null"])
        .current_dir(cwd)
        .env("COLUMNS", "150")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("util-linux script");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    // Kept open until the command ends: a closed stdin would end the pseudo-terminal.
    let out = child.wait_with_output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the command ends")
        .unwrap();
    drop(stdin);
    text(&out.stdout)
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imgcache")
}

/// An SGR sequence (a colour or a weight), as opposed to cursor movement.
fn has_colour(s: &str) -> bool {
    s.match_indices("\x1b[").any(|(i, _)| {
        s[i + 2..]
            .chars()
            .find(|c| !(c.is_ascii_digit() || *c == ';'))
            == Some('m')
    })
}

struct Cache {
    origin: Origin,
    dir: tempfile::TempDir,
}

impl Cache {
    /// Three volumes of 300, 200 and 100 KiB under `ct/` and `mr/`, fetched.
    async fn new() -> Cache {
        let origin = Origin::start().await;
        for (path, seed, size) in [
            ("ct/big.nii.gz", 1, 300),
            ("ct/mid.nii.gz", 2, 200),
            ("mr/small.nii.gz", 3, 100),
        ] {
            origin.route(path, Route::ok(volume(seed, size * KIB)));
        }
        let c = Cache {
            origin,
            dir: tempfile::tempdir().unwrap(),
        };
        for path in ["ct/big.nii.gz", "ct/mid.nii.gz", "mr/small.nii.gz"] {
            assert!(c.run(&["get", path]).await.status.success());
        }
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[]).await
    }

    async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let dir = self.dir.path().join("cache");
        let server = self.origin.url("");
        let mut all = vec![
            "--cache-dir",
            dir.to_str().unwrap(),
            "--image-server",
            server.as_str(),
        ];
        all.extend_from_slice(args);
        run(self.dir.path(), &all, env).await
    }

    async fn urls(&self) -> Vec<String> {
        let ls = self.run(&["ls", "--json"]).await;
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
        let mut urls: Vec<String> = entries
            .iter()
            .map(|e| {
                e["url"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        urls.sort();
        urls
    }

    fn shell(&self, args: &str) -> String {
        format!(
            "{} --cache-dir {} --image-server {} {args}",
            bin(),
            self.dir.path().join("cache").display(),
            self.origin.url("")
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_take_units_and_show_them_unless_bytes_or_json() {
    let c = Cache::new().await;
    let stats = c.run(&["--max-size", "20GiB", "stats", "--json"]).await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["max_size_bytes"], 20u64 << 30);
    let human = text(&c.run(&["--max-size", "1.5G", "stats"]).await.stdout);
    assert!(human.contains("600.0 KiB of 1.5 GiB"), "{human}");
    let exact = text(&c.run(&["stats", "--bytes"]).await.stdout);
    assert!(
        exact.contains(&format!("{} of {}", 600 * KIB, 1u64 << 30)),
        "{exact}"
    );
    for bad in [
        vec!["--max-size", "3 parsecs", "stats"],
        vec!["--max-size", "1GiB", "--max-size-mb", "10", "stats"],
    ] {
        let out = c.run(&bad).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_sorts_filters_and_ends_with_totals() {
    let c = Cache::new().await;
    let lines =
        |out: Output| -> Vec<String> { text(&out.stdout).lines().map(str::to_owned).collect() };
    let by_size = lines(c.run(&["ls", "--sort", "size"]).await);
    assert!(
        by_size[0].starts_with("      SIZE"),
        "a header: {by_size:?}"
    );
    assert!(
        by_size[1].contains("big") && by_size[3].contains("small"),
        "{by_size:?}"
    );
    assert!(
        by_size[1].trim_start().starts_with("300.0 KiB"),
        "{by_size:?}"
    );
    assert!(
        by_size[4].starts_with("3 entries, 600.0 KiB (cache: 3 entries"),
        "{by_size:?}"
    );
    let by_age = lines(c.run(&["ls", "--sort", "age"]).await);
    assert!(by_age[1].contains("big"), "oldest first: {by_age:?}");
    // Hits: one entry read again.
    assert!(c.run(&["get", "mr/small.nii.gz"]).await.status.success());
    let by_hits = lines(c.run(&["ls", "--sort", "hits"]).await);
    assert!(by_hits[1].contains("small"), "{by_hits:?}");
    let ct = lines(c.run(&["ls", "--match", "*/ct/*", "--bytes"]).await);
    assert_eq!(ct.len(), 4, "{ct:?}");
    assert!(ct.iter().all(|l| !l.contains("small")));
    assert!(
        ct[3].starts_with(&format!("2 entries, {} ", 500 * KIB)),
        "{ct:?}"
    );
    let bad = c.run(&["ls", "--sort", "colour"]).await;
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_print_what_would_go_and_remove_nothing() {
    let c = Cache::new().await;
    let all = c.urls().await;
    for args in [
        vec!["clear", "--dry-run"],
        vec!["clear", "--older-than", "0s", "-n"],
        vec!["invalidate", "ct/big.nii.gz", "--dry-run"],
        vec!["invalidate", "--prefix", "ct/", "--dry-run"],
        vec!["--max-size", "250KiB", "cleanup", "--dry-run"],
    ] {
        let out = c.run(&args).await;
        let said = text(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(said.contains("would remove"), "{args:?}: {said}");
        assert_eq!(c.urls().await, all, "{args:?} removed something");
    }
    let prefix = text(&c.run(&["invalidate", "--prefix", "ct/", "-n"]).await.stdout);
    assert!(prefix.contains("big") && prefix.contains("mid") && !prefix.contains("small"));
    assert!(
        prefix.contains("would remove 2 entries (500.0 KiB)"),
        "{prefix}"
    );
    // The cap leaves room for 250 KiB: the two least recently used go.
    let cleanup = text(
        &c.run(&["--max-size", "250KiB", "cleanup", "-n"])
            .await
            .stdout,
    );
    assert!(cleanup.contains("evicted"), "{cleanup}");
    assert!(
        cleanup.contains("would remove 2 entries (500.0 KiB)"),
        "{cleanup}"
    );

    // Below a prefix means after a `/`: `ct/b` is not `ct/big.nii.gz`'s parent.
    let none = c.run(&["invalidate", "--prefix", "ct/b"]).await;
    assert!(none.status.success());
    assert!(
        text(&none.stderr).contains("nothing cached below"),
        "{}",
        text(&none.stderr)
    );
    let empty = c.run(&["invalidate", "--prefix", ""]).await;
    assert_eq!(
        empty.status.code(),
        Some(1),
        "an empty prefix is not every entry"
    );
    let shared = text(&c.run(&["clear", "--shared", "--dry-run"]).await.stdout);
    assert!(
        shared.contains("and everything of the shared tier"),
        "{shared}"
    );
    assert_eq!(c.urls().await, all);

    // And for real.
    let out = c.run(&["invalidate", "--prefix", "ct/"]).await;
    assert_eq!(text(&out.stdout).trim(), "removed 2 entries");
    assert_eq!(c.urls().await, ["small.nii.gz"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_older_than_removes_only_old_downloads() {
    let origin = Origin::start().await;
    origin.route("old.nii.gz", Route::ok(volume(4, 50 * KIB)));
    origin.route("new.nii.gz", Route::ok(volume(5, 50 * KIB)));
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    // Downloaded ten days ago, by the clock of the process that did.
    let clock = Arc::new(imgcache::ManualClock::new());
    clock.set(SystemTime::now() - Duration::from_secs(10 * 86_400));
    let cache = imgcache::ImageCache::builder()
        .cache_dir(&cache_dir)
        .default_ttl(Duration::from_secs(30 * 86_400))
        .clock(Arc::clone(&clock) as Arc<dyn imgcache::Clock>)
        .build()
        .await
        .unwrap();
    drop(cache.get(origin.url("old.nii.gz")).await.unwrap());
    clock.set(SystemTime::now());
    drop(cache.get(origin.url("new.nii.gz")).await.unwrap());
    cache.shutdown().await;
    drop(cache);
    let dir_arg = cache_dir.to_str().unwrap();
    let out = run(
        dir.path(),
        &["--cache-dir", dir_arg, "clear", "--older-than", "7d"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "removed 1 entries");
    let ls = run(dir.path(), &["--cache-dir", dir_arg, "ls", "--json"], &[]).await;
    let left: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(left.len(), 1);
    assert!(left[0]["url"].as_str().unwrap().ends_with("new.nii.gz"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_removal_on_a_terminal_asks_first() {
    let c = Cache::new().await;
    let env = "IMGCACHE_CONFIRM_ABOVE=100KiB";
    // Answered no: nothing goes.
    let drawn = on_a_terminal(
        c.dir.path(),
        &format!("env {env} {}", c.shell("clear")),
        "n\n",
    )
    .await;
    assert!(
        drawn.contains("remove 3 entries (600.0 KiB)? (--dry-run lists them) [y/N]"),
        "{drawn:?}"
    );
    assert!(drawn.contains("nothing removed"), "{drawn:?}");
    assert_eq!(c.urls().await.len(), 3);
    // A cleanup under a lowered cap asks before it evicts, and opening evicted nothing.
    let lowered = on_a_terminal(
        c.dir.path(),
        &format!("env {env} {}", c.shell("--max-size 250KiB cleanup")),
        "n\n",
    )
    .await;
    assert!(
        lowered.contains("remove 2 entries (500.0 KiB)?"),
        "{lowered:?}"
    );
    assert_eq!(c.urls().await.len(), 3);
    // Below the threshold: no question.
    let small = on_a_terminal(
        c.dir.path(),
        &format!("env {env} {}", c.shell("invalidate mr/small.nii.gz")),
        "",
    )
    .await;
    assert!(!small.contains("[y/N]"), "{small:?}");
    assert_eq!(c.urls().await.len(), 2);
    // Answered yes.
    let yes = on_a_terminal(
        c.dir.path(),
        &format!("env {env} {}", c.shell("clear")),
        "y\n",
    )
    .await;
    assert!(yes.contains("removed 2 entries"), "{yes:?}");
    // --yes skips the question; without a terminal none is asked.
    for path in ["ct/big.nii.gz", "ct/mid.nii.gz"] {
        assert!(c.run(&["get", path]).await.status.success());
    }
    let skipped = on_a_terminal(
        c.dir.path(),
        &format!("env {env} {}", c.shell("clear --yes")),
        "",
    )
    .await;
    assert!(
        !skipped.contains("[y/N]") && skipped.contains("removed 2 entries"),
        "{skipped:?}"
    );
    for path in ["ct/big.nii.gz", "ct/mid.nii.gz"] {
        assert!(c.run(&["get", path]).await.status.success());
    }
    let piped = c
        .run_with(&["clear"], &[("IMGCACHE_CONFIRM_ABOVE", "100KiB")])
        .await;
    assert_eq!(text(&piped.stdout).trim(), "removed 2 entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_checks_each_download_against_its_registry_digest() {
    let origin = Origin::start().await;
    let good = volume(6, 80 * KIB);
    let tampered = volume(7, 80 * KIB);
    origin.route("ct/good.nii.gz", Route::ok(good.clone()));
    origin.route("ct/bad.nii.gz", Route::ok(tampered));
    origin.route("ct/free.nii.gz", Route::ok(volume(8, 10 * KIB)));
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.txt");
    std::fs::write(
        &registry,
        format!(
            "# pooch-style registry\nct/good.nii.gz {}\nct/bad.nii.gz sha256:{}\nct/free.nii.gz\n",
            sha256_hex(&good),
            sha256_hex(&good),
        ),
    )
    .unwrap();
    let cache_dir = dir.path().join("cache");
    let server = origin.url("");
    let base = [
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--image-server",
        server.as_str(),
    ];
    let mut args = base.to_vec();
    args.extend(["prefetch", registry.to_str().unwrap()]);
    let out = run(dir.path(), &args, &[]).await;
    assert_eq!(out.status.code(), Some(1), "the tampered file fails");
    let said = text(&out.stdout);
    assert!(
        said.starts_with("3 files: 2 fetched, 0 already cached, 1 failed"),
        "{said}"
    );
    assert!(
        said.contains("2 checked against the SHA-256 of the list"),
        "{said}"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.nii.gz") && err.contains("SHA-256"),
        "{err}"
    );
    let mut ls = base.to_vec();
    ls.extend(["ls", "--json"]);
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&run(dir.path(), &ls, &[]).await.stdout).unwrap();
    assert_eq!(
        entries.len(),
        2,
        "the file that failed its digest is not cached"
    );
    // A malformed digest is an error naming its line.
    std::fs::write(&registry, "ct/good.nii.gz md5:abcd\n").unwrap();
    let out = run(dir.path(), &args, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("registry.txt:1"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_for_three_shells_need_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef imgcache"),
        ("fish", "complete -c imgcache"),
    ] {
        // No HOME, no cache directory: a completion script needs neither.
        let out = tokio::process::Command::new(bin())
            .args(["completions", shell])
            .current_dir(dir.path())
            .env_clear()
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("prefetch") && script.contains("older-than"),
            "{shell}"
        );
    }
    let out = run(dir.path(), &["completions", "powershell-9"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bars_follow_stderr_and_colour_follows_the_terminal_and_no_color() {
    let origin = Origin::start().await;
    origin.route(
        "slow.nii.gz",
        Route::ok(volume(9, 12 * 1024 * KIB)).rate(8 * 1024 * 1024),
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let get = format!(
        "{} -v --cache-dir {} get {}",
        bin(),
        cache.display(),
        origin.url("slow.nii.gz")
    );
    // stdout into a pipe, stderr still the terminal: the bar is drawn.
    let piped = on_a_terminal(dir.path(), &format!("{get} | cat"), "").await;
    assert!(
        piped.contains("MiB/s"),
        "no bar with stdout piped: {piped:?}"
    );
    assert!(
        has_colour(&piped),
        "a terminal gets coloured logs: {piped:?}"
    );
    std::fs::remove_dir_all(&cache).unwrap();
    let plain = on_a_terminal(dir.path(), &format!("env NO_COLOR=1 {get}"), "").await;
    assert!(!has_colour(&plain), "NO_COLOR: {plain:?}");
    std::fs::remove_dir_all(&cache).unwrap();
    let url = origin.url("slow.nii.gz");
    let out = run(
        dir.path(),
        &["-v", "--cache-dir", cache.to_str().unwrap(), "get", &url],
        &[],
    )
    .await;
    let err = text(&out.stderr);
    assert!(out.status.success());
    assert!(err.contains("INFO"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "no terminal codes without a terminal: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dotenv_cannot_point_a_token_of_the_environment_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let cache_arg = cache_dir.to_str().unwrap();
    // A checkout of someone else's, with its .env naming its server.
    std::fs::write(
        dir.path().join(".env"),
        "IMAGE_SERVER=http://127.0.0.1:9/\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["--cache-dir", cache_arg, "stats"],
        &[("CACHE_BEARER_TOKEN", "tok-1")],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("same place") && !err.contains("tok-1"),
        "{err}"
    );
    // Nor send a file of this user's as a token to the server of the environment.
    std::fs::write(
        dir.path().join(".env"),
        "CACHE_BEARER_TOKEN_FILE=/etc/hostname\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["--cache-dir", cache_arg, "stats"],
        &[("IMAGE_SERVER", "http://127.0.0.1:9/")],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // Both in one place is fine.
    std::fs::write(
        dir.path().join(".env"),
        "IMAGE_SERVER=http://127.0.0.1:9/\nCACHE_BEARER_TOKEN=tok-1\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["--cache-dir", cache_arg, "stats", "--json"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("authorization") && !text(&out.stdout).contains("tok-1"));
}
