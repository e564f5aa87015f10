//! The disk: layout, meta.json, the streaming temp writer, and start-up recovery.
//!
//! ```text
//! <cache_dir>/v1/entries/<k[0..2]>/<key>/<gen>/<file name>   the bytes of one version
//! <cache_dir>/v1/entries/<k[0..2]>/<key>/meta.json           names the current version
//! <cache_dir>/v1/tmp/<key>.<unique>.part                     downloads in progress (and .meta, .trash)
//! <cache_dir>/v1/state.json                                  access times and counters
//! <cache_dir>/v1/lock                                        held by the process using the directory
//! ```
//!
//! Every write is all or nothing: bytes go to a uniquely named temp file that is removed if the
//! writer is dropped before commit; a committed version's data is renamed into its own
//! directory before meta.json is renamed over the old one, so a crash leaves at worst a
//! version that no meta.json names, which recovery removes, and the bytes of a version a
//! caller holds are never touched by a newer one.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::failpoint::{failpoint, failpoint_error};
use crate::key::{Key, META_FILE};

const FORMAT: &str = "v1";
/// Opened files are never symbolic links: the cache follows no link it did not make.
const O_NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
const WRITE_BUFFER: usize = 1 << 20;

/// Paths inside the cache directory, and the modes new files and directories get.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
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

    pub(crate) fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// A fresh, unique path in the temp directory.
    pub(crate) fn temp_path(&self, key: &Key, ext: &str) -> PathBuf {
        self.unique_temp(key.as_str(), ext)
    }

    fn unique_temp(&self, prefix: &str, ext: &str) -> PathBuf {
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
        let temp = TempFile::new(self.unique_temp(prefix, ext));
        let mut f = self.create_new_file(temp.path())?;
        f.write_all(bytes)?;
        f.sync_data()?;
        Ok(temp)
    }

    pub(crate) fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(self.dir_mode)
            .create(dir)
    }

    pub(crate) fn create_new_file(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.file_mode)
            .open(path)
    }

    /// Writes `bytes` to `path` atomically: temp file, fsync, rename.
    pub(crate) fn write_atomic(&self, path: &Path, prefix: &str, bytes: &[u8]) -> io::Result<()> {
        self.write_temp(prefix, "new", bytes)?.persist(path)
    }

    /// Creates the directories, checks that nothing in them leads out of the cache, and takes
    /// the process lock.
    ///
    /// The configured directory itself may be a symbolic link (users point `~/.cache` at a
    /// bigger disk); below it nothing is followed. `v1` must be a real directory owned by this
    /// user, or, when the file mode shares the cache with a group, one of this process's
    /// groups that others cannot write. `entries` and `tmp` planted as links are removed as
    /// links and made again.
    pub(crate) fn open(&self) -> Result<File> {
        self.create_dir_all(&self.root)
            .map_err(|e| Error::io("cannot create the cache directory", e).with_path(&self.root))?;
        self.check_root()?;
        for dir in [&self.entries, &self.tmp] {
            if fs::symlink_metadata(dir).is_ok_and(|md| !md.is_dir()) {
                tracing::warn!(path = %dir.display(), "removing what stands in place of a cache directory (a link or a file)");
                remove_any(dir);
            }
            self.create_dir_all(dir)
                .map_err(|e| Error::io("cannot create the cache directory", e).with_path(dir))?;
        }
        let lock_path = self.root.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(self.file_mode)
            .custom_flags(O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| Error::io("cannot open the lock file", e).with_path(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => Ok(lock),
            Err(fs::TryLockError::WouldBlock) => Err(Error::new(
                ErrorKind::Locked,
                "another process is using this cache directory",
            )
            .with_path(&self.root)),
            Err(fs::TryLockError::Error(e)) => {
                Err(Error::io("cannot lock the cache directory", e).with_path(&lock_path))
            }
        }
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
    ) -> io::Result<()> {
        let version_dir = data_path.parent().unwrap_or(data_path);
        let moved = (|| {
            failpoint_error("install")?;
            self.create_dir_all(version_dir)?;
            data.persist(data_path)?;
            failpoint("commit-after-data");
            meta.persist(&self.meta_path(key))
        })();
        if moved.is_err() && version_dir != self.entry_dir(key) {
            remove_any(version_dir);
        }
        moved
    }

    /// Makes the renames of an installed entry durable.
    pub(crate) fn sync_entry(&self, key: &Key) {
        sync_dir(&self.entry_dir(key));
    }

    /// Replaces the meta.json of entry `key` (a renewal: same bytes, new expiry).
    pub(crate) fn replace_meta(&self, key: &Key, meta: TempFile) -> io::Result<()> {
        meta.persist(&self.meta_path(key))
    }

    /// Unlinks the meta.json of entry `key`: the entry is gone for every later start, while
    /// its bytes stay for the callers that hold them.
    pub(crate) fn withdraw(&self, key: &Key) {
        let _ = fs::remove_file(self.meta_path(key));
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
        let trash = match fs::rename(version, &trash) {
            Ok(()) => Some(trash),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %version.display(), error = %e, "cannot move a removed file away");
                None
            }
        };
        let _ = fs::remove_dir(entry_dir);
        trash
    }
}

