//! Reaching files below `v1`: the layout's calls that open, read, list, rename and remove
//! through [`Beneath`] (never through a link), and the temp file that is removed unless it
//! is renamed into place.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use rustix::fs::OFlags;

use super::{Beneath, DirItem, ELOOP, ENOTDIR, Layout, WRITE_BUFFER};

/// A temp file that is removed unless it was renamed away (made by [`Layout::temp_file`]).
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    dir: Arc<Beneath>,
    armed: bool,
}

impl TempFile {
    pub(super) fn new(path: PathBuf, dir: Arc<Beneath>) -> TempFile {
        TempFile {
            path,
            dir,
            armed: true,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the file where it is: nothing is removed on drop (a part file kept for a
    /// later resume).
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }

    /// Renames the file to `to`; after success nothing is removed on drop. A link planted in
    /// place of a directory on the way is replaced by the directory first.
    pub(crate) fn persist(mut self, to: &Path) -> io::Result<()> {
        self.dir.rename_making_room(&self.path, to)?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match self.dir.remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
            }
            _ => {}
        }
    }
}

/// Nanoseconds since the epoch of a file's modification time.
pub(crate) fn mtime_ns(md: &fs::Metadata) -> u64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

impl Layout {
    /// Full re-hash of a file (blocking).
    pub(crate) fn hash_file(&self, path: &Path) -> io::Result<(String, u64)> {
        let mut file = self.open_no_follow(path)?;
        let mut hasher = crate::digest::Sha256::new();
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
        Ok((hasher.hex(), n))
    }

    /// Opens `path` for reading, never through a link. Non-blocking, so that a FIFO planted
    /// in place of a file cannot hang the open (for a regular file the flag changes nothing);
    /// callers check the type with `fstat` where it matters.
    pub(crate) fn open_no_follow(&self, path: &Path) -> io::Result<File> {
        let fd = self.dir.open(path, OFlags::RDONLY | OFlags::NONBLOCK, 0)?;
        Ok(File::from(fd))
    }

    /// Reads a whole small file of the cache's own (meta.json, state.json): never through a
    /// link, never anything but a regular file (a FIFO planted there would block the open, so
    /// it is opened non-blocking), and never more than `limit` bytes.
    pub(crate) fn read_no_follow(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let file = self.open_no_follow(path)?;
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

    /// Fsyncs a directory so that renames inside it are durable.
    pub(crate) fn sync_dir(&self, dir: &Path) {
        if let Err(e) = self.dir.sync_dir(dir) {
            tracing::debug!(dir = %dir.display(), error = %e, "directory fsync failed");
        }
    }

    /// Removes a file or a directory tree (a link as a link), logging failures.
    pub(crate) fn remove_any(&self, path: &Path) {
        match self.dir.remove_all(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove");
            }
            _ => {}
        }
    }

    /// A new handle, with a position of its own, on the file `held` (whose name is `path`):
    /// the same inode, wherever its name leads now. On Linux through `/proc/self/fd`, which
    /// reopens the held file itself; elsewhere, or without `/proc`, by `path`, never through
    /// a link, and only if it still names that inode.
    pub(crate) fn reopen(&self, path: &Path, held: &File) -> io::Result<File> {
        let want = held.metadata()?;
        let same = |file: &File| {
            file.metadata()
                .is_ok_and(|md| (md.dev(), md.ino()) == (want.dev(), want.ino()))
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let proc = format!("/proc/self/fd/{}", held.as_raw_fd());
            if let Ok(file) = File::open(proc)
                && same(&file)
            {
                return Ok(file);
            }
        }
        let file = self.open_no_follow(path)?;
        if !same(&file) {
            return Err(replaced());
        }
        blocking(file)
    }

    /// The metadata of what `path` names itself, never through a link (`lstat`).
    pub(crate) fn lstat(&self, path: &Path) -> io::Result<fs::Metadata> {
        self.dir.lstat(path)
    }

    /// The items of directory `path`, never through a link.
    pub(crate) fn read_dir(&self, path: &Path) -> io::Result<Vec<DirItem>> {
        self.dir.read_dir(path)
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.dir.rename(from, to)
    }

    pub(crate) fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.dir.remove_file(path)
    }

    pub(crate) fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.dir.remove_dir(path)
    }

    /// Opens `path` with `flags`, never through a link (see [`Beneath::open`]).
    pub(crate) fn open_at(&self, path: &Path, flags: OFlags, mode: u32) -> io::Result<File> {
        Ok(File::from(self.dir.open(path, flags, mode)?))
    }
}

/// `file` (opened non-blocking, see [`Layout::open_no_follow`]) made blocking again, to be
/// handed out.
pub(crate) fn blocking(file: File) -> io::Result<File> {
    rustix::fs::fcntl_setfl(&file, OFlags::empty())?;
    Ok(file)
}

/// Whether an error of a call below `v1` says that a link (or a file) stands on the way.
pub(crate) fn behind_a_link(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ELOOP | ENOTDIR))
}

/// The error of a cached file whose path no longer leads to the file the cache holds.
pub(crate) fn replaced() -> io::Error {
    io::Error::other("the cached file was moved or replaced")
}
