//! `GET /api/downloads`: the downloads in progress, each with its bytes, speed and time
//! left. They are followed from the cache's events by the router from when it is built, so
//! that a page loaded in the middle of a download shows it at once, with its speed.
//!
//! Times are the cache's clock. The speed is over the last [`WINDOW`]: a download that has
//! received nothing for that long shows a speed of zero and no time left.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::response::Json;
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::AppState;
use crate::clock::unix_ms;
use crate::{Event, ImageCache, Received};

/// The span the speed is measured over.
const WINDOW: Duration = Duration::from_secs(5);
/// The shortest span a speed is told from: a download of a few milliseconds has none yet
/// (rather than a speed of zero, which would say it stalled).
const MIN_SPAN: Duration = Duration::from_secs(1);

/// One download in progress.
#[derive(Debug)]
struct Track {
    total: Option<u64>,
    received: u64,
    started: SystemTime,
    /// `(when, bytes received by then)`, oldest first: the newest at or before the window's
    /// start, and every later one.
    points: VecDeque<(SystemTime, u64)>,
}

impl Track {
    fn new(now: SystemTime, received: u64, total: Option<u64>) -> Track {
        Track {
            total,
            received,
            started: now,
            points: VecDeque::from([(now, received)]),
        }
    }

    fn progress(&mut self, now: SystemTime, received: u64, total: Option<u64>) {
        self.received = received;
        self.total = total.or(self.total);
        self.points.push_back((now, received));
        let start = now.checked_sub(WINDOW).unwrap_or(now);
        while self.points.len() > 1 && self.points[1].0 <= start {
            self.points.pop_front();
        }
    }

    /// Bytes per second over the window ending `now`, once a second has passed.
    fn speed(&self, now: SystemTime) -> Option<f64> {
        let start = now.checked_sub(WINDOW).unwrap_or(now);
        let base = self
            .points
            .iter()
            .rev()
            .find(|(t, _)| *t <= start)
            .or(self.points.front())?;
        let elapsed = now.duration_since(base.0).ok()?;
        (elapsed >= MIN_SPAN)
            .then(|| self.received.saturating_sub(base.1) as f64 / elapsed.as_secs_f64())
    }

    fn info(&self, url: &str, now: SystemTime) -> DownloadInfo {
        let speed = self.speed(now);
        let left = self.total.map(|t| t.saturating_sub(self.received));
        let eta_ms = match (left, speed) {
            (Some(left), Some(speed)) if speed > 0.0 => Some((left as f64 / speed * 1000.0) as u64),
            _ => None,
        };
        DownloadInfo {
            url: url.to_owned(),
            received: self.received,
            total: self.total,
            started_at_ms: unix_ms(self.started),
            elapsed_ms: now
                .duration_since(self.started)
                .map_or(0, |d| d.as_millis() as u64),
            bytes_per_sec: speed,
            eta_ms,
        }
    }
}

/// A download in progress, as `GET /api/downloads` answers it.
#[derive(Debug, Serialize)]
struct DownloadInfo {
    /// The URL, as the cache's events name it.
    url: String,
    /// Bytes received so far (reported every mebibyte or so).
    received: u64,
    /// Bytes expected, when the origin said.
    total: Option<u64>,
    /// When it started, by the cache's clock: milliseconds since the Unix epoch.
    started_at_ms: u64,
    /// Milliseconds since it started.
    elapsed_ms: u64,
    /// Bytes per second over the last five seconds; `null` for the first second.
    bytes_per_sec: Option<f64>,
    /// Milliseconds left at that speed; `null` when the total or a speed is unknown.
    eta_ms: Option<u64>,
}

type Tracks = Arc<Mutex<HashMap<String, Track>>>;

/// The downloads in progress and the task that follows them; the task stops when this is
/// dropped (with the router that holds it), or when the cache is.
pub(super) struct Downloads {
    tracks: Tracks,
    _stop: DropGuard,
}

impl Downloads {
    /// Starts following the cache's events when called inside a Tokio runtime (outside one
    /// no download is ever shown).
    pub(super) fn start(cache: &ImageCache) -> Downloads {
        let tracks = Tracks::default();
        let stop = CancellationToken::new();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut events = cache.subscribe();
            let (cache, followed, stopped) = (cache.clone(), Arc::clone(&tracks), stop.clone());
            rt.spawn(async move {
                loop {
                    let received = tokio::select! {
                        () = stopped.cancelled() => break,
                        received = events.recv() => received,
                    };
                    let event = match received {
                        Received::Event(event) => event,
                        // What was missed may include ends: start over from the next progress.
                        Received::Missed(_) => {
                            lock(&followed).clear();
                            continue;
                        }
                        Received::Closed => break,
                    };
                    follow(&mut lock(&followed), event, cache.now());
                }
            });
        }
        Downloads {
            tracks,
            _stop: stop.drop_guard(),
        }
    }
}

