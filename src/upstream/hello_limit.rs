//! Failed upstream `Hello`s (a wrong secret), and the HTTP API's requests
//! with a wrong key, counted per source address: a
//! small token bucket per source says whether a failure is answered at once
//! or held back, and a count per source lets the server log one line per
//! interval instead of one per failure.
//!
//! Sans-IO: no tokio, no clock; `now` is passed in. It owns no sockets and
//! decides nothing about a correct secret: a `Hello` with the right secret is
//! accepted whatever its source did before (the server never asks), so an
//! attacker that shares an address with a real service (every process on
//! loopback does) cannot lock that service out.
//!
//! The map of sources is bounded ([`MAX_SOURCES`]): a source that does not fit
//! shares one overflow entry with every other source that did not fit, so a
//! flood from many addresses is limited as one source and cannot grow memory.
//! [`HelloLimiter::sweep`] forgets sources that have nothing left to report
//! and whose bucket is full again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures one source may have answered at once, in a burst.
pub const FAILED_HELLO_BURST: u32 = 10;
/// Failures per second a source earns back, after its burst.
pub const FAILED_HELLO_RATE: u32 = 1;
/// At most one log line per source in this interval.
pub const FAILED_HELLO_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Sources tracked one by one; the others share one entry.
pub const MAX_SOURCES: usize = 4096;

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A TCP peer's address.
    Ip(IpAddr),
    /// The Unix socket (every peer on it is one source).
    Unix,
    /// Every source that did not fit in the map.
    Other,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Ip(ip) => ip.fmt(f),
            Source::Unix => f.write_str("the unix socket"),
            Source::Other => f.write_str("other addresses"),
        }
    }
}

/// What to do with one failed `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Within the source's budget: refuse it at once. Otherwise the server
    /// holds the refusal back (and says `CODE_RATE_LIMITED`).
    pub allowed: bool,
    /// A line is due for this source now.
    pub report: Option<Report>,
}

/// One log line: `failures` failed `Hello`s from `source` in the last
/// `over` (since its previous line; zero for a source's first failure,
/// which is logged at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub source: Source,
    pub failures: u64,
    pub over: Duration,
}

impl Report {
    /// Logs the line: `first` for a source's first failure (logged at
    /// once), else the count of `what` in the last interval.
    pub fn log(&self, first: &str, what: &str) {
        if self.over.is_zero() {
            tracing::warn!(
                source = %self.source,
                "{first} (further failures from this source are logged once per {}s with a count)",
                FAILED_HELLO_LOG_INTERVAL.as_secs()
            );
        } else {
            tracing::warn!(
                source = %self.source,
                failures = self.failures,
                "{} {what} from {} in the last {}s",
                self.failures,
                self.source,
                self.over.as_secs()
            );
        }
    }
}

struct Entry {
    tokens: f64,
    refilled: Instant,
    /// Failures not logged yet.
    unreported: u64,
    /// When the last line for this source was logged (or would have been:
    /// the first failure logs at once).
    reported: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            tokens: f64::from(FAILED_HELLO_BURST),
            refilled: now,
            unreported: 0,
            reported: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now.max(self.refilled);
        self.tokens =
            (self.tokens + dt * f64::from(FAILED_HELLO_RATE)).min(f64::from(FAILED_HELLO_BURST));
    }

    /// A line for the unreported failures, when one is due at `now`.
    fn due(&mut self, source: Source, now: Instant) -> Option<Report> {
        if self.unreported == 0 {
            return None;
        }
        let over = match self.reported {
            Some(t) => now.saturating_duration_since(t),
            None => Duration::ZERO,
        };
        if self.reported.is_some() && over < FAILED_HELLO_LOG_INTERVAL {
            return None;
        }
        let r = Report {
            source,
            failures: self.unreported,
            over,
        };
        self.unreported = 0;
        self.reported = Some(now);
        Some(r)
    }
}

/// Failed `Hello`s by source; see the module doc.
pub struct HelloLimiter {
    sources: HashMap<Source, Entry>,
    max_sources: usize,
}

impl Default for HelloLimiter {
    fn default() -> Self {
        Self::new(MAX_SOURCES)
    }
}

impl HelloLimiter {
    /// A limiter that tracks at most `max_sources` sources one by one (at
    /// least 1), plus the shared overflow entry.
    pub fn new(max_sources: usize) -> Self {
        Self {
            sources: HashMap::new(),
            max_sources: max_sources.max(1),
        }
    }

    /// Counts one failed `Hello` from `source` at `now`.
    pub fn handle_failure(&mut self, source: Source, now: Instant) -> Verdict {
        let key = if self.sources.contains_key(&source) || self.sources.len() < self.max_sources {
            source
        } else {
            Source::Other
        };
        let e = self.sources.entry(key).or_insert_with(|| Entry::new(now));
        e.refill(now);
        let allowed = e.tokens >= 1.0;
        if allowed {
            e.tokens -= 1.0;
        }
        e.unreported += 1;
        Verdict {
            allowed,
            report: e.due(key, now),
        }
    }

