//! Helpers for tests that start real fsd processes on loopback.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::time::{Duration, Instant};

use failsafe_client::{pb, Client, ClientConfig};
use failsafe_harness::local::LocalCluster;

pub(crate) struct TestCluster {
    pub c: LocalCluster,
    pub dir: tempfile::TempDir,
    /// Log lines at ERROR level that this test provokes on purpose
    /// (substrings). Every other ERROR line fails the test when the cluster
    /// is dropped, except openraft's about a killed or frozen peer.
    pub expected_errors: Vec<&'static str>,
}

impl TestCluster {
    /// Three hosts in zones a, b, c, bootstrapped into one cluster.
    pub(crate) async fn start(extra: &[&str]) -> (TestCluster, Client) {
        Self::start_zones(&["a", "b", "c"], extra).await
    }

    pub(crate) async fn start_zones(zones: &[&str], extra: &[&str]) -> (TestCluster, Client) {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut c = LocalCluster::start(
            dir.path(),
            zones,
            Path::new(env!("CARGO_BIN_EXE_fsd")),
            0,
            &extra,
        )
        .expect("start fsd processes");
        c.bootstrap().await.expect("bootstrap");
        // These tests are about blocks: even small writes are stored as
        // blocks (the mount's tests cover inline writes).
        let client = Client::connect(ClientConfig {
            inline_max_bytes: 0,
            ..c.client_config()
        })
        .await
        .expect("client");
        (
            TestCluster {
                c,
                dir,
                expected_errors: Vec::new(),
            },
            client,
        )
    }

    /// Runs `fsctl --cluster ADDRS ARGS...` as the cluster's admin.
    pub(crate) fn fsctl(&self, args: &[&str]) -> std::process::Output {
        let addrs: Vec<String> = self
            .c
            .hosts
            .iter()
            .filter(|h| !h.addr.is_empty())
            .map(|h| h.addr.clone())
            .collect();
        std::process::Command::new(env!("CARGO_BIN_EXE_fsctl"))
            .args(self.c.fsctl_flags())
            .arg("--cluster")
            .arg(addrs.join(","))
            .args(args)
            .output()
            .expect("run fsctl")
    }

    /// `fsctl` that must succeed; its output.
    pub(crate) fn fsctl_ok(&self, args: &[&str]) -> String {
        let out = self.fsctl(args);
        assert!(
            out.status.success(),
            "fsctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A fresh client with short deadlines, preferring `zone` for reads.
    pub(crate) async fn client_in(&self, zone: &str) -> Client {
        Client::connect(ClientConfig {
            zone: Some(zone.into()),
            inline_max_bytes: 0,
            ..self.c.client_config()
        })
        .await
        .expect("client")
    }

    pub(crate) async fn status(&self) -> pb::StatusReply {
        self.c
            .client()
            .await
            .expect("client")
            .status()
            .await
            .expect("status")
    }

    /// Index of the current leader among the hosts.
    pub(crate) async fn leader(&self) -> usize {
        let s = self
            .c
            .wait_for(PATIENCE, "a leader", |s| s.leader_id != 0)
            .await
            .expect("leader");
        self.c
            .hosts
            .iter()
            .position(|h| h.addr == s.leader_addr)
            .expect("leader is one of ours")
    }

    /// The status as the member at host `i` sees it.
    pub(crate) async fn status_at(&self, i: usize) -> Option<pb::StatusReply> {
        let client = self.c.client().await.ok()?;
        client.status_of(&self.c.hosts[i].addr).await.ok()
    }

    /// Waits until host `i` has applied everything the leader has.
    pub(crate) async fn wait_caught_up(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.status().await;
            if let Some(s) = self.status_at(i).await {
                if s.last_applied >= leader.last_applied && s.leader_id != 0 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "host {i} did not catch up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails on ERROR lines in any host's log that the test did not expect
    /// (see `expected_errors`). Dropping the cluster does this too; call it
    /// to check at a point of the test's choosing.
    pub(crate) fn check_logs(&self) {
        if let Err(e) = self.c.check_logs(&self.expected_errors) {
            panic!("{e}");
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test's own failure comes first; the logs help explain it.
            for h in &self.c.hosts {
                eprintln!("--- last lines of {} ---", h.log_path().display());
                eprintln!("{}", failsafe_harness::logs::tail(&h.log_path(), 30));
            }
        } else {
            self.check_logs();
        }
    }
}

pub(crate) const ROOT: u64 = 1;

/// How long a wait for a condition may take before the test fails. Every
/// wait returns as soon as its condition holds, so this costs nothing when
/// things work; it is generous because CI runs tests two at a time on a slow
/// 2-core machine, where a cluster's round trips take many times longer.
pub(crate) const PATIENCE: Duration = Duration::from_secs(90);

/// Deterministic test data.
pub(crate) fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(crate) use failsafe_harness::httpc::{request as http, Reply};
