//! What a run builds: the network (when it can), the hosts, the mounts, and
//! the faults done to them. Dropping a `World` removes all of it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use failsafe_client::{pb, Client};
use failsafe_harness::local::{
    die_with_parent, faketime_env, in_netns, sibling_binary, terminate, LocalCluster, LocalMount,
};
use failsafe_harness::relay::{self, Links};

use crate::scenario::{mount_target, FaultKind, Latency, Scenario, TrackerFs};
use failsafe_harness::netns::Net;

/// fsd's port when every host has an address of its own.
const PORT: u16 = 7000;
/// With latency, fsd listens here on the namespace's loopback, behind the
/// relay that holds `PORT` on every address of the namespace.
const BEHIND_RELAY: u16 = 7001;

/// What a fault is done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Target {
    /// A storage host, by index.
    Host(usize),
    /// A mount (a web host's `mount-failsafe`), by index.
    Mount(usize),
}

pub(crate) struct World {
    pub net: Option<Net>,
    pub cluster: LocalCluster,
    pub mounts: Vec<LocalMount>,
    pub work: PathBuf,
    /// Disks mounted for the run (tmpfs devices, ext4 tracker images), unmounted at the end.
    disks: Vec<PathBuf>,
    /// Fillers written by `device_full`, by host.
    fillers: Vec<Option<PathBuf>>,
    /// The same for each host's tracker disk (`tracker_full`).
    tracker_fillers: Vec<Option<PathBuf>>,
    /// Size of each host's tracker disk (0: none of its own).
    tracker_mb: u64,
    tracker_fs: TrackerFs,
    /// Tracker disks stalled by `tracker_stall`, by host (released first
    /// at teardown).
    stalled: Vec<(usize, IoStall)>,
    /// Each host's block device directory.
    pub devices: Vec<PathBuf>,
    zones: Vec<String>,
    /// Blocks the bitrot fault prefers: ones that stay referenced and read.
    pub bitrot_candidates: Vec<String>,
    bitrot_next: usize,
    /// Cities: the delays, each mount's zone, and each host's relay.
    latency: Option<Latency>,
    client_zones: Vec<String>,
    relays: Vec<Option<std::process::Child>>,
    /// Extra options for every mount (the scenario's, or `--mount-options`).
    mount_options: String,
    /// Each web host's clock offset in seconds (`webhost_clocks_s`).
    clocks: Vec<f64>,
    /// Each web host's own extra mount options (`webhost_options`).
    own_options: Vec<String>,
}

/// Runs `cmd` with its clock `offset_s` seconds off.
pub(crate) fn skew_clock(cmd: &mut Command, offset_s: f64) -> anyhow::Result<()> {
    if offset_s == 0.0 {
        return Ok(());
    }
    let vars = faketime_env(offset_s)
        .context("a web host's clock offset needs libfaketime: apt-get install faketime")?;
    cmd.envs(vars);
    Ok(())
}

impl World {
    /// Builds the network (if `use_net`), starts and bootstraps the hosts,
    /// and mounts the clients.
    pub(crate) async fn build(
        s: &Scenario,
        work: &Path,
        net: Option<Net>,
    ) -> anyhow::Result<World> {
        let fsd = sibling_binary("fsd")?;
        let mut flags = vec!["--report-interval-ms".to_string(), "1000".to_string()];
        flags.extend(s.fsd_flags.iter().cloned());
        let mut cluster = LocalCluster::new(&fsd, &flags);
        cluster.die_with_parent = true;
        let mut w = World {
            net,
            cluster,
            mounts: Vec::new(),
            work: work.to_path_buf(),
            disks: Vec::new(),
            fillers: Vec::new(),
            tracker_fillers: Vec::new(),
            tracker_mb: s.tracker_mb,
            tracker_fs: s.tracker_fs,
            stalled: Vec::new(),
            devices: Vec::new(),
            zones: Vec::new(),
            bitrot_candidates: Vec::new(),
            bitrot_next: 0,
            latency: s.latency.clone(),
            client_zones: (0..s.clients)
                .map(|c| s.zones[c % s.zones.len()].clone())
                .collect(),
            relays: Vec::new(),
            mount_options: s.mount_options.clone(),
            clocks: s.webhost_clocks_s.clone(),
            own_options: s.webhost_options.clone(),
        };
        if w.latency.is_some() && w.net.is_none() {
            bail!("latency needs network namespaces (root and iproute2)");
        }
        for zone in &s.zones {
            w.start_new_host(zone, s.device_mb)?;
        }
        w.cluster.bootstrap().await?;
        for c in 0..s.clients {
            let zone = w.client_zones[c].clone();
            w.mount(c, &zone)?;
        }
        Ok(w)
    }

