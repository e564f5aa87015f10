//! The locks that let many processes share one cache directory.
//!
//! Every lock is an `flock` on an open file (std's `File::lock` family): one lock per open
//! file, released by the kernel when the file is closed or its process dies, so that a
//! `kill -9` never leaves a lock behind. `fcntl` locks are never used: they belong to the
//! process and drop when any of its handles on the file closes. Every file here is opened
//! close-on-exec (std's default), so a program the cache runs never inherits a lock.
//!
//! - `v1/lock`: shared by every handle on the directory; exclusive in `CACHE_LOCK=exclusive`.
//! - `v1/locks/<k[0..2]>/<key>.lock`, the writer lock of one URL: held exclusive by whoever
//!   downloads the URL or changes its meta.json. Its content (a [`Record`]) names the part
//!   file being written, so that a process that takes the lock after its holder died can
//!   resume from that file.
//! - The data file of a version, held *shared* by each process that has a pin on it; a
//!   process that wants to delete a version must take it exclusive first (`try_lock`), so a
//!   file another process holds is skipped.
//! - The part file of a download, held exclusive by its writer: a part file whose lock can be
//!   taken belongs to a dead writer.
//!
//! No byte guarantee depends on these locks (on a network file system they may do nothing):
//! unique temp files, atomic renames and meta.json last keep readers safe regardless.

