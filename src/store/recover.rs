//! Start-up recovery: which entries on disk are valid, and the removal of everything else.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Layout, META_LIMIT, Meta, mtime_ns, read_no_follow, remove_any};
use crate::error::{Error, Result};
use crate::key::{Key, META_FILE};

/// One entry found valid on disk by recovery.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) key: Key,
    pub(crate) meta: Meta,
    pub(crate) path: PathBuf,
}

/// What recovery found and did.
#[derive(Debug, Default)]
pub(crate) struct RecoveryReport {
    pub(crate) entries: Vec<Recovered>,
    pub(crate) removed: usize,
    /// Of those removed, the entries whose data no longer matched meta.json.
    pub(crate) integrity_failures: u64,
}

/// Scans the directory (blocking): keeps entries whose meta.json parses and matches its data
/// file; removes temp files, data without meta, meta without data, unreadable meta and
/// anything else that is not a valid entry, each with a WARN.
pub(crate) fn recover(layout: &Layout) -> Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let read_dir = |dir: &Path| {
        fs::read_dir(dir)
            .map_err(|e| Error::io("cannot read the cache directory", e).with_path(dir))
    };
    for item in read_dir(&layout.tmp)? {
        let Ok(item) = item else { continue };
        tracing::warn!(path = %item.path().display(), "removing a temp file left by an earlier run");
        remove_any(&item.path());
        report.removed += 1;
    }
    for prefix in read_dir(&layout.entries)? {
        let Ok(prefix) = prefix else { continue };
        let prefix_path = prefix.path();
        let name = prefix.file_name();
        let valid_prefix = name.len() == 2
            && name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()))
            // The entry's own type: a link to a directory is not one of ours.
            && prefix.file_type().is_ok_and(|t| t.is_dir());
        if !valid_prefix {
            tracing::warn!(path = %prefix_path.display(), "removing a stray item from the cache directory");
            remove_any(&prefix_path);
            report.removed += 1;
            continue;
        }
        for entry in read_dir(&prefix_path)? {
            let Ok(entry) = entry else { continue };
            let dir = entry.path();
            let found = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                recover_entry(&dir, entry.file_name().to_str(), &name.to_string_lossy())
            } else {
                Err(Invalid::Other("not a directory"))
            };
            match found {
                Ok(found) => report.entries.push(found),
                Err(why) => {
                    tracing::warn!(path = %dir.display(), reason = why.reason(), "removing an invalid cache entry");
                    remove_any(&dir);
                    report.removed += 1;
                    if matches!(why, Invalid::Changed(_)) {
                        report.integrity_failures += 1;
                    }
                }
            }
        }
        // Empty fan-out directories are left: they cost nothing and will be reused.
    }
    Ok(report)
}

/// Why recovery removed an entry directory.
#[derive(Debug, Clone, Copy)]
enum Invalid {
    /// The data file is not what meta.json recorded: an integrity failure.
    Changed(&'static str),
    /// Anything else: an interrupted commit, a stray or planted item.
    Other(&'static str),
}

impl Invalid {
    fn reason(self) -> &'static str {
        match self {
            Invalid::Changed(why) | Invalid::Other(why) => why,
        }
    }
}

fn recover_entry(dir: &Path, name: Option<&str>, prefix: &str) -> Result<Recovered, Invalid> {
    use Invalid::{Changed, Other};
    let key = name.and_then(Key::parse).ok_or(Other("not a cache key"))?;
    if key.prefix() != prefix {
        return Err(Other("key in the wrong directory"));
    }
    let raw = match read_no_follow(&dir.join(META_FILE), META_LIMIT) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Other("bytes without meta.json"));
        }
        Err(_) => return Err(Other("unreadable meta.json (or a link)")),
    };
    let meta: Meta = serde_json::from_slice(&raw).map_err(|_| Other("corrupt meta.json"))?;
    if meta.version != 1
        || crate::key::sanitise(&meta.file_name) != meta.file_name
        || meta.sha256.len() != 64
    {
        return Err(Other("invalid meta.json"));
    }
    let valid_generation = meta.generation.is_empty()
        || (meta.generation.len() == 17
            && meta.generation.starts_with('g')
            && meta.generation[1..].bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid_generation {
        return Err(Other("invalid meta.json"));
    }
    // The version's own directory (if it has one) must be a directory, not a link.
    let version_dir = match meta.generation.as_str() {
        "" => dir.to_owned(),
        generation => {
            let version_dir = dir.join(generation);
            if !fs::symlink_metadata(&version_dir).is_ok_and(|md| md.is_dir()) {
                return Err(Other("meta.json without bytes"));
            }
            version_dir
        }
    };
    let path = version_dir.join(&meta.file_name);
    let md = fs::symlink_metadata(&path).map_err(|_| Other("meta.json without bytes"))?;
    if !md.is_file() {
        return Err(Other("the data file is not a regular file (a link?)"));
    }
    if md.len() != meta.size {
        return Err(Changed("data file has the wrong size"));
    }
    if mtime_ns(&md) != meta.mtime_ns {
        return Err(Changed("data file was modified"));
    }
    // Anything else is not this version: older versions (their holders are gone with the
    // process) and leftovers of an interrupted commit.
    let keep_in_entry = if meta.generation.is_empty() {
        meta.file_name.as_str()
    } else {
        meta.generation.as_str()
    };
    remove_all_but(dir, &[META_FILE, keep_in_entry]);
    if !meta.generation.is_empty() {
        remove_all_but(&version_dir, &[meta.file_name.as_str()]);
    }
    Ok(Recovered { key, meta, path })
}

/// Removes everything in `dir` but the items named `keep`.
fn remove_all_but(dir: &Path, keep: &[&str]) {
    if let Ok(items) = fs::read_dir(dir) {
        for item in items.flatten() {
            if !item.file_name().to_str().is_some_and(|n| keep.contains(&n)) {
                remove_any(&item.path());
            }
        }
    }
}
