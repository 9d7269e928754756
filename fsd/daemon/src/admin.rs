//! The `Admin` service: cluster creation, membership, and status.

use std::sync::Arc;
use std::time::Duration;

use failsafe_blockstore::BlockStore;
use failsafe_proto::pb::{self, admin_client::AdminClient, admin_server::Admin, command::Op};
use failsafe_proto::{check_header, header, not_leader, PROTOCOL_VERSION};
use failsafe_tls::Expect;
use failsafe_tracker::Tracker;
use tonic::{Request, Response, Status};

use crate::blockify::Blockify;
use crate::cluster::Cluster;
use crate::gc::Gc;
use crate::identity::Identity;
use crate::placement::LeaderPlacement;
use crate::repair::Repair;
use crate::scrub::Scrub;

/// How long a shipped host may stay away unless told otherwise: a week.
pub(crate) const DEFAULT_AWAY_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Clone)]
pub(crate) struct AdminService {
    pub tracker: Arc<Tracker>,
    pub cluster: Arc<Cluster>,
    pub identity: Arc<Identity>,
    pub store: Arc<BlockStore>,
    pub zone: String,
    pub advertise: String,
    pub rpc_timeout: Duration,
    pub repair: Arc<Repair>,
    pub scrub: Arc<Scrub>,
    pub gc: Arc<Gc>,
    pub blockify: Arc<Blockify>,
    pub placement: Arc<LeaderPlacement>,
    /// Where this host's credential is (a renewal is written there).
    pub cred_path: Option<std::path::PathBuf>,
}

pub(crate) fn device_infos(store: &BlockStore, host_id: u64) -> Vec<pb::DeviceInfo> {
    store
        .usage()
        .into_iter()
        .map(|u| pb::DeviceInfo {
            device_id: u.device_id,
            host_id,
            path: u.path.display().to_string(),
            capacity_bytes: u.capacity_bytes,
            used_bytes: u.used_bytes,
            blocks: u.blocks,
            free_bytes: u.free_bytes,
        })
        .collect()
}

/// Asks the host at `addr` who it is; with `expect` naming a host, its
/// certificate must be that host's.
pub(crate) async fn hello(
    addr: &str,
    cluster_id: &str,
    tls: &failsafe_tls::Tls,
    expect: failsafe_tls::Expect,
    timeout: Duration,
) -> Result<pb::HelloReply, Status> {
    let channel = tls
        .channel_to(addr, expect, |e| {
            e.connect_timeout(timeout).timeout(timeout)
        })
        .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?;
    let req = pb::HelloRequest {
        header: Some(header(cluster_id)),
    };
    match tokio::time::timeout(timeout, AdminClient::new(channel).hello(req)).await {
        Ok(r) => r.map(Response::into_inner),
        Err(_) => Err(Status::unavailable(format!(
            "{addr} did not answer within {timeout:?}"
        ))),
    }
}

