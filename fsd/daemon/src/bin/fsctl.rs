//! fsctl: administer a failsafe cluster.

use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use failsafe_client::{admin_at, admin_for, pb, Client, ClientConfig};
use failsafe_fsd::kept_cmd::{self, SnapshotCmd, TrashCmd};
use failsafe_fsd::status_text::{
    bytes, device_state, duration, host_state, kept_line, mode_line, work,
};
use failsafe_proto::header;
use failsafe_tls::{Authority, Credential, Expect, Grant, Tls, DEFAULT_DAYS};

/// Administer a failsafe cluster.
#[derive(Parser)]
#[command(name = "fsctl", version)]
struct Args {
    /// Some members of the cluster, comma-separated host:port.
    #[arg(
        long,
        short,
        env = "FAILSAFE_CLUSTER",
        default_value = "127.0.0.1:7000",
        value_delimiter = ',',
        global = true
    )]
    cluster: Vec<String>,
    /// Deadline of one request, in ms.
    #[arg(long, default_value_t = 3000, global = true)]
    timeout_ms: u64,
    /// Where the cluster's CA lives (ca.key, ca.crt, admin.cred, issued.log):
    /// on the admin's machine, readable by root only.
    #[arg(
        long,
        env = "FAILSAFE_CA",
        default_value = "/etc/failsafe/ca",
        global = true
    )]
    ca_dir: std::path::PathBuf,
    /// The admin credential fsctl presents. Default: CA_DIR/admin.cred.
    #[arg(long, env = "FAILSAFE_CRED", global = true)]
    cred: Option<std::path::PathBuf>,
    /// Plaintext without a credential, for a cluster run with --insecure.
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

impl Args {
    /// How fsctl talks to the cluster.
    fn tls(&self) -> anyhow::Result<Tls> {
        if self.insecure {
            return Ok(Tls::Insecure);
        }
        let path = self
            .cred
            .clone()
            .unwrap_or_else(|| self.ca_dir.join("admin.cred"));
        let cred = Credential::load(&path).with_context(|| {
            format!(
                "fsctl needs an admin credential: {} (`fsctl host cert` creates the CA and it \
                 in --ca-dir; or --cred FILE)",
                path.display()
            )
        })?;
        cred.check_current()?;
        Tls::new(cred)
    }

