//! Raft messages between tracker members over gRPC (`RaftTransport`):
//! entries and snapshot data as protobuf, openraft's bookkeeping as JSON
//! (see `codec`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_proto::pb::{raft_transport_client::RaftTransportClient, RaftMessage};
use failsafe_proto::{header, MAX_MESSAGE_BYTES};
use failsafe_tls::Expect;
use futures::channel::mpsc;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tonic::transport::Channel;

use crate::codec::{self, CodecError};
use crate::raft::{NodeId, TypeConfig};
use crate::ClusterId;

/// Creates connections to peers; channels are pooled by address, so a peer
/// that moved is reached at its new address as soon as membership says so.
#[derive(Clone)]
pub(crate) struct Network {
    cluster: ClusterId,
    tls: failsafe_tls::Tls,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    heard: Heard,
    acked: Acked,
}

/// When each peer last accepted an AppendEntries of this member's, by the
/// time it was *sent* and the term it was sent in: what the leader's read
/// lease is measured from (`Tracker::read_index`). A follower that accepts
/// an AppendEntries votes for no other candidate for `election_max` after
/// it arrived, so a quorum of such sends younger than the lease means no
/// other leader can exist. Read against the clock when the lease is used,
/// so a leader paused (SIGSTOP, a stalled VM) and deposed meanwhile finds
/// its lease long gone, whatever its metrics still say.
#[derive(Clone, Default)]
pub(crate) struct Acked(Arc<Mutex<HashMap<NodeId, (u64, Instant)>>>);

impl Acked {
    fn record(&self, peer: NodeId, term: u64, sent: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(peer).or_insert((term, sent));
        if (term, sent) > *e {
            *e = (term, sent);
        }
    }

    /// Since when a majority of every voter set in `configs` (this member,
    /// `me`, counting as now) has accepted AppendEntries sent in `term`.
    pub(crate) fn quorum_since(
        &self,
        term: u64,
        configs: &[std::collections::BTreeSet<NodeId>],
        me: NodeId,
    ) -> Option<Instant> {
        let now = Instant::now();
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut oldest: Option<Instant> = None;
        for voters in configs {
            let mut times: Vec<Instant> = voters
                .iter()
                .filter_map(|v| match (*v == me, map.get(v)) {
                    (true, _) => Some(now),
                    (false, Some((t, at))) if *t == term => Some(*at),
                    _ => None,
                })
                .collect();
            let need = voters.len() / 2 + 1;
            if times.len() < need {
                return None;
            }
            times.sort_unstable_by(|a, b| b.cmp(a));
            let t = times[need - 1];
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
        oldest
    }
}

/// When each peer last answered a Raft RPC from this member. The leader
/// sends every peer a heartbeat each `heartbeat_ms` (and retries an
/// unreachable one every half second), so on the leader this is a liveness
/// signal at no extra cost; openraft 0.9's metrics carry no such map.
#[derive(Clone, Default)]
pub(crate) struct Heard(Arc<Mutex<HashMap<NodeId, Watch>>>);

#[derive(Debug, Clone, Copy)]
struct Watch {
    /// Since when this member has been calling the peer without a gap.
    since: Instant,
    last_call: Instant,
    last_answer: Option<Instant>,
}

/// A gap in calls this long means this member stopped watching the peer (it
/// was a follower meanwhile): what it saw before says nothing about now.
const WATCH_GAP: Duration = Duration::from_secs(5);

/// What this member has seen of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not called recently: no opinion.
    Unwatched,
    /// Silent for this long: since its last answer, or since watching began
    /// if it has not `answered` since.
    Silent { silent: Duration, answered: bool },
}

impl Heard {
    fn calling(&self, peer: NodeId) {
        let now = Instant::now();
        // Held for a map update; never across an await.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let w = map.entry(peer).or_insert(Watch {
            since: now,
            last_call: now,
            last_answer: None,
        });
        if now.duration_since(w.last_call) > WATCH_GAP {
            *w = Watch {
                since: now,
                last_call: now,
                last_answer: None,
            };
        }
        w.last_call = now;
    }

    fn answered(&self, peer: NodeId) {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.get_mut(&peer) {
            w.last_answer = Some(now);
        }
    }

    pub(crate) fn seen(&self, peer: NodeId) -> Seen {
        let now = Instant::now();
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&peer) {
            Some(w) if now.duration_since(w.last_call) <= WATCH_GAP => Seen::Silent {
                silent: now.duration_since(w.last_answer.unwrap_or(w.since)),
                answered: w.last_answer.is_some(),
            },
            _ => Seen::Unwatched,
        }
    }
}

