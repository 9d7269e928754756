//! Connections to the cluster: one channel per member, reused; leader
//! tracking; and the retry loops that carry every request through a failover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_proto::pb::{
    self, admin_client::AdminClient, blocks_client::BlocksClient, metadata_client::MetadataClient,
};
use failsafe_proto::{header, LEADER_ADDR_KEY, MAX_MESSAGE_BYTES};
use tonic::transport::Channel;
use tonic::Code;

use crate::stats::{RpcCounters, RpcKind, RpcSnapshot};
use crate::ClientError;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Addresses (`host:port`) of some cluster members; the rest are learned.
    pub addrs: Vec<String>,
    /// The cluster to talk to; learned from the first member that answers when
    /// unset.
    pub cluster_id: Option<String>,
    /// Deadline of one RPC. A frozen member costs at most this much.
    pub rpc_timeout: Duration,
    /// Deadline of one block transfer (up to 4 MiB).
    pub block_timeout: Duration,
    /// How long one operation may keep retrying through failovers before it
    /// fails with `Unavailable`.
    pub op_deadline: Duration,
    /// How long a read waits for a linearizable answer before it settles
    /// for the freshest answer a reachable member has (no majority).
    pub read_fallback_after: Duration,
    /// The zone this client is in: block reads prefer copies there, and
    /// its metadata changes count as that zone's writing (the tracker
    /// leader moves to the zone that writes most).
    pub zone: Option<String>,
    /// The cluster's own background work (an fsd's workers): its changes
    /// do not count as its zone's writing.
    pub background: bool,
    /// A name for this client in the tracker's session table.
    pub name: String,
    /// Writes of at most this many bytes per commit travel inline, in the
    /// commit itself (capped at `MAX_INLINE_BYTES`); 0 sends every write as
    /// blocks.
    pub inline_max_bytes: usize,
    /// How to talk to the members: mutual TLS with this client's credential
    /// (every member refuses anything else unless it runs `--insecure`).
    pub tls: failsafe_tls::Tls,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addrs: Vec::new(),
            cluster_id: None,
            rpc_timeout: Duration::from_secs(2),
            block_timeout: Duration::from_secs(10),
            op_deadline: Duration::from_secs(20),
            read_fallback_after: Duration::from_secs(3),
            zone: None,
            background: false,
            name: "client".to_string(),
            inline_max_bytes: failsafe_core::MAX_INLINE_BYTES,
            tls: failsafe_tls::Tls::Insecure,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ClientConfig,
    pub(crate) cluster_id: String,
    pub(crate) client_id: u64,
    next_op: AtomicU64,
    channels: Mutex<HashMap<String, Channel>>,
    /// Where requests go. A std Mutex: held for bookkeeping, never across an
    /// await.
    routing: Mutex<Routing>,
    /// Every RPC this client sent, by kind and outcome.
    pub(crate) rpcs: Arc<RpcCounters>,
    /// Metadata leases, once enabled (`Client::enable_leases`).
    pub(crate) leases: std::sync::OnceLock<Arc<crate::leases::LeaseCache>>,
}

/// Which members exist, which one leads, which are suspected down, and how
/// far away each is.
struct Routing {
    members: Vec<String>,
    leader: Option<String>,
    /// Members that timed out recently, with when to trust them again. A
    /// frozen leader keeps being named by followers until an election ends;
    /// suspecting it avoids paying a full timeout for every such hint.
    suspect: HashMap<String, Instant>,
    next: usize,
    /// Smoothed round-trip time of successful calls per member.
    rtt: HashMap<String, Duration>,
}