    /// The CA, created (with an admin credential) when there is none yet.
    fn authority(&self) -> anyhow::Result<Authority> {
        let fresh = !self.ca_dir.join("ca.key").exists();
        let ca = Authority::open_or_create(&self.ca_dir)?;
        if fresh {
            let admin = ca.issue(&Grant::admin("admin")?, DEFAULT_DAYS)?;
            let path = self.ca_dir.join("admin.cred");
            admin.save(&path)?;
            eprintln!("wrote the admin credential fsctl uses: {}", path.display());
        }
        Ok(ca)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new cluster whose only member is the fsd at ADDR.
    Init { addr: String },
    /// Whether the cluster is fail-safe or limping; hosts, zones, addresses,
    /// roles, up/down as the leader sees them, reachability from here;
    /// leader, term, repair, scrub and gc workers, devices (ok, full or
    /// gone) and usage. Exits 0 when the cluster is fail-safe, 1 when it
    /// limps (or the member answering cannot tell), 2 when it cannot be
    /// reached.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Membership and host credentials.
    #[command(subcommand)]
    Host(HostCmd),
    /// Credentials for mounts (web hosts).
    #[command(subcommand)]
    Client(ClientCmd),
    /// Deleted and replaced files, kept for a while: list, restore, purge,
    /// and the policy (how long, how much, which paths never).
    #[command(subcommand)]
    Trash(TrashCmd),
    /// Point-in-time copies of the namespace, readable on every mount
    /// under .snapshots/NAME/.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Issue a credential for a mount: `mount.failsafe -o cred=FILE`.
    Add {
        /// A name for it (a web host's): letters, digits, '-', '_', '.'.
        name: String,
        /// Confine it to this subtree, which it sees as its root.
        #[arg(long, default_value = "/")]
        subdir: String,
        /// It may read, never change anything.
        #[arg(long)]
        read_only: bool,
        /// Valid for this many days.
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
        /// Where to write it (only its owner may read it). Default NAME.cred.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Revoke every credential issued to client NAME (as `issued.log` in
    /// --ca-dir records them): every member refuses it within a second.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Renew a host's certificate before it expires, its key staying on
    /// the host: the host sends a signing request, fsctl signs it with the
    /// CA, the host checks, stores and uses it at once (no restart).
    Renew {
        host_id: String,
        /// Valid for this many days.
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
    },
    /// Revoke a host's credential (a lost or stolen box): every member
    /// refuses its key within a second, and its key is no longer pinned,
    /// so the host id may come back with a new credential. Remove the host
    /// too unless it is coming back.
    Revoke { host_id: String },
    /// Issue a host's credential (creating the cluster's CA first, if there
    /// is none in --ca-dir). Copy it to the host and start fsd with
    /// `--cred FILE` (default DATA_DIR/host.cred).
    Cert {
        /// Where to write it (only its owner may read it).
        #[arg(long)]
        out: std::path::PathBuf,
        /// For an existing host (a new certificate, e.g. before the old one
        /// expires), by its id as `status` shows it; default: a new host.
        #[arg(long)]
        host_id: Option<String>,
        /// Valid for this many days.
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
        /// Sign the request a new host made at its first start (its
        /// DATA_DIR/host.csr) instead: the key stays on the host, and the
        /// file written holds the certificates only.
        #[arg(long)]
        csr: Option<std::path::PathBuf>,
    },
    /// Bring the blank fsd at ADDR into the cluster (as learner, then voter).
    Add { addr: String },
    /// Remove a host (by its id, as `status` shows it) from the cluster.
    /// Refused while that would leave a block below its copy count.
    Remove {
        host_id: String,
        /// Remove it even so.
        #[arg(long)]
        force: bool,
    },
    /// Move a host's copies and tracker membership away (a box retired in
    /// a live migration): it takes no new copies, repair copies what it
    /// holds elsewhere, and once nothing depends on it, it is removed (if it
    /// leads, leadership moves on as it leaves). Shows progress; follow it
    /// from another terminal with `fsctl status`.
    Drain {
        host_id: String,
        /// Start the drain and return; remove the host later yourself.
        #[arg(long)]
        no_wait: bool,
    },
    /// Planned absence (the box is shipped): first proves every block the
    /// host holds has enough copies elsewhere (else refuses and names the
    /// files at risk), then marks it away, so its absence starts no
    /// re-replication. Back at any address, it catches up by deltas and
    /// verifies its blocks before it serves reads again.
    Ship {
        host_id: String,
        /// How long it may stay away before it counts as dead, in hours.
        #[arg(long, default_value_t = 168)]
        hours: u64,
        /// Ship even with files at risk.
        #[arg(long)]
        force: bool,
    },
}

/// The keys of the credentials `issued.log` in `ca_dir` records for `who`
/// (`client web1`).
fn issued_keys(ca_dir: &std::path::Path, who: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let path = ca_dir.join("issued.log");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let key = f.next()?;
            (f.next()? == who).then_some(key)
        })
        .map(|k| hex::decode(k).with_context(|| format!("{}: a bad key id", path.display())))
        .collect()
}

fn parse_host_id(host_id: &str) -> anyhow::Result<u64> {
    u64::from_str_radix(host_id.trim_start_matches("0x"), 16)
        .with_context(|| format!("{host_id:?} is not a host id (hex, as status shows)"))
}

fn main() {
    failsafe_cli::generate_if_asked(Args::command, "8");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fsctl: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
            std::process::exit(*code);
        }
        eprintln!("fsctl: {e:#}");
        std::process::exit(1);
    }
}

