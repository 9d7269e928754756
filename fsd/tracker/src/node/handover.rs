//! Leadership follows the writers (issue 11): the leader counts client
//! mutations per writer zone, and hands leadership to a member in the zone
//! that does most of the writing (`failsafe_core::leadership::decide` says
//! when; the daemon's `leader-placement` worker asks it).
//!
//! openraft 0.9 has no leadership transfer, so the hand-over is built from
//! what it offers, and from how its vote handling works
//! (`Engine::handle_vote_req` in openraft 0.9.25): a member whose vote is
//! committed refuses any candidate while `now <= vote_utime + leader_lease`
//! (`leader_lease` = `election_timeout_max`); a follower refreshes
//! `vote_utime` on every AppendEntries from its leader, but the leader's own
//! is only set when it was elected. So a leader that has led for longer than
//! `election_max` grants a vote to a candidate whose log is at least its own,
//! and steps down; `Trigger::elect` makes a follower stand at once (it is
//! not affected by `RuntimeConfigHandle::elect(false)`).
//!
//! The steps, on the leader, all within `2 × election_max`:
//! 1. hold new proposals (`Gate`): they wait, and are answered NotLeader
//!    naming the new leader once it leads, or go ahead if the hand-over is
//!    abandoned;
//! 2. wait for the proposals already admitted to finish, and for the
//!    target to have stored the whole log;
//! 3. stop heartbeats (`RuntimeConfigHandle::heartbeat(false)`), so the
//!    other followers' leases lapse after `election_max`;
//! 4. tell the target (`RaftTransport.TakeLeadership`), which checks the term,
//!    the leader and its log, and calls `trigger().elect()`;
//! 5. wait for the target to lead. With three voters the old leader's vote
//!    is the majority the target needs, so the pause is a few round trips;
//!    with more, one more voter must see its lease lapse (≈ `election_max`).
//!
//! Whatever happens, heartbeats come back on and the gate opens when the
//! hand-over ends (guards, also when it is dropped). If the target dies
//! before it stands, the old leader simply goes on leading; if it dies
//! after the old leader voted for it, the remaining members elect a leader
//! as after any failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_core::leadership::{LeaderPolicy, MemberView, WriteWindow};
use failsafe_proto::pb;
use openraft::ServerState;
use tokio::sync::watch;

use super::{Liveness, Tracker, TrackerError};
use crate::raft::{NodeId, Raft};
use crate::state;

/// The leader's side of leadership placement: the write tally and the gate.
pub(crate) struct Placement {
    policy: Option<LeaderPolicy>,
    /// How long a hand-over may hold writes, all steps included.
    budget: Duration,
    /// The zero of the tally's clock.
    epoch: Instant,
    /// A std Mutex: held to count a write or read the counts, never across
    /// an await.
    tally: Mutex<Tally>,
    gate: Gate,
}

/// Writes per zone seen by this member during its current term as leader.
struct Tally {
    term: u64,
    since: Instant,
    window: WriteWindow,
}

impl Placement {
    pub(crate) fn new(policy: Option<LeaderPolicy>, election_max_ms: u64) -> Placement {
        let window_ms = policy.map_or(60_000, |p| p.window_ms);
        let now = Instant::now();
        Placement {
            policy,
            budget: Duration::from_millis(election_max_ms * 2),
            epoch: now,
            tally: Mutex::new(Tally {
                term: 0,
                since: now,
                window: WriteWindow::new(window_ms),
            }),
            gate: Gate::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The tally of `term`, started afresh when the term changed: a new
    /// leader judges only what it has seen itself.
    fn tally(&self, term: u64) -> std::sync::MutexGuard<'_, Tally> {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        if t.term != term {
            t.term = term;
            t.since = Instant::now();
            t.window.clear();
        }
        t
    }
}

/// The leader as the placement decision needs to see it.
#[derive(Debug, Clone)]
pub struct LeaderSnapshot {
    pub leader_id: NodeId,
    pub leader_zone: String,
    pub led_for_ms: u64,
    pub writes: BTreeMap<String, u64>,
    pub members: Vec<MemberView>,
}

/// A hand-over that ended with another member leading.
#[derive(Debug, Clone, Copy)]
pub struct HandedOver {
    pub to: NodeId,
    /// How long new writes were held.
    pub pause: Duration,
}

impl Tracker {
    /// When leadership follows the writers; `None`: it does not.
    pub fn leader_policy(&self) -> Option<LeaderPolicy> {
        self.placement.policy
    }

