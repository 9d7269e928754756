//! How the tracker sees hosts and blocks: liveness, status, the repair
//! view, what shipping or draining a host would put at risk, and the block
//! scans the daemon's workers read. The host-state handling lives here and
//! in `state::{hosts, health}`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use failsafe_core::{BlockView, Candidate, DeviceView, HostHealth};
use failsafe_proto::pb;
use openraft::ServerState;

use super::{wall_clock_ns, Tracker, TrackerError};
use crate::network::Seen;
use crate::raft::NodeId;
use crate::state;

/// How the member answering sees a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Up,
    /// No answer to the leader's heartbeats for `for_ms`; `dead` once that
    /// is longer than `dead_after_ms`.
    Down {
        for_ms: u64,
        dead: bool,
    },
    /// Not for this member to say (only the leader hears from every host),
    /// or a leader that has not heard from it yet since it took over.
    Unknown,
}

impl Liveness {
    /// For repair, which acts only on what it knows: a host not known to be
    /// up is neither read from nor written to, and its copies still count.
    pub fn health(self) -> HostHealth {
        match self {
            Liveness::Up => HostHealth::Up,
            Liveness::Down { dead: true, .. } => HostHealth::Dead,
            Liveness::Down { dead: false, .. } | Liveness::Unknown => HostHealth::Down,
        }
    }
}

/// What the repair worker needs from the leader's state machine.
#[derive(Debug, Clone)]
pub struct RepairView {
    /// Every device (not gone) with its host's health, address, and room.
    pub devices: Vec<(DeviceView, String)>,
    /// Blocks repair can act on, fewest copies first.
    pub blocks: Vec<BlockView>,
    /// Blocks with more copies on up hosts than the copy count.
    pub extra: Vec<BlockView>,
    /// The same judgement `status` reports.
    pub counts: state::ReplicationCounts,
    /// Devices not to read from: those of shipped hosts, until they are back
    /// and verified.
    pub no_source: BTreeSet<u64>,
}

impl Tracker {
    /// Leader only: what shipping `host_id` would put at risk — the blocks
    /// it holds, and the files with a block that would have fewer than the
    /// write quorum of live copies left (fewer hosts if there are fewer), or
    /// none outside its zone while other zones are up.
    pub async fn ship_check(&self, host_id: NodeId) -> Result<(u64, Vec<String>), TrackerError> {
        let (held, _, names) = self.risk(host_id, None, true).await?;
        Ok((held, names))
    }

    /// Leader only: blocks `host_id` holds, and how many of them have fewer
    /// than the copy count elsewhere (on hosts up, active): what removing it
    /// would drop below the copy count, what a drain still has to move.
    pub async fn drain_remaining(&self, host_id: NodeId) -> Result<(u64, u64), TrackerError> {
        let (held, risky, _) = self.risk(host_id, Some(self.class.copies), false).await?;
        Ok((held, risky))
    }

