//! Real FUSE mounts of a real three-host cluster.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use failsafe_harness::local::{sibling_binary, LocalCluster, LocalMount};
use failsafe_harness::logs;

/// A mount of the test cluster.
pub(crate) struct Mount(pub LocalMount);

impl std::ops::Deref for Mount {
    type Target = LocalMount;
    fn deref(&self) -> &LocalMount {
        &self.0
    }
}

impl Mount {
    pub(crate) fn p(&self, rel: &str) -> PathBuf {
        self.0.path.join(rel)
    }

    pub(crate) fn unmount(&mut self) {
        self.0.unmount();
    }
}

pub(crate) struct Env {
    pub cluster: LocalCluster,
    pub dir: tempfile::TempDir,
    pub mounts: Vec<Mount>,
    /// Log lines at ERROR level (substrings) that this test provokes on
    /// purpose. Every other ERROR line in a host's or a mount's log fails
    /// the test when the `Env` is dropped, except openraft's about a killed
    /// or frozen peer.
    pub expected_errors: Vec<&'static str>,
}

impl Env {
    /// Three hosts in zones a, b, c and `n` mounts of the cluster's root.
    pub(crate) async fn start(n: usize) -> Env {
        Env::start_with(n, &[]).await
    }

    /// [`Env::start`] with mount options `opts` on every mount.
    pub(crate) async fn start_mounts_with(n: usize, opts: &str) -> Env {
        Env::start_full(n, &[], opts).await
    }

    /// The same, with `extra` flags for every fsd.
    pub(crate) async fn start_with(n: usize, extra: &[&str]) -> Env {
        Env::start_full(n, extra, "").await
    }

    async fn start_full(n: usize, extra: &[&str], opts: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let fsd = sibling_binary("fsd").expect("the fsd binary (cargo build --bins)");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut cluster = LocalCluster::start(dir.path(), &["a", "b", "c"], &fsd, 0, &extra)
            .expect("start hosts");
        cluster.bootstrap().await.expect("bootstrap");
        let mut env = Env {
            cluster,
            dir,
            mounts: Vec::new(),
            expected_errors: Vec::new(),
        };
        for i in 0..n {
            let zone = ["a", "b", "c"][i % 3];
            env.mount_with(zone, opts);
        }
        env
    }

    /// Sums a counter over the hosts that are up, from their /metrics.
    pub(crate) fn metric_sum(&self, name: &str) -> u64 {
        self.metric_sum_labelled(name, "")
    }

    /// [`Env::metric_sum`] of the lines whose labels hold `label` (such as
    /// `why="hot"`).
    pub(crate) fn metric_sum_labelled(&self, name: &str, label: &str) -> u64 {
        (0..self.cluster.hosts.len())
            .flat_map(|i| self.cluster.metric_samples_of(i, name))
            .filter(|(labels, _)| labels.contains(label))
            .map(|(_, v)| v as u64)
            .sum()
    }

    /// Waits until the leader has `n` mounts' lease streams open.
    pub(crate) fn wait_for_lease_streams(&self, n: u64) {
        self.wait_for_streams(|open| open >= n, &format!("{n} lease streams did not open"));
    }

    /// Waits until no lease stream is open (the mounts are gone).
    pub(crate) fn wait_for_lease_streams_to_close(&self) {
        self.wait_for_streams(|open| open == 0, "lease streams stayed open");
    }

    fn wait_for_streams(&self, done: impl Fn(u64) -> bool, failure: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while !done(self.metric_sum("failsafe_lease_streams")) {
            assert!(std::time::Instant::now() < deadline, "{failure}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Which of the hosts leads the tracker now.
    pub(crate) async fn leader(&self) -> usize {
        let client = self.cluster.client().await.expect("client");
        let status = client.status().await.expect("status");
        self.cluster
            .hosts
            .iter()
            .position(|h| h.addr == status.leader_addr)
            .expect("the leader is one of ours")
    }

    pub(crate) fn mount(&mut self, zone: &str) -> usize {
        self.mount_with(zone, "")
    }

    /// A mount with `extra` mount options (comma-separated) besides the
    /// zone and cache directory.
    pub(crate) fn mount_with(&mut self, zone: &str, extra: &str) -> usize {
        self.mount_with_env(zone, extra, &[])
    }

    /// `mount_with`, the mount process started with `vars` in its
    /// environment (a clock set off by libfaketime, say).
    pub(crate) fn mount_with_env(
        &mut self,
        zone: &str,
        extra: &str,
        vars: &[(&str, String)],
    ) -> usize {
        self.mount_of(zone, "/", extra, vars)
    }

    /// A mount of the cluster's subtree `subdir`.
    pub(crate) fn mount_of(
        &mut self,
        zone: &str,
        subdir: &str,
        extra: &str,
        vars: &[(&str, String)],
    ) -> usize {
        let i = self.mounts.len();
        let path = self.dir.path().join(format!("mnt{i}"));
        let log = self.dir.path().join(format!("mount{i}.log"));
        let spec = format!("{}:{subdir}", self.cluster.addrs().join(","));
        let mut opts = format!(
            "zone={zone},cache_dir={},{}",
            self.dir.path().join(format!("cache{i}")).display(),
            self.cluster
                .mount_cred_option()
                .expect("a mount credential")
        );
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mount-failsafe"));
        cmd.envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        let m = LocalMount::start(cmd, &spec, &path, &opts, &log).expect("mount");
        self.mounts.push(Mount(m));
        i
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for m in &mut self.mounts {
            m.unmount();
        }
        if std::thread::panicking() {
            // The test's own failure comes first; the logs help explain it.
            for m in &self.mounts {
                eprintln!("--- {} ---\n{}", m.log.display(), tail(&m.log));
            }
            for l in self.cluster.log_paths() {
                eprintln!("--- {} ---\n{}", l.display(), tail(&l));
            }
            return;
        }
        let mut logs = self.cluster.log_paths();
        logs.extend(self.mounts.iter().map(|m| m.log.clone()));
        if let Err(e) = logs::check(logs.iter().map(PathBuf::as_path), &self.expected_errors) {
            panic!("{e}");
        }
    }
}

pub(crate) fn tail(p: &Path) -> String {
    logs::tail(p, 40)
}

pub(crate) fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
