//! One tracker member: the Raft node, its storage, and the operations the
//! daemon's services call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use failsafe_core::{LeaderPolicy, ReplicationClass};
use failsafe_proto::pb::{self, query_reply::Reply, query_request::Query};
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};

use crate::network::Network;
use crate::raft::{LogFormatError, LogStore, NodeId, OpenLogError, Raft, StateMachine};
mod group;
mod handover;
mod health;
mod leases;
mod sessions;
mod snapshots;
pub use sessions::CLOCK_WARN_MS;

pub use group::GroupCounts;
pub use handover::{HandedOver, LeaderSnapshot};
pub use health::{KeyBook, Liveness, RepairView};

use crate::state;

/// The cluster this host belongs to; empty until `fsctl init` or a join.
#[derive(Clone, Default)]
pub struct ClusterId(Arc<RwLock<String>>);

impl ClusterId {
    pub fn new(id: String) -> ClusterId {
        ClusterId(Arc::new(RwLock::new(id)))
    }
    pub fn get(&self) -> String {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set(&self, id: String) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = id;
    }
}

/// Raft timing and log retention.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, for followers that lag a little.
    pub keep_logs: u64,
    pub class: ReplicationClass,
    /// A host the leader has not heard from for this long is dead: its
    /// copies stop counting, and repair rebuilds them elsewhere.
    pub dead_after_ms: u64,
    /// Leadership follows the writers (see `handover`); `None`: it stays
    /// where elections put it.
    pub leader_placement: Option<LeaderPolicy>,
    /// The largest snapshot this member accepts from a leader.
    pub max_snapshot_bytes: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            // openraft also uses the heartbeat interval as the deadline of an
            // AppendEntries round trip, which includes the follower's fsync.
            // A follower stands for election only after the leader lease
            // (election_max) plus its election timeout: 1.05 to 1.4 s after
            // the leader's last heartbeat, which keeps a failover under the
            // 3 s after which DokuWiki calls a lock stale.
            heartbeat_ms: 100,
            election_min_ms: 350,
            election_max_ms: 700,
            snapshot_logs: 5000,
            keep_logs: 1000,
            class: ReplicationClass::default(),
            dead_after_ms: 600_000,
            leader_placement: Some(LeaderPolicy::default()),
            // Far above any wiki's metadata (a million files take some
            // hundreds of MB), under what would exhaust a host's memory
            // (openraft holds a snapshot in memory).
            max_snapshot_bytes: 4 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("not the tracker leader")]
    NotLeader { leader_addr: Option<String> },
    #[error("no quorum of tracker members reachable: {0}")]
    NoQuorum(String),
    #[error("this host is not part of a cluster yet")]
    NotInitialized,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The tracker's databases or directory failed.
    #[error("tracker storage failed: {0}")]
    Storage(BoxError),
    /// The Raft log was written by another version of fsd.
    #[error(transparent)]
    LogFormat(LogFormatError),
    /// A leadership hand-over was refused or abandoned.
    #[error("leadership hand-over: {0}")]
    Handover(String),
    /// Raft stopped (a fatal storage error), or a database thread is gone.
    #[error("tracker stopped: {0}")]
    Stopped(BoxError),
}

/// The cause of a storage failure or stop. It is kept whole (match on it,
/// downcast it), and written into the message rather than returned as
/// `source()`, so that a one-line report (`{:#}`) does not say it twice.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl TrackerError {
    pub(crate) fn storage(e: impl Into<BoxError>) -> TrackerError {
        TrackerError::Storage(e.into())
    }
}

impl From<crate::db::DbGone> for TrackerError {
    fn from(e: crate::db::DbGone) -> Self {
        TrackerError::Stopped(Box::new(e))
    }
}

/// What a writer may cache of its own change: read for it after the leader
/// registered it as a holder of what the change touched or made.
/// What a holder's change asks of write-behind (docs/write-behind.md):
/// `MutateRequest.delegate` and `.flush_of`, 0 for none.
#[derive(Debug, Default, Clone, Copy)]
pub struct Behind {
    pub delegate: u64,
    pub flush_of: u64,
}

/// For each command of `cmd` (itself, or a flush's), the file whose bytes
/// it stores, for the writer's read-back: a commit of extents names it, a
/// create with its bytes makes it (`Some(0)`: its inode comes with the
/// result). Taken before the command goes into the log.
fn writes(cmd: &pb::Command) -> Vec<Option<u64>> {
    use pb::command::Op;
    let one = |c: &pb::Command| match &c.op {
        Some(Op::CommitExtents(x)) => Some(x.ino),
        Some(Op::Create(x)) if x.content.is_some() => Some(0),
        _ => None,
    };
    match &cmd.op {
        Some(Op::Batch(b)) => b.commands.iter().map(one).collect(),
        _ => vec![one(cmd)],
    }
}

