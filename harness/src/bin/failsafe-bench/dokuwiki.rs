//! The DokuWiki section (on by default, `--no-dokuwiki` skips it, `--only
//! dokuwiki` runs nothing else): Debian's unmodified DokuWiki, lighttpd and
//! php-cgi (`failsafe_harness::dokuwiki`) with all its state on a local
//! directory, then on a failsafe mount of a fresh three-host cluster, in the
//! same run and with the same web server configuration, driven through its
//! web forms by editors and readers at once on one web host. With
//! `--cities`, `cities.rs` also serves it from a mount in a city without the
//! leader and counts what a page view of an unchanged page costs there.
//!
//! Pages: `bench:p00` … ; each editor owns `PAGES_PER_EDITOR` of them and
//! `UNCHANGED_PAGES` more are never edited after the seeding. An editor's
//! cycle is what a browser does to edit a page: GET the edit form, POST it
//! back with its `sectok` (a new text of a few KiB every time), follow the
//! redirect to the page, and load the taskrunner image the page embeds
//! (DokuWiki's indexer runs there). An editor never saves the same page
//! twice within 1.1 s: DokuWiki keys revisions by the second. A reader views
//! every page in turn. A request fails on a transport error or timeout, an
//! HTTP status other than 2xx/3xx, one of DokuWiki's error boxes (`<div
//! class="error">`) in the page, or a page that does not show what it
//! should (its heading; after a save, the text just saved).
//!
//! The report's section, the goals and the JSON are in `dokuwiki/report.rs`.

mod report;

pub(crate) use report::Section;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context};
use failsafe_harness::dokuwiki::{
    self, edit_path, error_messages, location_path, save_body, view_path, Browser, Server,
    ServerConfig,
};
use failsafe_harness::httpc::Reply;
use serde_json::{json, Value};

use crate::cities::{fresh_stats, fresh_stats_at, percentile};
use crate::report::fmt_value;
use crate::targets::Failsafe;
use crate::RoundTripCount;

pub(crate) const PAGES_PER_EDITOR: usize = 4;
pub(crate) const UNCHANGED_PAGES: usize = 8;
/// The CPU group of the benchmark's own client threads.
const BROWSERS: &str = "the benchmark's browsers (this process)";
/// DokuWiki keys a page's revisions by the second.
const SAME_PAGE_GAP: Duration = Duration::from_millis(1100);

pub(crate) struct DokuConfig {
    pub(crate) seconds: f64,
    pub(crate) warmup: f64,
    pub(crate) editors: usize,
    pub(crate) readers: usize,
    pub(crate) php_children: u32,
    /// Page views of unchanged pages, one at a time, for the profile.
    pub(crate) profile_views: usize,
    /// Edit cycles, one at a time, for the profile.
    pub(crate) profile_saves: usize,
    /// Mount with `stats=PATH`.
    pub(crate) stats: bool,
}

impl DokuConfig {
    pub(crate) fn pages(&self) -> usize {
        self.editors * PAGES_PER_EDITOR + UNCHANGED_PAGES
    }

    pub(crate) fn server(&self) -> ServerConfig {
        ServerConfig {
            php_children: self.php_children,
            port: 0,
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "warmup_seconds": self.warmup,
            "editors": self.editors,
            "readers": self.readers,
            "pages": self.pages(),
            "pages_per_editor": PAGES_PER_EDITOR,
            "unchanged_pages": UNCHANGED_PAGES,
            "php_fcgi_children": self.php_children,
            "profile_views": self.profile_views,
            "profile_edit_cycles": self.profile_saves,
        })
    }
}

pub(crate) fn page_id(i: usize) -> String {
    format!("bench:p{i:02}")
}

fn title(i: usize) -> String {
    format!("Page {i:02}")
}

const WORDS: [&str; 32] = [
    "replica", "quorum", "lease", "block", "tracker", "city", "leader", "mount", "page", "wiki",
    "editor", "reader", "cache", "commit", "round", "trip", "latency", "disk", "host", "zone",
    "fsync", "rename", "attic", "index", "history", "change", "draft", "section", "table", "list",
    "link", "heading",
];

