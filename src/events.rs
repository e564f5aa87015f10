//! Events for progress bars and dashboards: [`ImageCache::subscribe`](crate::ImageCache::subscribe).
//!
//! A broadcast channel: every subscriber sees every event, and one that falls behind loses the
//! oldest events rather than slowing anything down ([`Subscription::recv`] reports how many it
//! missed). Nothing is allocated for an event while nobody subscribes.

use serde::Serialize;
use tokio::sync::broadcast;

/// How many events a subscriber may fall behind before it loses the oldest.
const CAPACITY: usize = 1024;
/// Progress is reported at most once per this many bytes of a download.
pub(crate) const PROGRESS_STEP: u64 = 1024 * 1024;

/// Something that happened in the cache. URLs are normalised and carry no credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A download began; `total` is its `Content-Length`, when known.
    DownloadStarted {
        /// The URL.
        url: String,
        /// Bytes expected.
        total: Option<u64>,
    },
    /// Bytes of a running download have arrived (reported every mebibyte or so).
    Progress {
        /// The URL.
        url: String,
        /// Bytes received so far.
        received: u64,
        /// Bytes expected, when known.
        total: Option<u64>,
    },
    /// A download was committed.
    DownloadFinished {
        /// The URL.
        url: String,
        /// Its size.
        bytes: u64,
        /// How long it took, retries included.
        elapsed_ms: u64,
    },
    /// A download failed (after its retries).
    DownloadFailed {
        /// The URL.
        url: String,
        /// The error, as displayed.
        error: String,
    },
    /// A request was answered from a committed entry.
    Hit {
        /// The URL.
        url: String,
    },
    /// A request joined a download already running.
    CoalescedWait {
        /// The URL.
        url: String,
    },
    /// An entry was removed to honour the size cap.
    Evicted {
        /// The URL.
        url: String,
        /// Its size.
        bytes: u64,
    },
    /// An entry was removed after its TTL and grace period.
    Expired {
        /// The URL.
        url: String,
        /// Its size.
        bytes: u64,
    },
}

/// The sending side, held by the cache.
#[derive(Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<Event>,
}

impl Events {
    pub(crate) fn new() -> Events {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }

    /// Whether anyone listens; check before building an event.
    pub(crate) fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Sends `make()` if anyone listens.
    pub(crate) fn emit(&self, make: impl FnOnce() -> Event) {
        if self.wanted() {
            // An error only means every subscriber left meanwhile.
            let _ = self.tx.send(make());
        }
    }

    pub(crate) fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
        }
    }
}

/// A stream of [`Event`]s from one cache.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Event>,
}

/// What [`Subscription::recv`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// The next event.
    Event(Event),
    /// The subscriber fell behind and this many events were dropped; the next call goes on
    /// with the oldest event still kept.
    Missed(u64),
    /// The cache is gone: no more events will come.
    Closed,
}

impl Subscription {
    /// Waits for the next event.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is never lost by dropping this future.
    pub async fn recv(&mut self) -> Received {
        match self.rx.recv().await {
            Ok(event) => Received::Event(event),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Missed(n),
            Err(broadcast::error::RecvError::Closed) => Received::Closed,
        }
    }

    /// The next event if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<Received> {
        match self.rx.try_recv() {
            Ok(event) => Some(Received::Event(event)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Received::Missed(n)),
            Err(broadcast::error::TryRecvError::Closed) => Some(Received::Closed),
            Err(broadcast::error::TryRecvError::Empty) => None,
        }
    }
}
