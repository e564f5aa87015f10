//! Every path below `v1` is resolved from a descriptor of `v1` itself and never through a
//! link: not at start-up, not at run time. A link planted at `v1/entries/<pp>` or
//! `v1/locks/<pp>` while a process runs makes an open, a rename or a removal fail (`ELOOP`)
//! instead of leading it out of the cache; the directories the cache makes on the way to a
//! new file are checked one by one, and a link planted in place of one of them is removed
//! and the directory made again, as [`super::Layout::open`] does at start-up (where a file
//! in place of one goes too; at run time a file there is an error until the next start).
//!
//! On Linux 5.6 and later one `openat2` (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) resolves a
//! whole path; elsewhere, or where a sandbox refuses that call, the path is walked one
//! component at a time with `O_NOFOLLOW`. Renames, removals and new directories are made
//! relative to their parent directory's descriptor, opened the same way.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

/// The `v1` directory, by path (to name files to callers and in errors) and by descriptor (to
/// reach them).
#[derive(Debug)]
pub(crate) struct Beneath {
    root: PathBuf,
    fd: OnceLock<OwnedFd>,
    /// The mode of the directories it makes.
    dir_mode: u32,
    /// Whether [`replaced`](Self::replaced) was reported.
    pub(crate) warned: std::sync::atomic::AtomicBool,
}

/// A directory's descriptor: `v1`'s own, or one opened below it.
enum DirFd<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsFd for DirFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Root(fd) => *fd,
            DirFd::Owned(fd) => fd.as_fd(),
        }
    }
}

/// One item of a directory, as its entry says (its type is never a link's target's).
#[derive(Debug)]
pub(crate) struct DirItem {
    path: PathBuf,
    kind: rustix::fs::FileType,
}

impl DirItem {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file_name(&self) -> &OsStr {
        self.path.file_name().unwrap_or_default()
    }

    pub(crate) fn is_dir(&self) -> bool {
        self.kind == rustix::fs::FileType::Directory
    }

    pub(crate) fn is_file(&self) -> bool {
        self.kind == rustix::fs::FileType::RegularFile
    }
}

/// How deep [`Beneath::remove_all`] goes.
const REMOVE_DEPTH: usize = 16;

/// Set once `openat2` proved missing (an old kernel) or refused: the walk is used from then
/// on.
#[cfg(target_os = "linux")]
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const ELOOP: i32 = Errno::LOOP.raw_os_error();
const ENOTDIR: i32 = Errno::NOTDIR.raw_os_error();