impl Network {
    pub(crate) fn new(cluster: ClusterId, tls: failsafe_tls::Tls) -> Network {
        Network {
            cluster,
            tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
            heard: Heard::default(),
            acked: Acked::default(),
        }
    }

    pub(crate) fn acked(&self) -> &Acked {
        &self.acked
    }

    pub(crate) fn heard(&self) -> &Heard {
        &self.heard
    }

    /// A channel to the member at `addr`; with `host`, one whose
    /// certificate must name that host (a Raft peer), else any member's.
    fn channel(&self, addr: &str, host: Option<NodeId>) -> Option<Channel> {
        let key = format!("{addr}#{}", host.unwrap_or(0));
        // Held only to look up or insert; never across an await.
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Some(c.clone());
        }
        let expect = host.map_or(Expect::AnyMember, Expect::Host);
        let ch = self
            .tls
            .channel_to(addr, expect, |e| {
                e.connect_timeout(Duration::from_millis(500))
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
            })
            .ok()?;
        map.insert(key, ch.clone());
        Some(ch)
    }
}

impl Network {
    /// Asks the leader at `addr` for its read index.
    pub(crate) async fn read_index(
        &self,
        addr: &str,
        timeout: Duration,
        probe: bool,
    ) -> Result<u64, crate::TrackerError> {
        use failsafe_proto::pb::metadata_client::MetadataClient;
        let unreachable =
            |why: String| crate::TrackerError::NoQuorum(format!("leader {addr}: {why}"));
        let channel = self
            .channel(addr, None)
            .ok_or_else(|| unreachable("bad address".into()))?;
        let mut req = tonic::Request::new(failsafe_proto::pb::ReadIndexRequest {
            header: Some(header(&self.cluster.get())),
            probe,
        });
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, MetadataClient::new(channel).read_index(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().index),
            Ok(Err(s)) => Err(unreachable(s.message().to_string())),
            Err(_) => Err(unreachable("no answer in time".into())),
        }
    }

    /// Asks the voter at `addr` to stand for election (a hand-over).
    pub(crate) async fn take_leadership(
        &self,
        addr: &str,
        mut req: failsafe_proto::pb::TakeLeadershipRequest,
        timeout: Duration,
    ) -> Result<(), crate::TrackerError> {
        let failed = |why: String| crate::TrackerError::Handover(format!("{addr}: {why}"));
        let channel = self
            .channel(addr, None)
            .ok_or_else(|| failed("bad address".into()))?;
        req.header = Some(header(&self.cluster.get()));
        let mut req = tonic::Request::new(req);
        req.set_timeout(timeout);
        let mut client = RaftTransportClient::new(channel);
        match tokio::time::timeout(timeout, client.take_leadership(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(failed(s.message().to_string())),
            Err(_) => Err(failed("no answer in time".into())),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            conn: Conn {
                target,
                addr: node.addr.clone(),
                channel: self.channel(&node.addr, Some(target)),
                cluster: self.cluster.clone(),
                heard: self.heard.clone(),
            },
            last_ok_sent: None,
            told_commit: None,
            behind: Arc::default(),
            sent: Arc::default(),
            acked: self.acked.clone(),
            pipe: if streams_on() {
                Pipe::Closed
            } else {
                Pipe::Unary
            },
        }
    }
}

/// How recently a peer must have acknowledged an AppendEntries this stream
/// sent for the next commit-only heartbeat to it to be answered at once (see
/// `Peer::append_entries`); the leader's idea of when a quorum last heard
/// from it may be this much too recent, which the leases allow for
/// (`node::leases::lease_config`, `Tracker::read_index`).
pub(crate) const QUICK_COMMIT_WITHIN: Duration = Duration::from_millis(50);

