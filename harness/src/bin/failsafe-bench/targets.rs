//! The three targets the workloads run on: a local directory, a bindfs
//! passthrough of a local directory, and a failsafe mount of a fresh 3-host
//! loopback cluster. Each knows how to make its caches cold and, for
//! failsafe, where the mount's round-trip counters are.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use failsafe_harness::local::{
    die_with_parent, is_mounted, sibling_binary, LocalCluster, LocalMount,
};

/// `--mount-options`: added to every failsafe mount's options.
pub(crate) static MOUNT_EXTRA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--insecure`: hosts and mounts without TLS.
pub(crate) static INSECURE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The flags every fsd of the bench gets (`--insecure`, when asked for).
pub(crate) fn fsd_flags() -> Vec<String> {
    if INSECURE.get().copied().unwrap_or(false) {
        vec!["--insecure".to_string()]
    } else {
        Vec::new()
    }
}

/// `opts` with `--mount-options` added.
pub(crate) fn with_extra(mut opts: String) -> String {
    if let Some(extra) = MOUNT_EXTRA.get() {
        opts.push(',');
        opts.push_str(extra);
    }
    opts
}

/// The mount's stats file as read at one moment (see `RoundTrips`).
pub(crate) type Snapshot = serde_json::Value;

pub(crate) enum Kind {
    Local,
    /// Held for its Drop: unmounts.
    Bindfs {
        _mount: BindfsMount,
    },
    Failsafe(Box<Failsafe>),
}

pub(crate) struct Target {
    pub(crate) name: &'static str,
    /// Where the workloads run.
    pub(crate) path: PathBuf,
    pub(crate) kind: Kind,
    /// What was started, for the report.
    pub(crate) setup: String,
}

/// `echo 3 > /proc/sys/vm/drop_caches` after a sync: the page, dentry and
/// inode caches of every filesystem, FUSE ones included.
pub(crate) fn drop_caches() -> anyhow::Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .context("writing 3 to /proc/sys/vm/drop_caches (needs root)")
}

impl Target {
    pub(crate) fn local(root: &Path) -> anyhow::Result<Target> {
        let path = root.join("local");
        std::fs::create_dir_all(&path)?;
        Ok(Target {
            name: "local",
            setup: format!("a directory, {}", path.display()),
            path,
            kind: Kind::Local,
        })
    }

    pub(crate) fn bindfs(root: &Path, bindfs: &Path) -> anyhow::Result<Target> {
        let m = BindfsMount::start(bindfs, &root.join("bindfs-src"), &root.join("bindfs-mnt"))?;
        Ok(Target {
            name: "bindfs",
            setup: format!(
                "`bindfs -f {} {}` (defaults)",
                m.src.display(),
                m.mnt.display()
            ),
            path: m.mnt.clone(),
            kind: Kind::Bindfs { _mount: m },
        })
    }

    pub(crate) fn failsafe(
        root: &Path,
        rt: &tokio::runtime::Runtime,
        stats: bool,
    ) -> anyhow::Result<Target> {
        let f = Failsafe::start(root, rt, stats, false)?;
        let path = f.mnt.join("bench");
        std::fs::create_dir_all(&path)?;
        Ok(Target {
            name: "failsafe",
            setup: format!(
                "3 fsd hosts (zones a, b, c) on loopback, data under {}; `mount-failsafe -o {}`",
                f.root.display(),
                f.opts(0)
            ),
            path,
            kind: Kind::Failsafe(Box::new(f)),
        })
    }

    /// Makes the next reads cold; says how, for the report. For failsafe a
    /// fresh mount (new process, empty block cache) and dropped kernel
    /// caches (so the hosts read from disk too); for the others dropped
    /// kernel caches. If caches cannot be dropped the reads are warm, and
    /// the note says so.
    pub(crate) fn make_cold(&mut self) -> anyhow::Result<String> {
        let dropped = drop_caches();
        let mut note = match &dropped {
            Ok(()) => "caches dropped".to_string(),
            Err(e) => format!("NOT cold: could not drop caches ({e:#})"),
        };
        if let Kind::Failsafe(f) = &mut self.kind {
            f.remount()?;
            note = format!("fresh mount, empty block cache; {note}");
        }
        if dropped.is_err() {
            eprintln!("failsafe-bench: {}: {note}", self.name);
        }
        Ok(note)
    }

    /// The mount's round-trip counters now, if it writes them.
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        match &self.kind {
            Kind::Failsafe(f) => f.read_stats(),
            _ => None,
        }
    }

    pub(crate) fn as_failsafe(&self) -> Option<&Failsafe> {
        match &self.kind {
            Kind::Failsafe(f) => Some(f),
            _ => None,
        }
    }
}

/// `bindfs -f SRC MNT`, a child of ours: unmounted (and the child reaped)
/// when dropped.
pub(crate) struct BindfsMount {
    src: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
}

impl BindfsMount {
    fn start(bindfs: &Path, src: &Path, mnt: &Path) -> anyhow::Result<BindfsMount> {
        std::fs::create_dir_all(src)?;
        std::fs::create_dir_all(mnt)?;
        let mut cmd = Command::new(bindfs);
        die_with_parent(&mut cmd);
        let child = cmd
            .arg("-f")
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bindfs.display()))?;
        let mut m = BindfsMount {
            src: src.to_path_buf(),
            mnt: mnt.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mounted(mnt) {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                bail!("bindfs exited with {st}");
            }
            if Instant::now() > deadline {
                bail!("bindfs did not mount {} within 10 s", mnt.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for BindfsMount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(mut child) = self.child.take() {
            // bindfs exits once unmounted; terminate it if it has not.
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            failsafe_harness::local::terminate(&mut child);
        }
    }
}

/// A fresh cluster of three hosts and one mount on it (zone a).
pub(crate) struct Failsafe {
    pub(crate) root: PathBuf,
    pub(crate) cluster: LocalCluster,
    pub(crate) mnt: PathBuf,
    mount: Option<LocalMount>,
    mount_bin: PathBuf,
    spec: String,
    /// Mounts so far (each gets an empty block cache of its own).
    generation: u32,
    /// The mount's `stats=PATH`, when the mount has that option.
    pub(crate) stats: Option<PathBuf>,
    /// Mounted with `allow_other` (users other than root, such as the web
    /// server's www-data, may use it).
    allow_other: bool,
}

/// Whether this `mount-failsafe` has the `stats=PATH` option (its usage
/// lists the options).
pub(crate) fn mount_has_stats_option() -> bool {
    let Ok(bin) = sibling_binary("mount-failsafe") else {
        return false;
    };
    Command::new(bin)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).contains("stats=")
        })
        .unwrap_or(false)
}

impl Failsafe {
    /// Starts three hosts under `root/failsafe`, bootstraps them and mounts
    /// the cluster at `root/failsafe/mnt`.
    pub(crate) fn start(
        root: &Path,
        rt: &tokio::runtime::Runtime,
        stats: bool,
        allow_other: bool,
    ) -> anyhow::Result<Failsafe> {
        let root = root.join("failsafe");
        std::fs::create_dir_all(&root)?;
        let fsd = sibling_binary("fsd")?;
        let mut cluster = LocalCluster::new(&fsd, &fsd_flags());
        cluster.die_with_parent = true;
        for zone in ["a", "b", "c"] {
            cluster.add_host(&root.join(format!("host-{zone}")), zone, 0, &[])?;
        }
        rt.block_on(cluster.bootstrap())
            .context("bootstrapping the cluster")?;
        let spec = format!("{}:/", cluster.addrs().join(","));
        let mut f = Failsafe {
            mnt: root.join("mnt"),
            cluster,
            mount: None,
            mount_bin: sibling_binary("mount-failsafe")?,
            spec,
            generation: 0,
            stats: stats.then(|| root.join("mount-stats.json")),
            allow_other,
            root,
        };
        f.mount()?;
        Ok(f)
    }

    pub(crate) fn opts(&self, generation: u32) -> String {
        let mut o = format!(
            "zone=a,cache_dir={},{}",
            self.root.join(format!("cache-{generation}")).display(),
            self.cluster
                .mount_cred_option()
                .unwrap_or_else(|_| "insecure".into())
        );
        if self.allow_other {
            o.push_str(",allow_other");
        }
        if let Some(s) = &self.stats {
            o.push_str(&format!(",stats={}", s.display()));
        }
        with_extra(o)
    }

    fn mount(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.mount_bin);
        die_with_parent(&mut cmd);
        let opts = self.opts(self.generation);
        let log = self.root.join(format!("mount-{}.log", self.generation));
        self.mount = Some(LocalMount::start(cmd, &self.spec, &self.mnt, &opts, &log)?);
        self.generation += 1;
        Ok(())
    }

    /// A new mount process with an empty block cache.
    fn remount(&mut self) -> anyhow::Result<()> {
        if let Some(mut m) = self.mount.take() {
            m.unmount();
        }
        if let Some(s) = &self.stats {
            let _ = std::fs::remove_file(s);
        }
        // Dropped after the unmount, so nothing of the old mount is cached.
        let _ = drop_caches();
        self.mount()
    }

    fn read_stats(&self) -> Option<Snapshot> {
        let path = self.stats.as_ref()?;
        // The mount rewrites the file every second: wait for a write that
        // began after the operations just done.
        let mut stats = crate::cities::fresh_stats(path)?;
        // With the cluster's lease grants refused so far, by why, summed
        // over the hosts: a row whose lookups go to the leader says why.
        if let Some(o) = stats.as_object_mut() {
            o.insert("cluster_lease_refused".into(), self.lease_refusals());
        }
        Some(stats)
    }

    /// `failsafe_lease_grants_refused_total` of every host, summed by why.
    fn lease_refusals(&self) -> serde_json::Value {
        let mut by_why = serde_json::Map::new();
        for i in 0..self.cluster.hosts.len() {
            let samples = self
                .cluster
                .metric_samples_of(i, "failsafe_lease_grants_refused_total");
            for (labels, n) in samples {
                if let Some(why) = failsafe_harness::local::label_value(&labels, "why") {
                    let sum = by_why.get(why).and_then(|v| v.as_u64()).unwrap_or(0) + n as u64;
                    by_why.insert(why.to_string(), sum.into());
                }
            }
        }
        serde_json::Value::Object(by_why)
    }

    /// The processes of the cluster and the mount, by what they are.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .cluster
            .hosts
            .iter()
            .filter_map(|h| Some((format!("fsd (zone {})", h.zone), h.pid()?)))
            .collect();
        if let Some(p) = self.mount.as_ref().and_then(LocalMount::pid) {
            v.push(("mount".into(), p));
        }
        v
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut m) = self.mount.take() {
            m.unmount();
        }
        self.cluster.stop_all();
    }
}

impl Drop for Failsafe {
    fn drop(&mut self) {
        self.stop();
    }
}