fn follow(tracks: &mut HashMap<String, Track>, event: Event, now: SystemTime) {
    match event {
        Event::DownloadStarted { url, total } => {
            tracks.insert(url, Track::new(now, 0, total));
        }
        Event::Progress {
            url,
            received,
            total,
        } => match tracks.get_mut(&url) {
            Some(track) => track.progress(now, received, total),
            None => {
                tracks.insert(url, Track::new(now, received, total));
            }
        },
        Event::DownloadFinished { url, .. } | Event::DownloadFailed { url, .. } => {
            tracks.remove(&url);
        }
        _ => {}
    }
}

fn lock(
    tracks: &Mutex<HashMap<String, Track>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Track>> {
    tracks.lock().unwrap_or_else(|e| e.into_inner())
}

/// `GET /api/downloads`.
pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/api/downloads", get(api_downloads))
}

/// The downloads in progress, oldest first.
async fn api_downloads(State(st): State<Arc<AppState>>) -> Json<Vec<DownloadInfo>> {
    // None is running: anything still followed lost its end to a lagging subscription.
    if st.cache.stats().downloads_in_progress == 0 {
        return Json(Vec::new());
    }
    let now = st.cache.now();
    let tracks = lock(&st.downloads.tracks);
    let mut list: Vec<DownloadInfo> = tracks.iter().map(|(url, t)| t.info(url, now)).collect();
    list.sort_by(|a, b| (a.started_at_ms, &a.url).cmp(&(b.started_at_ms, &b.url)));
    Json(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: SystemTime, ms: u64) -> SystemTime {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_speed_is_over_the_last_five_seconds_and_the_time_left_follows() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut track = Track::new(t0, 0, Some(100_000_000));
        assert_eq!(track.speed(t0), None, "no time has passed");
        track.progress(at(t0, 500), 100, None);
        assert_eq!(track.speed(at(t0, 999)), None, "not a second yet");
        // 1 MB/s for 10 s, then 4 MB/s for 5 s.
        for s in 1..=10 {
            track.progress(at(t0, s * 1000), s * 1_000_000, None);
        }
        assert_eq!(track.speed(at(t0, 10_000)), Some(1_000_000.0));
        for s in 1..=5 {
            track.progress(at(t0, 10_000 + s * 1000), 10_000_000 + s * 4_000_000, None);
        }
        let info = track.info("u", at(t0, 15_000));
        assert_eq!(
            info.bytes_per_sec,
            Some(4_000_000.0),
            "the window forgot the slow start"
        );
        assert_eq!(info.total, Some(100_000_000), "kept from the start");
        assert_eq!(info.eta_ms, Some(17_500), "70 MB left at 4 MB/s");
        assert_eq!(info.elapsed_ms, 15_000);
        assert!(
            track.points.len() <= 7,
            "{} points kept",
            track.points.len()
        );
    }

    #[test]
    fn a_stalled_download_has_no_speed_and_no_time_left() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut track = Track::new(t0, 0, Some(10));
        track.progress(at(t0, 1000), 5, None);
        let info = track.info("u", at(t0, 2000));
        assert_eq!((info.bytes_per_sec, info.eta_ms), (Some(2.5), Some(2000)));
        let stalled = track.info("u", at(t0, 60_000));
        assert_eq!((stalled.bytes_per_sec, stalled.eta_ms), (Some(0.0), None));
        let unknown = Track::new(t0, 0, None).info("u", at(t0, 1000));
        assert_eq!((unknown.bytes_per_sec, unknown.eta_ms), (Some(0.0), None));
    }

    #[test]
    fn events_start_move_and_end_a_download() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut tracks = HashMap::new();
        let url = "http://h/a".to_owned();
        follow(
            &mut tracks,
            Event::DownloadStarted {
                url: url.clone(),
                total: Some(8),
            },
            t0,
        );
        follow(
            &mut tracks,
            Event::Progress {
                url: url.clone(),
                received: 4,
                total: Some(8),
            },
            at(t0, 1000),
        );
        assert_eq!(tracks[&url].received, 4);
        assert_eq!(tracks[&url].started, t0);
        follow(&mut tracks, Event::Hit { url: url.clone() }, t0);
        assert_eq!(tracks.len(), 1);
        follow(
            &mut tracks,
            Event::DownloadFinished {
                url: url.clone(),
                bytes: 8,
                elapsed_ms: 1,
            },
            t0,
        );
        assert!(tracks.is_empty());
        // Progress of a download whose start was missed starts following it.
        follow(
            &mut tracks,
            Event::Progress {
                url: url.clone(),
                received: 2,
                total: None,
            },
            t0,
        );
        follow(
            &mut tracks,
            Event::DownloadFailed {
                url: url.clone(),
                error: "x".into(),
            },
            t0,
        );
        assert!(tracks.is_empty());
    }
}
