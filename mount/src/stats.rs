//! What each FUSE operation cost in RPCs and sequential round trips to the
//! cluster, counted with relaxed atomics, and exported as a JSON file
//! (`stats=PATH`, rewritten atomically every second and at unmount) and as
//! Prometheus text (`metrics=ADDR`).
//!
//! The client library counts (see `failsafe_client::stats`): each FUSE
//! request runs inside `failsafe_client::measure`, which adds one round trip
//! for every RPC awaited on its own and one for a parallel fan-out. Work a
//! request leaves running (an upload started by a large write that does not
//! wait for it, late block copies recorded afterwards, session heartbeats) is
//! not charged to any operation: it shows as `background_rpcs`.
//!
//! The JSON summary (`"version": 1`; fields are only ever added):
//!
//! ```text
//! {
//!   "version": 1,
//!   "uptime_ms": 1234,
//!   "ops": {
//!     "lookup": {"count": 7, "rpcs": 7, "round_trips": 7, "time_us": 5321,
//!                "hist": {"0": 0, "1": 7, "2": 0, "3-4": 0, "5-8": 0, "9+": 0}},
//!     ... one entry for every operation in `FuseOp::ALL`, zeros included
//!   },
//!   "total_rpcs": 40,
//!   "background_rpcs": 3,
//!   "rpcs_by_kind": {
//!     "meta_query": {"sent": 25, "ok": 25, "error": 0, "timeout": 0, "cancelled": 0},
//!     ... one entry for every kind in `failsafe_client::RpcKind::ALL`
//!   },
//!   "lease_streams": 1,
//!   "lease_revalidated": 0,
//!   "metrics_addr": "127.0.0.1:9101",
//!   "kept": {"files": 0, "retries": 0, "stored_late": 0}
//! }
//! ```
//!
//! `count`: operations finished; `rpcs`: RPCs they sent (fan-out members and
//! retries included); `round_trips`: sequential round trips they waited for;
//! `time_us`: their total time from the request reaching the mount to the
//! reply; `hist`: operations by their round trips. `total_rpcs` counts every
//! RPC the mount sent, `background_rpcs` those sent outside any operation.
//! `lease_streams`: lease streams welcomed so far (a mount that lost its
//! stream starts the next with nothing cached, but what it finds
//! unchanged). `lease_revalidated`:
//! inodes cached again after a lost stream, asked about in bulk under the
//! next one and found unchanged. `metrics_addr` (only with
//! `metrics=`): the address the Prometheus listener was bound to, the port
//! the kernel chose where `metrics=` gave port 0. `kept`: files closed after a failed flush whose bytes the mount still
//! holds (`files`), attempts to store them that failed again (`retries`),
//! and kept files stored since (`stored_late`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_client::{Client, OpCost, Outcome, RpcKind};

use crate::core::Kept;

macro_rules! fuse_ops {
    ($($v:ident => $name:literal),* $(,)?) => {
        /// The FUSE operations the mount counts.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum FuseOp { $($v),* }

        impl FuseOp {
            pub(crate) const ALL: &'static [FuseOp] = &[$(FuseOp::$v),*];

            /// The stable name used in the JSON and the metrics.
            pub(crate) fn name(self) -> &'static str {
                match self { $(FuseOp::$v => $name),* }
            }
        }
    };
}

fuse_ops! {
    Lookup => "lookup",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Create => "create",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Readdirplus => "readdirplus",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Removexattr => "removexattr",
    Access => "access",
    Getlk => "getlk",
    Setlk => "setlk",
    Fallocate => "fallocate",
    Ioctl => "ioctl",
}

/// Histogram buckets of round trips per operation: 0, 1, 2, 3-4, 5-8, 9+.
const BUCKETS: [(&str, u64); 6] = [
    ("0", 0),
    ("1", 1),
    ("2", 2),
    ("3-4", 4),
    ("5-8", 8),
    ("9+", u64::MAX),
];

fn bucket(round_trips: u64) -> usize {
    BUCKETS
        .iter()
        .position(|(_, le)| round_trips <= *le)
        .unwrap_or(BUCKETS.len() - 1)
}

#[derive(Default)]
struct OpStats {
    count: AtomicU64,
    rpcs: AtomicU64,
    round_trips: AtomicU64,
    time_us: AtomicU64,
    hist: [AtomicU64; BUCKETS.len()],
}

pub(crate) struct MountStats {
    ops: Vec<OpStats>,
    client: Client,
    kept: Arc<Kept>,
    started: Instant,
    /// One writer of the stats file at a time (the ticker, the last write).
    writing: Mutex<()>,
    /// Where `metrics=` was bound (the port the kernel chose for port 0).
    metrics_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

impl MountStats {
    pub(crate) fn new(client: Client, kept: Arc<Kept>) -> MountStats {
        MountStats {
            ops: FuseOp::ALL.iter().map(|_| OpStats::default()).collect(),
            client,
            kept,
            started: Instant::now(),
            writing: Mutex::new(()),
            metrics_addr: std::sync::OnceLock::new(),
        }
    }