/// An outcome that is not a failure of fsctl but must show in its exit
/// status, already reported: `status` exits 1 when the cluster limps (or
/// its mode is unknown) and 2 when it cannot be reached, so a monitoring
/// check or a script can act on it.
#[derive(Debug)]
struct Exit(i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Reports `e` and makes fsctl exit 2: the cluster could not be reached.
fn unreachable(e: anyhow::Error) -> anyhow::Error {
    eprintln!("fsctl: {e:#}");
    Exit(2).into()
}

async fn connect(args: &Args) -> anyhow::Result<Client> {
    let cfg = ClientConfig {
        addrs: args.cluster.clone(),
        rpc_timeout: Duration::from_millis(args.timeout_ms),
        op_deadline: Duration::from_millis(args.timeout_ms * 3),
        name: "fsctl".into(),
        tls: args.tls()?,
        ..ClientConfig::default()
    };
    Client::connect(cfg)
        .await
        .with_context(|| format!("cannot reach the cluster at {}", args.cluster.join(",")))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    match &args.cmd {
        Cmd::Init { addr } => {
            let r = admin_for(addr, &args.tls()?, timeout)?
                .init(pb::InitRequest { header: None })
                .await
                .map_err(|s| anyhow::anyhow!("init at {addr}: {}", s.message()))?
                .into_inner();
            println!(
                "created cluster {} with host {:016x} at {addr}",
                r.cluster_id, r.host_id
            );
            println!("add hosts with: fsctl --cluster {addr} host add HOST:PORT");
        }
        Cmd::Status { json } => {
            let client = connect(&args).await.map_err(unreachable)?;
            let status = client
                .status()
                .await
                .context("cannot read the cluster status")
                .map_err(unreachable)?;
            let reach = reachability(
                &status,
                &args.tls()?,
                timeout.min(Duration::from_millis(800)),
            )
            .await;
            if *json {
                let mut v = serde_json::to_value(&status)?;
                v["reachable"] = serde_json::to_value(&reach)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_status(&status, &reach));
            }
            if status.mode() != pb::ClusterMode::FailSafe {
                return Err(Exit(1).into());
            }
        }
        Cmd::Host(HostCmd::Add { addr }) => {
            let client = connect(&args).await?;
            admin_for(addr, &args.tls()?, timeout)?
                .adopt(pb::AdoptRequest {
                    header: Some(header("")),
                    cluster_id: client.cluster_id().to_string(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{addr}: {}", s.message()))?;
            let id = client.add_host(addr).await?;
            println!("host {id:016x} at {addr} is now a member");
        }
        Cmd::Host(HostCmd::Cert {
            out,
            host_id,
            days,
            csr,
        }) => {
            let id = match host_id {
                Some(h) => parse_host_id(h)?,
                // Below 2^63, so it reads the same in any tool.
                None => (rand::random::<u64>() >> 1).max(1),
            };
            if let Some(csr) = csr {
                let request = std::fs::read_to_string(csr)
                    .with_context(|| format!("reading {}", csr.display()))?;
                let certs = args
                    .authority()?
                    .sign_request(&request, &Grant::member(id), *days)?;
                std::fs::write(out, certs).with_context(|| format!("writing {}", out.display()))?;
                println!(
                    "wrote {}: host {id:016x}, its key staying on the host; put it at \
                     DATA_DIR/host.cred beside host.key and start fsd again",
                    out.display()
                );
                return Ok(());
            }
            let cred = args.authority()?.issue(&Grant::member(id), *days)?;
            cred.save(out)?;
            println!(
                "wrote {}: host {id:016x}, valid until {}; copy it to the host and start \
                 fsd with --cred (default DATA_DIR/host.cred)",
                out.display(),
                cred.expires_text()
            );
        }
        Cmd::Client(ClientCmd::Add {
            name,
            subdir,
            read_only,
            days,
            out,
        }) => {
            let grant = Grant::client(name, subdir, *read_only)?;
            let cred = args.authority()?.issue(&grant, *days)?;
            let out = out.clone().unwrap_or_else(|| format!("{name}.cred").into());
            cred.save(&out)?;
            println!(
                "wrote {}: client {name}{}{}, valid until {}; mount with -o cred={}",
                out.display(),
                if subdir != "/" {
                    format!(", subtree {subdir}")
                } else {
                    String::new()
                },
                if *read_only { ", read-only" } else { "" },
                cred.expires_text(),
                out.display()
            );
        }
        Cmd::Host(HostCmd::Renew { host_id, days }) => {
            let id = parse_host_id(host_id)?;
            let client = connect(&args).await?;
            let status = client.status().await?;
            let row = status
                .hosts
                .iter()
                .find(|h| h.host_id == id)
                .with_context(|| format!("no host {id:016x} in the cluster"))?;
            let ca = args.authority()?;
            // Its certificate must name it: the request is signed for
            // that host alone.
            let mut admin = admin_at(&row.addr, &args.tls()?, Expect::Host(id), timeout)?;
            let req = admin
                .request_certificate(pb::CertificateRequest {
                    header: Some(header(client.cluster_id())),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", row.addr, s.message()))?
                .into_inner();
            anyhow::ensure!(
                req.host_id == id,
                "{} is host {:016x}, not {id:016x}",
                row.addr,
                req.host_id
            );
            let cert_pem = ca.renew(&req.csr_pem, &Grant::member(id), *days)?;
            let done = admin
                .install_certificate(pb::InstallCertificateRequest {
                    header: Some(header(client.cluster_id())),
                    cert_pem,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", row.addr, s.message()))?
                .into_inner();
            println!(
                "host {id:016x}'s certificate is renewed until {}",
                done.expires
            );
        }
        Cmd::Trash(cmd) => kept_cmd::trash(&connect(&args).await?, cmd).await?,
        Cmd::Snapshot(cmd) => kept_cmd::snapshot(&connect(&args).await?, cmd).await?,
        Cmd::Host(HostCmd::Revoke { host_id }) => {
            let id = parse_host_id(host_id)?;
            let client = connect(&args).await?;
            client
                .mutate(pb::command::Op::Revoke(pb::Revoke {
                    key_id: Vec::new(),
                    host_id: id,
                    who: format!("member {id:016x}"),
                }))
                .await?;
            println!("host {id:016x}'s credential is revoked");
        }
        Cmd::Client(ClientCmd::Revoke { name }) => {
            let keys = issued_keys(&args.ca_dir, &format!("client {name}"))?;
            anyhow::ensure!(
                !keys.is_empty(),
                "{} records no credential for client {name}",
                args.ca_dir.join("issued.log").display()
            );
            let client = connect(&args).await?;
            for key in &keys {
                client
                    .mutate(pb::command::Op::Revoke(pb::Revoke {
                        key_id: key.clone(),
                        host_id: 0,
                        who: format!("client {name}"),
                    }))
                    .await?;
            }
            println!("revoked {} credential(s) of client {name}", keys.len());
        }
        Cmd::Host(HostCmd::Ship {
            host_id,
            hours,
            force,
        }) => {
            let id = parse_host_id(host_id)?;
            let client = connect(&args).await?;
            let r = client
                .ship_host(id, hours.saturating_mul(3_600_000), *force)
                .await?;
            if !r.shipped {
                eprintln!("refusing to ship host {id:016x}: these files have a block with too few live copies elsewhere:");
                for f in &r.at_risk {
                    eprintln!("  {f}");
                }
                anyhow::bail!("not shipped (wait for repair to finish, or --force)");
            }
            if !r.at_risk.is_empty() {
                eprintln!(
                    "warning: shipped with {} files at risk (--force)",
                    r.at_risk.len()
                );
            }
            println!(
                "host {id:016x} may now be shut down and shipped: its {} blocks have enough copies elsewhere; \
                 its absence starts no re-replication for {hours} h. Start it anywhere to bring it back.",
                r.blocks_held
            );
        }
        Cmd::Host(HostCmd::Remove { host_id, force }) => {
            let id = parse_host_id(host_id)?;
            let client = connect(&args).await?;
            client.remove_host(id, *force).await?;
            println!("host {id:016x} removed");
        }
        Cmd::Host(HostCmd::Drain { host_id, no_wait }) => {
            let id = parse_host_id(host_id)?;
            let client = connect(&args).await?;
            let r = client.drain_host(id).await?;
            println!(
                "draining host {id:016x}: {} blocks held, {} to copy elsewhere",
                r.blocks_held, r.to_move
            );
            if *no_wait {
                return Ok(());
            }
            let bar = indicatif::ProgressBar::new(r.to_move.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} blocks moved, {elapsed} elapsed, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            loop {
                let s = client.status().await?;
                let Some(row) = s.hosts.iter().find(|h| h.host_id == id) else {
                    anyhow::bail!("host {id:016x} is gone")
                };
                if s.leader_id != 0
                    && row.admin() == pb::HostAdminState::Draining
                    && s.role == "leader"
                {
                    bar.set_position(r.to_move.saturating_sub(row.to_move));
                    if row.to_move == 0 {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            bar.finish();
            client.remove_host(id, false).await?;
            println!("host {id:016x} drained and removed");
        }
    }
    Ok(())
}

/// Which hosts answer a hello right now, as seen from here.
async fn reachability(s: &pb::StatusReply, tls: &Tls, timeout: Duration) -> Vec<(String, bool)> {
    let checks = s.hosts.iter().map(|h| async move {
        let ok = match admin_for(&h.addr, tls, timeout) {
            Ok(mut a) => {
                matches!(
                    tokio::time::timeout(
                        timeout,
                        a.hello(pb::HelloRequest {
                            header: Some(header(""))
                        })
                    )
                    .await,
                    Ok(Ok(_))
                )
            }
            Err(_) => false,
        };
        (format!("{:016x}", h.host_id), ok)
    });
    futures::future::join_all(checks).await
}

fn render_status(s: &pb::StatusReply, reach: &[(String, bool)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = if s.leader_id == 0 {
        "none".to_string()
    } else {
        format!("{:016x} ({})", s.leader_id, s.leader_addr)
    };
    let _ = writeln!(out, "cluster {}", s.cluster_id);
    let _ = writeln!(out, "{}", mode_line(s));
    let _ = writeln!(
        out,
        "leader  {leader}   term {}   log {}   applied {}",
        s.term, s.last_log_index, s.last_applied
    );
    let _ = writeln!(
        out,
        "files   {}   blocks {}   {}",
        s.files,
        s.blocks,
        kept_line(s)
    );
    for (worker, state, did) in work(s) {
        let _ = writeln!(out, "{worker:<7} {state}   {did}");
    }
    if let Some(p) = &s.leader_placement {
        let _ = writeln!(out, "leader placement  {}", p.state);
        let total: u64 = p.writes.iter().map(|w| w.writes).sum();
        if total > 0 {
            let shares: Vec<String> = p
                .writes
                .iter()
                .map(|w| format!("{} {}%", w.zone, w.writes * 100 / total))
                .collect();
            let _ = writeln!(
                out,
                "writes  {}   ({total} in the last {})",
                shares.join(", "),
                duration(p.window_ms)
            );
        }
    }
    for w in &s.warnings {
        let _ = writeln!(out, "WARNING  {w}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<18} {:<8} {:<22} {:<10} {:<6} {:<12} {:<10}",
        "HOST", "ZONE", "ADDRESS", "ROLE", "VOTER", "STATE", "REACHABLE"
    );
    for h in &s.hosts {
        let id = format!("{:016x}", h.host_id);
        let up = reach
            .iter()
            .find(|(r, _)| *r == id)
            .map_or("?", |(_, ok)| if *ok { "up" } else { "DOWN" });
        let state = host_state(h);
        let _ = writeln!(
            out,
            "{id:<18} {:<8} {:<22} {:<10} {:<6} {state:<12} {up:<10}",
            h.zone,
            h.addr,
            h.role,
            if h.voter { "yes" } else { "no" }
        );
    }
    let _ = writeln!(
        out,
        "\n{:<18} {:<18} {:<5} {:>10} {:>10} {:>10} {:>8}  PATH",
        "DEVICE", "HOST", "STATE", "USED", "FREE", "CAPACITY", "BLOCKS"
    );
    for d in &s.devices {
        let state = device_state(d);
        let _ = writeln!(
            out,
            "{:016x}   {:016x}   {state:<5} {:>10} {:>10} {:>10} {:>8}  {}",
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