/// A wiki page of about 4 KiB in DokuWiki's syntax (headings, paragraphs
/// with markup and links to other pages, lists, a table, a code block),
/// different for every `(page, rev)`, with `mark` as its first paragraph.
pub(crate) fn page_text(page: usize, pages: usize, rev: u64, mark: &str) -> String {
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn word(&mut self) -> &'static str {
            WORDS[(self.next() % WORDS.len() as u64) as usize]
        }
    }
    let mut r = Rng((page as u64) << 32 ^ rev ^ 0x5eed_d0c0);
    let mut s = format!("====== {} ======\n\n{mark}\n\n", title(page));
    for sec in 1..=4 {
        s.push_str(&format!("===== Section {sec}: the {} =====\n\n", r.word()));
        for k in 0..90 {
            match k % 15 {
                4 => s.push_str(&format!("**{}** ", r.word())),
                9 => s.push_str(&format!("//{}// ", r.word())),
                13 => {
                    let other = (page + sec + k) % pages;
                    s.push_str(&format!("[[{}|{}]] ", page_id(other), title(other)))
                }
                _ => {
                    s.push_str(r.word());
                    s.push(' ');
                }
            }
        }
        s.push_str("\n\n");
        for _ in 0..4 {
            s.push_str(&format!("  * {} {} {}\n", r.word(), r.word(), r.word()));
        }
        s.push_str("\n^ what ^ how many ^ where ^\n");
        for _ in 0..3 {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                r.word(),
                r.next() % 1000,
                r.word()
            ));
        }
        s.push('\n');
    }
    s.push_str("<code>\n");
    for _ in 0..4 {
        s.push_str(&format!("{} = {}\n", r.word(), r.next() % 100_000));
    }
    s.push_str("</code>\n");
    s
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Kind {
    /// A reader's view of a page the editors edit.
    View,
    /// A reader's view of a page nobody edits after the seeding.
    ViewUnchanged,
    EditForm,
    Save,
    ViewAfterSave,
    Taskrunner,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::View,
        Kind::ViewUnchanged,
        Kind::EditForm,
        Kind::Save,
        Kind::ViewAfterSave,
        Kind::Taskrunner,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::View => "page view of an edited page (reader)",
            Kind::ViewUnchanged => "page view of an unchanged page (reader)",
            Kind::EditForm => "edit form",
            Kind::Save => "save (POST)",
            Kind::ViewAfterSave => "page view after the save",
            Kind::Taskrunner => "taskrunner",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::View => "view_edited_page",
            Kind::ViewUnchanged => "view_unchanged_page",
            Kind::EditForm => "edit_form",
            Kind::Save => "save",
            Kind::ViewAfterSave => "view_after_save",
            Kind::Taskrunner => "taskrunner",
        }
    }
}

/// One request: when it started and ended (seconds since the workload
/// began) and why it failed, if it did.
struct Rec {
    kind: Kind,
    end: f64,
    ms: f64,
    failure: Option<String>,
}

/// Sends one request and checks its reply.
fn timed(
    b: &mut Browser,
    t0: Instant,
    kind: Kind,
    method: &str,
    path: &str,
    body: &str,
    check: impl Fn(&Reply) -> Result<(), String>,
) -> (Option<Reply>, Rec) {
    let start = Instant::now();
    let r = b.request(method, path, body);
    let end = Instant::now();
    let failure = match &r {
        Err(e) => Some(format!("{method} {path}: {e}")),
        Ok(reply) => check(reply).err().map(|e| format!("{method} {path}: {e}")),
    };
    let rec = Rec {
        kind,
        end: (end - t0).as_secs_f64(),
        ms: (end - start).as_secs_f64() * 1e3,
        failure,
    };
    let ok = rec.failure.is_none();
    (r.ok().filter(|_| ok), rec)
}

/// A page DokuWiki served without an error, showing `expect`.
fn page_ok(r: &Reply, expect: &str) -> Result<(), String> {
    if r.status != 200 {
        return Err(format!("HTTP {}", r.status));
    }
    let errors = error_messages(&r.body);
    if !errors.is_empty() {
        return Err(format!("DokuWiki error: {}", errors.join(" | ")));
    }
    if !r.body.contains(expect) {
        return Err(format!(
            "the page does not show {expect:?}; {}",
            first_heading(&r.body)
        ));
    }
    Ok(())
}

/// What a page shows in place of the expected content: the first heading
/// of its text, or that it has none (DokuWiki rendered an empty page text).
fn first_heading(html: &str) -> String {
    // The template's own header is an <h1> too, without this class.
    let Some(at) = html.find("<h1 class=\"sectionedit") else {
        return "its text has no heading (DokuWiki rendered an empty page text)".into();
    };
    let rest = &html[at..];
    let text = rest
        .find('>')
        .map(|g| &rest[g + 1..])
        .and_then(|t| t.find("</h1>").map(|e| &t[..e]))
        .unwrap_or("?");
    format!("its heading is {text:?}")
}

fn view_check(page: usize) -> impl Fn(&Reply) -> Result<(), String> {
    let heading = format!("{}</h1>", title(page));
    move |r| page_ok(r, &heading)
}

/// A page view of `page`, checked.
fn view(b: &mut Browser, t0: Instant, kind: Kind, page: usize) -> Rec {
    let path = view_path(&page_id(page));
    timed(b, t0, kind, "GET", &path, "", view_check(page)).1
}

