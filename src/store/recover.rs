//! Start-up recovery: which entries on disk are valid, and the removal of everything else.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime};

use super::locks::Try;
use super::{Layout, META_LIMIT, Meta, Stamp, mtime_ns};
use crate::error::{Error, Result};
use crate::key::{Key, META_FILE};

/// One entry found valid on disk by recovery.
#[derive(Debug, Clone)]
pub(crate) struct Recovered {
    pub(crate) key: Key,
    pub(crate) meta: Meta,
    pub(crate) path: PathBuf,
    /// Of its meta.json.
    pub(crate) stamp: Stamp,
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
        layout
            .read_dir(dir)
            .map_err(|e| Error::io("cannot read the cache directory", e).with_path(dir))
    };
    read_dir(&layout.tmp)?;
    report.removed += tidy_temp(layout);
    let mut prefixes = Vec::new();
    for prefix in read_dir(&layout.entries)? {
        let prefix_path = prefix.path().to_owned();
        let name = prefix.file_name();
        let valid_prefix = name.len() == 2
            && name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_hexdigit()))
            // The entry's own type: a link to a directory is not one of ours.
            && prefix.is_dir();
        if !valid_prefix {
            tracing::warn!(path = %prefix_path.display(), "removing a stray item from the cache directory");
            layout.remove_any(&prefix_path);
            report.removed += 1;
            continue;
        }
        prefixes.push((prefix_path, name.to_string_lossy().into_owned()));
    }
    // The fan-out directories are independent: a few threads go through them at once (the
    // work is syscalls, each entry's own), 1.7 times as fast on two cores for 10,000 entries.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(prefixes.len().max(1));
    let chunk = prefixes.len().div_ceil(threads).max(1);
    let parts: Vec<Result<RecoveryReport>> = std::thread::scope(|scope| {
        let workers: Vec<_> = prefixes
            .chunks(chunk)
            .map(|mine| {
                let work = move || -> Result<RecoveryReport> {
                    let mut part = RecoveryReport::default();
                    for (path, name) in mine {
                        recover_prefix(layout, path, name, &mut part)?;
                    }
                    Ok(part)
                };
                // No thread to be had (a pids limit): this one does the work.
                std::thread::Builder::new()
                    .spawn_scoped(scope, work)
                    .map_err(|_| work())
            })
            .collect();
        workers
            .into_iter()
            .map(|w| match w {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e)),
                Err(done) => done,
            })
            .collect()
    });
    for part in parts {
        let part = part?;
        report.entries.extend(part.entries);
        report.removed += part.removed;
        report.integrity_failures += part.integrity_failures;
    }
    Ok(report)
}

/// Recovers the entries of one fan-out directory into `report`.
fn recover_prefix(
    layout: &Layout,
    prefix_path: &Path,
    prefix: &str,
    report: &mut RecoveryReport,
) -> Result<()> {
    let items = layout
        .read_dir(prefix_path)
        .map_err(|e| Error::io("cannot read the cache directory", e).with_path(prefix_path))?;
    for entry in items {
        let dir = entry.path();
        let found = if entry.is_dir() {
            recover_entry(layout, dir, entry.file_name().to_str(), prefix)
        } else {
            layout.remove_any(dir);
            Err(Invalid::Other("not a directory"))
        };
        match found {
            Ok(found) => report.entries.push(found),
            // Perhaps a commit in progress in another process: left for a later start.
            Err(Invalid::Busy) => {}
            Err(why) => {
                tracing::warn!(path = %dir.display(), reason = why.reason(), "removing an invalid cache entry");
                report.removed += 1;
                if matches!(why, Invalid::Changed(_)) {
                    report.integrity_failures += 1;
                }
            }
        }
    }
    // Empty fan-out directories are left: they cost nothing and will be reused.
    Ok(())
}

/// Removes the temp files nobody will use (see [`remove_unused_temp`]); returns how many. Run
/// at start and by every sweep: a process killed mid-write leaves a temp file that only
/// another process can remove.
pub(crate) fn tidy_temp(layout: &Layout) -> usize {
    let Ok(items) = layout.read_dir(&layout.tmp) else {
        return 0;
    };
    let mut removed = 0;
    for item in items {
        if let Some(why) = remove_unused_temp(layout, item.path()) {
            tracing::warn!(path = %item.path().display(), reason = why, "removed a temp file left by a process that died");
            removed += 1;
        }
    }
    removed
}

