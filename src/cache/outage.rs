//! Origins that did not answer, remembered for a while (`CACHE_OUTAGE_MEMORY`): with the
//! image server down, every call would otherwise pay for its retries (seconds; a minute for
//! a server that accepts and never answers) before its stale copy or its error. While an
//! origin's outage is remembered a download from it fails at once, with the reason, and an
//! expired copy is served at once. The first download after the memory ends asks again,
//! and any answer (even an error status) forgets the outage.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::duration_ms;
use crate::error::{Error, ErrorKind, Result};

/// The outages of this process's origins.
#[derive(Debug)]
pub(super) struct Outages {
    memory_ms: u64,
    // A std Mutex: a lookup or an insert, never held across an .await.
    by_origin: Mutex<HashMap<String, Outage>>,
}

#[derive(Debug, Clone)]
struct Outage {
    /// When the last download that failed gave up, by the cache's clock.
    at_ms: u64,
    /// Why, as displayed.
    reason: String,
}

impl Outages {
    /// Outages remembered for `memory` (none when it is zero).
    pub(super) fn new(memory: Duration) -> Outages {
        Outages {
            memory_ms: duration_ms(memory),
            by_origin: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Outage>> {
        self.by_origin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An error if `origin`'s outage is remembered at `now_ms`: the download is not tried.
    pub(super) fn check(&self, origin: &str, now_ms: u64) -> Result<()> {
        if self.memory_ms == 0 {
            return Ok(());
        }
        let Some(outage) = self.lock().get(origin).cloned() else {
            return Ok(());
        };
        let until = outage.at_ms.saturating_add(self.memory_ms);
        if now_ms >= until {
            return Ok(());
        }
        let ago = Duration::from_millis(now_ms.saturating_sub(outage.at_ms) / 1000 * 1000);
        let left = Duration::from_millis(until - now_ms).as_secs().max(1);
        Err(Error::new(
            ErrorKind::Network,
            format!(
                "{origin} did not answer {} ago ({}); not asked again for {left} s (CACHE_OUTAGE_MEMORY)",
                humantime::format_duration(ago),
                outage.reason
            ),
        ))
    }

    /// What a download from `origin` ended with, and whether the origin `answered` any of
    /// its attempts: a network failure (after its retries) with no answer at all is
    /// remembered; an answer (a body cut midway is one: the next call resumes it) forgets
    /// the outage.
    pub(super) fn after<T>(&self, origin: &str, now_ms: u64, result: &Result<T>, answered: bool) {
        if self.memory_ms == 0 {
            return;
        }
        match result {
            Err(e) if e.kind() == ErrorKind::Network && !answered => {
                let reason = e.to_string();
                self.lock().insert(
                    origin.to_owned(),
                    Outage {
                        at_ms: now_ms,
                        reason,
                    },
                );
            }
            Err(_) if !answered => {}
            _ => {
                let mut map = self.lock();
                if !map.is_empty() {
                    map.remove(origin);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_remembered_for_its_time_and_forgotten_on_an_answer() {
        let o = Outages::new(Duration::from_secs(30));
        let down: Result<()> = Err(Error::new(ErrorKind::Network, "connection refused"));
        o.after("http://a", 1_000, &down, false);
        let e = o.check("http://a", 6_000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Network);
        assert!(e.is_transient());
        let text = e.to_string();
        assert!(text.contains("connection refused"), "{text}");
        assert!(
            text.contains("5s ago") && text.contains("for 25 s"),
            "{text}"
        );
        assert!(
            o.check("http://b", 6_000).is_ok(),
            "other origins are asked"
        );
        assert!(
            o.check("http://a", 31_000).is_ok(),
            "asked again after the memory"
        );
        // A status is an answer: the origin is up.
        let status: Result<()> = Err(Error::new(ErrorKind::HttpStatus, "503"));
        o.after("http://a", 31_000, &status, true);
        assert!(o.check("http://a", 31_001).is_ok());
        // Other failures (a digest, the disk) say nothing of the origin.
        o.after("http://a", 40_000, &down, false);
        o.after(
            "http://a",
            40_001,
            &Err::<(), _>(Error::new(ErrorKind::Io, "disk")),
            false,
        );
        assert!(o.check("http://a", 40_002).is_err());
        // A body cut midway: the origin answered.
        let cut: Result<()> = Err(Error::new(ErrorKind::Network, "connection reset"));
        o.after("http://a", 40_003, &cut, true);
        assert!(o.check("http://a", 40_004).is_ok());
        o.after("http://a", 40_005, &down, false);
        o.after("http://a", 40_006, &Ok(()), true);
        assert!(o.check("http://a", 40_007).is_ok());
    }

    #[test]
    fn a_zero_memory_remembers_nothing() {
        let o = Outages::new(Duration::ZERO);
        o.after(
            "http://a",
            0,
            &Err::<(), _>(Error::new(ErrorKind::Network, "x")),
            false,
        );
        assert!(o.check("http://a", 1).is_ok());
    }
}
