//! Answers the origin said not to store (`Cache-Control: no-store`): the download's own
//! file, complete and checked, handed out to its callers and never committed. It owns the
//! file, under the URL's own file name in a directory of its own in the temp directory
//! (`tmp/<key>.<pid>-<n>-<salt>.nostore/<file name>`, so that a reader that goes by the
//! extension still finds `.nii.gz`), held with a shared lock so that no tidying removes it,
//! and the download's reservation, so that the bytes count against the cap for as long as
//! anyone holds them; all go with the last handle.

use std::sync::{Arc, Mutex};

use super::pin::{PinHome, Pinned};
use super::transfer::{Finished, Reservation, Transfer, WriterLock};
use crate::error::{Error, Result};
use crate::index::{Entry, Removals};

/// The home of an answer not stored: letting its last pin go deletes its file and its
/// directory.
struct Unstored {
    layout: crate::store::Layout,
    dir: std::path::PathBuf,
    file: std::fs::File,
    _reservation: Option<Reservation>,
}

impl Drop for Unstored {
    fn drop(&mut self) {
        self.layout.remove_any(&self.dir);
    }
}

impl PinHome for Unstored {
    fn let_go(&self, _entry: &Arc<Entry>) -> Removals {
        // Nothing in the index: the file goes when this home is dropped with the pin.
        Removals::none()
    }

    fn open(&self, entry: &Entry) -> std::io::Result<std::fs::File> {
        self.layout.reopen(&entry.path, &self.file)
    }
}

/// Hands out what `transfer` finished with, stamped with these times, without committing
/// it. The URL's writer lock is released with its record cleared: nothing is left to resume.
pub(super) fn hand_out(
    transfer: &mut Transfer<'_>,
    finished: Finished,
    fetched_at: u64,
    expires_at: u64,
) -> Result<Arc<Pinned>> {
    let r = transfer.r;
    let (temp, file, mut meta) = finished.into_parts(r, fetched_at, expires_at);
    // Read by anyone, removed by no one, while it is held.
    file.lock_shared()
        .map_err(|e| Error::io("cannot lock the download", e))?;
    let layout = &transfer.inner.layout;
    let dir = layout.unique_temp(r.key.as_str(), "nostore");
    let path = dir.join(&r.file_name);
    layout
        .create_dir_all(&dir)
        .and_then(|()| temp.persist(&path))
        .map_err(|e| {
            layout.remove_any(&dir);
            Error::io("cannot move the download to its own name", e)
        })?;
    let md = file
        .metadata()
        .map_err(|e| Error::io("cannot stat the download", e))?;
    meta.mtime_ns = crate::store::mtime_ns(&md);
    let entry = Arc::new(Entry::new(r.key.clone(), meta, path, fetched_at, 0, 0));
    if let Some(lock) = transfer.lock.take() {
        clear(&lock);
    }
    let home = Unstored {
        layout: layout.clone(),
        dir,
        file,
        _reservation: transfer.reservation.take(),
    };
    Ok(Pinned::new(entry, Arc::new(home)))
}

fn clear(lock: &Mutex<WriterLock>) {
    lock.lock()
        .unwrap_or_else(|e| e.into_inner())
        .lock
        .clear_record();
}