/// The files [`writes`] said the commands store, now that `result` is in.
fn wrote(writes: &[Option<u64>], result: &pb::CommandResult) -> Vec<u64> {
    use pb::command_result::Result as R;
    writes
        .iter()
        .zip(results_of(result))
        .filter_map(|(w, r)| match (w, &r.result) {
            (Some(0), Some(R::Attr(a))) => Some(a.ino),
            (Some(0), _) => None,
            (w, _) => *w,
        })
        .collect()
}

/// The results of each command `result` answers: a flush's, or itself.
fn results_of(result: &pb::CommandResult) -> &[pb::CommandResult] {
    match &result.result {
        Some(pb::command_result::Result::Batch(b)) => &b.results,
        _ => std::slice::from_ref(result),
    }
}

fn refused(e: state::OpError) -> pb::CommandResult {
    pb::CommandResult {
        result: Some(pb::command_result::Result::Error(pb::CommandError {
            code: e.code as i32,
            message: e.message,
        })),
        changed: Vec::new(),
    }
}

/// The inode a query asks about (whose lease covers the answer).
pub(crate) fn query_object(q: &Query) -> Option<u64> {
    match q {
        Query::Lookup(l) => Some(l.parent),
        Query::GetAttr(g) => Some(g.ino),
        Query::ReadDir(r) => Some(r.ino),
        Query::ReadLink(r) => Some(r.ino),
        Query::ReadExtents(r) => Some(r.ino),
        _ => None,
    }
}

/// The inodes whose attributes an answer carries.
fn reply_inos(r: &Reply) -> Vec<u64> {
    match r {
        Reply::Attr(a) => vec![a.ino],
        Reply::FileExtents(fe) => fe.attr.iter().map(|a| a.ino).collect(),
        Reply::DirPage(p) => p.entries.iter().map(|e| e.ino).collect(),
        _ => Vec::new(),
    }
}

pub struct ReadBack {
    /// The directory the writer asked for is delegated to it.
    pub delegated: bool,
    pub lease: pb::LeaseGrant,
    /// The attributes of those inodes (a gone one left out).
    pub attrs: Vec<pb::Attr>,
    /// The names the change changed, as they are now.
    pub names: Vec<pb::NameRead>,
    /// The file whose bytes it stored, as an open needs it (if small).
    pub extents: Vec<pb::FileExtents>,
}

pub struct Tracker {
    raft: Raft,
    group: group::GroupCommit,
    /// Metadata leases while this member leads; `None` when Raft's timing
    /// leaves no room for them (every read then asks).
    leases: Option<leases::LeaseTable>,
    network: Network,
    /// How fresh a quorum acknowledgement must be for a lease read (ms).
    lease_ms: u64,
    /// A peer silent this long is down (ms).
    down_after_ms: u64,
    dead_after_ms: u64,
    sm: StateMachine,
    placement: handover::Placement,
    /// Where the tracker's databases live.
    dir: std::path::PathBuf,
    max_snapshot_bytes: u64,
    /// The disk under the databases is nearly full (see
    /// [`Tracker::set_space_low`]).
    space_low: std::sync::atomic::AtomicBool,
    /// Sessions as the leader's monotonic clock sees them.
    session_clock: sessions::Clock,
    pub host_id: NodeId,
    pub cluster: ClusterId,
    pub class: ReplicationClass,
}

impl Tracker {
    /// The directory of the tracker's databases.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether every inode of `inos` lies under the directory at path
    /// `subdir`, as this member's state says once it is as fresh as
    /// `consistency` asks: what a client confined to a subtree may name.
    pub async fn inside(
        &self,
        subdir: &str,
        inos: Vec<u64>,
        lookup: Option<(u64, Vec<u8>)>,
        consistency: pb::Consistency,
    ) -> Result<bool, TrackerError> {
        self.read_barrier(consistency).await?;
        let subdir = subdir.to_string();
        self.read(move |conn| {
            let lookup = lookup.as_ref().map(|(p, n)| (*p, n.as_slice()));
            state::inside(conn, &subdir, &inos, lookup)
        })
        .await
    }

    /// The largest snapshot this member accepts.
    pub fn max_snapshot_bytes(&self) -> u64 {
        self.max_snapshot_bytes
    }

