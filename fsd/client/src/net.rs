//! Connections to the cluster: one channel per member, reused; leader
//! tracking; and the retry loops that carry every request through a failover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_proto::pb::{self, admin_client::AdminClient, blocks_client::BlocksClient, metadata_client::MetadataClient};
use failsafe_proto::{header, LEADER_ADDR_KEY, MAX_MESSAGE_BYTES};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

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
    /// The zone this client is in: block reads prefer copies there.
    pub zone: Option<String>,
    /// A name for this client in the tracker's session table.
    pub name: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addrs: Vec::new(),
            cluster_id: None,
            rpc_timeout: Duration::from_secs(2),
            block_timeout: Duration::from_secs(10),
            op_deadline: Duration::from_secs(20),
            zone: None,
            name: "client".to_string(),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ClientConfig,
    pub(crate) cluster_id: String,
    pub(crate) client_id: u64,
    next_op: AtomicU64,
    channels: Mutex<HashMap<String, Channel>>,
    /// Known tracker members; `leader` indexes the one believed to lead.
    members: Mutex<Vec<String>>,
    leader: AtomicUsize,
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
            return Err(ClientError::Invalid("no cluster member addresses given".into()));
        }
        let mut inner = Inner {
            cluster_id: cfg.cluster_id.clone().unwrap_or_default(),
            client_id: rand::random::<u64>() | 1,
            next_op: AtomicU64::new(1),
            channels: Mutex::new(HashMap::new()),
            members: Mutex::new(cfg.addrs.clone()),
            leader: AtomicUsize::new(0),
            cfg,
        };
        if inner.cluster_id.is_empty() {
            let client = Client { inner: Arc::new(inner) };
            let hello = client.hello_any().await?;
            if hello.cluster_id.is_empty() {
                return Err(ClientError::Unavailable("the host answering is not part of a cluster yet".into()));
            }
            inner = Arc::try_unwrap(client.inner).map_err(|_| ClientError::Invalid("client shared too early".into()))?;
            inner.cluster_id = hello.cluster_id;
        }
        Ok(Client { inner: Arc::new(inner) })
    }

    pub fn cluster_id(&self) -> &str {
        &self.inner.cluster_id
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    pub(crate) fn header(&self) -> Option<pb::Header> {
        Some(header(&self.inner.cluster_id))
    }

    pub(crate) fn next_op_id(&self) -> u64 {
        self.inner.next_op.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClientError::Invalid(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(self.inner.cfg.rpc_timeout)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(self.inner.cfg.rpc_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy();
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

    /// Known members, the presumed leader first.
    pub fn members(&self) -> Vec<String> {
        let members = self.inner.members.lock().unwrap_or_else(|e| e.into_inner());
        let lead = self.inner.leader.load(Ordering::Relaxed) % members.len().max(1);
        members.iter().cycle().skip(lead).take(members.len()).cloned().collect()
    }

    /// Adds addresses learned from the cluster (leader hints, host table).
    pub fn learn_members(&self, addrs: impl IntoIterator<Item = String>) {
        let mut members = self.inner.members.lock().unwrap_or_else(|e| e.into_inner());
        for a in addrs {
            if !a.is_empty() && !members.contains(&a) {
                members.push(a);
            }
        }
    }

    fn set_leader(&self, addr: &str) {
        self.learn_members([addr.to_string()]);
        let members = self.inner.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = members.iter().position(|m| m == addr) {
            self.inner.leader.store(i, Ordering::Relaxed);
        }
    }

    fn rotate_leader(&self, from: &str) {
        let members = self.inner.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = members.iter().position(|m| m == from) {
            let _ = self.inner.leader.compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
            if self.inner.leader.load(Ordering::Relaxed) >= members.len() {
                self.inner.leader.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Runs `call` against the leader until it answers, following leader hints
    /// and moving on from members that time out, within the op deadline.
    pub(crate) async fn with_leader<T, F, Fut>(&self, what: &str, call: F) -> Result<T, ClientError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.with_leader_timeout(what, self.inner.cfg.rpc_timeout, call).await
    }

    pub(crate) async fn with_leader_timeout<T, F, Fut>(
        &self,
        what: &str,
        rpc_timeout: Duration,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.cfg.op_deadline;
        let mut backoff = Duration::from_millis(20);
        let mut last;
        let mut hinted: Option<String> = None;
        loop {
            let addr = hinted.take().unwrap_or_else(|| self.members()[0].clone());
            let outcome = match tokio::time::timeout(rpc_timeout, call(addr.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => self.classify(&addr, status),
                Err(_) => Attempt::Retry(None),
            };
            match outcome {
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(Some(hint)) if hint != addr => {
                    self.set_leader(&hint);
                    hinted = Some(hint);
                    continue;
                }
                Attempt::Retry(_) => {
                    last = format!("{addr} did not answer {what}");
                    self.rotate_leader(&addr);
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(ClientError::Unavailable(format!("{what}: gave up after {:?}; last: {last}", self.inner.cfg.op_deadline)));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    fn classify(&self, addr: &str, status: tonic::Status) -> Attempt {
        let hint = status.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
        match status.code() {
            // Transient: the member is down, frozen, electing, or not the leader.
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown | Code::Aborted => {
                Attempt::Retry(hint.filter(|h| !h.is_empty()))
            }
            _ => Attempt::Fail(ClientError::Rejected { addr: addr.to_string(), status }),
        }
    }

    /// Asks the members in turn who they are, until one answers.
    pub async fn hello_any(&self) -> Result<pb::HelloReply, ClientError> {
        let mut last = String::new();
        for addr in self.members() {
            let mut admin = self.admin(&addr)?;
            let req = pb::HelloRequest { header: Some(header(&self.inner.cluster_id)) };
            match tokio::time::timeout(self.inner.cfg.rpc_timeout, admin.hello(req)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
                Err(_) => last = format!("{addr}: no answer within {:?}", self.inner.cfg.rpc_timeout),
            }
        }
        Err(ClientError::Unavailable(format!("no member answered ({last})")))
    }

    /// The cluster as the member at `addr` sees it.
    pub async fn status_of(&self, addr: &str) -> Result<pb::StatusReply, ClientError> {
        let mut admin = self.admin(addr)?;
        let req = pb::StatusRequest { header: self.header() };
        match tokio::time::timeout(self.inner.cfg.rpc_timeout, admin.status(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(ClientError::Rejected { addr: addr.to_string(), status }),
            Err(_) => Err(ClientError::Unavailable(format!("{addr}: no answer within {:?}", self.inner.cfg.rpc_timeout))),
        }
    }

    /// The cluster status from the leader, or from any member if none leads.
    pub async fn status(&self) -> Result<pb::StatusReply, ClientError> {
        let mut last = None;
        let mut fallback = None;
        for addr in self.members() {
            match self.status_of(&addr).await {
                Ok(s) if s.leader_id != 0 && s.leader_id == s.host_id => {
                    self.set_leader(&addr);
                    self.learn_members(s.hosts.iter().map(|h| h.addr.clone()));
                    return Ok(s);
                }
                Ok(s) => {
                    self.learn_members(s.hosts.iter().map(|h| h.addr.clone()));
                    if !s.leader_addr.is_empty() && s.leader_addr != addr {
                        if let Ok(l) = self.status_of(&s.leader_addr).await {
                            if l.leader_id == l.host_id {
                                self.set_leader(&s.leader_addr);
                                return Ok(l);
                            }
                        }
                    }
                    fallback.get_or_insert(s);
                }
                Err(e) => last = Some(e),
            }
        }
        fallback.ok_or_else(|| last.unwrap_or_else(|| ClientError::Unavailable("no members known".into())))
    }

    /// Admin calls that only the leader answers.
    pub async fn add_host(&self, addr: &str) -> Result<u64, ClientError> {
        let addr = addr.to_string();
        // Adding a host waits for it to catch up as a learner: allow more time.
        self.with_leader_timeout("add host", self.inner.cfg.op_deadline, |leader| {
            let req = pb::AddHostRequest { header: self.header(), addr: addr.clone() };
            let c = self.admin(&leader);
            async move { c.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?.add_host(req).await }
        })
        .await
        .map(|r| r.into_inner().host_id)
    }

    pub async fn remove_host(&self, host_id: u64) -> Result<(), ClientError> {
        self.with_leader("remove host", |leader| {
            let req = pb::RemoveHostRequest { header: self.header(), host_id };
            let c = self.admin(&leader);
            async move { c.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?.remove_host(req).await }
        })
        .await
        .map(|_| ())
    }
}

impl Client {
    /// Leader only: records that host `host_id` is now at `addr`.
    pub async fn update_address(&self, host_id: u64, addr: &str) -> Result<(), ClientError> {
        let addr = addr.to_string();
        self.with_leader("update address", |leader| {
            let req = pb::UpdateAddressRequest { header: self.header(), host_id, addr: addr.clone() };
            let c = self.admin(&leader);
            async move { c.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?.update_address(req).await }
        })
        .await
        .map(|_| ())
    }

    /// An admin stub for one member, for calls that are not routed to the
    /// leader (init, adopt, hello).
    pub fn admin_at(&self, addr: &str) -> Result<AdminClient<Channel>, ClientError> {
        self.admin(addr)
    }
}

/// Connects to one address without knowing any cluster: for `fsctl init` and
/// for adopting a blank host.
pub fn admin_for(addr: &str, timeout: Duration) -> Result<AdminClient<Channel>, ClientError> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Invalid(format!("bad address {addr:?}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_lazy();
    Ok(AdminClient::new(ch))
}