impl Routing {
    fn is_suspect(&self, addr: &str) -> bool {
        self.suspect
            .get(addr)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn pick(&mut self) -> String {
        if let Some(l) = self.leader.clone().filter(|l| !self.is_suspect(l)) {
            return l;
        }
        let n = self.members.len().max(1);
        for k in 0..n {
            let candidate = &self.members[(self.next + k) % n];
            if !self.is_suspect(candidate) {
                self.next = (self.next + k) % n;
                return candidate.clone();
            }
        }
        self.next = (self.next + 1) % n;
        self.members[self.next % n].clone()
    }

    fn learn(&mut self, addr: &str) {
        if !addr.is_empty() && !self.members.iter().any(|m| m == addr) {
            self.members.push(addr.to_string());
        }
    }

    /// The members are exactly `addrs` (the leader's host table): a host
    /// that moved is no longer tried at its old address, nor a removed one.
    fn replace(&mut self, addrs: Vec<String>) {
        let addrs: Vec<String> = addrs.into_iter().filter(|a| !a.is_empty()).collect();
        if addrs.is_empty() {
            return;
        }
        self.members = addrs;
        self.next = 0;
        if self
            .leader
            .as_ref()
            .is_some_and(|l| !self.members.contains(l))
        {
            self.leader = None;
        }
        let keep = self.members.clone();
        self.suspect.retain(|a, _| keep.contains(a));
        self.rtt.retain(|a, _| keep.contains(a));
    }
}

/// A handle to a cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// What a failed attempt means for the retry loop.
enum Attempt {
    /// Try again, at this address if one is given.
    Retry(Option<String>),
    Fail(ClientError),
}

impl Client {
    /// Connects to the cluster that the members at `cfg.addrs` belong to.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.addrs.is_empty() {
            return Err(ClientError::Invalid(
                "no cluster member addresses given".into(),
            ));
        }
        let mut inner = Inner {
            cluster_id: cfg.cluster_id.clone().unwrap_or_default(),
            client_id: rand::random::<u64>() | 1,
            next_op: AtomicU64::new(1),
            channels: Mutex::new(HashMap::new()),
            routing: Mutex::new(Routing {
                members: cfg.addrs.clone(),
                leader: None,
                suspect: HashMap::new(),
                next: 0,
                rtt: HashMap::new(),
            }),
            rpcs: Arc::default(),
            leases: std::sync::OnceLock::new(),
            cfg,
        };
        if inner.cluster_id.is_empty() {
            let client = Client {
                inner: Arc::new(inner),
            };
            let hello = client.hello_any().await?;
            if hello.cluster_id.is_empty() {
                return Err(ClientError::Unavailable(
                    "the host answering is not part of a cluster yet".into(),
                ));
            }
            inner = Arc::try_unwrap(client.inner)
                .map_err(|_| ClientError::Invalid("client shared too early".into()))?;
            inner.cluster_id = hello.cluster_id;
        }
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    pub fn cluster_id(&self) -> &str {
        &self.inner.cluster_id
    }

    /// The RPCs this client (and its clones) sent so far.
    pub fn rpc_stats(&self) -> RpcSnapshot {
        self.inner.rpcs.snapshot()
    }

    pub(crate) fn header(&self) -> Option<pb::Header> {
        Some(header(&self.inner.cluster_id))
    }

