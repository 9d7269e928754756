//! Admin calls: who is there, the cluster's status, and membership changes
//! (add, ship, drain, remove, a host's new address). Those that change the
//! cluster go to the leader.

use std::future::Future;
use std::time::Duration;

use failsafe_proto::header;
use failsafe_proto::pb::{self, admin_client::AdminClient};
use tonic::transport::Channel;

use crate::stats::RpcKind;
use crate::{Client, ClientError};

impl Client {
    /// Asks the members in turn who they are, until one answers.
    pub async fn hello_any(&self) -> Result<pb::HelloReply, ClientError> {
        let mut last = String::new();
        for addr in self.members() {
            let mut admin = self.admin(&addr)?;
            let req = pb::HelloRequest {
                header: Some(header(&self.inner.cluster_id)),
            };
            let rpc = self.inner.rpcs.start(RpcKind::Admin, true);
            let answer = tokio::time::timeout(self.inner.cfg.rpc_timeout, admin.hello(req)).await;
            rpc.end_timed(&answer);
            match answer {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => {
                    if let Some(why) = failsafe_tls::explain_refusal(&s, &self.inner.cfg.tls) {
                        return Err(ClientError::Credential(format!("{addr}: {why}")));
                    }
                    last = format!("{addr}: {}", s.message())
                }
                Err(_) => {
                    last = format!("{addr}: no answer within {:?}", self.inner.cfg.rpc_timeout)
                }
            }
        }
        // A plaintext client's calls to a cluster with TLS fail as
        // transport errors, like calls to members that are down: say so,
        // and keep retrying (it may be the latter).
        let hint = match self.inner.cfg.tls {
            failsafe_tls::Tls::Insecure => {
                "; this client speaks plaintext (--insecure): a cluster with TLS refuses it"
            }
            failsafe_tls::Tls::Mutual(_) => "",
        };
        Err(ClientError::Unavailable(format!(
            "no member answered ({last}){hint}"
        )))
    }

    /// The cluster as the member at `addr` sees it.
    pub async fn status_of(&self, addr: &str) -> Result<pb::StatusReply, ClientError> {
        let mut admin = self.admin(addr)?;
        let req = pb::StatusRequest {
            header: self.header(),
        };
        let rpc = self.inner.rpcs.start(RpcKind::Admin, true);
        let answer = tokio::time::timeout(self.inner.cfg.rpc_timeout, admin.status(req)).await;
        rpc.end_timed(&answer);
        match answer {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(ClientError::Rejected {
                addr: addr.to_string(),
                status,
            }),
            Err(_) => Err(ClientError::Unavailable(format!(
                "{addr}: no answer within {:?}",
                self.inner.cfg.rpc_timeout
            ))),
        }
    }

    /// The cluster status from the leader, or from any member if none leads.
    pub async fn status(&self) -> Result<pb::StatusReply, ClientError> {
        let mut last = None;
        let mut fallback = None;
        for addr in self.members() {
            match self.status_of(&addr).await {
                Ok(s) if s.leader_id != 0 && s.leader_id == s.host_id => {
                    self.follow_leader(&addr, &s);
                    return Ok(s);
                }
                Ok(s) => {
                    self.learn_members(s.hosts.iter().map(|h| h.addr.clone()));
                    if !s.leader_addr.is_empty() && s.leader_addr != addr {
                        if let Ok(l) = self.status_of(&s.leader_addr).await {
                            if l.leader_id == l.host_id {
                                self.follow_leader(&s.leader_addr, &l);
                                return Ok(l);
                            }
                        }
                    }
                    fallback.get_or_insert(s);
                }
                Err(e) => last = Some(e),
            }
        }
        fallback.ok_or_else(|| {
            last.unwrap_or_else(|| ClientError::Unavailable("no members known".into()))
        })
    }