    fn links_file(&self, i: usize) -> PathBuf {
        self.work.join(format!("links-h{i}"))
    }

    /// Writes every relay's links file: the one-way delay from each host's
    /// and each mount's address to that relay's host, by their zones.
    fn write_links(&self) -> anyhow::Result<()> {
        let (Some(lat), Some(net)) = (&self.latency, &self.net) else {
            return Ok(());
        };
        for (i, zone) in self.zones.iter().enumerate() {
            let mut links = Links::default();
            for (k, other) in self.zones.iter().enumerate() {
                let ip = net.host_ips[k].parse()?;
                links.by_ip.insert(ip, lat.one_way(zone, other));
            }
            for (c, other) in self.client_zones.iter().enumerate() {
                let ip = net.client_ip(c).parse()?;
                links.by_ip.insert(ip, lat.one_way(zone, other));
            }
            links.write(&self.links_file(i))?;
        }
        Ok(())
    }

    /// Starts the relay in front of host `i` (in its namespace), which
    /// holds `PORT` on every address there and forwards to fsd's loopback port.
    fn start_relay(&mut self, i: usize) -> anyhow::Result<()> {
        let net = self.net.as_ref().context("relays need namespaces")?;
        let child = relay::spawn_in_netns(
            &Net::ns_path(&net.host_ns(i)),
            &format!("0.0.0.0:{PORT}"),
            &format!("127.0.0.1:{BEHIND_RELAY}"),
            &self.links_file(i),
            &self.work.join(format!("relay-h{i}.log")),
            &format!("{}:{PORT}", net.host_ips[i]),
        )?;
        self.relays.resize_with(i + 1, || None);
        self.relays[i] = Some(child);
        Ok(())
    }

