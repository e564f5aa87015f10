//! `ls` and `stats`: what is cached, sorted, filtered, with totals, in human sizes.

use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use imgcache::{EntryInfo, ImageCache};

use crate::sizes::shown;

/// The orders `ls --sort` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Most recently used first
    LastUsed,
    /// Largest first
    Size,
    /// Oldest download first
    Age,
    /// Most hits first
    Hits,
}

/// What `ls` prints.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Print JSON (an array of entries; no totals line)
    #[arg(long)]
    pub json: bool,
    /// Sizes in bytes instead of KiB, MiB, GiB
    #[arg(long)]
    pub bytes: bool,
    /// Order of the entries
    #[arg(long, value_enum, default_value_t = SortBy::LastUsed)]
    pub sort: SortBy,
    /// Only entries whose URL matches this glob (`*` any run, `?` one character, `[a-z]`),
    /// e.g. '*/ct/*.nii.gz'
    #[arg(long = "match", value_name = "GLOB")]
    pub pattern: Option<String>,
}

/// The entries `pattern` selects (all without one), in `order`.
pub fn select(
    mut entries: Vec<EntryInfo>,
    pattern: Option<&str>,
    order: SortBy,
) -> anyhow::Result<Vec<EntryInfo>> {
    if let Some(pattern) = pattern {
        let glob = glob::Pattern::new(pattern)
            .map_err(|e| anyhow::anyhow!("--match {pattern:?} is not a glob: {e}"))?;
        entries.retain(|e| glob.matches(&e.url));
    }
    match order {
        // `entries()` lists most recently used first already.
        SortBy::LastUsed => entries.sort_by_key(|e| std::cmp::Reverse(e.last_access_ms)),
        SortBy::Size => entries.sort_by_key(|e| std::cmp::Reverse(e.size)),
        SortBy::Age => entries.sort_by_key(|e| e.fetched_at_ms),
        SortBy::Hits => entries.sort_by_key(|e| std::cmp::Reverse(e.hits)),
    }
    Ok(entries)
}

pub fn ls(cache: &ImageCache, args: &LsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let entries = select(cache.admin().entries(), args.pattern.as_deref(), args.sort)?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &entries)?;
        writeln!(out)?;
        return Ok(());
    }
    let now = SystemTime::now();
    writeln!(
        out,
        "{:>10}  {:>6}  {:>10}  {:<14}  URL",
        "SIZE", "HITS", "LAST USED", "EXPIRES"
    )?;
    let mut total = 0u64;
    for e in &entries {
        total += e.size;
        writeln!(
            out,
            "{:>10}  {:>6}  {:>10}  {:<14}  {}",
            shown(e.size, args.bytes),
            e.hits,
            ago(now, e.last_access_ms),
            expiry(now, e.expires_at_ms),
            e.url
        )?;
    }
    let s = cache.stats();
    writeln!(
        out,
        "{} {}, {} (cache: {} entries, {} of {})",
        entries.len(),
        if entries.len() == 1 {
            "entry"
        } else {
            "entries"
        },
        shown(total, args.bytes),
        s.entries_count,
        shown(s.current_size_bytes, args.bytes),
        shown(s.max_size_bytes, args.bytes),
    )?;
    Ok(())
}