    /// Adds the host at `addr` (blank, started with `--join`) as a learner,
    /// then a voter; returns its id.
    pub async fn add_host(&self, addr: &str) -> Result<u64, ClientError> {
        let req = pb::AddHostRequest {
            header: self.header(),
            addr: addr.to_string(),
        };
        // Adding a host waits for it to catch up as a learner: allow more time.
        let deadline = self.inner.cfg.op_deadline;
        self.at_leader("add host", (deadline, deadline), move |mut c| {
            let req = req.clone();
            async move { c.add_host(req).await }
        })
        .await
        .map(|r| r.host_id)
    }

    /// Marks a host away (shipped), if that is safe or `force`d.
    pub async fn ship_host(
        &self,
        host_id: u64,
        away_ms: u64,
        force: bool,
    ) -> Result<pb::ShipReply, ClientError> {
        let req = pb::ShipRequest {
            header: self.header(),
            host_id,
            away_ms,
            force,
        };
        self.at_leader("ship host", self.rpc_deadlines(), move |mut c| {
            let req = req.clone();
            async move { c.ship(req).await }
        })
        .await
    }

    /// Starts draining a host: its copies move elsewhere.
    pub async fn drain_host(&self, host_id: u64) -> Result<pb::DrainReply, ClientError> {
        let req = pb::DrainRequest {
            header: self.header(),
            host_id,
        };
        self.at_leader("drain host", self.rpc_deadlines(), move |mut c| {
            let req = req.clone();
            async move { c.drain(req).await }
        })
        .await
    }

    /// Removes a host from the cluster; refused while that would leave a
    /// block below its copy count, unless `force`.
    pub async fn remove_host(&self, host_id: u64, force: bool) -> Result<(), ClientError> {
        let req = pb::RemoveHostRequest {
            header: self.header(),
            host_id,
            force,
        };
        self.at_leader("remove host", self.rpc_deadlines(), move |mut c| {
            let req = req.clone();
            async move { c.remove_host(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Records that host `host_id` is now at `addr`.
    pub async fn update_address(&self, host_id: u64, addr: &str) -> Result<(), ClientError> {
        let req = pb::UpdateAddressRequest {
            header: self.header(),
            host_id,
            addr: addr.to_string(),
        };
        self.at_leader("update address", self.rpc_deadlines(), move |mut c| {
            let req = req.clone();
            async move { c.update_address(req).await }
        })
        .await
        .map(|_| ())
    }

    /// One RPC's deadline, and the whole operation's.
    fn rpc_deadlines(&self) -> (Duration, Duration) {
        (self.inner.cfg.rpc_timeout, self.inner.cfg.op_deadline)
    }

    /// An admin call only the leader answers, carried through failovers.
    async fn at_leader<T, F, Fut>(
        &self,
        what: &str,
        (rpc_timeout, op_deadline): (Duration, Duration),
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.with_leader_timeout(RpcKind::Admin, what, rpc_timeout, op_deadline, |leader| {
            let call = self.admin(&leader).map(&call);
            async move {
                call.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                    .await
            }
        })
        .await
        .map(tonic::Response::into_inner)
    }
}

/// Connects to one address without knowing any cluster: for `fsctl init` and
/// for adopting a blank host.
pub fn admin_for(
    addr: &str,
    tls: &failsafe_tls::Tls,
    timeout: Duration,
) -> Result<AdminClient<Channel>, ClientError> {
    admin_at(addr, tls, failsafe_tls::Expect::AnyMember, timeout)
}

/// `admin_for` a member whose certificate must be `expect`'s.
pub fn admin_at(
    addr: &str,
    tls: &failsafe_tls::Tls,
    expect: failsafe_tls::Expect,
    timeout: Duration,
) -> Result<AdminClient<Channel>, ClientError> {
    let ch = tls
        .channel_to(addr, expect, |e| {
            e.connect_timeout(timeout).timeout(timeout)
        })
        .map_err(|e| ClientError::Invalid(format!("bad address {addr:?}: {e}")))?;
    Ok(AdminClient::new(ch))
}