    /// Times single operations through the latency relays before the
    /// workload starts, and fails if a commit was faster than one round trip
    /// between two zones (the relays would not be delaying): from each
    /// mount, three times, a 6000-byte file created, written and fsynced,
    /// then read from another mount; and `fsctl status` from mount 0's
    /// namespace to a host of its own zone and of another.
    pub(crate) async fn probe_cities(&self) -> anyhow::Result<Vec<String>> {
        use std::io::{Read, Write};
        let (Some(lat), Some(net)) = (&self.latency, &self.net) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut min_rtt: Option<Duration> = None;
        for a in &self.zones {
            for b in self.zones.iter().filter(|b| *b != a) {
                let rtt = lat.one_way(a, b) * 2;
                min_rtt = Some(min_rtt.map_or(rtt, |m| m.min(rtt)));
            }
        }
        let leader = self.leader().await.map(|l| self.zones[l].clone());
        out.push(format!(
            "leader in zone {}; one way between zones {}",
            leader.as_deref().unwrap_or("?"),
            self.zones
                .iter()
                .enumerate()
                .flat_map(|(i, a)| self.zones[i + 1..].iter().map(move |b| (a, b)))
                .map(|(a, b)| format!("{a}-{b} {} ms", lat.one_way(a, b).as_millis()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let data = vec![b'p'; 6000];
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        for (i, m) in self.mounts.iter().enumerate() {
            let o = (i + 1) % self.mounts.len();
            // The first round opens connections; the later ones are warm.
            let (mut writes, mut reads) = (Vec::new(), Vec::new());
            for round in 0..3 {
                let name = format!("cities-probe-{i}-{round}");
                let t = std::time::Instant::now();
                let mut f = std::fs::File::create(m.path.join(&name))?;
                f.write_all(&data)?;
                f.sync_all()?;
                drop(f);
                let write = t.elapsed();
                if let Some(min) = min_rtt.filter(|m| !m.is_zero()) {
                    if write < min {
                        bail!(
                            "a fsynced write from mount {i} took {write:?}, less than a round trip between zones ({min:?}): the latency relays are not delaying"
                        );
                    }
                }
                let t = std::time::Instant::now();
                let mut back = Vec::new();
                std::fs::File::open(self.mounts[o].path.join(&name))?.read_to_end(&mut back)?;
                let read = t.elapsed();
                if back != data {
                    bail!("the probe file of mount {i} read back different bytes");
                }
                std::fs::remove_file(m.path.join(&name))?;
                writes.push(ms(write));
                reads.push(ms(read));
            }
            out.push(format!(
                "mount {i} (zone {}): create+write+fsync+close of 6000 bytes {} ms; mount {o} (zone {}) opens and reads it {} ms",
                self.client_zones[i],
                writes.join(", "),
                self.client_zones[o],
                reads.join(", "),
            ));
        }
        let fsctl = sibling_binary("fsctl")?;
        let zone0 = self.client_zones[0].clone();
        let mut seen = std::collections::HashSet::new();
        for (h, z) in self.zones.iter().enumerate() {
            if !seen.insert(z == &zone0) {
                continue;
            }
            let mut cmd = Command::new(&fsctl);
            in_netns(&mut cmd, &Net::ns_path(&net.client_ns(0)))?;
            cmd.args(self.cluster.fsctl_flags())
                .args(["--cluster", &self.cluster.hosts[h].addr, "status"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let t = std::time::Instant::now();
            // 0 fail-safe, 1 limping: both are answers.
            let ok = matches!(cmd.status()?.code(), Some(0 | 1));
            let took = t.elapsed();
            out.push(format!(
                "fsctl status (a new process) from mount 0's namespace (zone {zone0}) to host {h} (zone {z}, one way {} ms): {} ms{}",
                lat.one_way(&zone0, z).as_millis(),
                ms(took),
                if ok { "" } else { " (failed)" }
            ));
        }
        Ok(out)
    }

    /// Mounts a tmpfs of `mb` MiB at `at`, unmounted at teardown.
    fn mount_tmpfs(&mut self, at: &Path, mb: u64) -> anyhow::Result<()> {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m"),
                "failsafe-chaos",
            ])
            .arg(at)
            .status()
            .context("mount tmpfs")?;
        if !ok.success() {
            bail!("could not mount a {mb} MiB tmpfs at {}", at.display());
        }
        self.disks.push(at.to_path_buf());
        Ok(())
    }

    /// Mounts a fresh ext4 image of `tracker_mb` MiB (a loop device) at
    /// `at`, unmounted at teardown (the loop device goes with it).
    fn mount_ext4(&mut self, image: &Path, at: &Path) -> anyhow::Result<()> {
        std::fs::File::create(image)?.set_len(self.tracker_mb << 20)?;
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .status()
            .context("mkfs.ext4 (e2fsprogs)")?;
        let mounted = made.success()
            && Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(at)
                .status()
                .context("mount -o loop")?
                .success();
        if !mounted {
            bail!("could not mount an ext4 image at {}", at.display());
        }
        self.disks.push(at.to_path_buf());
        Ok(())
    }

    /// Defines and starts one more fsd (not yet a member) in `zone`.
    fn start_new_host(&mut self, zone: &str, device_mb: u64) -> anyhow::Result<usize> {
        let i = self.cluster.hosts.len();
        let dir = self.work.join(format!("host{i}-{zone}"));
        let dev = dir.join("dev");
        std::fs::create_dir_all(&dev)?;
        if device_mb > 0 {
            self.mount_tmpfs(&dev, device_mb)?;
        }
        if self.tracker_mb > 0 {
            let tracker = dir.join("tracker");
            std::fs::create_dir_all(&tracker)?;
            match self.tracker_fs {
                TrackerFs::Tmpfs => self.mount_tmpfs(&tracker, self.tracker_mb)?,
                TrackerFs::Ext4 => self.mount_ext4(&dir.join("tracker.img"), &tracker)?,
            }
        }
        let h = self.cluster.define_host(
            &dir,
            zone,
            &["--device".to_string(), dev.display().to_string()],
        );
        self.devices.push(dev);
        self.fillers.push(None);
        self.tracker_fillers.push(None);
        self.zones.push(zone.to_string());
        let cities = self.latency.is_some();
        let port = match self.net.as_mut() {
            Some(net) => {
                let n = if h < net.host_ips.len() {
                    h
                } else {
                    net.add_host()?
                };
                let host = &mut self.cluster.hosts[h];
                host.netns = Some(Net::ns_path(&net.host_ns(n)));
                if cities {
                    host.listen_ip = "127.0.0.1".into();
                    host.advertise = Some(format!("{}:{PORT}", net.host_ips[n]));
                    BEHIND_RELAY
                } else {
                    host.listen_ip = net.host_ips[n].clone();
                    PORT
                }
            }
            None => 0,
        };
        if cities {
            self.write_links()?;
            self.start_relay(h)?;
        }
        self.cluster.start_host(h, port)?;
        Ok(h)
    }

    /// A blank box joins: a new host in `zone`, admitted to the cluster (a
    /// learner that catches up, then a voter); copies reach it by rebalancing.
    pub(crate) async fn add_host(&mut self, zone: &str, device_mb: u64) -> anyhow::Result<usize> {
        let h = self.start_new_host(zone, device_mb)?;
        let client = self.client().await?;
        self.cluster.admit(h, &client).await?;
        Ok(h)
    }

    /// The cluster's id for host `i`.
    async fn host_id(&self, i: usize) -> anyhow::Result<u64> {
        let s = self.status().await.context("no status")?;
        let addr = &self.cluster.hosts[i].addr;
        Ok(s.hosts
            .iter()
            .find(|h| h.addr == *addr)
            .with_context(|| format!("host {i} ({addr}) not in the status"))?
            .host_id)
    }

    /// Ships host `i` (refused if that would put files at risk), then shuts
    /// it down; returns the blocks it holds.
    pub(crate) async fn ship(&mut self, i: usize) -> anyhow::Result<u64> {
        let id = self.host_id(i).await?;
        let r = self.client().await?.ship_host(id, 3_600_000, false).await?;
        if !r.shipped {
            bail!("ship of host {i} refused: files at risk {:?}", r.at_risk);
        }
        self.cluster.stop(i);
        Ok(r.blocks_held)
    }

    /// Starts draining host `i`; returns the blocks it must move.
    pub(crate) async fn drain(&mut self, i: usize) -> anyhow::Result<u64> {
        let id = self.host_id(i).await?;
        Ok(self.client().await?.drain_host(id).await?.to_move)
    }

    /// Waits (up to `timeout`) until nothing depends on draining host `i`,
    /// removes it from the cluster and stops it.
    pub(crate) async fn remove_drained(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let id = self.host_id(i).await?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = self
                .status()
                .await
                .and_then(|s| s.hosts.iter().find(|h| h.host_id == id).map(|h| h.to_move));
            if left == Some(0) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("host {i} still has {left:?} blocks to move after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.client().await?.remove_host(id, false).await?;
        self.cluster.stop(i);
        Ok(())
    }

    fn mount(&mut self, i: usize, zone: &str) -> anyhow::Result<()> {
        let spec = format!("{}:/", self.cluster.addrs().join(","));
        let mut opts = format!(
            "zone={zone},cache_dir={},{}",
            self.work.join(format!("cache{i}")).display(),
            self.cluster.mount_cred_option()?
        );
        let own = self.own_options.get(i).map_or("", String::as_str);
        for extra in [self.mount_options.as_str(), own] {
            if !extra.is_empty() {
                opts = format!("{opts},{extra}");
            }
        }
        let mut cmd = Command::new(sibling_binary("mount-failsafe")?);
        if let Some(net) = &self.net {
            in_netns(&mut cmd, &Net::ns_path(&net.client_ns(i)))?;
        }
        die_with_parent(&mut cmd);
        skew_clock(&mut cmd, self.clock(i))?;
        let path = self.work.join(format!("mnt{i}"));
        let m = LocalMount::start(
            cmd,
            &spec,
            &path,
            &opts,
            &self.work.join(format!("mount{i}.log")),
        )
        .with_context(|| format!("mount {i}"))?;
        self.mounts.push(m);
        Ok(())
    }

    /// Web host `i`'s clock offset in seconds.
    pub(crate) fn clock(&self, i: usize) -> f64 {
        self.clocks.get(i).copied().unwrap_or(0.0)
    }

    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        self.cluster.client().await
    }

    /// The cluster status, from whichever member answers.
    pub(crate) async fn status(&self) -> Option<pb::StatusReply> {
        // Connecting is bounded too: a member whose answers are lost would
        // hold a connect for minutes.
        tokio::time::timeout(Duration::from_secs(3), async {
            self.client().await.ok()?.status().await.ok()
        })
        .await
        .ok()?
    }

    /// The host index the status names as leader.
    pub(crate) async fn leader(&self) -> Option<usize> {
        let s = self.status().await?;
        let addr = s
            .hosts
            .iter()
            .find(|h| h.host_id == s.leader_id)?
            .addr
            .clone();
        self.cluster.hosts.iter().position(|h| h.addr == addr)
    }

    /// Resolves a fault target to a mount ("mount:N") or a host index.
    pub(crate) async fn resolve(&self, target: &str, pick: usize) -> anyhow::Result<Target> {
        if let Some(m) = mount_target(target) {
            if m >= self.mounts.len() {
                bail!("no mount {m}");
            }
            return Ok(Target::Mount(m));
        }
        self.resolve_host(target, pick).await.map(Target::Host)
    }

    /// Resolves a fault target to a host index.
    async fn resolve_host(&self, target: &str, pick: usize) -> anyhow::Result<usize> {
        let n = self.cluster.hosts.len();
        if let Some(i) = target
            .strip_prefix("host:")
            .and_then(|s| s.parse::<usize>().ok())
        {
            return Ok(i);
        }
        if let Some(z) = target.strip_prefix("zone:") {
            return self
                .zones
                .iter()
                .position(|x| x == z)
                .context("no such zone");
        }
        let leader = self.leader().await;
        match target {
            "leader" => leader.context("no leader to target"),
            _ => {
                let l = leader.unwrap_or(n);
                let followers: Vec<usize> = (0..n).filter(|i| *i != l).collect();
                Ok(followers[pick % followers.len()])
            }
        }
    }

    fn net(&mut self, kind: FaultKind) -> anyhow::Result<&mut Net> {
        self.net
            .as_mut()
            .with_context(|| format!("{kind:?} needs network namespaces (root and iproute2)"))
    }

    /// Stops mount `m`'s process (SIGSTOP): every request to it waits,
    /// its lease stream goes quiet; returns a description.
    pub(crate) fn freeze_mount(&mut self, m: usize) -> anyhow::Result<String> {
        let zone = self.client_zones.get(m).context("no such mount")?.clone();
        self.mounts.get_mut(m).context("no such mount")?.freeze();
        Ok(format!("SIGSTOP mount {m} (zone {zone})"))
    }

    /// SIGCONT to mount `m`: the requests that waited are served.
    pub(crate) fn thaw_mount(&mut self, m: usize) -> anyhow::Result<String> {
        self.mounts.get_mut(m).context("no such mount")?.thaw();
        Ok(format!("mount {m} thawed"))
    }

    /// Thaws every mount still frozen (a run cut short): the workload's
    /// threads wait on them.
    pub(crate) fn thaw_mounts(&mut self) {
        for m in self.mounts.iter_mut().filter(|m| m.is_frozen()) {
            m.thaw();
        }
    }

    /// Starts fault `kind` on host `i`; returns a description.
    pub(crate) fn start_fault(&mut self, kind: FaultKind, i: usize) -> anyhow::Result<String> {
        let zone = self.zones[i].clone();
        Ok(match kind {
            FaultKind::Kill9 | FaultKind::LeaderKill => {
                self.cluster.kill(i);
                format!("kill -9 host {i} (zone {zone})")
            }
            FaultKind::Freeze => {
                self.cluster.freeze(i);
                format!("SIGSTOP host {i} (zone {zone})")
            }
            FaultKind::Unplug => {
                self.net(kind)?.set_cable(i, false)?;
                format!("cable of host {i} (zone {zone}) pulled")
            }
            FaultKind::ZoneCut => {
                let zones = self.zones.clone();
                let net = self.net(kind)?;
                for a in (0..zones.len()).filter(|a| zones[*a] == zone) {
                    for b in (0..zones.len()).filter(|b| zones[*b] != zone) {
                        let (an, aip, bn, bip) = (
                            net.host_ns(a),
                            net.host_ips[a].clone(),
                            net.host_ns(b),
                            net.host_ips[b].clone(),
                        );
                        net.cut(&an, &aip, &bn, &bip)?;
                    }
                }
                format!("zone {zone} cut off from the other zones (its clients still reach it)")
            }
            FaultKind::ClientsCut => {
                let zones = self.zones.clone();
                let clients = self.mounts.len();
                let net = self.net(kind)?;
                for a in (0..zones.len()).filter(|a| zones[*a] == zone) {
                    for c in 0..clients {
                        let (an, aip, cn, cip) = (
                            net.host_ns(a),
                            net.host_ips[a].clone(),
                            net.client_ns(c),
                            net.client_ip(c),
                        );
                        net.cut(&an, &aip, &cn, &cip)?;
                    }
                }
                format!("zone {zone} cut off from every client (it still reaches the other zones)")
            }
            FaultKind::AnswersLost => {
                let zones = self.zones.clone();
                let clients = self.mounts.len();
                let net = self.net(kind)?;
                for a in (0..zones.len()).filter(|a| zones[*a] == zone) {
                    for c in 0..clients {
                        let (an, cip) = (net.host_ns(a), net.client_ip(c));
                        net.cut_one_way(&an, &cip)?;
                    }
                }
                format!("zone {zone}'s answers to every client lost (their requests still arrive)")
            }
            FaultKind::NewIp => {
                self.cluster.stop(i);
                format!("host {i} (zone {zone}) shut down to be moved")
            }
            FaultKind::WipeDevice => {
                self.cluster.kill(i);
                let dev = &self.devices[i];
                for e in std::fs::read_dir(dev)?.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
                format!("host {i} (zone {zone}) killed and its device wiped")
            }
            FaultKind::Bitrot => {
                let n = self.bitrot_candidates.len();
                let chosen = (0..n)
                    .map(|k| &self.bitrot_candidates[(self.bitrot_next + k) % n])
                    .map(|hex| {
                        self.devices[i]
                            .join("blocks")
                            .join(&hex[0..2])
                            .join(&hex[2..4])
                            .join(hex)
                    })
                    .find(|p| p.exists());
                self.bitrot_next += 1;
                let block = chosen
                    .or_else(|| newest_block(&self.devices[i]))
                    .context("no stored block to corrupt")?;
                flip_a_byte(&block)?;
                format!("a byte flipped in {}", block.display())
            }
            FaultKind::DeviceFull => {
                let filler = self.devices[i].join("filler");
                fill(&filler);
                self.fillers[i] = Some(filler);
                format!("device of host {i} (zone {zone}) filled")
            }
            FaultKind::TrackerFull => {
                let filler = self.cluster.hosts[i].dir.join("tracker").join("filler");
                fill(&filler);
                self.tracker_fillers[i] = Some(filler);
                format!("disk under the tracker of host {i} (zone {zone}) filled")
            }
            FaultKind::TrackerStall => {
                let pid = self.cluster.hosts[i]
                    .pid()
                    .context("tracker_stall: the host is not running")?;
                let at = self.cluster.hosts[i].dir.join("tracker");
                let stall = IoStall::begin(&at, pid, &format!("h{i}"))?;
                self.stalled.push((i, stall));
                format!("disk under the tracker of host {i} (zone {zone}) stalled")
            }
            FaultKind::RollingRestart => {
                self.cluster.restart_graceful(i)?;
                format!("host {i} (zone {zone}) restarted cleanly")
            }
            FaultKind::AddHost | FaultKind::DrainRemove | FaultKind::Ship => {
                bail!("{kind:?} is asynchronous")
            }
        })
    }

    /// Ends fault `kind` on host `i`.
    pub(crate) fn end_fault(&mut self, kind: FaultKind, i: usize) -> anyhow::Result<String> {
        Ok(match kind {
            FaultKind::Kill9 | FaultKind::LeaderKill | FaultKind::WipeDevice => {
                self.cluster.restart(i, true)?;
                format!("host {i} restarted")
            }
            FaultKind::Freeze => {
                self.cluster.thaw(i);
                format!("host {i} thawed")
            }
            FaultKind::Unplug => {
                self.net(kind)?.set_cable(i, true)?;
                format!("cable of host {i} plugged back in")
            }
            FaultKind::ZoneCut | FaultKind::ClientsCut | FaultKind::AnswersLost => {
                self.net(kind)?.heal()?;
                "cut healed".into()
            }
            FaultKind::NewIp | FaultKind::Ship => match self.net.as_mut() {
                Some(net) => {
                    let ip = net.move_host(i)?;
                    if self.latency.is_some() {
                        // The relay holds every address of the namespace.
                        self.cluster.hosts[i].advertise = Some(format!("{ip}:{PORT}"));
                        self.write_links()?;
                    } else {
                        self.cluster.hosts[i].listen_ip = ip.clone();
                    }
                    self.cluster.restart(i, true)?;
                    format!("host {i} started at its new address {ip}")
                }
                None => {
                    self.cluster.restart(i, false)?;
                    format!(
                        "host {i} started on a new port: {}",
                        self.cluster.hosts[i].addr
                    )
                }
            },
            FaultKind::DeviceFull => {
                if let Some(f) = self.fillers[i].take() {
                    let _ = std::fs::remove_file(f);
                }
                format!("device of host {i} freed")
            }
            FaultKind::TrackerFull => {
                if let Some(f) = self.tracker_fillers[i].take() {
                    let _ = std::fs::remove_file(f);
                }
                format!("disk under the tracker of host {i} freed")
            }
            FaultKind::TrackerStall => {
                if let Some(k) = self.stalled.iter().position(|(h, _)| *h == i) {
                    self.stalled.remove(k).1.end()?;
                }
                format!("disk under the tracker of host {i} runs again")
            }
            FaultKind::Bitrot | FaultKind::RollingRestart | FaultKind::AddHost => String::new(),
            FaultKind::DrainRemove => bail!("{kind:?} is asynchronous"),
        })
    }

    /// What systemd's `Restart=on-failure` does for fsd: a host whose
    /// process exited by itself (a tracker that stopped for good exits
    /// non-zero) is started again on its port. Called about every second.
    pub(crate) fn supervise(&mut self) {
        for i in 0..self.cluster.hosts.len() {
            let Some(status) = self.cluster.exited_by_itself(i) else {
                continue;
            };
            println!(
                "          host {i} exited by itself ({status}); restarting it, as systemd would"
            );
            if let Err(e) = self.cluster.start_host(i, self.cluster.hosts[i].port) {
                println!("          host {i} did not start again ({e:#}); trying again shortly");
            }
        }
    }

    /// Copies every host's and mount's log into `dir`.
    pub(crate) fn save_logs(&self, dir: &Path) {
        for (i, h) in self.cluster.hosts.iter().enumerate() {
            let _ = std::fs::copy(h.log_path(), dir.join(format!("fsd-{i}-{}.log", h.zone)));
        }
        for (i, m) in self.mounts.iter().enumerate() {
            let _ = std::fs::copy(&m.log, dir.join(format!("mount-{i}.log")));
        }
        for i in 0..self.relays.len() {
            let _ = std::fs::copy(
                self.work.join(format!("relay-h{i}.log")),
                dir.join(format!("relay-{i}.log")),
            );
        }
    }

    /// Unmounts, stops every process, unmounts the disks and namespaces.
    pub(crate) fn teardown(&mut self) {
        // A stalled disk first: whatever waits for it (an fsync) waits
        // unkillably.
        for (_, stall) in std::mem::take(&mut self.stalled) {
            let _ = stall.end();
        }
        // Cuts healed first: a mount unmounting behind one would wait out
        // the deadlines of what it still has to store.
        if let Some(net) = self.net.as_mut() {
            let _ = net.heal();
        }
        for m in &mut self.mounts {
            m.unmount();
        }
        self.cluster.stop_all();
        for mut r in std::mem::take(&mut self.relays).into_iter().flatten() {
            terminate(&mut r);
        }
        for t in std::mem::take(&mut self.disks) {
            let _ = Command::new("umount").arg("-l").arg(&t).status();
        }
        if let Some(net) = self.net.as_mut() {
            net.destroy();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl World {
    /// Stored copies whose bytes no longer match their name (the hash).
    pub(crate) fn corrupt_copies(&self) -> Vec<PathBuf> {
        let mut bad = Vec::new();
        for dev in &self.devices {
            let mut stack = vec![dev.join("blocks")];
            while let Some(d) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in entries.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(bytes) = std::fs::read(&p) {
                        if Some(crate::workload::hash(&bytes).as_str())
                            != p.file_name().and_then(|n| n.to_str())
                        {
                            bad.push(p);
                        }
                    }
                }
            }
        }
        bad
    }
}

/// The most recently written block file under a device.
fn newest_block(dev: &Path) -> Option<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack = vec![dev.join("blocks")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(p);
            } else if md.len() > 0 {
                let t = md.modified().ok()?;
                if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                    best = Some((t, p));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}

fn flip_a_byte(path: &Path) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(path) else {
        return;
    };
    // Big chunks, then small ones for what is left: full to the last page.
    for size in [1 << 20, 4096] {
        let chunk = vec![0u8; size];
        while f.write_all(&chunk).is_ok() {}
    }
    let _ = f.sync_all();
}

/// A disk whose writes stop completing for one process: the process is
/// put in a blkio cgroup (v1) whose write limit on the disk's device is
/// one byte a second. Its writes still land in the page cache and its reads
/// are served, but every fsync waits -- what a disk that stops answering
/// (a SAN path failing over, a dying drive) does to a database on it.
/// Other processes and the kernel's own writeback are not held back.
pub(crate) struct IoStall {
    cgroup: PathBuf,
    /// The device, "major:minor".
    device: String,
    pid: u32,
}

const BLKIO: &str = "/sys/fs/cgroup/blkio";
/// Each stall's cgroup is named this, the run's pid, and the host.
const STALL_PREFIX: &str = "failsafe-chaos-";

impl IoStall {
    /// Stalls the writes of process `pid` to the disk mounted at `at`.
    pub(crate) fn begin(at: &Path, pid: u32, name: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(at)?.dev();
        let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
        let root = Path::new(BLKIO);
        if !root.join("blkio.throttle.write_bps_device").exists() {
            bail!(
                "tracker_stall needs the blkio cgroup controller (v1) at {BLKIO} with throttling"
            );
        }
        let cgroup = root.join(format!("{STALL_PREFIX}{}-{name}", std::process::id()));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let stall = Self {
            cgroup,
            device,
            pid,
        };
        std::fs::write(stall.cgroup.join("cgroup.procs"), pid.to_string())
            .context("moving the host into its blkio cgroup")?;
        stall.limit(1)?;
        Ok(stall)
    }

    fn limit(&self, bytes_per_s: u64) -> anyhow::Result<()> {
        let file = self.cgroup.join("blkio.throttle.write_bps_device");
        std::fs::write(&file, format!("{} {bytes_per_s}", self.device))
            .with_context(|| format!("writing {}", file.display()))
    }

    /// Lets the held writes go (they are dispatched at once) and takes the
    /// process back out of the cgroup.
    pub(crate) fn end(self) -> anyhow::Result<()> {
        // 0: no limit.
        self.limit(0)?;
        // The process may be gone (killed, restarted meanwhile).
        let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.cgroup);
        Ok(())
    }
}

/// The stalls of runs that are gone (killed mid-stall): their limits
/// lifted, so processes waiting for the disk go on (and can exit), their
/// cgroups removed.
pub(crate) fn release_stale_stalls() {
    let Ok(dir) = std::fs::read_dir(BLKIO) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(STALL_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("failsafe-chaos: releasing disk stall {name} of a run that is gone");
        let limits = e.path().join("blkio.throttle.write_bps_device");
        for device in std::fs::read_to_string(&limits)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
        {
            let _ = std::fs::write(&limits, format!("{device} 0"));
        }
        for task in std::fs::read_to_string(e.path().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), task);
        }
        let _ = std::fs::remove_dir(e.path());
    }
}
