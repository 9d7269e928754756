//! failsafe-bench: one command that runs the same workloads, in one sitting,
//! on a local directory, a bindfs passthrough of a local directory and a
//! failsafe mount of a fresh three-host loopback cluster, all on the same
//! disk; prints a table, writes every number to a JSON file and writes
//! `BENCHMARKS.md`. Needs root (FUSE mounts, dropping caches).
//!
//! The workloads are in `workloads.rs`, the targets in `targets.rs`, the
//! report in `report.rs`, the cities runs (`--cities`: hosts in network
//! namespaces behind latency relays) in `cities.rs`, Debian's DokuWiki on
//! a local directory and on failsafe (on by default; `--only dokuwiki`) in
//! `dokuwiki.rs`. Round trips per operation come from the mount's
//! `stats=PATH` file when the mount has that option.

mod api;
mod cities;
mod dokuwiki;
mod report;
mod targets;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use targets::{Snapshot, Target};
use workloads::Timed;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark a local directory, a bindfs passthrough and a failsafe mount side by side",
    long_about = "Runs the same workloads, in one sitting, on a local directory, a bindfs \
passthrough of a local directory (installed with apt-get if missing) and a failsafe mount of a \
fresh three-host loopback cluster, all under --dir on one disk. Prints a table, writes every \
number to --json and the report to --report. Needs root: FUSE mounts, dropping caches."
)]
struct Args {
    /// Small sizes and short runs (seconds, not minutes): what the tests use.
    #[arg(long)]
    quick: bool,
    /// Targets to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "local,bindfs,failsafe")]
    targets: Vec<TargetName>,
    /// Where the targets keep their data (default: a new temporary
    /// directory under $TMPDIR, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per rate measurement (page saves, warm page reads) [default:
    /// 10; --quick: 0.3].
    #[arg(long)]
    seconds: Option<f64>,
    /// Writers of the concurrent page-save row.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Page size in KiB (saves and reads).
    #[arg(long, default_value_t = 8)]
    page_kib: usize,
    /// Pages read by the page-read rows [default: 1000; --quick: 16].
    #[arg(long)]
    pages: Option<usize>,
    /// Files of the create, `ls -l` and delete rows [default: 10000;
    /// --quick: 50].
    #[arg(long)]
    files: Option<usize>,
    /// Size of each of those files, in KiB.
    #[arg(long, default_value_t = 1)]
    file_kib: usize,
    /// MiB of the streaming write and read [default: 1024; --quick: 4].
    #[arg(long)]
    stream_mib: Option<u64>,
    /// Seconds per row of the cluster-API section (no FUSE) [default: 3;
    /// --quick: 0.2]; 0 skips it.
    #[arg(long)]
    api_seconds: Option<f64>,
    /// Round trips per operation from the mount's `stats=PATH` file: auto
    /// uses it when `mount-failsafe --help` lists the option.
    #[arg(long, value_enum, default_value_t = RoundTrips::Auto)]
    round_trips: RoundTrips,
    /// Also run page save, `stat` and open+read with the hosts in three
    /// cities RTT_MS apart (a round trip; each link delays RTT_MS/2 one
    /// way), from a mount in the leader's city and one in another. Needs
    /// root and iproute2 (network namespaces, a latency relay per host).
    #[arg(long)]
    cities: bool,
    /// Round trip between two cities, in ms, for --cities (0 within a city).
    #[arg(long, default_value_t = 20)]
    rtt_ms: u32,
    /// Page saves per mount for --cities [default: 20; --quick: 3].
    #[arg(long)]
    city_saves: Option<usize>,
    /// `stat`s and open+reads per mount for --cities [default: 50; --quick: 5].
    #[arg(long)]
    city_reads: Option<usize>,
    /// With --cities: fsd moves the tracker leader to the city doing most
    /// of the writing (a 2-minute window); after the usual rows, mount B
    /// saves until the leader is in its city, and its page saves are
    /// measured again ("the city the leader moved to").
    #[arg(long)]
    city_follow_writers: bool,
    /// Skip the DokuWiki section (Debian's DokuWiki, lighttpd and php-cgi on
    /// a local directory and on a failsafe mount; with --cities, page views
    /// from a city without the leader).
    #[arg(long)]
    no_dokuwiki: bool,
    /// Run only this section (and, with --cities, only its cities row);
    /// prints its report and writes files only where --json and --report
    /// say.
    #[arg(long, value_enum)]
    only: Option<Section>,
    /// DokuWiki: measured seconds [default: 20; --quick: 2].
    #[arg(long)]
    doku_seconds: Option<f64>,
    /// DokuWiki: seconds of the same load before the measured ones
    /// [default: 5; --quick: 1].
    #[arg(long)]
    doku_warmup: Option<f64>,
    /// DokuWiki: editors (threads editing their own pages through the forms).
    #[arg(long, default_value_t = 4)]
    doku_editors: usize,
    /// DokuWiki: readers (threads viewing pages).
    #[arg(long, default_value_t = 4)]
    doku_readers: usize,
    /// DokuWiki: php-cgi workers (PHP_FCGI_CHILDREN), the same on every target.
    #[arg(long, default_value_t = 8)]
    doku_php_children: u32,
    /// DokuWiki: page views of unchanged pages, one at a time, for the
    /// profile (and from the city without the leader) [default: 100;
    /// --quick: 8].
    #[arg(long)]
    doku_views: Option<usize>,
    /// DokuWiki: edit cycles, one at a time, for the profile [default: 5;
    /// --quick: 2].
    #[arg(long)]
    doku_edits: Option<usize>,
    /// Do not apt-get install bindfs when it is missing.
    #[arg(long)]
    no_install: bool,
    /// Where to write every number [default: bench/results.json; with
    /// --only: not written].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the report [default: BENCHMARKS.md; with --only: not
    /// written].
    #[arg(long)]
    report: Option<PathBuf>,
    /// A note for the report (why this run, what else ran on the machine).
    #[arg(long)]
    note: Option<String>,
    /// More `-o` options for every failsafe mount (comma-separated, e.g.
    /// `writebehind`); the report's setup lines show them.
    #[arg(long, default_value = "")]
    mount_options: String,
    /// Run the failsafe hosts and mounts --insecure (plaintext, no
    /// credentials): what TLS costs is the difference to a run without.
    #[arg(long)]
    insecure: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetName {
    Local,
    Bindfs,
    Failsafe,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Dokuwiki,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoundTrips {
    Auto,
    On,
    Off,
}

/// Sizes after --quick and the explicit flags.
pub(crate) struct Config {
    pub(crate) quick: bool,
    pub(crate) seconds: f64,
    pub(crate) writers: usize,
    pub(crate) page_bytes: usize,
    pub(crate) pages: usize,
    pub(crate) files: usize,
    pub(crate) file_bytes: usize,
    pub(crate) stream_bytes: u64,
    pub(crate) api_seconds: f64,
}

impl Config {
    fn from(a: &Args) -> Config {
        let q = a.quick;
        Config {
            quick: q,
            seconds: a.seconds.unwrap_or(if q { 0.3 } else { 10.0 }),
            writers: a.writers.max(1),
            page_bytes: a.page_kib * 1024,
            pages: a.pages.unwrap_or(if q { 16 } else { 1000 }).max(1),
            files: a.files.unwrap_or(if q { 50 } else { 10_000 }),
            file_bytes: a.file_kib * 1024,
            stream_bytes: a.stream_mib.unwrap_or(if q { 4 } else { 1024 }) << 20,
            api_seconds: a.api_seconds.unwrap_or(if q { 0.2 } else { 3.0 }),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "seconds_per_rate": self.seconds,
            "writers": self.writers,
            "page_bytes": self.page_bytes,
            "pages": self.pages,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "stream_bytes": self.stream_bytes,
            "api_seconds": self.api_seconds,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Operations per second: higher is better.
    OpsPerSec,
    /// Seconds for the whole job: lower is better.
    Seconds,
    /// 10^6 bytes per second: higher is better.
    MBPerSec,
}

impl Unit {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Unit::OpsPerSec => "ops/s",
            Unit::Seconds => "s",
            Unit::MBPerSec => "MB/s",
        }
    }
}

/// One row of the table.
pub(crate) struct Workload {
    pub(crate) id: &'static str,
    pub(crate) title: String,
    pub(crate) unit: Unit,
    /// What the round trips are counted per ("save", "file", "MiB").
    pub(crate) per: &'static str,
}

/// One cell: a target's result for a workload.
pub(crate) struct Measured {
    pub(crate) value: f64,
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    pub(crate) note: String,
    pub(crate) round_trips: Option<RoundTripCount>,
}

/// Round trips per operation from the mount's stats file (see
/// `round_trips_between`).
pub(crate) struct RoundTripCount {
    pub(crate) round_trips_per_op: Option<f64>,
    pub(crate) rpcs_per_op: Option<f64>,
    /// Every counter's change over the timed part.
    pub(crate) delta: BTreeMap<String, f64>,
}

pub(crate) type Cell = Result<Measured, String>;

fn workloads(c: &Config) -> Vec<Workload> {
    let kib = c.page_bytes / 1024;
    let files = thousands(c.files as u64);
    let stream = if c.stream_bytes >= 1 << 30 && c.stream_bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", c.stream_bytes >> 30)
    } else {
        format!("{} MiB", c.stream_bytes >> 20)
    };
    let w = |id, title: String, unit, per| Workload {
        id,
        title,
        unit,
        per,
    };
    vec![
        w(
            "page_save_1",
            "page save, 1 writer".into(),
            Unit::OpsPerSec,
            "save",
        ),
        w(
            "page_save_n",
            format!("page save, {} writers", c.writers),
            Unit::OpsPerSec,
            "save",
        ),
        w(
            "page_read_warm",
            format!("page read {kib} KiB, warm"),
            Unit::OpsPerSec,
            "read",
        ),
        w(
            "page_read_cold",
            format!("page read {kib} KiB, cold"),
            Unit::OpsPerSec,
            "read",
        ),
        w(
            "create",
            format!("create {files} files of {} KiB", c.file_bytes / 1024),
            Unit::Seconds,
            "file",
        ),
        w(
            "ls_cold",
            format!("`ls -l` of {files} files, cold"),
            Unit::Seconds,
            "file",
        ),
        w(
            "ls_warm",
            format!("`ls -l` of {files} files, warm"),
            Unit::Seconds,
            "file",
        ),
        w(
            "delete",
            format!("delete {files} files"),
            Unit::Seconds,
            "file",
        ),
        w(
            "stream_write",
            format!("stream write {stream} + fsync"),
            Unit::MBPerSec,
            "MiB",
        ),
        w(
            "stream_read",
            format!("stream read {stream}, cold"),
            Unit::MBPerSec,
            "MiB",
        ),
    ]
}

pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Sums every number under an object key named `key`, at any depth.
fn sum_key(v: &Value, key: &str) -> Option<f64> {
    match v {
        Value::Object(m) => {
            let mut total = None;
            for (k, x) in m {
                let part = if k == key { x.as_f64() } else { None }.or_else(|| sum_key(x, key));
                if let Some(p) = part {
                    *total.get_or_insert(0.0) += p;
                }
            }
            total
        }
        Value::Array(a) => a
            .iter()
            .filter_map(|x| sum_key(x, key))
            .reduce(|a, b| a + b),
        _ => None,
    }
}

fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(x, &p, out);
            }
        }
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

