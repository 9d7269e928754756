//! A scenario: the cluster to build, the workload to run on it, and the
//! faults to inject over time — read from TOML or drawn from a seed.

use std::path::Path;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// One zone per host, in order: "a", "b", "c" gives three hosts in three zones.
    #[serde(default = "default_zones")]
    pub zones: Vec<String>,
    /// Mounts; mount i sits in zone `zones[i % zones.len()]`.
    #[serde(default = "default_clients")]
    pub clients: usize,
    /// Seconds of workload; faults are scheduled inside this window.
    pub duration_s: f64,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub check: CheckConfig,
    /// Extra flags for every fsd (for example a shorter dead_after).
    #[serde(default)]
    pub fsd_flags: Vec<String>,
    /// Extra mount options for every mount (for example "leases").
    #[serde(default)]
    pub mount_options: String,
    /// Size of each host's block device, a tmpfs of this many MiB (0: a
    /// directory on the work disk). Needed by the `device_full` fault.
    #[serde(default)]
    pub device_mb: u64,
    /// Size of the disk under each host's tracker databases, a tmpfs of
    /// this many MiB mounted at its data dir's `tracker` (0: the work
    /// disk). Needed by the `tracker_full` fault.
    #[serde(default)]
    pub tracker_mb: u64,
    /// What that disk is: "tmpfs", or "ext4" (an image of `tracker_mb` MiB
    /// on a loop device, a block device whose writes can be held back: the
    /// `tracker_stall` fault).
    #[serde(default)]
    pub tracker_fs: TrackerFs,
    /// Breaks a guarantee on purpose, to show the checker catches it.
    #[serde(default)]
    pub sabotage: Option<Sabotage>,
    /// Cities: a one-way delay on every link between zones (a relay in
    /// front of each host; needs network namespaces).
    #[serde(default)]
    pub latency: Option<Latency>,
    /// Each web host's clock offset in seconds, by mount (missing: 0): the
    /// mount and its wiki run under libfaketime (Debian's `faketime`), as on
    /// a host whose clock is that far off.
    #[serde(default)]
    pub webhost_clocks_s: Vec<f64>,
    /// Extra mount options of each web host, by mount (after
    /// `mount_options`): one web host set differently from the others.
    #[serde(default)]
    pub webhost_options: Vec<String>,
}

/// One-way delays between zones. A mount is in the zone it is placed in; a
/// host reaching itself, or anything in its own zone, gets `intra_zone_ms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Latency {
    /// Between any two different zones (RTT is twice this).
    #[serde(default)]
    pub one_way_ms: f64,
    /// Within one zone.
    #[serde(default)]
    pub intra_zone_ms: f64,
    /// Pairs of zones that differ from `one_way_ms`.
    #[serde(default, rename = "link")]
    pub links: Vec<ZoneLink>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ZoneLink {
    /// The two zones (either order).
    pub zones: [String; 2],
    pub one_way_ms: f64,
}

impl Latency {
    /// The one-way delay between something in zone `a` and something in zone `b`.
    pub(crate) fn one_way(&self, a: &str, b: &str) -> std::time::Duration {
        let ms = self
            .links
            .iter()
            .find(|l| (l.zones[0] == a && l.zones[1] == b) || (l.zones[0] == b && l.zones[1] == a))
            .map(|l| l.one_way_ms)
            .unwrap_or(if a == b {
                self.intra_zone_ms
            } else {
                self.one_way_ms
            });
        std::time::Duration::from_secs_f64(ms / 1000.0)
    }

    fn validate(&self, zones: &[&str]) -> anyhow::Result<()> {
        let ok = |ms: f64| ms.is_finite() && (0.0..=10_000.0).contains(&ms);
        if !ok(self.one_way_ms) || !ok(self.intra_zone_ms) {
            bail!("latency: delays are 0 to 10000 ms");
        }
        for l in &self.links {
            if !ok(l.one_way_ms) {
                bail!("latency.link {:?}: delays are 0 to 10000 ms", l.zones);
            }
            if let Some(z) = l.zones.iter().find(|z| !zones.contains(&z.as_str())) {
                bail!("latency.link {:?}: no zone {z:?}", l.zones);
            }
        }
        Ok(())
    }
}

