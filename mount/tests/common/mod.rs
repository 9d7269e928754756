//! Real FUSE mounts of a real three-host cluster.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use failsafe_fsd::local::is_mounted;
use failsafe_fsd::local::{sibling_binary, terminate, LocalCluster};

pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Mount {
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// SIGTERM: the mount unmounts itself; a lazy detach if it does not.
    pub fn unmount(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

pub struct Env {
    pub cluster: LocalCluster,
    pub dir: tempfile::TempDir,
    pub mounts: Vec<Mount>,
}

impl Env {
    /// Three hosts in zones a, b, c and `n` mounts of the cluster's root.
    pub async fn start(n: usize) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let fsd = sibling_binary("fsd").expect("the fsd binary (cargo build --bins)");
        let mut cluster = LocalCluster::start(dir.path(), &["a", "b", "c"], &fsd, 0, &[]).expect("start hosts");
        cluster.bootstrap().await.expect("bootstrap");
        let mut env = Env { cluster, dir, mounts: Vec::new() };
        for i in 0..n {
            let zone = ["a", "b", "c"][i % 3];
            env.mount(zone);
        }
        env
    }

    pub fn mount(&mut self, zone: &str) -> usize {
        let i = self.mounts.len();
        let path = self.dir.path().join(format!("mnt{i}"));
        std::fs::create_dir_all(&path).unwrap();
        let log = self.dir.path().join(format!("mount{i}.log"));
        let spec = format!("{}:/", self.cluster.addrs().join(","));
        let opts = format!("zone={zone},cache_dir={}", self.dir.path().join(format!("cache{i}")).display());
        let child = Command::new(env!("CARGO_BIN_EXE_mount-failsafe"))
            .arg(&spec)
            .arg(&path)
            .arg("-f")
            .arg("-o")
            .arg(opts)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("start mount-failsafe");
        let mut m = Mount { path: path.clone(), child: Some(child), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&path) {
            if let Some(Ok(Some(s))) = m.child.as_mut().map(Child::try_wait) {
                panic!("mount exited with {s}: {}", std::fs::read_to_string(&m.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        m.child.as_ref().expect("child");
        self.mounts.push(m);
        i
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for m in &mut self.mounts {
            m.unmount();
        }
        if std::thread::panicking() {
            for m in &self.mounts {
                eprintln!("--- {} ---\n{}", m.log.display(), tail(&m.log));
            }
        }
    }
}

pub fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}
