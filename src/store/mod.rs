//! The disk: layout, meta.json, the streaming temp writer, and start-up recovery.
//!
//! ```text
//! <cache_dir>/v1/entries/<k[0..2]>/<key>/<gen>/<file name>   the bytes of one version
//! <cache_dir>/v1/entries/<k[0..2]>/<key>/meta.json           names the current version
//! <cache_dir>/v1/tmp/<key>.<unique>.part                     downloads in progress (and .meta, .trash)
//! <cache_dir>/v1/state.json                                  access times and counters
//! <cache_dir>/v1/lock                                        shared by every process using the directory
//! <cache_dir>/v1/locks/<k[0..2]>/<key>.lock                  the writer lock of one URL (see `locks`)
//! <cache_dir>/v1/procs/<pid>-<start>.json                    each live process's counters and reservations
//! ```
//!
//! Every write is all or nothing: bytes go to a uniquely named temp file that is removed if the
//! writer is dropped before commit; a committed version's data is renamed into its own
//! directory before meta.json is renamed over the old one, so a crash leaves at worst a
//! version that no meta.json names, which recovery removes, and the bytes of a version a
//! caller holds are never touched by a newer one.

use std::fs::{self, DirBuilder, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::failpoint::{failpoint, failpoint_error};
use crate::key::{Key, META_FILE};

const FORMAT: &str = "v1";
const WRITE_BUFFER: usize = 1 << 20;

/// Paths inside the cache directory, and the modes new files and directories get. Every
/// path below `v1` is reached through [`Beneath`]: never through a link.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
    dir: Arc<Beneath>,
    entries: PathBuf,
    tmp: PathBuf,
    file_mode: u32,
    dir_mode: u32,
}

/// What meta.json holds for one entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Format version of this record.
    pub(crate) version: u32,
    /// The normalised URL without credentials.
    pub(crate) url: String,
    /// Name of the data file in the entry directory.
    pub(crate) file_name: String,
    /// Hex SHA-256 of the bytes.
    pub(crate) sha256: String,
    /// Length of the bytes.
    pub(crate) size: u64,
    /// Modification time of the data file, nanoseconds since the epoch: the cheap check.
    pub(crate) mtime_ns: u64,
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
    /// Milliseconds since the epoch.
    pub(crate) fetched_at: u64,
    /// Milliseconds since the epoch.
    pub(crate) expires_at: u64,
    /// The directory of this version below the entry's, so that a new version never touches
    /// the bytes of an old one that a caller holds. Empty for entries written before versions
    /// had directories (their bytes are beside meta.json).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) generation: String,
}

/// What the origin said about the version of the bytes: recorded in meta.json, sent back in
/// a conditional GET (revalidation) and in `If-Range` (resume).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Validators {
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
}

