//! When this member builds its snapshots. openraft's own policy
//! (`LogsSinceLast`) counts from the last snapshot, so every member of a
//! cluster builds one at the same log index, each copying its whole
//! database at once: a leader whose followers were both busy doing that
//! missed its quorum for longer than its read lease, and the mounts lost
//! their lease streams. Here each member builds one every `every` entries
//! as well, at points offset by its place among the voters, so that the
//! members of a cluster of three build theirs a third of the way apart.

use std::time::Duration;

use crate::raft::{NodeId, Raft};

/// How often the member looks whether a snapshot is due.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Builds this member's snapshots while the Raft node runs (the
/// configured policy must be `SnapshotPolicy::Never`).
pub(super) async fn in_turn(raft: Raft, host_id: NodeId, every: u64) {
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let snap = m.snapshot.map_or(0, |l| l.index);
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let rank = voters.iter().position(|&v| v == host_id).unwrap_or(0);
        if due(applied, snap, every, phase(rank, voters.len(), every)) {
            tracing::debug!(applied, snap, "building a snapshot in turn");
            // Ignored by openraft while one is being built.
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

/// Where in each period of `every` entries the member of `rank` among
/// `voters` builds its snapshot.
fn phase(rank: usize, voters: usize, every: u64) -> u64 {
    (rank as u64).saturating_mul(every) / voters.max(1) as u64 % every.max(1)
}

/// Whether a member whose last snapshot is at `snap` and that has applied
/// up to `applied` should build the next: the log has passed a point
/// `phase` past a multiple of `every` since `snap`, and at least half of
/// `every` entries were applied since (a member whose place moved does not
/// build two in a row).
fn due(applied: u64, snap: u64, every: u64, phase: u64) -> bool {
    let every = every.max(1);
    let points_upto = |index: u64| (index + every - phase) / every;
    applied >= snap + every / 2 && points_upto(applied) > points_upto(snap)
}

#[cfg(test)]
mod tests {
    use super::{due, phase};

    /// Where each of three members builds its snapshots over a log of
    /// `entries`, applying one entry at a time.
    fn built(rank: usize, every: u64, entries: u64) -> Vec<u64> {
        let p = phase(rank, 3, every);
        let mut snap = 0;
        let mut at = Vec::new();
        for applied in 1..=entries {
            if due(applied, snap, every, p) {
                snap = applied;
                at.push(applied);
            }
        }
        at
    }

    #[test]
    fn three_members_build_their_snapshots_a_third_of_a_period_apart() {
        let every = 5000;
        let all: Vec<Vec<u64>> = (0..3).map(|r| built(r, every, 30_000)).collect();
        assert_eq!(all[0], [5000, 10_000, 15_000, 20_000, 25_000, 30_000]);
        assert_eq!(all[1], [2500, 6666, 11_666, 16_666, 21_666, 26_666]);
        assert_eq!(all[2], [3333, 8333, 13_333, 18_333, 23_333, 28_333]);
        // Never two members within a sixth of a period of each other.
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                for x in a {
                    assert!(b.iter().all(|y| x.abs_diff(*y) >= every / 6), "{x} {b:?}");
                }
            }
        }
    }

    #[test]
    fn a_lone_member_and_a_tiny_period_still_build() {
        assert_eq!(built(0, 1, 3), [1, 2, 3]);
        assert_eq!(phase(0, 1, 5000), 0);
        assert_eq!(phase(0, 0, 0), 0);
        assert!(!due(100, 0, 5000, 0));
        assert!(due(5000, 0, 5000, 0));
    }
}