const DIR_PATH: OFlags = OFlags::PATH
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Beneath {
    pub(crate) fn new(root: PathBuf, dir_mode: u32) -> Beneath {
        Beneath {
            root,
            fd: OnceLock::new(),
            dir_mode,
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Opens `v1` itself (never through a link; what lies above it may be one) and keeps its
    /// descriptor: every later path is resolved from it. Returns its metadata.
    pub(crate) fn pin(&self) -> io::Result<Metadata> {
        let fd = self.root_fd()?;
        File::from(fd.try_clone_to_owned()?).metadata()
    }

    fn root_fd(&self) -> io::Result<BorrowedFd<'_>> {
        if let Some(fd) = self.fd.get() {
            return Ok(fd.as_fd());
        }
        let fd = rustix::fs::open(&self.root, DIR_PATH, Mode::empty())?;
        // A racing first use may have set it: either descriptor names the same directory.
        let _ = self.fd.set(fd);
        Ok(self.fd.get().expect("set above").as_fd())
    }

    /// `path` relative to `v1`: refused unless it is below it, in plain components.
    fn relative<'a>(&self, path: &'a Path) -> io::Result<&'a Path> {
        let rel = path.strip_prefix(&self.root).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not inside the cache directory", path.display()),
            )
        })?;
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a plain path in the cache directory",
                    path.display()
                ),
            ));
        }
        Ok(rel)
    }

    /// Opens `path` with `flags` (and `mode` for a new file), following no link on the way
    /// nor at the end.
    pub(crate) fn open(&self, path: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let rel = self.relative(path)?;
        let root = self.root_fd()?;
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if rel.as_os_str().is_empty() {
            return Ok(rustix::fs::openat(root, ".", flags, Mode::empty())?);
        }
        resolve(root, rel, flags, Mode::from_raw_mode(mode))
    }

    /// Opens a file for reading and writing, made new (`O_EXCL`) with `mode`.
    pub(crate) fn create_new(&self, path: &Path, mode: u32) -> io::Result<File> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
        Ok(File::from(self.open(path, flags, mode)?))
    }

    /// The metadata of what `path` names itself (a link is a link: `lstat`).
    pub(crate) fn lstat(&self, path: &Path) -> io::Result<Metadata> {
        File::from(self.open(path, OFlags::PATH, 0)?).metadata()
    }

    /// `fstatat(v1, path, AT_SYMLINK_NOFOLLOW)`: one syscall, for comparing what `path`
    /// names with a file the cache holds or a stamp it recorded (its device and inode), and
    /// for nothing else. Unlike every other call here it resolves a link on the way; what
    /// it finds through one is some other file, or the cache's own inode moved, and a stat
    /// reads, writes and serves nothing.
    pub(crate) fn identify(&self, path: &Path) -> io::Result<rustix::fs::Stat> {
        let rel = self.relative(path)?;
        let root = self.root_fd()?;
        if rel.as_os_str().is_empty() {
            return Ok(rustix::fs::fstat(root)?);
        }
        Ok(rustix::fs::statat(root, rel, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// Whether `v1` by its path is no longer the directory this process holds (removed,
    /// renamed, or another made in its place): the process goes on in the one it holds, and
    /// no other process sees it there.
    pub(crate) fn replaced(&self) -> bool {
        let Some(fd) = self.fd.get() else {
            return false;
        };
        match (rustix::fs::fstat(fd), rustix::fs::lstat(&self.root)) {
            (Ok(held), Ok(named)) => {
                held.st_nlink == 0 || (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino)
            }
            (Ok(_), Err(_)) => true,
            (Err(_), _) => false,
        }
    }

    /// `fstatfs` of `v1`.
    pub(crate) fn statfs(&self) -> io::Result<rustix::fs::StatFs> {
        Ok(rustix::fs::fstatfs(self.root_fd()?)?)
    }

    /// The directory that holds `path`, and the name of `path` in it.
    fn parent<'a>(&self, path: &'a Path) -> io::Result<(DirFd<'_>, &'a OsStr)> {
        let rel = self.relative(path)?;
        let name = rel.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the cache directory itself")
        })?;
        let root = self.root_fd()?;
        match rel.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => Ok((
                DirFd::Owned(resolve(root, dir, DIR_PATH, Mode::empty())?),
                name,
            )),
            _ => Ok((DirFd::Root(root), name)),
        }
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        Ok(rustix::fs::renameat(from_dir, from_name, to_dir, to_name)?)
    }

    pub(crate) fn remove_file(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
    }

    pub(crate) fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
    }

    /// Makes `path` and the directories above it (below `v1`) with `mode`. A link in place
    /// of one of them is removed (with a WARN) and the directory made: nothing the cache
    /// writes next goes through it.
    pub(crate) fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let rel = self.relative(path)?;
        let mut dir = DirFd::Root(self.root_fd()?);
        for name in rel.iter() {
            dir = DirFd::Owned(make_dir(dir.as_fd(), name, self.dir_mode, path)?);
        }
        Ok(())
    }

    /// [`rename`](Self::rename); when a link stands in place of a directory on the way to
    /// `to`, it is replaced by the directory (see [`create_dir_all`](Self::create_dir_all))
    /// and the rename tried once more. (A directory that is gone stays an error: another
    /// process removed what was to be renamed into it.)
    pub(crate) fn rename_making_room(&self, from: &Path, to: &Path) -> io::Result<()> {
        match self.rename(from, to) {
            Err(e) if matches!(e.raw_os_error(), Some(ELOOP | ENOTDIR)) => {
                match to.parent() {
                    Some(parent) if parent != self.root => self.create_dir_all(parent)?,
                    _ => return Err(e),
                }
                self.rename(from, to)
            }
            renamed => renamed,
        }
    }

    /// The items of directory `path` (never through a link), without `.` and `..`.
    pub(crate) fn read_dir(&self, path: &Path) -> io::Result<Vec<DirItem>> {
        let fd = self.open(path, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
        list(fd, path)
    }

    /// Removes a file, or a directory and all it holds, without following any link: a link
    /// is removed as a link.
    pub(crate) fn remove_all(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        remove_at(dir.as_fd(), name, 0)
    }

    /// Fsyncs directory `path` so that the renames in it are durable.
    pub(crate) fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let fd = self.open(path, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
        Ok(rustix::fs::fsync(fd)?)
    }
}