    /// Counts a client's mutation under its zone, if this member leads.
    pub fn note_write(&self, zone: &str) {
        if self.placement.policy.is_none() || zone.is_empty() {
            return;
        }
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return;
        }
        let now = self.placement.now_ms();
        self.placement.tally(m.current_term).window.note(zone, now);
    }

    /// The window's writes per zone as this member counted them while
    /// leading (empty on a follower), most first.
    pub fn zone_writes(&self) -> Vec<(String, u64)> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || self.placement.policy.is_none() {
            return Vec::new();
        }
        let now = self.placement.now_ms();
        let mut v: Vec<(String, u64)> = self
            .placement
            .tally(m.current_term)
            .window
            .counts(now)
            .into_iter()
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// What the placement decision looks at; `None` on a follower.
    pub async fn leader_snapshot(&self) -> Result<Option<LeaderSnapshot>, TrackerError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Ok(None);
        }
        let hosts = self.read(state::hosts).await?;
        let zone_of: BTreeMap<NodeId, String> =
            hosts.into_iter().map(|(id, zone, _)| (id, zone)).collect();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, _)| {
                let have = if *id == self.host_id {
                    last
                } else {
                    matched.get(id).copied().flatten().map_or(0, |l| l.index)
                };
                MemberView {
                    id: *id,
                    zone: zone_of.get(id).cloned().unwrap_or_default(),
                    voter: voters.contains(id),
                    up: self.liveness(*id) == Liveness::Up,
                    lag: last.saturating_sub(have),
                }
            })
            .collect();
        let now = self.placement.now_ms();
        let (led_for_ms, writes) = {
            let mut t = self.placement.tally(m.current_term);
            (t.since.elapsed().as_millis() as u64, t.window.counts(now))
        };
        Ok(Some(LeaderSnapshot {
            leader_id: self.host_id,
            leader_zone: zone_of.get(&self.host_id).cloned().unwrap_or_default(),
            led_for_ms,
            writes,
            members,
        }))
    }

    /// Waits while a hand-over holds writes. The permit marks a write under
    /// way until it is dropped; a write held until another member leads is
    /// refused with that leader's address.
    pub(crate) async fn admit(&self) -> Result<Permit, TrackerError> {
        // Never longer than a hand-over may last, with room to spare.
        let deadline = Instant::now() + self.placement.budget * 2;
        loop {
            let mut rx = self.placement.gate.reopened.subscribe();
            if let Some(permit) = self.placement.gate.try_admit() {
                return Ok(permit);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return Err(TrackerError::Handover(
                    "writes held for longer than a hand-over may take".into(),
                ));
            }
            if !self.is_leader() {
                return Err(self.not_leader());
            }
        }
    }

    /// Hands leadership to voter `to` (see the module's comment).
    pub async fn hand_over(&self, to: NodeId) -> Result<HandedOver, TrackerError> {
        let started = Instant::now();
        let deadline = started + self.placement.budget;
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(self.not_leader());
        }
        let term = m.current_term;
        let membership = m.membership_config.membership();
        if to == self.host_id || !membership.voter_ids().any(|v| v == to) {
            return Err(TrackerError::Handover(format!(
                "{to:016x} is not another voter"
            )));
        }
        let addr = membership
            .get_node(&to)
            .map(|n| n.addr.clone())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| TrackerError::Handover(format!("no address for {to:016x}")))?;

        // Delegations (write-behind) come back first, while their delegates
        // can still flush: the target will know none of them.
        let _no_delegations = match self.leases() {
            Some(l) => Some(l.recall_for_handover().await),
            None => None,
        };
        let _held = self.placement.gate.hold();
        // Steps 1 and 2 get half the budget: they take a round trip and an
        // fsync when all is well.
        let ready_by = started + self.placement.budget / 2;
        if !self.placement.gate.drained(ready_by).await {
            return Err(TrackerError::Handover(
                "writes under way did not finish in time".into(),
            ));
        }
        let last = self
            .raft
            .metrics()
            .borrow()
            .last_log_index
            .unwrap_or_default();
        let caught_up = self
            .raft
            .wait(Some(ready_by.saturating_duration_since(Instant::now())))
            .metrics(
                |m| {
                    m.replication.as_ref().is_some_and(|r| {
                        r.get(&to)
                            .copied()
                            .flatten()
                            .is_some_and(|l| l.index >= last)
                    })
                },
                "target caught up",
            )
            .await;
        if caught_up.is_err() {
            return Err(TrackerError::Handover(format!(
                "{to:016x} did not store the log up to {last} in time"
            )));
        }

        // The target will lead at once, without the election gap that makes
        // this leader's leases safe: stop granting and renewing them, and
        // let the last run out before it may commit anything.
        let _no_leases = match self.leases() {
            Some(l) => {
                let (guard, left) = l.suspend();
                tokio::time::sleep(left).await;
                Some(guard)
            }
            None => None,
        };
        let _quiet = HeartbeatsOff::new(&self.raft);
        let req = pb::TakeLeadershipRequest {
            header: None,
            leader_id: self.host_id,
            term,
            last_log_index: last,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        self.network
            .take_leadership(&addr, req, left.min(Duration::from_millis(500)))
            .await?;
        let moved = self
            .raft
            .wait(Some(deadline.saturating_duration_since(Instant::now())))
            .metrics(
                |m| m.state != ServerState::Leader && m.current_leader.is_some(),
                "leadership moved",
            )
            .await;
        let pause = started.elapsed();
        match moved {
            Ok(m) => Ok(HandedOver {
                to: m.current_leader.unwrap_or(to),
                pause,
            }),
            Err(_) if !self.is_leader() => Err(TrackerError::Handover(format!(
                "stepped down for {to:016x}, which did not lead within {pause:?}; an election follows"
            ))),
            Err(_) => Err(TrackerError::Handover(format!(
                "{to:016x} did not win an election within {pause:?}"
            ))),
        }
    }

    /// The target's side: checks that the request comes from the leader it
    /// follows, in its term, and that it has the log the leader has; then
    /// stands for election.
    pub(crate) async fn take_leadership(
        &self,
        req: &pb::TakeLeadershipRequest,
    ) -> Result<(), TrackerError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        if self.space_low() {
            return Err(TrackerError::Handover(
                "the disk under this member's tracker is nearly full".into(),
            ));
        }
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.host_id)
        {
            return Err(TrackerError::Handover("this member is not a voter".into()));
        }
        if m.current_term != req.term || m.current_leader != Some(req.leader_id) {
            return Err(TrackerError::Handover(format!(
                "stale request: {:016x} in term {} asked, this member follows {} in term {}",
                req.leader_id,
                req.term,
                m.current_leader
                    .map_or("no leader".into(), |l| format!("{l:016x}")),
                m.current_term
            )));
        }
        if m.last_log_index.unwrap_or(0) < req.last_log_index {
            return Err(TrackerError::Handover(format!(
                "this member's log ends at {}, the leader's at {}",
                m.last_log_index.unwrap_or(0),
                req.last_log_index
            )));
        }
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| TrackerError::Stopped(Box::new(e)))?;
        tracing::info!(
            from = format!("{:016x}", req.leader_id),
            term = req.term,
            "standing for tracker leadership, handed over by the leader"
        );
        Ok(())
    }
}

