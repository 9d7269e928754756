//! Starting and stopping one host: identity, block store, tracker, the gRPC
//! server, and the named background workers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use failsafe_blockstore::BlockStore;
use failsafe_client::{Client, ClientConfig};
use failsafe_proto::pb::{
    self, admin_server::AdminServer, blocks_server::BlocksServer, command::Op,
    metadata_server::MetadataServer, raft_transport_server::RaftTransportServer,
};
use failsafe_proto::MAX_MESSAGE_BYTES;
use failsafe_tracker::{ClusterId, MetadataService, RaftService, Tracker};
use tokio::net::TcpListener;

use crate::admin::{device_infos, AdminService};
use crate::blocks::BlocksService;
use crate::config::Config;
use crate::gc::Gc;
use crate::identity::Identity;
use crate::metrics::{gauge, inc, Metrics};
use crate::repair::{group_copies, BadCopies, Repair};
use crate::scrub::Scrub;

/// Everything the background workers share.
struct Host {
    /// When this process started (wall clock): a host shipped before that
    /// has come back.
    started_ns: i64,
    cfg: Config,
    advertise: String,
    tracker: Arc<Tracker>,
    store: Arc<BlockStore>,
    /// Talks to the leader on this host's behalf (joins, reports, address
    /// changes); its member list follows the membership.
    client: tokio::sync::Mutex<Option<Client>>,
    /// What this host last reported about its devices, and when. A std
    /// Mutex: held for a comparison, never across an await.
    last_report: std::sync::Mutex<Option<(Vec<pb::DeviceInfo>, std::time::Instant)>>,
    metrics: Arc<Metrics>,
    /// Copies found missing or corrupt, for `copy-dropper`.
    bad: Arc<BadCopies>,
    repair: Arc<Repair>,
    scrub: Arc<Scrub>,
    gc: Arc<Gc>,
    /// Moves blocks for repair; block I/O names its hosts, so it needs no
    /// member list beyond this host.
    block_client: tokio::sync::Mutex<Option<Client>>,
}

/// Whether device usage changed enough to be worth a Raft entry: free space
/// that moved by more than the slack placement tolerates
/// (`failsafe_core::repair::USAGE_SLACK`).
fn usage_moved(prev: &[pb::DeviceInfo], now: &[pb::DeviceInfo]) -> bool {
    let slack = |capacity: u64| (capacity as f64 * failsafe_core::repair::USAGE_SLACK) as u64;
    prev.len() != now.len()
        || prev.iter().zip(now).any(|(a, b)| {
            a.device_id != b.device_id
                || a.blocks != b.blocks
                || a.free_bytes.abs_diff(b.free_bytes) > slack(a.capacity_bytes)
        })
}

