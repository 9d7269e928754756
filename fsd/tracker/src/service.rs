//! The tracker's gRPC services: `Metadata` for clients, `RaftTransport` for
//! the other members. Every request's header is checked first.

use std::sync::Arc;

use failsafe_proto::pb::{
    self, command::Op, metadata_server::Metadata, raft_transport_server::RaftTransport,
};
use failsafe_proto::{check_header, not_leader};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{self, CodecError};
use crate::node::{wall_clock_ns, Tracker, TrackerError};

impl From<TrackerError> for Status {
    fn from(e: TrackerError) -> Status {
        match e {
            TrackerError::NotLeader { leader_addr } => not_leader(leader_addr.as_deref()),
            TrackerError::NoQuorum(_) | TrackerError::Stopped(_) | TrackerError::NotInitialized => {
                Status::unavailable(e.to_string())
            }
            TrackerError::Invalid(_) => Status::invalid_argument(e.to_string()),
            TrackerError::Membership(_) | TrackerError::Handover(_) => {
                Status::failed_precondition(e.to_string())
            }
            TrackerError::Storage(_) | TrackerError::LogFormat(_) => {
                Status::internal(e.to_string())
            }
        }
    }
}

/// Refuses a command its proposer's credential does not allow: a client
/// (or an admin) proposes file operations and its own session's upkeep (a
/// read-only one no changes), the cluster's bookkeeping is for members, and
/// a member reports only its own devices.
fn may_propose(g: &failsafe_tls::Grant, cmd: &pb::Command) -> Result<(), Status> {
    use failsafe_tls::Role;
    let refuse = |what: &str| {
        Err(Status::permission_denied(format!(
            "{what} is not for {} ({} credential)",
            g.who(),
            g.role.a()
        )))
    };
    let Some(op) = &cmd.op else { return Ok(()) };
    if let Op::Batch(b) = op {
        return b.commands.iter().try_for_each(|c| may_propose(g, c));
    }
    if let Op::Revoke(_) = op {
        return match g.role {
            Role::Admin => Ok(()),
            _ => refuse("revoking a credential"),
        };
    }
    if is_admin_op(op) {
        return match g.role {
            Role::Admin | Role::Member => Ok(()),
            Role::Client => refuse("the trash and snapshots"),
        };
    }
    match g.role {
        Role::Member => match op {
            Op::ReportDevices(r) if r.host_id != g.host_id => {
                refuse(&format!("reporting the devices of host {:016x}", r.host_id))
            }
            _ => Ok(()),
        },
        Role::Client | Role::Admin => match op {
            Op::OpenSession(_) | Op::Heartbeat(_) | Op::CloseSession(_) | Op::Lock(_) => Ok(()),
            op if changes_files(op) && g.read_only => Err(Status::permission_denied(format!(
                "{} may only read",
                g.who()
            ))),
            op if changes_files(op) => Ok(()),
            _ => refuse("the cluster's own bookkeeping"),
        },
    }
}

/// An operator's change of the trash or the snapshots: for admins (fsctl)
/// and members, not for a mount's client credential.
fn is_admin_op(op: &Op) -> bool {
    matches!(
        op,
        Op::SetTrashPolicy(_)
            | Op::RestoreTrash(_)
            | Op::PurgeTrash(_)
            | Op::CreateSnapshot(_)
            | Op::DeleteSnapshot(_)
    )
}

/// What a query may ask with credential `g`: the trash's list is for
/// admins and members (it names deleted files), and a client confined to a
/// subtree reads no snapshot (a snapshot is not confined to it).
fn may_ask(g: &failsafe_tls::Grant, q: &pb::query_request::Query) -> Result<(), Status> {
    use failsafe_tls::Role;
    use pb::query_request::Query;
    match q {
        Query::ListTrash(_) if g.role == Role::Client => Err(Status::permission_denied(format!(
            "the trash is not for {} (a client credential)",
            g.who()
        ))),
        Query::ListSnapshots(_) | Query::InSnapshot(_) if g.subdir != "/" => {
            Err(Status::permission_denied(format!(
                "{} is confined to {}; snapshots are not",
                g.who(),
                g.subdir
            )))
        }
        _ => Ok(()),
    }
}

