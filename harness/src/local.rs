//! A cluster of real `fsd` processes on this machine, on loopback (or in
//! network namespaces), and the mounts and wikis on it: what the demo, the
//! integration tests, chaos and the benchmarks start.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use failsafe_client::{admin_for, pb, Client, ClientConfig};
use failsafe_proto::header;
use failsafe_tls::{Authority, Credential, Grant, Tls, DEFAULT_DAYS};

pub struct LocalHost {
    pub dir: PathBuf,
    pub zone: String,
    pub addr: String,
    /// Flags for this host alone, after the cluster-wide ones.
    pub extra: Vec<String>,
    /// The address it listens on (127.0.0.1 unless it has a network of its own).
    pub listen_ip: String,
    /// A network namespace (`/run/netns/NAME`) to run it in, or the caller's.
    pub netns: Option<PathBuf>,
    /// The address others reach it at when that is not the one it listens
    /// on (a relay in front of it, see [`crate::relay`]); `addr` then is this.
    pub advertise: Option<String>,
    /// The port it listens on (0 before its first start).
    pub port: u16,
    child: Option<Child>,
    frozen: bool,
}

impl LocalHost {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("fsd.log")
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }
}

/// SIGTERM `child` and wait for it to exit; SIGKILL after 10 s.
pub fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process terminated (see `terminate`) when dropped.
pub struct Stopped(pub Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

/// Starts `wiki-cgi serve` (`cmd`, possibly prepared) on `data` at a free
/// loopback port; returns once it accepts connections.
pub fn start_wiki(mut cmd: Command, data: &Path) -> anyhow::Result<(Stopped, u16)> {
    std::fs::create_dir_all(data)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = cmd
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting wiki-cgi")?;
    let w = Stopped(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "wiki-cgi did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((w, port))
}

/// Whether something is mounted at `path` (as `/proc/self/mounts` spells it).
pub fn is_mounted(path: &Path) -> bool {
    let target = path.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target.as_str()))
}

