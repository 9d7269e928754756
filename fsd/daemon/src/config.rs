//! fsd's configuration: a TOML file whose every field is also a flag, read
//! raw first and then validated into `Config` with errors that name the field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The raw file. Every field is optional; defaults are documented here.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the host id, tracker databases and (by default) blocks live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address the gRPC and /metrics server binds. Default 0.0.0.0:7000.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address other hosts and clients use to reach this one. Default: the
    /// listen address (which then must not be a wildcard).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Also serve /metrics, the health probes (/healthz, /readyz, the
    /// gRPC health service) and the status page (/) in plain HTTP at this
    /// address (e.g. 127.0.0.1:9100), for a Prometheus, a supervisor or a
    /// browser without a client certificate; the main port answers only
    /// callers with a credential.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// This host's credential: its certificate (a member's, naming its host
    /// id), the cluster's CA certificate and its private key, as
    /// `fsctl host cert` writes them. Default DATA_DIR/host.cred.
    #[arg(long, value_name = "FILE")]
    pub cred: Option<PathBuf>,
    /// Plaintext without credentials: anyone who reaches the port can do
    /// anything. Only for a trusted test network; logged at every start.
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// Failure domain of this host (a city, a building, a rack). Default "default".
    #[arg(long)]
    pub zone: Option<String>,
    /// Block directories, usually one per disk. Default: DATA_DIR/blocks.
    #[arg(long = "device", value_name = "DIR")]
    #[serde(default)]
    pub devices: Vec<PathBuf>,
    /// Members of an existing cluster to ask for admission on first start.
    #[arg(long = "join", value_name = "HOST:PORT")]
    #[serde(default)]
    pub join: Vec<String>,
    /// The cluster to join (printed by `fsctl init`); required with --join.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Deadline of one RPC this host makes, in ms. Default 2000.
    #[arg(long)]
    pub rpc_timeout_ms: Option<u64>,
    /// Raft heartbeat interval, in ms; also the deadline of one replication round trip. Default 100.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Raft election timeout range, in ms. Default 350..700.
    #[arg(long)]
    pub election_min_ms: Option<u64>,
    #[arg(long)]
    pub election_max_ms: Option<u64>,
    /// Snapshot the tracker every this many log entries (each member at its
    /// own offset in the period, so that they do not all build one at
    /// once). Default 5000.
    #[arg(long)]
    pub snapshot_logs: Option<u64>,
    /// Log entries kept behind a snapshot. Default 1000.
    #[arg(long)]
    pub keep_logs: Option<u64>,
    /// The largest tracker snapshot this host accepts from a leader, in
    /// MiB. Default 4096.
    #[arg(long)]
    pub max_snapshot_mb: Option<u64>,
    /// Disk space, in MiB, kept for the tracker's databases alone: a file
    /// of zeros in its directory, released when the disk fills up, and
    /// kept free of blocks on a device that shares the filesystem. 0: none.
    /// Default 64.
    #[arg(long)]
    pub tracker_reserve_mb: Option<u64>,
    /// Copies of every block. Default 3.
    #[arg(long)]
    pub copies: Option<usize>,
    /// Copies that must be fsynced before a write succeeds. Default 2.
    #[arg(long)]
    pub write_quorum: Option<usize>,
    /// How often this host reports its devices' usage, in ms. Default 5000.
    #[arg(long)]
    pub report_interval_ms: Option<u64>,
    /// How often the leader looks for blocks below their copy count and
    /// copies them, in ms. Default 1000.
    #[arg(long)]
    pub repair_interval_ms: Option<u64>,
    /// Blocks the repair worker copies at once. Default 4.
    #[arg(long)]
    pub repair_concurrency: Option<usize>,
    /// Cap on the bytes repair reads and writes, in MiB/s. Default 64.
    #[arg(long)]
    pub repair_bandwidth_mb: Option<u64>,
    /// A host the leader has not heard from for this long (ms) is dead: its
    /// copies stop counting and are rebuilt elsewhere. Until then a down host
    /// only makes the cluster limp, so a restart causes no copy storm.
    /// Default 600000 (10 minutes).
    #[arg(long)]
    pub dead_after_ms: Option<u64>,
    /// Scrub: re-read and re-hash every block on this host's devices at this
    /// many MiB/s, so a copy that rotted where nobody reads it is found,
    /// quarantined and replaced. 0 turns scrubbing off. Default 8.
    #[arg(long)]
    pub scrub_mb_per_s: Option<u64>,
    /// A scrub pass over all the devices starts at most this often, in ms; a
    /// pass that takes longer at the rate above is followed by the next at
    /// once. Default 86400000 (a day).
    #[arg(long)]
    pub scrub_interval_ms: Option<u64>,
    /// Garbage collection: a block no file references any more (an old
    /// version of a rewritten or replaced file) is deleted this long (ms)
    /// after it lost its last reference; a block file on a device that the
    /// tracker has no record of is deleted once it is this old. It must
    /// cover the time between a client storing a block and committing the
    /// write that uses it, and the time a file stays readable by those who
    /// opened it before it was replaced. At least 1000. Default 600000
    /// (10 minutes).
    #[arg(long)]
    pub gc_grace_ms: Option<u64>,
    /// Small writes travel inline, inside their metadata commit; the leader
    /// turns inline data older than this (ms) into blocks with the normal
    /// placement and copy count. Until then the tracker's state holds it.
    /// At least 100. Default 30000.
    #[arg(long)]
    pub blockify_after_ms: Option<u64>,
    /// Leadership follows the writers: the tracker leader hands leadership
    /// to a caught-up voter in the zone (city) whose mounts do most of the
    /// metadata changes, so their changes cost one inter-city round trip
    /// instead of two. Writes pause for a few round trips during a
    /// hand-over. Default true.
    #[arg(long)]
    pub leader_follows_writers: Option<bool>,
    /// The writes judged are those of the last this many ms. Default 60000.
    #[arg(long)]
    pub leader_window_ms: Option<u64>,
    /// Fewer writes than this in the window move nothing. Default 100.
    #[arg(long)]
    pub leader_min_writes: Option<u64>,
    /// The share of the window's writes (percent, 51 to 100) one zone must
    /// have done for leadership to move there. Default 67.
    #[arg(long)]
    pub leader_share_percent: Option<u64>,
    /// A leader hands over only after leading this long (ms), and after a
    /// whole window: the least time between two hand-overs, or after a
    /// failover. Default 300000 (5 minutes).
    #[arg(long)]
    pub leader_min_tenure_ms: Option<u64>,
}

