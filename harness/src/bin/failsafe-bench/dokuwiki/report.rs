//! The DokuWiki section of the report: BENCHMARKS.md's section, the goals
//! of issue 12 it measures and the JSON.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{CityViews, DokuConfig, DokuResults, DokuRun, Kind, Profile};
use super::{PAGES_PER_EDITOR, UNCHANGED_PAGES};
use crate::report::fmt_value;

fn run_json(r: &Result<DokuRun, String>) -> Value {
    match r {
        Ok(r) => r.to_json(),
        Err(e) => json!({"error": e}),
    }
}

fn cell(r: &Result<DokuRun, String>, f: impl Fn(&DokuRun) -> String) -> String {
    match r {
        Ok(r) => f(r),
        Err(_) => "failed".into(),
    }
}

/// One column per kind of request (each a profile of requests made one at
/// a time): their median time alone on local (when given) and failsafe,
/// the mount's round trips and time, and its FUSE operations by kind (count
/// / round trips), per request.
fn profile_matrix(o: &mut String, cols: &[(&str, Option<&Profile>, &Profile)], local: bool) {
    let mut ops: BTreeMap<String, f64> = BTreeMap::new();
    for (_, _, p) in cols {
        for (op, c, _, _) in p.ops() {
            *ops.entry(op).or_default() += c;
        }
    }
    let mut ops: Vec<(String, f64)> = ops.into_iter().collect();
    ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    o.push_str("| per request |");
    for (name, _, _) in cols {
        o.push_str(&format!(" {name} |"));
    }
    o.push_str("\n|---|");
    o.push_str(&"---:|".repeat(cols.len()));
    o.push('\n');
    let mut row = |label: &str, f: &dyn Fn(Option<&Profile>, &Profile) -> String| {
        o.push_str(&format!("| {label} |"));
        for (_, l, p) in cols {
            o.push_str(&format!(" {} |", f(*l, p)));
        }
        o.push('\n');
    };
    if local {
        row("local, alone: median ms", &|l, _| {
            l.map_or("-".into(), |l| fmt_value(l.median_ms))
        });
    }
    row("failsafe, alone: median ms", &|_, p| fmt_value(p.median_ms));
    row("requests measured (one at a time)", &|_, p| p.n.to_string());
    row("round trips to the cluster (mount's count)", &|_, p| {
        p.counters
            .as_ref()
            .and_then(|c| c.round_trips_per_op)
            .map_or("not counted".into(), fmt_value)
    });
    row("ms in the mount, all FUSE operations", &|_, p| {
        let ops = p.ops();
        if ops.is_empty() {
            return "-".into();
        }
        fmt_value(ops.iter().map(|(_, _, _, t)| t).sum())
    });
    row("FUSE operations, all", &|_, p| {
        let ops = p.ops();
        if ops.is_empty() {
            return "-".into();
        }
        fmt_value(ops.iter().map(|(_, c, _, _)| c).sum())
    });
    for (op, _) in &ops {
        row(&format!("{op}: count / round trips"), &|_, p| {
            p.ops()
                .iter()
                .find(|(x, ..)| x == op)
                .map_or("0".into(), |(_, c, r, _)| {
                    format!("{} / {}", fmt_value(*c), fmt_value(*r))
                })
        });
    }
}

/// The DokuWiki section as the report shows it.
pub(crate) struct Section<'a> {
    /// None when not asked for (`--no-dokuwiki`).
    pub(crate) runs: Option<&'a Result<DokuResults, String>>,
    /// None without `--cities`.
    pub(crate) city: Option<&'a Result<CityViews, String>>,
    pub(crate) rtt_ms: u32,
    pub(crate) cfg: &'a DokuConfig,
}

