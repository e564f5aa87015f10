//! Answers the origin said not to store (`Cache-Control: no-store`): the download's own
//! file, complete and checked, handed out to its callers and never committed. It owns the
//! file (its name in the temp directory, held with a shared lock so that no tidying removes
//! it) and the download's reservation, so that the bytes count against the cap for as long
//! as anyone holds them; both go with the last handle.

use std::sync::{Arc, Mutex};

use super::pin::{PinHome, Pinned};
use super::transfer::{Finished, Reservation, Transfer, WriterLock};
use crate::error::{Error, Result};
use crate::index::{Entry, Removals};
use crate::store::{Meta, TempFile};

/// The home of an answer not stored: letting its last pin go deletes its file.
struct Unstored {
    _temp: TempFile,
    _file: std::fs::File,
    _reservation: Option<Reservation>,
}

impl PinHome for Unstored {
    fn let_go(&self, _entry: &Arc<Entry>) -> Removals {
        // Nothing in the index: the file goes when this home is dropped with the pin.
        Removals::none()
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
    let Finished {
        temp,
        file,
        sha256,
        size,
        validators,
    } = finished;
    // Read by anyone, removed by no one, while it is held.
    file.lock_shared()
        .map_err(|e| Error::io("cannot lock the download", e))?;
    let md = file
        .metadata()
        .map_err(|e| Error::io("cannot stat the download", e))?;
    let r = transfer.r;
    let meta = Meta {
        version: 1,
        url: r.display.clone(),
        file_name: r.file_name.clone(),
        sha256,
        size,
        mtime_ns: crate::store::mtime_ns(&md),
        etag: validators.etag,
        last_modified: validators.last_modified,
        fetched_at,
        expires_at,
        generation: String::new(),
    };
    let entry = Arc::new(Entry::new(
        r.key.clone(),
        meta,
        temp.path().to_owned(),
        fetched_at,
        0,
        0,
    ));
    if let Some(lock) = transfer.lock.take() {
        clear(&lock);
    }
    let home = Unstored {
        _temp: temp,
        _file: file,
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
