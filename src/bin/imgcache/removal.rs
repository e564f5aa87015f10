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
}

impl Plan {
    pub fn of(entries: Vec<EntryInfo>, why: &'static str) -> Plan {
        let why = vec![why; entries.len()];
        Plan { entries, why }
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    fn summary(&self) -> String {
        let n = self.entries.len();
        format!(
            "{n} {} ({})",
            if n == 1 { "entry" } else { "entries" },
            human(self.bytes())
        )
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
    if flags.yes || !interactive || plan.bytes() <= confirm_above()? {
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

/// Entries whose URL starts with `prefix` (a relative one against the image server).
pub fn with_prefix(cache: &ImageCache, prefix: &str) -> Vec<EntryInfo> {
    let absolute = match (url::Url::parse(prefix), cache.image_server()) {
        (Ok(_), _) | (Err(_), None) => prefix.to_owned(),
        (Err(_), Some(server)) => format!(
            "{}{}",
            server.trim_end_matches('/'),
            if prefix.starts_with('/') {
                prefix.to_owned()
            } else {
                format!("/{prefix}")
            }
        ),
    };
    cache
        .entries()
        .into_iter()
        .filter(|e| e.url.starts_with(&absolute))
        .collect()
}

/// Entries downloaded longer ago than `age`.
pub fn older_than(cache: &ImageCache, age: Duration) -> Vec<EntryInfo> {
    let cutoff = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    cache
        .entries()
        .into_iter()
        .filter(|e| e.fetched_at_ms < cutoff)
        .collect()
}

/// Removes the planned entries one by one; returns how many were there to remove.
pub async fn remove(cache: &ImageCache, plan: &Plan) -> anyhow::Result<u64> {
    let mut removed = 0;
    for e in &plan.entries {
        if cache.invalidate(&e.url).await? {
            removed += 1;
        }
    }
    Ok(removed)
}