/// Makes `cmd` run in the network namespace at `ns` (`/run/netns/NAME`),
/// and only that: it keeps the caller's mounts and everything else.
pub fn in_netns(cmd: &mut Command, ns: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::open(ns)
        .with_context(|| format!("opening network namespace {}", ns.display()))?;
    // SAFETY: between fork and exec the closure only calls setns(2), which is
    // async-signal-safe; `file` is moved in and outlives the call.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd`'s process get SIGKILL when the thread that spawned it exits.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running `mount-failsafe -f`: unmounted (SIGTERM, then a lazy detach)
/// when dropped.
pub struct LocalMount {
    pub path: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    frozen: bool,
}

impl LocalMount {
    /// Mounts `spec` (`HOST:PORT,...:/`) at `path` with `-o opts`, logging to
    /// `log`; `cmd` is the `mount-failsafe` command, possibly prepared (a
    /// namespace, a parent-death signal). Returns once the path is mounted.
    pub fn start(
        mut cmd: Command,
        spec: &str,
        path: &Path,
        opts: &str,
        log: &Path,
    ) -> anyhow::Result<LocalMount> {
        std::fs::create_dir_all(path)?;
        let child = cmd
            .arg(spec)
            .arg(path)
            .arg("-f")
            .arg("-o")
            .arg(opts)
            // FAILSAFE_MOUNT_LOG: a filter for the mounts' logs when
            // chasing something (default info).
            .env(
                "RUST_LOG",
                std::env::var("FAILSAFE_MOUNT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log)?)
            .stderr(std::fs::File::options().append(true).open(log)?)
            .spawn()
            .context("starting mount-failsafe")?;
        let mut m = LocalMount {
            path: path.to_path_buf(),
            log: log.to_path_buf(),
            child: Some(child),
            frozen: false,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(path) {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                bail!(
                    "mount-failsafe exited with {st}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} was not mounted within 30 s; see {}",
                    path.display(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// The mount process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// SIGSTOP: the mount is there, but every request to it waits (a web
    /// host that hangs, or a paused VM).
    pub fn freeze(&mut self) {
        self.signal(libc::SIGSTOP);
        self.frozen = true;
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// SIGCONT: the requests that waited are served.
    pub fn thaw(&mut self) {
        self.signal(libc::SIGCONT);
        self.frozen = false;
    }

    /// SIGTERM (after SIGCONT, if frozen): the mount unmounts itself; a lazy
    /// detach if it does not.
    pub fn unmount(&mut self) {
        if self.frozen {
            self.thaw();
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

impl Drop for LocalMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

pub struct LocalCluster {
    pub hosts: Vec<LocalHost>,
    fsd: PathBuf,
    extra: Vec<String>,
    pub cluster_id: String,
    /// Hosts get SIGKILL when the thread that started them exits (for tools
    /// that may themselves be killed: nothing outlives them).
    pub die_with_parent: bool,
    /// The cluster's CA (`ca` beside the first host's directory), which
    /// issues every host, mount and admin credential; none when the hosts
    /// run `--insecure`.
    ca_dir: Option<PathBuf>,
    admin: std::sync::OnceLock<Tls>,
}

/// The environment that sets a process's wall clock `offset_s` seconds
/// off (libfaketime preloaded, Debian's `faketime`; monotonic time stays
/// true, as on a host whose wall clock is set wrong), or None when
/// libfaketime is not installed.
pub fn faketime_env(offset_s: f64) -> Option<Vec<(&'static str, String)>> {
    let lib = std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(|d| Some(d.ok()?.path().join("faketime/libfaketimeMT.so.1")))
        .find(|p| p.exists())?;
    Some(vec![
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME", format!("{offset_s:+}s")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ("DONT_FAKE_MONOTONIC", "1".to_string()),
    ])
}

/// The binary `name` next to the running one (target/debug or an install dir).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable without a directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found (build it with `cargo build --bin {name}`)",
            path.display()
        );
    }
    Ok(path)
}

impl LocalCluster {
    /// A cluster of no hosts yet; `extra` flags go to every fsd.
    pub fn new(fsd: &Path, extra: &[String]) -> LocalCluster {
        LocalCluster {
            hosts: Vec::new(),
            fsd: fsd.to_path_buf(),
            extra: extra.to_vec(),
            cluster_id: String::new(),
            die_with_parent: false,
            ca_dir: None,
            admin: std::sync::OnceLock::new(),
        }
    }

    /// Starts one fsd per zone, data dirs under `root/<zone>`, each on
    /// `base_port + i` (or a free port when `base_port` is 0).
    pub fn start(
        root: &Path,
        zones: &[&str],
        fsd: &Path,
        base_port: u16,
        extra: &[String],
    ) -> anyhow::Result<LocalCluster> {
        let mut c = LocalCluster::new(fsd, extra);
        for (i, zone) in zones.iter().enumerate() {
            let port = if base_port == 0 {
                0
            } else {
                base_port + i as u16
            };
            c.add_host(&root.join(format!("host-{zone}")), zone, port, &[])?;
        }
        Ok(c)
    }

    /// Starts one more host (not yet a member) and returns its index.
    pub fn add_host(
        &mut self,
        dir: &Path,
        zone: &str,
        port: u16,
        extra: &[String],
    ) -> anyhow::Result<usize> {
        let i = self.define_host(dir, zone, extra);
        self.spawn(i, port)?;
        Ok(i)
    }

    /// Adds a host without starting it (`start_host` starts it), so it can be
    /// given a network namespace and address first.
    pub fn define_host(&mut self, dir: &Path, zone: &str, extra: &[String]) -> usize {
        if self.ca_dir.is_none() && !self.insecure() {
            self.ca_dir = Some(dir.parent().unwrap_or(dir).join("ca"));
        }
        self.hosts.push(LocalHost {
            dir: dir.to_path_buf(),
            zone: zone.to_string(),
            addr: String::new(),
            extra: extra.to_vec(),
            listen_ip: "127.0.0.1".into(),
            netns: None,
            advertise: None,
            port: 0,
            child: None,
            frozen: false,
        });
        self.hosts.len() - 1
    }

    /// Starts a host defined with `define_host` (or stopped) on `port`.
    pub fn start_host(&mut self, i: usize, port: u16) -> anyhow::Result<()> {
        self.spawn(i, port)
    }

    /// Whether the hosts run `--insecure` (plaintext, no credentials).
    pub fn insecure(&self) -> bool {
        self.extra.iter().any(|f| f == "--insecure")
    }

    /// The cluster's CA, created on first use.
    pub fn authority(&self) -> anyhow::Result<Authority> {
        let dir = self
            .ca_dir
            .as_deref()
            .context("an --insecure cluster has no CA")?;
        if dir.join("ca.key").exists() {
            Authority::open(dir)
        } else {
            let ca = Authority::create(dir)?;
            ca.issue(&Grant::admin("admin")?, DEFAULT_DAYS)?
                .save(&dir.join("admin.cred"))?;
            Ok(ca)
        }
    }

    /// The flags that make fsctl this cluster's admin: its CA directory (in
    /// which fsctl finds `admin.cred`), or `--insecure`.
    pub fn fsctl_flags(&self) -> Vec<String> {
        match &self.ca_dir {
            Some(dir) => vec!["--ca-dir".into(), dir.display().to_string()],
            None => vec!["--insecure".into()],
        }
    }

    /// The admin credential fsctl uses (in the CA's directory).
    pub fn admin_cred_path(&self) -> Option<PathBuf> {
        self.ca_dir.as_ref().map(|d| d.join("admin.cred"))
    }

    /// How the harness itself talks to the cluster: as its admin (who may
    /// also read and write files), or plaintext when insecure.
    pub fn admin_tls(&self) -> anyhow::Result<Tls> {
        if let Some(t) = self.admin.get() {
            return Ok(t.clone());
        }
        let tls = match self.admin_cred_path() {
            None => Tls::Insecure,
            Some(path) => {
                self.authority()?;
                Tls::new(Credential::load(&path)?)?
            }
        };
        Ok(self.admin.get_or_init(|| tls).clone())
    }

    /// A new credential for `grant`, held in memory: what a test presents
    /// to try what a mount, a member or an admin may do.
    pub fn tls_for(&self, grant: &Grant) -> anyhow::Result<Tls> {
        Tls::new(self.authority()?.issue(grant, DEFAULT_DAYS)?)
    }

    /// A raw channel to the member at `addr` (connected on first use), as
    /// `tls`; for tests that send hand-made requests.
    pub fn channel_as(&self, addr: &str, tls: &Tls) -> anyhow::Result<tonic::transport::Channel> {
        Ok(tls.channel_to(addr, failsafe_tls::Expect::AnyMember, |e| {
            e.connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(20))
        })?)
    }

    /// `channel_as` the cluster's admin.
    pub fn channel(&self, addr: &str) -> anyhow::Result<tonic::transport::Channel> {
        self.channel_as(addr, &self.admin_tls()?)
    }

    /// The /metrics text of the member at `addr`, fetched as the admin
    /// (the port answers only members and admins); `None` if it did not
    /// answer within `within`.
    pub async fn metrics_at(&self, addr: &str, within: Duration) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tls = self.admin_tls().ok()?;
        let fetch = async {
            let mut s = tls
                .connect_http1(addr, failsafe_tls::Expect::AnyMember)
                .await
                .ok()?;
            let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut raw = Vec::new();
            // A TLS peer that closes without close_notify still sent it all.
            let _ = s.read_to_end(&mut raw).await;
            let raw = String::from_utf8_lossy(&raw).to_string();
            let (head, body) = raw.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| body.to_string())
        };
        tokio::time::timeout(within, fetch).await.ok().flatten()
    }

    /// The samples of metric `name` in host `i`'s /metrics (see
    /// [`metric_samples`]); none if it did not answer.
    pub fn metric_samples_of(&self, i: usize, name: &str) -> Vec<(String, f64)> {
        self.metrics_blocking(i)
            .map(|body| {
                metric_samples(&body, name)
                    .map(|(labels, v)| (labels.to_string(), v))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `metrics_at` host `i`, from code that cannot await (its own thread
    /// and runtime).
    pub fn metrics_blocking(&self, i: usize) -> Option<String> {
        let addr = self.hosts.get(i)?.addr.clone();
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(self.metrics_at(&addr, Duration::from_secs(5)))
            })
            .join()
            .ok()
            .flatten()
        })
    }

    /// A mount's credential named `name` (issued once, kept in the CA's
    /// directory); `subdir` and `read_only` as `fsctl client add` has them.
    pub fn client_cred(
        &self,
        name: &str,
        subdir: &str,
        read_only: bool,
    ) -> anyhow::Result<PathBuf> {
        let ca = self.authority()?;
        let path = ca.dir().join(format!("{name}.cred"));
        if !path.exists() {
            ca.issue(&Grant::client(name, subdir, read_only)?, DEFAULT_DAYS)?
                .save(&path)?;
        }
        Ok(path)
    }

    /// The mount option that gives a mount its credential (a full client
    /// one), or `insecure`.
    pub fn mount_cred_option(&self) -> anyhow::Result<String> {
        if self.insecure() {
            return Ok("insecure".into());
        }
        Ok(format!(
            "cred={}",
            self.client_cred("mount", "/", false)?.display()
        ))
    }

    /// Gives host `i` a credential of its own (for the host id in its data
    /// dir, if it has one) unless it holds one.
    fn ensure_host_cred(&self, i: usize) -> anyhow::Result<()> {
        if self.insecure() {
            return Ok(());
        }
        let dir = &self.hosts[i].dir;
        let path = dir.join("host.cred");
        if path.exists() {
            return Ok(());
        }
        let id = match std::fs::read_to_string(dir.join("host.id")) {
            Ok(s) => u64::from_str_radix(s.trim(), 16)?,
            Err(_) => (rand::random::<u64>() >> 1).max(1),
        };
        self.authority()?
            .issue(&Grant::member(id), DEFAULT_DAYS)?
            .save(&path)
    }

    fn spawn(&mut self, i: usize, port: u16) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.hosts[i].dir)?;
        self.ensure_host_cred(i)?;
        let h = &mut self.hosts[i];
        let addr_file = h.dir.join("fsd.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.dir.join("fsd.log"))?;
        let mut cmd = Command::new(&self.fsd);
        if let Some(ns) = &h.netns {
            in_netns(&mut cmd, ns)?;
        }
        if self.die_with_parent {
            die_with_parent(&mut cmd);
        }
        if let Some(a) = &h.advertise {
            cmd.arg("--advertise").arg(a);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&h.dir)
            .arg("--listen")
            .arg(format!("{}:{port}", h.listen_ip))
            .arg("--zone")
            .arg(&h.zone)
            .args(&self.extra)
            .args(&h.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.fsd.display()))?;
        h.child = Some(child);
        h.frozen = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file) {
                if s.ends_with('\n') {
                    let local = s.trim().to_string();
                    h.port = local
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .unwrap_or(0);
                    h.addr = h.advertise.clone().unwrap_or(local);
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = h.child.as_mut().map(Child::try_wait) {
                bail!(
                    "fsd in zone {} exited with {status}; see {}",
                    h.zone,
                    h.log_path().display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "fsd in zone {} did not start listening; see {}",
                    h.zone,
                    h.log_path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every host's log (stdout and stderr of its fsd, across restarts).
    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.hosts.iter().map(LocalHost::log_path).collect()
    }

    /// Fails on the first ERROR line in any host's log that neither
    /// openraft's expected ones (a peer killed or frozen) nor any of the
    /// `allowed` substrings match; see [`crate::logs`].
    pub fn check_logs(&self, allowed: &[&str]) -> anyhow::Result<()> {
        let logs = self.log_paths();
        crate::logs::check(logs.iter().map(PathBuf::as_path), allowed)
    }

    pub fn addrs(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.addr.clone()).collect()
    }

    /// A client of the whole cluster, as its admin.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            addrs: self.addrs(),
            cluster_id: Some(self.cluster_id.clone()),
            // A CA that cannot be read fails every call with a clear error.
            tls: self.admin_tls().unwrap_or(Tls::Insecure),
            ..ClientConfig::default()
        }
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.client_config()).await?)
    }

    /// Creates the cluster on the first host and adds the others.
    pub async fn bootstrap(&mut self) -> anyhow::Result<Client> {
        let timeout = Duration::from_secs(10);
        let first = self.hosts[0].addr.clone();
        let init = admin_for(&first, &self.admin_tls()?, timeout)?
            .init(pb::InitRequest { header: None })
            .await
            .with_context(|| format!("init at {first}"))?
            .into_inner();
        self.cluster_id = init.cluster_id;
        let client = Client::connect(ClientConfig {
            addrs: vec![first],
            ..self.client_config()
        })
        .await?;
        for i in 1..self.hosts.len() {
            self.admit(i, &client).await?;
        }
        let client = self.client().await?;
        self.wait_for(
            Duration::from_secs(30),
            "all hosts voters and devices reported",
            |s| {
                s.hosts.iter().filter(|h| h.voter).count() == self.hosts.len()
                    && s.devices.len() >= self.hosts.len()
                    && s.leader_id != 0
            },
        )
        .await?;
        Ok(client)
    }

    /// Admits started host `i` to the cluster: it adopts the cluster id, then
    /// joins as a learner that catches up and becomes a voter.
    pub async fn admit(&self, i: usize, client: &Client) -> anyhow::Result<()> {
        let addr = &self.hosts[i].addr;
        admin_for(addr, &self.admin_tls()?, Duration::from_secs(10))?
            .adopt(pb::AdoptRequest {
                header: Some(header("")),
                cluster_id: self.cluster_id.clone(),
            })
            .await
            .with_context(|| format!("adopt at {addr}"))?;
        client
            .add_host(addr)
            .await
            .with_context(|| format!("adding {addr}"))?;
        Ok(())
    }

    /// Polls the status until `cond` holds.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&pb::StatusReply) -> bool,
    ) -> anyhow::Result<pb::StatusReply> {
        let client = self.client().await?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = client.status().await {
                if cond(&s) {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        if let Some(mut child) = h.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        h.frozen = false;
    }

    /// SIGSTOP: the host is there but answers nothing.
    pub fn freeze(&mut self, i: usize) {
        self.hosts[i].signal(libc::SIGSTOP);
        self.hosts[i].frozen = true;
    }

    pub fn thaw(&mut self, i: usize) {
        self.hosts[i].signal(libc::SIGCONT);
        self.hosts[i].frozen = false;
    }

    /// Restarts a killed host with its data dir, on its old port or a new one.
    pub fn restart(&mut self, i: usize, same_port: bool) -> anyhow::Result<()> {
        self.kill(i);
        let port = if same_port { self.hosts[i].port } else { 0 };
        self.spawn(i, port)
    }

    /// Whether host `i`'s process has exited (killed from outside, crashed).
    pub fn exited(&mut self, i: usize) -> bool {
        match self.hosts[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// How host `i`'s process ended if it exited by itself (not stopped or
    /// killed through this cluster): what a supervisor (systemd's
    /// `Restart=on-failure`) acts on. Reaps it.
    pub fn exited_by_itself(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let h = &mut self.hosts[i];
        let status = h.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        h.child = None;
        h.frozen = false;
        Some(status)
    }

    /// SIGTERM one host and wait for it to exit (SIGKILL after 10 s).
    pub fn stop(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        if h.frozen {
            h.signal(libc::SIGCONT);
            h.frozen = false;
        }
        if let Some(mut child) = h.child.take() {
            terminate(&mut child);
        }
    }

    /// A clean restart (SIGTERM, then start again on the same port).
    pub fn restart_graceful(&mut self, i: usize) -> anyhow::Result<()> {
        let port = self.hosts[i].port;
        self.stop(i);
        self.spawn(i, port)
    }

    /// SIGTERM every host and wait for it; SIGKILL what does not stop.
    pub fn stop_all(&mut self) {
        for h in &mut self.hosts {
            if h.frozen {
                h.signal(libc::SIGCONT);
                h.frozen = false;
            }
            h.signal(libc::SIGTERM);
        }
        for h in &mut self.hosts {
            // All were signalled above, so they stop in parallel; this waits.
            if let Some(mut child) = h.child.take() {
                terminate(&mut child);
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if h.frozen {
                h.signal(libc::SIGCONT);
            }
            if let Some(mut child) = h.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The samples of metric `name` in Prometheus text `body`: each one's labels
/// (what is between the braces, empty without them) and value. Only lines
/// of that very name: not those of a longer name it begins.
pub fn metric_samples<'a>(body: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> {
    body.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse().ok()?))
    })
}

/// The value of `label` in a sample's labels (`why` in `host="1",why="hot"`
/// is `hot`).
pub fn label_value<'a>(labels: &'a str, label: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == label).then(|| v.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_samples_are_read_by_exact_name_with_their_labels() {
        let body = "# HELP failsafe_x Things\n# TYPE failsafe_x counter\n\
                    failsafe_x{host=\"01\",why=\"hot\"} 3\n\
                    failsafe_x{host=\"01\",why=\"changing\"} 4.5\n\
                    failsafe_x_total 9\n\
                    failsafe_y 2\n";
        let got: Vec<(&str, f64)> = metric_samples(body, "failsafe_x").collect();
        assert_eq!(
            got,
            vec![
                ("host=\"01\",why=\"hot\"", 3.0),
                ("host=\"01\",why=\"changing\"", 4.5)
            ]
        );
        assert_eq!(label_value(got[1].0, "why"), Some("changing"));
        assert_eq!(label_value(got[1].0, "zone"), None);
        assert_eq!(
            metric_samples(body, "failsafe_y").collect::<Vec<_>>(),
            vec![("", 2.0)]
        );
    }
}