    /// Records where the Prometheus listener was bound, for the JSON.
    pub(crate) fn set_metrics_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.metrics_addr.set(addr);
    }

    /// Counts one finished operation.
    pub(crate) fn record(&self, op: FuseOp, cost: OpCost, took: Duration) {
        let s = &self.ops[op as usize];
        s.count.fetch_add(1, Ordering::Relaxed);
        s.rpcs.fetch_add(cost.rpcs, Ordering::Relaxed);
        s.round_trips.fetch_add(cost.round_trips, Ordering::Relaxed);
        s.time_us.fetch_add(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        s.hist[bucket(cost.round_trips)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an operation answered without asking the cluster.
    pub(crate) fn local(&self, op: FuseOp) {
        self.record(op, OpCost::default(), Duration::ZERO);
    }

    /// The JSON summary (see the module documentation).
    pub(crate) fn json(&self) -> String {
        let mut j = String::with_capacity(8192);
        let _ = write!(
            j,
            "{{\n  \"version\": 1,\n  \"uptime_ms\": {},\n  \"ops\": {{",
            self.started.elapsed().as_millis()
        );
        for (i, op) in FuseOp::ALL.iter().enumerate() {
            let s = &self.ops[*op as usize];
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let _ = write!(
                j,
                "{}\n    \"{}\": {{\"count\": {}, \"rpcs\": {}, \"round_trips\": {}, \"time_us\": {}, \"hist\": {{",
                if i == 0 { "" } else { "," },
                op.name(),
                get(&s.count),
                get(&s.rpcs),
                get(&s.round_trips),
                get(&s.time_us),
            );
            for (b, (name, _)) in BUCKETS.iter().enumerate() {
                let sep = if b == 0 { "" } else { ", " };
                let _ = write!(j, "{sep}\"{name}\": {}", get(&s.hist[b]));
            }
            j.push_str("}}");
        }
        let rpcs = self.client.rpc_stats();
        let _ = write!(
            j,
            "\n  }},\n  \"total_rpcs\": {},\n  \"background_rpcs\": {},\n  \"rpcs_by_kind\": {{",
            rpcs.total(),
            rpcs.background
        );
        for (i, kind) in RpcKind::ALL.iter().enumerate() {
            let _ = write!(
                j,
                "{}\n    \"{}\": {{\"sent\": {}",
                if i == 0 { "" } else { "," },
                kind.name(),
                rpcs.sent_of(*kind)
            );
            for o in Outcome::ALL {
                let _ = write!(j, ", \"{}\": {}", o.name(), rpcs.ended_of(*kind, o));
            }
            j.push('}');
        }
        // Only where `metrics=` is set.
        let metrics_addr = self
            .metrics_addr
            .get()
            .map(|a| format!("\n  \"metrics_addr\": \"{a}\","))
            .unwrap_or_default();
        let _ = write!(
            j,
            "\n  }},\n  \"lease_streams\": {},\n  \"lease_revalidated\": {},{metrics_addr}\n  \"kept\": {{\"files\": {}, \"retries\": {}, \"stored_late\": {}}}\n}}\n",
            self.client.lease_streams(),
            self.client.lease_revalidated(),
            self.kept.count(),
            self.kept.retries.load(Ordering::Relaxed),
            self.kept.stored_late.load(Ordering::Relaxed),
        );
        j
    }

    /// Prometheus text exposition of the same numbers.
    pub(crate) fn prometheus(&self) -> String {
        let mut t = String::with_capacity(16384);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        t.push_str("# HELP failsafe_mount_op_rpcs_total RPCs sent by FUSE operations.\n# TYPE failsafe_mount_op_rpcs_total counter\n");
        for op in FuseOp::ALL {
            let s = &self.ops[*op as usize];
            let _ = writeln!(
                t,
                "failsafe_mount_op_rpcs_total{{op=\"{}\"}} {}",
                op.name(),
                get(&s.rpcs)
            );
        }
        t.push_str("# HELP failsafe_mount_op_seconds_total Time of FUSE operations.\n# TYPE failsafe_mount_op_seconds_total counter\n");
        for op in FuseOp::ALL {
            let s = &self.ops[*op as usize];
            let _ = writeln!(
                t,
                "failsafe_mount_op_seconds_total{{op=\"{}\"}} {}",
                op.name(),
                get(&s.time_us) as f64 / 1e6
            );
        }
        t.push_str("# HELP failsafe_mount_op_round_trips Sequential round trips to the cluster per FUSE operation.\n# TYPE failsafe_mount_op_round_trips histogram\n");
        for op in FuseOp::ALL {
            let s = &self.ops[*op as usize];
            let mut cumulative = 0;
            for (b, (_, le)) in BUCKETS.iter().enumerate() {
                cumulative += get(&s.hist[b]);
                let le = if *le == u64::MAX {
                    "+Inf".to_string()
                } else {
                    le.to_string()
                };
                let _ = writeln!(
                    t,
                    "failsafe_mount_op_round_trips_bucket{{op=\"{}\",le=\"{le}\"}} {cumulative}",
                    op.name()
                );
            }
            let _ = writeln!(
                t,
                "failsafe_mount_op_round_trips_sum{{op=\"{}\"}} {}\nfailsafe_mount_op_round_trips_count{{op=\"{}\"}} {}",
                op.name(),
                get(&s.round_trips),
                op.name(),
                get(&s.count)
            );
        }
        let rpcs = self.client.rpc_stats();
        t.push_str("# HELP failsafe_client_rpcs_sent_total RPCs sent to the cluster.\n# TYPE failsafe_client_rpcs_sent_total counter\n");
        for kind in RpcKind::ALL {
            let _ = writeln!(
                t,
                "failsafe_client_rpcs_sent_total{{kind=\"{}\"}} {}",
                kind.name(),
                rpcs.sent_of(kind)
            );
        }
        t.push_str("# HELP failsafe_client_rpcs_total RPCs ended, by outcome.\n# TYPE failsafe_client_rpcs_total counter\n");
        for kind in RpcKind::ALL {
            for o in Outcome::ALL {
                let _ = writeln!(
                    t,
                    "failsafe_client_rpcs_total{{kind=\"{}\",outcome=\"{}\"}} {}",
                    kind.name(),
                    o.name(),
                    rpcs.ended_of(kind, o)
                );
            }
        }
        let _ = write!(
            t,
            "# HELP failsafe_client_background_rpcs_total RPCs sent outside any FUSE operation.\n# TYPE failsafe_client_background_rpcs_total counter\nfailsafe_client_background_rpcs_total {}\n",
            rpcs.background
        );
        let _ = write!(
            t,
            "# HELP failsafe_mount_lease_streams_total Lease streams welcomed (each after a lost one starts with an empty cache).\n# TYPE failsafe_mount_lease_streams_total counter\nfailsafe_mount_lease_streams_total {}\n",
            self.client.lease_streams()
        );
        let _ = write!(
            t,
            "# HELP failsafe_mount_lease_revalidated_total Inodes cached again after a lost lease stream (asked about in bulk and found unchanged).\n# TYPE failsafe_mount_lease_revalidated_total counter\nfailsafe_mount_lease_revalidated_total {}\n",
            self.client.lease_revalidated()
        );
        let _ = write!(
            t,
            "# HELP failsafe_mount_kept_files Files closed after a failed flush whose bytes this mount still holds, to store when the cluster takes them.\n# TYPE failsafe_mount_kept_files gauge\nfailsafe_mount_kept_files {}\n\
             # HELP failsafe_mount_kept_retries_total Attempts to store a kept file's bytes that failed again.\n# TYPE failsafe_mount_kept_retries_total counter\nfailsafe_mount_kept_retries_total {}\n\
             # HELP failsafe_mount_kept_stored_total Kept files whose bytes were stored late.\n# TYPE failsafe_mount_kept_stored_total counter\nfailsafe_mount_kept_stored_total {}\n",
            self.kept.count(),
            self.kept.retries.load(Ordering::Relaxed),
            self.kept.stored_late.load(Ordering::Relaxed),
        );
        t
    }

    /// Writes the JSON summary to `path` atomically (a temporary file in the
    /// same directory, then a rename).
    pub(crate) fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, self.json())?;
        std::fs::rename(&tmp, path)
    }
}

/// Rewrites the stats file every second, from a thread of its own (the
/// write never waits on the runtime that serves FUSE requests).
pub(crate) fn write_every_second(stats: Arc<MountStats>, path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            let mut warned = false;
            loop {
                if let Err(e) = stats.write_json(&path) {
                    if !warned {
                        tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
                        warned = true;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the stats writer");
    }
}

/// Serves the Prometheus text on `listener` (any request path).
pub(crate) async fn serve_metrics(stats: Arc<MountStats>, listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            // The request itself does not matter: read what came, answer.
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
            let body = stats.prometheus();
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        let b: Vec<usize> = [0, 1, 2, 3, 4, 5, 8, 9, 100].map(bucket).to_vec();
        assert_eq!(b, vec![0, 1, 2, 3, 3, 4, 4, 5, 5]);
    }
}
