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

/// The most origins remembered at once (URLs a user types can name any number of hosts):
/// beyond it, the oldest outage is forgotten.
const MAX_ORIGINS: usize = 256;

/// The outages of this process's origins.
#[derive(Debug)]
pub(super) struct Outages {
    memory_ms: u64,
    // A std Mutex: a lookup or an insert, never held across an .await.
    by_origin: Mutex<HashMap<String, Outage>>,
}

#[derive(Debug, Clone, Default)]
struct Outage {
    /// When the last download that failed gave up, by the cache's clock (0: none).
    at_ms: u64,
    /// Why, as displayed.
    reason: String,
    /// When a download from it last got an answer: a failure of a download that started
    /// before then says nothing new.
    answered_ms: u64,
}

impl Outage {
    /// Whether it is remembered at `now_ms`, within `memory_ms` of the failure (a clock
    /// that went back forgets it).
    fn remembered(&self, now_ms: u64, memory_ms: u64) -> bool {
        self.at_ms != 0 && now_ms >= self.at_ms && now_ms < self.at_ms.saturating_add(memory_ms)
    }
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
        if !outage.remembered(now_ms, self.memory_ms) {
            return Ok(());
        }
        let until = outage.at_ms.saturating_add(self.memory_ms);
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

    /// What a download from `origin` that started at `started_ms` ended with at `now_ms`,
    /// and whether the origin `answered` any of its attempts: a network failure (after its
    /// retries) with no answer at all is remembered, unless another download got an answer
    /// after this one started; an answer (a body cut midway is one: the next call resumes
    /// it) forgets the outage.
    pub(super) fn after<T>(
        &self,
        origin: &str,
        started_ms: u64,
        now_ms: u64,
        result: &Result<T>,
        answered: bool,
    ) {
        if self.memory_ms == 0 {
            return;
        }
        match result {
            Err(e) if e.kind() == ErrorKind::Network && !answered => {
                let mut map = self.lock();
                if map.get(origin).is_some_and(|o| o.answered_ms > started_ms) {
                    return;
                }
                let outage = self.entry(&mut map, origin, now_ms);
                outage.at_ms = now_ms;
                outage.reason = e.to_string();
            }
            Err(_) if !answered => {}
            _ => {
                let mut map = self.lock();
                let outage = self.entry(&mut map, origin, now_ms);
                outage.at_ms = 0;
                outage.answered_ms = outage.answered_ms.max(now_ms);
            }
        }
    }

    /// `origin`'s entry, made room for: beyond [`MAX_ORIGINS`], the entries no longer
    /// remembered go, then the oldest.
    fn entry<'m>(
        &self,
        map: &'m mut HashMap<String, Outage>,
        origin: &str,
        now_ms: u64,
    ) -> &'m mut Outage {
        if map.len() >= MAX_ORIGINS && !map.contains_key(origin) {
            let memory = self.memory_ms;
            map.retain(|_, o| o.remembered(now_ms, memory));
            if map.len() >= MAX_ORIGINS
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, o)| o.at_ms.max(o.answered_ms))
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.entry(origin.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_remembered_for_its_time_and_forgotten_on_an_answer() {
        let o = Outages::new(Duration::from_secs(30));
        let down: Result<()> = Err(Error::new(ErrorKind::Network, "connection refused"));
        o.after("http://a", 1_000, 1_000, &down, false);
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
        o.after("http://a", 31_000, 31_000, &status, true);
        assert!(o.check("http://a", 31_001).is_ok());
        // Other failures (a digest, the disk) say nothing of the origin.
        o.after("http://a", 40_000, 40_000, &down, false);
        o.after(
            "http://a",
            40_001,
            40_001,
            &Err::<(), _>(Error::new(ErrorKind::Io, "disk")),
            false,
        );
        assert!(o.check("http://a", 40_002).is_err());
        // A body cut midway: the origin answered.
        let cut: Result<()> = Err(Error::new(ErrorKind::Network, "connection reset"));
        o.after("http://a", 40_003, 40_003, &cut, true);
        assert!(o.check("http://a", 40_004).is_ok());
        o.after("http://a", 40_005, 40_005, &down, false);
        o.after("http://a", 40_006, 40_006, &Ok(()), true);
        assert!(o.check("http://a", 40_007).is_ok());
    }

    #[test]
    fn a_failure_older_than_an_answer_is_not_remembered() {
        let o = Outages::new(Duration::from_secs(30));
        let down: Result<()> = Err(Error::new(ErrorKind::Network, "timed out"));
        // A download that hung from 1 s to 51 s, while another got an answer at 20 s.
        o.after("http://a", 19_000, 20_000, &Ok(()), true);
        o.after("http://a", 1_000, 51_000, &down, false);
        assert!(o.check("http://a", 52_000).is_ok());
        // One that started after the answer is news.
        o.after("http://a", 21_000, 53_000, &down, false);
        assert!(o.check("http://a", 54_000).is_err());
        // A clock that went back forgets it.
        assert!(o.check("http://a", 10_000).is_ok());
    }

    #[test]
    fn the_origins_remembered_are_bounded() {
        let o = Outages::new(Duration::from_secs(30));
        let down: Result<()> = Err(Error::new(ErrorKind::Network, "refused"));
        for i in 0..(MAX_ORIGINS as u64 * 4) {
            o.after(&format!("http://h{i}"), i, 1_000 + i, &down, false);
        }
        assert!(o.lock().len() <= MAX_ORIGINS);
        let last = format!("http://h{}", MAX_ORIGINS * 4 - 1);
        assert!(o.check(&last, 3_000).is_err(), "the newest are kept");
    }

    #[test]
    fn a_zero_memory_remembers_nothing() {
        let o = Outages::new(Duration::ZERO);
        o.after(
            "http://a",
            0,
            0,
            &Err::<(), _>(Error::new(ErrorKind::Network, "x")),
            false,
        );
        assert!(o.check("http://a", 1).is_ok());
    }
}
