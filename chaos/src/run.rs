//! One run: build the world, start the workload, play the fault schedule,
//! wait for the cluster to heal, read back the final state, and check.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::check::{self, FinalView, Seen};
use crate::http;
use crate::report::{FaultWindow, Report};
use crate::scenario::{FaultKind, Mode, Sabotage, Scenario};
use crate::workload::{self, History, Kind, LOG, PAGES, SCRATCH};
use crate::world::{Target, World};

/// Set by SIGINT/SIGTERM: the run stops early and cleans up.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Starts a workload thread with a file-descriptor table of its own
/// (unshare(CLONE_FILES)), and returns once it has it. The files it opens
/// on the mounts are then not in the table every command this process
/// spawns (ip, mount, fsd) inherits: a child's exec would close its copies,
/// and each close is a FUSE flush that waits for the cluster, so while a
/// fault keeps the cluster away the harness itself would stall.
fn worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let (ready, started) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's own kernel task; the
        // table it gets is a copy, so every descriptor stays valid.
        if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
            tracing::warn!(
                "a workload thread shares its file table with the harness ({})",
                std::io::Error::last_os_error()
            );
        }
        let _ = ready.send(());
        f()
    });
    // Nothing is spawned here until the copy is taken: a pipe end of a
    // spawn under way would be copied and held open.
    let _ = started.recv();
    handle
}

/// One step of the schedule.
struct Step {
    at_s: f64,
    fault: usize,
    rep: usize,
    start: bool,
}

fn schedule(s: &Scenario) -> Vec<Step> {
    let hosts = s.zones.len();
    let mut steps = Vec::new();
    for (fi, f) in s.faults.iter().enumerate() {
        let reps = match f.kind {
            FaultKind::RollingRestart => hosts,
            FaultKind::LeaderKill => f.repeat.max(1),
            _ => 1,
        };
        for rep in 0..reps {
            let at = f.at_s + f.every_s * rep as f64;
            steps.push(Step {
                at_s: at,
                fault: fi,
                rep,
                start: true,
            });
            let end = match f.kind {
                FaultKind::RollingRestart | FaultKind::Bitrot => at,
                _ => at + f.for_s,
            };
            steps.push(Step {
                at_s: end,
                fault: fi,
                rep,
                start: false,
            });
        }
    }
    // Stable: a step that starts and ends at once keeps its start first.
    steps.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    steps
}

/// Tells the workload's threads to stop when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sleeps until `t` seconds after `t0`, or until interrupted.
async fn sleep_until(t0: Instant, t: f64) -> bool {
    let target = t0 + Duration::from_secs_f64(t);
    while Instant::now() < target {
        if INTERRUPTED.load(Ordering::Relaxed) {
            return false;
        }
        tokio::time::sleep((target - Instant::now()).min(Duration::from_millis(100))).await;
    }
    !INTERRUPTED.load(Ordering::Relaxed)
}

/// [`sleep_until`], restarting any host that exits meanwhile (the
/// supervisor's part, [`World::supervise`]) about every second.
async fn supervised_sleep(world: &mut World, t0: Instant, t: f64) -> bool {
    loop {
        let next = t.min(t0.elapsed().as_secs_f64() + 1.0);
        if !sleep_until(t0, next).await {
            return false;
        }
        world.supervise();
        if next >= t {
            return true;
        }
    }
}

/// Sums a counter over all hosts from their /metrics, across restarts.
#[derive(Default)]
struct CounterTrack {
    last: Vec<f64>,
    base: Vec<f64>,
}

impl CounterTrack {
    async fn poll(&mut self, world: &World, name: &str) {
        let addrs = world.cluster.addrs();
        self.last.resize(addrs.len(), 0.0);
        self.base.resize(addrs.len(), 0.0);
        for (i, a) in addrs.iter().enumerate() {
            if let Some(v) = metric(world, a, name).await {
                if v < self.last[i] {
                    self.base[i] += self.last[i];
                }
                self.last[i] = v;
            }
        }
    }
    fn total(&self) -> f64 {
        self.last.iter().sum::<f64>() + self.base.iter().sum::<f64>()
    }
}