    /// The lines due at `now` (failures older than the interval that no
    /// later failure has reported yet), and forgets the sources with nothing
    /// to report and a full bucket. Call it about once per interval.
    pub fn sweep(&mut self, now: Instant) -> Vec<Report> {
        let mut due = Vec::new();
        self.sources.retain(|&source, e| {
            if let Some(r) = e.due(source, now) {
                due.push(r);
            }
            e.refill(now);
            let idle = e.tokens >= f64::from(FAILED_HELLO_BURST);
            let quiet = e.unreported == 0
                && e.reported
                    .is_none_or(|t| now.saturating_duration_since(t) >= FAILED_HELLO_LOG_INTERVAL);
            !(idle && quiet)
        });
        due
    }

    /// Sources tracked now (the overflow entry included).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Source {
        Source::Ip(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn a_burst_is_answered_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut l = HelloLimiter::default();
        for i in 0..FAILED_HELLO_BURST {
            assert!(
                l.handle_failure(ip(1), t0).allowed,
                "failure {i} is in the burst"
            );
        }
        assert!(!l.handle_failure(ip(1), t0).allowed, "past the burst");
        assert!(
            !l.handle_failure(ip(1), t0 + Duration::from_millis(900))
                .allowed
        );
        // One a second comes back (refused failures take none).
        let t2 = t0 + Duration::from_secs(2);
        assert!(l.handle_failure(ip(1), t2).allowed);
        assert!(l.handle_failure(ip(1), t2).allowed);
        assert!(!l.handle_failure(ip(1), t2).allowed);
        // Another source has its own bucket.
        assert!(l.handle_failure(ip(2), t0).allowed);
    }

    #[test]
    fn one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut l = HelloLimiter::default();
        // The first failure is logged at once.
        let r = l.handle_failure(ip(1), t0).report.expect("a first line");
        assert_eq!((r.source, r.failures), (ip(1), 1));
        // The next 1,999 within the interval are not.
        for i in 1..2000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            assert_eq!(l.handle_failure(ip(1), now).report, None, "failure {i}");
        }
        // The sweep before the interval says nothing; after it, one line.
        assert!(l.sweep(t0 + Duration::from_secs(5)).is_empty());
        let due = l.sweep(t0 + FAILED_HELLO_LOG_INTERVAL);
        assert_eq!(
            due,
            vec![Report {
                source: ip(1),
                failures: 1999,
                over: FAILED_HELLO_LOG_INTERVAL
            }]
        );
        // A failure after the interval reports itself at once.
        let later = t0 + 2 * FAILED_HELLO_LOG_INTERVAL + Duration::from_secs(1);
        let r = l.handle_failure(ip(1), later).report.expect("due");
        assert_eq!((r.failures, r.over), (1, Duration::from_secs(11)));
    }

    #[test]
    fn the_map_is_bounded_and_the_overflow_is_limited_as_one() {
        let t0 = Instant::now();
        let mut l = HelloLimiter::new(4);
        for n in 0..4 {
            assert!(l.handle_failure(ip(n), t0).allowed);
        }
        // Many more addresses share one bucket.
        let allowed = (4..=250)
            .filter(|&n| l.handle_failure(ip(n), t0).allowed)
            .count();
        assert_eq!(allowed, FAILED_HELLO_BURST as usize);
        assert_eq!(l.tracked(), 5, "four sources and the overflow");
        let r = l.sweep(t0 + FAILED_HELLO_LOG_INTERVAL);
        assert!(r
            .iter()
            .any(|r| r.source == Source::Other && r.failures == 246));
    }

    #[test]
    fn the_sweep_forgets_quiet_sources() {
        let t0 = Instant::now();
        let mut l = HelloLimiter::default();
        l.handle_failure(ip(1), t0);
        // Not yet: its first line is younger than the interval.
        l.sweep(t0 + Duration::from_secs(1));
        assert_eq!(l.tracked(), 1);
        l.sweep(t0 + FAILED_HELLO_LOG_INTERVAL);
        assert_eq!(l.tracked(), 0);
        // A source still in its burst's refill is kept.
        for _ in 0..FAILED_HELLO_BURST {
            l.handle_failure(ip(2), t0);
        }
        assert_eq!(l.sweep(t0 + FAILED_HELLO_LOG_INTERVAL).len(), 1);
        assert_eq!(l.tracked(), 1, "it has just logged a line");
        l.sweep(t0 + 2 * FAILED_HELLO_LOG_INTERVAL);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn a_clock_that_goes_back_changes_nothing() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut l = HelloLimiter::default();
        for _ in 0..FAILED_HELLO_BURST {
            l.handle_failure(ip(1), t0);
        }
        assert!(
            !l.handle_failure(ip(1), t0 - Duration::from_secs(50))
                .allowed
        );
    }
}
