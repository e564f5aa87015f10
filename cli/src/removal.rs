//! The deleting commands: `invalidate`, `clear`, `cleanup`. Each takes `--dry-run` (print
//! what would go, remove nothing); removing more than [`CONFIRM_ABOVE`] bytes (or
//! `IMGCACHE_CONFIRM_ABOVE`) from a terminal asks first, unless `--yes`.

use std::io::{self, BufRead, IsTerminal, Write};
use std::time::{Duration, SystemTime};

use imgcache::{EntryInfo, ImageCache};

use crate::sizes::human;

/// Removing more than this from a terminal asks first.
pub const CONFIRM_ABOVE: u64 = 4 << 30;

/// [`CONFIRM_ABOVE`], or the size `IMGCACHE_CONFIRM_ABOVE` gives (`500MiB`, `20GiB`).
fn confirm_above() -> anyhow::Result<u64> {
    match std::env::var("IMGCACHE_CONFIRM_ABOVE") {
        Ok(v) if !v.trim().is_empty() => {
            crate::sizes::parse_size(&v).map_err(|e| anyhow::anyhow!("IMGCACHE_CONFIRM_ABOVE: {e}"))
        }
        _ => Ok(CONFIRM_ABOVE),
    }
}

/// The flags every deleting command takes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Deleting {
    /// Print what would be removed, and remove nothing
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Do not ask before removing more than 4 GiB (IMGCACHE_CONFIRM_ABOVE) from a terminal
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// What a deleting command has chosen, before it removes anything.
pub struct Plan {
    pub entries: Vec<EntryInfo>,
    /// What each entry is removed for, printed beside it in a dry run.
    pub why: Vec<&'static str>,
    /// What goes from the shared tier too: always asked about on a terminal, whatever its
    /// size, since it is every host's.
    pub shared: Option<String>,
}

impl Plan {
    pub fn of(entries: Vec<EntryInfo>, why: &'static str) -> Plan {
        let why = vec![why; entries.len()];
        Plan {
            entries,
            why,
            shared: None,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    fn summary(&self) -> String {
        let n = self.entries.len();
        let local = format!(
            "{n} {} ({})",
            if n == 1 { "entry" } else { "entries" },
            human(self.bytes())
        );
        match &self.shared {
            Some(shared) => format!("{local}, and {shared}"),
            None => local,
        }
    }
}

/// Prints a dry run, or asks when the plan is large and a person is at the terminal.
/// Returns whether to go on.
pub fn approve(plan: &Plan, flags: Deleting, out: &mut impl Write) -> anyhow::Result<bool> {
    if flags.dry_run {
        for (e, why) in plan.entries.iter().zip(&plan.why) {
            writeln!(
                out,
                "would remove  {:>10}  {why:<8}  {}",
                human(e.size),
                e.url
            )?;
        }
        writeln!(out, "would remove {}", plan.summary())?;
        return Ok(false);
    }
    let interactive = io::stdin().is_terminal() && io::stderr().is_terminal();
    let large = plan.bytes() > confirm_above()? || plan.shared.is_some();
    if flags.yes || !interactive || !large {
        return Ok(true);
    }
    eprint!(
        "imgcache: remove {}? (--dry-run lists them) [y/N] ",
        plan.summary()
    );
    io::stderr().flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    let yes = matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes");
    if !yes {
        eprintln!("imgcache: nothing removed");
    }
    Ok(yes)
}

/// Entries below `prefix` (a relative one below the image server): the URL itself, and
/// those that go on after a `/` (`ct/1` takes `ct/1/a.nii.gz`, never `ct/10.nii.gz`; a
/// prefix ending in `/` takes everything after it).
pub fn with_prefix(cache: &ImageCache, prefix: &str) -> anyhow::Result<Vec<EntryInfo>> {
    anyhow::ensure!(
        !prefix.trim().is_empty(),
        "an empty --prefix would take every entry: use clear"
    );
    let joined = match (url::Url::parse(prefix), cache.admin().image_server()) {
        (Ok(url), _) => url,
        (Err(_), Some(server)) => url::Url::parse(server)?
            .join(prefix.trim_start_matches('/'))
            .map_err(|e| anyhow::anyhow!("--prefix {prefix:?}: {e}"))?,
        (Err(_), None) => anyhow::bail!("a relative --prefix needs IMAGE_SERVER"),
    };
    // As entries show their URLs: normalised, without credentials, signatures redacted.
    let mut shown = joined;
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    let absolute = cache.admin().redacted(shown.as_str());
    let below = if absolute.ends_with('/') {
        absolute.clone()
    } else {
        format!("{absolute}/")
    };
    Ok(cache
        .admin()
        .entries()
        .into_iter()
        .filter(|e| e.url == absolute || e.url.starts_with(&below))
        .collect())
}

/// Entries downloaded longer ago than `age`.
pub fn older_than(cache: &ImageCache, age: Duration) -> Vec<EntryInfo> {
    let cutoff = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    cache
        .admin()
        .entries()
        .into_iter()
        .filter(|e| e.fetched_at_ms < cutoff)
        .collect()
}

/// Removes the planned entries one by one, each only if it is still the version planned
/// (another process may have downloaded it again since, while the question waited);
/// returns how many went.
pub async fn remove(cache: &ImageCache, plan: &Plan) -> anyhow::Result<u64> {
    let mut removed = 0;
    for e in &plan.entries {
        let same = cache
            .admin()
            .entry(&e.url)?
            .is_some_and(|now| now.sha256 == e.sha256 && now.fetched_at_ms == e.fetched_at_ms);
        if same && cache.invalidate(&e.url).await? {
            removed += 1;
        }
    }
    Ok(removed)
}