/// The first pause before sending again to a peer found unreachable, and
/// the longest (see `Peer::backoff`).
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// How long a commit-only heartbeat answered at once waits before it is
/// sent: under a steady load the next change's entries go to the peer
/// sooner and carry the new commit index themselves, so it is not sent at
/// all (half the leader's messages per commit). A follower learns of a
/// commit at most this much later when no change follows it.
const COMMIT_NOTICE_AFTER: Duration = Duration::from_millis(5);

/// One replication stream's (or one call's) way to a peer.
pub(crate) struct Peer {
    conn: Conn,
    /// When the last AppendEntries the peer accepted was sent.
    last_ok_sent: Option<Instant>,
    /// The highest commit index sent to the peer.
    told_commit: Option<u64>,
    /// The commit-only heartbeat sent in the background, if any.
    behind: Arc<Mutex<Behind>>,
    /// Requests sent to the peer (not counting background heartbeats): a
    /// heartbeat waiting to be sent is dropped once one went after it.
    sent: Arc<AtomicU64>,
    /// The leader's read lease (shared by every stream).
    acked: Acked,
    /// Where this stream's AppendEntries go.
    pipe: Pipe,
}

/// A commit-only heartbeat answered at once and sent in the background.
#[derive(Debug, Default)]
enum Behind {
    /// None on its way (the last one, if any, was accepted).
    #[default]
    Idle,
    /// The latest one, to send after `COMMIT_NOTICE_AFTER` unless another
    /// request went to the peer after it (`Peer::sent` moved past `after`).
    Waiting {
        payload: Result<Vec<u8>, CodecError>,
        ttl: Duration,
        after: u64,
    },
    Sending,
    /// The last one was refused or failed: the next one is awaited.
    Failed,
}

#[derive(Clone)]
struct Conn {
    target: NodeId,
    addr: String,
    channel: Option<Channel>,
    cluster: ClusterId,
    heard: Heard,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

/// The leader's AppendEntries stream to one peer
/// (`RaftTransport.AppendEntriesStream`): one long-lived HTTP/2 stream
/// instead of a stream (headers, trailers, a task on each side) per
/// request. openraft keeps one request in flight per peer, so each reply
/// answers the request before it.
#[derive(Default)]
enum Pipe {
    /// None open: the next request opens one.
    #[default]
    Closed,
    Open {
        requests: mpsc::Sender<RaftMessage>,
        replies: Box<tonic::Streaming<RaftMessage>>,
    },
    /// Unary calls: the peer answered UNIMPLEMENTED (a member of an older
    /// version), or streams are off (see [`streams_on`]).
    Unary,
}

/// Whether AppendEntries go on streams: off unless `FAILSAFE_RAFT_STREAM=1`
/// is in fsd's environment. With them on, a member restarted after the
/// leader compacted its log sometimes never catches up (fsd failover t41
/// under CPU load: 1 of 4 runs stuck for 90 s; 0 of 6 with them off), and
/// the chaos CI set's leader-kills failed once; not understood yet.
fn streams_on() -> bool {
    std::env::var_os("FAILSAFE_RAFT_STREAM").is_some_and(|v| v == "1")
}

/// Why an exchange with a peer brought no answer.
enum Failed {
    TimedOut,
    Status(tonic::Status),
    /// The stream ended between requests (the peer restarted).
    Ended,
}

impl Failed {
    fn into_rpc<E: std::error::Error>(self, addr: &str) -> RpcErr<E> {
        let unreachable = |e: std::io::Error| RPCError::Unreachable(Unreachable::new(&e));
        match self {
            Failed::TimedOut => unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{addr} timed out"),
            )),
            Failed::Ended => unreachable(std::io::Error::other(format!(
                "{addr}: the AppendEntries stream ended"
            ))),
            Failed::Status(status) => {
                let e = std::io::Error::other(format!("{addr}: {}", status.message()));
                match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Cancelled => unreachable(e),
                    _ => RPCError::Network(NetworkError::new(&e)),
                }
            }
        }
    }
}

