//! Starting and stopping one host: identity, block store, tracker, the gRPC
//! server, and the named background workers (see `worker`).

use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use failsafe_blockstore::BlockStore;
use failsafe_proto::pb::{
    admin_server::AdminServer, blocks_server::BlocksServer, metadata_server::MetadataServer,
    raft_transport_server::RaftTransportServer,
};
use failsafe_proto::MAX_MESSAGE_BYTES;
use failsafe_tracker::{ClusterId, MetadataService, RaftService, Tracker};
use tokio::net::TcpListener;

use crate::admin::AdminService;
use crate::announce::Announcer;
use crate::blockify::Blockify;
use crate::blocks::BlocksService;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::gc::Gc;
use crate::health::Health;
use crate::identity::Identity;
use crate::metrics::{gauge, Metrics};
use crate::placement::LeaderPlacement;
use crate::repair::{BadCopies, CopyDropper, Repair};
use crate::returning::Return;
use crate::scrub::Scrub;
use crate::worker::{Shutdown, Worker};

/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Requests one connection may have in flight at once (more wait).
const MAX_REQUESTS_PER_CONNECTION: usize = 512;

/// Runs a host until `shutdown` completes.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local = listener.local_addr().context("listener address")?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| local.to_string());
    if matches!(cfg.tls, failsafe_tls::Tls::Insecure) {
        tracing::warn!(
            "running --insecure: plaintext, and anyone who reaches {local} may read, \
             change or delete everything"
        );
    }
    let identity = Arc::new(Identity::load_or_create(
        &cfg.data_dir,
        cfg.tls.grant().map(|g| g.host_id),
    )?);
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
    let cluster_id = ClusterId::new(cluster_id);
    let tracker_dir = cfg.data_dir.join("tracker");
    // Before opening the databases: on a full disk they need the reserve.
    let space_low = crate::reserve::keep(&tracker_dir, cfg.tracker_reserve_bytes)
        .context("the tracker's disk reserve")?;
    let tracker = Arc::new(
        Tracker::open(
            &tracker_dir,
            identity.host_id,
            &cfg.tracker,
            cluster_id.clone(),
            cfg.tls.clone(),
        )
        .await
        .context("opening the tracker")?,
    );
    tracker.set_space_low(space_low);
    store.keep_free_for(&tracker_dir, cfg.tracker_reserve_bytes.saturating_mul(2));
    tracing::info!(
        host = format!("{:016x}", identity.host_id),
        %advertise,
        zone = %cfg.zone,
        cluster = %cluster_id.get(),
        devices = store.device_ids().len(),
        "fsd starting"
    );
    tracker.guard_against_suspension(std::time::Duration::from_millis(
        cfg.tracker.election_max_ms,
    ));
    let cluster = Arc::new(Cluster::new(tracker.clone(), &cfg, advertise.clone()));
    let metrics = Arc::new(Metrics::default());
    let bad = Arc::new(BadCopies::default());
    let repair = Arc::new(Repair::new(
        cfg.repair.clone(),
        cfg.gc.grace,
        cluster.clone(),
        metrics.clone(),
        bad.clone(),
    ));
    let scrub = Arc::new(Scrub::new(
        cfg.scrub.clone(),
        store.clone(),
        metrics.clone(),
        bad.clone(),
    ));
    let gc = Arc::new(Gc::new(
        cfg.gc.clone(),
        cluster.clone(),
        store.clone(),
        metrics.clone(),
    ));
    let blockify = Arc::new(Blockify::new(
        cfg.blockify.clone(),
        cluster.clone(),
        metrics.clone(),
    ));

    let placement = Arc::new(LeaderPlacement::new(tracker.clone()));

    let admin = AdminService {
        tracker: tracker.clone(),
        cluster: cluster.clone(),
        identity: identity.clone(),
        store: store.clone(),
        zone: cfg.zone.clone(),
        advertise: advertise.clone(),
        rpc_timeout: cfg.rpc_timeout,
        repair: repair.clone(),
        scrub: scrub.clone(),
        gc: gc.clone(),
        blockify: blockify.clone(),
        placement: placement.clone(),
        cred_path: cfg.cred_path.clone(),
    };
    let blocks = BlocksService {
        store: store.clone(),
        cluster: cluster_id.clone(),
        metrics: metrics.clone(),
        bad: bad.clone(),
    };
    let render = {
        let (tracker, store, metrics) = (tracker.clone(), store.clone(), metrics.clone());
        move || render_metrics(&tracker, &store, &metrics)
    };
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Arc::new(Health::new(tracker.clone(), reporter));
    let (live, ready) = (health.clone(), health.clone());
    let status_page = Arc::new(crate::status_page::StatusPage {
        admin: admin.clone(),
    });
    let http = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || {
                let p = status_page.clone();
                async move { p.page().await }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(render())),
        )
        .route(
            "/healthz",
            axum::routing::get(move || std::future::ready(live.healthz())),
        )
        .route(
            "/readyz",
            axum::routing::get(move || std::future::ready(ready.readyz())),
        );
    // Plain HTTP, /metrics and the health probes (HTTP and gRPC: a
    // Kubernetes gRPC probe speaks no TLS) only, where the operator asked
    // for it.
    let metrics_only = match cfg.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics_listen: binding {addr}"))?;
            let addr = l.local_addr()?;
            // Where scripts and tests find the port when it was 0, as
            // with `fsd.addr`.
            std::fs::write(cfg.data_dir.join("metrics.addr"), format!("{addr}\n"))
                .context("writing metrics.addr")?;
            tracing::info!(%addr, "serving /metrics and health without TLS");
            let serve = tonic::transport::Server::builder()
                .accept_http1(true)
                .timeout(Duration::from_secs(10))
                .add_routes(
                    tonic::service::Routes::from(http.clone()).add_service(health_service.clone()),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l));
            Some(tokio::spawn(serve))
        }
        None => None,
    };
    let routes = tonic::service::Routes::from(http)
        .add_service(health_service)
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

    let keys = crate::auth::Keys::default();
    let stop = Shutdown::new();
    let mut workers = vec![
        stop.spawn(Arc::new(crate::auth::KeysWorker {
            tracker: tracker.clone(),
            keys: keys.clone(),
        })),
        stop.spawn(Arc::new(Announcer::new(
            cluster.clone(),
            store.clone(),
            cfg.report_interval,
        ))),
        stop.spawn(Arc::new(SessionReaper(tracker.clone()))),
        stop.spawn(health),
        stop.spawn(Arc::new(crate::reserve::TrackerReserve {
            tracker: tracker.clone(),
            dir: tracker_dir.clone(),
            bytes: cfg.tracker_reserve_bytes,
            state: crate::worker::WorkerState::new("starting"),
        })),
        stop.spawn(repair),
        stop.spawn(Arc::new(CopyDropper {
            cluster: cluster.clone(),
            bad: bad.clone(),
            metrics,
        })),
        stop.spawn(gc),
        stop.spawn(blockify),
        stop.spawn(placement),
        stop.spawn(Arc::new(Return::new(cluster, store, bad))),
    ];
    if scrub.enabled() {
        workers.push(stop.spawn(scrub));
    }

    let fatal = Arc::new(std::sync::Mutex::new(None));
    let served = tonic::transport::Server::builder()
        .layer(crate::auth::AuthorizeLayer(keys))
        .accept_http1(true)
        // One caller cannot open streams or requests without bound: a
        // mount has a few dozen in flight, a member a few hundred at most
        // (group commit); beyond these, requests wait their turn.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_REQUESTS_PER_CONNECTION)
        // A last resort against a handler stuck for ever; clients give up
        // much sooner.
        .timeout(Duration::from_secs(120))
        .add_routes(routes)
        // Small replies must not wait for the peer's delayed ACK (Nagle).
        .serve_with_incoming_shutdown(
            failsafe_tls::incoming(listener, cfg.tls.clone()),
            until_stopped(shutdown, tracker.clone(), fatal.clone()),
        )
        .await;
    if let Some(m) = metrics_only {
        m.abort();
    }
    stop.stop(workers).await;
    tracker.shutdown().await;
    if let Some(why) = fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
        anyhow::bail!(
            "the tracker stopped for good ({why}); exiting so the supervisor restarts fsd"
        );
    }
    tracing::info!("fsd stopped");
    served.context("gRPC server")
}

