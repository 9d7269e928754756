//! fsctl: administer a failsafe cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use failsafe_client::{admin_for, pb, Client, ClientConfig};
use failsafe_fsd::local::{sibling_binary, LocalCluster};
use failsafe_proto::header;

/// Administer a failsafe cluster.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Some members of the cluster, comma-separated host:port.
    #[arg(long, short, env = "FAILSAFE_CLUSTER", default_value = "127.0.0.1:7000", value_delimiter = ',', global = true)]
    cluster: Vec<String>,
    /// Deadline of one request, in ms.
    #[arg(long, default_value_t = 3000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new cluster whose only member is the fsd at ADDR.
    Init { addr: String },
    /// Hosts, zones, addresses, states, leader, term, devices and usage.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Membership.
    #[command(subcommand)]
    Host(HostCmd),
    /// Start a local three-host cluster (zones a, b, c) in the foreground and
    /// show its status; Ctrl-C stops it. Run again on the same DIR to resume.
    Demo {
        #[arg(long, default_value = "failsafe-demo")]
        dir: PathBuf,
        /// The hosts listen on PORT+1, PORT+2, PORT+3.
        #[arg(long, default_value_t = 7100)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Bring the blank fsd at ADDR into the cluster (as learner, then voter).
    Add { addr: String },
    /// Remove a host (by its id, as `status` shows it) from the membership.
    Remove { host_id: String },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fsctl: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("fsctl: {e:#}");
        std::process::exit(1);
    }
}

async fn connect(args: &Args) -> anyhow::Result<Client> {
    let cfg = ClientConfig {
        addrs: args.cluster.clone(),
        rpc_timeout: Duration::from_millis(args.timeout_ms),
        op_deadline: Duration::from_millis(args.timeout_ms * 3),
        name: "fsctl".into(),
        ..ClientConfig::default()
    };
    Client::connect(cfg).await.with_context(|| format!("cannot reach the cluster at {}", args.cluster.join(",")))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    match &args.cmd {
        Cmd::Init { addr } => {
            let r = admin_for(addr, timeout)?
                .init(pb::InitRequest { header: None })
                .await
                .map_err(|s| anyhow::anyhow!("init at {addr}: {}", s.message()))?
                .into_inner();
            println!("created cluster {} with host {:016x} at {addr}", r.cluster_id, r.host_id);
            println!("add hosts with: fsctl --cluster {addr} host add HOST:PORT");
        }
        Cmd::Status { json } => {
            let client = connect(&args).await?;
            let status = client.status().await.context("cannot read the cluster status")?;
            let reach = reachability(&status, timeout.min(Duration::from_millis(800))).await;
            if *json {
                let mut v = serde_json::to_value(&status)?;
                v["reachable"] = serde_json::to_value(&reach)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_status(&status, &reach));
            }
        }
        Cmd::Host(HostCmd::Add { addr }) => {
            let client = connect(&args).await?;
            admin_for(addr, timeout)?
                .adopt(pb::AdoptRequest { header: Some(header("")), cluster_id: client.cluster_id().to_string() })
                .await
                .map_err(|s| anyhow::anyhow!("{addr}: {}", s.message()))?;
            let id = client.add_host(addr).await?;
            println!("host {id:016x} at {addr} is now a member");
        }
        Cmd::Host(HostCmd::Remove { host_id }) => {
            let id = u64::from_str_radix(host_id.trim_start_matches("0x"), 16)
                .with_context(|| format!("{host_id:?} is not a host id (hex, as status shows)"))?;
            let client = connect(&args).await?;
            client.remove_host(id).await?;
            println!("host {id:016x} removed");
        }
        Cmd::Demo { dir, port } => demo(dir, *port).await?,
    }
    Ok(())
}

/// Which hosts answer a hello right now, as seen from here.
async fn reachability(s: &pb::StatusReply, timeout: Duration) -> Vec<(String, bool)> {
    let checks = s.hosts.iter().map(|h| async move {
        let ok = match admin_for(&h.addr, timeout) {
            Ok(mut a) => {
                matches!(tokio::time::timeout(timeout, a.hello(pb::HelloRequest { header: Some(header("")) })).await, Ok(Ok(_)))
            }
            Err(_) => false,
        };
        (format!("{:016x}", h.host_id), ok)
    });
    futures::future::join_all(checks).await
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn render_status(s: &pb::StatusReply, reach: &[(String, bool)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = if s.leader_id == 0 { "none".to_string() } else { format!("{:016x} ({})", s.leader_id, s.leader_addr) };
    let _ = writeln!(out, "cluster {}", s.cluster_id);
    let _ = writeln!(out, "leader  {leader}   term {}   log {}   applied {}", s.term, s.last_log_index, s.last_applied);
    let _ = writeln!(out, "files   {}   blocks {}\n", s.files, s.blocks);
    let _ = writeln!(out, "{:<18} {:<8} {:<22} {:<10} {:<6} {:<12}", "HOST", "ZONE", "ADDRESS", "ROLE", "VOTER", "REACHABLE");
    for h in &s.hosts {
        let id = format!("{:016x}", h.host_id);
        let up = reach.iter().find(|(r, _)| *r == id).map_or("?", |(_, ok)| if *ok { "up" } else { "DOWN" });
        let _ = writeln!(
            out,
            "{id:<18} {:<8} {:<22} {:<10} {:<6} {up:<12}",
            h.zone,
            h.addr,
            h.state,
            if h.voter { "yes" } else { "no" }
        );
    }
    let _ = writeln!(out, "\n{:<18} {:<18} {:>10} {:>10} {:>10} {:>8}  PATH", "DEVICE", "HOST", "USED", "FREE", "CAPACITY", "BLOCKS");
    for d in &s.devices {
        let _ = writeln!(
            out,
            "{:016x}   {:016x}   {:>10} {:>10} {:>10} {:>8}  {}",
            d.device_id,
            d.host_id,
            bytes(d.used_bytes),
            bytes(d.free_bytes),
            bytes(d.capacity_bytes),
            d.blocks,
            d.path
        );
    }
    out
}

async fn demo(dir: &std::path::Path, port: u16) -> anyhow::Result<()> {
    let fsd = sibling_binary("fsd")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let existing = std::fs::read_to_string(dir.join("host-a/cluster.id")).ok().map(|s| s.trim().to_string());
    let mut cluster = LocalCluster::start(&dir, &["a", "b", "c"], &fsd, port + 1, &[])?;
    match existing.filter(|s| !s.is_empty()) {
        Some(id) => {
            cluster.cluster_id = id;
            cluster
                .wait_for(Duration::from_secs(30), "a leader", |s| s.leader_id != 0)
                .await
                .context("the cluster in this directory did not come back")?;
        }
        None => {
            cluster.bootstrap().await?;
        }
    }
    let client = cluster.client().await?;
    let status = client.status().await?;
    let reach = reachability(&status, Duration::from_millis(800)).await;
    print!("{}", render_status(&status, &reach));
    let pids: Vec<String> =
        cluster.hosts.iter().map(|h| format!("{}={}", h.zone, h.pid().unwrap_or(0))).collect();
    println!("\nready: cluster {} hosts {} pids {}", cluster.cluster_id, cluster.addrs().join(","), pids.join(","));
    println!("try:   kill -9 {}   then   fsctl --cluster {} status", cluster.hosts[0].pid().unwrap_or(0), cluster.addrs().join(","));
    println!("logs:  {}/host-*/fsd.log   stop with Ctrl-C", dir.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping the hosts");
    cluster.stop_all();
    Ok(())
}