fn default_zones() -> Vec<String> {
    vec!["a".into(), "b".into(), "c".into()]
}
fn default_clients() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Workload {
    /// "files": file operations through the mounts; "http": wiki-cgi served
    /// from each mount, driven through its edit form and page views.
    #[serde(default)]
    pub mode: Mode,
    /// Editors per mount: each owns its pages and saves them the way wikis do
    /// (mkdir lock, temp file, fsync, rename, rmdir) and appends to a shared log.
    #[serde(default = "one")]
    pub writers: usize,
    /// Readers per mount: read the pages of editors on the other mounts.
    #[serde(default = "one")]
    pub readers: usize,
    /// Appenders per mount: each appends a line of its own to the change
    /// log (open O_APPEND, write, fsync, close), again and again.
    #[serde(default)]
    pub appenders: usize,
    /// Pages per editor; with `shared_pages`, the pages all editors share.
    #[serde(default = "four")]
    pub pages: usize,
    /// Editors on every mount save the same pages (a wiki served by several
    /// web hosts), each save under the page's lock (`mkdir`), and read the
    /// page before saving it; a page whose lock another editor holds is
    /// skipped for now. Readers read those pages too. In "http" mode each
    /// editor saves through the wiki's edit form from the revision it was
    /// shown: wiki-cgi's page lock and revision check decide, and a save
    /// refused as an edit conflict is recorded as such.
    #[serde(default)]
    pub shared_pages: bool,
    /// Typical page size in bytes (each save varies it).
    #[serde(default = "page_bytes")]
    pub page_bytes: usize,
    /// Pause between one editor's operations, in ms.
    #[serde(default = "think_ms")]
    pub think_ms: u64,
    /// Mean pause between one reader's reads, in ms (each drawn at random
    /// from 0 to twice this, so readers' reads spread out in time).
    #[serde(default = "read_pause_ms")]
    pub read_pause_ms: u64,
    /// Pages written once at the start and read ever after.
    #[serde(default = "static_pages")]
    pub static_pages: usize,
}

fn static_pages() -> usize {
    8
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    #[default]
    Files,
    Http,
}

fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn page_bytes() -> usize {
    6000
}
fn think_ms() -> u64 {
    20
}
fn read_pause_ms() -> u64 {
    5
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            mode: Mode::Files,
            writers: 1,
            readers: 1,
            appenders: 0,
            pages: 4,
            shared_pages: false,
            page_bytes: page_bytes(),
            think_ms: think_ms(),
            read_pause_ms: read_pause_ms(),
            static_pages: static_pages(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckConfig {
    /// No operation may fail (true for single-host faults: nobody may notice).
    #[serde(default = "yes")]
    pub no_failures: bool,
    /// After the last fault ends, every block must be back at its copy count
    /// within this many seconds.
    #[serde(default = "failsafe_within")]
    pub failsafe_within_s: f64,
    /// At the end no stored copy may be corrupt (needs scrub: a corrupt
    /// copy nobody reads is otherwise only found by it).
    #[serde(default)]
    pub no_corrupt_copies: bool,
}

fn yes() -> bool {
    true
}
fn failsafe_within() -> f64 {
    60.0
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            no_failures: true,
            failsafe_within_s: failsafe_within(),
            no_corrupt_copies: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    /// `kill -9`; restarted (same address) when the fault ends.
    Kill9,
    /// SIGSTOP; SIGCONT when it ends.
    Freeze,
    /// The host's cable is pulled (link down); plugged back in when it ends.
    Unplug,
    /// The target's zone cannot reach the other zones' hosts (its clients
    /// still reach it); healed when it ends.
    ZoneCut,
    /// The reverse: no client reaches the target's zone, which still
    /// reaches the other zones.
    ClientsCut,
    /// One way only: the target's zone's answers to clients are lost,
    /// while the clients' requests still arrive (and apply) there.
    AnswersLost,
    /// Stopped, moved to a new IP address (a shipped box), started there when it ends.
    NewIp,
    /// `fsctl host ship` first (which must agree), then as `new_ip`: shut
    /// down, and started at a new address when it ends.
    Ship,
    /// Stopped and its block device emptied (the disk was replaced); started when it ends.
    WipeDevice,
    /// A byte flipped in the target's copy of a static page's block (a
    /// page nobody rewrites; readers read it), or else its newest block.
    Bitrot,
    /// The target's device filled up; freed when it ends.
    DeviceFull,
    /// The disk under the target's tracker databases (raft.db, meta.db)
    /// filled up; freed when it ends.
    TrackerFull,
    /// The disk under the target's tracker databases stops completing the
    /// target's writes (a blkio cgroup holds them back: writes still reach
    /// the page cache, reads are served, every fsync waits), so its Raft
    /// core stops at its next log append while the rest of fsd, its gRPC
    /// handlers too, goes on; the held writes go through when it ends.
    TrackerStall,
    /// The leader is killed (kill -9) `repeat` times, `every_s` apart, each
    /// restarted after `for_s`.
    LeaderKill,
    /// Every host in turn restarted cleanly, `every_s` apart.
    RollingRestart,
    /// A blank box joins in zone `zone`: a learner, then a voter; copies
    /// reach it by rebalancing.
    AddHost,
    /// The target is drained (its copies move elsewhere); when the fault
    /// ends it is removed from the cluster once nothing depends on it, and
    /// stopped (the box is retired).
    DrainRemove,
}

impl FaultKind {
    /// Faults that need network namespaces (root and iproute2).
    pub(crate) fn needs_netns(self) -> bool {
        matches!(
            self,
            FaultKind::Unplug | FaultKind::ZoneCut | FaultKind::ClientsCut | FaultKind::AnswersLost
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Fault {
    pub at_s: f64,
    pub kind: FaultKind,
    /// "leader", "follower", "zone:NAME" or "host:N" (0-based), or
    /// "mount:N" (0-based; `freeze` only: a web host's mount process is
    /// stopped). Default: a follower.
    #[serde(default = "follower")]
    pub target: String,
    /// How long the fault lasts.
    #[serde(default = "for_s", rename = "for_s")]
    pub for_s: f64,
    #[serde(default = "one")]
    pub repeat: usize,
    #[serde(default = "every_s")]
    pub every_s: f64,
    /// The zone of the host `add_host` brings.
    #[serde(default)]
    pub zone: Option<String>,
}

/// The mount a fault target names ("mount:N"), if it names one.
pub(crate) fn mount_target(target: &str) -> Option<usize> {
    target.strip_prefix("mount:")?.parse().ok()
}

fn follower() -> String {
    "follower".into()
}
fn for_s() -> f64 {
    8.0
}
fn every_s() -> f64 {
    10.0
}

impl Fault {
    /// When the fault (all its repeats) is over.
    pub(crate) fn end_s(&self, hosts: usize) -> f64 {
        match self.kind {
            FaultKind::RollingRestart => self.at_s + self.every_s * hosts as f64,
            FaultKind::Bitrot | FaultKind::AddHost => self.at_s,
            _ => self.at_s + self.every_s * (self.repeat.max(1) - 1) as f64 + self.for_s,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TrackerFs {
    #[default]
    Tmpfs,
    Ext4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Sabotage {
    /// Halfway through, a page is overwritten behind the workload's back
    /// (through the mount, not recorded): the checker must report it.
    WriteBehindMount,
    /// Halfway through, an acknowledged page is deleted behind the
    /// workload's back: the checker must report a lost write.
    DeleteBehindMount,
}

impl Scenario {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        s.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(s)
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.zones.is_empty() || self.zones.len() > 9 {
            bail!("zones: 1 to 9 hosts");
        }
        if self.clients == 0 || self.clients > 8 {
            bail!("clients: 1 to 8 mounts");
        }
        if self.duration_s.is_nan() || self.duration_s <= 0.0 {
            bail!("duration_s: must be positive");
        }
        if self.workload.writers == 0 || self.workload.pages == 0 {
            bail!("workload: at least one writer and one page");
        }
        if self.webhost_clocks_s.len() > self.clients {
            bail!("webhost_clocks_s: one offset per mount at most");
        }
        if self.webhost_options.len() > self.clients {
            bail!("webhost_options: one string of options per mount at most");
        }
        if let Some(o) = self
            .webhost_clocks_s
            .iter()
            .find(|o| !o.is_finite() || o.abs() > 86_400.0)
        {
            bail!("webhost_clocks_s: {o} is not an offset of at most a day");
        }
        let added = self
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::AddHost)
            .count();
        for f in &self.faults {
            if f.kind == FaultKind::AddHost && f.zone.as_deref().is_none_or(str::is_empty) {
                bail!("add_host at {}s: needs zone", f.at_s);
            }
            if f.at_s < 0.0 || f.end_s(self.zones.len()) > self.duration_s {
                bail!(
                    "fault {:?} at {}s: must start and end within duration_s ({})",
                    f.kind,
                    f.at_s,
                    self.duration_s
                );
            }
            let t = f.target.as_str();
            if t.starts_with("mount:") {
                match mount_target(t) {
                    Some(m) if m < self.clients => {}
                    _ => bail!(
                        "fault target {t:?}: mount:N with N below clients ({})",
                        self.clients
                    ),
                }
                if f.kind != FaultKind::Freeze {
                    bail!(
                        "fault {:?} at {}s: only freeze targets a mount",
                        f.kind,
                        f.at_s
                    );
                }
                continue;
            }
            let ok = t == "leader"
                || t == "follower"
                || t.strip_prefix("zone:")
                    .is_some_and(|z| self.zones.iter().any(|x| x == z))
                || t.strip_prefix("host:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n < self.zones.len() + added);
            if !ok {
                bail!("fault target {t:?}: leader, follower, zone:NAME, host:N or mount:N");
            }
            if f.kind == FaultKind::TrackerStall
                && (self.tracker_mb == 0 || self.tracker_fs != TrackerFs::Ext4)
            {
                bail!("tracker_stall needs tracker_mb and tracker_fs = \"ext4\" (a block device whose writes can be held back)");
            }
            if f.kind == FaultKind::TrackerFull && self.tracker_mb == 0 {
                bail!(
                    "tracker_full needs tracker_mb (each host's tracker on a tmpfs of that size)"
                );
            }
            if f.kind == FaultKind::DeviceFull && self.device_mb == 0 {
                bail!("device_full needs device_mb (each host's device a tmpfs of that size)");
            }
        }
        if let Some(l) = &self.latency {
            let zones: Vec<&str> = self
                .zones
                .iter()
                .map(String::as_str)
                .chain(self.faults.iter().filter_map(|f| f.zone.as_deref()))
                .collect();
            l.validate(&zones)?;
        }
        Ok(())
    }

    /// A long random soak: single-host faults one after another, each
    /// followed by time to heal.
    pub(crate) fn random(seed: u64, duration_s: f64, hosts: usize) -> Scenario {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let kinds = [
            FaultKind::Kill9,
            FaultKind::Freeze,
            FaultKind::Unplug,
            FaultKind::ZoneCut,
            FaultKind::NewIp,
            FaultKind::Bitrot,
            FaultKind::LeaderKill,
            FaultKind::RollingRestart,
        ];
        let zones: Vec<String> = (0..hosts)
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        let mut faults = Vec::new();
        let mut t = 5.0;
        loop {
            let kind = kinds[rng.random_range(0..kinds.len())];
            let target = match rng.random_range(0..3) {
                0 => "leader".to_string(),
                1 => "follower".to_string(),
                _ => format!("host:{}", rng.random_range(0..hosts)),
            };
            let f = Fault {
                at_s: t,
                kind,
                target,
                for_s: rng.random_range(3.0..15.0_f64).round(),
                repeat: if kind == FaultKind::LeaderKill { 3 } else { 1 },
                every_s: 10.0,
                zone: None,
            };
            let end = f.end_s(hosts);
            if end + 20.0 > duration_s {
                break;
            }
            t = end + rng.random_range(8.0..20.0_f64).round();
            faults.push(f);
        }
        Scenario {
            name: format!("soak-{seed}"),
            description: format!("seeded random soak, seed {seed}"),
            zones,
            clients: 2,
            duration_s,
            workload: Workload::default(),
            faults,
            check: CheckConfig::default(),
            fsd_flags: Vec::new(),
            mount_options: String::new(),
            device_mb: 0,
            tracker_mb: 0,
            tracker_fs: TrackerFs::Tmpfs,
            sabotage: None,
            latency: None,
            webhost_clocks_s: Vec::new(),
            webhost_options: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_and_bad_ones_say_why() {
        let s: Scenario = toml::from_str(
            "name = 'x'\nduration_s = 30\n[[fault]]\nat_s = 5\nkind = 'kill9'\ntarget = 'host:1'\nfor_s = 5\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.zones.len(), 3);
        let late: Scenario = toml::from_str(
            "name = 'x'\nduration_s = 10\n[[fault]]\nat_s = 5\nkind = 'freeze'\nfor_s = 8\n",
        )
        .unwrap();
        assert!(late
            .validate()
            .unwrap_err()
            .to_string()
            .contains("within duration_s"));
        let bad: Result<Scenario, _> =
            toml::from_str("name = 'x'\nduration_s = 10\n[[fault]]\nat_s = 5\nkind = 'melt'\n");
        assert!(bad.is_err());
        let cities: Scenario = toml::from_str(
            "name = 'x'\nduration_s = 10\nzones = ['a', 'b', 'c']\n[latency]\none_way_ms = 10\n[[latency.link]]\nzones = ['c', 'a']\none_way_ms = 40\n",
        )
        .unwrap();
        cities.validate().unwrap();
        let l = cities.latency.as_ref().unwrap();
        let ms = |a, b| l.one_way(a, b).as_millis();
        assert_eq!(
            (ms("a", "a"), ms("a", "b"), ms("a", "c"), ms("c", "a")),
            (0, 10, 40, 40)
        );
        let unknown: Scenario = toml::from_str(
            "name = 'x'\nduration_s = 10\n[latency]\n[[latency.link]]\nzones = ['a', 'z']\none_way_ms = 4\n",
        )
        .unwrap();
        assert!(unknown
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no zone"));
        let r = Scenario::random(7, 600.0, 3);
        r.validate().unwrap();
        assert!(!r.faults.is_empty());
        assert_eq!(
            format!("{:?}", Scenario::random(7, 600.0, 3).faults),
            format!("{:?}", r.faults),
            "same seed, same schedule"
        );
    }

    #[test]
    fn a_mount_can_be_frozen_and_nothing_else_done_to_it() {
        let with = |kind: &str, target: &str| {
            toml::from_str::<Scenario>(&format!(
                "name = 'x'\nduration_s = 30\nclients = 2\n[[fault]]\nat_s = 5\nkind = '{kind}'\ntarget = '{target}'\nfor_s = 3\n"
            ))
            .unwrap()
        };
        let s = with("freeze", "mount:1");
        s.validate().unwrap();
        assert_eq!(mount_target(&s.faults[0].target), Some(1));
        assert_eq!(mount_target("host:1"), None);
        assert_eq!(mount_target("leader"), None);
        let err = |kind: &str, target: &str| with(kind, target).validate().unwrap_err().to_string();
        assert!(
            err("freeze", "mount:2").contains("below clients"),
            "only 2 mounts"
        );
        assert!(err("freeze", "mount:x").contains("mount:N"));
        assert!(err("kill9", "mount:0").contains("only freeze"));
        let shared: Scenario = toml::from_str(
            "name = 'x'\nduration_s = 30\n[workload]\nshared_pages = true\npages = 3\n",
        )
        .unwrap();
        shared.validate().unwrap();
        assert!(shared.workload.shared_pages);
        assert!(!Workload::default().shared_pages);
        let clocks: Scenario =
            toml::from_str("name = 'x'\nduration_s = 30\nwebhost_clocks_s = [90, -90, 1]\n")
                .unwrap();
        assert!(clocks
            .validate()
            .unwrap_err()
            .to_string()
            .contains("per mount"));
        let clocks: Scenario =
            toml::from_str("name = 'x'\nduration_s = 30\nwebhost_clocks_s = [90, -90]\n").unwrap();
        clocks.validate().unwrap();
    }
}
