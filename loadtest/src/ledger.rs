//! The soak's delivery ledger: the gateway's delivery reports, kept per
//! (session, lane, seq), matched against what the devices received.
//!
//! Every push the gateway accepts for a session (`PushReply.sessions`) has
//! one fate on that session: the device received it, or the gateway told
//! the upstream it did not (`CODE_DELIVERY_EXPIRED`, `CODE_DELIVERY_FAILED`),
//! or it is lost without a report. The ledger counts each of them exactly,
//! by the push's (session id, lane, seq): the key a `DeliveryReport` carries
//! and a device sees in each `Push`. It holds no I/O and no clock.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tether::wire::pb;

use crate::fleet::SessionRecord;

/// A set of `u64` as sorted, disjoint, inclusive ranges: a session's seqs
/// come mostly in order, so a lane holds a handful of ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    /// From ranges in any order (overlaps merge).
    #[cfg(test)]
    pub fn from_ranges(r: &[(u64, u64)]) -> Self {
        let mut s = RangeSet::default();
        for &(a, b) in r {
            s.insert_range(a, b);
        }
        s
    }

    /// Adds `a..=b`.
    pub fn insert_range(&mut self, a: u64, b: u64) {
        for x in a..=b {
            self.insert(x);
        }
    }

    /// Adds `x`; false if it was there.
    pub fn insert(&mut self, x: u64) -> bool {
        let v = &mut self.0;
        // The common case: in order, at the end.
        if let Some(last) = v.last_mut() {
            if last.1.checked_add(1) == Some(x) {
                last.1 = x;
                return true;
            }
            if last.1 < x {
                v.push((x, x));
                return true;
            }
        } else {
            v.push((x, x));
            return true;
        }
        // i: the first range that ends at or after x.
        let i = v.partition_point(|r| r.1 < x);
        if v[i].0 <= x {
            return false;
        }
        let joins_prev = i > 0 && v[i - 1].1 + 1 == x;
        let joins_next = v[i].0 == x + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                v[i - 1].1 = v[i].1;
                v.remove(i);
            }
            (true, false) => v[i - 1].1 = x,
            (false, true) => v[i].0 = x,
            (false, false) => v.insert(i, (x, x)),
        }
        true
    }

    pub fn contains(&self, x: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 < x);
        self.0.get(i).is_some_and(|r| r.0 <= x)
    }

    /// Elements.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|r| r.1 - r.0 + 1).sum()
    }

    /// The elements of `1..=last` not in the set, as inclusive ranges.
    pub fn missing_up_to(&self, last: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut next = 1;
        for &(a, b) in &self.0 {
            if a > last {
                break;
            }
            if a > next {
                out.push((next, a - 1));
            }
            next = next.max(b.saturating_add(1));
        }
        if next <= last {
            out.push((next, last));
        }
        out
    }

    /// Elements in both.
    pub fn common(&self, o: &RangeSet) -> u64 {
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < self.0.len() && j < o.0.len() {
            let (a, b) = (self.0[i], o.0[j]);
            let (lo, hi) = (a.0.max(b.0), a.1.min(b.1));
            if lo <= hi {
                n += hi - lo + 1;
            }
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        n
    }
}

/// The reported fates of one lane of one session.
#[derive(Default, Debug)]
struct Fates {
    ok: RangeSet,
    failed: RangeSet,
    expired: RangeSet,
}

/// What the upstream heard, as it heard it.
#[derive(Default, Debug)]
pub struct Ledger {
    fates: HashMap<(u64, u8), Fates>,
    /// Reports by code.
    pub ok: u64,
    pub failed: u64,
    pub expired: u64,
    /// Reports with another code, and second reports of one push.
    pub other: u64,
    pub repeated: u64,
    /// `SessionClosed` events by code, and `SessionOpened` events.
    pub closed: BTreeMap<i32, u64>,
    pub opened: u64,
    /// Delivery reports the gateway dropped for this subscriber's full
    /// queue, as its `EventsDropped` notices counted them.
    pub reports_dropped: u64,
}