impl Conn {
    /// Sends `payload` (encoded by `codec`) and decodes the answer: on
    /// `pipe`, the peer's AppendEntries stream, if given, else unary.
    async fn call<Resp, E>(
        &self,
        method: Method,
        payload: Result<Vec<u8>, CodecError>,
        ttl: Duration,
        pipe: Option<&mut Pipe>,
    ) -> Result<Resp, RpcErr<E>>
    where
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let Some(channel) = self.channel.clone() else {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(format!("bad peer address {:?}", self.addr)),
            )));
        };
        let payload = payload.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = RaftMessage {
            header: Some(header(&self.cluster.get())),
            payload,
        };
        self.heard.calling(self.target);
        let deadline = tokio::time::Instant::now() + ttl;
        let reply = match pipe {
            Some(pipe) if !matches!(pipe, Pipe::Unary) => {
                Self::streamed(pipe, channel, msg, deadline).await
            }
            _ => Self::unary(channel, method, msg, deadline).await,
        }
        .map_err(|f| f.into_rpc(&self.addr))?;
        // Any answer, even a refusal, means the peer is there.
        self.heard.answered(self.target);
        let result: Result<Resp, RaftError<NodeId, E>> = codec::decode_control(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn client(channel: Channel) -> RaftTransportClient<Channel> {
        RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn unary(
        channel: Channel,
        method: Method,
        msg: RaftMessage,
        deadline: tokio::time::Instant,
    ) -> Result<RaftMessage, Failed> {
        let mut client = Self::client(channel);
        let mut request = tonic::Request::new(msg);
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let fut = async {
            match method {
                Method::Append => client.append_entries(request).await,
                Method::Vote => client.vote(request).await,
                Method::Snapshot => client.install_snapshot(request).await,
            }
        };
        match tokio::time::timeout_at(deadline, fut).await {
            Err(_) => Err(Failed::TimedOut),
            Ok(Err(status)) => Err(Failed::Status(status)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// Sends an AppendEntries on `pipe` (opening it if need be) and waits
    /// for its answer. Anything but an answer leaves the pipe closed: a
    /// late answer must never be taken for the next request's.
    async fn streamed(
        pipe: &mut Pipe,
        channel: Channel,
        msg: RaftMessage,
        deadline: tokio::time::Instant,
    ) -> Result<RaftMessage, Failed> {
        use futures::SinkExt;
        let (requests, mut replies) = match std::mem::take(pipe) {
            Pipe::Open {
                mut requests,
                replies,
            } => match tokio::time::timeout_at(deadline, requests.send(msg)).await {
                Err(_) => return Err(Failed::TimedOut),
                Ok(Err(_)) => return Err(Failed::Ended),
                Ok(Ok(())) => (requests, replies),
            },
            Pipe::Closed | Pipe::Unary => {
                let (mut requests, outbound) = mpsc::channel(1);
                // Kept for a peer that turns out not to know streams.
                let first = msg.clone();
                // The first request goes out with the stream's opening (a
                // new channel has room for it).
                if requests.try_send(msg).is_err() {
                    return Err(Failed::Ended);
                }
                let opened = tokio::time::timeout_at(
                    deadline,
                    Self::client(channel.clone()).append_entries_stream(outbound),
                )
                .await;
                match opened {
                    Err(_) => return Err(Failed::TimedOut),
                    Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                        *pipe = Pipe::Unary;
                        return Self::unary(channel, Method::Append, first, deadline).await;
                    }
                    Ok(Err(status)) => return Err(Failed::Status(status)),
                    Ok(Ok(r)) => (requests, Box::new(r.into_inner())),
                }
            }
        };
        match tokio::time::timeout_at(deadline, replies.message()).await {
            Err(_) => Err(Failed::TimedOut),
            Ok(Err(status)) => Err(Failed::Status(status)),
            Ok(Ok(None)) => Err(Failed::Ended),
            Ok(Ok(Some(reply))) => {
                *pipe = Pipe::Open { requests, replies };
                Ok(reply)
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    /// Sends the waiting commit-only heartbeat after `COMMIT_NOTICE_AFTER`,
    /// unless a request that went to the peer meanwhile carried the commit.
    fn notice_later(&self) {
        let (conn, behind, sent) = (self.conn.clone(), self.behind.clone(), self.sent.clone());
        tokio::spawn(async move {
            tokio::time::sleep(COMMIT_NOTICE_AFTER).await;
            let (payload, ttl) = {
                let mut b = behind.lock().unwrap_or_else(|e| e.into_inner());
                match std::mem::take(&mut *b) {
                    Behind::Waiting {
                        payload,
                        ttl,
                        after,
                    } => {
                        if sent.load(Ordering::Relaxed) != after {
                            return;
                        }
                        *b = Behind::Sending;
                        (payload, ttl)
                    }
                    other => {
                        *b = other;
                        return;
                    }
                }
            };
            let r: Result<AppendEntriesResponse<NodeId>, RpcErr> =
                conn.call(Method::Append, payload, ttl, None).await;
            let ok = matches!(r, Ok(AppendEntriesResponse::Success));
            let mut b = behind.lock().unwrap_or_else(|e| e.into_inner());
            *b = if ok { Behind::Idle } else { Behind::Failed };
        });
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    /// Sends entries (or a heartbeat) and waits for the answer; except a
    /// heartbeat that only carries a new commit index to a peer that
    /// accepted this stream's AppendEntries within `QUICK_COMMIT_WITHIN`:
    /// that one goes in the background and is answered "accepted" at once.
    ///
    /// openraft 0.9 keeps one request in flight per follower, and sends
    /// such a heartbeat after every commit: the next change's entries
    /// waited for its round trip, so a commit between cities took two
    /// round trips instead of one. Answering it early is safe: it names the
    /// entries the peer already accepted, so it changes no one's idea of
    /// what is replicated, and a refusal (a newer term) reaches the leader
    /// with the next request. It only makes the leader's clock say the peer
    /// heard from it up to `QUICK_COMMIT_WITHIN` later than it did, which
    /// the leader's read lease and the mounts' leases leave room for.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let commit = rpc.leader_commit.map(|c| c.index);
        let new_commit = commit > self.told_commit;
        self.told_commit = self.told_commit.max(commit);
        let ttl = option.hard_ttl();
        let heartbeat = rpc.entries.is_empty();
        let term = rpc.vote.leader_id().term;
        let payload = codec::encode_append(rpc);
        let now = Instant::now();
        let quick = heartbeat
            && new_commit
            && self
                .last_ok_sent
                .is_some_and(|t| now.duration_since(t) <= QUICK_COMMIT_WITHIN);
        let payload = if quick {
            let mut behind = self.behind.lock().unwrap_or_else(|e| e.into_inner());
            let after = self.sent.load(Ordering::Relaxed);
            match &mut *behind {
                Behind::Idle | Behind::Waiting { .. } => {
                    // A newer commit index replaces one waiting, whose
                    // timer is already running.
                    let start = matches!(*behind, Behind::Idle);
                    *behind = Behind::Waiting {
                        payload,
                        ttl,
                        after,
                    };
                    drop(behind);
                    if start {
                        self.notice_later();
                    }
                    return Ok(AppendEntriesResponse::Success);
                }
                Behind::Sending => payload,
                Behind::Failed => {
                    *behind = Behind::Idle;
                    self.last_ok_sent = None;
                    payload
                }
            }
        } else {
            payload
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        let r = self
            .conn
            .call(Method::Append, payload, ttl, Some(&mut self.pipe))
            .await;
        self.last_ok_sent = match &r {
            Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)) => {
                self.acked.record(self.conn.target, term, now);
                Some(now)
            }
            _ => None,
        };
        r
    }

    /// After an unreachable peer (a refused connection, or no answer within
    /// the heartbeat's deadline): try again after 20 ms, doubling up to
    /// openraft's 500 ms. A follower that took a moment too long (an fsync,
    /// a snapshot being built) is sent to again almost at once: a flat
    /// 500 ms pause left the leader without a quorum heard from within its
    /// read lease, and every mount's lease stream without renewals, when
    /// both followers were slow together.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::successors(Some(BACKOFF_FIRST), |d| {
            Some((*d * 2).min(BACKOFF_MAX))
        }))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.conn
            .call(
                Method::Snapshot,
                codec::encode_snapshot(rpc),
                option.hard_ttl(),
                None,
            )
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.conn
            .call(
                Method::Vote,
                codec::encode_control(&rpc),
                option.hard_ttl(),
                None,
            )
            .await
    }
}