/// Resolves on `shutdown`, or when the tracker has stopped for good (then
/// with the reason in `fatal`): either way the server stops, and in the
/// second case fsd exits non-zero.
async fn until_stopped(
    shutdown: impl Future<Output = ()>,
    tracker: Arc<Tracker>,
    fatal: Arc<std::sync::Mutex<Option<String>>>,
) {
    tokio::select! {
        _ = shutdown => {}
        why = tracker.stopped() => {
            tracing::error!(reason = %why, "the tracker stopped for good (a disk full or failing under its databases?); stopping fsd");
            *fatal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            // A graceful stop waits for open streams; a stopped tracker
            // answers nothing useful, so do not wait long for them.
            let _ = std::thread::Builder::new()
                .name("fatal-exit".into())
                .spawn(|| {
                    std::thread::sleep(Duration::from_secs(10));
                    eprintln!("fsd: the tracker stopped for good; exiting");
                    std::process::exit(1);
                });
        }
    }
}

/// The `session-reaper` worker: the leader expires client sessions whose
/// lease ran out, which releases their locks.
struct SessionReaper(Arc<Tracker>);

impl Worker for SessionReaper {
    fn name(&self) -> &'static str {
        "session-reaper"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        self.0.expire_sessions().await?;
        Ok(Duration::from_secs(1))
    }
}

