//! `imgcache`: the cache from the command line.
//!
//! Exit codes: 0 success; 1 a download, verification or other operation failed; 2 bad usage.
//! A closed stdout (`imgcache ls | head -1`) is not an error.
#![forbid(unsafe_code)]

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use futures_util::StreamExt;
use imgcache::{CacheBuilder, GetOptions, ImageCache, Verification};

mod bars;
mod listing;
mod registry;
mod removal;
mod sizes;

use bars::Bars;
use removal::{Deleting, Plan};

/// A local cache of large remote files (NIfTI volumes): URL in, local path out.
///
/// Settings come from the environment (IMAGE_SERVER, CACHE_DIR, CACHE_MAX_SIZE_MB,
/// CACHE_DEFAULT_TTL_HOURS, ...) and a .env file in the current directory; flags override them.
#[derive(Debug, Parser)]
#[command(name = "imgcache", version, about)]
struct Cli {
    /// Cache directory [env: CACHE_DIR; default ~/.cache/vista3d]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Size cap with a unit: 20GiB, 500MB, 1.5T [env: CACHE_MAX_SIZE_MB; default 1GiB]
    #[arg(long, global = true, value_name = "SIZE", value_parser = sizes::parse_size, conflicts_with = "max_size_mb")]
    max_size: Option<u64>,
    /// Size cap in MB (2^20 bytes) [env: CACHE_MAX_SIZE_MB; default 1024]
    #[arg(long, global = true, value_name = "N")]
    max_size_mb: Option<f64>,
    /// Time to live of new entries, e.g. 90s, 30m, 24h [env: CACHE_DEFAULT_TTL_HOURS]
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Base URL for relative URLs [env: IMAGE_SERVER]
    #[arg(long, global = true, value_name = "URL")]
    image_server: Option<String>,
    /// Log more (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress bars (they are drawn on stderr when it is a terminal; no colour when it
    /// is not, or NO_COLOR is set)
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch each URL (concurrently; repeated URLs share one download) and print one local
    /// path per line, in the order given
    Get {
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
    },
    /// Fetch each URL, then run COMMAND with its ARGS followed by the local paths (as xargs
    /// does), holding the files for as long as it runs: eviction, clear and invalidate in
    /// any process leave them alone until it ends. Exits with COMMAND's status.
    ///
    /// Example: imgcache exec ct/0042.nii.gz ct/0043.nii.gz -- python seg.py --out masks
    Exec {
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
        /// The program and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Fetch every URL listed in FILE (one a line; blank lines and # comments skipped; - for
    /// stdin) with bounded concurrency, to warm the cache. A line may give the file's SHA-256
    /// after its URL, as pooch registries do (`ct/1.nii.gz 9f86...` or `sha256:9f86...`):
    /// that download is checked against it
    Prefetch {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Downloads at once
        #[arg(short, long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
    },
    /// Serve the dashboard (/), the JSON API (/api), Prometheus metrics (/metrics) and the
    /// caching sidecar (/files/PATH fetches IMAGE_SERVER/PATH through the cache)
    Serve {
        /// Address to listen on; another than loopback needs an admin token
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: std::net::SocketAddr,
        /// Bearer token required by the mutating endpoints
        #[arg(long, env = "IMGCACHE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Time for a client to send a request's headers
        #[arg(long, env = "IMGCACHE_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
        header_timeout: Duration,
        /// Time a request's body may send nothing while it is read
        #[arg(long, env = "IMGCACHE_BODY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
        body_timeout: Duration,
        /// Time a keep-alive connection may sit with no request
        #[arg(long, env = "IMGCACHE_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "75s")]
        idle_timeout: Duration,
        /// Time a client may read nothing of an answer before it is cut and its file let go
        #[arg(long, env = "IMGCACHE_SEND_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
        send_timeout: Duration,
        /// Connections served at once [default: a quarter of the descriptor limit, less 128
        /// kept for the cache's files]
        #[arg(long, env = "IMGCACHE_MAX_CONNECTIONS")]
        max_connections: Option<usize>,
    },
    /// Show the statistics
    Stats {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Sizes in bytes instead of KiB, MiB, GiB
        #[arg(long)]
        bytes: bool,
    },
    /// List the entries (most recently used first), then their totals
    Ls(listing::LsArgs),
    /// Remove the entry of a URL, or with --prefix every entry below it
    Invalidate {
        #[arg(value_name = "URL")]
        url: String,
        /// URL is a prefix: remove every entry whose URL starts with it (a relative one is
        /// below IMAGE_SERVER)
        #[arg(long, conflicts_with = "shared")]
        prefix: bool,
        /// Remove the shared tier's record too, so that the whole fleet asks the origin again
        #[arg(long)]
        shared: bool,
        #[command(flatten)]
        deleting: Deleting,
    },
    /// Remove every entry, or with --older-than those downloaded longer ago
    Clear {
        /// Only entries downloaded longer ago than this: 7d, 12h, 90m
        #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration, conflicts_with = "shared")]
        older_than: Option<Duration>,
        /// Remove everything of the shared tier too (blobs, records and leases of the fleet)
        #[arg(long)]
        shared: bool,
        #[command(flatten)]
        deleting: Deleting,
    },
    /// Remove expired entries and enforce the size cap now
    Cleanup {
        #[command(flatten)]
        deleting: Deleting,
    },
    /// Re-hash one entry, or all; corrupt entries are removed (exit 1 if any)
    Verify {
        #[arg(value_name = "URL")]
        url: Option<String>,
    },
    /// Print a completion script: `imgcache completions bash > /etc/bash_completion.d/imgcache`,
    /// `imgcache completions zsh > "${fpath[1]}/_imgcache"`,
    /// `imgcache completions fish > ~/.config/fish/completions/imgcache.fish`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        // No cache is opened: completions work before any configuration exists.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "imgcache", &mut script);
        return match io::stdout().write_all(&script) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                eprintln!("imgcache: {e}");
                ExitCode::FAILURE
            }
            _ => ExitCode::SUCCESS,
        };
    }
    init_tracing(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imgcache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgcache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(colour())
        .init();
}

