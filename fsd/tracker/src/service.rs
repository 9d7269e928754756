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

#[tonic::async_trait]
impl Metadata for MetadataService {
    async fn mutate(
        &self,
        req: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateReply>, Status> {
        let req = req.into_inner();
        check_header(req.header.as_ref(), &self.tracker.cluster.get())?;
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
            // Leases are judged by the leader's clock alone.
            Some(Op::OpenSession(_) | Op::Heartbeat(_) | Op::ExpireSessions(_)) => {
                cmd.now_ns = wall_clock_ns()
            }
            Some(_) => {}
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
        let req = req.into_inner();
        check_header(req.header.as_ref(), &self.tracker.cluster.get())?;
        let q = req
            .query
            .ok_or_else(|| Status::invalid_argument("query without a question"))?;
        let consistency = pb::Consistency::try_from(req.consistency)
            .map_err(|_| Status::invalid_argument("unknown consistency level"))?;
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
        let Some(term) = self.tracker.lease_term() else {
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
                        Some(Msg::Renew(r)) => {
                            tracker.lease_term() == Some(term) && leases.renew(holder, id, r.seq)
                        }
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
        check_header(
            req.into_inner().header.as_ref(),
            &self.tracker.cluster.get(),
        )?;
        // A follower's read cannot say what it reads: every delegation
        // (write-behind) comes back first.
        if let Some(leases) = self.tracker.leases() {
            leases.recall_all().await;
        }
        let index = self.tracker.read_index().await?;
        Ok(Response::new(pb::ReadIndexReply { index }))
    }
}

pub struct RaftService {
    tracker: Arc<Tracker>,
}

impl RaftService {
    pub fn new(tracker: Arc<Tracker>) -> Self {
        RaftService { tracker }
    }

    /// Checks the header and decodes the payload (see `codec`).
    fn decode<T>(
        &self,
        req: Request<pb::RaftMessage>,
        decode: impl FnOnce(&[u8]) -> Result<T, CodecError>,
    ) -> Result<T, Status> {
        let msg = req.into_inner();
        check_header(msg.header.as_ref(), &self.tracker.cluster.get())?;
        decode(&msg.payload).map_err(|e| match e {
            CodecError::Format1 => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(format!("bad raft payload: {e}")),
        })
    }
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
        let rpc = self.decode(req, codec::decode_append)?;
        encode(&self.tracker.raft().append_entries(rpc).await)
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
