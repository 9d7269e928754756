//! `--cities`: three hosts in three cities on one machine, and a mount in
//! the leader's city and one in a city without the leader.
//!
//! Every host and every mount lives in a network namespace of its own
//! (`failsafe_harness::netns`, prefix `fsbench`); a `latency-relay` in front
//! of each host delays every byte of a connection by the one-way time
//! between the connecting namespace's city and the host's (half the round
//! trip between cities, 0 within a city). The bench's own thread for this
//! part lives in the switch namespace (it bootstraps the cluster and asks
//! for the leader); the rest of the bench stays where it was.
//!
//! Per mount: page saves (the loopback workload's save, one at a time),
//! `stat` of an unchanged page, open+fstat+read+close of an unchanged page;
//! each timed one by one (median, p90). Round trips per operation from the
//! mount's `stats=PATH` counters over the whole group. Where the mount's
//! traffic went: `ss -ti` in the mount's namespace before and after each
//! group, TCP segments sent per host (so per city). Round trips between
//! cities are bounded by time in the report (each costs at least one RTT).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use failsafe_harness::local::{
    die_with_parent, in_netns, sibling_binary, terminate, LocalCluster, LocalMount,
};
use failsafe_harness::netns::{self, Net};
use failsafe_harness::relay::{self, Links};
use serde_json::{json, Value};

use failsafe_harness::dokuwiki::{Browser, Server, ServerConfig};

use crate::dokuwiki::{self, CityViews};
use crate::workloads;

/// Namespaces of this tool: `fsbench` + pid + `-`...
pub(crate) const PREFIX: &str = "fsbench";
/// fsd listens on the namespace's loopback here, behind the relay on PORT.
const BEHIND_RELAY: u16 = 7001;
const PORT: u16 = 7000;
const ZONES: [&str; 3] = ["a", "b", "c"];

pub(crate) struct CityConfig {
    pub(crate) rtt_ms: u32,
    pub(crate) saves: usize,
    pub(crate) reads: usize,
    pub(crate) page_bytes: usize,
    /// Mount with `stats=PATH` (the mount has the option).
    pub(crate) stats: bool,
    /// Then mount B saves until the tracker leader moves to its city, and
    /// its page saves are measured again.
    pub(crate) follow_writers: bool,
    /// Also serve DokuWiki from mount B (before the leader moves) and count
    /// what a page view of an unchanged page costs there.
    pub(crate) dokuwiki: Option<DokuCity>,
    /// Only that: none of the other rows.
    pub(crate) only_dokuwiki: bool,
}

pub(crate) struct DokuCity {
    /// Page views measured.
    pub(crate) views: usize,
    pub(crate) server: ServerConfig,
}

/// The row of mount B's reads of a page mount A changed just before.
pub(crate) const CHANGED: &str = "open+read after a change elsewhere";
/// Those reads at most (each waits for a save in the leader's city).
const CHANGED_READS: usize = 20;

/// The row label of mount B's saves after the leader moved to its city.
const MOVED: &str = "the city the leader moved to";

/// fsd's leadership knobs for `follow_writers`: the leader moves once B has
/// done two thirds of the writes of the last two minutes, which B's first
/// pass (as many saves as A's) cannot reach, so the first two passes see
/// the leader where it was elected.
const FOLLOW_FLAGS: &[&str] = &[
    "--leader-window-ms",
    "120000",
    "--leader-min-writes",
    "20",
    "--leader-min-tenure-ms",
    "1000",
];

/// One operation measured from one mount.
pub(crate) struct CityRow {
    /// "the leader's city" or "a city without the leader".
    pub(crate) city: &'static str,
    pub(crate) mount_zone: String,
    /// "page save", "stat", "open+read".
    pub(crate) op: &'static str,
    pub(crate) n: usize,
    pub(crate) median_ms: f64,
    pub(crate) p90_ms: f64,
    /// From the mount's stats file, per operation.
    pub(crate) round_trips: Option<f64>,
    pub(crate) rpcs: Option<f64>,
    /// TCP segments the mount's namespace sent during the group, by the
    /// zone of the host they went to (None: `ss` could not tell).
    pub(crate) segs_by_zone: Option<BTreeMap<String, u64>>,
    /// Every stats counter's change over the group.
    pub(crate) delta: BTreeMap<String, f64>,
}