    pub(crate) fn next_op_id(&self) -> u64 {
        self.inner.next_op.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let timeout = self.inner.cfg.rpc_timeout;
        let ch = self
            .inner
            .cfg
            .tls
            .channel_to(addr, failsafe_tls::Expect::AnyMember, |e| {
                e.connect_timeout(timeout)
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true)
            })
            .map_err(|e| ClientError::Invalid(format!("bad address {addr:?}: {e}")))?;
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub(crate) fn meta(&self, addr: &str) -> Result<MetadataClient<Channel>, ClientError> {
        Ok(MetadataClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    pub(crate) fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, ClientError> {
        Ok(AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    pub(crate) fn blocks(&self, addr: &str) -> Result<BlocksClient<Channel>, ClientError> {
        Ok(BlocksClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn routing(&self) -> std::sync::MutexGuard<'_, Routing> {
        self.inner.routing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Known members, the presumed leader first.
    pub fn members(&self) -> Vec<String> {
        let r = self.routing();
        let mut out: Vec<String> = r.leader.iter().cloned().collect();
        out.extend(
            r.members
                .iter()
                .filter(|m| Some(*m) != r.leader.as_ref())
                .cloned(),
        );
        out
    }

    /// Adds addresses learned from the cluster (leader hints, host table).
    pub fn learn_members(&self, addrs: impl IntoIterator<Item = String>) {
        let mut r = self.routing();
        for a in addrs {
            r.learn(&a);
        }
    }

    /// The leader at `addr` answered `status`: its host table is the
    /// membership as it is.
    pub(crate) fn follow_leader(&self, addr: &str, status: &pb::StatusReply) {
        self.routing()
            .replace(status.hosts.iter().map(|h| h.addr.clone()).collect());
        self.set_leader(addr);
    }

    /// The leader's address: the one last seen, else found by asking for a
    /// read index (which follows leader hints).
    pub(crate) async fn leader_addr(&self) -> Result<String, ClientError> {
        if let Some(l) = self.routing().leader.clone() {
            return Ok(l);
        }
        self.with_leader(RpcKind::MetaQuery, "finding the leader", |addr| {
            // Only to find the leader: nothing is read after it, so no
            // write-behind delegation need come back.
            let req = pb::ReadIndexRequest {
                header: self.header(),
                probe: true,
            };
            let c = self.meta(&addr);
            async move {
                c.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                    .read_index(req)
                    .await
            }
        })
        .await?;
        self.routing()
            .leader
            .clone()
            .ok_or_else(|| ClientError::Unavailable("no leader known".into()))
    }

    pub(crate) fn set_leader(&self, addr: &str) {
        let mut r = self.routing();
        r.learn(addr);
        r.leader = Some(addr.to_string());
    }

    /// Records a successful call: the member is alive, and this far away.
    pub(crate) fn record_ok(&self, addr: &str, elapsed: Duration) {
        let mut r = self.routing();
        r.suspect.remove(addr);
        let smoothed = match r.rtt.get(addr) {
            Some(prev) => (*prev * 7 + elapsed) / 8,
            None => elapsed,
        };
        r.rtt.insert(addr.to_string(), smoothed);
    }

    /// `addr` turned out not to lead (or not to answer as the leader): ask
    /// around again next time.
    pub(crate) fn forget_leader(&self, addr: &str) {
        let mut r = self.routing();
        if r.leader.as_deref() == Some(addr) {
            r.leader = None;
        }
    }

    /// Records a call to `addr`, sent at `started`, that got no answer
    /// within `timeout` (or lost its connection). Not when that was noticed
    /// long after the timeout was due: then this process was not running
    /// (stopped, a paused VM, starved), the member may well have answered
    /// meanwhile, and suspecting it would ignore every hint naming it — the
    /// leader's — for three `rpc_timeout`s after the pause (a mount thawed
    /// after 3 s of SIGSTOP went on waiting 3 s more, asking followers).
    pub(crate) fn record_timeout(&self, addr: &str, started: Instant, timeout: Duration) {
        let took = started.elapsed();
        if took > timeout + timeout / 2 {
            tracing::info!(
                addr,
                ?took,
                ?timeout,
                "a call failed long after its timeout was due: this process stalled, the member is not suspected"
            );
            return;
        }
        let mut r = self.routing();
        let until = Instant::now() + self.inner.cfg.rpc_timeout * 3;
        r.suspect.insert(addr.to_string(), until);
        if r.leader.as_deref() == Some(addr) {
            r.leader = None;
        }
    }

    /// The measured round trip to `addr`, if any call to it succeeded.
    pub fn rtt(&self, addr: &str) -> Option<Duration> {
        self.routing().rtt.get(addr).copied()
    }

    pub(crate) fn is_suspect(&self, addr: &str) -> bool {
        self.routing().is_suspect(addr)
    }

    /// Runs `call` against the leader until it answers, following leader hints
    /// and moving on from members that time out, within the op deadline.
    pub(crate) async fn with_leader<T, F, Fut>(
        &self,
        kind: RpcKind,
        what: &str,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.with_leader_timeout(
            kind,
            what,
            self.inner.cfg.rpc_timeout,
            self.inner.cfg.op_deadline,
            call,
        )
        .await
    }

    /// Each attempt is one RPC of `kind` and one sequential round trip.
    pub(crate) async fn with_leader_timeout<T, F, Fut>(
        &self,
        kind: RpcKind,
        what: &str,
        rpc_timeout: Duration,
        op_deadline: Duration,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + op_deadline;
        let mut backoff = Duration::from_millis(20);
        let mut last;
        let mut hops = 0;
        loop {
            let addr = self.routing().pick();
            let started = Instant::now();
            let rpc = self.inner.rpcs.start(kind, true);
            let answer = tokio::time::timeout(rpc_timeout, call(addr.clone())).await;
            rpc.end_timed(&answer);
            let outcome = match answer {
                Ok(Ok(v)) => {
                    self.record_ok(&addr, started.elapsed());
                    self.set_leader(&addr);
                    return Ok(v);
                }
                Ok(Err(status)) => {
                    tracing::debug!(%addr, what, code = ?status.code(), message = %status.message(), "an attempt failed");
                    if is_transport_failure(&status) {
                        // Nothing listens there (killed, restarting): treat
                        // like a timeout, so hints naming it are not followed.
                        self.record_timeout(&addr, started, rpc_timeout);
                    }
                    self.classify(&addr, status)
                }
                Err(_) => {
                    self.record_timeout(&addr, started, rpc_timeout);
                    Attempt::Retry(None)
                }
            };
            match outcome {
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(Some(hint))
                    if hint != addr
                        && !self.is_suspect(&hint)
                        && hops < 8
                        && Instant::now() < deadline =>
                {
                    // Follow the hint at once, but not for ever: members
                    // with stale views can point at each other.
                    hops += 1;
                    self.set_leader(&hint);
                    continue;
                }
                Attempt::Retry(_) => {
                    last = format!("{addr} could not take {what}");
                    let mut r = self.routing();
                    if r.leader.as_deref() == Some(addr.as_str()) {
                        r.leader = None;
                    }
                    r.next += 1;
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(ClientError::Unavailable(format!(
                    "{what}: gave up after {op_deadline:?}; last: {last}"
                )));
            }
            tokio::time::sleep(backoff).await;
            // Short: an election takes about a second, and every retry after
            // it is over is a user waiting.
            backoff = (backoff * 2).min(Duration::from_millis(150));
        }
    }

    fn classify(&self, addr: &str, status: tonic::Status) -> Attempt {
        if let Some(why) = failsafe_tls::explain_refusal(&status, &self.inner.cfg.tls) {
            return Attempt::Fail(ClientError::Credential(format!("{addr}: {why}")));
        }
        let hint = status
            .metadata()
            .get(LEADER_ADDR_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if is_transient(&status) {
            Attempt::Retry(hint.filter(|h| !h.is_empty()))
        } else {
            Attempt::Fail(ClientError::Rejected {
                addr: addr.to_string(),
                status,
            })
        }
    }
}

/// Whether another attempt (elsewhere, or later) may succeed: the member is
/// down, frozen, electing or not the leader, or the connection broke under
/// the call (tonic reports some HTTP/2 failures as `Internal`, not as a
/// server's answer).
pub(crate) fn is_transient(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Aborted => true,
        Code::Internal => {
            let m = status.message();
            m.contains("h2 protocol error") || m.contains("transport error")
        }
        _ => false,
    }
}

/// Whether a failed call never reached a server (as opposed to a server's
/// refusal, which carries its own message).
fn is_transport_failure(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable && status.metadata().get(LEADER_ADDR_KEY).is_none() && {
        let m = status.message();
        m.contains("tcp connect error") || m.contains("transport error") || m.contains("connection")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_timeout_noticed_long_after_it_was_due_suspects_nobody() {
        let client = Client::connect(ClientConfig {
            addrs: vec!["leader:7000".into(), "follower:7000".into()],
            cluster_id: Some("c".into()),
            ..ClientConfig::default()
        })
        .await
        .expect("no network needed with a cluster id");
        client.set_leader("leader:7000");
        let timeout = Duration::from_secs(1);
        // Sent 5 s ago with a 1 s timeout: this process was stopped.
        let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(5)) else {
            return;
        };
        client.record_timeout("leader:7000", long_ago, timeout);
        assert!(!client.is_suspect("leader:7000"));
        assert_eq!(client.routing().pick(), "leader:7000");
        // A timeout that fired when due (60 s: this test never takes that long).
        client.record_timeout("leader:7000", Instant::now(), Duration::from_secs(60));
        assert!(client.is_suspect("leader:7000"));
        assert_eq!(client.routing().pick(), "follower:7000");
    }
}