fn render_metrics(tracker: &Tracker, store: &BlockStore, metrics: &Metrics) -> String {
    let mut out = String::new();
    let m = tracker.raft().metrics().borrow().clone();
    let host = format!("{{host=\"{:016x}\"}}", tracker.host_id);
    gauge(
        &mut out,
        "failsafe_build_info",
        "Always 1; the labels say which fsd runs",
        &format!(
            "{{version=\"{}\",protocol=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            failsafe_proto::PROTOCOL_VERSION
        ),
        1,
    );
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
    let (streams, objects) = tracker.lease_sizes();
    gauge(
        &mut out,
        "failsafe_lease_streams",
        "Mounts' lease streams open to this member",
        &host,
        streams,
    );
    gauge(
        &mut out,
        "failsafe_leased_objects",
        "Inodes this member's lease table tracks",
        &host,
        objects,
    );
    let refused = "failsafe_lease_grants_refused_total";
    let _ = writeln!(
        out,
        "# HELP {refused} Leases this member refused a mount's read or read-back, by why\n\
         # TYPE {refused} counter"
    );
    for (why, n) in tracker.lease_refusals() {
        let _ = writeln!(
            out,
            "{refused}{{host=\"{:016x}\",why=\"{why}\"}} {n}",
            tracker.host_id
        );
    }
    let unanswered = "failsafe_lease_renewals_unanswered_total";
    let _ = writeln!(
        out,
        "# HELP {unanswered} Lease renewals left unanswered while this member led without a quorum heard from within its read lease (a busy moment)\n\
         # TYPE {unanswered} counter\n{unanswered}{host} {}",
        tracker.lease_renewals_unanswered()
    );
    let g = tracker.group_counts();
    for (name, help, v) in [
        (
            "failsafe_tracker_entries_total",
            "Log entries this member proposed for commands (group commit)",
            g.entries,
        ),
        (
            "failsafe_tracker_commands_total",
            "Commands in those entries",
            g.commands,
        ),
        (
            "failsafe_tracker_batched_entries_total",
            "Those entries that carried more than one command",
            g.batches,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{host} {v}"
        );
    }
    for (name, help, ns) in [
        (
            "failsafe_tracker_command_wait_seconds_total",
            "Summed over commands: from the proposal to its entry leaving for the log",
            g.waited_ns,
        ),
        (
            "failsafe_tracker_command_seconds_total",
            "Summed over commands: from the proposal to the result",
            g.committed_ns,
        ),
        (
            "failsafe_tracker_entry_seconds_total",
            "Summed over entries: from leaving for the log to applied on this member",
            g.entry_ns,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{host} {:.6}",
            ns as f64 / 1e9
        );
    }
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
        gauge(
            &mut out,
            "failsafe_hosts_down",
            "Hosts with devices that do not answer the leader, down or dead (leader only)",
            "",
            metrics
                .hosts_down
                .load(std::sync::atomic::Ordering::Relaxed),
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
    gauge(
        &mut out,
        "failsafe_tracker_disk_low",
        "1 while the disk under this host's tracker databases is nearly full (its reserve released; as leader it refuses writes)",
        &host,
        u8::from(tracker.space_low()),
    );
    for (session, ms) in tracker.clock_offsets_now() {
        gauge(
            &mut out,
            "failsafe_session_clock_offset_seconds",
            "A web host's clock minus the leader's at its session's last renewal (leader only; one-way delay included)",
            &format!("{{session=\"{session:016x}\"}}"),
            ms as f64 / 1000.0,
        );
    }
    metrics.render(&mut out);
    out
}