impl CityRow {
    /// Share of the mount's segments that went to another city.
    pub(crate) fn cross_share(&self) -> Option<f64> {
        let by = self.segs_by_zone.as_ref()?;
        let total: u64 = by.values().sum();
        if total == 0 {
            return Some(0.0);
        }
        let cross: u64 = by
            .iter()
            .filter(|(z, _)| **z != self.mount_zone)
            .map(|(_, n)| n)
            .sum();
        Some(cross as f64 / total as f64)
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "city": self.city,
            "mount_zone": self.mount_zone,
            "op": self.op,
            "n": self.n,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "round_trips_per_op": self.round_trips,
            "rpcs_per_op": self.rpcs,
            "tcp_segments_sent_by_host_zone": self.segs_by_zone,
            "share_of_segments_to_another_city": self.cross_share(),
            "delta": self.delta,
        })
    }
}

pub(crate) struct Cities {
    pub(crate) rtt_ms: u32,
    pub(crate) leader_zone: String,
    /// The leader's zone after the measurements (it should not move).
    pub(crate) leader_zone_end: Option<String>,
    pub(crate) rows: Vec<CityRow>,
    pub(crate) setup: String,
    /// DokuWiki's page views from mount B, when asked for.
    pub(crate) dokuwiki: Option<Result<CityViews, String>>,
}

/// Removes namespaces of earlier runs of this tool that are gone.
pub(crate) fn cleanup_stale() {
    for ns in netns::stale_namespaces(PREFIX) {
        eprintln!("failsafe-bench: removing namespace {ns} of a run that is gone");
        let _ = netns::ip(&["netns", "del", &ns]);
    }
}

/// Runs the cities part; everything it started is stopped and its
/// namespaces removed before it returns, also on failure.
pub(crate) fn run(root: &Path, cfg: &CityConfig) -> anyhow::Result<Cities> {
    netns::available().map_err(|why| anyhow::anyhow!("needs network namespaces: {why}"))?;
    cleanup_stale();
    let work = root.join("cities");
    std::fs::create_dir_all(&work)?;
    let net = Net::create(PREFIX, ZONES.len(), 2)?;
    let sw = net.switch();
    let result = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Cities> {
            // This thread (and every process it starts) lives in the switch.
            netns::enter(&sw)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut w = World {
                net: &net,
                work: work.clone(),
                cluster: None,
                relays: Vec::new(),
                mounts: Vec::new(),
                one_way: Duration::from_micros(u64::from(cfg.rtt_ms) * 500),
                client_zones: Vec::new(),
                stats: cfg.stats,
                follow_writers: cfg.follow_writers,
                allow_other: cfg.dokuwiki.is_some(),
            };
            let r = w.measure(&rt, cfg);
            w.stop();
            r
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the cities thread panicked")))
    });
    drop(net);
    let _ = std::fs::remove_dir_all(&work);
    result
}

struct World<'a> {
    net: &'a Net,
    work: PathBuf,
    cluster: Option<LocalCluster>,
    relays: Vec<Child>,
    mounts: Vec<(LocalMount, PathBuf)>,
    one_way: Duration,
    client_zones: Vec<String>,
    stats: bool,
    follow_writers: bool,
    /// Mount with `allow_other` (DokuWiki's php-cgi runs as www-data).
    allow_other: bool,
}