use std::fs::{File, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

use super::Layout;
use crate::key::Key;

/// How a lock attempt went.
#[derive(Debug)]
pub(crate) enum Try {
    /// The lock is ours (or the file system does not lock, which counts as ours: no byte
    /// guarantee depends on it).
    Taken(File),
    /// Someone else holds it.
    Held,
    /// The file is not there.
    Gone,
}

impl Layout {
    /// Opens (creating if needed) a lock file: never through a link, never anything but a
    /// regular file.
    /// A lock file another user of a group-shared cache created may not be writable: `flock`
    /// works on a read-only file too (its record then cannot be written, which only costs a
    /// resume).
    pub(crate) fn open_lock_file(&self, path: &Path) -> io::Result<File> {
        let create = OFlags::RDWR | OFlags::CREATE | OFlags::NONBLOCK;
        let file = match self.open_at(path, create, self.file_mode) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                self.open_at(path, OFlags::RDONLY | OFlags::NONBLOCK, 0)?
            }
            opened => opened?,
        };
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("a lock file that is not a regular file"));
        }
        Ok(file)
    }

    /// Whether `path` still names the open `file` (the same inode): a lock file removed
    /// between its open and its lock is no lock at all.
    fn still_named(&self, file: &File, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), self.dir.identify(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.st_dev && open.ino() == named.st_ino,
            _ => false,
        }
    }

    /// Takes the exclusive lock on an existing file (a data file, a part file) if nobody
    /// holds it. Opened read-only: `flock` does not care about the open mode. A file behind a
    /// link planted on the way is no file of the cache's: `Gone` (so that an entry moved
    /// behind one can still be evicted, which touches nothing behind it).
    pub(crate) fn try_exclusive_at(&self, path: &Path) -> io::Result<Try> {
        match self.open_no_follow(path) {
            Ok(file) => try_exclusive(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound || super::behind_a_link(&e) => {
                Ok(Try::Gone)
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether an error of a lock call means the file system does not do locks.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::ENOLCK | libc_errno::EOPNOTSUPP | libc_errno::ENOSYS)
    )
}

mod libc_errno {
    pub(super) const ENOLCK: i32 = rustix::io::Errno::NOLCK.raw_os_error();
    pub(super) const EOPNOTSUPP: i32 = rustix::io::Errno::OPNOTSUPP.raw_os_error();
    pub(super) const ENOSYS: i32 = rustix::io::Errno::NOSYS.raw_os_error();
}

/// `try_lock` (exclusive) on an open file.
pub(crate) fn try_exclusive(file: File) -> io::Result<Try> {
    match file.try_lock() {
        Ok(()) => Ok(Try::Taken(file)),
        Err(TryLockError::WouldBlock) => Ok(Try::Held),
        Err(TryLockError::Error(e)) if unsupported(&e) => Ok(Try::Taken(file)),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// `try_lock_shared` on an open file.
pub(crate) fn try_shared(file: File) -> io::Result<Try> {
    match file.try_lock_shared() {
        Ok(()) => Ok(Try::Taken(file)),
        Err(TryLockError::WouldBlock) => Ok(Try::Held),
        Err(TryLockError::Error(e)) if unsupported(&e) => Ok(Try::Taken(file)),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// How long a directory-wide lock (`cap.lock`, `state.lock`) is waited for. Each is held for
/// milliseconds; one held longer belongs to a stopped process (`Ctrl-Z`), and the work goes
/// on without it rather than wait for that process forever.
const DIRECTORY_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes `file`'s exclusive lock, polling (blocking) for at most [`DIRECTORY_LOCK_WAIT`];
/// `None`, with a WARN, after that or where locks cannot be had.
pub(crate) fn lock_bounded(file: File, name: &str) -> Option<File> {
    lock_within(file, name, DIRECTORY_LOCK_WAIT)
}

fn lock_within(file: File, name: &str, wait: Duration) -> Option<File> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        match file.try_lock() {
            Ok(()) => return Some(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(_)) => return None,
        }
        if started.elapsed() >= wait {
            tracing::warn!(
                lock = name,
                waited_ms = wait.as_millis() as u64,
                "another process holds a lock of the cache directory; going on without it"
            );
            return None;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(POLL_MAX);
    }
}

/// The longest pause between two attempts at a URL's writer lock. A waiter in another process
/// sees the commit this long after it at most (plus jitter): at 100 ms, 4 processes on one cold
/// 200 MB URL took 1.3x as long as one (`cargo bench --bench processes`).
const POLL_MAX: Duration = Duration::from_millis(20);

/// What the holder of a URL's writer lock writes into it: the part file it is downloading
/// into, the validators that bind it to one version of the file, and how much of it is on
/// disk for sure (fsynced). Whoever takes the lock after the holder died resumes from there.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Record {
    /// The part file's name in the temp directory.
    pub(crate) part: String,
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
    /// The file's full length, if the origin said.
    pub(crate) total: Option<u64>,
    /// Bytes of the part file known to be durable.
    pub(crate) durable: u64,
}

/// The exclusive writer lock of one URL, released when dropped.
#[derive(Debug)]
pub(crate) struct KeyLock {
    file: File,
}

impl KeyLock {
    /// The record the previous holder left, if it parses.
    pub(crate) fn record(&mut self) -> Option<Record> {
        let mut raw = Vec::new();
        self.file.rewind().ok()?;
        (&self.file).take(64 * 1024).read_to_end(&mut raw).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// Replaces the record (not atomic: a torn record does not parse, and nobody resumes
    /// from it).
    pub(crate) fn write_record(&mut self, record: &Record) {
        let json = serde_json::to_vec(record).expect("a record always serialises");
        let written = (|| {
            self.file.set_len(0)?;
            self.file.rewind()?;
            self.file.write_all(&json)
        })();
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot write a lock record");
        }
    }

    /// Forgets the record: nothing is left to resume.
    pub(crate) fn clear_record(&mut self) {
        let _ = self.file.set_len(0);
    }
}

impl Layout {
    pub(crate) fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    fn key_lock_path(&self, key: &Key) -> PathBuf {
        self.locks_dir()
            .join(key.prefix())
            .join(format!("{}.lock", key.as_str()))
    }

    fn open_key_lock(&self, key: &Key) -> io::Result<File> {
        let path = self.key_lock_path(key);
        match self.open_lock_file(&path) {
            // No fan-out directory yet, or something in place of one (a link).
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || matches!(e.raw_os_error(), Some(super::ELOOP | super::ENOTDIR)) =>
            {
                self.create_dir_all(path.parent().unwrap_or(&path))?;
                self.open_lock_file(&path)
            }
            opened => opened,
        }
    }

    /// Takes the directory's cap lock, which reservations are made under (blocking; held
    /// for a scan of the directory). `None` where locks cannot be had.
    pub(crate) fn lock_cap(&self) -> Option<File> {
        let file = self
            .open_lock_file(&self.locks_dir().join("cap.lock"))
            .ok()?;
        lock_bounded(file, "cap.lock")
    }

    /// Takes the writer lock of `key` if it is free (blocking, a few syscalls).
    pub(crate) fn try_lock_key(&self, key: &Key) -> io::Result<Option<KeyLock>> {
        let path = self.key_lock_path(key);
        // A lock file removed between the open and the lock (see `remove_idle_locks`) is
        // opened again, a bounded number of times.
        for _ in 0..4 {
            match try_exclusive(self.open_key_lock(key)?)? {
                Try::Taken(file) if self.still_named(&file, &path) => {
                    return Ok(Some(KeyLock { file }));
                }
                Try::Taken(_) => continue,
                Try::Held | Try::Gone => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Removes the lock files of URLs that `keep` does not name, that nobody holds, and
    /// whose record leaves nothing to resume from (no part file of theirs on disk): every
    /// URL ever fetched leaves one, and without this they would grow without bound (blocking;
    /// a directory scan and a `flock` per candidate). How many went.
    pub(crate) fn remove_idle_locks(&self, keep: impl Fn(&Key) -> bool) -> usize {
        let mut removed = 0;
        let Ok(prefixes) = self.read_dir(&self.locks_dir()) else {
            return 0;
        };
        for prefix in prefixes {
            // Real directories only, never through a link.
            if !prefix.is_dir() {
                continue;
            }
            let Ok(items) = self.read_dir(prefix.path()) else {
                continue;
            };
            for item in items {
                let name = item.file_name();
                let Some(key) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".lock"))
                    .and_then(Key::parse)
                else {
                    continue;
                };
                if keep(&key) || !item.is_file() {
                    continue;
                }
                let path = item.path();
                // Only under a lock really taken: where the file system has no locks, a live
                // download's lock file looks free.
                let Ok(file) = self.open_no_follow(path) else {
                    continue;
                };
                if file.try_lock().is_err() {
                    continue;
                }
                let mut lock = KeyLock { file };
                let resumable = lock.record().is_some_and(|r| {
                    r.part.starts_with(&format!("{}.", key.as_str()))
                        && !r.part.contains('/')
                        && self.lstat(&self.temp_dir().join(&r.part)).is_ok()
                });
                // Removed under its lock: whoever opened it meanwhile finds, once it has the
                // lock, that the name is no longer its file, and opens the new one.
                if !resumable
                    && self.still_named(&lock.file, path)
                    && self.remove_file(path).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Waits for the writer lock of `key`, polling with backoff (no thread is parked), for at
    /// most `wait`. `None` after the bound. Cancel safe: dropping the future drops the
    /// attempt.
    pub(crate) async fn lock_key(&self, key: &Key, wait: Duration) -> io::Result<Option<KeyLock>> {
        let file = {
            let layout = self.clone();
            let key = key.clone();
            tokio::task::spawn_blocking(move || layout.open_key_lock(&key))
                .await
                .map_err(io::Error::other)??
        };
        let path = self.key_lock_path(key);
        let (mut file, mut reopened) = (file, 0);
        let started = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            match file.try_lock() {
                Ok(()) if self.still_named(&file, &path) => return Ok(Some(KeyLock { file })),
                // Removed under this process again and again: it downloads without the lock
                // rather than hold one nobody else can see.
                Ok(()) if reopened >= 4 => return Ok(None),
                Ok(()) => {
                    reopened += 1;
                    // Removed as idle between the open and the lock: the name has a new file
                    // (or none), which is the lock now.
                    let layout = self.clone();
                    let key = key.clone();
                    file = tokio::task::spawn_blocking(move || layout.open_key_lock(&key))
                        .await
                        .map_err(io::Error::other)??;
                    continue;
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) if unsupported(&e) => {
                    return Ok(Some(KeyLock { file }));
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            // Jittered, so that waiters do not poll in step; at most `POLL_MAX` and half again,
            // so that a waiter learns of a commit, or replaces a dead holder, within 30 ms of
            // the lock's release (one `flock` per poll: 50 a second cost nothing).
            let jitter = Duration::from_micros(fastrand::u64(..=delay.as_micros() as u64 / 2));
            tokio::time::sleep((delay + jitter).min(left)).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_lock_held_for_ever_is_waited_for_a_bounded_time() {
        let (_dir, layout) = crate::store::testing::disk();
        let path = layout.root.join("cap.lock");
        let open = || layout.open_lock_file(&path).unwrap();
        let holder = open();
        holder.lock().unwrap();
        let started = Instant::now();
        assert!(lock_within(open(), "cap.lock", Duration::from_millis(50)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(holder);
        let taken = lock_within(open(), "cap.lock", Duration::from_millis(50));
        assert!(taken.is_some(), "free: taken at once");
    }
}

/// Property tests of a URL lock's record, which a successor resumes from: any bytes in the
/// lock file, no panic.
#[cfg(test)]
mod outside_input {
    use proptest::prelude::*;

    use crate::store::testing::{disk, key};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_lock_record_is_read_or_ignored(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_dir, layout) = disk();
            let k = key(3);
            let mut lock = layout.try_lock_key(&k).unwrap().unwrap();
            std::fs::write(layout.key_lock_path(&k), &bytes).unwrap();
            if let Some(record) = lock.record() {
                prop_assert!(record.part.len() <= bytes.len());
            }
        }
    }
}