impl Ledger {
    /// Takes in one event.
    pub fn handle_event(&mut self, e: pb::Event) {
        match e.kind {
            Some(pb::event::Kind::Delivery(r)) => {
                let session = r.session.map(|s| s.session_id).unwrap_or(0);
                let lane = u8::from(r.lane == pb::Lane::Bulk as i32);
                let f = self.fates.entry((session, lane)).or_default();
                if f.ok.contains(r.seq) || f.failed.contains(r.seq) || f.expired.contains(r.seq) {
                    self.repeated += 1;
                    return;
                }
                let (set, n) = match pb::Code::try_from(r.code) {
                    Ok(pb::Code::Ok) => (&mut f.ok, &mut self.ok),
                    Ok(pb::Code::DeliveryFailed) => (&mut f.failed, &mut self.failed),
                    Ok(pb::Code::DeliveryExpired) => (&mut f.expired, &mut self.expired),
                    _ => {
                        self.other += 1;
                        return;
                    }
                };
                set.insert(r.seq);
                *n += 1;
            }
            Some(pb::event::Kind::Closed(c)) => *self.closed.entry(c.code).or_default() += 1,
            Some(pb::event::Kind::Opened(_)) => self.opened += 1,
            Some(pb::event::Kind::Dropped(d)) => self.reports_dropped += d.delivery,
            _ => {}
        }
    }

    /// Reports received (each push once).
    pub fn reports(&self) -> u64 {
        self.ok + self.failed + self.expired + self.other
    }

    /// Matches the reports against what the devices received; `queued` is
    /// the sum of `PushReply.sessions`.
    pub fn reconcile(&self, queued: u64, received: &[SessionRecord]) -> Reconciled {
        let mut r = Reconciled {
            queued,
            reported_ok: self.ok,
            reported_failed: self.failed,
            reported_expired: self.expired,
            reported_other: self.other,
            repeated_reports: self.repeated,
            reports_dropped: self.reports_dropped,
            ..Default::default()
        };
        let empty = Fates::default();
        let mut seen: HashMap<(u64, u8), RangeSet> = HashMap::new();
        for rec in received {
            for (lane, ranges) in rec.lanes.iter().enumerate() {
                if ranges.is_empty() {
                    continue;
                }
                // A session's record can come in parts (a device hands it in
                // when it stops); merge them.
                let key = (rec.session, lane as u8);
                let set = seen.entry(key).or_default();
                for &(a, b) in ranges {
                    r.received_raw += b - a + 1;
                    set.insert_range(a, b);
                }
            }
        }
        for (key, got) in &seen {
            let f = self.fates.get(key).unwrap_or(&empty);
            let n = got.len();
            let (ok, failed, expired) = (
                got.common(&f.ok),
                got.common(&f.failed),
                got.common(&f.expired),
            );
            r.delivered += n;
            r.delivered_ok += ok;
            r.delivered_but_failed += failed;
            r.delivered_but_expired += expired;
            r.delivered_unreported += n - ok - failed - expired;
        }
        for (key, f) in &self.fates {
            let got = seen.get(key);
            let ok_got = got.map_or(0, |g| g.common(&f.ok));
            r.ok_not_delivered += f.ok.len() - ok_got;
        }
        let reports = self.ok + self.failed + self.expired;
        r.unreported = queued.saturating_sub(reports);
        r.unreported_not_delivered = r.unreported.saturating_sub(r.delivered_unreported);
        r.lost_without_report = r.ok_not_delivered + r.unreported_not_delivered;
        // The same figure from the other side: accepted, minus what arrived,
        // minus what was reported and did not arrive.
        let reported_bad = self.failed + self.expired;
        let reported_bad_delivered = r.delivered_but_failed + r.delivered_but_expired;
        r.lost_check =
            queued as i64 - r.delivered as i64 - (reported_bad - reported_bad_delivered) as i64;
        r
    }
}

/// A session that did not receive every seq of its interactive lane up to
/// the last one it should have.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Short {
    pub session: u64,
    /// Seqs received, each once.
    pub received: u64,
    /// The highest seq received (0: none).
    pub last: u64,
    /// The seqs missing, as inclusive ranges (the first [`SHORT_RANGES`]).
    pub missing: Vec<(u64, u64)>,
}

