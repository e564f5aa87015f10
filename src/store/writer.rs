//! The writer thread of a download: chunks through a large buffer, an fsync every
//! [`SYNC_EVERY`] bytes (what a successor may resume from), the part file created locked.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::OFlags;
use tokio::sync::mpsc;

use super::{Layout, TempFile, WRITE_BUFFER, locks};

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

/// Called by the writer each time it has made the first `n` bytes durable, so that the
/// download's lock record can say how much a successor may resume from.
pub(crate) type OnSync = Box<dyn Fn(u64) + Send>;

/// What the writer tells the readers of a download in progress (see `cache::stream`).
pub(crate) enum Written {
    /// The file is open: a handle to read it by offset, and how long it already is (a dead
    /// download's part file taken over).
    Opened(Arc<File>, u64),
    /// The first `n` bytes are in the file (written, not necessarily durable).
    Bytes(u64),
    /// Everything written so far was dropped: the download starts again from byte zero.
    Restarted,
}

/// Called by the writer as bytes reach the file.
pub(crate) type OnWritten = Box<dyn Fn(Written) + Send>;

/// How often the writer fsyncs a download in progress: what a successor resumes from after a
/// crash, even a power cut, is bytes that reached the disk.
const SYNC_EVERY: u64 = 16 << 20;

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

/// Opens the part file of a dead download to resume it: never through a link.
pub(crate) fn open_part(layout: &Layout, path: &Path) -> io::Result<File> {
    layout.open_at(path, OFlags::RDWR | OFlags::NONBLOCK, 0)
}

/// Creates the part file at `temp` holding its writer's exclusive lock from the first
/// instant it has that name: made under a `.new` name, locked, then renamed, so that a part
/// file whose lock can be taken always belongs to a dead writer.
fn create_part(layout: &Layout, temp: &TempFile) -> io::Result<File> {
    let fresh = temp.path().with_extension("new");
    let file = layout.create_new_file(&fresh)?;
    let file = match locks::try_exclusive(file) {
        Ok(locks::Try::Taken(file)) => file,
        Ok(_) => return Err(io::Error::other("a new part file is locked")),
        Err(e) => return Err(e),
    };
    if let Err(e) = layout.rename(&fresh, temp.path()) {
        let _ = layout.remove_file(&fresh);
        return Err(e);
    }
    Ok(file)
}

/// What the cache knows of its writers: whether one abandoned now keeps its part file
/// (`keep`, set by a stop; `None` for a download that leaves nothing to resume), and how
/// many are alive (`live`).
pub(crate) struct WriterWatch {
    pub(crate) keep: Option<Arc<std::sync::atomic::AtomicBool>>,
    pub(crate) live: Arc<std::sync::atomic::AtomicUsize>,
}

/// Starts a blocking writer that owns `temp`: it creates the file (mode `file_mode`; or
/// appends to `existing`, a dead download's part file taken over), writes into it, and
/// removes it on every path but a `Finish`. Owning the file on the thread that creates it
/// closes a race: a guard on the network side could run before the file exists.
///
/// `watch.keep`, when given and set by the time the download is abandoned, keeps the part file
/// instead (everything written made durable, and said so through `on_sync`): a download
/// stopped at exit is resumed by the next process, as one killed would be.
pub(crate) fn spawn_writer(
    layout: &Layout,
    temp: TempFile,
    existing: Option<File>,
    make_room: MakeRoom,
    on_sync: OnSync,
    on_written: OnWritten,
    watch: WriterWatch,
) -> SpawnedWriter {
    let WriterWatch { keep, live } = watch;
    let (tx, mut rx) = mpsc::channel::<WriteOp>(64);
    let path = temp.path().to_owned();
    let layout = layout.clone();
    live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let done = tokio::task::spawn_blocking(move || {
        /// Counts this thread out however it ends.
        struct Alive(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _alive = Alive(live);
        let mut file = match existing {
            Some(file) => file,
            None => create_part(&layout, &temp)?,
        };
        let mut written = file.metadata()?.len();
        let mut synced = written;
        // A second handle for readers: reading by offset never moves this one's position.
        if let Ok(reader) = file.try_clone() {
            on_written(Written::Opened(Arc::new(reader), written));
        }
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
        // Writes `data` and, every SYNC_EVERY bytes, makes what was written durable.
        let flush =
            |file: &mut File, data: &[u8], written: &mut u64, synced: &mut u64| -> io::Result<()> {
                write_all_making_room(file, data, &make_room)?;
                *written += data.len() as u64;
                on_written(Written::Bytes(*written));
                if *written >= *synced + SYNC_EVERY {
                    file.sync_data()?;
                    *synced = *written;
                    on_sync(*synced);
                }
                Ok(())
            };
        loop {
            // With nothing more to write yet, what is buffered goes to the file, so that
            // readers of a download slower than the disk see each byte as it arrives.
            let op = match rx.try_recv() {
                Ok(op) => Some(op),
                Err(_) => {
                    if !buf.is_empty() {
                        flush(&mut file, &buf, &mut written, &mut synced)?;
                        buf.clear();
                    }
                    rx.blocking_recv()
                }
            };
            let Some(op) = op else {
                if keep.is_some_and(|k| k.load(std::sync::atomic::Ordering::Relaxed))
                    && written + buf.len() as u64 > 0
                {
                    flush(&mut file, &buf, &mut written, &mut synced)?;
                    file.sync_data()?;
                    on_sync(written);
                    temp.keep();
                    return Err(io::Error::other(
                        "download stopped; its part file is kept for a resume",
                    ));
                }
                // Dropping `temp` on return removes the file.
                return Err(io::Error::other("download abandoned"));
            };
            match op {
                WriteOp::Data(chunk) => {
                    if buf.len() + chunk.len() > WRITE_BUFFER {
                        flush(&mut file, &buf, &mut written, &mut synced)?;
                        buf.clear();
                    }
                    if chunk.len() >= WRITE_BUFFER {
                        flush(&mut file, &chunk, &mut written, &mut synced)?;
                    } else {
                        buf.extend_from_slice(&chunk);
                    }
                }
                WriteOp::Restart => {
                    buf.clear();
                    file.set_len(0)?;
                    io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
                    written = 0;
                    synced = 0;
                    on_sync(0);
                    on_written(Written::Restarted);
                }
                WriteOp::Finish => break,
            }
        }
        flush(&mut file, &buf, &mut written, &mut synced)?;
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