impl World<'_> {
    fn one_way(&self, a: &str, b: &str) -> Duration {
        if a == b {
            Duration::ZERO
        } else {
            self.one_way
        }
    }

    fn links_file(&self, i: usize) -> PathBuf {
        self.work.join(format!("links-h{i}"))
    }

    /// Each relay's delays by source address: hosts and mounts by zone; the
    /// bench's own address (the switch) gets none.
    fn write_links(&self) -> anyhow::Result<()> {
        for (i, zone) in ZONES.iter().enumerate() {
            let mut links = Links::default();
            for (k, other) in ZONES.iter().enumerate() {
                links
                    .by_ip
                    .insert(self.net.host_ips[k].parse()?, self.one_way(zone, other));
            }
            for (c, other) in self.client_zones.iter().enumerate() {
                links
                    .by_ip
                    .insert(self.net.client_ip(c).parse()?, self.one_way(zone, other));
            }
            links.write(&self.links_file(i))?;
        }
        Ok(())
    }

    fn start(&mut self, rt: &tokio::runtime::Runtime) -> anyhow::Result<(Cities, Vec<usize>)> {
        let fsd = sibling_binary("fsd")?;
        let mut flags: Vec<String> = if self.follow_writers {
            FOLLOW_FLAGS.iter().map(|f| f.to_string()).collect()
        } else {
            Vec::new()
        };
        flags.extend(crate::targets::fsd_flags());
        let mut cluster = LocalCluster::new(&fsd, &flags);
        cluster.die_with_parent = true;
        self.write_links()?;
        for (i, zone) in ZONES.iter().enumerate() {
            let h = cluster.define_host(&self.work.join(format!("host-{zone}")), zone, &[]);
            let host = &mut cluster.hosts[h];
            host.netns = Some(Net::ns_path(&self.net.host_ns(i)));
            host.listen_ip = "127.0.0.1".into();
            host.advertise = Some(format!("{}:{PORT}", self.net.host_ips[i]));
            let relay = relay::spawn_in_netns(
                &Net::ns_path(&self.net.host_ns(i)),
                &format!("0.0.0.0:{PORT}"),
                &format!("127.0.0.1:{BEHIND_RELAY}"),
                &self.links_file(i),
                &self.work.join(format!("relay-h{i}.log")),
                &format!("{}:{PORT}", self.net.host_ips[i]),
            )?;
            self.relays.push(relay);
            cluster.start_host(h, BEHIND_RELAY)?;
        }
        // Kept at once, so that `stop` stops the hosts whatever fails next.
        self.cluster = Some(cluster);
        let cluster = self.cluster.as_mut().expect("just set");
        rt.block_on(cluster.bootstrap())
            .context("bootstrapping the cities cluster")?;
        let leader = rt
            .block_on(leader_zone(cluster))
            .context("no leader after bootstrap")?;
        let spec = format!("{}:/", cluster.addrs().join(","));
        let other = ZONES
            .iter()
            .find(|z| **z != leader)
            .expect("three zones")
            .to_string();
        self.client_zones = vec![leader.clone(), other];
        // The relays re-read their links file for each new connection.
        self.write_links()?;
        std::thread::sleep(Duration::from_millis(50));
        let mount_bin = sibling_binary("mount-failsafe")?;
        let cred = self
            .cluster
            .as_ref()
            .context("no cluster")?
            .mount_cred_option()?;
        for c in 0..2 {
            let mut cmd = Command::new(&mount_bin);
            in_netns(&mut cmd, &Net::ns_path(&self.net.client_ns(c)))?;
            die_with_parent(&mut cmd);
            let stats = self.work.join(format!("mount{c}-stats.json"));
            let mut opts = format!(
                "zone={},cache_dir={},{}",
                self.client_zones[c],
                self.work.join(format!("cache{c}")).display(),
                cred,
            );
            if self.stats {
                opts.push_str(&format!(",stats={}", stats.display()));
            }
            if self.allow_other {
                opts.push_str(",allow_other");
            }
            let opts = crate::targets::with_extra(opts);
            let m = LocalMount::start(
                cmd,
                &spec,
                &self.work.join(format!("mnt{c}")),
                &opts,
                &self.work.join(format!("mount{c}.log")),
            )
            .with_context(|| format!("mount {c}"))?;
            self.mounts.push((m, stats));
        }
        let setup = format!(
            "3 fsd hosts, zones a, b, c, each in its own network namespace behind a \
             latency-relay; {} ms one way between zones (a {} ms round trip), 0 within; \
             mount A (`zone={}`) in the leader's zone, mount B (`zone={}`) in another; \
             each mount in a namespace of its own, its links delayed like a host of its zone",
            self.one_way.as_secs_f64() * 1e3,
            self.one_way.as_secs_f64() * 2e3,
            self.client_zones[0],
            self.client_zones[1],
        );
        Ok((
            Cities {
                rtt_ms: (self.one_way.as_millis() * 2) as u32,
                leader_zone: leader,
                leader_zone_end: None,
                rows: Vec::new(),
                setup,
                dokuwiki: None,
            },
            vec![0, 1],
        ))
    }

    fn measure(
        &mut self,
        rt: &tokio::runtime::Runtime,
        cfg: &CityConfig,
    ) -> anyhow::Result<Cities> {
        let (mut cities, mut mounts) = self.start(rt)?;
        if cfg.only_dokuwiki {
            if let Some(d) = &cfg.dokuwiki {
                cities.dokuwiki = Some(self.dokuwiki_views(rt, d, &cities.leader_zone));
            }
            if let Some(c) = &self.cluster {
                cities.leader_zone_end = rt.block_on(leader_zone(c));
            }
            return Ok(cities);
        }
        if self.follow_writers {
            mounts.push(1);
        }
        // The pages both mounts read: written by mount A, then left alone.
        let shared = self.mounts[0].0.path.join("cities");
        std::fs::create_dir_all(shared.join("read"))?;
        let page = shared.join("read").join("page.txt");
        std::fs::write(&page, workloads::page_bytes(cfg.page_bytes, 0xc17e))?;
        for (pass, c) in mounts.into_iter().enumerate() {
            let city = match pass {
                0 => "the leader's city",
                1 => "a city without the leader",
                _ => MOVED,
            };
            let zone = self.client_zones[c].clone();
            let (mnt, stats) = (self.mounts[c].0.path.clone(), self.mounts[c].1.clone());
            let ns = self.net.client_ns(c);
            let dir = mnt.join("cities").join(format!("saves-{c}"));
            std::fs::create_dir_all(dir.join("pages"))?;
            std::fs::create_dir_all(dir.join("locks"))?;
            let page = mnt.join("cities").join("read").join("page.txt");
            let mut n = 0u64;
            let mut save = || {
                let text = workloads::page_bytes(cfg.page_bytes, (c as u64) << 32 | n);
                let line = format!("{n}\t10.0.0.1\tE\tstart\tbench save {n}\n");
                n += 1;
                workloads::save_page(&dir, "start", &text, line.as_bytes())
            };
            // Warm-up: the page, the log and the lock directory exist.
            for _ in 0..2 {
                save()?;
            }
            if city == MOVED {
                let before = self
                    .cluster
                    .as_ref()
                    .and_then(|c| rt.block_on(leader_zone(c)))
                    .unwrap_or_else(|| "unknown".into());
                eprintln!(
                    "failsafe-bench: cities: leader in zone {before}; mount in zone {zone} saves until it moves there ..."
                );
                let started = Instant::now();
                let mut saves = 0;
                loop {
                    save()?;
                    saves += 1;
                    let now_at = self
                        .cluster
                        .as_ref()
                        .and_then(|c| rt.block_on(leader_zone(c)));
                    if now_at.as_deref() == Some(zone.as_str()) {
                        break;
                    }
                    anyhow::ensure!(
                        started.elapsed() < Duration::from_secs(600),
                        "the leader did not move to zone {zone} within 10 minutes ({saves} saves)"
                    );
                }
                eprintln!(
                    "failsafe-bench: cities: the leader moved to zone {zone} after {saves} saves, {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                // The old leader's line says why, and how long writes paused.
                for h in self.cluster.iter().flat_map(|c| &c.hosts) {
                    let log = std::fs::read_to_string(h.log_path()).unwrap_or_default();
                    for line in log.lines().filter(|l| l.contains("leadership hand")) {
                        eprintln!("failsafe-bench: cities: host in zone {}: {line}", h.zone);
                    }
                }
            }
            let mut buf = Vec::new();
            workloads::read_page(&page, &mut buf)?;
            std::fs::metadata(&page)?;
            let hosts = self.host_zones();
            // `f` returns the time to count when only part of what it does
            // is measured (else all of it is).
            let group =
                |op: &'static str,
                 count: usize,
                 f: &mut dyn FnMut() -> anyhow::Result<Option<Duration>>| {
                    eprintln!(
                        "failsafe-bench: cities: mount in {city} (zone {zone}): {count} × {op} ..."
                    );
                    let before = fresh_stats(&stats);
                    let ss_before = ss_segments(&ns);
                    let mut ms = Vec::with_capacity(count);
                    for _ in 0..count {
                        let t = Instant::now();
                        let part = f()?;
                        ms.push(part.unwrap_or_else(|| t.elapsed()).as_secs_f64() * 1e3);
                    }
                    let ss_after = ss_segments(&ns);
                    let after = fresh_stats(&stats);
                    let counted =
                        crate::round_trips_between(before.as_ref(), after.as_ref(), count as f64);
                    let segs = match (ss_before, ss_after) {
                        (Some(b), Some(a)) => Some(segments_by_zone(&b, &a, &hosts)),
                        _ => None,
                    };
                    let row = CityRow {
                        city,
                        mount_zone: zone.clone(),
                        op,
                        n: count,
                        median_ms: percentile(&ms, 0.5),
                        p90_ms: percentile(&ms, 0.9),
                        round_trips: counted.as_ref().and_then(|r| r.round_trips_per_op),
                        rpcs: counted.as_ref().and_then(|r| r.rpcs_per_op),
                        segs_by_zone: segs,
                        delta: counted.map(|r| r.delta).unwrap_or_default(),
                    };
                    eprintln!(
                    "failsafe-bench: cities: {op} from {city}: median {:.1} ms, p90 {:.1} ms, round trips {:?}",
                    row.median_ms, row.p90_ms, row.round_trips
                );
                    Ok::<CityRow, anyhow::Error>(row)
                };
            let mut save = || save().map(|()| None);
            cities.rows.push(group("page save", cfg.saves, &mut save)?);
            let mut stat = || {
                std::fs::metadata(&page)?;
                Ok(None)
            };
            cities.rows.push(group("stat", cfg.reads, &mut stat)?);
            let mut read = || workloads::read_page(&page, &mut buf).map(|()| None);
            cities.rows.push(group("open+read", cfg.reads, &mut read)?);
            if pass == 1 {
                // Mount A (the leader's city) rewrites the page, untimed;
                // then this mount's open+read of it is timed.
                let there = self.mounts[0]
                    .0
                    .path
                    .join("cities")
                    .join("read")
                    .join("page.txt");
                let mut k = 0u64;
                let mut changed = || {
                    k += 1;
                    std::fs::write(&there, workloads::page_bytes(cfg.page_bytes, 0xa000 + k))?;
                    let t = Instant::now();
                    workloads::read_page(&page, &mut buf)?;
                    Ok(Some(t.elapsed()))
                };
                let n = cfg.reads.min(CHANGED_READS);
                cities.rows.push(group(CHANGED, n, &mut changed)?);
            }
            // Before the leader may move to mount B's city.
            if let (1, Some(d)) = (pass, &cfg.dokuwiki) {
                cities.dokuwiki = Some(self.dokuwiki_views(rt, d, &cities.leader_zone));
            }
        }
        if let Some(c) = &self.cluster {
            cities.leader_zone_end = rt.block_on(leader_zone(c));
        }
        Ok(cities)
    }

    /// DokuWiki's state written through mount A (in the leader's city): a
    /// web host there installs it and seeds the pages; then a web host on
    /// the same port (the render cache is keyed by host and port) serves it
    /// through mount B, which views each page once and then `d.views` times
    /// in turn, counted.
    fn dokuwiki_views(
        &self,
        rt: &tokio::runtime::Runtime,
        d: &DokuCity,
        leader: &str,
    ) -> Result<CityViews, String> {
        let r = (|| -> anyhow::Result<CityViews> {
            if let Some(m) = failsafe_harness::dokuwiki::missing() {
                anyhow::bail!("{m} is missing (scripts/test.sh installs it)");
            }
            let (a, b) = (&self.mounts[0].0.path, &self.mounts[1].0.path);
            let state = a.join("dokuwiki");
            eprintln!(
                "failsafe-bench: cities: DokuWiki through mount A: installing and seeding ..."
            );
            failsafe_harness::dokuwiki::install_state(&state)?;
            let cfg = ServerConfig {
                port: failsafe_harness::dokuwiki::free_port()?,
                ..d.server
            };
            {
                let web = Server::start(&state, &self.work.join("dokuwiki-run-a"), &cfg)?;
                dokuwiki::seed(web.port, dokuwiki::UNCHANGED_PAGES)?;
            }
            let web = Server::start(&b.join("dokuwiki"), &self.work.join("dokuwiki-run-b"), &cfg)?;
            let mut browser = Browser::new(web.port);
            let failed = dokuwiki::warm_views(&mut browser, 0);
            anyhow::ensure!(
                failed == 0,
                "{failed} of the first page views through mount B failed"
            );
            eprintln!(
                "failsafe-bench: cities: DokuWiki through mount B (zone {}): {} page views ...",
                self.client_zones[1], d.views
            );
            let ns = self.net.client_ns(1);
            let ss_before = ss_segments(&ns);
            let views = dokuwiki::timed_views(
                &mut browser,
                0,
                d.views,
                self.stats.then_some(self.mounts[1].1.as_path()),
            );
            let ss_after = ss_segments(&ns);
            let segs = match (ss_before, ss_after) {
                (Some(b), Some(a)) => Some(segments_by_zone(&b, &a, &self.host_zones())),
                _ => None,
            };
            Ok(CityViews {
                mount_zone: self.client_zones[1].clone(),
                leader_zone: leader.to_string(),
                leader_zone_after: self
                    .cluster
                    .as_ref()
                    .and_then(|c| rt.block_on(leader_zone(c))),
                views,
                segs_by_zone: segs,
            })
        })();
        r.map_err(|e| {
            eprintln!("failsafe-bench: cities: DokuWiki FAILED: {e:#}");
            format!("{e:#}")
        })
    }

    /// Each host's address (as the mounts reach it) and zone.
    fn host_zones(&self) -> Vec<(String, String)> {
        ZONES
            .iter()
            .enumerate()
            .map(|(i, z)| (self.net.host_ips[i].clone(), z.to_string()))
            .collect()
    }

    fn stop(&mut self) {
        for (m, _) in &mut self.mounts {
            m.unmount();
        }
        if let Some(c) = self.cluster.as_mut() {
            c.stop_all();
        }
        for r in &mut self.relays {
            terminate(r);
        }
    }
}