/// Why recovery removed an entry directory.
#[derive(Debug, Clone, Copy)]
pub(super) enum Invalid {
    /// The data file is not what meta.json recorded: an integrity failure.
    Changed(&'static str),
    /// Anything else: an interrupted commit, a stray or planted item.
    Other(&'static str),
    /// Not a valid entry, but another process may be committing it or holds its bytes.
    Busy,
}

impl Invalid {
    fn reason(self) -> &'static str {
        match self {
            Invalid::Changed(why) | Invalid::Other(why) => why,
            Invalid::Busy => "in use by another process",
        }
    }
}

/// How old a temp file or a half-committed entry must be before a process that cannot tell
/// whether its writer lives removes it. Commits take milliseconds.
const SETTLED: Duration = Duration::from_secs(60);

/// How long the part file of a dead download is kept for a later download of its URL to
/// resume from.
const KEEP_DEAD_PARTS: Duration = Duration::from_secs(3600);

fn age(layout: &Layout, path: &Path) -> Duration {
    layout
        .lstat(path)
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

/// The pid in a temp file's name (`<prefix>.<pid>-<n>-<salt>.<ext>`, see `unique_temp`).
fn writer_pid(name: &str) -> Option<i32> {
    let middle = name.split('.').nth(1)?;
    middle.split('-').next()?.parse().ok()
}

/// Whether the process with this pid is alive (a reused pid counts as alive: nothing is
/// removed that might be in use).
fn alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok_or_eperm())
}

trait OkOrEperm {
    fn is_ok_or_eperm(&self) -> bool;
}

impl OkOrEperm for rustix::io::Result<()> {
    fn is_ok_or_eperm(&self) -> bool {
        matches!(self, Ok(()) | Err(rustix::io::Errno::PERM))
    }
}

/// Removes a temp file unless it may still be in use or of use, and says why it went: kept
/// are a part file whose writer holds its lock, a dead download's part file that its URL's
/// lock record names as resumable (for up to [`KEEP_DEAD_PARTS`]), and anything else a live
/// process wrote less than [`SETTLED`] ago. A dead part file is removed while its lock is
/// taken, so that no successor can take it up in between.
pub(crate) fn remove_unused_temp(layout: &Layout, path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str().unwrap_or_default();
    if path.extension().is_some_and(|e| e == "part") {
        let lock = match layout.try_exclusive_at(path) {
            Ok(Try::Held | Try::Gone) => return None,
            Ok(Try::Taken(lock)) => Some(lock),
            Err(_) if age(layout, path) >= SETTLED => None,
            Err(_) => return None,
        };
        // Its URL's lock taken (and kept until the part is gone), or it is left: the lock's
        // holder may be a successor about to take the part up.
        let key = name.split('.').next().and_then(Key::parse);
        let mut key_lock = match key.map(|key| layout.try_lock_key(&key)) {
            Some(Ok(None)) => return None,
            Some(Ok(Some(lock))) => Some(lock),
            Some(Err(_)) | None => None,
        };
        let resumable = key_lock
            .as_mut()
            .and_then(|lock| lock.record())
            .is_some_and(|record| record.part == name && record.durable > 0);
        if lock.is_some() && resumable && age(layout, path) < KEEP_DEAD_PARTS {
            return None;
        }
        let why = match lock {
            Some(_) => "a download that died",
            None => "an unreadable part file",
        };
        layout.remove_any(path);
        drop(lock);
        drop(key_lock);
        return Some(why);
    }
    if path.extension().is_some_and(|e| e == "nostore") {
        // An answer not to be stored, handed out: its one file is locked shared by the
        // process that holds it, which removes it when it lets go.
        let items = layout.read_dir(path).unwrap_or_default();
        let held = items.iter().any(|item| {
            !matches!(
                layout.try_exclusive_at(item.path()),
                Ok(Try::Taken(_) | Try::Gone)
            )
        }) || (items.is_empty() && writer_pid(name).is_some_and(alive));
        if held {
            return None;
        }
        layout.remove_any(path);
        return Some("an answer not to be stored, let go by a process that died");
    }
    match writer_pid(name) {
        Some(pid) if alive(pid) && age(layout, path) < SETTLED => None,
        _ => {
            layout.remove_any(path);
            Some("left by an interrupted write")
        }
    }
}