/// Opens `rel` below `dir` following no link: one `openat2` where the kernel has it, else a
/// walk.
fn resolve(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    #[cfg(target_os = "linux")]
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        use rustix::fs::ResolveFlags;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        // EAGAIN: a rename elsewhere in the file system raced the lookup; it is tried again.
        for _ in 0..4 {
            match rustix::fs::openat2(dir, rel, flags, mode, how) {
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                // A sandbox that refuses the call (older container runtimes): the walk
                // answers from now on.
                Err(Errno::PERM) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                result => return Ok(result?),
            }
        }
    }
    walk(dir, rel, flags, mode)
}

/// Opens `rel` below `dir` one component at a time, each with `O_NOFOLLOW`.
fn walk(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let mut names = rel.iter().peekable();
    let mut at: Option<OwnedFd> = None;
    while let Some(name) = names.next() {
        let base = at.as_ref().map_or(dir, |fd| fd.as_fd());
        if names.peek().is_none() {
            return Ok(rustix::fs::openat(base, name, flags, mode)?);
        }
        at = Some(rustix::fs::openat(base, name, DIR_PATH, Mode::empty())?);
    }
    Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty path"))
}

/// Makes directory `name` in `dir` unless it is there, and opens it; what stands in its
/// place is removed first.
fn make_dir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, whole: &Path) -> io::Result<OwnedFd> {
    let mode = Mode::from_raw_mode(mode);
    for attempt in 0..2 {
        match rustix::fs::mkdirat(dir, name, mode) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        match rustix::fs::openat(dir, name, DIR_PATH, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            // A link in place of the directory (O_PATH | O_NOFOLLOW opens the link itself,
            // which is no directory): it is nobody's data, and goes. Anything else there (a
            // file) is an error until the next start tidies it.
            Err(Errno::NOTDIR | Errno::LOOP)
                if attempt == 0
                    && rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(
                        |st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::Symlink
                        },
                    ) =>
            {
                tracing::warn!(
                    path = %whole.display(),
                    item = %Path::new(name).display(),
                    "removing a link planted in place of a cache directory"
                );
                match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                    // Another process replaced it first.
                    Ok(()) | Err(Errno::NOENT | Errno::ISDIR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("a cache directory keeps being replaced"))
}

/// The items of an open directory, named below `path`.
fn list(fd: OwnedFd, path: &Path) -> io::Result<Vec<DirItem>> {
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut items = Vec::new();
    while let Some(item) = dir.read() {
        let item = item?;
        let name = item.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = OsStr::from_bytes(name);
        let mut kind = item.file_type();
        if kind == rustix::fs::FileType::Unknown {
            // Some file systems leave the type out of their entries: one `lstat` in place.
            kind = rustix::fs::statat(dir.fd()?, name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode))
                .unwrap_or(kind);
        }
        items.push(DirItem {
            path: path.join(name),
            kind,
        });
    }
    Ok(items)
}

/// Removes `name` in `dir`: a directory with everything in it, anything else (a link
/// included) by unlinking it.
///
/// The cache's own trees are two levels deep (a version's directory and its file); a tree
/// deeper than [`REMOVE_DEPTH`], planted to exhaust descriptors or the stack, is left with an
/// error.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        // A directory: EISDIR on Linux, EPERM where POSIX allows it.
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    if depth >= REMOVE_DEPTH {
        return Err(io::Error::other(
            "a directory tree too deep to be the cache's",
        ));
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let inner = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let names: Vec<OsString> = list(inner.try_clone()?, Path::new(""))?
        .into_iter()
        .map(|item| item.file_name().to_owned())
        .collect();
    for child in &names {
        match remove_at(inner.as_fd(), child, depth + 1) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// `v1` with `a/b/file`, `a/out` a link to a directory outside, and `a/f` a link to a
    /// file outside; the outside directory holds `secret`.
    fn tree() -> (tempfile::TempDir, tempfile::TempDir, Beneath) {
        let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let root = dir.path().join("v1");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/file"), b"inside").unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        symlink(outside.path(), root.join("a/out")).unwrap();
        symlink(outside.path().join("secret"), root.join("a/f")).unwrap();
        (dir, outside, Beneath::new(root, 0o700))
    }

    /// A link met on the way: `ELOOP`, or `ENOTDIR` where a directory was asked for.
    fn refused(err: &io::Error) -> bool {
        [Errno::LOOP, Errno::NOTDIR]
            .iter()
            .any(|e| err.raw_os_error() == Some(e.raw_os_error()))
    }

    fn read(fd: OwnedFd) -> Vec<u8> {
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut File::from(fd), &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn the_walk_and_openat2_agree_and_follow_no_link() {
        let (_dir, _outside, beneath) = tree();
        let root = beneath.root_fd().unwrap();
        let rd = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        for open in [resolve, walk] {
            assert_eq!(
                read(open(root, Path::new("a/b/file"), rd, Mode::empty()).unwrap()),
                b"inside"
            );
            for through in ["a/out/secret", "a/f"] {
                let err = open(root, Path::new(through), rd, Mode::empty()).unwrap_err();
                assert!(
                    [Errno::LOOP, Errno::NOTDIR, Errno::XDEV]
                        .iter()
                        .any(|e| err.raw_os_error() == Some(e.raw_os_error())),
                    "{through}: {err}"
                );
            }
        }
    }

    #[test]
    fn openat2_itself_refuses_links_where_the_kernel_has_it() {
        let (_dir, _outside, beneath) = tree();
        let root = beneath.root_fd().unwrap();
        let how = rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS;
        let open = |p: &str| rustix::fs::openat2(root, p, OFlags::RDONLY, Mode::empty(), how);
        match open("a/b/file") {
            Err(Errno::NOSYS | Errno::PERM) => {
                println!("SKIPPED: no openat2 here; the walk answers (tested above)");
                return;
            }
            opened => assert_eq!(read(opened.unwrap()), b"inside"),
        }
        assert_eq!(open("a/out/secret").unwrap_err(), Errno::LOOP);
        assert_eq!(open("a/f").unwrap_err(), Errno::LOOP);
        assert_eq!(open("../v1/a/b/file").unwrap_err(), Errno::XDEV);
    }

    #[test]
    fn a_v1_removed_or_replaced_under_the_process_is_noticed() {
        let (dir, _outside, beneath) = tree();
        beneath.pin().unwrap();
        assert!(!beneath.replaced());
        std::fs::rename(&beneath.root, dir.path().join("v1.old")).unwrap();
        assert!(beneath.replaced(), "gone");
        std::fs::create_dir(&beneath.root).unwrap();
        assert!(beneath.replaced(), "another in its place");
        let fresh = Beneath::new(beneath.root.clone(), 0o700);
        fresh.pin().unwrap();
        assert!(!fresh.replaced());
    }

    #[test]
    fn paths_outside_or_with_dot_dot_are_refused() {
        let (dir, _outside, beneath) = tree();
        for path in [
            dir.path().join("elsewhere"),
            beneath.root.join("a/../a/b/file"),
        ] {
            let err = beneath.open(&path, OFlags::RDONLY, 0).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidInput,
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn a_link_in_place_of_a_directory_is_replaced_and_a_file_is_not() {
        let (_dir, outside, beneath) = tree();
        let made = beneath.root.join("a/out/new");
        beneath.create_dir_all(&made).unwrap();
        assert!(
            std::fs::symlink_metadata(beneath.root.join("a/out"))
                .unwrap()
                .is_dir()
        );
        assert!(made.is_dir());
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            1,
            "nothing made outside"
        );
        let err = beneath
            .create_dir_all(&beneath.root.join("a/b/file/x"))
            .unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(Errno::NOTDIR.raw_os_error()),
            "{err}"
        );
        assert_eq!(
            std::fs::read(beneath.root.join("a/b/file")).unwrap(),
            b"inside"
        );
    }

    #[test]
    fn removals_and_renames_never_go_through_a_link() {
        let (_dir, outside, beneath) = tree();
        let secret = outside.path().join("secret");
        let err = beneath
            .remove_file(&beneath.root.join("a/out/secret"))
            .unwrap_err();
        assert!(refused(&err), "{err}");
        let err = beneath
            .rename(
                &beneath.root.join("a/b/file"),
                &beneath.root.join("a/out/file"),
            )
            .unwrap_err();
        assert!(refused(&err), "{err}");
        // A whole tree with links in it goes, the links as links.
        beneath.remove_all(&beneath.root.join("a")).unwrap();
        assert!(!beneath.root.join("a").exists());
        assert_eq!(std::fs::read(&secret).unwrap(), b"outside");
        assert!(beneath.read_dir(&beneath.root).unwrap().is_empty());
    }

    #[test]
    fn a_listing_gives_each_items_own_type() {
        let (_dir, _outside, beneath) = tree();
        let mut items = beneath.read_dir(&beneath.root.join("a")).unwrap();
        items.sort_by(|x, y| x.path().cmp(y.path()));
        let seen: Vec<_> = items
            .iter()
            .map(|i| (i.file_name().to_str().unwrap(), i.is_dir(), i.is_file()))
            .collect();
        assert_eq!(
            seen,
            [
                ("b", true, false),
                ("f", false, false),
                ("out", false, false)
            ]
        );
        let err = beneath.read_dir(&beneath.root.join("a/out")).unwrap_err();
        assert!(refused(&err), "{err}");
    }
}