/// Colour (and other terminal codes) only on a terminal, and never with NO_COLOR set to
/// anything but the empty string (no-color.org).
fn colour() -> bool {
    io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

async fn open(cli: &Cli) -> anyhow::Result<ImageCache> {
    let mut builder = CacheBuilder::from_env()?;
    if let Some(dir) = &cli.cache_dir {
        builder = builder.cache_dir(dir);
    }
    if let Some(mb) = cli.max_size_mb {
        anyhow::ensure!(mb.is_finite() && mb > 0.0, "--max-size-mb must be positive");
        builder = builder.max_size_bytes((mb * imgcache::MB as f64) as u64);
    }
    if let Some(bytes) = cli.max_size {
        builder = builder.max_size_bytes(bytes);
    }
    if let Some(ttl) = cli.ttl {
        builder = builder.default_ttl(ttl);
    }
    if let Some(server) = &cli.image_server {
        builder = builder.image_server(server);
    }
    // A short-lived command sweeps only when asked (`cleanup`); the server sweeps as configured.
    if !matches!(cli.command, Command::Serve { .. }) {
        builder = builder.sweep_interval(Duration::ZERO);
    }
    // Nor does it on opening: what a command removes, it shows or asks about first (a
    // dry run, a cleanup under a lowered --max-size); downloads still make room for
    // themselves under the cap.
    if !matches!(cli.command, Command::Serve { .. }) {
        builder = builder.sweep_on_open(false);
    }
    // The sidecar answers many clients: what the origin marks `private` is not kept, unless
    // CACHE_REFUSE_PRIVATE says otherwise.
    if matches!(cli.command, Command::Serve { .. })
        && std::env::var_os("CACHE_REFUSE_PRIVATE").is_none()
    {
        builder = builder.network(|n| n.refuse_private(true));
    }
    let cache = builder.build().await?;
    Ok(cache)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cache = open(&cli).await?;
    if let Command::Serve {
        listen,
        admin_token,
        header_timeout,
        body_timeout,
        idle_timeout,
        send_timeout,
        max_connections,
    } = &cli.command
    {
        let mut limits = imgcache::server::Limits::new()
            .header_read_timeout(*header_timeout)
            .body_read_timeout(*body_timeout)
            .idle_timeout(*idle_timeout)
            .send_timeout(*send_timeout);
        if let Some(max) = max_connections {
            limits = limits.max_connections(*max);
        }
        let result = serve(&cache, *listen, admin_token.clone(), limits).await;
        // Downloads still running get a moment; the state is saved before the wait.
        if tokio::time::timeout(DOWNLOAD_GRACE, cache.shutdown())
            .await
            .is_err()
        {
            eprintln!(
                "imgcache: leaving downloads still running after {} s",
                DOWNLOAD_GRACE.as_secs()
            );
        }
        return result;
    }
    // Bars go to stderr, so that `imgcache get X | xargs ...` still shows them.
    let bars = (!cli.quiet && io::stderr().is_terminal()).then(|| Bars::start(&cache));
    let result = command(&cache, &cli.command, bars.as_ref()).await;
    if let Some(bars) = bars {
        bars.stop();
    }
    cache.shutdown().await;
    result
}

/// Runs the server until Ctrl-C or SIGTERM.
async fn serve(
    cache: &ImageCache,
    listen: std::net::SocketAddr,
    admin_token: Option<String>,
    limits: imgcache::server::Limits,
) -> anyhow::Result<ExitCode> {
    imgcache::server::check_listen(listen, admin_token.as_deref()).map_err(anyhow::Error::msg)?;
    let mut options = imgcache::server::ServerOptions::new();
    if let Some(token) = admin_token {
        options = options.admin_token(token);
    }
    let app = imgcache::server::router_with(cache.clone(), options);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    eprintln!("imgcache: dashboard on http://{local}/ (API /api, metrics /metrics)");
    match cache.admin().image_server() {
        Some(server) => {
            let server = cache.admin().redacted(server);
            eprintln!("imgcache: sidecar http://{local}/files/PATH serves {server}PATH")
        }
        None => eprintln!("imgcache: no IMAGE_SERVER configured: /files/ is off"),
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let server = imgcache::server::serve(listener, app, limits, stop.clone().cancelled_owned());
    let mut server = std::pin::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        () = signalled() => {
            // Requests in flight get a moment to finish; dashboards' event streams never
            // would, so they are cut after it and the state is saved (by the caller). A
            // second signal ends the process at once.
            stop.cancel();
            tokio::spawn(async {
                signalled().await;
                eprintln!("imgcache: second signal: exiting now");
                std::process::exit(130);
            });
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                eprintln!("imgcache: closing the connections still open after {} s", SHUTDOWN_GRACE.as_secs());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long requests in flight may go on after Ctrl-C or SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long downloads still running then have before the process exits (state is saved
/// first): the whole exit stays within 5 s of the signal.
const DOWNLOAD_GRACE: Duration = Duration::from_secs(1);

/// Ctrl-C or SIGTERM.
async fn signalled() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn command(
    cache: &ImageCache,
    command: &Command,
    bars: Option<&Bars>,
) -> anyhow::Result<ExitCode> {
    let mut out = io::stdout().lock();
    match command {
        Command::Get { urls } => {
            let results =
                futures_util::future::join_all(urls.iter().map(|url| cache.get(url))).await;
            if let Some(bars) = bars {
                let _ = bars.multi.clear();
            }
            let mut failed = false;
            let mut held = Vec::with_capacity(results.len());
            for (url, result) in urls.iter().zip(results) {
                match result {
                    Ok(file) if file.status() == imgcache::CacheStatus::NotStored => {
                        // Its copy goes when this command ends: a path printed would be gone.
                        failed = true;
                        eprintln!(
                            "imgcache: {}: the image server said not to store this file (Cache-Control: no-store); \
                             read it with `imgcache exec URL -- COMMAND`, or set CACHE_KEEP_NO_STORE=1",
                            cache.admin().redacted(url)
                        );
                    }
                    Ok(file) => {
                        writeln!(out, "{}", file.path().display())?;
                        held.push(file);
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("imgcache: {}: {e}", cache.admin().redacted(url));
                    }
                }
            }
            // Held until the sweeper has stopped: a path printed is never evicted by this
            // run's own let-go (over the cap, the next run or sweep evicts).
            cache.shutdown().await;
            drop(held);
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::Exec { urls, command } => {
            let results =
                futures_util::future::join_all(urls.iter().map(|url| cache.get(url))).await;
            if let Some(bars) = bars {
                let _ = bars.multi.clear();
            }
            let mut files = Vec::with_capacity(results.len());
            for (url, result) in urls.iter().zip(results) {
                match result {
                    Ok(file) => files.push(file),
                    Err(e) => {
                        eprintln!("imgcache: {}: {e}", cache.admin().redacted(url));
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            let (program, args) = command.split_first().context("no command given")?;
            let status = run_holding(program, args, &files).await?;
            // Held until here.
            drop(files);
            let code = match status.code() {
                Some(code) => u8::try_from(code).unwrap_or(1),
                // Killed by a signal: 128 + its number, as shells report it.
                None => std::os::unix::process::ExitStatusExt::signal(&status)
                    .map_or(1, |sig| 128u8.saturating_add(sig as u8)),
            };
            return Ok(ExitCode::from(code));
        }
        Command::Prefetch { file, jobs } => {
            let wanted = registry::read(file)?;
            let overall = bars.map(|b| b.overall(wanted.len() as u64));
            let mut results = futures_util::stream::iter(wanted.iter())
                .map(|w| async move {
                    let mut options = GetOptions::new();
                    if let Some(sha256) = &w.sha256 {
                        options = options.expected_sha256(sha256);
                    }
                    (w, cache.get_with(&w.url, options).await)
                })
                .buffer_unordered(usize::from(*jobs));
            let (mut fetched, mut hits, mut failed) = (0u64, 0u64, 0u64);
            while let Some((w, result)) = results.next().await {
                match result {
                    Ok(file) if file.status() == imgcache::CacheStatus::Hit => hits += 1,
                    Ok(_) => fetched += 1,
                    Err(e) => {
                        failed += 1;
                        let line = format!("imgcache: {}: {e}", cache.admin().redacted(&w.url));
                        match &overall {
                            Some(bar) => bar.println(line),
                            None => eprintln!("{line}"),
                        }
                    }
                }
                if let Some(bar) = &overall {
                    bar.inc(1);
                }
            }
            if let Some(bar) = overall {
                bar.finish_and_clear();
            }
            let checked = wanted.iter().filter(|w| w.sha256.is_some()).count();
            writeln!(
                out,
                "{} files: {fetched} fetched, {hits} already cached, {failed} failed",
                wanted.len()
            )?;
            if checked > 0 {
                writeln!(out, "{checked} checked against the SHA-256 of the list")?;
            }
            return Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::Serve { .. } | Command::Completions { .. } => {
            unreachable!("handled before")
        }
        Command::Stats { json, bytes } => listing::stats(cache, *json, *bytes, &mut out)?,
        Command::Ls(args) => listing::ls(cache, args, &mut out)?,
        Command::Invalidate {
            url,
            prefix: true,
            deleting,
            ..
        } => {
            let plan = Plan::of(removal::with_prefix(cache, url)?, "prefix");
            if plan.entries.is_empty() {
                eprintln!(
                    "imgcache: nothing cached below {}",
                    cache.admin().redacted(url)
                );
            } else if removal::approve(&plan, *deleting, &mut out)? {
                let n = removal::remove(cache, &plan).await?;
                writeln!(out, "removed {n} entries")?;
            }
        }
        Command::Invalidate {
            url,
            shared,
            deleting,
            ..
        } => {
            let mut plan = Plan::of(cache.admin().entry(url)?.into_iter().collect(), "asked");
            if *shared {
                plan.shared = Some(format!(
                    "the shared tier's record of {}, for every host",
                    cache.admin().redacted(url)
                ));
            }
            if !removal::approve(&plan, *deleting, &mut out)? {
                return Ok(ExitCode::SUCCESS);
            }
            let found = if *shared {
                cache.tier().invalidate(url).await?
            } else {
                cache.invalidate(url).await?
            };
            if !found {
                eprintln!("imgcache: {}: not cached here", cache.admin().redacted(url));
            }
        }
        Command::Clear {
            older_than: Some(age),
            deleting,
            ..
        } => {
            let plan = Plan::of(removal::older_than(cache, *age), "old");
            if removal::approve(&plan, *deleting, &mut out)? {
                let n = removal::remove(cache, &plan).await?;
                writeln!(out, "removed {n} entries")?;
            }
        }
        Command::Clear {
            shared, deleting, ..
        } => {
            let mut plan = Plan::of(cache.admin().entries(), "clear");
            if *shared {
                plan.shared = Some(
                    "everything of the shared tier (blobs, records and leases of every host)"
                        .to_owned(),
                );
            }
            if !removal::approve(&plan, *deleting, &mut out)? {
                return Ok(ExitCode::SUCCESS);
            }
            if *shared {
                let (n, objects) = cache.tier().clear().await?;
                writeln!(
                    out,
                    "removed {n} entries, and {objects} objects of the shared tier"
                )?;
            } else {
                let n = cache.clear().await?;
                writeln!(out, "removed {n} entries")?;
            }
        }
        Command::Cleanup { deleting } => {
            let preview = cache.admin().cleanup_preview();
            let mut plan = Plan::of(preview.expired, "expired");
            let evicted = Plan::of(preview.evicted, "evicted");
            plan.entries.extend(evicted.entries);
            plan.why.extend(evicted.why);
            if removal::approve(&plan, *deleting, &mut out)? {
                let r = cache.cleanup().await?;
                write!(
                    out,
                    "expired {}, evicted {}, freed {}",
                    r.expired,
                    r.evicted,
                    sizes::human(r.bytes_freed)
                )?;
                if r.kept_in_use > 0 {
                    write!(out, "; kept {} expired, still in use", r.kept_in_use)?;
                }
                writeln!(out)?;
            }
        }
        Command::Verify { url: Some(url) } => {
            let outcome = cache.admin().verify(url).await?;
            let word = match outcome {
                Verification::Ok => "ok",
                Verification::Corrupt => "corrupt (removed)",
                Verification::NotCached => "not cached",
                _ => "unknown",
            };
            writeln!(out, "{word}  {}", cache.admin().redacted(url))?;
            if outcome != Verification::Ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Verify { url: None } => {
            let report = cache
                .admin()
                .verify_all()
                .await
                .context("verification failed")?;
            for url in &report.corrupt {
                writeln!(out, "corrupt (removed)  {url}")?;
            }
            writeln!(
                out,
                "checked {}, corrupt {}",
                report.checked,
                report.corrupt.len()
            )?;
            if !report.corrupt.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `program` with `args` and the paths of `files`, and waits for it while the files
/// stay held. Like `system(3)`, this process ignores SIGINT and SIGQUIT meanwhile (the
/// terminal sends them to the command too) and passes SIGTERM and SIGHUP on to the command
/// rather than die of them: the pins last as long as the command does.
async fn run_holding(
    program: &str,
    args: &[String],
    files: &[imgcache::CachedFile],
) -> anyhow::Result<std::process::ExitStatus> {
    use tokio::signal::unix::{SignalKind, signal};
    let watch = |kind| signal(kind).context("cannot watch signals");
    let (mut int, mut quit) = (watch(SignalKind::interrupt())?, watch(SignalKind::quit())?);
    let (mut term, mut hup) = (
        watch(SignalKind::terminate())?,
        watch(SignalKind::hangup())?,
    );
    let mut child = std::process::Command::new(program)
        .args(args)
        .args(files.iter().map(|f| f.path()))
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let pid = rustix::process::Pid::from_child(&child);
    let mut waiter = tokio::task::spawn_blocking(move || child.wait());
    let forward = |sig: rustix::process::Signal| {
        let _ = rustix::process::kill_process(pid, sig);
    };
    loop {
        tokio::select! {
            // The child first: once it is reaped, its pid is nobody's to signal.
            biased;
            done = &mut waiter => {
                return done
                    .context("the command's waiter failed")?
                    .with_context(|| format!("cannot wait for {program}"));
            }
            _ = term.recv() => forward(rustix::process::Signal::TERM),
            _ = hup.recv() => forward(rustix::process::Signal::HUP),
            _ = int.recv() => {}
            _ = quit.recv() => {}
        }
    }
}