/// Holds new writes during a hand-over, and counts those under way.
#[derive(Default)]
struct Gate {
    /// A std Mutex: a few instructions under it, never an await.
    inner: Arc<Mutex<GateInner>>,
    /// Bumped when the gate opens, to wake held writes.
    reopened: watch::Sender<u64>,
}

#[derive(Default)]
struct GateInner {
    held: bool,
    in_flight: usize,
}

/// A write under way; it counts until dropped.
pub(crate) struct Permit(Arc<Mutex<GateInner>>);

impl Drop for Permit {
    fn drop(&mut self) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.in_flight = g.in_flight.saturating_sub(1);
    }
}

/// The gate is closed while this lives.
struct Held<'a>(&'a Gate);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().unwrap_or_else(|e| e.into_inner()).held = false;
        self.0.reopened.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Gate {
    fn try_admit(&self) -> Option<Permit> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.held {
            return None;
        }
        g.in_flight += 1;
        Some(Permit(self.inner.clone()))
    }

    fn hold(&self) -> Held<'_> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).held = true;
        Held(self)
    }

    /// Waits until no admitted write is under way; false at `deadline`.
    async fn drained(&self, deadline: Instant) -> bool {
        loop {
            let busy = self
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .in_flight;
            if busy == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Heartbeats are off while this lives.
struct HeartbeatsOff<'a>(&'a Raft);

impl<'a> HeartbeatsOff<'a> {
    fn new(raft: &'a Raft) -> Self {
        raft.runtime_config().heartbeat(false);
        HeartbeatsOff(raft)
    }
}

impl Drop for HeartbeatsOff<'_> {
    fn drop(&mut self) {
        self.0.runtime_config().heartbeat(true);
    }
}