/// The inodes a command names: what a client confined to a subtree must
/// find inside it.
fn command_inodes(op: &Op, out: &mut Vec<u64>) {
    match op {
        Op::Create(c) => out.push(c.parent),
        Op::Mkdir(c) => out.push(c.parent),
        Op::Symlink(c) => out.push(c.parent),
        Op::Link(c) => out.extend([c.ino, c.new_parent]),
        Op::Unlink(c) => out.push(c.parent),
        Op::Rmdir(c) => out.push(c.parent),
        Op::Rename(c) => out.extend([c.parent, c.new_parent]),
        Op::SetAttr(c) => out.push(c.ino),
        Op::CommitExtents(c) => out.push(c.ino),
        Op::Lock(c) => out.push(c.ino),
        Op::Batch(b) => {
            for c in b.commands.iter().filter_map(|c| c.op.as_ref()) {
                command_inodes(c, out);
            }
        }
        _ => {}
    }
}

/// The inode a query names (none for placement and file system stats).
fn query_inode(q: &pb::query_request::Query) -> Option<u64> {
    match q {
        pb::query_request::Query::ListLocks(l) => Some(l.ino),
        pb::query_request::Query::ListXattrs(l) => Some(l.ino),
        q => crate::node::query_object(q),
    }
}

/// The operations that change files (what a client writing does; a
/// client's late block copies count, as part of its writes).
fn changes_files(op: &Op) -> bool {
    matches!(
        op,
        Op::Create(_)
            | Op::Mkdir(_)
            | Op::Symlink(_)
            | Op::Link(_)
            | Op::Unlink(_)
            | Op::Rmdir(_)
            | Op::Rename(_)
            | Op::SetAttr(_)
            | Op::CommitExtents(_)
            | Op::RecordCopies(_)
    )
}

/// How long a new lease stream may take to say who it is.
const WATCH_HELLO_WITHIN: Duration = Duration::from_secs(10);

pub struct MetadataService {
    tracker: Arc<Tracker>,
}

impl MetadataService {
    pub fn new(tracker: Arc<Tracker>) -> Self {
        MetadataService { tracker }
    }
}

impl MetadataService {
    /// Refuses a client confined to a subtree a request naming an inode
    /// outside it (judged on state as fresh as `consistency`).
    async fn confine(
        &self,
        g: &failsafe_tls::Grant,
        inos: Vec<u64>,
        lookup: Option<(u64, Vec<u8>)>,
        consistency: pb::Consistency,
    ) -> Result<(), Status> {
        if inos.is_empty() {
            return Ok(());
        }
        if self
            .tracker
            .inside(&g.subdir, inos, lookup, consistency)
            .await?
        {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{} sees only {}",
                g.who(),
                g.subdir
            )))
        }
    }
}