impl Validators {
    /// The value for `If-Range`: a strong ETag, else Last-Modified (RFC 9110 13.1.5: a weak
    /// ETag cannot be used).
    pub(crate) fn if_range(&self) -> Option<&str> {
        match &self.etag {
            Some(etag) if !etag.starts_with("W/") => Some(etag),
            _ => self.last_modified.as_deref(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

impl Layout {
    pub(crate) fn new(cache_dir: &Path, file_mode: u32, dir_mode: u32) -> Layout {
        let root = cache_dir.join(FORMAT);
        Layout {
            entries: root.join("entries"),
            tmp: root.join("tmp"),
            dir: Arc::new(Beneath::new(root.clone(), dir_mode)),
            root,
            file_mode,
            dir_mode,
        }
    }

    pub(crate) fn entry_dir(&self, key: &Key) -> PathBuf {
        self.entries.join(key.prefix()).join(key.as_str())
    }

    /// Where the bytes of `meta`'s version of entry `key` are: in the version's own
    /// directory, or (entries written before versions had directories) beside meta.json.
    pub(crate) fn data_path(&self, key: &Key, meta: &Meta) -> PathBuf {
        match meta.generation.as_str() {
            "" => self.entry_dir(key).join(&meta.file_name),
            generation => self.entry_dir(key).join(generation).join(&meta.file_name),
        }
    }

    /// A new version's directory name: unique among the versions of one key.
    pub(crate) fn new_generation() -> String {
        format!("g{:016x}", fastrand::u64(..))
    }

    pub(crate) fn meta_path(&self, key: &Key) -> PathBuf {
        self.entry_dir(key).join(META_FILE)
    }

    pub(crate) fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    pub(crate) fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// A fresh, unique path in the temp directory.
    pub(crate) fn temp_path(&self, key: &Key, ext: &str) -> PathBuf {
        self.unique_temp(key.as_str(), ext)
    }

    pub(crate) fn unique_temp(&self, prefix: &str, ext: &str) -> PathBuf {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let salt = fastrand::u32(..);
        self.tmp.join(format!(
            "{prefix}.{}-{n}-{salt:08x}.{ext}",
            std::process::id()
        ))
    }

    /// Writes `bytes` to a new temp file named after `prefix` and fsyncs it; the file is
    /// removed if it is dropped before being persisted.
    pub(crate) fn write_temp(&self, prefix: &str, ext: &str, bytes: &[u8]) -> io::Result<TempFile> {
        let temp = self.temp_file(self.unique_temp(prefix, ext));
        let mut f = self.create_new_file(temp.path())?;
        f.write_all(bytes)?;
        f.sync_data()?;
        Ok(temp)
    }

    /// A temp file at `path` (in the temp directory), removed when dropped unless persisted.
    pub(crate) fn temp_file(&self, path: PathBuf) -> TempFile {
        TempFile::new(path, Arc::clone(&self.dir))
    }

    /// Makes directory `dir` below `v1` and those above it, replacing whatever stands in
    /// place of one (see [`Beneath::create_dir_all`]).
    pub(crate) fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        if dir == self.root {
            // `v1` itself: what lies above it may be a link (see `open`).
            return DirBuilder::new()
                .recursive(true)
                .mode(self.dir_mode)
                .create(dir);
        }
        self.dir.create_dir_all(dir)
    }

    /// Creates a new file (readable too: the readers of a download in progress read its part
    /// file). A directory on its way that is gone, or that something stands in place of (a
    /// link planted at run time), is made again first.
    pub(crate) fn create_new_file(&self, path: &Path) -> io::Result<File> {
        match self.dir.create_new(path, self.file_mode) {
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || matches!(e.raw_os_error(), Some(ELOOP | ENOTDIR)) =>
            {
                self.create_dir_all(path.parent().unwrap_or(path))?;
                self.dir.create_new(path, self.file_mode)
            }
            created => created,
        }
    }

    /// Writes `bytes` to `path` atomically: temp file, fsync, rename.
    pub(crate) fn write_atomic(&self, path: &Path, prefix: &str, bytes: &[u8]) -> io::Result<()> {
        self.write_temp(prefix, "new", bytes)?.persist(path)
    }

    /// Creates the directories, checks that nothing in them leads out of the cache, and takes
    /// the directory lock: shared, so that any number of processes and handles use the
    /// directory at once, or exclusive (`CACHE_LOCK=exclusive`), so that one has it alone.
    ///
    /// The configured directory itself may be a symbolic link (users point `~/.cache` at a
    /// bigger disk); below it nothing is followed. `v1` must be a real directory owned by this
    /// user, or, when the file mode shares the cache with a group, one of this process's
    /// groups that others cannot write. `entries`, `tmp`, `locks` and `procs` planted as links
    /// are removed as links and made again.
    pub(crate) fn open(&self, exclusive: bool) -> Result<File> {
        self.create_dir_all(&self.root)
            .map_err(|e| Error::io("cannot create the cache directory", e).with_path(&self.root))?;
        self.check_root()?;
        for dir in [
            &self.entries,
            &self.tmp,
            &self.locks_dir(),
            &self.procs_dir(),
        ] {
            if self.lstat(dir).is_ok_and(|md| !md.is_dir()) {
                tracing::warn!(path = %dir.display(), "removing what stands in place of a cache directory (a link or a file)");
                self.remove_any(dir);
            }
            self.create_dir_all(dir)
                .map_err(|e| Error::io("cannot create the cache directory", e).with_path(dir))?;
        }
        let lock_path = self.root.join("lock");
        let lock = self
            .open_lock_file(&lock_path)
            .map_err(|e| Error::io("cannot open the lock file", e).with_path(&lock_path))?;
        let taken = if exclusive {
            locks::try_exclusive(lock)
        } else {
            locks::try_shared(lock)
        };
        match taken {
            Ok(locks::Try::Taken(lock)) => Ok(lock),
            Ok(_) => Err(Error::new(
                ErrorKind::Locked,
                if exclusive {
                    "another process is using this cache directory (CACHE_LOCK=exclusive asks for it alone)"
                } else {
                    "another process holds this cache directory alone (CACHE_LOCK=exclusive)"
                },
            )
            .with_path(&self.root)),
            Err(e) => Err(Error::io("cannot lock the cache directory", e).with_path(&lock_path)),
        }
    }

    /// The kind of network file system the cache directory is on, if it is on one: there,
    /// locks may do nothing (every byte guarantee still holds; a file may be downloaded twice).
    // `f_type`'s type differs between targets.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn network_file_system(&self) -> Option<&'static str> {
        let f_type = self.dir.statfs().ok()?.f_type as i64 as u32;
        Some(match f_type {
            0x6969 => "NFS",
            0xFF53_4D42 | 0xFE53_4D42 | 0x517B => "CIFS/SMB",
            0x0BD0_0BD0 => "Lustre",
            0x4750_4653 => "GPFS",
            0x6573_5546 => "FUSE",
            0x0102_1997 => "9P",
            0x00C3_6400 => "CephFS",
            0x0116_1970 => "GFS2",
            _ => return None,
        })
    }

    /// Says, once, with an ERROR, when `v1` by its path is no longer the directory this
    /// process holds (see [`Beneath::replaced`]); the sweeper asks. Returns whether it was.
    pub(crate) fn warn_if_replaced(&self) -> bool {
        if !self.dir.replaced() {
            return false;
        }
        if !self.dir.warned.swap(true, Ordering::Relaxed) {
            tracing::error!(
                path = %self.root.display(),
                "the cache directory was removed or replaced while this process uses it: it \
                 goes on in the one it opened, which other processes no longer see; restart it \
                 (empty a cache with `clear` instead)"
            );
        }
        true
    }

    pub(crate) fn procs_dir(&self) -> PathBuf {
        self.root.join("procs")
    }
}

impl Layout {
    /// Refuses a `v1` that is a link, or that another user could have planted (see `open`).
    fn check_root(&self) -> Result<()> {
        let refuse = |why: &str| {
            Err(Error::new(
                ErrorKind::Config,
                format!("refusing the cache directory: {why}"),
            )
            .with_path(&self.root))
        };
        let md = fs::symlink_metadata(&self.root)
            .map_err(|e| Error::io("cannot read the cache directory", e).with_path(&self.root))?;
        if md.file_type().is_symlink() {
            return refuse("it is a symbolic link, which the cache never follows");
        }
        if !md.is_dir() {
            return refuse("it is not a directory");
        }
        // From here on every path below it is reached through this descriptor: it must be the
        // directory just checked.
        let pinned = self
            .dir
            .pin()
            .map_err(|e| Error::io("cannot open the cache directory", e).with_path(&self.root))?;
        if (pinned.dev(), pinned.ino()) != (md.dev(), md.ino()) {
            return refuse("it was replaced while it was being opened");
        }
        if md.uid() == rustix::process::geteuid().as_raw() {
            return Ok(());
        }
        let shared_with_group = self.file_mode & 0o070 != 0;
        let ours = rustix::process::getegid().as_raw() == md.gid()
            || rustix::process::getgroups()
                .is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == md.gid()));
        if shared_with_group && ours && md.mode() & 0o002 == 0 {
            return Ok(());
        }
        refuse(&format!(
            "it belongs to user {} (a cache shared with a group needs a group file mode such as \
             640, a directory of one of this process's groups, and no write permission for others)",
            md.uid()
        ))
    }
}

