//! The one rule that turns what is known of a host — whether the leader hears
//! from it, its administrative state, and the time — into what the cluster
//! does with it: whether its copies count, whether it is read from, whether
//! it takes new copies. Status, ship risk and repair all ask this rule, so
//! they cannot disagree about a host.

use crate::repair::HostHealth;

/// Whether a member hears from a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Up,
    /// No answer to the leader's heartbeats for `for_ms`; `dead` once that
    /// is longer than the cluster's dead-after period.
    Down {
        for_ms: u64,
        dead: bool,
    },
    /// Not for this member to say (only the leader hears from every host),
    /// or a leader that has not heard from it yet since it took over.
    Unknown,
}

/// What an administrator has said about a host (recorded by the tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminState {
    /// The normal state.
    #[default]
    Active,
    /// Shipped: its absence until `until_ns` (wall clock) starts no
    /// re-replication, and it serves no reads until it is back and verified.
    Away { until_ns: i64 },
    /// Being drained before removal: readable, but its copies do not count
    /// and it takes no new ones.
    Draining,
}

/// The rule's answer for one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    /// What repair plans with.
    pub health: HostHealth,
    /// Its copies count toward a block's copy count (a host that is down but
    /// not dead is probably restarting: nothing is rebuilt for it yet).
    pub counted: bool,
    /// Serving now: its copies are live (the fail-safe judgement, ship risk)
    /// and repair may read from it.
    pub live: bool,
    /// Its copies may be read: up and not away (a shipped host serves no
    /// reads until it is back and verified); a draining host is still read.
    pub readable: bool,
    /// Up and not leaving: it may take new copies (a returning shipped host
    /// takes its catch-up before it serves).
    pub takes_copies: bool,
}

impl Judgement {
    /// Dead as shown to operators: a shipped host is not dead before its
    /// time is up.
    pub fn dead(&self) -> bool {
        self.health == HostHealth::Dead
    }
}

/// Judge a host. `by_leader`: the member judging is the leader (which alone
/// hears from every host); any other member takes the recorded copies of a
/// host it cannot judge at their word.
pub fn judge(liveness: Liveness, admin: AdminState, now_ns: i64, by_leader: bool) -> Judgement {
    let mut health = match liveness {
        Liveness::Up => HostHealth::Up,
        Liveness::Down { dead: true, .. } => HostHealth::Dead,
        Liveness::Down { dead: false, .. } | Liveness::Unknown => HostHealth::Down,
    };
    match admin {
        AdminState::Away { until_ns } if health == HostHealth::Dead && now_ns < until_ns => {
            health = HostHealth::Down;
        }
        AdminState::Draining if health == HostHealth::Up => health = HostHealth::Leaving,
        _ => {}
    }
    let draining = admin == AdminState::Draining;
    let answering = match liveness {
        Liveness::Up => true,
        Liveness::Unknown => !by_leader,
        Liveness::Down { .. } => false,
    };
    Judgement {
        health,
        counted: health != HostHealth::Dead && !draining,
        live: answering && admin == AdminState::Active,
        readable: liveness == Liveness::Up && !matches!(admin, AdminState::Away { .. }),
        takes_copies: liveness == Liveness::Up && !draining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000;
    const DOWN: Liveness = Liveness::Down {
        for_ms: 5,
        dead: false,
    };
    const DEAD: Liveness = Liveness::Down {
        for_ms: 5,
        dead: true,
    };

    fn j(l: Liveness, a: AdminState) -> Judgement {
        judge(l, a, NOW, true)
    }

    #[test]
    fn an_active_host_by_liveness() {
        let up = j(Liveness::Up, AdminState::Active);
        assert_eq!(up.health, HostHealth::Up);
        assert!(up.counted && up.live && up.readable && up.takes_copies && !up.dead());

        let down = j(DOWN, AdminState::Active);
        assert_eq!(down.health, HostHealth::Down);
        assert!(down.counted && !down.live && !down.takes_copies);

        let dead = j(DEAD, AdminState::Active);
        assert_eq!(dead.health, HostHealth::Dead);
        assert!(!dead.counted && !dead.live && dead.dead());
    }

    #[test]
    fn a_shipped_host_is_not_dead_before_its_time() {
        let away = AdminState::Away { until_ns: NOW + 1 };
        let shipped = j(DEAD, away);
        assert_eq!(shipped.health, HostHealth::Down);
        assert!(shipped.counted && !shipped.live && !shipped.dead());

        let overdue = j(DEAD, AdminState::Away { until_ns: NOW });
        assert!(overdue.dead() && !overdue.counted);
    }

    #[test]
    fn a_returning_host_takes_copies_but_serves_none() {
        let back = j(Liveness::Up, AdminState::Away { until_ns: NOW + 1 });
        assert_eq!(back.health, HostHealth::Up);
        assert!(back.counted && back.takes_copies && !back.live && !back.readable);
    }

    #[test]
    fn a_draining_host_is_read_but_not_counted() {
        let leaving = j(Liveness::Up, AdminState::Draining);
        assert_eq!(leaving.health, HostHealth::Leaving);
        assert!(!leaving.counted && !leaving.live && !leaving.takes_copies);
        assert!(
            leaving.readable,
            "repair copies a draining host's blocks from it"
        );
        let gone = j(DOWN, AdminState::Draining);
        assert_eq!(gone.health, HostHealth::Down);
        assert!(!gone.counted);
    }

    #[test]
    fn only_the_leader_can_say_a_host_is_not_answering() {
        let follower = judge(Liveness::Unknown, AdminState::Active, NOW, false);
        assert!(follower.live && follower.counted && !follower.takes_copies);
        let leader = judge(Liveness::Unknown, AdminState::Active, NOW, true);
        assert!(!leader.live && leader.counted);
    }
}