/// The round trips of the timed part of a workload, per operation.
///
/// The contract with the mount's `stats=PATH` (issue 11, "Count the round
/// trips"): PATH holds one JSON object, rewritten as the mount runs, whose
/// counters only grow while the mount lives, with the sequential round trips
/// to the cluster under keys named `round_trips` and the RPCs sent under
/// keys named `rpcs`, at any depth (for example one object per FUSE
/// operation). The bench sums each kind, takes the difference over the
/// timed part and divides by the operations done. A fresh mount (the cold
/// rows) starts from zero.
pub(crate) fn round_trips_between(
    before: Option<&Snapshot>,
    after: Option<&Snapshot>,
    per: f64,
) -> Option<RoundTripCount> {
    let after = after?;
    let zero = json!({});
    let before = before.unwrap_or(&zero);
    let diff = |key| match (sum_key(after, key), sum_key(before, key)) {
        (Some(a), b) if per > 0.0 => Some((a - b.unwrap_or(0.0)) / per),
        _ => None,
    };
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(after, "", &mut a);
    flatten(before, "", &mut b);
    let delta = a
        .into_iter()
        .map(|(k, v)| {
            let d = v - b.get(&k).copied().unwrap_or(0.0);
            (k, d)
        })
        .filter(|(_, d)| *d != 0.0)
        .collect();
    Some(RoundTripCount {
        round_trips_per_op: diff("round_trips"),
        rpcs_per_op: diff("rpcs"),
        delta,
    })
}