/// Checks one entry directory and removes what no meta.json names, unless another process
/// may be using it: an entry is only removed or tidied while its writer lock is free (or,
/// when the lock cannot be opened at all, once it is older than [`SETTLED`]), and a version
/// only while no process holds its bytes. An invalid entry (no meta.json, say, because
/// another process invalidated it while a third holds its bytes) loses every item nobody
/// holds; its directory goes once nothing is left in it.
fn recover_entry(
    layout: &Layout,
    dir: &Path,
    name: Option<&str>,
    prefix: &str,
) -> Result<Recovered, Invalid> {
    let Some(key) = name.and_then(Key::parse) else {
        layout.remove_any(dir);
        return Err(Invalid::Other("not a cache key"));
    };
    if key.prefix() != prefix {
        layout.remove_any(dir);
        return Err(Invalid::Other("key in the wrong directory"));
    }
    let found = read_entry(layout, dir, key.clone());
    // The common case, a valid entry and nothing else in its directory, needs no lock.
    let tidy = found.as_ref().is_ok_and(|found| {
        only(layout, dir, &[META_FILE, keep_in_entry(&found.meta)])
            && (found.meta.generation.is_empty()
                || only(
                    layout,
                    &dir.join(&found.meta.generation),
                    &[found.meta.file_name.as_str()],
                ))
    });
    if tidy {
        return found;
    }
    // Held by a live process, its writer may be committing right now: nothing is touched.
    let (lock, settled) = match layout.try_lock_key(&key) {
        Ok(Some(lock)) => (Some(lock), true),
        Ok(None) => (None, false),
        Err(_) => (None, age(layout, dir) >= SETTLED),
    };
    let found = match found {
        Ok(found) => found,
        Err(_) if !settled => return Err(Invalid::Busy),
        Err(why) => {
            // Under the writer lock, so that no commit lands in the directory meanwhile.
            if remove_unheld_but(layout, dir, &[]) {
                let _ = layout.remove_dir(dir);
            }
            drop(lock);
            return Err(why);
        }
    };
    if settled {
        // Anything else is not this version: older versions whose holders are gone, and
        // leftovers of an interrupted commit.
        let meta = &found.meta;
        remove_unheld_but(layout, dir, &[META_FILE, keep_in_entry(meta)]);
        if !meta.generation.is_empty() {
            remove_all_but(
                layout,
                &dir.join(&meta.generation),
                &[meta.file_name.as_str()],
            );
        }
    }
    drop(lock);
    Ok(found)
}

/// What an entry directory keeps beside meta.json: the version's directory, or (written
/// before versions had directories) its data file.
fn keep_in_entry(meta: &Meta) -> &str {
    if meta.generation.is_empty() {
        meta.file_name.as_str()
    } else {
        meta.generation.as_str()
    }
}

/// Whether `dir` holds exactly the items named `names`.
fn only(layout: &Layout, dir: &Path, names: &[&str]) -> bool {
    layout.read_dir(dir).is_ok_and(|items| {
        items.len() == names.len()
            && items.iter().all(|item| {
                item.file_name()
                    .to_str()
                    .is_some_and(|name| names.contains(&name))
            })
    })
}

/// Reads and checks one entry directory (no removal): meta.json parses, is valid and
/// matches its data file.
pub(super) fn read_entry(layout: &Layout, dir: &Path, key: Key) -> Result<Recovered, Invalid> {
    use Invalid::{Changed, Other};
    let (raw, stamp) = match read_meta_file(layout, &dir.join(META_FILE)) {
        Ok(read) => read,
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
            if !layout.lstat(&version_dir).is_ok_and(|md| md.is_dir()) {
                return Err(Other("meta.json without bytes"));
            }
            version_dir
        }
    };
    let path = version_dir.join(&meta.file_name);
    let md = layout
        .lstat(&path)
        .map_err(|_| Other("meta.json without bytes"))?;
    if !md.is_file() {
        return Err(Other("the data file is not a regular file (a link?)"));
    }
    if md.len() != meta.size {
        return Err(Changed("data file has the wrong size"));
    }
    if mtime_ns(&md) != meta.mtime_ns {
        return Err(Changed("data file was modified"));
    }
    Ok(Recovered {
        key,
        meta,
        path,
        stamp,
    })
}