    /// Blocks `host_id` holds and those with fewer than `needed` live copies
    /// elsewhere (default: the write quorum, or fewer hosts, and one in
    /// another zone while other zones are up).
    async fn risk(
        &self,
        host_id: NodeId,
        needed: Option<usize>,
        names: bool,
    ) -> Result<(u64, u64, Vec<String>), TrackerError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let states = self.read(state::host_states).await?;
        let space = self.read(state::device_space).await?;
        let zone_of: BTreeMap<u64, String> = space
            .iter()
            .map(|d| (d.location.host_id, d.location.zone.clone()))
            .collect();
        let zone = zone_of.get(&host_id).cloned().unwrap_or_default();
        // Hosts that will still serve: up, and neither away nor draining.
        let others_up: BTreeSet<u64> = zone_of
            .keys()
            .copied()
            .filter(|h| {
                *h != host_id
                    && !states.iter().any(|(x, ..)| x == h)
                    && self.liveness(*h) == Liveness::Up
            })
            .collect();
        let live: Vec<u64> = space
            .iter()
            .filter(|d| others_up.contains(&d.location.host_id))
            .map(|d| d.location.device_id)
            .collect();
        let (needed, other_zones) = match needed {
            Some(n) => (n, false),
            None => (
                self.class.write_quorum.min(others_up.len()).max(1),
                others_up
                    .iter()
                    .any(|h| zone_of.get(h).is_some_and(|z| *z != zone)),
            ),
        };
        self.read(move |conn| state::ship_risk(conn, host_id, &live, needed, other_zones, names))
            .await
    }

    /// Blocks files reference, after `after`, with their holders (this
    /// member's view): what rebalancing looks at.
    pub async fn referenced_after(
        &self,
        after: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<BlockView>, TrackerError> {
        self.read(move |conn| state::referenced_after(conn, &after, limit))
            .await
    }

    /// Hosts that are away, with (until, since) (this member's view).
    pub async fn away_since(&self) -> Result<BTreeMap<u64, (i64, i64)>, TrackerError> {
        let states = self.read(state::host_states).await?;
        Ok(states
            .into_iter()
            .filter(|(_, s, _, _)| s == "away")
            .map(|(h, _, until, since)| (h, (until, since)))
            .collect())
    }

    /// An older version of block `hash` recorded on `device_id`, to send
    /// the block there as a delta (this member's view).
    pub async fn delta_base(
        &self,
        hash: Vec<u8>,
        device_id: u64,
    ) -> Result<Option<Vec<u8>>, TrackerError> {
        self.read(move |conn| state::delta_base(conn, &hash, device_id))
            .await
    }

    /// How this member sees host `id` now. Only the leader, which sends
    /// every member a heartbeat, can tell; a follower knows only itself.
    pub fn liveness(&self, id: NodeId) -> Liveness {
        if id == self.host_id {
            return Liveness::Up;
        }
        if !self.is_leader() {
            return Liveness::Unknown;
        }
        match self.network.heard().seen(id) {
            Seen::Silent { silent, answered }
                if (silent.as_millis() as u64) < self.down_after_ms =>
            {
                if answered {
                    Liveness::Up
                } else {
                    Liveness::Unknown
                }
            }
            Seen::Silent { silent, .. } => {
                let for_ms = silent.as_millis() as u64;
                Liveness::Down {
                    for_ms,
                    dead: for_ms >= self.dead_after_ms,
                }
            }
            // Not a member the leader replicates to (removed, or not yet added).
            Seen::Unwatched => Liveness::Down {
                for_ms: 0,
                dead: false,
            },
        }
    }

    /// This member's view of the cluster.
    pub async fn status(&self) -> Result<pb::StatusReply, TrackerError> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let (hosts, devices, (files, blocks)) = self
            .sm
            .db()
            .call(|conn| -> rusqlite::Result<_> {
                Ok((
                    state::hosts(conn)?,
                    state::devices(conn)?,
                    state::counts(conn)?,
                ))
            })
            .await?
            .map_err(TrackerError::storage)?;
        // A member removed from the cluster (a drained leader) no longer
        // knows who leads, whatever it last believed.
        let leader = m
            .current_leader
            .filter(|_| membership.get_node(&self.host_id).is_some());
        let leader_addr = leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let matched = m.replication.clone().unwrap_or_default();
        let mut rows: BTreeMap<NodeId, pb::HostStatus> = BTreeMap::new();
        for (id, node) in membership.nodes() {
            rows.insert(
                *id,
                pb::HostStatus {
                    host_id: *id,
                    zone: String::new(),
                    addr: node.addr.clone(),
                    role: role_of(*id, leader, &voters),
                    voter: voters.contains(id),
                    matched_index: matched.get(id).copied().flatten().map_or(0, |l| l.index),
                    ..Default::default()
                },
            );
        }
        for (id, zone, addr) in hosts {
            let row = rows.entry(id).or_insert_with(|| pb::HostStatus {
                host_id: id,
                addr: addr.clone(),
                role: "not a member".into(),
                ..Default::default()
            });
            row.zone = zone;
        }
        let is_leader = m.state == ServerState::Leader;
        let states = self.read(state::host_states).await?;
        let away = away_until(&states);
        let draining: BTreeSet<u64> = states
            .iter()
            .filter(|(_, s, ..)| s == "draining")
            .map(|(h, ..)| *h)
            .collect();
        let mut live_hosts = BTreeSet::new();
        for row in rows.values_mut() {
            (row.admin, row.away_until_ns) = match away.get(&row.host_id) {
                Some(&until) => ("away".into(), until),
                None if draining.contains(&row.host_id) => ("draining".into(), 0),
                None => ("active".into(), 0),
            };
            let shipped = away
                .get(&row.host_id)
                .is_some_and(|&until| wall_clock_ns() < until);
            let l = self.liveness(row.host_id);
            (row.state, row.down_ms, row.dead) = match l {
                Liveness::Up => ("up".into(), 0, false),
                // A shipped host is not dead before its time is up.
                Liveness::Down { for_ms, dead } => ("down".into(), for_ms, dead && !shipped),
                Liveness::Unknown => ("unknown".into(), 0, false),
            };
            // A member that is not the leader counts the recorded copies;
            // the leader only those on hosts it has heard from.
            let live = match l {
                Liveness::Up => true,
                Liveness::Unknown => !is_leader,
                Liveness::Down { .. } => false,
            };
            if live && !away.contains_key(&row.host_id) && !draining.contains(&row.host_id) {
                live_hosts.insert(row.host_id);
            }
        }
        if is_leader {
            for row in rows.values_mut().filter(|r| r.admin == "draining") {
                row.to_move = self
                    .drain_remaining(row.host_id)
                    .await
                    .map_or(0, |(_, n)| n);
            }
        }
        let live: Vec<u64> = devices
            .iter()
            .filter(|d| live_hosts.contains(&d.host_id))
            .map(|d| d.device_id)
            .collect();
        let copies = self.class.copies;
        let counts = self
            .sm
            .db()
            .call(move |conn| state::replication_counts(conn, &live, copies))
            .await?
            .map_err(TrackerError::storage)?;
        let mode = if leader.is_none() || (is_leader && counts.under_replicated > 0) {
            "limp"
        } else if is_leader {
            "fail-safe"
        } else {
            "unknown"
        };
        Ok(pb::StatusReply {
            cluster_id: self.cluster.get(),
            host_id: self.host_id,
            leader_id: leader.unwrap_or(0),
            leader_addr,
            term: m.current_term,
            role: format!("{:?}", m.state).to_lowercase(),
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            hosts: rows.into_values().collect(),
            devices,
            files,
            blocks,
            under_replicated: counts.under_replicated,
            unavailable: counts.unavailable,
            mode: mode.into(),
            copies: copies as u32,
            repair: None,
            scrub: None,
            gc: None,
        })
    }

    /// Leader only (None otherwise): the devices with their hosts' health,
    /// up to `limit` blocks repair can act on, starting after `after`, and up
    /// to `limit` blocks with copies to trim, starting after `extra_after`.
    pub async fn repair_view(
        &self,
        after: Vec<u8>,
        extra_after: Vec<u8>,
        limit: usize,
    ) -> Result<Option<RepairView>, TrackerError> {
        if !self.is_leader() {
            return Ok(None);
        }
        let space = self.read(state::device_space).await?;
        let states = self.read(state::host_states).await?;
        let away = away_until(&states);
        let now = wall_clock_ns();
        let mut devices = Vec::with_capacity(space.len());
        let mut no_source = BTreeSet::new();
        // A draining host's copies do not count (repair copies them away);
        // it stays a source, and takes none.
        let mut not_counted = BTreeSet::new();
        for d in space {
            let has_room = d.has_room();
            let loc = d.location;
            let mut health = self.liveness(loc.host_id).health();
            let draining = states
                .iter()
                .any(|(h, st, _, _)| *h == loc.host_id && st == "draining");
            let has_room = has_room && !draining;
            if draining {
                not_counted.insert(loc.device_id);
                if health == HostHealth::Up {
                    health = HostHealth::Leaving;
                }
            }
            if let Some(&until) = away.get(&loc.host_id) {
                // Shipped: not dead before its time is up, and not read from
                // (nor counted as live) until it is back and verified.
                if health == HostHealth::Dead && now < until {
                    health = HostHealth::Down;
                }
                no_source.insert(loc.device_id);
            }
            let candidate = Candidate {
                device_id: loc.device_id,
                host_id: loc.host_id,
                zone: loc.zone,
            };
            let view = DeviceView {
                candidate,
                health,
                has_room,
                capacity_bytes: d.capacity_bytes,
                free_bytes: d.free_bytes,
            };
            devices.push((view, loc.addr));
        }
        let ids = |f: &dyn Fn(&DeviceView) -> bool| -> Vec<u64> {
            devices
                .iter()
                .filter(|(d, _)| f(d))
                .map(|(d, _)| d.candidate.device_id)
                .collect()
        };
        let counted =
            ids(&|d| d.health != HostHealth::Dead && !not_counted.contains(&d.candidate.device_id));
        let up = ids(&|d| {
            d.health == HostHealth::Up
                && !no_source.contains(&d.candidate.device_id)
                && !not_counted.contains(&d.candidate.device_id)
        });
        // A returning shipped host takes copies (its catch-up) before it serves.
        let targets = ids(&|d| d.health == HostHealth::Up && d.has_room);
        let copies = self.class.copies;
        let (blocks, extra, counts) = self
            .read(move |conn| {
                let blocks =
                    state::repair_candidates(conn, &counted, &up, &targets, copies, &after, limit)?;
                let extra = state::over_replicated(conn, &up, copies, &extra_after, limit)?;
                Ok((blocks, extra, state::replication_counts(conn, &up, copies)?))
            })
            .await?;
        Ok(Some(RepairView {
            devices,
            blocks,
            extra,
            counts,
            no_source,
        }))
    }

    /// Leader only (None otherwise): up to `limit` blocks no file references
    /// that have been idle for longer than `grace`, with the time (the
    /// leader's clock) they must have been idle before.
    pub async fn garbage(
        &self,
        grace: Duration,
        limit: usize,
    ) -> Result<Option<(i64, Vec<BlockView>)>, TrackerError> {
        if !self.is_leader() {
            return Ok(None);
        }
        let idle_before =
            wall_clock_ns().saturating_sub(grace.as_nanos().min(i64::MAX as u128) as i64);
        let blocks = self
            .read(move |conn| state::garbage(conn, idle_before, limit))
            .await?;
        Ok(Some((idle_before, blocks)))
    }

    /// Where each device that is not gone lives: its host and address.
    pub async fn device_locations(&self) -> Result<BTreeMap<u64, (NodeId, String)>, TrackerError> {
        let space = self.read(state::device_space).await?;
        Ok(space
            .into_iter()
            .map(|d| (d.location.device_id, (d.location.host_id, d.location.addr)))
            .collect())
    }

    /// The devices each of `hashes` is recorded on in this member's state
    /// machine (`None`: an unknown block). On the leader, right after a
    /// proposal, that includes its effect.
    pub async fn recorded(
        &self,
        hashes: Vec<Vec<u8>>,
    ) -> Result<Vec<Option<Vec<u64>>>, TrackerError> {
        self.read(move |conn| state::recorded(conn, &hashes)).await
    }

    /// Which of `hashes` have a copy recorded on this host's `device_id`, as
    /// of a read index from the leader (a member that lags, having been
    /// away, must not judge by its stale view). `None` when the tracker does
    /// not know the device as this host's.
    pub async fn copies_on(
        &self,
        device_id: u64,
        hashes: Vec<Vec<u8>>,
    ) -> Result<Option<BTreeSet<Vec<u8>>>, TrackerError> {
        self.read_barrier(pb::Consistency::ReadIndex).await?;
        let host = self.host_id;
        self.read(move |conn| state::copies_on(conn, host, device_id, &hashes))
            .await
    }
}

/// The hosts that are away (shipped) among `states`, with until when.
fn away_until(states: &[(u64, String, i64, i64)]) -> BTreeMap<u64, i64> {
    states
        .iter()
        .filter(|(_, s, ..)| s == "away")
        .map(|(h, _, until, _)| (*h, *until))
        .collect()
}

fn role_of(id: NodeId, leader: Option<NodeId>, voters: &BTreeSet<NodeId>) -> String {
    if Some(id) == leader {
        "leader".into()
    } else if voters.contains(&id) {
        "follower".into()
    } else {
        "learner".into()
    }
}
