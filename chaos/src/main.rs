//! failsafe-chaos: proves, on one machine, that unplugging a storage host
//! loses nothing and that nobody notices.
//!
//! `failsafe-chaos run SCENARIO.toml --report DIR` builds a cluster (each
//! host in its own network namespace when run as root), mounts it, runs a
//! recorded wiki-like workload, injects the scenario's faults, and checks the
//! history. It exits 0 when the checker found nothing, 1 when it found a
//! violation, 2 when the run itself could not be done.

mod check;
mod http;
mod report;
mod run;
mod scenario;
mod workload;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{CommandFactory, Parser, Subcommand};

use failsafe_harness::netns as net;

use crate::scenario::Scenario;

/// The prefix of every namespace this tool creates; the pid of the run that
/// made it follows, so `cleanup` can tell leftovers of dead runs.
const PREFIX: &str = "fschaos";

#[derive(Parser)]
#[command(
    name = "failsafe-chaos",
    version,
    about = "Fault injection against a real failsafe cluster, with a checker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct RunOpts {
    /// Where summary.txt, report.json, history.jsonl, latency.svg and the logs go.
    #[arg(long, default_value = "chaos-report")]
    report: PathBuf,
    /// Seed for target choices and readers.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run hosts as loopback processes even when namespaces are possible.
    #[arg(long)]
    loopback: bool,
    /// Keep the work directory (data dirs, mount points' caches) afterwards.
    #[arg(long)]
    keep: bool,
    /// Extra mount options for every mount of every scenario (for example
    /// `leases`), after the scenario's own.
    #[arg(long)]
    mount_options: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one or more scenario files (each into REPORT/<name> when several).
    Run {
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        #[command(flatten)]
        opts: RunOpts,
    },
    /// A seeded random fault schedule for a long soak.
    Soak {
        /// Seconds of workload.
        #[arg(long, default_value_t = 3600.0)]
        duration: f64,
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        #[command(flatten)]
        opts: RunOpts,
    },
    /// Remove what runs that were killed left behind (namespaces, mounts, work dirs).
    Cleanup,
}

fn main() -> ExitCode {
    failsafe_cli::generate_if_asked(Cli::command, "1");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    cleanup_stale();
    let (scenarios, opts) = match cli.cmd {
        Cmd::Cleanup => return ExitCode::SUCCESS,
        Cmd::Run { scenarios, opts } => {
            let mut list = Vec::new();
            for p in &scenarios {
                match Scenario::load(p) {
                    Ok(s) => list.push(s),
                    Err(e) => {
                        eprintln!("failsafe-chaos: {e:#}");
                        return ExitCode::from(2);
                    }
                }
            }
            (list, opts)
        }
        Cmd::Soak {
            duration,
            hosts,
            opts,
        } => {
            if !(2..=9).contains(&hosts) {
                eprintln!("failsafe-chaos: --hosts: 2 to 9");
                return ExitCode::from(2);
            }
            (vec![Scenario::random(opts.seed, duration, hosts)], opts)
        }
    };
    let mut scenarios = scenarios;
    if let Some(extra) = opts.mount_options.as_deref().filter(|o| !o.is_empty()) {
        for s in &mut scenarios {
            if !s.mount_options.is_empty() {
                s.mount_options.push(',');
            }
            s.mount_options.push_str(extra);
        }
    }
    let use_net = !opts.loopback
        && match net::available() {
            Ok(()) => true,
            Err(why) => {
                eprintln!("failsafe-chaos: {why}: running hosts as loopback processes; cable, zone and client cuts cannot be injected");
                false
            }
        };
    let several = scenarios.len() > 1;
    let mut code = ExitCode::SUCCESS;
    for s in &scenarios {
        let dir = if several {
            opts.report.join(&s.name)
        } else {
            opts.report.clone()
        };
        match run_one(s, &dir, use_net, &opts) {
            Ok(true) => {}
            Ok(false) => code = ExitCode::from(1),
            Err(e) => {
                eprintln!("failsafe-chaos: {}: {e:#}", s.name);
                return ExitCode::from(2);
            }
        }
        if run::INTERRUPTED.load(Ordering::Relaxed) {
            return ExitCode::from(2);
        }
    }
    code
}

/// Runs one scenario in a fresh world; whether the checker passed it.
fn run_one(s: &Scenario, report_dir: &Path, use_net: bool, opts: &RunOpts) -> anyhow::Result<bool> {
    let work = std::env::temp_dir().join(format!("failsafe-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The network comes first, and this process moves into its switch
    // before any other thread exists: every thread the runtime starts, and
    // every connection it makes, then lives in the test network.
    let net = if use_net {
        let n = net::Net::create(PREFIX, s.zones.len(), s.clients)?;
        net::enter(&n.switch())?;
        Some(n)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        tokio::spawn(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("failsafe-chaos: interrupted; cleaning up");
            run::INTERRUPTED.store(true, Ordering::Relaxed);
        });
        run::run(s, &work, report_dir, net, opts.seed).await
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    let report = result?;
    report.write(report_dir)?;
    print!("{}", report.summary());
    println!("  report: {}", report_dir.display());
    Ok(report.passed())
}

/// Namespaces, mounts and work dirs of runs whose process is gone.
fn cleanup_stale() {
    world::release_stale_stalls();
    for ns in net::stale_namespaces(PREFIX) {
        eprintln!("failsafe-chaos: removing namespace {ns} of a run that is gone");
        let _ = net::ip(&["netns", "del", &ns]);
    }
    let tmp = std::env::temp_dir();
    let Ok(dir) = std::fs::read_dir(&tmp) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("failsafe-chaos-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let prefix = format!("{}/", e.path().display());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut stale: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        stale.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in stale {
            eprintln!("failsafe-chaos: unmounting {m} of a run that is gone");
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}
