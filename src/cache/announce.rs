//! [`Announcement`]: one download's events, from the guard that owns them. However the
//! download goes (the origin, the tier, a fallback from one to the other, a resume, a stale
//! copy, a failure, a panic or a task stopped at shutdown), subscribers see at most one
//! `DownloadStarted`, when its first bytes are about to be written, and exactly one end,
//! `DownloadFinished` or `DownloadFailed`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::events::{Event, Events};

const STARTED: u8 = 1;
const ENDED: u8 = 2;

/// The guard of one download's events.
#[derive(Debug)]
pub(super) struct Announcement {
    events: Arc<Events>,
    url: String,
    /// When the download was asked for: the elapsed time of an end that its stage did not
    /// report (with waits for other processes and hosts).
    since: Instant,
    said: AtomicU8,
}

impl Announcement {
    pub(super) fn new(events: &Arc<Events>, url: &str) -> Announcement {
        Announcement {
            events: Arc::clone(events),
            url: url.to_owned(),
            since: Instant::now(),
            said: AtomicU8::new(0),
        }
    }

    /// Bytes are about to be written: `DownloadStarted`, the first time only.
    pub(super) fn started(&self, total: Option<u64>) {
        if self.said.fetch_or(STARTED, Ordering::AcqRel) & (STARTED | ENDED) == 0 {
            self.events.emit(|| Event::DownloadStarted {
                url: self.url.clone(),
                total,
            });
        }
    }

    /// The download committed `bytes` after transferring them for `elapsed` (from its first
    /// attempt, retries included): `DownloadFinished`, unless it has ended.
    pub(super) fn finished(&self, bytes: u64, elapsed: Duration) {
        if self.end() {
            self.events.emit(|| Event::DownloadFinished {
                url: self.url.clone(),
                bytes,
                elapsed_ms: elapsed.as_millis() as u64,
            });
        }
    }

    /// The download task is done, with a file of this size or an error: a download that
    /// started and whose stage did not say how it ended (a revalidation after a tier read
    /// that failed midway, say) ends now.
    pub(super) fn done(&self, result: std::result::Result<u64, &Error>) {
        if self.said.load(Ordering::Acquire) != STARTED {
            return;
        }
        match result {
            Ok(size) => self.finished(size, self.since.elapsed()),
            Err(e) => self.failed(e),
        }
    }

    /// The download task was dropped before it was done (a panic, a runtime shut down): a
    /// download that started ends now, not when its last caller lets go.
    pub(super) fn stopped(&self) {
        if self.said.load(Ordering::Acquire) == STARTED && self.end() {
            self.events.emit(|| Event::DownloadFailed {
                url: self.url.clone(),
                error: "the download was stopped".to_owned(),
            });
        }
    }

    /// The download failed (or ended in a stale copy): `DownloadFailed`, unless it has
    /// ended.
    pub(super) fn failed(&self, error: &Error) {
        if self.end() {
            self.events.emit(|| Event::DownloadFailed {
                url: self.url.clone(),
                error: error.to_string(),
            });
        }
    }

    /// Whether this is the end: the first call only.
    fn end(&self) -> bool {
        self.said.fetch_or(ENDED, Ordering::AcqRel) & ENDED == 0
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        // A download that started and never said how it ended: its task panicked or was
        // stopped with the runtime. A dashboard would show it running for ever.
        if *self.said.get_mut() == STARTED {
            self.events.emit(|| Event::DownloadFailed {
                url: self.url.clone(),
                error: "the download was stopped".to_owned(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::events::Received;

    fn said(events: &mut crate::events::Subscription) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Some(Received::Event(e)) = events.try_recv() {
            out.push(match e {
                Event::DownloadStarted { .. } => "started",
                Event::DownloadFinished { .. } => "finished",
                Event::DownloadFailed { .. } => "failed",
                _ => "other",
            });
        }
        out
    }

    #[test]
    fn a_download_starts_once_and_ends_once() {
        let events = Arc::new(Events::new());
        let mut sub = events.subscribe();
        let a = Announcement::new(&events, "http://h/a.nii.gz");
        // A tier read that started, then the origin's writer after the fallback.
        a.started(Some(10));
        a.started(Some(10));
        a.finished(10, Duration::ZERO);
        a.failed(&Error::new(ErrorKind::Network, "late"));
        a.finished(10, Duration::ZERO);
        drop(a);
        assert_eq!(said(&mut sub), ["started", "finished"]);
    }

    #[test]
    fn a_failure_before_any_byte_is_an_end_without_a_start() {
        let events = Arc::new(Events::new());
        let mut sub = events.subscribe();
        let a = Announcement::new(&events, "http://h/a.nii.gz");
        a.failed(&Error::new(ErrorKind::HttpStatus, "404"));
        a.started(None);
        drop(a);
        assert_eq!(said(&mut sub), ["failed"]);
    }

    #[test]
    fn a_download_stopped_after_its_start_still_ends() {
        let events = Arc::new(Events::new());
        let mut sub = events.subscribe();
        let a = Announcement::new(&events, "http://h/a.nii.gz");
        a.started(None);
        drop(a);
        assert_eq!(said(&mut sub), ["started", "failed"]);
        let quiet = Announcement::new(&events, "http://h/b.nii.gz");
        drop(quiet);
        assert_eq!(said(&mut sub), Vec::<&str>::new());
    }
}
