//! Where the tracker leader should be: in the zone (city) that does most of
//! the writing. A mutation from a mount whose zone lacks the leader costs two
//! inter-city round trips (mount → leader, leader → a follower's ack) instead
//! of one; moving the leader to the writers halves that.
//!
//! The leader counts each client mutation under the writer's zone in a
//! `WriteWindow`, and `decide` says, from that count and a view of the
//! members, whether to hand leadership over and to whom. Both are pure: the
//! caller passes the time (milliseconds on any monotonic clock), so a test
//! can replay any history.
//!
//! Flapping is kept out three ways: a zone must do a clear majority
//! (`share_percent` > 50) of at least `min_writes` writes, so two zones
//! writing about equally move nothing; the leader must have led for
//! `min_tenure_ms` (every hand-over and every failover makes a new leader,
//! so this is also the least time between two hand-overs); and a new leader
//! starts counting afresh, so it judges only writes it has seen for a whole
//! window.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Longest zone name.
pub const MAX_ZONE_BYTES: usize = 64;

/// Distinct zones one bucket of a `WriteWindow` counts; writes from further
/// zones in the same bucket are not counted (a bound on what a client
/// naming made-up zones can make the leader keep).
pub const MAX_ZONES_PER_BUCKET: usize = 64;

/// Buckets per window: the window slides in steps of a twelfth.
const BUCKETS: u64 = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("empty zone name")]
    Empty,
    #[error("zone name is {0} bytes, the limit is {MAX_ZONE_BYTES}")]
    TooLong(usize),
    #[error("zone name contains a space or a control character")]
    BadChar,
}

/// A zone name as fsd's config, the mount's `zone=` option and a mutation's
/// writer zone accept it: 1 to 64 bytes, printable, no white space.
pub fn validate_zone(zone: &str) -> Result<(), ZoneError> {
    if zone.is_empty() {
        return Err(ZoneError::Empty);
    }
    if zone.len() > MAX_ZONE_BYTES {
        return Err(ZoneError::TooLong(zone.len()));
    }
    if zone.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ZoneError::BadChar);
    }
    Ok(())
}

/// Mutations per zone over the last `window_ms`, kept in twelve buckets.
#[derive(Debug, Clone)]
pub struct WriteWindow {
    window_ms: u64,
    bucket_ms: u64,
    /// Oldest first; each with the time its bucket starts.
    buckets: VecDeque<(u64, BTreeMap<String, u64>)>,
}

impl WriteWindow {
    pub fn new(window_ms: u64) -> WriteWindow {
        let window_ms = window_ms.max(BUCKETS);
        WriteWindow {
            window_ms,
            bucket_ms: window_ms / BUCKETS,
            buckets: VecDeque::new(),
        }
    }

    /// Counts one mutation from `zone` at `now_ms`.
    pub fn note(&mut self, zone: &str, now_ms: u64) {
        self.expire(now_ms);
        let start = now_ms - now_ms % self.bucket_ms;
        if self.buckets.back().is_none_or(|(s, _)| *s < start) {
            self.buckets.push_back((start, BTreeMap::new()));
        }
        if let Some((_, counts)) = self.buckets.back_mut() {
            if let Some(n) = counts.get_mut(zone) {
                *n += 1;
            } else if counts.len() < MAX_ZONES_PER_BUCKET {
                counts.insert(zone.to_string(), 1);
            }
        }
    }

    /// Mutations per zone within the window ending at `now_ms`.
    pub fn counts(&mut self, now_ms: u64) -> BTreeMap<String, u64> {
        self.expire(now_ms);
        let mut out = BTreeMap::new();
        for (_, counts) in &self.buckets {
            for (zone, n) in counts {
                *out.entry(zone.clone()).or_insert(0) += n;
            }
        }
        out
    }

    pub fn clear(&mut self) {
        self.buckets.clear();
    }

    fn expire(&mut self, now_ms: u64) {
        // A bucket stays while any part of it is inside the window.
        while self
            .buckets
            .front()
            .is_some_and(|(start, _)| start + self.bucket_ms + self.window_ms <= now_ms)
        {
            self.buckets.pop_front();
        }
    }
}

/// When leadership follows the writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderPolicy {
    /// The writes judged are those of the last `window_ms`.
    pub window_ms: u64,
    /// Fewer writes than this in the window: nothing to gain, no move.
    pub min_writes: u64,
    /// The share of the window's writes (in percent, above 50) one zone
    /// must have done for the leader to move there.
    pub share_percent: u64,
    /// The leader moves only after leading for this long (and for a whole
    /// window): the least time between two hand-overs, or after a failover.
    pub min_tenure_ms: u64,
    /// A member more than this many log entries behind is not caught up
    /// enough to take over.
    pub max_lag: u64,
}

impl Default for LeaderPolicy {
    fn default() -> Self {
        LeaderPolicy {
            window_ms: 60_000,
            min_writes: 100,
            share_percent: 67,
            min_tenure_ms: 300_000,
            max_lag: 100,
        }
    }
}