impl RawConfig {
    /// Fields set on the command line win over the file's.
    fn merge(self, file: RawConfig) -> RawConfig {
        RawConfig {
            data_dir: self.data_dir.or(file.data_dir),
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            cred: self.cred.or(file.cred),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            insecure: self.insecure || file.insecure,
            zone: self.zone.or(file.zone),
            devices: if self.devices.is_empty() {
                file.devices
            } else {
                self.devices
            },
            join: if self.join.is_empty() {
                file.join
            } else {
                self.join
            },
            cluster_id: self.cluster_id.or(file.cluster_id),
            rpc_timeout_ms: self.rpc_timeout_ms.or(file.rpc_timeout_ms),
            heartbeat_ms: self.heartbeat_ms.or(file.heartbeat_ms),
            election_min_ms: self.election_min_ms.or(file.election_min_ms),
            election_max_ms: self.election_max_ms.or(file.election_max_ms),
            snapshot_logs: self.snapshot_logs.or(file.snapshot_logs),
            keep_logs: self.keep_logs.or(file.keep_logs),
            max_snapshot_mb: self.max_snapshot_mb.or(file.max_snapshot_mb),
            tracker_reserve_mb: self.tracker_reserve_mb.or(file.tracker_reserve_mb),
            copies: self.copies.or(file.copies),
            write_quorum: self.write_quorum.or(file.write_quorum),
            report_interval_ms: self.report_interval_ms.or(file.report_interval_ms),
            repair_interval_ms: self.repair_interval_ms.or(file.repair_interval_ms),
            repair_concurrency: self.repair_concurrency.or(file.repair_concurrency),
            repair_bandwidth_mb: self.repair_bandwidth_mb.or(file.repair_bandwidth_mb),
            dead_after_ms: self.dead_after_ms.or(file.dead_after_ms),
            scrub_mb_per_s: self.scrub_mb_per_s.or(file.scrub_mb_per_s),
            scrub_interval_ms: self.scrub_interval_ms.or(file.scrub_interval_ms),
            gc_grace_ms: self.gc_grace_ms.or(file.gc_grace_ms),
            blockify_after_ms: self.blockify_after_ms.or(file.blockify_after_ms),
            leader_follows_writers: self.leader_follows_writers.or(file.leader_follows_writers),
            leader_window_ms: self.leader_window_ms.or(file.leader_window_ms),
            leader_min_writes: self.leader_min_writes.or(file.leader_min_writes),
            leader_share_percent: self.leader_share_percent.or(file.leader_share_percent),
            leader_min_tenure_ms: self.leader_min_tenure_ms.or(file.leader_min_tenure_ms),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: String,
    pub advertise: Option<String>,
    /// How this host talks to the others and who may call it.
    pub tls: failsafe_tls::Tls,
    /// Its credential's file (none when insecure).
    pub cred_path: Option<PathBuf>,
    /// Where /metrics, the health probes and the status page are also
    /// served without TLS.
    pub metrics_listen: Option<SocketAddr>,
    pub zone: String,
    pub devices: Vec<PathBuf>,
    pub join: Vec<String>,
    pub cluster_id: Option<String>,
    pub rpc_timeout: Duration,
    pub tracker: failsafe_tracker::TrackerConfig,
    /// Bytes kept for the tracker's databases alone (see `reserve.rs`).
    pub tracker_reserve_bytes: u64,
    pub report_interval: Duration,
    pub repair: RepairConfig,
    pub scrub: ScrubConfig,
    pub gc: GcConfig,
    pub blockify: BlockifyConfig,
}

/// The blockifier.
#[derive(Debug, Clone)]
pub struct BlockifyConfig {
    /// Inline data older than this becomes blocks.
    pub after: Duration,
}

/// The repair worker's pace (who is dead is `tracker.dead_after_ms`).
#[derive(Debug, Clone)]
pub struct RepairConfig {
    pub interval: Duration,
    pub concurrency: usize,
    pub bytes_per_second: u64,
}

/// The scrub worker's pace.
#[derive(Debug, Clone)]
pub struct ScrubConfig {
    /// 0: no scrubbing.
    pub bytes_per_second: u64,
    /// Least time between the starts of two passes.
    pub interval: Duration,
}

/// Garbage collection and trimming.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// How long a block stays after it lost its last reference, and how old
    /// a block file must be before a delete may take it.
    pub grace: Duration,
}

impl GcConfig {
    /// How often the `gc` worker looks for garbage: a few times per grace
    /// period, and at least once a minute.
    pub fn interval(&self) -> Duration {
        (self.grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(60))
    }
}

impl Config {
    /// Reads `file` (if any), overlays the flags and validates the result.
    pub fn load(file: Option<&std::path::Path>, flags: RawConfig) -> anyhow::Result<Config> {
        let from_file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => RawConfig::default(),
        };
        Config::validate(flags.merge(from_file))
    }