pub fn stats(cache: &ImageCache, json: bool, bytes: bool, out: &mut impl Write) -> io::Result<()> {
    let s = cache.stats();
    if json {
        serde_json::to_writer_pretty(&mut *out, &s)?;
        return writeln!(out);
    }
    let rows = [
        ("cache_dir", s.cache_dir.clone()),
        ("entries_count", s.entries_count.to_string()),
        (
            "current_size",
            format!(
                "{} of {}",
                shown(s.current_size_bytes, bytes),
                shown(s.max_size_bytes, bytes)
            ),
        ),
        ("hit_rate", format!("{:.1} %", s.hit_rate * 100.0)),
        ("reuse_rate", format!("{:.1} %", s.reuse_rate * 100.0)),
    ];
    for (name, value) in rows {
        writeln!(out, "{name:<24}{value}")?;
    }
    for (counter, value) in s.counters() {
        let value = if counter.name.ends_with("_bytes") {
            shown(value, bytes)
        } else {
            value.to_string()
        };
        writeln!(out, "{:<24}{value}", counter.name)?;
    }
    writeln!(out, "{:<24}{} h", "default_ttl", s.default_ttl_hours)?;
    if let (Some(tier), Some(state)) = (&s.shared_tier, &s.shared_tier_state) {
        writeln!(out, "{:<24}{tier} ({state})", "shared_tier")?;
    }
    if !s.request_headers.is_empty() {
        writeln!(
            out,
            "{:<24}{} (values hidden)",
            "request_headers",
            s.request_headers.join(", ")
        )?;
    }
    Ok(())
}

/// `in 5h 3m`, or `expired`.
pub fn expiry(now: SystemTime, expires_at_ms: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(expires_at_ms);
    match at.duration_since(now) {
        Ok(left) => format!("in {}", coarse(left)),
        Err(_) => "expired".to_owned(),
    }
}

/// `3h ago`, `just now`.
pub fn ago(now: SystemTime, at_ms: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms);
    match now.duration_since(at) {
        Ok(d) if d >= Duration::from_secs(1) => format!("{} ago", coarse(d)),
        _ => "just now".to_owned(),
    }
}

/// The two largest units of `d`: `2d 3h`, `5m 10s`.
fn coarse(d: Duration) -> String {
    let s = d.as_secs();
    let parts = [
        (s / 86_400, "d"),
        (s / 3600 % 24, "h"),
        (s / 60 % 60, "m"),
        (s % 60, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    parts[first..]
        .iter()
        .take(2)
        .filter(|(n, _)| *n > 0 || first == 3)
        .map(|(n, u)| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, size: u64, fetched: u64, used: u64, hits: u64) -> EntryInfo {
        serde_json::from_value(serde_json::json!({
            "url": url, "path": "/x", "size": size, "sha256": "0", "fetched_at_ms": fetched,
            "expires_at_ms": 0, "last_access_ms": used, "hits": hits, "pinned": false
        }))
        .unwrap()
    }

    #[test]
    fn entries_are_filtered_by_glob_and_sorted_by_each_key() {
        let all = vec![
            entry("http://h/ct/a.nii.gz", 30, 3, 1, 5),
            entry("http://h/mr/b.nii.gz", 10, 1, 3, 0),
            entry("http://h/ct/c.nii.gz", 20, 2, 2, 9),
        ];
        let urls = |v: Vec<EntryInfo>| v.into_iter().map(|e| e.url).collect::<Vec<_>>();
        let by = |order| urls(select(all.clone(), None, order).unwrap());
        assert_eq!(by(SortBy::Size)[0], "http://h/ct/a.nii.gz");
        assert_eq!(by(SortBy::Age)[0], "http://h/mr/b.nii.gz");
        assert_eq!(by(SortBy::LastUsed)[0], "http://h/mr/b.nii.gz");
        assert_eq!(by(SortBy::Hits)[0], "http://h/ct/c.nii.gz");
        let ct = urls(select(all.clone(), Some("*/ct/*"), SortBy::Size).unwrap());
        assert_eq!(ct, ["http://h/ct/a.nii.gz", "http://h/ct/c.nii.gz"]);
        assert!(select(all, Some("[unclosed"), SortBy::Size).is_err());
    }

    #[test]
    fn durations_are_shown_coarsely() {
        assert_eq!(coarse(Duration::from_secs(0)), "0s");
        assert_eq!(coarse(Duration::from_secs(59)), "59s");
        assert_eq!(coarse(Duration::from_secs(3 * 3600 + 5 * 60 + 7)), "3h 5m");
        assert_eq!(coarse(Duration::from_secs(2 * 86_400 + 60)), "2d");
    }
}