/// One counter's value from a host's /metrics (fetched as the admin).
async fn metric(world: &World, addr: &str, name: &str) -> Option<f64> {
    let body = world
        .cluster
        .metrics_at(addr, Duration::from_secs(1))
        .await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Blocks below their copy count, as the leader judges it (None: the
/// member that answered cannot judge).
pub(crate) fn below_copy_count(s: &failsafe_client::pb::StatusReply) -> Option<u64> {
    use failsafe_client::pb::ClusterMode;
    match s.mode() {
        ClusterMode::FailSafe => Some(0),
        ClusterMode::Limp => Some(s.under_replicated.max(1)),
        ClusterMode::Unknown => None,
    }
}

/// A tracker member the leader has not brought up to date: more than this
/// many entries behind its log, once the workload has stopped.
const TRACKER_LAG: u64 = 64;

/// A voter whose tracker is not caught up with the leader (a host that did
/// not return by itself), as the leader that answered sees it.
pub(crate) fn tracker_behind(s: &failsafe_client::pb::StatusReply) -> Option<String> {
    if s.leader_id == 0 || s.leader_id != s.host_id {
        return Some("no leader answered".into());
    }
    s.hosts
        .iter()
        .find(|h| h.voter && h.matched_index + TRACKER_LAG < s.last_log_index)
        .map(|h| {
            format!(
                "the tracker of host {:016x} ({}) holds the log to {} of {}",
                h.host_id, h.addr, h.matched_index, s.last_log_index
            )
        })
}

pub(crate) async fn run(
    s: &Scenario,
    work: &Path,
    report_dir: &Path,
    net: Option<failsafe_harness::netns::Net>,
    seed: u64,
) -> anyhow::Result<Report> {
    std::fs::create_dir_all(report_dir)?;
    let use_net = net.is_some();
    let mut report = Report::new(s, seed, use_net);
    for f in &s.faults {
        if f.kind.needs_netns() && !use_net {
            report.skipped.push(format!(
                "{:?} at {}s: needs network namespaces (root and iproute2)",
                f.kind, f.at_s
            ));
        }
    }
    println!(
        "failsafe-chaos: {} — {} hosts, {} mounts, {} s",
        s.name,
        s.zones.len(),
        s.clients,
        s.duration_s
    );
    let mut world = World::build(s, work, net).await?;
    if s.latency.is_some() {
        report.cities = world.probe_cities().await?;
        for c in &report.cities {
            println!("  cities: {c}");
        }
    }
    let result = drive(s, &mut world, &mut report, seed).await;
    world.save_logs(report_dir);
    world.teardown();
    result?;
    Ok(report)
}

async fn drive(
    s: &Scenario,
    world: &mut World,
    report: &mut Report,
    seed: u64,
) -> anyhow::Result<()> {
    let history = History::new();
    world.bitrot_candidates = workload::prepare(&world.mounts[0].path, &history, &s.workload)?;
    let stop = Arc::new(AtomicBool::new(false));
    // Also when this returns early with an error: the workload stops.
    let _stop = StopOnDrop(stop.clone());
    let revs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    // In HTTP mode, one wiki per mount: two web hosts over one wiki.
    let mut wikis = Vec::new();
    if s.workload.mode == Mode::Http {
        for (c, m) in world.mounts.iter().enumerate() {
            wikis.push(http::start_wiki(&m.path.join("wiki"), world.clock(c))?);
        }
    }
    for (c, m) in world.mounts.iter().enumerate() {
        let ctx = |history: &History| workload::Ctx {
            history: history.clone(),
            stop: stop.clone(),
            cfg: s.workload.clone(),
            client: c,
            root: m.path.clone(),
            revs: revs.clone(),
        };
        let port = wikis.get(c).map(|(_, p)| *p);
        for w in 0..s.workload.writers {
            let ctx = ctx(&history);
            threads.push(match port {
                Some(port) => worker(move || http::editor(ctx, w, port)),
                None => worker(move || workload::editor(ctx, w)),
            });
        }
        for a in 0..s.workload.appenders {
            let ctx = ctx(&history);
            threads.push(worker(move || workload::appender(ctx, a)));
        }
        for r in 0..s.workload.readers {
            let ctx = ctx(&history);
            let (clients, seed) = (s.clients, seed ^ ((c * 64 + r) as u64));
            threads.push(match port {
                Some(port) => worker(move || http::reader(ctx, r, clients, port, seed)),
                None => worker(move || workload::reader(ctx, r, clients, seed)),
            });
        }
    }
    let t0 = history.t0();
    let mut repaired = CounterTrack::default();
    let mut deltas = CounterTrack::default();
    repaired.poll(world, "failsafe_repair_bytes_total").await;
    deltas
        .poll(world, "failsafe_repair_delta_blocks_total")
        .await;
    let mut targets: std::collections::HashMap<(usize, usize), Target> = Default::default();
    let mut windows: Vec<FaultWindow> = Vec::new();
    let mut limp_seen = 0u64;
    let mut last_end = 0.0f64;
    for step in schedule(s) {
        if !supervised_sleep(world, t0, step.at_s).await {
            break;
        }
        let f = &s.faults[step.fault];
        if f.kind.needs_netns() && world.net.is_none() {
            continue;
        }
        let now = t0.elapsed().as_secs_f64();
        if step.start {
            if f.kind == FaultKind::AddHost {
                let zone = f.zone.clone().unwrap_or_default();
                let h = world.add_host(&zone, s.device_mb).await?;
                let what = format!(
                    "host {h} added in zone {zone} at {}",
                    world.cluster.hosts[h].addr
                );
                println!("  {now:6.1}s  {what}");
                let end_s = t0.elapsed().as_secs_f64();
                windows.push(FaultWindow::new(f.kind, Target::Host(h), what, now, end_s));
                last_end = last_end.max(end_s);
                continue;
            }
            let target = match f.kind {
                FaultKind::RollingRestart => Target::Host(step.rep),
                _ => {
                    world
                        .resolve(&f.target, seed as usize + step.fault + step.rep)
                        .await?
                }
            };
            targets.insert((step.fault, step.rep), target);
            let what = match target {
                // Only freeze targets a mount (Scenario::validate).
                Target::Mount(m) => world.freeze_mount(m)?,
                Target::Host(h) if f.kind == FaultKind::DrainRemove => {
                    let to_move = world.drain(h).await?;
                    format!("host {h} draining ({to_move} blocks to move), then removed")
                }
                Target::Host(h) if f.kind == FaultKind::Ship => {
                    let held = world.ship(h).await?;
                    format!("host {h} shipped ({held} blocks held elsewhere too) and shut down")
                }
                Target::Host(h) => world.start_fault(f.kind, h)?,
            };
            println!("  {now:6.1}s  {what}");
            windows.push(FaultWindow::new(f.kind, target, what, now, now));
        } else {
            let Some(&target) = targets.get(&(step.fault, step.rep)) else {
                continue;
            };
            let what = match target {
                Target::Mount(m) => world.thaw_mount(m)?,
                Target::Host(h) if f.kind == FaultKind::DrainRemove => {
                    world.remove_drained(h, Duration::from_secs(120)).await?;
                    format!("host {h} drained, removed and stopped")
                }
                Target::Host(h) => world.end_fault(f.kind, h)?,
            };
            if !what.is_empty() {
                println!("  {now:6.1}s  {what}");
            }
            if let Some(w) = windows
                .iter_mut()
                .rev()
                .find(|w| w.kind == f.kind && w.target == target)
            {
                w.end_s = now;
            }
            last_end = last_end.max(now);
        }
        if let Some(below) = world.status().await.as_ref().and_then(below_copy_count) {
            limp_seen = limp_seen.max(below);
        }
    }
    // Sabotage, if asked: behind the workload's back, through the mount.
    if let Some(sab) = s.sabotage {
        let _ = sleep_until(t0, s.duration_s / 2.0).await;
        let root = &world.mounts[0].path;
        match sab {
            Sabotage::WriteBehindMount => {
                let page = workload::page_name(0, 0, 0);
                std::fs::write(
                    root.join(PAGES).join(&page),
                    workload::page_content(&page, 1_000_000, 100),
                )?;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(root.join(LOG))?;
                std::io::Write::write_all(&mut f, b"sabotage: a line nobody appended\n")?;
            }
            Sabotage::DeleteBehindMount => {
                std::fs::remove_file(root.join(LOG))?;
            }
        }
        println!("  sabotage {sab:?} done");
    }
    // Meanwhile and afterwards: when is every block back at its copy count?
    // (With no fault injected, from now.)
    if windows.is_empty() {
        last_end = t0.elapsed().as_secs_f64();
    }
    let deadline_s = last_end + s.check.failsafe_within_s;
    let mut failsafe_at: Option<f64> = None;
    // Why the cluster is not whole yet, when every block has its copies.
    let mut lagging: Option<String> = None;
    loop {
        let now = t0.elapsed().as_secs_f64();
        let workload_over = now >= s.duration_s;
        if workload_over && !stop.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        world.supervise();
        if now >= last_end {
            let st = world.status().await;
            let behind = if workload_over {
                st.as_ref().map_or(Some("no answer".into()), tracker_behind)
            } else {
                None
            };
            match st.as_ref().and_then(below_copy_count) {
                Some(0) if behind.is_some() => {
                    lagging = behind;
                    failsafe_at = None;
                }
                Some(0) => {
                    lagging = None;
                    failsafe_at.get_or_insert(now);
                }
                Some(below) => {
                    limp_seen = limp_seen.max(below);
                    failsafe_at = None;
                }
                None => failsafe_at = None,
            }
        }
        repaired.poll(world, "failsafe_repair_bytes_total").await;
        deltas
            .poll(world, "failsafe_repair_delta_blocks_total")
            .await;
        if workload_over && (failsafe_at.is_some() || now > deadline_s) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(st) = world.status().await {
        report.warnings = st.warnings;
    }
    // Interrupted during a mount's freeze: its requests (and the threads
    // making them) wait until it is thawed.
    world.thaw_mounts();
    for t in threads {
        let _ = t.join();
    }
    repaired.poll(world, "failsafe_repair_bytes_total").await;
    deltas
        .poll(world, "failsafe_repair_delta_blocks_total")
        .await;
    if INTERRUPTED.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted");
    }
    let ops = history.snapshot();
    let mut views: Vec<FinalView> = world
        .mounts
        .iter()
        .enumerate()
        .map(|(c, m)| final_view(c, &m.path, &ops))
        .collect();
    // Wiki pages as the wikis show them.
    for (view, (_, port)) in views.iter_mut().zip(&wikis) {
        view.files.extend(http::final_pages(*port, &ops));
    }
    drop(wikis);
    let mut violations = check::check_reads(&ops);
    violations.extend(check::check_final(&ops, &views));
    violations.extend(check::check_lost_updates(&ops));
    violations.extend(check::check_mtimes(&ops));
    if s.check.no_failures {
        violations.extend(check::check_failures(&ops));
    }
    match failsafe_at {
        Some(t) => report.failsafe_after_s = Some((t - last_end).max(0.0)),
        None => violations.push(check::Violation {
            rule: "not_failsafe",
            detail: match &lagging {
                Some(why) => format!(
                    "not whole {:.0} s after the last fault ended: {why}",
                    s.check.failsafe_within_s
                ),
                None => format!(
                    "blocks still below their copy count {:.0} s after the last fault ended",
                    s.check.failsafe_within_s
                ),
            },
        }),
    }
    let corrupt = world.corrupt_copies();
    report.corrupt_copies_at_end = corrupt.len();
    if s.check.no_corrupt_copies {
        for p in corrupt {
            violations.push(check::Violation {
                rule: "corrupt_copy",
                detail: format!("{} is corrupt at the end", p.display()),
            });
        }
    }
    report.max_below_copy_count = limp_seen;
    report.bytes_rereplicated = repaired.total() as u64;
    report.copies_as_deltas = deltas.total() as u64;
    report.finish(ops, windows, violations);
    Ok(())
}

/// Reads back, through one mount, everything the history touched.
fn final_view(client: usize, root: &Path, ops: &[workload::Op]) -> FinalView {
    let mut view = FinalView {
        client,
        ..FinalView::default()
    };
    for op in ops {
        if matches!(op.kind, Kind::Save | Kind::Create | Kind::Delete)
            && !view.files.contains_key(&op.path)
        {
            let content = std::fs::read(root.join(&op.path)).ok();
            let name = op.path.rsplit('/').next().unwrap_or(&op.path);
            let seen = content.map(|c| {
                if op.kind == Kind::Save {
                    Seen::page(name, &c)
                } else {
                    Seen::file(&c)
                }
            });
            view.files.insert(op.path.clone(), seen);
        }
    }
    // Files nobody recorded are checked too: a scratch file the workload
    // never wrote is content nobody wrote.
    if let Ok(dir) = std::fs::read_dir(root.join(SCRATCH)) {
        for e in dir.flatten() {
            let rel = format!("{SCRATCH}/{}", e.file_name().to_string_lossy());
            if !view.files.contains_key(&rel) {
                view.files.insert(
                    rel.clone(),
                    std::fs::read(e.path()).ok().map(|c| Seen::file(&c)),
                );
            }
        }
    }
    view.log = std::fs::read(root.join(LOG)).unwrap_or_default();
    view
}