impl Section<'_> {
    /// The goal rows: (workload, target, measured, verdict).
    pub(crate) fn goals(&self) -> Vec<(String, String, String, &'static str)> {
        let (r, city, rtt_ms, cfg) = (self.runs, self.city, self.rtt_ms, self.cfg);
        let mut out = Vec::new();
        let (got, verdict) = match r {
            None => ("not run".to_string(), "not measured"),
            Some(Err(e)) => (format!("skipped: {e}"), "not measured"),
            Some(Ok(d)) => match (&d.local, &d.failsafe, d.ratio()) {
                (Ok(l), Ok(f), Some(ratio)) => (
                    format!(
                        "{} ({} against {} requests/s); failed: {} (local {})",
                        fmt_value(ratio),
                        fmt_value(f.rate()),
                        fmt_value(l.rate()),
                        f.failed + f.failed_outside,
                        l.failed + l.failed_outside
                    ),
                    if ratio >= 0.75 && f.failed + f.failed_outside == 0 {
                        "met"
                    } else {
                        "not met"
                    },
                ),
                (Err(e), _, _) | (_, Err(e), _) => (format!("failed: {e}"), "not measured"),
                _ => ("no requests on local".into(), "not measured"),
            },
        };
        out.push((
            format!(
                "DokuWiki, {} editors and {} readers on one web host (issue 12)",
                cfg.editors, cfg.readers
            ),
            "≥ 0.75× local's requests/s, 0 failed requests".into(),
            got,
            verdict,
        ));
        let (got, verdict) = match city {
            None => ("not run (needs --cities)".to_string(), "not measured"),
            Some(Err(e)) => (format!("failed: {e}"), "not measured"),
            Some(Ok(c)) => {
                let (v, t) = c.verdict();
                (t, v)
            }
        };
        out.push((
            format!(
            "DokuWiki page view of an unchanged page, hosts {rtt_ms} ms apart, city without the \
             leader (issue 12)"
        ),
            "0 round trips to another city".into(),
            got,
            verdict,
        ));
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        let (r, city, cfg) = (self.runs, self.city, self.cfg);
        let main = match r {
            None => json!({"status": "not run"}),
            Some(Err(e)) => json!({"status": "skipped", "why": e}),
            Some(Ok(d)) => json!({
                "status": "measured",
                "local": run_json(&d.local),
                "failsafe": run_json(&d.failsafe),
                "failsafe_over_local_requests_per_second": d.ratio(),
            }),
        };
        json!({
            "config": cfg.to_json(),
            "runs": main,
            "city_without_the_leader": match city {
                None => json!({"status": "not run"}),
                Some(Err(e)) => json!({"status": "failed", "error": e}),
                Some(Ok(c)) => c.to_json(),
            },
            "goals": self.goals().iter().map(|(w, g, m, v)| json!({
                "workload": w, "target": g, "measured": m, "verdict": v
            })).collect::<Vec<_>>(),
        })
    }

    /// The section of BENCHMARKS.md.
    pub(crate) fn markdown(&self) -> String {
        let (r, city, rtt_ms, cfg) = (self.runs, self.city, self.rtt_ms, self.cfg);
        let mut o =
            String::from("## DokuWiki: Debian's package on a local directory and on failsafe\n\n");
        let d = match r {
            None => {
                o.push_str("Not run (`--no-dokuwiki`).\n\n");
                return o;
            }
            Some(Err(e)) => {
                o.push_str(&format!("**Skipped**: {e}\n\n"));
                return o;
            }
            Some(Ok(d)) => d,
        };
        o.push_str(&format!(
        "Debian's unmodified DokuWiki (lighttpd, php-cgi with {} workers, opcache as packaged) \
         with all its state (data/ and acl/) on a local directory, then on a failsafe mount of \
         a fresh cluster, one after the other in this run with the same configuration. {} \
         editors and {} readers at once against one web host: {} s of warm-up, then {} s \
         measured.\n\n",
        cfg.php_children, cfg.editors, cfg.readers, cfg.warmup, cfg.seconds
    ));
        o.push_str("| | local | failsafe | failsafe / local |\n|---|---:|---:|---:|\n");
        let rate_row = |o: &mut String, label: &str, f: &dyn Fn(&DokuRun) -> f64| {
            let ratio = match (&d.local, &d.failsafe) {
                (Ok(l), Ok(x)) if f(l) > 0.0 => fmt_value(f(x) / f(l)),
                _ => "-".into(),
            };
            o.push_str(&format!(
                "| {label} | {} | {} | {ratio} |\n",
                cell(&d.local, |r| fmt_value(f(r))),
                cell(&d.failsafe, |r| fmt_value(f(r))),
            ));
        };
        rate_row(&mut o, "requests/s, all", &|r| r.rate());
        rate_row(&mut o, "page views/s (readers)", &|r| r.views_rate());
        rate_row(&mut o, "saves/s (editors)", &|r| r.kind_rate(Kind::Save));
        o.push_str(&format!(
            "| failed requests: measured seconds; warm-up and the last in flight | {} | {} | |\n",
            cell(&d.local, |r| format!("{}; {}", r.failed, r.failed_outside)),
            cell(&d.failsafe, |r| format!(
                "{}; {}",
                r.failed, r.failed_outside
            )),
        ));
        for k in Kind::ALL {
            let lat = |r: &DokuRun| {
                r.kind(k).map_or("-".into(), |s| {
                    format!("{} / {}", fmt_value(s.p50_ms), fmt_value(s.p99_ms))
                })
            };
            o.push_str(&format!(
                "| {} p50 / p99 ms | {} | {} | |\n",
                k.name(),
                cell(&d.local, lat),
                cell(&d.failsafe, lat),
            ));
        }
        o.push_str(&format!(
            "| one page view of an unchanged page, alone: median ms | {} | {} | |\n",
            cell(&d.local, |r| fmt_value(r.views.median_ms)),
            cell(&d.failsafe, |r| fmt_value(r.views.median_ms)),
        ));
        let groups: std::collections::BTreeSet<&String> = [&d.local, &d.failsafe]
            .into_iter()
            .flat_map(|r| r.iter().flat_map(|r| r.cpu.by_group.keys()))
            .collect();
        for g in groups {
            let f = |r: &DokuRun| r.cpu.by_group.get(g).map_or("-".into(), |c| fmt_value(*c));
            o.push_str(&format!(
                "| cores busy: {g} | {} | {} | |\n",
                cell(&d.local, f),
                cell(&d.failsafe, f)
            ));
        }
        o.push_str(&format!(
            "| cores busy: the whole machine (anything else running included) | {} | {} | |\n",
            cell(&d.local, |r| r.cpu.machine.map_or("-".into(), fmt_value)),
            cell(&d.failsafe, |r| r.cpu.machine.map_or("-".into(), fmt_value)),
        ));
        o.push_str(&format!(
            "| CPU ms per request, server side (all the above but the browsers) | {} | {} | |\n",
            cell(&d.local, |r| r
                .cpu_ms_per_request()
                .map_or("-".into(), fmt_value)),
            cell(&d.failsafe, |r| r
                .cpu_ms_per_request()
                .map_or("-".into(), fmt_value)),
        ));
        o.push_str(&format!(
            "| round trips per request, mixed load (mount's count) | - | {} | |\n",
            cell(&d.failsafe, |r| r
                .round_trips
                .as_ref()
                .and_then(|c| c.round_trips_per_op)
                .map_or("not counted".into(), fmt_value)),
        ));
        o.push_str(&format!(
        "\nHow: {pages} pages (`bench:p00` …) saved once through the edit form and viewed once \
         before the clock. Each editor owns {PAGES_PER_EDITOR} pages and edits them in turn the \
         way a browser does: GET the edit form (`do=edit`), POST it back with its `sectok` and \
         a new text of about 4 KiB (headings, links, lists, a table, a code block), follow the \
         redirect to the page, load the taskrunner image the page embeds (DokuWiki's indexer); \
         never the same page twice within 1.1 s (DokuWiki keys revisions by the second). \
         Readers view all {pages} pages in turn ({UNCHANGED_PAGES} of them never edited). Each \
         request is a new connection. Requests/s counts requests that ended within the \
         measured seconds. A request failed on a transport error or a 60 s timeout, an HTTP \
         status other than 2xx or 3xx, a DokuWiki error box (`<div class=\"error\">`) in the \
         page, or a page that does not show its heading (after a save: the text just saved). \
         \"Alone\": with nothing else running, {} views of the unchanged pages, then {} \
         edit cycles with the mount's counters read after each request. Cores busy: CPU time \
         over the measured seconds from /proc, by process, and the whole machine's from \
         /proc/stat.\n\n\
         Failed requests on a local directory are DokuWiki's own: it rewrites its page, \
         metadata and cache files in place (`io_saveFile` opens them with `w`), so a reader \
         can read one empty or half-written, render an empty page and cache that rendering \
         until the page changes again (lighttpd's log then shows PHP's warning from \
         `parserutils.php` line 303: a metadata file that did not unserialize). An editor \
         that waited for a page of its own to be 1.1 s old was held by the workload, not by \
         the storage: many waits mean the saves/s is the workload's bound.\n",
        cfg.profile_views,
        cfg.profile_saves,
        pages = cfg.pages(),
    ));
        for (name, r) in [("local", &d.local), ("failsafe", &d.failsafe)] {
            match r {
                Err(e) => o.push_str(&format!("\n{name}: **failed**: {e}\n")),
                Ok(r) => {
                    o.push_str(&format!(
                        "\n{name}: {}. Editors waited for a page 1.1 s old {} times.",
                        r.setup, r.editor_waits
                    ));
                    if !r.failure_samples.is_empty() {
                        o.push_str(&format!(
                            " First failures: {}.",
                            r.failure_samples
                                .iter()
                                .take(3)
                                .map(|f| format!("`{f}`"))
                                .collect::<Vec<_>>()
                                .join("; ")
                        ));
                    }
                    if !r.server_errors.is_empty() {
                        o.push_str(&format!(
                            " lighttpd's and DokuWiki's error logs: {} lines, the first: `{}`.",
                            r.server_errors.len(),
                            r.server_errors[0]
                        ));
                    }
                    o.push('\n');
                }
            }
        }
        if let Ok(f) = &d.failsafe {
            o.push_str(
            "\n### Where a request's time goes on failsafe\n\nEach kind of request made one at \
             a time with nothing else running, and what the mount did for it (its `stats=PATH` \
             counters, read after each request): the round trips to the cluster it waited for, \
             the time it spent answering FUSE operations, and those operations by kind. The \
             kernel sends a FUSE operation for what its caches do not answer; `ms in the mount` \
             adds up each operation's time from the request reaching the mount to the reply, \
             so work after the HTTP reply (the taskrunner's indexing) counts too.\n\n",
        );
            let local = d.local.as_ref().ok();
            let mut cols: Vec<(&str, Option<&Profile>, &Profile)> =
                vec![("page view, unchanged", local.map(|l| &l.views), &f.views)];
            for (k, p) in &f.edits {
                let l = local.and_then(|l| l.edits.iter().find(|(x, _)| x == k).map(|(_, p)| p));
                cols.push((k.name(), l, p));
            }
            profile_matrix(&mut o, &cols, true);
        }
        o.push_str(&format!(
            "\n### A page view from a city without the leader (hosts {rtt_ms} ms apart)\n\n"
        ));
        match city {
            None => o.push_str("Not run (needs `--cities`).\n"),
            Some(Err(e)) => o.push_str(&format!("**Failed**: {e}\n")),
            Some(Ok(c)) => {
                let (verdict, text) = c.verdict();
                o.push_str(&format!(
                    "DokuWiki's state written through a mount in the leader's city (zone {}): \
                 installed, {} pages seeded through a web host there and viewed once; then a \
                 web host on the same port (DokuWiki's render cache is keyed by host and port) \
                 serving the same state through a mount in zone {}, which views each once and \
                 then {} times in turn (the leader in zone {} after them). {text}. Verdict: \
                 {verdict}.\n",
                    c.leader_zone,
                    UNCHANGED_PAGES,
                    c.mount_zone,
                    c.views.n,
                    c.leader_zone_after
                        .as_deref()
                        .unwrap_or("unknown (no status)"),
                ));
                o.push('\n');
                profile_matrix(&mut o, &[("page view, unchanged", None, &c.views)], false);
            }
        }
        o.push('\n');
        o
    }
}