/// Missing ranges a [`Short`] lists at most.
pub const SHORT_RANGES: usize = 8;

/// The sessions among `received` (records merged by session) whose
/// interactive lane lacks a seq of `1..=expected`: when every push went to
/// every session, each should hold them all. Sessions that handed in no
/// record are not among them (the caller counts those).
pub fn short_sessions(received: &[SessionRecord], expected: u64) -> Vec<Short> {
    let mut seen: BTreeMap<u64, RangeSet> = BTreeMap::new();
    for rec in received {
        let set = seen.entry(rec.session).or_default();
        for &(a, b) in &rec.lanes[0] {
            set.insert_range(a, b);
        }
    }
    seen.into_iter()
        .filter_map(|(session, got)| {
            let mut missing = got.missing_up_to(expected);
            if missing.is_empty() {
                return None;
            }
            missing.truncate(SHORT_RANGES);
            Some(Short {
                session,
                received: got.len(),
                last: got.0.last().map_or(0, |r| r.1),
                missing,
            })
        })
        .collect()
}

/// Every push accepted for a session, by its fate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Reconciled {
    /// Accepted: the sum of `PushReply.sessions`.
    pub queued: u64,
    /// Delivery reports by code (each (session, lane, seq) once).
    pub reported_ok: u64,
    pub reported_failed: u64,
    pub reported_expired: u64,
    pub reported_other: u64,
    /// Reports of a push that already had one (ignored above).
    pub repeated_reports: u64,
    /// Reports the gateway dropped and said so (`EventsDropped`): the
    /// pushes they were about count as unreported below.
    pub reports_dropped: u64,
    /// Received by the devices, each (session, lane, seq) once.
    pub delivered: u64,
    /// The devices' receipts as they recorded them: more than `delivered`
    /// when a (session, lane, seq) was received as new twice.
    pub received_raw: u64,
    /// ...of which reported `CODE_OK`, `CODE_DELIVERY_FAILED`,
    /// `CODE_DELIVERY_EXPIRED`, or not reported at all.
    pub delivered_ok: u64,
    pub delivered_but_failed: u64,
    pub delivered_but_expired: u64,
    pub delivered_unreported: u64,
    /// Reported `CODE_OK` (acknowledged) yet never received: lost.
    pub ok_not_delivered: u64,
    /// Accepted pushes without any report, and of those, not received: lost.
    pub unreported: u64,
    pub unreported_not_delivered: u64,
    /// Accepted, not received, and not reported undeliverable.
    pub lost_without_report: u64,
    /// `queued - delivered - (failed + expired not delivered)`: equals
    /// `lost_without_report` when the books balance.
    pub lost_check: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_inserts_in_any_order_and_counts() {
        let mut s = RangeSet::default();
        for x in [1, 2, 3, 10, 5, 4, 12, 11, 7] {
            assert!(s.insert(x));
        }
        assert!(!s.insert(3));
        assert!(!s.insert(11));
        assert_eq!(s.0, vec![(1, 5), (7, 7), (10, 12)]);
        assert!(s.insert(6));
        assert_eq!(s.0, vec![(1, 7), (10, 12)]);
        assert_eq!(s.len(), 10);
        assert!(s.contains(12) && !s.contains(9) && !s.contains(0) && !s.contains(13));
        let o = RangeSet::from_ranges(&[(5, 10), (12, 20)]);
        assert_eq!(s.common(&o), 3 + 1 + 1);
        assert_eq!(o.common(&s), 5);
    }

    #[test]
    fn missing_up_to_lists_the_holes_and_the_tail() {
        let s = RangeSet::from_ranges(&[(2, 4), (7, 7), (9, 12)]);
        assert_eq!(s.missing_up_to(10), vec![(1, 1), (5, 6), (8, 8)]);
        assert_eq!(s.missing_up_to(15), vec![(1, 1), (5, 6), (8, 8), (13, 15)]);
        assert_eq!(s.missing_up_to(0), vec![]);
        assert_eq!(RangeSet::default().missing_up_to(3), vec![(1, 3)]);
        assert_eq!(RangeSet::from_ranges(&[(1, 5)]).missing_up_to(5), vec![]);
    }

    #[test]
    fn short_sessions_merge_records_and_name_what_is_missing() {
        let rec = |session, lane0: Vec<(u64, u64)>, lane1: Vec<(u64, u64)>| SessionRecord {
            session,
            lanes: [lane0, lane1],
        };
        let records = vec![
            // Whole, in two parts (a resume in between).
            rec(1, vec![(1, 4)], vec![]),
            rec(1, vec![(5, 10)], vec![]),
            // Stopped at 6: the tail is missing (bulk seqs do not count).
            rec(2, vec![(1, 6)], vec![(7, 10)]),
            // A hole.
            rec(3, vec![(1, 2), (4, 10)], vec![]),
        ];
        let short = short_sessions(&records, 10);
        assert_eq!(
            short,
            vec![
                Short {
                    session: 2,
                    received: 6,
                    last: 6,
                    missing: vec![(7, 10)],
                },
                Short {
                    session: 3,
                    received: 9,
                    last: 10,
                    missing: vec![(3, 3)],
                },
            ]
        );
        let holes: Vec<(u64, u64)> = (0..20).map(|i| (2 * i + 1, 2 * i + 1)).collect();
        let short = short_sessions(&[rec(4, holes, vec![])], 40);
        assert_eq!(short[0].missing.len(), SHORT_RANGES);
    }

    fn report(session: u64, seq: u64, code: pb::Code) -> pb::Event {
        pb::Event {
            kind: Some(pb::event::Kind::Delivery(pb::DeliveryReport {
                message_id: format!("m{seq}"),
                session: Some(pb::SessionInfo {
                    session_id: session,
                    ..Default::default()
                }),
                lane: pb::Lane::Interactive as i32,
                seq,
                code: code as i32,
            })),
        }
    }

    #[test]
    fn every_fate_is_counted_once() {
        let mut l = Ledger::default();
        // Session 1: seqs 1..=10 queued. 1..=6 acked; 7 and 8 expired (7
        // arrived anyway); 9 failed; 10 never reported, never arrived.
        for s in 1..=6 {
            l.handle_event(report(1, s, pb::Code::Ok));
        }
        l.handle_event(report(1, 7, pb::Code::DeliveryExpired));
        l.handle_event(report(1, 8, pb::Code::DeliveryExpired));
        l.handle_event(report(1, 8, pb::Code::DeliveryExpired));
        l.handle_event(report(1, 9, pb::Code::DeliveryFailed));
        // Session 2: seqs 1..=3 queued, 1 and 2 arrived; 3 acked but never
        // arrived (a lie, or a lost push counted as delivered).
        l.handle_event(report(2, 1, pb::Code::Ok));
        l.handle_event(report(2, 3, pb::Code::Ok));
        let rec = vec![
            SessionRecord {
                session: 1,
                lanes: [vec![(1, 7)], vec![]],
            },
            SessionRecord {
                session: 2,
                lanes: [vec![(1, 2)], vec![]],
            },
        ];
        let r = l.reconcile(13, &rec);
        assert_eq!(r.repeated_reports, 1);
        assert_eq!(
            (r.reported_ok, r.reported_failed, r.reported_expired),
            (8, 1, 2)
        );
        assert_eq!(r.delivered, 9);
        assert_eq!(r.delivered_ok, 7);
        assert_eq!(r.delivered_but_expired, 1);
        assert_eq!(r.delivered_unreported, 1, "session 2 seq 2");
        assert_eq!(r.ok_not_delivered, 1, "session 2 seq 3");
        assert_eq!(r.unreported, 2, "session 1 seq 10, session 2 seq 2");
        assert_eq!(r.unreported_not_delivered, 1);
        assert_eq!(r.lost_without_report, 2);
        assert_eq!(r.lost_check, 2);
    }
}