/// One editor's edit cycle of `page`: edit form, save, the page it
/// redirects to, the taskrunner image; each request goes to `out` as it
/// ends.
fn edit_cycle(
    b: &mut Browser,
    t0: Instant,
    page: usize,
    pages: usize,
    rev: u64,
    mark: &str,
    out: &mut dyn FnMut(Rec),
) {
    let id = page_id(page);
    let (form, rec) = timed(b, t0, Kind::EditForm, "GET", &edit_path(&id), "", |r| {
        page_ok(r, "name=\"sectok\"")
    });
    out(rec);
    let Some(form) = form else { return };
    let text = page_text(page, pages, rev, mark);
    let Some(body) = save_body(&form.body, &id, &text, &format!("bench revision {rev}")) else {
        return;
    };
    let (saved, rec) = timed(b, t0, Kind::Save, "POST", "/doku.php", &body, |r| {
        match (r.status, location_path(r)) {
            (302 | 303, Some(_)) => Ok(()),
            (200, _) => {
                let errors = error_messages(&r.body);
                Err(format!(
                    "HTTP 200 instead of a redirect (not saved){}",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", errors.join(" | "))
                    }
                ))
            }
            (s, _) => Err(format!("HTTP {s}")),
        }
    });
    out(rec);
    let Some(to) = saved.as_ref().and_then(location_path) else {
        return;
    };
    let (_, rec) = timed(b, t0, Kind::ViewAfterSave, "GET", &to, "", |r| {
        page_ok(r, mark)
    });
    out(rec);
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (_, rec) = timed(
        b,
        t0,
        Kind::Taskrunner,
        "GET",
        &format!("/lib/exe/taskrunner.php?id={id}&{unix}"),
        "",
        |r| match r.status {
            200 => Ok(()),
            s => Err(format!("HTTP {s}")),
        },
    );
    out(rec);
}

/// Saves every page once through the forms (revision 0), then views each
/// once so its render cache exists.
pub(crate) fn seed(port: u16, pages: usize) -> anyhow::Result<()> {
    let mut b = Browser::new(port);
    for i in 0..pages {
        let id = page_id(i);
        let text = page_text(i, pages, 0, "Seeded as revision 0.");
        let r = b.edit(&id, &text, "seeded")?;
        ensure!(
            matches!(r.status, 302 | 303),
            "seeding {id}: HTTP {} instead of a redirect: {:?}",
            r.status,
            error_messages(&r.body)
        );
    }
    for i in 0..pages {
        let r = b.get(&view_path(&page_id(i)))?;
        view_check(i)(&r).map_err(|e| anyhow::anyhow!("viewing {}: {e}", page_id(i)))?;
    }
    Ok(())
}

/// Latency of one kind of request over a set of records.
pub(crate) struct KindStats {
    pub(crate) n: u64,
    pub(crate) failed: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// Page views (or edit cycles) one at a time with nothing else running,
/// and what the mount did for them.
pub(crate) struct Profile {
    pub(crate) n: usize,
    pub(crate) median_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) failed: usize,
    pub(crate) counters: Option<RoundTripCount>,
}

impl Profile {
    /// FUSE operations per unit by kind: (op, count, round trips, ms in the
    /// mount), from the stats file's `ops.OP.*` counters.
    pub(crate) fn ops(&self) -> Vec<(String, f64, f64, f64)> {
        let Some(c) = &self.counters else {
            return Vec::new();
        };
        let n = self.n.max(1) as f64;
        let mut by: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
        for (k, v) in &c.delta {
            let mut parts = k.split('.');
            if let (Some("ops"), Some(op), Some(field), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                let e = by.entry(op.to_string()).or_default();
                match field {
                    "count" => e.0 += v / n,
                    "round_trips" => e.1 += v / n,
                    "time_us" => e.2 += v / n / 1e3,
                    _ => {}
                }
            }
        }
        let mut v: Vec<_> = by
            .into_iter()
            .filter(|(_, (c, r, _))| *c > 0.0 || *r > 0.0)
            .map(|(op, (c, r, t))| (op, c, r, t))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    fn to_json(&self) -> Value {
        json!({
            "n": self.n,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "failed": self.failed,
            "round_trips_per_unit": self.counters.as_ref().and_then(|c| c.round_trips_per_op),
            "rpcs_per_unit": self.counters.as_ref().and_then(|c| c.rpcs_per_op),
            "fuse_ops_per_unit": self.ops().iter().map(|(op, c, r, t)| json!({
                "op": op, "count": c, "round_trips": r, "mount_ms": t,
            })).collect::<Vec<_>>(),
            "delta": self.counters.as_ref().map(|c| &c.delta),
        })
    }
}

/// One target's run.
pub(crate) struct DokuRun {
    pub(crate) setup: String,
    pub(crate) secs: f64,
    pub(crate) kinds: Vec<(Kind, KindStats)>,
    /// Requests that ended within the measured seconds, and how many failed.
    pub(crate) requests: u64,
    pub(crate) failed: u64,
    /// Failed requests outside them (warm-up, the last requests in flight).
    pub(crate) failed_outside: u64,
    /// The first few failures, as they were.
    pub(crate) failure_samples: Vec<String>,
    /// Times an editor waited for a page of its own to be 1.1 s old.
    pub(crate) editor_waits: u64,
    /// The mount's counters over (about) the measured seconds, per request.
    pub(crate) round_trips: Option<RoundTripCount>,
    /// Cores busy during the measured seconds.
    pub(crate) cpu: CpuUse,
    /// Page views of unchanged pages, one at a time.
    pub(crate) views: Profile,
    /// The requests of edit cycles, one at a time, by kind.
    pub(crate) edits: Vec<(Kind, Profile)>,
    /// lighttpd's error log (PHP warnings) and DokuWiki's own error log.
    pub(crate) server_errors: Vec<String>,
}

impl DokuRun {
    pub(crate) fn rate(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-9)
    }