    pub fn validate(raw: RawConfig) -> anyhow::Result<Config> {
        let leader_placement = leader_policy(&raw)?;
        let Some(data_dir) = raw.data_dir else {
            bail!("data_dir: required (where this host keeps its state)")
        };
        let listen = raw.listen.unwrap_or_else(|| "0.0.0.0:7000".into());
        let listen_addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("listen: {listen:?} is not host:port"))?;
        if let Some(a) = &raw.advertise {
            if a.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                bail!("advertise: {a:?} is not host:port");
            }
        } else if listen_addr.ip().is_unspecified() && listen_addr.port() != 0 {
            bail!("advertise: required when listen ({listen}) is a wildcard address");
        }
        let zone = raw.zone.unwrap_or_else(|| "default".into());
        if failsafe_core::validate_zone(&zone).is_err() {
            bail!("zone: {zone:?} must be 1 to 64 printable characters without spaces");
        }
        if !raw.join.is_empty() && raw.cluster_id.is_none() {
            bail!("cluster_id: required with join (fsctl init prints it; fsctl status shows it)");
        }
        let default_cred = raw.cred.is_none();
        let cred_path =
            (!raw.insecure).then(|| raw.cred.unwrap_or_else(|| data_dir.join("host.cred")));
        let tls = match &cred_path {
            None => failsafe_tls::Tls::Insecure,
            Some(path) => {
                if default_cred && !path.exists() {
                    // A first start: the host makes its key and asks for
                    // its certificate.
                    let asked = std::fs::create_dir_all(&data_dir)
                        .map_err(anyhow::Error::from)
                        .and_then(|()| failsafe_tls::request_host_credential(&data_dir));
                    if let Ok(csr) = asked {
                        bail!(
                            "cred: this host has no credential yet. Its key is in {}, and {} \
                             asks for its certificate: on the admin's machine, `fsctl host cert \
                             --csr host.csr --out host.cred`, then put host.cred at {} and start \
                             again (or `fsctl host cert --out FILE` issues key and certificate \
                             together)",
                            data_dir.join(failsafe_tls::HOST_KEY).display(),
                            csr.display(),
                            path.display()
                        );
                    }
                }
                let cred = failsafe_tls::Credential::load(path).with_context(|| {
                    "cred: this host needs a credential (`fsctl host cert --out FILE` issues one; \
                 --insecure runs without, for a trusted test network only)"
                })?;
                if cred.grant.role != failsafe_tls::Role::Member {
                    bail!(
                        "cred: {} is a credential for {}, not for a host",
                        path.display(),
                        cred.grant.who()
                    );
                }
                cred.check_current()
                    .with_context(|| format!("cred: {}", path.display()))?;
                failsafe_tls::Tls::new(cred).with_context(|| format!("cred: {}", path.display()))?
            }
        };
        let metrics_listen = raw
            .metrics_listen
            .map(|a| {
                a.parse::<SocketAddr>()
                    .with_context(|| format!("metrics_listen: {a:?} is not host:port"))
            })
            .transpose()?;
        let mut tracker = failsafe_tracker::TrackerConfig::default();
        tracker.heartbeat_ms = raw.heartbeat_ms.unwrap_or(tracker.heartbeat_ms);
        tracker.election_min_ms = raw.election_min_ms.unwrap_or(tracker.election_min_ms);
        tracker.election_max_ms = raw.election_max_ms.unwrap_or(tracker.election_max_ms);
        if tracker.election_min_ms <= tracker.heartbeat_ms
            || tracker.election_max_ms <= tracker.election_min_ms
        {
            bail!("election_min_ms/election_max_ms: need heartbeat_ms < election_min_ms < election_max_ms");
        }
        tracker.snapshot_logs = raw.snapshot_logs.unwrap_or(tracker.snapshot_logs).max(1);
        tracker.keep_logs = raw.keep_logs.unwrap_or(tracker.keep_logs);
        if let Some(mb) = raw.max_snapshot_mb {
            if mb == 0 {
                bail!("max_snapshot_mb: must be at least 1");
            }
            tracker.max_snapshot_bytes = mb.saturating_mul(1 << 20);
        }
        tracker.class.copies = raw.copies.unwrap_or(tracker.class.copies);
        tracker.class.write_quorum = raw.write_quorum.unwrap_or(tracker.class.write_quorum);
        if tracker.class.copies == 0
            || tracker.class.write_quorum == 0
            || tracker.class.write_quorum > tracker.class.copies
        {
            bail!("copies/write_quorum: need 1 <= write_quorum <= copies");
        }
        tracker.dead_after_ms = raw.dead_after_ms.unwrap_or(tracker.dead_after_ms);
        if tracker.dead_after_ms < (10 * tracker.heartbeat_ms).max(1000) {
            bail!("dead_after_ms: must be at least 1000 and at least 10 heartbeats (a host is down after that long)");
        }
        tracker.leader_placement = leader_placement;
        let concurrency = raw.repair_concurrency.unwrap_or(4);
        if !(1..=64).contains(&concurrency) {
            bail!("repair_concurrency: {concurrency} is not between 1 and 64");
        }
        let bandwidth_mb = raw.repair_bandwidth_mb.unwrap_or(64);
        if bandwidth_mb == 0 {
            bail!("repair_bandwidth_mb: must be at least 1");
        }
        let repair = RepairConfig {
            interval: Duration::from_millis(raw.repair_interval_ms.unwrap_or(1000).max(50)),
            concurrency,
            bytes_per_second: bandwidth_mb.saturating_mul(1024 * 1024),
        };
        let scrub_mb = raw.scrub_mb_per_s.unwrap_or(8);
        let scrub = ScrubConfig {
            bytes_per_second: scrub_mb.saturating_mul(1024 * 1024),
            interval: Duration::from_millis(raw.scrub_interval_ms.unwrap_or(86_400_000).max(100)),
        };
        let grace_ms = raw.gc_grace_ms.unwrap_or(600_000);
        if grace_ms < 1000 {
            bail!("gc_grace_ms: {grace_ms} is under 1000 (it must cover a write between storing its blocks and committing them)");
        }
        let gc = GcConfig {
            grace: Duration::from_millis(grace_ms),
        };
        let blockify_ms = raw.blockify_after_ms.unwrap_or(30_000);
        if blockify_ms < 100 {
            bail!("blockify_after_ms: {blockify_ms} is under 100");
        }
        let blockify = BlockifyConfig {
            after: Duration::from_millis(blockify_ms),
        };
        let devices = if raw.devices.is_empty() {
            vec![data_dir.join("blocks")]
        } else {
            raw.devices
        };
        Ok(Config {
            data_dir,
            listen,
            advertise: raw.advertise,
            tls,
            cred_path,
            metrics_listen,
            zone,
            devices,
            join: raw.join,
            cluster_id: raw.cluster_id,
            rpc_timeout: Duration::from_millis(raw.rpc_timeout_ms.unwrap_or(2000).max(10)),
            tracker,
            tracker_reserve_bytes: raw.tracker_reserve_mb.unwrap_or(64).saturating_mul(1 << 20),
            report_interval: Duration::from_millis(raw.report_interval_ms.unwrap_or(5000).max(100)),
            repair,
            scrub,
            gc,
            blockify,
        })
    }
}