fn measure(w: &Workload, t: Timed) -> Measured {
    let value = match w.unit {
        Unit::OpsPerSec => t.ops as f64 / t.secs.max(1e-9),
        Unit::Seconds => t.secs,
        Unit::MBPerSec => t.ops as f64 / 1e6 / t.secs.max(1e-9),
    };
    let per = if w.unit == Unit::MBPerSec {
        t.ops as f64 / (1u64 << 20) as f64
    } else {
        t.ops as f64
    };
    Measured {
        value,
        ops: t.ops,
        secs: t.secs,
        note: t.note.clone(),
        round_trips: round_trips_between(t.before.as_ref(), t.after.as_ref(), per),
    }
}

/// Every workload on one target, in order; a failed workload is recorded
/// and the next one runs.
fn run_target(
    t: &mut Target,
    c: &Config,
    ws: &[Workload],
    cells: &mut BTreeMap<(&'static str, &'static str), Cell>,
) {
    let name = t.name;
    let mut read_pages_ready: Option<Result<(), String>> = None;
    for w in ws {
        eprintln!("failsafe-bench: {name}: {} ...", w.title);
        let timed = match w.id {
            "page_save_1" => workloads::page_save(t, 1, c.page_bytes, c.seconds),
            "page_save_n" => workloads::page_save(t, c.writers, c.page_bytes, c.seconds),
            "page_read_warm" | "page_read_cold" => {
                let ready = read_pages_ready.get_or_insert_with(|| {
                    workloads::make_read_pages(t, c.pages, c.page_bytes)
                        .map_err(|e| format!("creating the pages: {e:#}"))
                });
                match ready.clone() {
                    Err(e) => Err(anyhow::anyhow!(e)),
                    Ok(()) if w.id == "page_read_warm" => {
                        workloads::page_read_warm(t, c.pages, c.seconds)
                    }
                    Ok(()) => workloads::page_read_cold(t, c.pages),
                }
            }
            "create" => workloads::create_files(t, c.files, c.file_bytes),
            "ls_cold" => workloads::ls_dir(t, c.files, true),
            "ls_warm" => workloads::ls_dir(t, c.files, false),
            "delete" => workloads::delete_files(t, c.files),
            "stream_write" => workloads::stream_write(t, c.stream_bytes),
            "stream_read" => workloads::stream_read_cold(t, c.stream_bytes),
            other => Err(anyhow::anyhow!("unknown workload {other}")),
        };
        let cell = match timed {
            Ok(timed) => {
                let m = measure(w, timed);
                eprintln!(
                    "failsafe-bench: {name}: {}: {} {}",
                    w.title,
                    report::fmt_value(m.value),
                    w.unit.label()
                );
                Ok(m)
            }
            Err(e) => {
                eprintln!("failsafe-bench: {name}: {} FAILED: {e:#}", w.title);
                Err(format!("failed: {e:#}"))
            }
        };
        cells.insert((w.id, name), cell);
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// bindfs, installed with apt-get when missing and allowed; Err says why
/// the column is skipped.
fn find_bindfs(install: bool) -> Result<PathBuf, String> {
    if let Some(p) = find_in_path("bindfs") {
        return Ok(p);
    }
    if !install {
        return Err("bindfs is not installed (and --no-install)".into());
    }
    if !is_root() {
        return Err("bindfs is not installed, and installing it needs root".into());
    }
    eprintln!("failsafe-bench: bindfs is missing: apt-get install -y bindfs");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "bindfs"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match find_in_path("bindfs") {
        Some(p) if ok => Ok(p),
        _ => Err("bindfs is not installed and `apt-get install -y bindfs` failed".into()),
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The filesystem `path` is on: (mount point, type, device).
fn filesystem_of(path: &Path) -> (String, String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = read_trim("/proc/self/mounts");
    let mut best = (String::new(), String::new(), String::new());
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if path.starts_with(f[1]) && f[1].len() >= best.0.len() {
            best = (f[1].to_string(), f[2].to_string(), f[0].to_string());
        }
    }
    best
}

fn machine(root: &Path) -> Value {
    let cpuinfo = read_trim("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: u64 = read_trim("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let (mountpoint, fstype, device) = filesystem_of(root);
    let commit = command_output("git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    json!({
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0,
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "data_dir": root.display().to_string(),
        "filesystem": {"type": fstype, "device": device, "mount_point": mountpoint},
        "date": command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default(),
        "git_commit": commit,
        "git_dirty": dirty,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "bindfs_version": find_in_path("bindfs")
            .and_then(|b| command_output(&b.display().to_string(), &["--version"])),
        "load_average_start": read_trim("/proc/loadavg"),
    })
}

fn main() {
    let args = Args::parse();
    if !args.mount_options.is_empty() {
        let _ = targets::MOUNT_EXTRA.set(args.mount_options.clone());
        let _ = targets::INSECURE.set(args.insecure);
    }
    if let Err(e) = run(args) {
        eprintln!("failsafe-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::from(&args);
    let only_dokuwiki = args.only == Some(Section::Dokuwiki);
    anyhow::ensure!(
        !(only_dokuwiki && args.no_dokuwiki),
        "--only dokuwiki and --no-dokuwiki contradict each other"
    );
    let tmp;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.canonicalize()?
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("failsafe-bench-")
                .tempdir()
                .context("creating the data directory")?;
            // DokuWiki's web server (www-data) keeps its socket below it.
            std::fs::set_permissions(
                tmp.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )?;
            tmp.path().to_path_buf()
        }
    };
    let mut machine = machine(&root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ws = workloads(&cfg);
    let stats = match args.round_trips {
        RoundTrips::Auto => targets::mount_has_stats_option(),
        RoundTrips::On => true,
        RoundTrips::Off => false,
    };

    let mut cells: BTreeMap<(&'static str, &'static str), Cell> = BTreeMap::new();
    let mut target_info: Vec<(&'static str, Result<String, String>)> = Vec::new();
    let mut api_rows = Vec::new();
    let targets: &[TargetName] = if only_dokuwiki { &[] } else { &args.targets };
    for &name in targets {
        let (label, started) = match name {
            TargetName::Local => ("local", Target::local(&root).map_err(|e| format!("{e:#}"))),
            TargetName::Bindfs => (
                "bindfs",
                if is_root() {
                    find_bindfs(!args.no_install)
                        .and_then(|b| Target::bindfs(&root, &b).map_err(|e| format!("{e:#}")))
                } else {
                    Err("needs root (a FUSE mount, dropping caches)".into())
                },
            ),
            TargetName::Failsafe => (
                "failsafe",
                if is_root() {
                    Target::failsafe(&root, &rt, stats).map_err(|e| format!("{e:#}"))
                } else {
                    Err("needs root (a FUSE mount, dropping caches)".into())
                },
            ),
        };
        let load = read_trim("/proc/loadavg");
        let load = load
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let mut t = match started {
            Ok(t) => t,
            Err(why) => {
                eprintln!("failsafe-bench: skipping {label}: {why}");
                target_info.push((label, Err(why)));
                continue;
            }
        };
        eprintln!("failsafe-bench: {label}: {}", t.setup);
        run_target(&mut t, &cfg, &ws, &mut cells);
        if let Some(f) = t.as_failsafe() {
            if cfg.api_seconds > 0.0 {
                eprintln!("failsafe-bench: failsafe: cluster API without FUSE ...");
                match rt.block_on(api::bench(&f.cluster, cfg.api_seconds)) {
                    Ok(rows) => api_rows = rows,
                    Err(e) => eprintln!("failsafe-bench: cluster API rows FAILED: {e:#}"),
                }
            }
        }
        let setup = format!("{} (load average 1/5/15 min at its start: {load})", t.setup);
        let data = match &t.kind {
            targets::Kind::Local => vec![t.path.clone()],
            targets::Kind::Bindfs { .. } => vec![root.join("bindfs-src"), root.join("bindfs-mnt")],
            targets::Kind::Failsafe(f) => vec![f.root.clone()],
        };
        drop(t);
        for d in data {
            let _ = std::fs::remove_dir_all(d);
        }
        target_info.push((label, Ok(setup)));
    }
    let doku_cfg = dokuwiki::DokuConfig {
        seconds: args
            .doku_seconds
            .unwrap_or(if cfg.quick { 2.0 } else { 20.0 }),
        warmup: args
            .doku_warmup
            .unwrap_or(if cfg.quick { 1.0 } else { 5.0 }),
        editors: args.doku_editors,
        readers: args.doku_readers,
        php_children: args.doku_php_children.max(1),
        profile_views: args
            .doku_views
            .unwrap_or(if cfg.quick { 8 } else { 100 })
            .max(1),
        profile_saves: args.doku_edits.unwrap_or(if cfg.quick { 2 } else { 5 }),
        stats,
    };
    let doku = (!args.no_dokuwiki).then(|| {
        machine["load_average_dokuwiki_start"] = json!(read_trim("/proc/loadavg"));
        dokuwiki::run(&root, &rt, &doku_cfg)
    });
    if let Some(Err(why)) = &doku {
        eprintln!("failsafe-bench: skipping dokuwiki: {why}");
    }
    let mut cities = args.cities.then(|| {
        let ccfg = cities::CityConfig {
            rtt_ms: args.rtt_ms,
            saves: args
                .city_saves
                .unwrap_or(if cfg.quick { 3 } else { 20 })
                .max(1),
            reads: args
                .city_reads
                .unwrap_or(if cfg.quick { 5 } else { 50 })
                .max(1),
            page_bytes: cfg.page_bytes,
            stats,
            follow_writers: args.city_follow_writers && !only_dokuwiki,
            dokuwiki: matches!(doku, Some(Ok(_))).then(|| cities::DokuCity {
                views: doku_cfg.profile_views,
                server: doku_cfg.server(),
            }),
            only_dokuwiki,
        };
        machine["load_average_cities_start"] = json!(read_trim("/proc/loadavg"));
        eprintln!(
            "failsafe-bench: cities: 3 hosts {} ms apart (round trip) ...",
            args.rtt_ms
        );
        if !stats {
            eprintln!(
                "failsafe-bench: cities: the mount has no stats=PATH; round trips not measured"
            );
        }
        cities::run(&root, &ccfg).map_err(|e| {
            eprintln!("failsafe-bench: cities FAILED: {e:#}");
            format!("{e:#}")
        })
    });
    machine["load_average_end"] = json!(read_trim("/proc/loadavg"));
    anyhow::ensure!(
        only_dokuwiki || target_info.iter().any(|(_, r)| r.is_ok()),
        "no target could be started: {:?}",
        target_info
    );
    let doku_ran = matches!(doku, Some(Ok(_)));
    let doku_city = cities.as_mut().filter(|_| doku_ran).map(|c| match c {
        Ok(c) => c
            .dokuwiki
            .take()
            .unwrap_or_else(|| Err("not run in the cities part".into())),
        Err(e) => Err(e.clone()),
    });

    let invocation = std::env::args().collect::<Vec<_>>().join(" ");
    let r = report::Report {
        cfg: &cfg,
        workloads: &ws,
        cells: &cells,
        targets: &target_info,
        machine: &machine,
        api_rows: &api_rows,
        round_trips_enabled: stats,
        cities: if only_dokuwiki { None } else { cities.as_ref() },
        rtt_ms: args.rtt_ms,
        invocation: &invocation,
        note: args.note.as_deref(),
        dokuwiki: doku.as_ref(),
        doku_city: doku_city.as_ref(),
        doku_cfg: &doku_cfg,
        only_dokuwiki,
    };
    println!("{}", r.table_text());
    let (json_path, report_path) = if only_dokuwiki {
        if args.json.is_none() && args.report.is_none() {
            eprintln!("failsafe-bench: --only: no file written (--json, --report say where)");
        }
        (args.json.clone(), args.report.clone())
    } else {
        (
            Some(args.json.clone().unwrap_or("bench/results.json".into())),
            Some(args.report.clone().unwrap_or("BENCHMARKS.md".into())),
        )
    };
    let mut outputs = Vec::new();
    if let Some(p) = json_path {
        outputs.push((p, serde_json::to_string_pretty(&r.to_json(&cfg))? + "\n"));
    }
    if let Some(p) = report_path {
        outputs.push((p, r.markdown()));
    }
    for (path, text) in &outputs {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("failsafe-bench: wrote {}", path.display());
    }
    let mut failed: Vec<_> = cells
        .iter()
        .filter_map(|((w, t), c)| c.as_ref().err().map(|e| format!("{t} {w}: {e}")))
        .collect();
    if let Some(Err(e)) = &cities {
        failed.push(format!("cities: {e}"));
    }
    if let Some(Ok(d)) = &doku {
        for (t, r) in [("local", &d.local), ("failsafe", &d.failsafe)] {
            if let Err(e) = r {
                failed.push(format!("dokuwiki on {t}: {e}"));
            }
        }
    }
    if let Some(Err(e)) = &doku_city {
        failed.push(format!("dokuwiki from a city without the leader: {e}"));
    }
    anyhow::ensure!(
        failed.is_empty(),
        "some workloads failed:\n{}",
        failed.join("\n")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_are_the_counters_change_per_operation() {
        let before = json!({"ops": {"create": {"count": 2, "rpcs": 6, "round_trips": 4},
                                    "write": {"count": 1, "rpcs": 2, "round_trips": 2}}});
        let after = json!({"ops": {"create": {"count": 12, "rpcs": 36, "round_trips": 24},
                                   "write": {"count": 11, "rpcs": 22, "round_trips": 12},
                                   "mkdir": {"count": 10, "rpcs": 10, "round_trips": 10}}});
        let r = round_trips_between(Some(&before), Some(&after), 10.0).unwrap();
        assert_eq!(r.round_trips_per_op, Some(4.0));
        assert_eq!(r.rpcs_per_op, Some(6.0));
        assert_eq!(r.delta["ops.mkdir.round_trips"], 10.0);
        assert_eq!(r.delta["ops.create.count"], 10.0);
        // A fresh mount (no file before) counts from zero; no file after, nothing.
        let fresh = round_trips_between(None, Some(&after), 10.0).unwrap();
        assert_eq!(fresh.round_trips_per_op, Some(4.6));
        assert!(round_trips_between(Some(&before), None, 10.0).is_none());
        // A stats file without the counters gives no number, not zero.
        let other = json!({"uptime": 5});
        let r = round_trips_between(None, Some(&other), 10.0).unwrap();
        assert_eq!(r.round_trips_per_op, None);
    }

    #[test]
    fn numbers_read_as_written() {
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(report::fmt_value(0.0204), "0.0204");
        assert_eq!(report::fmt_value(23.68), "23.7");
        assert_eq!(report::fmt_value(177_036.4), "177,036");
    }
}