/// Installing and taking away committed entries. The index calls these while it holds its
/// lock, so that the map and the directory change together: each is a few metadata syscalls
/// (mkdir, rename, unlink); deleting a removed file's bytes happens later, from its trash name.
impl Layout {
    /// Installs a verified download as the current version of entry `key`: `data` renamed
    /// to `data_path` in the version's own directory, then `meta` renamed over meta.json,
    /// which replaces the previous version's meta.json in one step. At no instant does a
    /// meta.json describe bytes other than its own, and an older version's bytes are never
    /// touched. On failure the new version's directory is removed and the entry is as it was.
    pub(crate) fn install(
        &self,
        key: &Key,
        data: TempFile,
        data_path: &Path,
        meta: TempFile,
    ) -> io::Result<Stamp> {
        let version_dir = data_path.parent().unwrap_or(data_path);
        let moved = (|| {
            failpoint_error("install")?;
            self.create_dir_all(version_dir)?;
            data.persist(data_path)?;
            failpoint("commit-after-data");
            self.persist_meta(key, meta)
        })();
        if moved.is_err() && version_dir != self.entry_dir(key) {
            self.remove_any(version_dir);
        }
        moved
    }

    /// Renames a written meta.json into place; returns its stamp.
    fn persist_meta(&self, key: &Key, meta: TempFile) -> io::Result<Stamp> {
        let md = self.dir.lstat(meta.path())?;
        meta.persist(&self.meta_path(key))?;
        Ok(Stamp::of(&md))
    }