    pub async fn open(
        dir: &Path,
        host_id: NodeId,
        cfg: &TrackerConfig,
        cluster: ClusterId,
        tls: failsafe_tls::Tls,
    ) -> Result<Tracker, TrackerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TrackerError::storage(format!("{}: {e}", dir.display())))?;
        let log = LogStore::open(&dir.join("raft.db")).map_err(|e| match e {
            OpenLogError::Format(e) => TrackerError::LogFormat(e),
            OpenLogError::Db(e) => TrackerError::storage(e),
        })?;
        let sm = StateMachine::open(dir).map_err(TrackerError::storage)?;
        let config = openraft::Config {
            cluster_name: "failsafe".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_min_ms,
            election_timeout_max: cfg.election_max_ms,
            install_snapshot_timeout: 5_000,
            // Each member builds its own in turn (`snapshots`).
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            purge_batch_size: 64,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        }
        .validate()
        .map_err(|e| TrackerError::Invalid(format!("raft config: {e}")))?;
        let network = Network::new(cluster.clone(), tls);
        let raft = Raft::new(host_id, Arc::new(config), network.clone(), log, sm.clone())
            .await
            .map_err(TrackerError::storage)?;
        tokio::spawn(snapshots::in_turn(raft.clone(), host_id, cfg.snapshot_logs));
        // Well inside the followers' lease (election_max), leaving room for
        // clock-rate differences and scheduling delays.
        let quick = crate::network::QUICK_COMMIT_WITHIN.as_millis() as u64;
        let lease_ms =
            (cfg.election_min_ms / 2).min(cfg.election_max_ms.saturating_sub(quick + 20));
        // Ten missed heartbeats, and never under a second: a follower busy
        // with an fsync is not down.
        let down_after_ms = (cfg.heartbeat_ms * 10).max(1000);
        Ok(Tracker {
            dir: dir.to_path_buf(),
            max_snapshot_bytes: cfg.max_snapshot_bytes,
            space_low: Default::default(),
            session_clock: Default::default(),
            group: group::GroupCommit::start(raft.clone()),
            // The leader's clock may put a quorum's last contact up to
            // QUICK_COMMIT_WITHIN too late (commit-only heartbeats are
            // answered at once): a read lease that long longer, as far as
            // the mounts' leases are concerned.
            leases: leases::lease_config(lease_ms + quick, cfg.election_max_ms)
                .map(leases::LeaseTable::new),
            raft,
            network,
            lease_ms,
            down_after_ms,
            dead_after_ms: cfg.dead_after_ms,
            sm,
            placement: handover::Placement::new(cfg.leader_placement, cfg.election_max_ms),
            host_id,
            cluster,
            class: cfg.class,
        })
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// What group commit has done on this member (it proposes only while
    /// leading).
    pub fn group_counts(&self) -> GroupCounts {
        self.group.counts()
    }

    /// Whether this member has ever been part of a membership.
    pub fn is_initialized(&self) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let initialized = m.membership().nodes().next().is_some();
        initialized
    }

    /// Makes this host a one-member cluster.
    pub async fn initialize(&self, addr: &str) -> Result<(), TrackerError> {
        let members = BTreeMap::from([(self.host_id, BasicNode::new(addr))]);
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(TrackerError::Membership(e.to_string())),
        }
    }

    /// The leader's id and address, as this member knows them.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((id, addr))
    }

    /// The disk under this member's databases is nearly full (the
    /// daemon's reserve keeper says so; review B3): as leader it refuses
    /// changes that make the metadata grow (NO_SPACE, ENOSPC to the
    /// application) and hands leadership to a member with room, which
    /// refuses to take it while its own disk is nearly full. Deletes,
    /// sessions and locks go on, on the reserve.
    pub fn set_space_low(&self, low: bool) {
        let was = self
            .space_low
            .swap(low, std::sync::atomic::Ordering::Relaxed);
        if was != low {
            if low {
                tracing::error!("the disk under the tracker's databases is nearly full: refusing changes that add metadata until space is freed");
            } else {
                tracing::info!("the disk under the tracker's databases has room again");
            }
        }
    }

    pub fn space_low(&self) -> bool {
        self.space_low.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The other voters, when this member leads.
    pub fn other_voters(&self) -> Vec<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Vec::new();
        }
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.host_id)
            .collect()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    fn not_leader(&self) -> TrackerError {
        TrackerError::NotLeader {
            leader_addr: self.leader().map(|(_, a)| a).filter(|a| !a.is_empty()),
        }
    }

    /// Appends a command to the Raft log and returns its result once applied;
    /// commands proposed at the same time share an entry (`group`). A
    /// command without a time gets this member's clock, before it enters
    /// the log (so every member applies the same time). Batches are formed
    /// here only: one proposed from outside is refused.
    pub async fn propose(&self, cmd: pb::Command) -> Result<pb::CommandResult, TrackerError> {
        self.propose_as(cmd, None, Behind::default())
            .await
            .map(|(result, _)| result)
    }

    /// [`Tracker::propose`] for lease holder `by` (a mount's Watch stream),
    /// which updates its own cache from the answer: with the result, what
    /// it may cache of what the command touched (see [`ReadBack`]). Every
    /// other holder of a lease on what the command changed has given it up
    /// (or its leases have run out) before this returns, and is sent a
    /// refresh of it.
    ///
    /// Delegations (write-behind, `behind`): what the command names that is
    /// delegated to another holder is recalled before it is proposed; a
    /// delegate's flush is refused once it no longer holds the directory; a
    /// holder that asked is delegated the directory after its change.
    pub async fn propose_as(
        &self,
        mut cmd: pb::Command,
        by: Option<u64>,
        behind: Behind,
    ) -> Result<(pb::CommandResult, Option<ReadBack>), TrackerError> {
        // Refuse what can never apply before it takes a place in the log,
        // whoever proposes it (a client's Mutate or this host's workers).
        // A batch from outside is a delegate's flush: its changes of the
        // directory, in order, in one entry, each applied or refused alone.
        let flush_batch = match &cmd.op {
            Some(pb::command::Op::Batch(b)) => Some(b.commands.len()),
            _ => None,
        };
        let outside_batch = match flush_batch {
            Some(_) if behind.flush_of == 0 => Some(state::OpError::new(
                pb::ErrorCode::Invalid,
                "batches are formed by the leader, or are a delegate's flush",
            )),
            Some(n) if n > group::MAX_COMMANDS => Some(state::OpError::new(
                pb::ErrorCode::Invalid,
                format!("a flush of {n} changes; at most {}", group::MAX_COMMANDS),
            )),
            _ => None,
        };
        if let Some(e) = outside_batch.or_else(|| state::validate(&cmd).err()) {
            return Ok((refused(e), None));
        }
        let known = state::known_touched(&cmd);
        // A flush changes only the delegated directory (each of its changes
        // names it).
        let within = |dir: u64| match &cmd.op {
            Some(pb::command::Op::Batch(b)) => b
                .commands
                .iter()
                .all(|c| state::known_touched(c).contains(&dir)),
            _ => known.contains(&dir),
        };
        if behind.flush_of != 0 && !within(behind.flush_of) {
            let outside = state::OpError::new(
                pb::ErrorCode::Invalid,
                format!("a flush of directory {} changes only it", behind.flush_of),
            );
            return Ok((refused(outside), None));
        }
        let _flushing = match (behind.flush_of, by, &self.leases) {
            (0, _, _) => None,
            (dir, Some(h), Some(leases)) => leases.begin_flush(h, dir),
            _ => None,
        };
        if behind.flush_of != 0 && _flushing.is_none() {
            let lost = state::OpError::new(
                pb::ErrorCode::DelegationLost,
                format!("directory {} is no longer delegated here", behind.flush_of),
            );
            return Ok((refused(lost), None));
        }
        if let Some(leases) = &self.leases {
            leases.recall(&known, by).await;
            // A snapshot holds what every mount did under its delegations,
            // and a restore may put names into any directory.
            if matches!(
                cmd.op,
                Some(pb::command::Op::CreateSnapshot(_) | pb::command::Op::RestoreTrash(_))
            ) {
                leases.recall_all().await;
            }
        }
        // Holders of what the command names are told now, in parallel with
        // its trip through the log; those of inodes found by name (an
        // unlinked or replaced file) once it has applied.
        let names = state::changed_names(&cmd);
        let writes = writes(&cmd);
        let early = self.leases.as_ref().map(|l| l.begin(&known, by));
        let result = {
            // Held while leadership is being handed over (not while the
            // change waits for lease holders below).
            let _permit = self.admit().await?;
            let now = wall_clock_ns();
            let stamp = |c: &mut pb::Command| {
                if c.now_ns <= 0 {
                    c.now_ns = now;
                }
                c.leader_ns = now;
            };
            match cmd.op.take() {
                Some(pb::command::Op::Batch(b)) => {
                    let mut commands = b.commands;
                    commands.iter_mut().for_each(stamp);
                    let results = self.group.propose_all(commands).await?;
                    let mut changed: Vec<u64> =
                        results.iter().flat_map(|r| r.changed.clone()).collect();
                    changed.sort_unstable();
                    changed.dedup();
                    pb::CommandResult {
                        result: Some(pb::command_result::Result::Batch(pb::BatchResult {
                            results,
                        })),
                        changed,
                    }
                }
                op => {
                    cmd.op = op;
                    stamp(&mut cmd);
                    self.group.propose(cmd).await?
                }
            }
        };
        if let Some(leases) = &self.leases {
            let found: Vec<u64> = result
                .changed
                .iter()
                .filter(|o| !known.contains(o))
                .copied()
                .collect();
            let late = leases.begin(&found, by);
            let mut told: Vec<u64> = late.told().to_vec();
            // A refused command changed nothing: no need to wait for the
            // holders told early (dropping it ends the change).
            if let Some(early) = early.filter(|_| !result.changed.is_empty()) {
                told.extend_from_slice(early.told());
                early.done().await;
            }
            late.done().await;
            told.sort_unstable();
            told.dedup();
            let wrote = wrote(&writes, &result);
            let mut back = self
                .read_back(leases, by, told, names, wrote, &result)
                .await?;
            let dir = behind.delegate;
            if let (Some(b), Some(h), true) = (&mut back, by, known.contains(&dir)) {
                // Others' grants of it (a refresh after a change of its
                // parent gives them) are taken back first, as a change of
                // it would.
                if leases.held_by_others(dir, h) {
                    leases.begin(&[dir], by).done().await;
                }
                b.delegated = leases.delegate(h, dir);
            }
            return Ok((result, back));
        }
        Ok((result, None))
    }

    /// The term whose leases this member may grant and renew now: it leads
    /// and a quorum acknowledged it within its read lease.
    pub fn lease_term(&self) -> Option<u64> {
        // Asked on every leased query and renewal: read the two fields in
        // place rather than clone the metrics.
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader && self.quorum_fresh(&m)).then_some(m.current_term)
    }

    /// [`Tracker::lease_term`], waiting up to `within` for it while this
    /// member leads but has not heard from a quorum lately (a busy moment,
    /// not a lost leadership).
    pub async fn lease_term_within(&self, within_ms: u64) -> Option<u64> {
        let until = tokio::time::Instant::now() + Duration::from_millis(within_ms);
        loop {
            if let Some(t) = self.lease_term() {
                return Some(t);
            }
            if !self.is_leader() || tokio::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether this member still leads in `term` (whether or not a quorum
    /// answered it lately).
    pub fn leads_in(&self, term: u64) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_term == term
    }

    /// Whether a quorum of every voter set accepted AppendEntries this
    /// member sent in its current term within the read lease (see
    /// `network::Acked`; measured now, not when the metrics were made).
    fn quorum_fresh(&self, m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>) -> bool {
        self.network
            .acked()
            .quorum_since(
                m.current_term,
                m.membership_config.membership().get_joint_config(),
                self.host_id,
            )
            .is_some_and(|t| t.elapsed() < Duration::from_millis(self.lease_ms))
    }

    /// Renewals this member left unanswered since it started, for lack of
    /// a quorum heard from within its read lease while it led (`/metrics`).
    pub fn lease_renewals_unanswered(&self) -> u64 {
        self.leases.as_ref().map_or(0, |l| l.unanswered())
    }

    /// Lease streams open here and objects the lease table tracks.
    pub fn lease_sizes(&self) -> (usize, usize) {
        self.leases.as_ref().map_or((0, 0), |l| l.sizes())
    }

    /// Grants of leases this member refused to reads and writers'
    /// read-backs since it started, by why (`/metrics`).
    pub fn lease_refusals(&self) -> [(&'static str, u64); 6] {
        self.leases
            .as_ref()
            .map(|l| l.refused())
            .unwrap_or_default()
            .named()
    }

    /// The lease table, when this member can have one.
    pub(crate) fn leases(&self) -> Option<&leases::LeaseTable> {
        self.leases.as_ref()
    }

    /// Leader only: confirms leadership with a quorum; returns the index a
    /// linearizable read must have applied.
    pub async fn read_index(&self) -> Result<u64, TrackerError> {
        // Leader lease: a quorum accepted AppendEntries this leader sent
        // very recently (measured from when they were sent, against the
        // clock now: see `network::Acked`), and followers refuse to vote
        // for anyone else for `election_max` after hearing from it, so no
        // other leader can have committed anything since. openraft's own
        // `millis_since_quorum_ack` will not do: it is computed when the
        // metrics were last reported, so a leader paused and deposed
        // meanwhile would read it as fresh (review B6). Everything this
        // leader acknowledged to a client is applied here, so the applied
        // index is a valid read point without another round trip -- once
        // it has applied an entry of its own term. Before that (just
        // elected), entries a previous leader acknowledged may be committed
        // but not applied here yet: reading then would answer from before
        // them (a name already renamed away still there), so the read waits
        // for this term's first entry.
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader
            && m.last_applied
                .is_some_and(|l| l.leader_id.term == m.current_term)
            && self.quorum_fresh(&m)
        {
            return Ok(m.last_applied.map_or(0, |l| l.index));
        }
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(TrackerError::NotLeader {
                    leader_addr: f.leader_node.map(|n| n.addr),
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(TrackerError::NoQuorum(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(TrackerError::Stopped(Box::new(f))),
        }
    }

    /// A follower's linearizable read: the leader's read index, then wait
    /// until this member has applied it.
    async fn follower_read_index(&self, timeout: Duration) -> Result<(), TrackerError> {
        self.follower_index(timeout, false).await
    }

    /// The leader's read index (`probe`: only to learn it, as a readiness
    /// check does, so no delegation is recalled), then waits until this
    /// member has applied it.
    async fn follower_index(&self, timeout: Duration, probe: bool) -> Result<(), TrackerError> {
        let (_, addr) = self
            .leader()
            .filter(|(_, a)| !a.is_empty())
            .ok_or_else(|| TrackerError::NoQuorum("no known leader".into()))?;
        let index = self.network.read_index(&addr, timeout, probe).await?;
        if self.wait_applied(index, timeout).await {
            Ok(())
        } else {
            Err(TrackerError::NoQuorum(format!(
                "did not apply up to {index} in time"
            )))
        }
    }

    /// A linearizable query for lease holder `holder`: the answer, and
    /// whether it may be cached. The grant is registered before the read, so
    /// a change applied after it finds the holder.
    pub async fn query_leased(
        &self,
        q: Query,
        holder: u64,
    ) -> Result<(Reply, pb::LeaseGrant), TrackerError> {
        let no = pb::LeaseGrant::default();
        let by = Some(holder);
        let linearizable = pb::Consistency::Linearizable;
        let (Some(leases), Some(term)) = (self.leases(), self.lease_term()) else {
            return Ok((self.query_by(q, linearizable, by).await?, no));
        };
        if let Query::Revalidate(r) = &q {
            // Many objects at once, each granted or refused alone: register
            // the holder on each, then read them all.
            let inos = r.inos.clone();
            leases.recall(&inos, by).await;
            let each = leases.grant_each(holder, &inos);
            let mut reply = self.query_by(q, linearizable, by).await?;
            if let Reply::AttrList(list) = &mut reply {
                list.refused = inos
                    .iter()
                    .zip(&each)
                    .filter(|(_, &granted)| !granted)
                    .map(|(&ino, _)| ino)
                    .collect();
            }
            let granted = each.iter().any(|&g| g);
            return Ok((reply, pb::LeaseGrant { granted, term }));
        }
        let Some(object) = query_object(&q) else {
            return Ok((self.query_by(q, linearizable, by).await?, no));
        };
        leases.recall(&[object], by).await;
        let mut granted = leases.grant(holder, &[object]);
        let mut reply = self.query_by(q.clone(), linearizable, by).await?;
        // A name's answer carries its inode's attributes: lease that inode
        // too, and read its attributes again after registering, so a change
        // to it between the two reads is not missed.
        let named = match &reply {
            Reply::Attr(a) => Some((
                a.ino,
                Query::GetAttr(pb::GetAttr {
                    ino: a.ino,
                    extents: false,
                }),
            )),
            Reply::FileExtents(fe) if matches!(q, Query::Lookup(_)) => fe
                .attr
                .map(|a| (a.ino, Query::ReadExtents(failsafe_proto::whole_file(a.ino)))),
            _ => None,
        };
        if let Some((ino, again)) = named {
            if granted && object != ino {
                granted = leases.grant(holder, &[ino]);
                if granted {
                    // Leadership was confirmed by the first read: this one
                    // need only come after the registration.
                    reply = self.query_by(again, pb::Consistency::Local, by).await?;
                }
            }
        }
        // A page of a listing with attributes: lease each entry's inode
        // too, and read the page again after registering them (as above).
        if let (Reply::DirPage(page), Query::ReadDir(r)) = (&reply, &q) {
            if granted && r.plus && !page.entries.is_empty() {
                let inos: Vec<u64> = page.entries.iter().map(|e| e.ino).collect();
                granted = leases.grant(holder, &inos);
                if granted {
                    reply = self.query_by(q.clone(), pb::Consistency::Local, by).await?;
                }
            }
        }
        Ok((reply, pb::LeaseGrant { granted, term }))
    }

    /// After a change with `result` applied and every holder it told
    /// (`told`) done with it: registers the writer `by` and the holders told
    /// on what it touched or made, reads that for them once, pushes it to
    /// the holders (a refresh on their streams) and returns it for the
    /// writer, so nobody has to ask again for what just changed. Nothing
    /// for a refused change, or for whoever a grant is refused.
    async fn read_back(
        &self,
        leases: &leases::LeaseTable,
        by: Option<u64>,
        told: Vec<u64>,
        names: Vec<(u64, Vec<u8>)>,
        wrote: Vec<u64>,
        result: &pb::CommandResult,
    ) -> Result<Option<ReadBack>, TrackerError> {
        use pb::command_result::Result as R;
        let Some(term) = self.lease_term() else {
            return Ok(None);
        };
        let mut inos = result.changed.clone();
        let results = results_of(result);
        for r in results {
            if let Some(R::Attr(a)) = &r.result {
                inos.push(a.ino);
            }
        }
        if results
            .iter()
            .all(|r| matches!(r.result, Some(R::Error(_)) | None))
        {
            return Ok(None);
        }
        inos.sort_unstable();
        inos.dedup();
        if inos.is_empty() {
            return Ok(None);
        }
        let others: Vec<u64> = told.into_iter().filter(|h| Some(*h) != by).collect();
        let (others, mark) = leases.refresh_grant(&others, &inos);
        let writer = by.is_some_and(|h| leases.grant(h, &inos));
        if others.is_empty() && !writer {
            return Ok(None);
        }
        // The change applied here and this member still leads (the grants
        // needed its term): read its state after registering them.
        let objects = inos.clone();
        let r = self
            .sm
            .db()
            .call(move |conn| state::read_back(conn, &inos, &names, &wrote))
            .await?;
        let (attrs, names, extents) = match r {
            Ok(found) => found,
            Err(state::ApplyError::Refused(_)) => return Ok(None),
            Err(state::ApplyError::Db(e)) => return Err(TrackerError::storage(e)),
        };
        if !others.is_empty() {
            let refresh = pb::Refresh {
                attrs: attrs.clone(),
                names: names.clone(),
            };
            leases.refresh_send(&others, &objects, mark, refresh);
        }
        Ok(writer.then_some(ReadBack {
            delegated: false,
            lease: pb::LeaseGrant {
                granted: true,
                term,
            },
            attrs,
            names,
            extents: if writer { extents } else { Vec::new() },
        }))
    }

    /// Answers a query, after confirming leadership for a linearizable one.
    pub async fn query(
        &self,
        q: Query,
        consistency: pb::Consistency,
    ) -> Result<Reply, TrackerError> {
        self.query_by(q, consistency, None).await
    }

    /// [`Tracker::query`] for `by` (a lease holder, or `None`): what it asks
    /// about, and what the answer tells about, comes back first from any
    /// other holder it is delegated to (write-behind), so the answer has
    /// what that holder did alone there.
    async fn query_by(
        &self,
        q: Query,
        consistency: pb::Consistency,
        by: Option<u64>,
    ) -> Result<Reply, TrackerError> {
        let Some(leases) = &self.leases else {
            return self.query_here(q, consistency).await;
        };
        if let Some(o) = query_object(&q) {
            leases.recall(&[o], by).await;
        }
        let reply = self.query_here(q.clone(), consistency).await?;
        let told = leases.delegated_to_others(&reply_inos(&reply), by);
        if told.is_empty() {
            return Ok(reply);
        }
        leases.recall(&told, by).await;
        // The first read confirmed what it had to; this one comes after
        // the delegates' flushes applied here.
        self.query_here(q, pb::Consistency::Local).await
    }

    async fn query_here(
        &self,
        q: Query,
        consistency: pb::Consistency,
    ) -> Result<Reply, TrackerError> {
        self.read_barrier(consistency).await?;
        let class = self.class;
        let r = self
            .sm
            .db()
            .call(move |conn| state::query(conn, &q, class))
            .await?;
        match r {
            Ok(reply) => Ok(reply),
            Err(state::ApplyError::Refused(e)) => Ok(Reply::Error(pb::CommandError {
                code: e.code as i32,
                message: e.message,
            })),
            Err(state::ApplyError::Db(e)) => Err(TrackerError::storage(e)),
        }
    }

    /// Waits until a read at `consistency` may be answered from this
    /// member's state machine.
    async fn read_barrier(&self, consistency: pb::Consistency) -> Result<(), TrackerError> {
        match consistency {
            pb::Consistency::Linearizable => {
                let index = self.read_index().await?;
                self.wait_applied(index, Duration::from_secs(2)).await;
            }
            pb::Consistency::ReadIndex if self.is_leader() => {
                let index = self.read_index().await?;
                self.wait_applied(index, Duration::from_secs(2)).await;
            }
            // Shorter than a client's RPC deadline: a follower that cannot
            // confirm says so in time for the client to ask elsewhere.
            pb::Consistency::ReadIndex => {
                self.follower_read_index(Duration::from_millis(800)).await?
            }
            pb::Consistency::Local if !self.is_initialized() => {
                return Err(TrackerError::NotInitialized)
            }
            pb::Consistency::Local => {}
        }
        Ok(())
    }

    /// Runs a read-only `f` on the state machine's database.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, TrackerError> {
        self.sm
            .db()
            .call(move |conn| f(conn))
            .await?
            .map_err(TrackerError::storage)
    }

    /// Makes `host_id` at `addr` a voter: first a learner that catches up,
    /// then a voter. Already a voter: only its address is refreshed.
    pub async fn add_member(&self, host_id: NodeId, addr: &str) -> Result<(), TrackerError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.contains(&host_id) {
            return self.set_address(host_id, addr).await;
        }
        self.raft
            .add_learner(host_id, BasicNode::new(addr), true)
            .await
            .map_err(group::write_error)?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([host_id])), false)
            .await
            .map_err(group::write_error)?;
        Ok(())
    }

    pub async fn remove_member(&self, host_id: NodeId) -> Result<(), TrackerError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        if voters.contains(&host_id) {
            if voters.len() == 1 {
                return Err(TrackerError::Membership(
                    "cannot remove the last voter".into(),
                ));
            }
            self.raft
                .change_membership(
                    ChangeMembers::RemoveVoters(BTreeSet::from([host_id])),
                    false,
                )
                .await
                .map_err(group::write_error)?;
        } else if m.membership().get_node(&host_id).is_some() {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([host_id])), false)
                .await
                .map_err(group::write_error)?;
        }
        Ok(())
    }

    /// Records a member's new address in the membership, so replication and
    /// clients reach it there.
    pub async fn set_address(&self, host_id: NodeId, addr: &str) -> Result<(), TrackerError> {
        let current = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&host_id)
            .cloned();
        if current.as_ref().map(|n| n.addr.as_str()) == Some(addr) {
            return Ok(());
        }
        self.raft
            .change_membership(
                ChangeMembers::SetNodes(BTreeMap::from([(host_id, BasicNode::new(addr))])),
                true,
            )
            .await
            .map_err(group::write_error)?;
        Ok(())
    }

    /// Waits until this member has applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied")
            .await
            .is_ok()
    }

    /// The leader expires lapsed client sessions (releasing their locks) and
    /// forgets old operation results, proposing only when there is work.
    /// Watches for this process having been suspended (SIGSTOP, a paused
    /// VM): on waking, its election timer has long expired and it would call
    /// an election with a stale log, whose higher term makes the healthy
    /// leader step down. So after a suspension it holds off its own
    /// elections until it has had time to hear from the current leader.
    /// A plain thread, so it runs as soon as the process does.
    pub fn guard_against_suspension(&self, election_max: Duration) {
        let raft = self.raft.clone();
        let spawned = std::thread::Builder::new().name("suspend-guard".into()).spawn(move || {
            let step = Duration::from_millis(10);
            let mut last = std::time::Instant::now();
            let mut hold_until: Option<std::time::Instant> = None;
            loop {
                std::thread::sleep(step);
                if raft.metrics().borrow().running_state.is_err() {
                    return;
                }
                let now = std::time::Instant::now();
                let gap = now.duration_since(last);
                last = now;
                if gap > election_max / 2 {
                    raft.runtime_config().elect(false);
                    hold_until = Some(now + election_max * 3);
                    tracing::warn!(?gap, "this host was suspended; holding off elections until it hears from the leader");
                }
                if hold_until.is_some_and(|t| now >= t) {
                    raft.runtime_config().elect(true);
                    hold_until = None;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the suspension guard");
        }
    }

    /// Waits until this member leads; false on timeout.
    pub async fn wait_leader(&self, timeout: Duration) -> bool {
        self.raft
            .wait(Some(timeout))
            .state(ServerState::Leader, "leader")
            .await
            .is_ok()
    }

    /// Whether openraft still runs here; why not, once it stopped for good.
    pub fn running(&self) -> Result<(), String> {
        match &self.raft.metrics().borrow().running_state {
            Ok(()) => Ok(()),
            Err(f) => Err(f.to_string()),
        }
    }

    /// Whether this member is part of a working quorum and caught up, as
    /// a readiness probe asks, within `within`: the leader confirms its
    /// leadership (its lease, or a round of heartbeats a quorum answers)
    /// and has applied what it confirmed; any other member gets the
    /// leader's read index and has applied up to it.
    pub async fn ready(&self, within: Duration) -> Result<(), TrackerError> {
        if !self.is_initialized() {
            return Err(TrackerError::NotInitialized);
        }
        if !self.is_leader() {
            return self.follower_index(within, true).await;
        }
        let index = tokio::time::timeout(within, self.read_index())
            .await
            .map_err(|_| {
                TrackerError::NoQuorum(format!("no quorum confirmed this leader within {within:?}"))
            })??;
        if self.wait_applied(index, within).await {
            Ok(())
        } else {
            Err(TrackerError::NoQuorum(format!(
                "did not apply up to {index} in time"
            )))
        }
    }

    /// Resolves when openraft has stopped for good (a storage error, such
    /// as a full disk under raft.db or meta.db, is fatal to it), with the
    /// reason. The process must then exit, so its supervisor restarts it:
    /// a member that only looks alive would stay down for good.
    pub async fn stopped(&self) -> String {
        let mut rx = self.raft.metrics();
        loop {
            if let Err(f) = &rx.borrow_and_update().running_state {
                return f.to_string();
            }
            if rx.changed().await.is_err() {
                return "openraft's metrics ended".into();
            }
        }
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

pub fn wall_clock_ns() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