/// A tracker member as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub zone: String,
    pub voter: bool,
    /// The leader heard from it recently.
    pub up: bool,
    /// Log entries it lacks of the leader's log.
    pub lag: u64,
}

/// What `decide` looks at.
#[derive(Debug, Clone)]
pub struct LeaderView<'a> {
    pub leader_id: u64,
    pub leader_zone: &'a str,
    /// How long this leader has led (and counted writes).
    pub led_for_ms: u64,
    /// The window's writes per zone.
    pub writes: &'a BTreeMap<String, u64>,
    pub members: &'a [MemberView],
}

/// Why the leader stays where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stay {
    /// Led for less than a window or the minimum tenure.
    TooSoon {
        led_for_ms: u64,
        until_ms: u64,
    },
    FewWrites {
        total: u64,
        min: u64,
    },
    /// The zone doing the most writing is the leader's own.
    AtWriters,
    /// No zone did a clear majority of the writing.
    NoClearMajority {
        zone: String,
        writes: u64,
        total: u64,
    },
    /// The writing zone has no voter that is up and caught up.
    NoMemberIn {
        zone: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Stay(Stay),
    /// Hand leadership to member `to`, in `zone`, which did `writes` of
    /// the window's `total`.
    Move {
        to: u64,
        zone: String,
        writes: u64,
        total: u64,
    },
}

impl fmt::Display for Stay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stay::TooSoon {
                led_for_ms,
                until_ms,
            } => write!(
                f,
                "leader for {}s, may move after {}s",
                led_for_ms / 1000,
                until_ms / 1000
            ),
            Stay::FewWrites { total, min } => {
                write!(f, "{total} writes in the window, fewer than {min}")
            }
            Stay::AtWriters => write!(f, "the leader is in the zone writing most"),
            Stay::NoClearMajority {
                zone,
                writes,
                total,
            } => write!(
                f,
                "zone {zone} wrote {}%, no clear majority",
                percent(*writes, *total)
            ),
            Stay::NoMemberIn { zone } => {
                write!(f, "zone {zone} writes most but has no caught-up voter up")
            }
        }
    }
}

/// `part` of `total` in whole percent.
pub fn percent(part: u64, total: u64) -> u64 {
    (part.saturating_mul(100)).checked_div(total).unwrap_or(0)
}