/// The zone of the host the cluster status names as leader.
async fn leader_zone(cluster: &LocalCluster) -> Option<String> {
    let client = cluster.client().await.ok()?;
    let s = tokio::time::timeout(Duration::from_secs(5), client.status())
        .await
        .ok()?
        .ok()?;
    let addr = &s.hosts.iter().find(|h| h.host_id == s.leader_id)?.addr;
    cluster
        .hosts
        .iter()
        .find(|h| &h.addr == addr)
        .map(|h| h.zone.clone())
}

/// The mount's stats file as written after this call: the mount rewrites
/// it every second, so wait for a write that began after the operations
/// before this call returned (and their asynchronous releases were sent).
pub(crate) fn fresh_stats(path: &Path) -> Option<Value> {
    fresh_stats_at(path).map(|(v, _)| v)
}

/// `fresh_stats`, and when the mount wrote it.
pub(crate) fn fresh_stats_at(path: &Path) -> Option<(Value, SystemTime)> {
    std::thread::sleep(Duration::from_millis(100));
    let since = SystemTime::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let written = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if let Some(w) = written.filter(|w| *w > since) {
            let text = std::fs::read_to_string(path).ok()?;
            return serde_json::from_str(&text).ok().map(|v| (v, w));
        }
        if Instant::now() > deadline {
            eprintln!(
                "failsafe-bench: {} was not rewritten within 5 s; no round trips for this part",
                path.display()
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TCP segments sent on each established connection of namespace `ns`:
/// (local, peer) -> segs_out, from `ss -tinH`.
fn ss_segments(ns: &str) -> Option<BTreeMap<(String, String), u64>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-tinH", "state", "established"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(parse_ss(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ss(text: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    let mut conn: Option<(String, String)> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let Some(segs) = f.iter().find_map(|w| w.strip_prefix("segs_out:")) {
            if let (Some(k), Ok(n)) = (conn.take(), segs.parse::<u64>()) {
                out.insert(k, n);
            }
        } else if f.len() >= 4 && f[0].parse::<u64>().is_ok() && f[1].parse::<u64>().is_ok() {
            conn = Some((f[2].to_string(), f[3].to_string()));
        }
    }
    out
}