/// A temp file that is removed unless it was renamed away.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    pub(crate) fn new(path: PathBuf) -> TempFile {
        TempFile { path, armed: true }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `to`; after success nothing is removed on drop.
    pub(crate) fn persist(mut self, to: &Path) -> io::Result<()> {
        fs::rename(&self.path, to)?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
            }
            _ => {}
        }
    }
}

/// What the network side sends the writer thread.
#[derive(Debug)]
pub(crate) enum WriteOp {
    /// The next bytes of the body.
    Data(bytes::Bytes),
    /// Drop everything written so far: the download starts again from byte zero.
    Restart,
    /// The body is complete: flush, fsync and hand the file back. A channel that closes
    /// without `Finish` means the download was abandoned, and the temp file is removed.
    Finish,
}

/// Called by the writer when the disk is full, with the bytes it needs; returns whether it
/// freed anything (by evicting entries), in which case the write is tried again.
pub(crate) type MakeRoom = Box<dyn Fn(u64) -> bool + Send>;

/// The network side's handle on a download's writer thread, which writes chunks through a
/// large buffer and finishes with `fdatasync`. Hashing happens on the network side, so the
/// two overlap.
#[derive(Debug)]
pub(crate) struct SpawnedWriter {
    pub(crate) tx: mpsc::Sender<WriteOp>,
    pub(crate) done: tokio::task::JoinHandle<io::Result<(TempFile, File)>>,
    /// Where the temp file is, for error messages.
    pub(crate) path: PathBuf,
}

/// Starts a blocking writer that owns `temp`: it creates the file (mode `file_mode`), writes
/// into it, and removes it on every path but a `Finish`. Owning the file on the thread that
/// creates it closes a race: a guard on the network side could run before the file exists.
pub(crate) fn spawn_writer(layout: &Layout, temp: TempFile, make_room: MakeRoom) -> SpawnedWriter {
    let (tx, mut rx) = mpsc::channel::<WriteOp>(64);
    let path = temp.path().to_owned();
    let layout = layout.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut file = layout.create_new_file(temp.path())?;
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
        loop {
            let Some(op) = rx.blocking_recv() else {
                // Dropping `temp` on return removes the file.
                return Err(io::Error::other("download abandoned"));
            };
            match op {
                WriteOp::Data(chunk) => {
                    if buf.len() + chunk.len() > WRITE_BUFFER {
                        write_all_making_room(&mut file, &buf, &make_room)?;
                        buf.clear();
                    }
                    if chunk.len() >= WRITE_BUFFER {
                        write_all_making_room(&mut file, &chunk, &make_room)?;
                    } else {
                        buf.extend_from_slice(&chunk);
                    }
                }
                WriteOp::Restart => {
                    buf.clear();
                    file.set_len(0)?;
                    io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
                }
                WriteOp::Finish => break,
            }
        }
        write_all_making_room(&mut file, &buf, &make_room)?;
        file.sync_data()?;
        Ok((temp, file))
    });
    SpawnedWriter { tx, done, path }
}

/// `write_all`, except that a full disk first asks `make_room` for space and tries again.
fn write_all_making_room(file: &mut File, mut data: &[u8], make_room: &MakeRoom) -> io::Result<()> {
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::StorageFull && make_room(data.len() as u64) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Nanoseconds since the epoch of a file's modification time.
pub(crate) fn mtime_ns(md: &fs::Metadata) -> u64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// The cheap check of the hit path: the file exists with the recorded size and mtime.
pub(crate) fn cheap_check(path: &Path, meta: &Meta) -> bool {
    // lstat, as cheap as stat: a data file replaced by a link fails the check.
    match fs::symlink_metadata(path) {
        Ok(md) => md.is_file() && md.len() == meta.size && mtime_ns(&md) == meta.mtime_ns,
        Err(_) => false,
    }
}

/// Full re-hash of a file (blocking).
pub(crate) fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    let mut file = open_no_follow(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_BUFFER];
    let mut n = 0u64;
    loop {
        let read = io::Read::read(&mut file, &mut buf)?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        n += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), n))
}

/// Opens `path` for reading unless it is a symbolic link.
pub(crate) fn open_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
}

/// Reads a whole small file of the cache's own (meta.json, state.json): never a symbolic
/// link, never anything but a regular file (a FIFO planted there would block the open, so it
/// is opened non-blocking), and never more than `limit` bytes.
pub(crate) fn read_no_follow(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let nonblocking = rustix::fs::OFlags::NONBLOCK.bits() as i32;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW | nonblocking)
        .open(path)?;
    let md = file.metadata()?;
    if !md.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if md.len() > limit {
        return Err(io::Error::other(format!("larger than {limit} bytes")));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    io::Read::read_to_end(&mut io::Read::take(file, limit), &mut bytes)?;
    Ok(bytes)
}

/// The largest meta.json recovery reads.
pub(crate) const META_LIMIT: u64 = 64 * 1024;

/// Fsyncs a directory so that renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "directory fsync failed");
    }
}

/// Removes a file or a directory tree, logging failures.
pub(crate) fn remove_any(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove");
    }
}

mod recover;
#[cfg(test)]
use recover::RecoveryReport;
pub(crate) use recover::{Recovered, recover};

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