/// Whether, and to whom, the leader should hand over.
pub fn decide(policy: &LeaderPolicy, view: &LeaderView<'_>) -> Decision {
    let until_ms = policy.min_tenure_ms.max(policy.window_ms);
    if view.led_for_ms < until_ms {
        return Decision::Stay(Stay::TooSoon {
            led_for_ms: view.led_for_ms,
            until_ms,
        });
    }
    let total: u64 = view.writes.values().sum();
    if total < policy.min_writes.max(1) {
        return Decision::Stay(Stay::FewWrites {
            total,
            min: policy.min_writes,
        });
    }
    // The most writes, then the smaller name: every member picks alike.
    let Some((zone, &writes)) = view
        .writes
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
    else {
        return Decision::Stay(Stay::FewWrites {
            total,
            min: policy.min_writes,
        });
    };
    if zone == view.leader_zone {
        return Decision::Stay(Stay::AtWriters);
    }
    // Never at or below half, whatever the setting: two zones cannot both
    // have more than half, so they cannot pull the leader back and forth.
    let share = policy.share_percent.max(51);
    if writes.saturating_mul(100) < total.saturating_mul(share) {
        return Decision::Stay(Stay::NoClearMajority {
            zone: zone.clone(),
            writes,
            total,
        });
    }
    let target = view
        .members
        .iter()
        .filter(|m| {
            m.zone == *zone && m.id != view.leader_id && m.voter && m.up && m.lag <= policy.max_lag
        })
        .min_by_key(|m| (m.lag, m.id));
    match target {
        Some(m) => Decision::Move {
            to: m.id,
            zone: zone.clone(),
            writes,
            total,
        },
        None => Decision::Stay(Stay::NoMemberIn { zone: zone.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minute's window, 100 writes, two thirds, five minutes' tenure.
    fn policy() -> LeaderPolicy {
        LeaderPolicy::default()
    }

    fn members() -> Vec<MemberView> {
        ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, z)| MemberView {
                id: i as u64 + 1,
                zone: z.to_string(),
                voter: true,
                up: true,
                lag: 0,
            })
            .collect()
    }

    fn writes(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(z, n)| (z.to_string(), *n)).collect()
    }

    fn decide_at(w: &BTreeMap<String, u64>, led_for_ms: u64, m: &[MemberView]) -> Decision {
        decide(
            &policy(),
            &LeaderView {
                leader_id: 1,
                leader_zone: "a",
                led_for_ms,
                writes: w,
                members: m,
            },
        )
    }

    #[test]
    fn a_zone_doing_two_thirds_of_the_writing_gets_the_leader() {
        let w = writes(&[("a", 20), ("b", 80)]);
        assert_eq!(
            decide_at(&w, 400_000, &members()),
            Decision::Move {
                to: 2,
                zone: "b".into(),
                writes: 80,
                total: 100
            }
        );
    }

    #[test]
    fn balanced_writers_from_two_zones_move_nothing() {
        // Equal, and anything short of the share, from either side.
        for (a, b) in [(50, 50), (40, 60), (60, 40), (34, 66), (500, 501)] {
            let w = writes(&[("a", a), ("b", b)]);
            let d = decide_at(&w, 10_000_000, &members());
            assert!(
                matches!(
                    d,
                    Decision::Stay(Stay::NoClearMajority { .. }) | Decision::Stay(Stay::AtWriters)
                ),
                "{a}/{b}: {d:?}"
            );
        }
        // A share setting at or below half is raised above it: with two
        // zones at 50% neither may pull the leader.
        let lax = LeaderPolicy {
            share_percent: 10,
            ..policy()
        };
        let w = writes(&[("a", 50), ("b", 50), ("c", 0)]);
        for leader_zone in ["a", "b"] {
            let d = decide(
                &lax,
                &LeaderView {
                    leader_id: if leader_zone == "a" { 1 } else { 2 },
                    leader_zone,
                    led_for_ms: 10_000_000,
                    writes: &w,
                    members: &members(),
                },
            );
            assert!(matches!(d, Decision::Stay(_)), "{leader_zone}: {d:?}");
        }
    }

    #[test]
    fn no_move_too_soon_with_few_writes_or_at_the_writers() {
        let w = writes(&[("b", 1000)]);
        assert!(matches!(
            decide_at(&w, 299_999, &members()),
            Decision::Stay(Stay::TooSoon { .. })
        ));
        let few = writes(&[("b", 99)]);
        assert!(matches!(
            decide_at(&few, 400_000, &members()),
            Decision::Stay(Stay::FewWrites { total: 99, .. })
        ));
        let own = writes(&[("a", 1000), ("b", 10)]);
        assert_eq!(
            decide_at(&own, 400_000, &members()),
            Decision::Stay(Stay::AtWriters)
        );
        // A window longer than the tenure must pass whole first.
        let long = LeaderPolicy {
            window_ms: 500_000,
            ..policy()
        };
        let d = decide(
            &long,
            &LeaderView {
                leader_id: 1,
                leader_zone: "a",
                led_for_ms: 400_000,
                writes: &w,
                members: &members(),
            },
        );
        assert!(matches!(d, Decision::Stay(Stay::TooSoon { .. })), "{d:?}");
    }

    #[test]
    fn only_a_caught_up_voter_that_is_up_takes_over() {
        let w = writes(&[("b", 1000)]);
        for spoil in [
            |m: &mut MemberView| m.up = false,
            |m: &mut MemberView| m.voter = false,
            |m: &mut MemberView| m.lag = 101,
        ] {
            let mut ms = members();
            spoil(&mut ms[1]);
            assert_eq!(
                decide_at(&w, 400_000, &ms),
                Decision::Stay(Stay::NoMemberIn { zone: "b".into() })
            );
        }
        // Two in the zone: the one further ahead.
        let mut ms = members();
        ms.push(MemberView {
            id: 9,
            zone: "b".into(),
            voter: true,
            up: true,
            lag: 0,
        });
        ms[1].lag = 5;
        assert!(matches!(
            decide_at(&w, 400_000, &ms),
            Decision::Move { to: 9, .. }
        ));
    }

    #[test]
    fn the_window_slides_and_forgets() {
        let mut w = WriteWindow::new(12_000);
        for t in 0..6_000 {
            if t % 10 == 0 {
                w.note("a", t);
            }
        }
        assert_eq!(w.counts(6_000).get("a"), Some(&600));
        // A bucket leaves once wholly outside the window.
        assert_eq!(w.counts(12_999).get("a"), Some(&600));
        let later = w.counts(13_000);
        assert_eq!(later.get("a"), Some(&500));
        assert!(w.counts(30_000).is_empty());
        w.note("b", 30_001);
        assert_eq!(w.counts(30_002), writes(&[("b", 1)]));
        w.clear();
        assert!(w.counts(30_002).is_empty());
    }

    #[test]
    fn a_bucket_counts_a_bounded_number_of_zones() {
        let mut w = WriteWindow::new(60_000);
        for i in 0..(MAX_ZONES_PER_BUCKET + 10) {
            w.note(&format!("z{i}"), 1);
        }
        assert_eq!(w.counts(2).len(), MAX_ZONES_PER_BUCKET);
    }

    #[test]
    fn zone_names_are_checked() {
        assert_eq!(validate_zone("berlin"), Ok(()));
        assert_eq!(validate_zone(""), Err(ZoneError::Empty));
        assert_eq!(validate_zone("a b"), Err(ZoneError::BadChar));
        assert_eq!(validate_zone("a\u{7}"), Err(ZoneError::BadChar));
        assert_eq!(validate_zone(&"x".repeat(65)), Err(ZoneError::TooLong(65)));
    }
}