/// Runs a host until `shutdown` completes.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local = listener.local_addr().context("listener address")?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
    let identity = Arc::new(Identity::load_or_create(&cfg.data_dir)?);
    let mut cluster_id = identity.cluster_id()?;
    if cluster_id.is_empty() {
        if let Some(id) = &cfg.cluster_id {
            identity.set_cluster_id(id)?;
            cluster_id = id.clone();
        }
    } else if let Some(id) = cfg.cluster_id.as_ref().filter(|id| **id != cluster_id) {
        anyhow::bail!("cluster_id: this data dir belongs to cluster {cluster_id}, not {id}");
    }
    let store = Arc::new(BlockStore::open(&cfg.devices).context("opening devices")?);
    let cluster = ClusterId::new(cluster_id);
    let tracker = Arc::new(
        Tracker::open(
            &cfg.data_dir.join("tracker"),
            identity.host_id,
            &cfg.tracker,
            cluster.clone(),
        )
        .await
        .context("opening the tracker")?,
    );
    tracing::info!(
        host = format!("{:016x}", identity.host_id),
        %advertise,
        zone = %cfg.zone,
        cluster = %cluster.get(),
        devices = store.device_ids().len(),
        "fsd starting"
    );
    tracker.guard_against_suspension(std::time::Duration::from_millis(
        cfg.tracker.election_max_ms,
    ));
    let metrics = Arc::new(Metrics::default());
    let bad = Arc::new(BadCopies::default());
    let repair = Arc::new(Repair::new(
        cfg.repair.clone(),
        cfg.gc.grace,
        metrics.clone(),
        bad.clone(),
    ));
    let scrub = Arc::new(Scrub::new(
        cfg.scrub.clone(),
        store.clone(),
        metrics.clone(),
        bad.clone(),
    ));
    let gc = Arc::new(Gc::new(cfg.gc.clone(), store.clone(), metrics.clone()));

    let admin = AdminService {
        tracker: tracker.clone(),
        identity: identity.clone(),
        store: store.clone(),
        zone: cfg.zone.clone(),
        advertise: advertise.clone(),
        rpc_timeout: cfg.rpc_timeout,
        repair: repair.clone(),
        scrub: scrub.clone(),
        gc: gc.clone(),
    };
    let blocks = BlocksService {
        store: store.clone(),
        cluster: cluster.clone(),
        metrics: metrics.clone(),
        bad: bad.clone(),
    };
    let render = {
        let (tracker, store, metrics) = (tracker.clone(), store.clone(), metrics.clone());
        move || render_metrics(&tracker, &store, &metrics)
    };
    let http = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(render())),
    );
    let routes = tonic::service::Routes::from(http)
        .add_service(
            AdminServer::new(admin)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            MetadataServer::new(MetadataService::new(tracker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RaftTransportServer::new(RaftService::new(tracker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            BlocksServer::new(blocks)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );

    let host = Arc::new(Host {
        cfg,
        advertise,
        tracker: tracker.clone(),
        store,
        client: tokio::sync::Mutex::new(None),
        last_report: std::sync::Mutex::new(None),
        metrics,
        bad,
        repair,
        scrub,
        gc,
        block_client: tokio::sync::Mutex::new(None),
        started_ns: failsafe_tracker::wall_clock_ns(),
    });
    let mut workers = vec![
        tokio::spawn(worker("announcer", host.clone(), Host::announce)),
        tokio::spawn(worker("session-reaper", host.clone(), Host::reap_sessions)),
        tokio::spawn(worker("repair", host.clone(), Host::repair_round)),
        tokio::spawn(worker("copy-dropper", host.clone(), Host::drop_bad_copies)),
        tokio::spawn(worker("gc", host.clone(), Host::gc_step)),
        tokio::spawn(worker("return", host.clone(), Host::return_step)),
    ];
    if host.scrub.enabled() {
        workers.push(tokio::spawn(worker(
            "scrub",
            host.clone(),
            Host::scrub_step,
        )));
    }

    let served = tonic::transport::Server::builder()
        .accept_http1(true)
        // A last resort against a handler stuck for ever; clients give up
        // much sooner.
        .timeout(Duration::from_secs(120))
        .add_routes(routes)
        // Small replies must not wait for the peer's delayed ACK (Nagle).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    for w in &workers {
        w.abort();
    }
    tracker.shutdown().await;
    tracing::info!("fsd stopped");
    served.context("gRPC server")
}

/// Runs one step of a named worker again and again; a failing step is logged
/// and retried after a back-off.
async fn worker<F, Fut>(name: &'static str, host: Arc<Host>, step: F)
where
    F: Fn(Arc<Host>) -> Fut,
    Fut: Future<Output = anyhow::Result<Duration>>,
{
    let mut failures = 0u32;
    loop {
        let pause = match step(host.clone()).await {
            Ok(next) => {
                failures = 0;
                next
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 || failures.is_multiple_of(20) {
                    tracing::warn!(worker = name, error = %format!("{e:#}"), "worker step failed");
                }
                Duration::from_millis(250 * u64::from(failures.min(8)))
            }
        };
        tokio::time::sleep(pause).await;
    }
}

impl Host {
    /// A client for the cluster, following the current membership.
    async fn client(&self) -> anyhow::Result<Client> {
        let cluster = self.tracker.cluster.get();
        anyhow::ensure!(!cluster.is_empty(), "not part of a cluster yet");
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
            .chain(self.cfg.join.iter().cloned())
            .collect();
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            c.learn_members(members);
            return Ok(c.clone());
        }
        anyhow::ensure!(!members.is_empty(), "no other cluster member known");
        let c = Client::connect(ClientConfig {
            addrs: members,
            cluster_id: Some(cluster),
            rpc_timeout: self.cfg.rpc_timeout,
            op_deadline: self.cfg.rpc_timeout * 3,
            zone: Some(self.cfg.zone.clone()),
            name: format!("fsd-{:016x}", self.tracker.host_id),
            ..ClientConfig::default()
        })
        .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Joins the cluster on first start, keeps this host's address in the
    /// membership current (a host may come back elsewhere), and reports the
    /// devices' usage.
    async fn announce(self: Arc<Self>) -> anyhow::Result<Duration> {
        let t = &self.tracker;
        if t.cluster.get().is_empty() {
            return Ok(Duration::from_millis(500));
        }
        if !t.is_initialized() {
            if self.cfg.join.is_empty() {
                // Waiting for `fsctl host add` to bring us in.
                return Ok(Duration::from_millis(500));
            }
            let client = self.client().await?;
            client.add_host(&self.advertise).await?;
            tracing::info!(addr = %self.advertise, "joined the cluster");
            return Ok(Duration::from_millis(100));
        }
        let known = t
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&t.host_id)
            .map(|n| n.addr.clone());
        let Some(known) = known else {
            // Removed from, or not yet in, the membership.
            return Ok(Duration::from_millis(500));
        };
        if known != self.advertise {
            tracing::info!(old = %known, new = %self.advertise, "this host's address changed; telling the cluster");
            if t.is_leader() {
                t.set_address(t.host_id, &self.advertise).await?;
            } else {
                self.client()
                    .await?
                    .update_address(t.host_id, &self.advertise)
                    .await?;
            }
            return Ok(Duration::from_millis(100));
        }
        let devices = device_infos(&self.store, t.host_id);
        {
            // Every report is a Raft entry: send one when usage moved, or
            // once a minute as a sign of life.
            let last = self.last_report.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((prev, at)) = last.as_ref() {
                if !usage_moved(prev, &devices) && at.elapsed() < Duration::from_secs(60) {
                    return Ok(self.cfg.report_interval);
                }
            }
        }
        let report = Op::ReportDevices(pb::ReportDevices {
            host_id: t.host_id,
            devices: devices.clone(),
        });
        if t.is_leader() {
            t.propose(pb::Command {
                op: Some(report),
                ..Default::default()
            })
            .await?;
        } else {
            self.client().await?.mutate(report).await?;
        }
        *self.last_report.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((devices, std::time::Instant::now()));
        Ok(self.cfg.report_interval)
    }

    /// A shipped host that was started again after it was shipped (it is
    /// back, at whatever address) verifies every block it holds — corrupt
    /// ones go to repair — and then asks to serve again. Its catch-up (the
    /// blocks written while it was away, as deltas where it holds an older
    /// version) runs meanwhile: repair already sends it copies.
    async fn return_step(self: Arc<Self>) -> anyhow::Result<Duration> {
        let t = &self.tracker;
        let away = t.away_since().await?;
        let Some(&(until, since)) = away.get(&t.host_id) else {
            return Ok(Duration::from_secs(1));
        };
        let now = failsafe_tracker::wall_clock_ns();
        if since >= self.started_ns && now < until {
            // Shipped while running: still on its way out.
            return Ok(Duration::from_secs(1));
        }
        let started = std::time::Instant::now();
        tracing::info!(
            "back from being shipped: verifying every stored block before serving reads"
        );
        let (mut blocks, mut corrupt) = (0u64, 0u64);
        for device in self.store.device_ids() {
            let mut after = None;
            loop {
                let store = self.store.clone();
                let batch =
                    tokio::task::spawn_blocking(move || store.list(device, after.as_ref(), 1024))
                        .await??;
                let Some(last) = batch.last().map(|b| b.hash) else {
                    break;
                };
                for b in batch {
                    match crate::scrub::verify(&self.store, &self.bad, device, b.hash).await? {
                        crate::scrub::Verified::Intact(_) => blocks += 1,
                        crate::scrub::Verified::Corrupt => corrupt += 1,
                        crate::scrub::Verified::Unreadable => {}
                    }
                }
                after = Some(last);
            }
        }
        self.propose(Op::SetHostState(pb::SetHostState {
            host_id: t.host_id,
            state: "active".into(),
            until_ns: 0,
        }))
        .await?;
        tracing::info!(blocks, corrupt, took = ?started.elapsed(), "verified after shipping; serving reads again");
        Ok(Duration::from_secs(1))
    }

    /// The leader expires client sessions whose lease ran out, which
    /// releases their locks.
    async fn reap_sessions(self: Arc<Self>) -> anyhow::Result<Duration> {
        self.tracker.expire_sessions().await?;
        Ok(Duration::from_secs(1))
    }

    /// Proposes a command: directly on the leader, else through the client.
    async fn propose(&self, op: Op) -> anyhow::Result<()> {
        if self.tracker.is_leader() {
            let r = self
                .tracker
                .propose(pb::Command {
                    op: Some(op),
                    ..Default::default()
                })
                .await?;
            if let Some(pb::command_result::Result::Error(e)) = r.result {
                anyhow::bail!("refused: {}", e.message);
            }
        } else {
            self.client().await?.mutate(op).await?;
        }
        Ok(())
    }

    /// The client repair moves blocks with.
    async fn block_client(&self) -> anyhow::Result<Client> {
        let cluster = self.tracker.cluster.get();
        anyhow::ensure!(!cluster.is_empty(), "not part of a cluster yet");
        let mut slot = self.block_client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = Client::connect(ClientConfig {
            addrs: vec![self.advertise.clone()],
            cluster_id: Some(cluster),
            rpc_timeout: self.cfg.rpc_timeout,
            zone: Some(self.cfg.zone.clone()),
            name: format!("fsd-repair-{:016x}", self.tracker.host_id),
            ..ClientConfig::default()
        })
        .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// On the leader, one round of repair (see `repair`).
    async fn repair_round(self: Arc<Self>) -> anyhow::Result<Duration> {
        if !self.tracker.is_leader() {
            self.repair.set_state("not leader");
            return Ok(self.cfg.repair.interval);
        }
        let client = self.block_client().await?;
        self.repair.round(&self.tracker, &client).await
    }

    /// Garbage collection: on the leader, unreferenced blocks; on every
    /// host, block files the tracker has no record of (see `gc`).
    async fn gc_step(self: Arc<Self>) -> anyhow::Result<Duration> {
        if self.tracker.cluster.get().is_empty() {
            self.gc.set_state("not in a cluster");
            return Ok(Duration::from_millis(500));
        }
        let client = self.block_client().await?;
        self.gc.step(&self.tracker, &client).await
    }

    /// Re-hashes a batch of this host's blocks (see `scrub`).
    async fn scrub_step(self: Arc<Self>) -> anyhow::Result<Duration> {
        self.scrub.step().await
    }

    /// Drops the records of copies found missing or corrupt, in batches.
    async fn drop_bad_copies(self: Arc<Self>) -> anyhow::Result<Duration> {
        let batch = self.bad.next_batch(Duration::from_secs(1)).await;
        if batch.is_empty() {
            return Ok(Duration::ZERO);
        }
        let op = Op::DropCopies(pb::DropCopies {
            copies: group_copies(&batch),
            keep: 0,
        });
        match self.propose(op).await {
            Ok(()) => {
                inc(&self.metrics.copies_dropped, batch.len() as u64);
                for (h, d) in &batch {
                    tracing::info!(block = %failsafe_core::hash_hex(h), device = format!("{d:016x}"), "dropped the record of a bad copy");
                }
                Ok(Duration::ZERO)
            }
            Err(e) => {
                self.bad.put_back(batch);
                Err(e.context("dropping bad copy records"))
            }
        }
    }
}

fn render_metrics(tracker: &Tracker, store: &BlockStore, metrics: &Metrics) -> String {
    let mut out = String::new();
    let m = tracker.raft().metrics().borrow().clone();
    let host = format!("{{host=\"{:016x}\"}}", tracker.host_id);
    gauge(
        &mut out,
        "failsafe_raft_term",
        "Current Raft term",
        &host,
        m.current_term,
    );
    gauge(
        &mut out,
        "failsafe_raft_is_leader",
        "1 if this host leads the tracker",
        &host,
        u8::from(tracker.is_leader()),
    );
    gauge(
        &mut out,
        "failsafe_raft_last_log_index",
        "Last Raft log index",
        &host,
        m.last_log_index.unwrap_or(0),
    );
    gauge(
        &mut out,
        "failsafe_raft_last_applied",
        "Last applied Raft log index",
        &host,
        m.last_applied.map_or(0, |l| l.index),
    );
    gauge(
        &mut out,
        "failsafe_raft_voters",
        "Voting tracker members",
        &host,
        m.membership_config.membership().voter_ids().count(),
    );
    if tracker.is_leader() {
        let under = metrics
            .under_replicated
            .load(std::sync::atomic::Ordering::Relaxed);
        gauge(
            &mut out,
            "failsafe_blocks_under_replicated",
            "Referenced blocks with fewer live copies than the copy count (leader only)",
            "",
            under,
        );
    }
    for u in store.usage() {
        let labels = format!(
            "{{device=\"{:016x}\",path=\"{}\"}}",
            u.device_id,
            u.path.display()
        );
        gauge(
            &mut out,
            "failsafe_device_capacity_bytes",
            "Device capacity",
            &labels,
            u.capacity_bytes,
        );
        gauge(
            &mut out,
            "failsafe_device_free_bytes",
            "Device free space",
            &labels,
            u.free_bytes,
        );
        gauge(
            &mut out,
            "failsafe_device_used_bytes",
            "Bytes of blocks on the device",
            &labels,
            u.used_bytes,
        );
        gauge(
            &mut out,
            "failsafe_device_blocks",
            "Blocks on the device",
            &labels,
            u.blocks,
        );
    }
    metrics.render(&mut out);
    out
}
