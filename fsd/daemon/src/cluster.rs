//! How this host talks to the rest of its cluster: a client for the tracker
//! (joins, device reports, address changes, commands from a host that does
//! not lead), a client that moves blocks (repair, gc), and `propose`, the one
//! way a worker or the admin service puts a command in the log.

use std::sync::Arc;
use std::time::Duration;

use failsafe_client::{Client, ClientConfig, ClientError};
use failsafe_proto::pb::{self, command::Op};
use failsafe_tracker::{Tracker, TrackerError};
use tonic::Status;

use crate::config::Config;

/// Why a client could not be had or a command did not take effect.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClusterError {
    #[error("not part of a cluster yet")]
    NoCluster,
    #[error("no other cluster member known")]
    NoMembers,
    /// The state machine refused the command: it changed nothing.
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Client(ClientError),
}

impl From<ClientError> for ClusterError {
    fn from(e: ClientError) -> ClusterError {
        match e {
            ClientError::Refused { message, .. } => ClusterError::Refused(message),
            e => ClusterError::Client(e),
        }
    }
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        match e {
            ClusterError::Refused(message) => Status::invalid_argument(message),
            ClusterError::Tracker(e) => e.into(),
            ClusterError::NoCluster | ClusterError::NoMembers => {
                Status::failed_precondition(e.to_string())
            }
            ClusterError::Client(e) => Status::unavailable(e.to_string()),
        }
    }
}

/// This host's way to its cluster; the clients are made when first needed.
pub(crate) struct Cluster {
    tracker: Arc<Tracker>,
    /// The address this host tells the others.
    advertise: String,
    zone: String,
    /// Members to ask when this host knows no others (`--join`).
    join: Vec<String>,
    rpc_timeout: Duration,
    /// This host's credential, for calling the others.
    tls: failsafe_tls::Tls,
    /// Follows the membership.
    client: tokio::sync::Mutex<Option<Client>>,
    /// Block I/O names its hosts, so it needs no member list beyond this host.
    block_client: tokio::sync::Mutex<Option<Client>>,
}

impl Cluster {
    pub(crate) fn new(tracker: Arc<Tracker>, cfg: &Config, advertise: String) -> Cluster {
        Cluster {
            tracker,
            advertise,
            zone: cfg.zone.clone(),
            join: cfg.join.clone(),
            rpc_timeout: cfg.rpc_timeout,
            tls: cfg.tls.clone(),
            client: tokio::sync::Mutex::new(None),
            block_client: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    pub(crate) fn tls(&self) -> &failsafe_tls::Tls {
        &self.tls
    }

    pub(crate) fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Whether this host was started with members to join.
    pub(crate) fn joins(&self) -> bool {
        !self.join.is_empty()
    }

    fn cluster_id(&self) -> Result<String, ClusterError> {
        let id = self.tracker.cluster.get();
        if id.is_empty() {
            return Err(ClusterError::NoCluster);
        }
        Ok(id)
    }

    /// A client for the cluster, following the current membership.
    pub(crate) async fn client(&self) -> Result<Client, ClusterError> {
        let cluster = self.cluster_id()?;
        let members: Vec<String> = self
            .tracker
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.tracker.host_id)
            .map(|(_, n)| n.addr.clone())
            .chain(self.join.iter().cloned())
            .collect();
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            c.learn_members(members);
            return Ok(c.clone());
        }
        if members.is_empty() {
            return Err(ClusterError::NoMembers);
        }
        let c = Client::connect(ClientConfig {
            addrs: members,
            cluster_id: Some(cluster),
            rpc_timeout: self.rpc_timeout,
            op_deadline: self.rpc_timeout * 3,
            zone: Some(self.zone.clone()),
            background: true,
            name: format!("fsd-{:016x}", self.tracker.host_id),
            tls: self.tls.clone(),
            ..ClientConfig::default()
        })
        .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The client repair and gc move and delete blocks with.
    pub(crate) async fn block_client(&self) -> Result<Client, ClusterError> {
        let cluster = self.cluster_id()?;
        let mut slot = self.block_client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = Client::connect(ClientConfig {
            addrs: vec![self.advertise.clone()],
            cluster_id: Some(cluster),
            rpc_timeout: self.rpc_timeout,
            zone: Some(self.zone.clone()),
            background: true,
            name: format!("fsd-repair-{:016x}", self.tracker.host_id),
            tls: self.tls.clone(),
            ..ClientConfig::default()
        })
        .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Puts a command in the log — here if this host leads, else through
    /// the leader — and waits for it to be applied. A refusal is an error.
    /// Records what an administrator said about a host (`until_ns`: when a
    /// shipped host is due back; 0 otherwise).
    pub(crate) async fn set_host_state(
        &self,
        host_id: u64,
        state: pb::HostAdminState,
        until_ns: i64,
    ) -> Result<(), ClusterError> {
        self.propose(Op::SetHostState(pb::SetHostState {
            host_id,
            state: state as i32,
            until_ns,
        }))
        .await
    }

    pub(crate) async fn propose(&self, op: Op) -> Result<(), ClusterError> {
        if !self.tracker.is_leader() {
            self.client().await?.mutate(op).await?;
            return Ok(());
        }
        let cmd = pb::Command {
            op: Some(op),
            ..Default::default()
        };
        match self.tracker.propose(cmd).await?.result {
            Some(pb::command_result::Result::Error(e)) => Err(ClusterError::Refused(e.message)),
            _ => Ok(()),
        }
    }
}