    /// Makes the renames of an installed entry durable.
    pub(crate) fn sync_entry(&self, key: &Key) {
        self.sync_dir(&self.entry_dir(key));
    }

    /// Replaces the meta.json of entry `key` (a renewal: same bytes, new expiry).
    pub(crate) fn replace_meta(&self, key: &Key, meta: TempFile) -> io::Result<Stamp> {
        self.persist_meta(key, meta)
    }

    /// Moves one version's bytes (its directory, or the data file of an entry written before
    /// versions had directories) to a trash name in the temp directory, to be deleted with
    /// [`remove_any`] off the lock, and removes the entry directory if that left it empty.
    /// Returns the trash path, or `None` when there was nothing to move.
    pub(crate) fn trash(&self, key: &Key, data_path: &Path) -> Option<PathBuf> {
        let entry_dir = self.entry_dir(key);
        let version = match data_path.parent() {
            Some(dir) if dir != entry_dir => dir,
            _ => data_path,
        };
        let trash = self.temp_path(key, "trash");
        let trash = match self.dir.rename(version, &trash) {
            Ok(()) => Some(trash),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %version.display(), error = %e, "cannot move a removed file away");
                None
            }
        };
        let _ = self.dir.remove_dir(&entry_dir);
        trash
    }
}

/// Which meta.json is on disk: a new one (renamed over the old) has a new inode, and a
/// reused inode a new mtime. A process compares it on each hit to see what other processes
/// did to an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) mtime_ns: u64,
    pub(crate) len: u64,
}

impl Stamp {
    pub(crate) fn of(md: &fs::Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            mtime_ns: mtime_ns(md),
            len: md.len(),
        }
    }

    // The field types of `stat` differ between targets: casts that are no-ops here.
    #[allow(clippy::unnecessary_cast)]
    fn of_stat(st: &rustix::fs::Stat) -> Stamp {
        // As `mtime_ns`: a time before the epoch is 0.
        let mtime_ns = u64::try_from(st.st_mtime).map_or(0, |secs| {
            secs.saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec as u64)
        });
        Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mtime_ns,
            len: st.st_size as u64,
        }
    }
}

/// A version claimed for removal: the data file's exclusive lock (no process holds it) and,
/// when it was free, the URL's writer lock (nobody is changing its meta.json). Dropped once
/// the bytes are moved away.
#[derive(Debug)]
pub(crate) struct Claim {
    key_lock: Option<locks::KeyLock>,
    _data: Option<File>,
}

impl Claim {
    /// Whether nobody was downloading or changing the URL.
    pub(crate) fn key_free(&self) -> bool {
        self.key_lock.is_some()
    }
}

impl Layout {
    /// The stamp of the meta.json of `key`, if there is one: one `fstatat` from `v1`'s
    /// descriptor, the hit path's check (see [`Beneath::identify`]).
    pub(crate) fn meta_stamp(&self, key: &Key) -> Option<Stamp> {
        self.dir
            .identify(&self.meta_path(key))
            .ok()
            .map(|st| Stamp::of_stat(&st))
    }

    /// Claims the version of `key` at `data_path` for removal. `None` when another process
    /// holds its bytes.
    pub(crate) fn claim(&self, key: &Key, data_path: &Path) -> Option<Claim> {
        let data = match self.try_exclusive_at(data_path) {
            Ok(locks::Try::Taken(file)) => Some(file),
            Ok(locks::Try::Gone) => None,
            Ok(locks::Try::Held) => return None,
            // Perhaps held: an error (too many open files, a permission) proves nothing.
            Err(e) => {
                tracing::debug!(path = %data_path.display(), error = %e, "cannot lock a data file");
                return None;
            }
        };
        let key_lock = self.try_lock_key(key).ok().flatten();
        Some(Claim {
            key_lock,
            _data: data,
        })
    }

    /// Unlinks the meta.json of `key` if it still describes the version `generation` (the
    /// one stamped `stamp`, or a renewal of it another process wrote): the entry is gone for
    /// every process and every later start, while its bytes stay for the callers that hold
    /// them. A meta.json of another version is left alone.
    pub(crate) fn withdraw(&self, key: &Key, stamp: Stamp, generation: &str) {
        if self.meta_stamp(key) == Some(stamp) || self.names_generation(key, generation) {
            let _ = self.dir.remove_file(&self.meta_path(key));
        }
    }