impl AdminService {
    /// `fsctl status`'s warnings as this member sees them: web hosts whose
    /// clock is off (the leader knows), its own tracker disk nearly full.
    async fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tracker.space_low() {
            out.push(format!(
                "the disk under the tracker of host {:016x} is nearly full: writes are refused (ENOSPC) while it leads; free space there",
                self.tracker.host_id
            ));
        }
        if let Ok(offsets) = self.tracker.clock_offsets().await {
            for (client, ms) in offsets {
                if ms.abs() > failsafe_tracker::CLOCK_WARN_MS {
                    out.push(format!(
                        "web host {client:?}: its clock is {:.1} s {} the leader's; run NTP (wiki engines compare time() with file mtimes)",
                        ms.abs() as f64 / 1000.0,
                        if ms > 0 { "ahead of" } else { "behind" }
                    ));
                }
            }
        }
        out
    }

    /// The tracker's status, plus this host's repair, scrub, gc, blockify
    /// and leader-placement workers and what needs an operator's eye.
    pub(crate) async fn full_status(&self) -> Result<pb::StatusReply, Status> {
        let mut status = self.tracker.status().await?;
        status.repair = Some(self.repair.status());
        status.scrub = Some(self.scrub.status());
        status.gc = Some(self.gc.status());
        status.blockify = Some(self.blockify.status());
        status.leader_placement = Some(self.placement.status());
        status.warnings = self.warnings().await;
        Ok(status)
    }

    fn check(&self, h: Option<&pb::Header>) -> Result<(), Status> {
        check_header(h, &self.tracker.cluster.get())
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.tracker.is_leader() {
            Ok(())
        } else {
            Err(not_leader(
                self.tracker
                    .leader()
                    .map(|(_, a)| a)
                    .as_deref()
                    .filter(|a| !a.is_empty()),
            ))
        }
    }

    /// Registers the host `hello` describes, pinning its key: the key the
    /// host's own connection showed when it asks itself (`caller`), else
    /// the one it says it has.
    async fn register(
        &self,
        hello: &pb::HelloReply,
        caller: Option<&failsafe_tls::Peer>,
    ) -> Result<(), Status> {
        let key_id = match caller {
            Some(p) if p.grant.as_ref().is_some_and(|g| g.host_id == hello.host_id) => {
                p.key_id.to_vec()
            }
            _ => hello.key_id.clone(),
        };
        let op = Op::RegisterHost(pb::RegisterHost {
            host_id: hello.host_id,
            zone: hello.zone.clone(),
            addr: hello.addr.clone(),
            devices: hello.devices.clone(),
            key_id,
        });
        Ok(self.cluster.propose(op).await?)
    }

    /// This host's credential (refused when it runs --insecure).
    fn own_credential(&self) -> Result<failsafe_tls::Credential, Status> {
        self.cluster
            .tls()
            .credential()
            .ok_or_else(|| Status::failed_precondition("this host runs --insecure"))
    }

    fn own_hello(&self) -> pb::HelloReply {
        pb::HelloReply {
            cluster_id: self.tracker.cluster.get(),
            host_id: self.tracker.host_id,
            zone: self.zone.clone(),
            addr: self.advertise.clone(),
            protocol_version: PROTOCOL_VERSION,
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            devices: device_infos(&self.store, self.tracker.host_id),
            key_id: self
                .cluster
                .tls()
                .credential()
                .map(|c| c.key_id().to_vec())
                .unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let h = req.into_inner().header.unwrap_or_default();
        if h.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not spoken here (this host speaks {PROTOCOL_VERSION})",
                h.protocol_version
            )));
        }
        Ok(Response::new(self.own_hello()))
    }

    async fn init(
        &self,
        _req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitReply>, Status> {
        let existing = self.tracker.cluster.get();
        if !existing.is_empty() || self.tracker.is_initialized() {
            return Err(Status::already_exists(format!(
                "this host already belongs to cluster {existing:?}"
            )));
        }
        let cluster_id = format!("{:032x}", rand::random::<u128>());
        self.identity
            .set_cluster_id(&cluster_id)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.tracker.cluster.set(cluster_id.clone());
        self.tracker.initialize(&self.advertise).await?;
        if !self.tracker.wait_leader(Duration::from_secs(10)).await {
            return Err(Status::unavailable("the new cluster elected no leader"));
        }
        self.register(&self.own_hello(), None).await?;
        tracing::info!(cluster = %cluster_id, "created a new cluster");
        Ok(Response::new(pb::InitReply {
            cluster_id,
            host_id: self.tracker.host_id,
        }))
    }

    async fn adopt(
        &self,
        req: Request<pb::AdoptRequest>,
    ) -> Result<Response<pb::AdoptReply>, Status> {
        let req = req.into_inner();
        let id = req.cluster_id.trim().to_string();
        if id.is_empty()
            || id.len() > 64
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(Status::invalid_argument(
                "a cluster id is 1 to 64 letters, digits or '-'",
            ));
        }
        let existing = self.tracker.cluster.get();
        if existing == id {
            return Ok(Response::new(pb::AdoptReply {
                host_id: self.tracker.host_id,
            }));
        }
        if !existing.is_empty() || self.tracker.is_initialized() {
            return Err(Status::already_exists(format!(
                "this host already belongs to cluster {existing:?}"
            )));
        }
        self.identity
            .set_cluster_id(&id)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.tracker.cluster.set(id.clone());
        tracing::info!(cluster = %id, "adopted into a cluster");
        Ok(Response::new(pb::AdoptReply {
            host_id: self.tracker.host_id,
        }))
    }

    async fn add_host(
        &self,
        req: Request<pb::AddHostRequest>,
    ) -> Result<Response<pb::AddHostReply>, Status> {
        let caller = failsafe_tls::grant_of(&req)?;
        let peer = req.extensions().get::<failsafe_tls::Peer>().cloned();
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        self.require_leader()?;
        let cluster = self.tracker.cluster.get();
        let tls = self.cluster.tls();
        let any = hello(
            &req.addr,
            &cluster,
            tls,
            Expect::AnyMember,
            self.rpc_timeout,
        )
        .await?;
        // Again, now holding it to the host id it gave: its certificate
        // must name it.
        let hello = hello(
            &req.addr,
            &cluster,
            tls,
            Expect::Host(any.host_id),
            self.rpc_timeout,
        )
        .await?;
        if let Some(g) = caller.filter(|g| g.role == failsafe_tls::Role::Member) {
            if g.host_id != hello.host_id {
                return Err(Status::permission_denied(format!(
                    "{} may add only itself, not host {:016x}",
                    g.who(),
                    hello.host_id
                )));
            }
        }
        if hello.cluster_id != cluster {
            return Err(Status::failed_precondition(format!(
                "host at {} belongs to cluster {:?}, not this one (adopt it first)",
                req.addr, hello.cluster_id
            )));
        }
        // The host announces the address it was asked at; fsctl may use the
        // advertised one.
        let hello = pb::HelloReply {
            addr: req.addr.clone(),
            ..hello
        };
        self.register(&hello, peer.as_ref()).await?;
        self.tracker.add_member(hello.host_id, &req.addr).await?;
        tracing::info!(host = format!("{:016x}", hello.host_id), addr = %req.addr, zone = %hello.zone, "host added");
        Ok(Response::new(pb::AddHostReply {
            host_id: hello.host_id,
        }))
    }

    async fn remove_host(
        &self,
        req: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        self.require_leader()?;
        let (_, to_move) = self.tracker.drain_remaining(req.host_id).await?;
        if to_move > 0 && !req.force {
            return Err(Status::failed_precondition(format!(
                "removing host {:016x} would leave {to_move} blocks below their copy count; drain it first (or force)",
                req.host_id
            )));
        }
        self.tracker.remove_member(req.host_id).await?;
        self.cluster
            .propose(Op::RemoveHost(pb::RemoveHost {
                host_id: req.host_id,
            }))
            .await?;
        tracing::info!(host = format!("{:016x}", req.host_id), "host removed");
        Ok(Response::new(pb::RemoveHostReply {}))
    }

    async fn ship(&self, req: Request<pb::ShipRequest>) -> Result<Response<pb::ShipReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        self.require_leader()?;
        let (blocks_held, at_risk) = self.tracker.ship_check(req.host_id).await?;
        if !at_risk.is_empty() && !req.force {
            tracing::warn!(
                host = format!("{:016x}", req.host_id),
                files = at_risk.len(),
                "refused to ship: files at risk"
            );
            return Ok(Response::new(pb::ShipReply {
                shipped: false,
                at_risk,
                blocks_held,
                until_ns: 0,
            }));
        }
        let away = Duration::from_millis(if req.away_ms == 0 {
            DEFAULT_AWAY_MS
        } else {
            req.away_ms
        });
        let until_ns = failsafe_tracker::wall_clock_ns()
            .saturating_add(away.as_nanos().min(i64::MAX as u128) as i64);
        self.cluster
            .set_host_state(req.host_id, pb::HostAdminState::Away, until_ns)
            .await?;
        tracing::info!(
            host = format!("{:016x}", req.host_id),
            ?away,
            blocks_held,
            "host shipped: its absence starts no re-replication"
        );
        Ok(Response::new(pb::ShipReply {
            shipped: true,
            at_risk,
            blocks_held,
            until_ns,
        }))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        self.require_leader()?;
        self.cluster
            .set_host_state(req.host_id, pb::HostAdminState::Draining, 0)
            .await?;
        let (blocks_held, to_move) = self.tracker.drain_remaining(req.host_id).await?;
        tracing::info!(
            host = format!("{:016x}", req.host_id),
            blocks_held,
            to_move,
            "draining host: its copies move elsewhere"
        );
        Ok(Response::new(pb::DrainReply {
            blocks_held,
            to_move,
        }))
    }

    async fn update_address(
        &self,
        req: Request<pb::UpdateAddressRequest>,
    ) -> Result<Response<pb::UpdateAddressReply>, Status> {
        // A member may move only itself.
        if let Some(g) = failsafe_tls::grant_of(&req)? {
            if g.role == failsafe_tls::Role::Member && g.host_id != req.get_ref().host_id {
                return Err(Status::permission_denied(format!(
                    "{} may not move host {:016x}",
                    g.who(),
                    req.get_ref().host_id
                )));
            }
        }
        let peer = req.extensions().get::<failsafe_tls::Peer>().cloned();
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        self.require_leader()?;
        // The host at the new address must hold that host's certificate.
        let hello = hello(
            &req.addr,
            &self.tracker.cluster.get(),
            self.cluster.tls(),
            Expect::Host(req.host_id),
            self.rpc_timeout,
        )
        .await?;
        if hello.host_id != req.host_id {
            return Err(Status::failed_precondition(format!(
                "{} is host {:016x}, not {:016x}",
                req.addr, hello.host_id, req.host_id
            )));
        }
        // Registered first: a key other than the pinned one is refused
        // before the membership moves.
        self.register(
            &pb::HelloReply {
                addr: req.addr.clone(),
                ..hello
            },
            peer.as_ref(),
        )
        .await?;
        self.tracker.set_address(req.host_id, &req.addr).await?;
        tracing::info!(host = format!("{:016x}", req.host_id), addr = %req.addr, "host address updated");
        Ok(Response::new(pb::UpdateAddressReply {}))
    }

    async fn request_certificate(
        &self,
        req: Request<pb::CertificateRequest>,
    ) -> Result<Response<pb::CertificateRequestReply>, Status> {
        self.check(req.get_ref().header.as_ref())?;
        let cred = self.own_credential()?;
        let csr_pem = cred.csr().map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(pb::CertificateRequestReply {
            host_id: self.tracker.host_id,
            csr_pem,
        }))
    }

    async fn install_certificate(
        &self,
        req: Request<pb::InstallCertificateRequest>,
    ) -> Result<Response<pb::InstallCertificateReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let cred = self.own_credential()?;
        let renewed = cred
            .renewed(&req.cert_pem)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let path = self
            .cred_path
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("this host has no credential file"))?;
        // On disk first: a restart keeps what the connections now use.
        renewed
            .save(path)
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        self.cluster
            .tls()
            .replace(renewed.clone())
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        tracing::info!(expires = %renewed.expires_text(), "renewed this host's certificate");
        Ok(Response::new(pb::InstallCertificateReply {
            expires: renewed.expires_text(),
        }))
    }

    /// The tracker's status, plus this host's repair, scrub, gc and
    /// blockify and leader-placement workers.
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let req = req.into_inner();
        // A host outside any cluster still says so, with its own identity.
        let cluster = self.tracker.cluster.get();
        if !cluster.is_empty() {
            self.check(req.header.as_ref())?;
        }
        Ok(Response::new(self.full_status().await?))
    }
}