/// Segments sent between two `ss` snapshots, by the zone of the peer host
/// (peers that are no host under "other"). Connections closed in between
/// lose their count; new ones count from zero.
fn segments_by_zone(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
    hosts: &[(String, String)],
) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for (k, n) in after {
        let d = n.saturating_sub(before.get(k).copied().unwrap_or(0));
        let ip = k.1.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(&k.1);
        let ip = ip.trim_start_matches("[::ffff:").trim_end_matches(']');
        let zone = hosts
            .iter()
            .find(|(h, _)| h == ip)
            .map(|(_, z)| z.clone())
            .unwrap_or_else(|| "other".into());
        *by.entry(zone).or_insert(0) += d;
    }
    by
}

pub(crate) fn percentile(ms: &[f64], p: f64) -> f64 {
    if ms.is_empty() {
        return f64::NAN;
    }
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    // Nearest rank.
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_output_gives_segments_per_connection_and_zone() {
        let text = "0      0      10.199.2.1:51234   10.199.1.2:7000\n\t cubic wscale:7,7 rto:204 bytes_sent:100 segs_out:12 segs_in:10\n\
                    0      0      10.199.2.1:51236   10.199.1.1:7000\n\t cubic segs_out:5 segs_in:4\n";
        let s = parse_ss(text);
        assert_eq!(s.len(), 2);
        let mut before = s.clone();
        before.insert(("10.199.2.1:51234".into(), "10.199.1.2:7000".into()), 10);
        before.remove(&("10.199.2.1:51236".into(), "10.199.1.1:7000".into()));
        let hosts = vec![
            ("10.199.1.1".to_string(), "a".to_string()),
            ("10.199.1.2".to_string(), "b".to_string()),
        ];
        let by = segments_by_zone(&before, &s, &hosts);
        assert_eq!(by["b"], 2);
        assert_eq!(by["a"], 5);
        let row = CityRow {
            city: "x",
            mount_zone: "a".into(),
            op: "stat",
            n: 1,
            median_ms: 1.0,
            p90_ms: 1.0,
            round_trips: Some(7.0),
            rpcs: None,
            segs_by_zone: Some(by),
            delta: BTreeMap::new(),
        };
        assert_eq!(row.cross_share(), Some(2.0 / 7.0));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.9), 5.0);
    }
}