/// When leadership follows the writers; `None` when it is turned off.
fn leader_policy(raw: &RawConfig) -> anyhow::Result<Option<failsafe_core::LeaderPolicy>> {
    if raw.leader_follows_writers == Some(false) {
        return Ok(None);
    }
    let d = failsafe_core::LeaderPolicy::default();
    let p = failsafe_core::LeaderPolicy {
        window_ms: raw.leader_window_ms.unwrap_or(d.window_ms),
        min_writes: raw.leader_min_writes.unwrap_or(d.min_writes),
        share_percent: raw.leader_share_percent.unwrap_or(d.share_percent),
        min_tenure_ms: raw.leader_min_tenure_ms.unwrap_or(d.min_tenure_ms),
        max_lag: d.max_lag,
    };
    if p.window_ms < 1000 {
        bail!("leader_window_ms: {} is under 1000", p.window_ms);
    }
    if p.min_writes == 0 {
        bail!("leader_min_writes: must be at least 1");
    }
    if !(51..=100).contains(&p.share_percent) {
        bail!(
            "leader_share_percent: {} is not between 51 and 100 (two zones must not both qualify)",
            p.share_percent
        );
    }
    // A hand-over needs the old leader's vote, which it gives only once its
    // own election is `election_max` old (openraft's leader lease).
    let election_max = raw.election_max_ms.unwrap_or(700);
    if p.min_tenure_ms < 1000 || p.min_tenure_ms <= election_max {
        bail!(
            "leader_min_tenure_ms: {} must be at least 1000 and above election_max_ms (leadership would move back and forth)",
            p.min_tenure_ms
        );
    }
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_errors_name_the_field() {
        let file: RawConfig =
            toml::from_str("data_dir = '/d'\nzone = 'a'\nlisten = '127.0.0.1:1'").unwrap();
        let flags = RawConfig {
            zone: Some("b".into()),
            insecure: true,
            ..Default::default()
        };
        let c = Config::validate(flags.merge(file)).unwrap();
        assert_eq!(c.zone, "b");
        assert_eq!(c.devices, vec![PathBuf::from("/d/blocks")]);

        let err = Config::validate(RawConfig {
            data_dir: Some("/d".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("advertise:"), "{err}");
        let bad: Result<RawConfig, _> = toml::from_str("data_dir = '/d'\nzoen = 'a'");
        assert!(bad.is_err());
        // No credential, and not --insecure: refused, saying what to do.
        let err = Config::validate(RawConfig {
            data_dir: Some("/nonexistent-failsafe".into()),
            listen: Some("127.0.0.1:1".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("fsctl host cert"), "{err:#}");
    }

    #[test]
    fn repair_settings_default_and_are_checked() {
        let base = || RawConfig {
            data_dir: Some("/d".into()),
            listen: Some("127.0.0.1:1".into()),
            insecure: true,
            ..Default::default()
        };
        let c = Config::validate(base()).unwrap();
        assert_eq!(c.repair.interval, Duration::from_millis(1000));
        assert_eq!(c.repair.concurrency, 4);
        assert_eq!(c.repair.bytes_per_second, 64 << 20);
        assert_eq!(c.tracker.dead_after_ms, 600_000);
        assert_eq!(
            c.tracker.leader_placement,
            Some(failsafe_core::LeaderPolicy::default())
        );
        let off: RawConfig = toml::from_str("leader_follows_writers = false").unwrap();
        let c = Config::validate(base().merge(off)).unwrap();
        assert_eq!(c.tracker.leader_placement, None);
        let short: RawConfig =
            toml::from_str("leader_window_ms = 3000\nleader_min_tenure_ms = 4000").unwrap();
        let p = Config::validate(base().merge(short))
            .unwrap()
            .tracker
            .leader_placement
            .unwrap();
        assert_eq!(
            (p.window_ms, p.min_tenure_ms, p.share_percent),
            (3000, 4000, 67)
        );
        let file: RawConfig =
            toml::from_str("repair_concurrency = 2\ndead_after_ms = 5000").unwrap();
        let c = Config::validate(
            RawConfig {
                repair_bandwidth_mb: Some(8),
                ..base()
            }
            .merge(file),
        )
        .unwrap();
        assert_eq!(
            (
                c.repair.concurrency,
                c.repair.bytes_per_second,
                c.tracker.dead_after_ms
            ),
            (2, 8 << 20, 5000)
        );
        assert_eq!(c.scrub.bytes_per_second, 8 << 20);
        assert_eq!(c.scrub.interval, Duration::from_secs(86_400));
        assert_eq!(c.gc.grace, Duration::from_secs(600));
        assert_eq!(c.gc.interval(), Duration::from_secs(60));
        assert_eq!(c.blockify.after, Duration::from_secs(30));
        let file: RawConfig = toml::from_str("scrub_mb_per_s = 0\ngc_grace_ms = 2000").unwrap();
        let c = Config::validate(
            RawConfig {
                scrub_interval_ms: Some(500),
                ..base()
            }
            .merge(file),
        )
        .unwrap();
        assert_eq!(
            (c.scrub.bytes_per_second, c.scrub.interval, c.gc.grace),
            (0, Duration::from_millis(500), Duration::from_secs(2))
        );
        assert_eq!(c.gc.interval(), Duration::from_millis(500));
        for (raw, field) in [
            (
                RawConfig {
                    gc_grace_ms: Some(999),
                    ..base()
                },
                "gc_grace_ms:",
            ),
            (
                RawConfig {
                    repair_concurrency: Some(0),
                    ..base()
                },
                "repair_concurrency:",
            ),
            (
                RawConfig {
                    repair_bandwidth_mb: Some(0),
                    ..base()
                },
                "repair_bandwidth_mb:",
            ),
            (
                RawConfig {
                    dead_after_ms: Some(10),
                    ..base()
                },
                "dead_after_ms:",
            ),
            (
                RawConfig {
                    blockify_after_ms: Some(10),
                    ..base()
                },
                "blockify_after_ms:",
            ),
            (
                RawConfig {
                    leader_share_percent: Some(50),
                    ..base()
                },
                "leader_share_percent:",
            ),
            (
                RawConfig {
                    leader_min_tenure_ms: Some(10),
                    ..base()
                },
                "leader_min_tenure_ms:",
            ),
        ] {
            let err = Config::validate(raw).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }
}