    /// Whether the meta.json of `key` on disk describes the version `generation`: such a
    /// version's bytes are never removed, whatever this process last read.
    pub(crate) fn names_generation(&self, key: &Key, generation: &str) -> bool {
        #[derive(Deserialize)]
        struct Named {
            #[serde(default)]
            generation: String,
        }
        match self.read_no_follow(&self.meta_path(key), META_LIMIT) {
            Ok(raw) => serde_json::from_slice::<Named>(&raw)
                .is_ok_and(|named| named.generation == generation),
            // Gone, a link, or not a file: names nothing.
            Err(e)
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::Other)
                    || matches!(e.raw_os_error(), Some(ELOOP | ENOTDIR)) =>
            {
                false
            }
            // Unreadable for now (too many open files, say): it may name it.
            Err(_) => true,
        }
    }

    /// Reads and checks the entry of `key` on disk, as recovery would, without removing
    /// anything. `None` when there is no valid entry.
    pub(crate) fn read_entry(&self, key: &Key) -> Option<Recovered> {
        recover::read_entry(self, &self.entry_dir(key), key.clone()).ok()
    }
}

/// What [`hold`] found.
#[derive(Debug)]
pub(crate) enum Hold {
    /// The data file, locked shared by this process, as `meta` records it.
    Held(File),
    /// Another process is removing it right now.
    Busy,
    /// It is gone, or not what `meta` records.
    Bad,
}

impl Layout {
    /// Takes this process's shared lock on a version's data file, so that no other process
    /// deletes it while it is held, and checks that the file is still the one `meta` records (a
    /// regular file, linked, with its size and mtime).
    ///
    /// Only a missing file, a link or other bytes are `Bad` (an integrity failure); an error
    /// that proves nothing (too many open files, a permission) is `Busy`. After the lock, the
    /// path must still lead to the file locked: a remover may have moved it away in between.
    pub(crate) fn hold(&self, path: &Path, meta: &Meta) -> Hold {
        let file = match self.open_no_follow(path) {
            Ok(file) => file,
            // Gone, or a link (or a file) met on the way.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || matches!(e.raw_os_error(), Some(ELOOP | ENOTDIR)) =>
            {
                return Hold::Bad;
            }
            Err(_) => return Hold::Busy,
        };
        match locks::try_shared(file) {
            Ok(locks::Try::Taken(file)) => {
                let md = file.metadata();
                let at_path = self.dir.identify(path);
                match (md, at_path) {
                    (Ok(md), Ok(at)) if (md.dev(), md.ino()) == (at.st_dev, at.st_ino) => {
                        if intact(&md, meta) {
                            Hold::Held(file)
                        } else {
                            Hold::Bad
                        }
                    }
                    (Ok(_), Err(e)) if e.kind() != io::ErrorKind::NotFound => Hold::Busy,
                    (Err(_), _) => Hold::Busy,
                    // Moved away or replaced since the open.
                    _ => Hold::Bad,
                }
            }
            Ok(locks::Try::Held) | Err(_) => Hold::Busy,
            Ok(locks::Try::Gone) => Hold::Bad,
        }
    }
}

const ELOOP: i32 = rustix::io::Errno::LOOP.raw_os_error();
const ENOTDIR: i32 = rustix::io::Errno::NOTDIR.raw_os_error();

fn intact(md: &fs::Metadata, meta: &Meta) -> bool {
    md.is_file() && md.nlink() > 0 && md.len() == meta.size && mtime_ns(md) == meta.mtime_ns
}

/// Whether a held data file still has the size and mtime `meta` records (one `fstat`).
pub(crate) fn still_intact(file: &File, meta: &Meta) -> bool {
    file.metadata().is_ok_and(|md| intact(&md, meta))
}

/// The largest meta.json recovery reads.
pub(crate) const META_LIMIT: u64 = 64 * 1024;

mod access;
pub(crate) use access::{TempFile, behind_a_link, blocking, mtime_ns, replaced};
mod beneath;
pub(crate) use beneath::{Beneath, DirItem};
pub(crate) mod locks;
mod writer;
pub(crate) use writer::{
    MakeRoom, OnSync, OnWritten, SpawnedWriter, WriteOp, WriterWatch, Written, open_part,
    spawn_writer,
};
mod recover;
#[cfg(test)]
use recover::RecoveryReport;
pub(crate) use recover::{Recovered, recover, scan, tidy_temp};

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