    pub(crate) fn kind(&self, k: Kind) -> Option<&KindStats> {
        self.kinds.iter().find(|(x, _)| *x == k).map(|(_, s)| s)
    }

    pub(crate) fn kind_rate(&self, k: Kind) -> f64 {
        self.kind(k)
            .map_or(0.0, |s| s.n as f64 / self.secs.max(1e-9))
    }

    /// CPU milliseconds the server side (web server, and the cluster and
    /// the mount on failsafe) spent per request.
    pub(crate) fn cpu_ms_per_request(&self) -> Option<f64> {
        let cores: f64 = self
            .cpu
            .by_group
            .iter()
            .filter(|(g, _)| *g != BROWSERS)
            .map(|(_, c)| c)
            .sum();
        (self.requests > 0).then(|| cores * self.secs / self.requests as f64 * 1e3)
    }

    /// The readers' page views per second.
    pub(crate) fn views_rate(&self) -> f64 {
        self.kind_rate(Kind::View) + self.kind_rate(Kind::ViewUnchanged)
    }

    fn to_json(&self) -> Value {
        json!({
            "setup": self.setup,
            "seconds": self.secs,
            "requests": self.requests,
            "requests_per_second": self.rate(),
            "failed": self.failed,
            "failed_outside_the_measured_seconds": self.failed_outside,
            "failure_samples": self.failure_samples,
            "editor_waits_for_a_page_1_1_s_old": self.editor_waits,
            "by_kind": self.kinds.iter().map(|(k, s)| (k.key().to_string(), json!({
                "requests": s.n,
                "per_second": s.n as f64 / self.secs.max(1e-9),
                "failed": s.failed,
                "p50_ms": s.p50_ms,
                "p99_ms": s.p99_ms,
            }))).collect::<serde_json::Map<_, _>>(),
            "round_trips_per_request": self.round_trips.as_ref().and_then(|r| r.round_trips_per_op),
            "rpcs_per_request": self.round_trips.as_ref().and_then(|r| r.rpcs_per_op),
            "counters_delta": self.round_trips.as_ref().map(|r| &r.delta),
            "cores_busy": {
                "by_process": self.cpu.by_group,
                "machine": self.cpu.machine,
            },
            "cpu_ms_per_request_server_side": self.cpu_ms_per_request(),
            "profile": {
                "view_unchanged": self.views.to_json(),
                "edit_cycle": self.edits.iter().map(|(k, p)| (k.key().to_string(), p.to_json()))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "server_errors": self.server_errors,
        })
    }
}

/// Both targets.
pub(crate) struct DokuResults {
    pub(crate) local: Result<DokuRun, String>,
    pub(crate) failsafe: Result<DokuRun, String>,
}

impl DokuResults {
    /// failsafe's requests/s over local's.
    pub(crate) fn ratio(&self) -> Option<f64> {
        let (Ok(l), Ok(f)) = (&self.local, &self.failsafe) else {
            return None;
        };
        (l.rate() > 0.0).then(|| f.rate() / l.rate())
    }
}

/// Runs the section: local, then failsafe, each set up, measured and torn
/// down in turn; Err says why the section was skipped altogether.
pub(crate) fn run(
    root: &Path,
    rt: &tokio::runtime::Runtime,
    cfg: &DokuConfig,
) -> Result<DokuResults, String> {
    if let Some(m) = dokuwiki::missing() {
        return Err(format!(
            "{m} is missing (scripts/test.sh installs Debian's dokuwiki, php-cgi and lighttpd)"
        ));
    }
    if !crate::is_root() {
        return Err("needs root (a FUSE mount, mount namespaces, lighttpd as www-data)".into());
    }
    let one = |target: &str| {
        eprintln!("failsafe-bench: dokuwiki: {target} ...");
        let dir = root.join("dokuwiki").join(target);
        let r = run_one(&dir, rt, cfg, target == "failsafe").map_err(|e| {
            eprintln!("failsafe-bench: dokuwiki: {target} FAILED: {e:#}");
            format!("{e:#}")
        });
        let _ = std::fs::remove_dir_all(&dir);
        r
    };
    let local = one("local");
    let failsafe = one("failsafe");
    Ok(DokuResults { local, failsafe })
}

fn run_one(
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    cfg: &DokuConfig,
    on_failsafe: bool,
) -> anyhow::Result<DokuRun> {
    std::fs::create_dir_all(dir)?;
    // What earlier parts of the run left for the disk to write back is
    // written now, not while this one is measured.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    // Declared before the server, so dropped after it: the web server lets
    // go of the mount before the mount goes.
    let mut cluster = None;
    let (state, setup) = if on_failsafe {
        let f = Failsafe::start(dir, rt, cfg.stats, true)?;
        let state = f.mnt.join("dokuwiki");
        let setup = format!(
            "a failsafe mount of a fresh cluster of 3 fsd hosts (zones a, b, c) on loopback, \
             data under {}; `mount-failsafe -o {}`",
            f.root.display(),
            f.opts(0)
        );
        cluster = Some(f);
        (state, setup)
    } else {
        let state = dir.join("state");
        (state.clone(), format!("a directory, {}", state.display()))
    };
    dokuwiki::install_state(&state)?;
    let server = Server::start(&state, &dir.join("run"), &cfg.server())?;
    let stats = cluster.as_ref().and_then(|f| f.stats.clone());
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (what, pid) in cluster.iter().flat_map(|f| f.pids()) {
        let g = if what.starts_with("fsd") {
            "fsd (3 hosts)"
        } else {
            "mount"
        };
        groups.entry(g.to_string()).or_default().push(pid);
    }
    let mut run = measure(&server, cfg, stats.as_deref(), groups.into_iter().collect())?;
    run.setup = format!(
        "{setup}; DokuWiki's data/ and acl/ there, bind-mounted over /var/lib/dokuwiki/ in \
         lighttpd's own mount namespace"
    );
    let mut errors = server.error_lines();
    errors.extend(
        server
            .dokuwiki_errors()
            .into_iter()
            .map(|l| format!("DokuWiki: {l}")),
    );
    run.server_errors = errors;
    drop(server);
    drop(cluster);
    Ok(run)
}

fn kind_stats(recs: &[&Rec], k: Kind) -> KindStats {
    let ms: Vec<f64> = recs.iter().filter(|r| r.kind == k).map(|r| r.ms).collect();
    KindStats {
        n: ms.len() as u64,
        failed: recs
            .iter()
            .filter(|r| r.kind == k && r.failure.is_some())
            .count() as u64,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
    }
}

/// The mount's counters now and when they were written, as seconds since
/// `t0` (`t0_sys` is the same moment by the wall clock).
fn snapshot(stats: Option<&Path>, t0_sys: SystemTime) -> Option<(Value, f64)> {
    let (v, at) = fresh_stats_at(stats?)?;
    let secs = at.duration_since(t0_sys).map_or(0.0, |d| d.as_secs_f64());
    Some((v, secs))
}

/// CPU time (user + system) of process `pid` so far, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}

/// Busy and total CPU time of the whole machine so far (all cores), in
/// ticks, from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    // idle and iowait.
    let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU seconds of each group of processes, and the machine's ticks.
#[derive(Clone)]
struct CpuSample {
    by_group: BTreeMap<String, f64>,
    machine: Option<(u64, u64)>,
}

fn cpu_sample(groups: &[(String, Vec<u32>)]) -> CpuSample {
    let by_group = groups
        .iter()
        .map(|(g, pids)| (g.clone(), pids.iter().filter_map(|&p| cpu_secs(p)).sum()))
        .collect();
    CpuSample {
        by_group,
        machine: machine_ticks(),
    }
}

/// Cores busy over the measured seconds: by group of our processes, and
/// the whole machine's (anything else running included).
pub(crate) struct CpuUse {
    pub(crate) by_group: BTreeMap<String, f64>,
    pub(crate) machine: Option<f64>,
}

fn cpu_use(before: &CpuSample, after: &CpuSample, secs: f64) -> CpuUse {
    let by_group = after
        .by_group
        .iter()
        .map(|(g, a)| {
            let b = before.by_group.get(g).copied().unwrap_or(0.0);
            (g.clone(), (a - b).max(0.0) / secs.max(1e-9))
        })
        .collect();
    let machine = match (before.machine, after.machine) {
        (Some((b_busy, b_total)), Some((a_busy, a_total))) if a_total > b_total => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            Some((a_busy - b_busy) as f64 / (a_total - b_total) as f64 * cores)
        }
        _ => None,
    };
    CpuUse { by_group, machine }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn measure(
    server: &Server,
    cfg: &DokuConfig,
    stats: Option<&Path>,
    mut groups: Vec<(String, Vec<u32>)>,
) -> anyhow::Result<DokuRun> {
    let pages = cfg.pages();
    eprintln!("failsafe-bench: dokuwiki: seeding {pages} pages through the edit form ...");
    seed(server.port, pages).context("seeding the pages")?;
    let port = server.port;
    eprintln!(
        "failsafe-bench: dokuwiki: {} editors and {} readers, {} s warm-up then {} s ...",
        cfg.editors, cfg.readers, cfg.warmup, cfg.seconds
    );
    // php-cgi's workers are there once it has served.
    if let Some(pid) = server.pid() {
        groups.insert(
            0,
            ("lighttpd and php-cgi".into(), dokuwiki::descendants(pid)),
        );
    }
    groups.push((BROWSERS.into(), vec![std::process::id()]));
    let t0 = Instant::now();
    let t0_sys = SystemTime::now();
    let start = t0 + Duration::from_secs_f64(cfg.warmup);
    let end = start + Duration::from_secs_f64(cfg.seconds);
    let (recs, waits, before, after, cpu) = std::thread::scope(|s| {
        let mut editors = Vec::new();
        for e in 0..cfg.editors {
            editors.push(s.spawn(move || {
                let mut b = Browser::new(port);
                let mine: Vec<usize> = (0..PAGES_PER_EDITOR)
                    .map(|k| e * PAGES_PER_EDITOR + k)
                    .collect();
                let mut last: Vec<Option<Instant>> = vec![None; mine.len()];
                let (mut out, mut waits, mut rev) = (Vec::new(), 0u64, 0u64);
                while Instant::now() < end {
                    let k = (0..mine.len())
                        .min_by_key(|&k| last[k])
                        .expect("an editor has pages");
                    if let Some(at) = last[k] {
                        if at.elapsed() < SAME_PAGE_GAP {
                            waits += 1;
                            sleep_until((at + SAME_PAGE_GAP).min(end));
                            continue;
                        }
                    }
                    rev += 1;
                    let mark = format!("Saved as revision {rev} by editor {e}.");
                    edit_cycle(&mut b, t0, mine[k], pages, rev, &mark, &mut |r| out.push(r));
                    last[k] = Some(Instant::now());
                }
                (out, waits)
            }));
        }
        let mut readers = Vec::new();
        for r in 0..cfg.readers {
            readers.push(s.spawn(move || {
                let mut b = Browser::new(port);
                let mut out = Vec::new();
                let mut i = r * 7;
                while Instant::now() < end {
                    let page = i % pages;
                    i += 1;
                    let kind = if page < cfg.editors * PAGES_PER_EDITOR {
                        Kind::View
                    } else {
                        Kind::ViewUnchanged
                    };
                    out.push(view(&mut b, t0, kind, page));
                }
                out
            }));
        }
        sleep_until(start);
        let cpu_before = cpu_sample(&groups);
        let before = snapshot(stats, t0_sys);
        sleep_until(end);
        let cpu_after = cpu_sample(&groups);
        let after = snapshot(stats, t0_sys);
        let mut recs = Vec::new();
        let mut waits = 0;
        for h in editors {
            match h.join() {
                Ok((o, w)) => {
                    recs.extend(o);
                    waits += w;
                }
                Err(_) => eprintln!("failsafe-bench: dokuwiki: an editor thread panicked"),
            }
        }
        for h in readers {
            match h.join() {
                Ok(o) => recs.extend(o),
                Err(_) => eprintln!("failsafe-bench: dokuwiki: a reader thread panicked"),
            }
        }
        let cpu = cpu_use(&cpu_before, &cpu_after, cfg.seconds);
        (recs, waits, before, after, cpu)
    });
    let (w0, w1) = (cfg.warmup, cfg.warmup + cfg.seconds);
    let window: Vec<&Rec> = recs.iter().filter(|r| r.end >= w0 && r.end < w1).collect();
    let failed = window.iter().filter(|r| r.failure.is_some()).count() as u64;
    let failed_all = recs.iter().filter(|r| r.failure.is_some()).count() as u64;
    let failure_samples: Vec<String> = recs
        .iter()
        .filter_map(|r| r.failure.clone())
        .take(10)
        .collect();
    for f in &failure_samples {
        eprintln!("failsafe-bench: dokuwiki: failed: {f}");
    }
    // Per request: the requests that ended between the two writes of the
    // stats file.
    let round_trips = match (&before, &after) {
        (Some((b, tb)), Some((a, ta))) => {
            let n = recs.iter().filter(|r| r.end >= *tb && r.end < *ta).count();
            crate::round_trips_between(Some(b), Some(a), n as f64)
        }
        _ => None,
    };
    let kinds = Kind::ALL
        .iter()
        .map(|&k| (k, kind_stats(&window, k)))
        .filter(|(_, s)| s.n > 0)
        .collect();
    eprintln!(
        "failsafe-bench: dokuwiki: profile: {} views of unchanged pages, {} edit cycles, one at a time ...",
        cfg.profile_views, cfg.profile_saves
    );
    // The last requests' work after their replies (the taskrunner's
    // indexing) is not the profile's.
    wait_quiet(stats);
    let (views, edits) = profile(port, cfg, stats);
    let run = DokuRun {
        setup: String::new(),
        secs: cfg.seconds,
        kinds,
        requests: window.len() as u64,
        failed,
        failed_outside: failed_all - failed,
        failure_samples,
        editor_waits: waits,
        round_trips,
        cpu,
        views,
        edits,
        server_errors: Vec::new(),
    };
    eprintln!(
        "failsafe-bench: dokuwiki: {} requests/s ({} views/s, {} saves/s), {} failed; one view alone {} ms",
        fmt_value(run.rate()),
        fmt_value(run.views_rate()),
        fmt_value(run.kind_rate(Kind::Save)),
        run.failed,
        fmt_value(run.views.median_ms),
    );
    Ok(run)
}

/// With nothing else running: page views of the unchanged pages, then
/// edit cycles of one editor's page with the mount's counters read after
/// each request; what each kind of request took and what the mount did for
/// it.
fn profile(port: u16, cfg: &DokuConfig, stats: Option<&Path>) -> (Profile, Vec<(Kind, Profile)>) {
    let first_unchanged = cfg.editors * PAGES_PER_EDITOR;
    let mut b = Browser::new(port);
    let warm_failed = warm_views(&mut b, first_unchanged);
    let mut views = timed_views(&mut b, first_unchanged, cfg.profile_views, stats);
    views.failed += warm_failed;
    #[derive(Default)]
    struct Acc {
        ms: Vec<f64>,
        failed: usize,
        delta: BTreeMap<String, f64>,
        counted: bool,
    }
    let mut acc: BTreeMap<Kind, Acc> = BTreeMap::new();
    let t0 = Instant::now();
    let mut last = stats.and_then(fresh_stats);
    for n in 0..cfg.profile_saves {
        let started = Instant::now();
        let mark = format!("Profiled as revision {n}.");
        let rev = 1_000_000 + n as u64;
        edit_cycle(&mut b, t0, 0, cfg.pages(), rev, &mark, &mut |rec| {
            let now = stats.and_then(fresh_stats);
            let a = acc.entry(rec.kind).or_default();
            a.ms.push(rec.ms);
            if let Some(f) = &rec.failure {
                eprintln!("failsafe-bench: dokuwiki: profile: failed: {f}");
                a.failed += 1;
            }
            if let Some(d) = crate::round_trips_between(last.as_ref(), now.as_ref(), 1.0) {
                if last.is_some() {
                    for (k, v) in d.delta {
                        *a.delta.entry(k).or_default() += v;
                    }
                    a.counted = true;
                }
            }
            last = now;
        });
        sleep_until(started + SAME_PAGE_GAP);
    }
    let edits = acc
        .into_iter()
        .map(|(k, a)| {
            let n = a.ms.len();
            let counters = a.counted.then(|| per_unit(a.delta, n));
            let p = Profile {
                n,
                median_ms: percentile(&a.ms, 0.5),
                p90_ms: percentile(&a.ms, 0.9),
                failed: a.failed,
                counters,
            };
            (k, p)
        })
        .collect();
    (views, edits)
}

/// Waits until the mount has served no FUSE operation for one rewrite of
/// its stats file (at most 30 s); without stats, 2 s.
fn wait_quiet(stats: Option<&Path>) {
    let Some(path) = stats else {
        std::thread::sleep(Duration::from_secs(2));
        return;
    };
    let ops = |v: &Value| {
        v["ops"]
            .as_object()
            .map(|m| m.values().filter_map(|o| o["count"].as_u64()).sum::<u64>())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = fresh_stats(path).and_then(|v| ops(&v));
    while Instant::now() < deadline {
        let now = fresh_stats(path).and_then(|v| ops(&v));
        if now.is_some() && now == last {
            return;
        }
        last = now;
    }
    eprintln!("failsafe-bench: dokuwiki: the mount was still busy after 30 s; profiling anyway");
}

/// Counters summed over `n` requests, as `round_trips_between` gives them
/// for one.
fn per_unit(delta: BTreeMap<String, f64>, n: usize) -> RoundTripCount {
    let sum = |name: &str| {
        delta
            .iter()
            .filter(|(k, _)| k.rsplit('.').next() == Some(name))
            .map(|(_, v)| v)
            .sum::<f64>()
            / n.max(1) as f64
    };
    RoundTripCount {
        round_trips_per_op: Some(sum("round_trips")),
        rpcs_per_op: Some(sum("rpcs")),
        delta,
    }
}

/// One view of each of the unchanged pages from `first` on.
/// Returns how many failed (each is logged).
pub(crate) fn warm_views(b: &mut Browser, first: usize) -> usize {
    let t0 = Instant::now();
    let mut failed = 0;
    for p in first..first + UNCHANGED_PAGES {
        let rec = view(b, t0, Kind::ViewUnchanged, p);
        if let Some(f) = rec.failure {
            eprintln!(
                "failsafe-bench: dokuwiki: warming {}: failed: {f}",
                page_id(p)
            );
            failed += 1;
        }
    }
    failed
}

/// `n` page views, one at a time, of the pages from `first` on (never
/// edited after the seeding), in turn; timed, and the mount's counters
/// over them.
pub(crate) fn timed_views(
    b: &mut Browser,
    first: usize,
    n: usize,
    stats: Option<&Path>,
) -> Profile {
    let t0 = Instant::now();
    let before = stats.and_then(fresh_stats);
    let mut ms = Vec::with_capacity(n);
    let mut failed = 0;
    for i in 0..n {
        let p = first + i % UNCHANGED_PAGES;
        let rec = view(b, t0, Kind::ViewUnchanged, p);
        if let Some(f) = &rec.failure {
            eprintln!("failsafe-bench: dokuwiki: failed: {f}");
            failed += 1;
        }
        ms.push(rec.ms);
    }
    let after = stats.and_then(fresh_stats);
    Profile {
        n,
        median_ms: percentile(&ms, 0.5),
        p90_ms: percentile(&ms, 0.9),
        failed,
        counters: crate::round_trips_between(before.as_ref(), after.as_ref(), n as f64),
    }
}

/// The cities row: page views of unchanged pages from a mount in a city
/// without the leader (filled in by `cities.rs`).
pub(crate) struct CityViews {
    pub(crate) mount_zone: String,
    pub(crate) leader_zone: String,
    /// Where the leader was after the views (None: no status).
    pub(crate) leader_zone_after: Option<String>,
    pub(crate) views: Profile,
    /// TCP segments mount B sent during the views, by the zone of the host.
    pub(crate) segs_by_zone: Option<BTreeMap<String, u64>>,
}

impl CityViews {
    /// Round trips to another city per view: certainly none when the mount
    /// made no round trip at all; otherwise the segments tell where they went.
    pub(crate) fn verdict(&self) -> (&'static str, String) {
        let rt = self
            .views
            .counters
            .as_ref()
            .and_then(|c| c.round_trips_per_op);
        let cross: Option<u64> = self.segs_by_zone.as_ref().map(|by| {
            by.iter()
                .filter(|(z, _)| **z != self.mount_zone)
                .map(|(_, n)| n)
                .sum()
        });
        let background = self
            .views
            .counters
            .as_ref()
            .and_then(|c| c.delta.get("background_rpcs"))
            .copied()
            .unwrap_or(0.0);
        let text = format!(
            "median {} ms; {} round trips per view (mount's count); {} TCP segments to another \
             city's hosts while they ran, with {} RPCs no operation waited for (the mount's \
             `background_rpcs`: session and lease upkeep)",
            fmt_value(self.views.median_ms),
            rt.map_or("not counted".into(), fmt_value),
            cross.map_or("not counted".into(), |c| c.to_string()),
            fmt_value(background),
        );
        let moved = self.leader_zone_after.as_deref() == Some(self.mount_zone.as_str());
        let verdict = match (rt, cross) {
            _ if moved => "not shown (the leader moved to the mount's city)",
            (Some(r), _) if r == 0.0 && self.views.failed == 0 => "met",
            (Some(_), Some(c)) if c > 0 => "not met",
            (None, _) => "not measured",
            _ => "not shown (round trips to the member in its own city)",
        };
        (verdict, text)
    }

    pub(crate) fn to_json(&self) -> Value {
        let (verdict, text) = self.verdict();
        json!({
            "mount_zone": self.mount_zone,
            "leader_zone": self.leader_zone,
            "leader_zone_after_the_views": self.leader_zone_after,
            "views": self.views.to_json(),
            "tcp_segments_sent_by_host_zone": self.segs_by_zone,
            "verdict": verdict,
            "measured": text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_texts_are_a_few_kib_and_new_each_revision() {
        let a = page_text(3, 24, 1, "Saved as revision 1 by editor 0.");
        let b = page_text(3, 24, 2, "Saved as revision 2 by editor 0.");
        assert!((3500..5000).contains(&a.len()), "{} bytes", a.len());
        assert_ne!(a, b);
        assert!(a.starts_with("====== Page 03 ======\n\nSaved as revision 1 by editor 0.\n"));
        assert!(a.contains("[[bench:p"));
    }

    #[test]
    fn fuse_operations_per_request_come_from_the_counters() {
        let delta: BTreeMap<String, f64> = [
            ("ops.lookup.count", 20.0),
            ("ops.lookup.round_trips", 4.0),
            ("ops.lookup.rpcs", 4.0),
            ("ops.lookup.time_us", 2000.0),
            ("ops.mkdir.count", 2.0),
            ("ops.mkdir.round_trips", 2.0),
            ("ops.mkdir.rpcs", 2.0),
            ("background_rpcs", 3.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let p = Profile {
            n: 2,
            median_ms: 1.0,
            p90_ms: 1.0,
            failed: 0,
            counters: Some(per_unit(delta, 2)),
        };
        let c = p.counters.as_ref().unwrap();
        assert_eq!(c.round_trips_per_op, Some(3.0));
        assert_eq!(c.rpcs_per_op, Some(3.0));
        let ops = p.ops();
        assert_eq!(ops[0], ("lookup".to_string(), 10.0, 2.0, 1.0));
        assert_eq!(ops[1], ("mkdir".to_string(), 1.0, 1.0, 0.0));
    }
}