#[tonic::async_trait]
impl Metadata for MetadataService {
    async fn mutate(
        &self,
        req: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateReply>, Status> {
        let grant = failsafe_tls::grant_of(&req)?;
        let req = req.into_inner();
        check_header(req.header.as_ref(), &self.tracker.cluster.get())?;
        if let (Some(g), Some(cmd)) = (&grant, &req.command) {
            may_propose(g, cmd)?;
            // A follower forwards nothing: the leader, whose state has
            // every change this client saw answered, judges the subtree.
            if g.subdir != "/" && self.tracker.is_leader() {
                let mut inos = Vec::new();
                if let Some(op) = &cmd.op {
                    command_inodes(op, &mut inos);
                }
                self.confine(g, inos, None, pb::Consistency::Local).await?;
            }
        }
        if !req.writer_zone.is_empty() {
            failsafe_core::validate_zone(&req.writer_zone)
                .map_err(|e| Status::invalid_argument(format!("writer_zone: {e}")))?;
        }
        let mut cmd = req
            .command
            .ok_or_else(|| Status::invalid_argument("mutate without a command"))?;
        match &cmd.op {
            None => return Err(Status::invalid_argument("command without an operation")),
            Some(Op::RegisterHost(_) | Op::RemoveHost(_)) => {
                return Err(Status::permission_denied(
                    "host membership changes go through the Admin service",
                ))
            }
            // Leases are judged by the leader's clocks alone: its wall
            // clock in the log, its monotonic one for expiry (see
            // `node::sessions`). The client's own clock is only compared.
            Some(Op::OpenSession(pb::OpenSession { session_id, .. }))
            | Some(Op::Heartbeat(pb::Heartbeat { session_id })) => {
                let now = wall_clock_ns();
                if self.tracker.is_leader() {
                    self.tracker.heard_session(*session_id, cmd.now_ns, now);
                }
                cmd.now_ns = now
            }
            Some(Op::ExpireSessions(_)) => cmd.now_ns = wall_clock_ns(),
            Some(_) => {}
        }
        if self.tracker.space_low() && self.tracker.is_leader() && adds_metadata(&cmd) {
            return Ok(Response::new(pb::MutateReply {
                result: Some(no_space(&cmd)),
                ..Default::default()
            }));
        }
        // A session's lease renewal is upkeep, not writing.
        let writing = !matches!(cmd.op, Some(Op::Heartbeat(_) | Op::ExpireSessions(_)));
        let by = (req.lease_holder != 0).then_some(req.lease_holder);
        let behind = crate::node::Behind {
            delegate: req.delegate,
            flush_of: req.flush_of,
        };
        let (result, back) = self.tracker.propose_as(cmd, by, behind).await?;
        if writing {
            self.tracker.note_write(&req.writer_zone);
        }
        let (lease, attrs, names, extents, delegated) = match back {
            Some(b) => (Some(b.lease), b.attrs, b.names, b.extents, b.delegated),
            None => (None, Vec::new(), Vec::new(), Vec::new(), false),
        };
        Ok(Response::new(pb::MutateReply {
            result: Some(result),
            lease,
            attrs,
            names,
            extents,
            delegated,
        }))
    }

    async fn query(
        &self,
        req: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryReply>, Status> {
        let grant = failsafe_tls::grant_of(&req)?;
        let req = req.into_inner();
        check_header(req.header.as_ref(), &self.tracker.cluster.get())?;
        let q = req
            .query
            .ok_or_else(|| Status::invalid_argument("query without a question"))?;
        let consistency = pb::Consistency::try_from(req.consistency)
            .map_err(|_| Status::invalid_argument("unknown consistency level"))?;
        if let Some(g) = &grant {
            may_ask(g, &q)?;
        }
        if let pb::query_request::Query::Revalidate(r) = &q {
            // Checked before any lease is recalled or granted for them.
            if r.inos.is_empty() || r.inos.len() > failsafe_proto::MAX_REVALIDATE {
                return Err(Status::invalid_argument(format!(
                    "a revalidation names 1 to {} inodes, not {}",
                    failsafe_proto::MAX_REVALIDATE,
                    r.inos.len()
                )));
            }
        }
        if let Some(g) = grant.filter(|g| g.subdir != "/") {
            let inos = match &q {
                pb::query_request::Query::Revalidate(r) => r.inos.clone(),
                q => query_inode(q).into_iter().collect(),
            };
            let lookup = match &q {
                pb::query_request::Query::Lookup(l) => Some((l.parent, l.name.clone())),
                _ => None,
            };
            self.confine(&g, inos, lookup, consistency).await?;
        }
        if req.lease_holder != 0 && consistency == pb::Consistency::Linearizable {
            let (reply, lease) = self.tracker.query_leased(q, req.lease_holder).await?;
            return Ok(Response::new(pb::QueryReply {
                reply: Some(reply),
                lease: Some(lease),
            }));
        }
        let reply = self.tracker.query(q, consistency).await?;
        Ok(Response::new(pb::QueryReply {
            reply: Some(reply),
            lease: None,
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use pb::watch_request::Msg;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(WATCH_HELLO_WITHIN, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello on the lease stream"))??
            .ok_or_else(|| Status::invalid_argument("a lease stream without a hello"))?;
        check_header(first.header.as_ref(), &self.tracker.cluster.get())?;
        let Some(Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument(
                "a lease stream starts with a hello",
            ));
        };
        if hello.holder == 0 {
            return Err(Status::invalid_argument("lease holder 0"));
        }
        let Some(leases) = self.tracker.leases() else {
            return Err(Status::failed_precondition(
                "leases are off: Raft's election timing leaves no room for them",
            ));
        };
        let Some(term) = self.tracker.lease_term_within(leases.lease_ms()).await else {
            return Err(TrackerError::NotLeader {
                leader_addr: self
                    .tracker
                    .leader()
                    .map(|(_, a)| a)
                    .filter(|a| !a.is_empty()),
            }
            .into());
        };
        let holder = hello.holder;
        let (id, events) = leases.open_stream(holder, term);
        let tracker = self.tracker.clone();
        tokio::spawn(async move {
            let Some(leases) = tracker.leases() else {
                return;
            };
            loop {
                // A holder renews every third of a lease; a silent one is gone.
                let next = tokio::time::timeout(
                    Duration::from_millis(leases.lease_ms() * 3),
                    inbound.message(),
                )
                .await;
                let ok = match next {
                    Ok(Ok(Some(m))) => match m.msg {
                        // While this member still leads in the stream's term
                        // but has not heard from a quorum within its read
                        // lease (a busy moment), a renewal goes unanswered
                        // and the stream stays: the holder's leases run out
                        // by its own clock, and the next renewal may be
                        // answered. Closing it would make the holder drop
                        // everything it caches.
                        Some(Msg::Renew(r)) => match tracker.lease_term() {
                            Some(t) if t == term => leases.renew(holder, id, r.seq),
                            _ => {
                                let leads = tracker.leads_in(term);
                                if leads {
                                    leases.renewal_unanswered();
                                }
                                leads
                            }
                        },
                        Some(Msg::Ack(a)) => {
                            leases.ack(holder, a.change_id);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !ok {
                    break;
                }
            }
            leases.close_stream(holder, id);
        });
        let stream =
            futures::stream::unfold(
                events,
                |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
            );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_index(
        &self,
        req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        let req = req.into_inner();
        check_header(req.header.as_ref(), &self.tracker.cluster.get())?;
        // A follower's read cannot say what it reads: every delegation
        // (write-behind) comes back first. A readiness probe reads nothing.
        if let (false, Some(leases)) = (req.probe, self.tracker.leases()) {
            leases.recall_all().await;
        }
        let index = self.tracker.read_index().await?;
        Ok(Response::new(pb::ReadIndexReply { index }))
    }
}

pub struct RaftService {
    tracker: Arc<Tracker>,
    /// The snapshot being received, checked chunk by chunk before openraft
    /// sees it (openraft 0.9 writes a chunk at whatever offset it names).
    incoming: tokio::sync::Mutex<Option<Incoming>>,
}

/// A snapshot arriving: its id, the bytes so far (also in `path`, where
/// SQLite checks it before the last chunk goes to openraft).
struct Incoming {
    id: String,
    received: u64,
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl RaftService {
    pub fn new(tracker: Arc<Tracker>) -> Self {
        RaftService {
            tracker,
            incoming: tokio::sync::Mutex::new(None),
        }
    }

    /// Refuses a chunk out of order, past the size cap, or (the last one)
    /// completing a database SQLite finds corrupt or foreign; keeps a copy
    /// of the accepted bytes for that check.
    async fn check_chunk(
        &self,
        rpc: &openraft::raft::InstallSnapshotRequest<crate::raft::TypeConfig>,
    ) -> Result<(), Status> {
        use std::io::Write;
        let mut incoming = self.incoming.lock().await;
        let id = &rpc.meta.snapshot_id;
        if rpc.offset == 0 {
            let path = self.tracker.dir().join("snapshot-incoming.db");
            let file = std::fs::File::create(&path)
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            *incoming = Some(Incoming {
                id: id.clone(),
                received: 0,
                path,
                file,
            });
        }
        let Some(inc) = incoming.as_mut().filter(|i| i.id == *id) else {
            return Err(Status::invalid_argument(format!(
                "snapshot {id}: a chunk at offset {} before its first chunk",
                rpc.offset
            )));
        };
        if rpc.offset != inc.received {
            let expected = inc.received;
            *incoming = None;
            return Err(Status::invalid_argument(format!(
                "snapshot {id}: a chunk at offset {}, expected {expected}; start again",
                rpc.offset
            )));
        }
        let received = inc.received.saturating_add(rpc.data.len() as u64);
        let cap = self.tracker.max_snapshot_bytes();
        if received > cap {
            *incoming = None;
            return Err(Status::resource_exhausted(format!(
                "snapshot {id} is larger than {cap} bytes (max_snapshot_mb)"
            )));
        }
        inc.file
            .write_all(&rpc.data)
            .map_err(|e| Status::internal(format!("{}: {e}", inc.path.display())))?;
        inc.received = received;
        if rpc.done {
            let checked = inc
                .file
                .sync_data()
                .map_err(|e| e.to_string())
                .and_then(|()| crate::state::check_snapshot(&inc.path));
            let _ = std::fs::remove_file(&inc.path);
            *incoming = None;
            if let Err(why) = checked {
                tracing::warn!(snapshot = %id, %why, "refused a snapshot");
                return Err(Status::invalid_argument(format!(
                    "snapshot {id} refused: {why}"
                )));
            }
        }
        Ok(())
    }

    /// Checks the header and decodes the payload (see `codec`).
    fn decode<T>(
        &self,
        req: Request<pb::RaftMessage>,
        decode: impl FnOnce(&[u8]) -> Result<T, CodecError>,
    ) -> Result<T, Status> {
        decode_message(&self.tracker, req.into_inner(), decode)
    }
}

/// Checks `msg`'s header and decodes its payload (see `codec`).
fn decode_message<T>(
    tracker: &Tracker,
    msg: pb::RaftMessage,
    decode: impl FnOnce(&[u8]) -> Result<T, CodecError>,
) -> Result<T, Status> {
    check_header(msg.header.as_ref(), &tracker.cluster.get())?;
    decode(&msg.payload).map_err(|e| match e {
        CodecError::Format1 => Status::failed_precondition(e.to_string()),
        _ => Status::invalid_argument(format!("bad raft payload: {e}")),
    })
}

/// openraft's answer to one AppendEntries message, unary or on a stream.
async fn answer_append(tracker: &Tracker, msg: pb::RaftMessage) -> Result<pb::RaftMessage, Status> {
    let rpc = decode_message(tracker, msg, codec::decode_append)?;
    encode(&tracker.raft().append_entries(rpc).await).map(Response::into_inner)
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftMessage>, Status> {
    let payload = codec::encode_control(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftMessage {
        header: None,
        payload,
    }))
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        answer_append(&self.tracker, req.into_inner())
            .await
            .map(Response::new)
    }

    type AppendEntriesStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::RaftMessage, Status>> + Send>>;

    /// Answers each request on the stream in turn, in this stream's own
    /// task (no task per request); a bad message ends the stream with its
    /// error, and the leader opens another.
    async fn append_entries_stream(
        &self,
        req: Request<Streaming<pb::RaftMessage>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        let inbound = req.into_inner();
        let tracker = self.tracker.clone();
        let replies = futures::stream::unfold(Some((inbound, tracker)), |open| async move {
            let (mut inbound, tracker) = open?;
            // The leader closed it or went away: nothing to answer.
            let msg = inbound.message().await.ok()??;
            let reply = answer_append(&tracker, msg).await;
            let next = reply.is_ok().then_some((inbound, tracker));
            Some((reply, next))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = self.decode(req, codec::decode_control)?;
        encode(&self.tracker.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = self.decode(req, codec::decode_snapshot)?;
        // Only a chunk from the leader this member follows is checked and
        // kept: anything else openraft refuses by its vote.
        let current = self.tracker.raft().metrics().borrow().vote;
        if rpc.vote >= current {
            self.check_chunk(&rpc).await?;
        }
        encode(&self.tracker.raft().install_snapshot(rpc).await)
    }

    async fn take_leadership(
        &self,
        req: Request<pb::TakeLeadershipRequest>,
    ) -> Result<Response<pb::TakeLeadershipReply>, Status> {
        let req = req.into_inner();
        check_header(req.header.as_ref(), &self.tracker.cluster.get())?;
        self.tracker.take_leadership(&req).await?;
        Ok(Response::new(pb::TakeLeadershipReply {}))
    }
}

/// Whether `cmd` makes the metadata grow: what a leader whose disk is
/// nearly full refuses. Deletes, sessions and locks go on.
fn adds_metadata(cmd: &pb::Command) -> bool {
    match &cmd.op {
        Some(Op::Batch(b)) => b.commands.iter().any(adds_metadata),
        Some(
            Op::Create(_)
            | Op::Mkdir(_)
            | Op::Symlink(_)
            | Op::Link(_)
            | Op::Rename(_)
            | Op::SetAttr(_)
            | Op::CommitExtents(_),
        ) => true,
        _ => false,
    }
}

/// The answer to `cmd` from a leader whose disk is nearly full: refused
/// (not applied, so not recorded: the same command applies once there is
/// room), each command of a batch alike.
fn no_space(cmd: &pb::Command) -> pb::CommandResult {
    use pb::command_result::Result as R;
    let refused = || pb::CommandResult {
        result: Some(R::Error(pb::CommandError {
            code: pb::ErrorCode::NoSpace as i32,
            message: "the disk under the tracker's databases is nearly full".into(),
        })),
        changed: Vec::new(),
    };
    match &cmd.op {
        Some(Op::Batch(b)) => pb::CommandResult {
            result: Some(R::Batch(pb::BatchResult {
                results: b.commands.iter().map(|_| refused()).collect(),
            })),
            changed: Vec::new(),
        },
        _ => refused(),
    }
}
