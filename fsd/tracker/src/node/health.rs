//! How the tracker sees hosts and blocks: liveness, status, the repair
//! view, what shipping or draining a host would put at risk, and the block
//! scans the daemon's workers read. The host-state handling lives here and
//! in `state::{hosts, health}`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use failsafe_core::Liveness;
use failsafe_core::{judge, AdminState, BlockView, Candidate, DeviceView, Judgement};
use failsafe_proto::pb;
use openraft::ServerState;

use super::{wall_clock_ns, Tracker, TrackerError};
use crate::network::Seen;
use crate::raft::NodeId;
use crate::state::{self, admin_state, HostStates};

/// Whom the cluster knows by which key: each host's pinned key, and the
/// keys of revoked credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyBook {
    pub pinned: std::collections::HashMap<u64, [u8; 32]>,
    pub revoked: std::collections::HashSet<[u8; 32]>,
}

impl KeyBook {
    /// Why a caller with `grant` and key `key_id` is refused, if it is.
    pub fn refuses(&self, grant: &failsafe_tls::Grant, key_id: &[u8; 32]) -> Option<String> {
        if self.revoked.contains(key_id) {
            return Some(format!("the credential of {} was revoked", grant.who()));
        }
        match self.pinned.get(&grant.host_id) {
            Some(k) if grant.role == failsafe_tls::Role::Member && k != key_id => Some(format!(
                "host {:016x} is known by another key",
                grant.host_id
            )),
            _ => None,
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
    /// The pinned host keys and the revoked ones, as this member has
    /// applied them (see `state::key_book`).
    pub async fn key_book(&self) -> Result<KeyBook, TrackerError> {
        let (pinned, revoked) = self.read(state::key_book).await?;
        let key = |k: Vec<u8>| <[u8; 32]>::try_from(k).ok();
        Ok(KeyBook {
            pinned: pinned
                .into_iter()
                .filter_map(|(h, k)| Some((h, key(k)?)))
                .collect(),
            revoked: revoked.into_iter().filter_map(key).collect(),
        })
    }

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
        // Hosts that will still serve.
        let now = wall_clock_ns();
        let others_up: BTreeSet<u64> = zone_of
            .keys()
            .copied()
            .filter(|h| *h != host_id && self.judge(*h, &states, now).live)
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
            .filter_map(|(h, s)| match s.admin {
                AdminState::Away { until_ns } => Some((h, (until_ns, s.since))),
                _ => None,
            })
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

    /// The one health rule (`failsafe_core::judge`) applied to host `id`,
    /// as this member sees it at `now`.
    fn judge(&self, id: NodeId, states: &HostStates, now: i64) -> Judgement {
        judge(
            self.liveness(id),
            admin_state(states, id),
            now,
            self.is_leader(),
        )
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
        let (hosts, devices, (files, blocks), kept) = self
            .sm
            .db()
            .call(|conn| -> rusqlite::Result<_> {
                Ok((
                    state::hosts(conn)?,
                    state::devices(conn)?,
                    state::counts(conn)?,
                    state::kept_counts(conn)?,
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
        let now = wall_clock_ns();
        let mut live_hosts = BTreeSet::new();
        let mut not_up = BTreeSet::new();
        for row in rows.values_mut() {
            let admin = admin_state(&states, row.host_id);
            let (shown, until) = match admin {
                AdminState::Active => (pb::HostAdminState::Active, 0),
                AdminState::Away { until_ns } => (pb::HostAdminState::Away, until_ns),
                AdminState::Draining => (pb::HostAdminState::Draining, 0),
            };
            row.set_admin(shown);
            row.away_until_ns = until;
            let liveness = self.liveness(row.host_id);
            let judged = judge(liveness, admin, now, is_leader);
            let (shown, down_ms) = match liveness {
                Liveness::Up => (pb::HostLiveness::Up, 0),
                Liveness::Down { for_ms, .. } => (pb::HostLiveness::Down, for_ms),
                Liveness::Unknown => (pb::HostLiveness::Unknown, 0),
            };
            row.set_state(shown);
            if shown != pb::HostLiveness::Up {
                not_up.insert(row.host_id);
            }
            row.down_ms = down_ms;
            row.dead = judged.dead();
            if judged.live {
                live_hosts.insert(row.host_id);
            }
        }
        if is_leader {
            for row in rows
                .values_mut()
                .filter(|r| r.admin() == pb::HostAdminState::Draining)
            {
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
        // Fail-safe means one more failure is tolerated: every block at
        // its copy count and every voting tracker member up. With one down
        // (even one whose copies still count, not yet dead), another
        // failure stops metadata changes, and small files' bytes, kept in
        // the tracker's state, have a copy fewer.
        let voter_down = voters.iter().any(|v| not_up.contains(v));
        let short = counts.under_replicated > 0 || voter_down;
        let mode = if leader.is_none() || (is_leader && short) {
            pb::ClusterMode::Limp
        } else if is_leader {
            pb::ClusterMode::FailSafe
        } else {
            pb::ClusterMode::Unknown
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
            mode: mode as i32,
            copies: copies as u32,
            repair: None,
            scrub: None,
            gc: None,
            blockify: None,
            leader_placement: None,
            warnings: Vec::new(),
            clients: self.clients().await?,
            trash_items: kept.0,
            trash_bytes: kept.1,
            snapshots: kept.2,
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
        let now = wall_clock_ns();
        let mut devices = Vec::with_capacity(space.len());
        let (mut counted, mut up, mut targets, mut no_source) =
            (Vec::new(), Vec::new(), Vec::new(), BTreeSet::new());
        for d in space {
            let has_room = d.has_room();
            let loc = d.location;
            let judged = self.judge(loc.host_id, &states, now);
            let id = loc.device_id;
            if judged.counted {
                counted.push(id);
            }
            if judged.live {
                up.push(id);
            }
            if !judged.readable {
                no_source.insert(id);
            }
            // A returning shipped host takes copies (its catch-up) before it serves.
            let has_room = has_room && judged.takes_copies;
            if has_room {
                targets.push(id);
            }
            let candidate = Candidate {
                device_id: id,
                host_id: loc.host_id,
                zone: loc.zone,
            };
            let view = DeviceView {
                candidate,
                health: judged.health,
                has_room,
                capacity_bytes: d.capacity_bytes,
                free_bytes: d.free_bytes,
            };
            devices.push((view, loc.addr));
        }
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

    /// Leader only: whether the trash holds items whose time has come, or
    /// more bytes than its policy allows (what `ExpireTrash` forgets).
    pub async fn trash_due(&self) -> Result<bool, TrackerError> {
        if !self.is_leader() {
            return Ok(false);
        }
        let now = wall_clock_ns();
        self.read(move |conn| state::trash_due(conn, now)).await
    }

    /// Leader only (`None` elsewhere): up to `limit` inline extents
    /// committed more than `age` ago by the leader's clock, as (inode,
    /// extent) in file order, with their bytes — what the blockifier turns
    /// into blocks. Read from the applied state: only committed writes.
    pub async fn old_inline(
        &self,
        age: Duration,
        limit: usize,
    ) -> Result<Option<Vec<(u64, failsafe_core::Extent)>>, TrackerError> {
        if !self.is_leader() {
            return Ok(None);
        }
        let before = wall_clock_ns().saturating_sub(age.as_nanos().min(i64::MAX as u128) as i64);
        let found = self
            .read(move |conn| state::old_inline(conn, before, limit))
            .await?;
        Ok(Some(found))
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

fn role_of(id: NodeId, leader: Option<NodeId>, voters: &BTreeSet<NodeId>) -> String {
    if Some(id) == leader {
        "leader".into()
    } else if voters.contains(&id) {
        "follower".into()
    } else {
        "learner".into()
    }
}