/// A meta.json's bytes and stamp: never through a link, never anything but a small regular
/// file (see [`Layout::read_no_follow`]).
fn read_meta_file(layout: &Layout, path: &Path) -> io::Result<(Vec<u8>, Stamp)> {
    let file = layout.open_no_follow(path)?;
    let md = file.metadata()?;
    if !md.is_file() || md.len() > META_LIMIT {
        return Err(io::Error::other("not a small regular file"));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    io::Read::read_to_end(&mut io::Read::take(file, META_LIMIT), &mut bytes)?;
    Ok((bytes, Stamp::of(&md)))
}

/// In an entry directory, removes every item but `keep` whose bytes no process holds: a
/// version directory, or a data file written before versions had directories. Each is
/// removed while its files' exclusive locks are taken, so that no process can take hold of
/// one between the check and the removal. Returns whether nothing was left but `keep`.
fn remove_unheld_but(layout: &Layout, dir: &Path, keep: &[&str]) -> bool {
    let Ok(items) = layout.read_dir(dir) else {
        return false;
    };
    let mut all = true;
    for item in items {
        let name = item.file_name();
        if name.to_str().is_some_and(|n| keep.contains(&n)) {
            continue;
        }
        let path = item.path();
        match claim_all(layout, path) {
            Some(claims) => {
                layout.remove_any(path);
                drop(claims);
            }
            None => all = false,
        }
    }
    all
}

/// The exclusive locks of `path` (a file) or of every regular file in it (a directory), or
/// `None` when a process may hold one of them (it is held, or cannot be opened to tell).
/// Links and other non-files are nobody's to hold.
fn claim_all(layout: &Layout, path: &Path) -> Option<Vec<fs::File>> {
    let files: Vec<PathBuf> = match layout.lstat(path) {
        Ok(md) if md.is_dir() => layout
            .read_dir(path)
            .map(|items| {
                items
                    .into_iter()
                    .filter(|f| f.is_file())
                    .map(|f| f.path().to_owned())
                    .collect()
            })
            .unwrap_or_default(),
        Ok(md) if md.is_file() => vec![path.to_owned()],
        _ => Vec::new(),
    };
    let mut claims = Vec::with_capacity(files.len());
    for file in files {
        match layout.try_exclusive_at(&file) {
            Ok(Try::Taken(file)) => claims.push(file),
            Ok(Try::Held) | Err(_) => return None,
            Ok(Try::Gone) => {}
        }
    }
    Some(claims)
}

/// Removes everything in `dir` but the items named `keep`.
fn remove_all_but(layout: &Layout, dir: &Path, keep: &[&str]) {
    if let Ok(items) = layout.read_dir(dir) {
        for item in items {
            if !item.file_name().to_str().is_some_and(|n| keep.contains(&n)) {
                layout.remove_any(item.path());
            }
        }
    }
}

/// What a scan of the entries found: every key with a meta.json, and the entries that are
/// new or whose meta.json changed since the stamps given, read and checked.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) present: std::collections::HashSet<Key>,
    pub(crate) changed: Vec<Recovered>,
}

/// Looks at every entry on disk without removing anything (blocking): one `lstat` of each
/// meta.json, and a read only of those that are new or changed. How a process learns what
/// the others committed and removed.
pub(crate) fn scan(layout: &Layout, known: &std::collections::HashMap<Key, Stamp>) -> Scan {
    let mut scan = Scan::default();
    let Ok(prefixes) = layout.read_dir(&layout.entries) else {
        return scan;
    };
    for prefix in prefixes {
        if !prefix.is_dir() {
            continue;
        }
        let Ok(entries) = layout.read_dir(prefix.path()) else {
            continue;
        };
        for entry in entries {
            let Some(key) = entry.file_name().to_str().and_then(Key::parse) else {
                continue;
            };
            if prefix.file_name().to_str() != Some(key.prefix()) {
                continue;
            }
            let dir = entry.path();
            // One `fstatat` (see `Beneath::identify`): compared, then read strictly if new.
            let Some(stamp) = layout.meta_stamp(&key) else {
                continue;
            };
            if known.get(&key) == Some(&stamp) {
                scan.present.insert(key);
                continue;
            }
            if let Ok(found) = read_entry(layout, dir, key.clone()) {
                scan.present.insert(key);
                scan.changed.push(found);
            }
        }
    }
    scan
}

/// Property tests of what the cache reads back from its directory, which anyone with access
/// may have written: a meta.json of any bytes, or one valid entry's meta.json with any one
/// field changed, is refused or read as written, never a panic.
#[cfg(test)]
mod outside_input {
    use proptest::prelude::*;

    use super::read_entry;
    use crate::store::testing::{disk, key, put};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_meta_json_is_refused_or_read(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let (_dir, layout) = disk();
            let k = key(1);
            put(&layout, &k, b"abc", u64::MAX / 2);
            std::fs::write(layout.meta_path(&k), &bytes).unwrap();
            if let Ok(found) = read_entry(&layout, &layout.entry_dir(&k), k) {
                prop_assert_eq!(found.meta.size, 3, "a meta.json read must name the bytes there");
            }
        }

        #[test]
        fn a_changed_field_is_refused_or_still_names_the_bytes(field in 0usize..11, value in "\\PC{0,70}|[0-9]{1,25}") {
            let (_dir, layout) = disk();
            let k = key(2);
            put(&layout, &k, b"abcdef", u64::MAX / 2);
            let path = layout.meta_path(&k);
            let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let name = ["version", "url", "file_name", "sha256", "size", "mtime_ns", "etag", "last_modified", "fetched_at", "expires_at", "generation"][field];
            json[name] = value.parse::<u64>().map_or_else(|_| serde_json::Value::from(value.clone()), serde_json::Value::from);
            std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
            if let Ok(found) = read_entry(&layout, &layout.entry_dir(&k), k) {
                prop_assert_eq!(std::fs::read(&found.path).unwrap(), b"abcdef".to_vec());
                prop_assert!(found.path.starts_with(layout.entry_dir(&found.key)));
            }
        }
    }
}
