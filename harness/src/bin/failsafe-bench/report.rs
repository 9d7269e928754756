//! The results as a table on stdout, a JSON document and `BENCHMARKS.md`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::api::ApiRow;
use crate::cities::{Cities, CityRow};
use crate::dokuwiki::{self, CityViews, DokuConfig, DokuResults};
use crate::{Cell, Config, RoundTripCount, Unit, Workload};

pub(crate) struct Report<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) workloads: &'a [Workload],
    pub(crate) cells: &'a BTreeMap<(&'static str, &'static str), Cell>,
    /// Each target asked for: how it was set up, or why it was skipped.
    pub(crate) targets: &'a [(&'static str, Result<String, String>)],
    pub(crate) machine: &'a Value,
    pub(crate) api_rows: &'a [ApiRow],
    pub(crate) round_trips_enabled: bool,
    /// The cities part: None when not asked for (`--cities`).
    pub(crate) cities: Option<&'a Result<Cities, String>>,
    pub(crate) rtt_ms: u32,
    pub(crate) invocation: &'a str,
    pub(crate) note: Option<&'a str>,
    /// The DokuWiki section: None when not asked for (`--no-dokuwiki`).
    pub(crate) dokuwiki: Option<&'a Result<DokuResults, String>>,
    /// Its cities row: None without `--cities`.
    pub(crate) doku_city: Option<&'a Result<CityViews, String>>,
    pub(crate) doku_cfg: &'a DokuConfig,
    /// `--only dokuwiki`: the report is that section alone.
    pub(crate) only_dokuwiki: bool,
}

const TARGETS: [&str; 3] = ["local", "bindfs", "failsafe"];

/// The rows of the cities section when it was not run.
const CITY_ROWS: [&str; 5] = [
    "page save, mount in the leader's city",
    "page save, mount in a city without the leader",
    "page read (stat, open+read of an unchanged page), mount in the leader's city",
    "page read (stat, open+read of an unchanged page), mount in a city without the leader",
    "open+read of a page the other mount just changed, mount in a city without the leader",
];

/// Targets from issues 11 and 12: (workload, issue, bound on failsafe /
/// bindfs; a rate at least this, or a time at most this).
const GOALS: [(&str, u32, f64); 9] = [
    ("page_save_1", 11, 0.4),
    ("page_save_n", 11, 0.6),
    ("create", 11, 3.0),
    ("delete", 11, 2.0),
    ("stream_write", 11, 1.0),
    ("page_read_warm", 12, 2.0),
    ("page_read_cold", 12, 0.7),
    ("ls_warm", 12, 1.0),
    ("ls_cold", 12, 3.0),
];

pub(crate) fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        crate::thousands(v.round() as u64)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        // Three significant digits: 0.0123, 0.000456.
        let decimals = (2.0 - a.log10().floor()).clamp(3.0, 9.0) as usize;
        format!("{v:.decimals$}")
    }
}

impl Report<'_> {
    fn value(&self, w: &str, t: &str) -> Option<f64> {
        self.cells.get(&(w, t))?.as_ref().ok().map(|m| m.value)
    }

    /// failsafe / `base`: the rate ratio for rates, the time ratio for times.
    fn ratio(&self, w: &Workload, base: &str) -> Option<f64> {
        let f = self.value(w.id, "failsafe")?;
        let b = self.value(w.id, base)?;
        (b > 0.0).then(|| f / b)
    }

    fn fmt_ratio(&self, w: &Workload, base: &str) -> String {
        match self.ratio(w, base) {
            None => "-".into(),
            Some(r) if w.unit == Unit::Seconds => format!("{}× the time", fmt_value(r)),
            Some(r) => fmt_value(r),
        }
    }

    fn cell_text(&self, w: &Workload, t: &str) -> String {
        match self.cells.get(&(w.id, t)) {
            Some(Ok(m)) => fmt_value(m.value),
            Some(Err(_)) => "failed".into(),
            None => match self.targets.iter().find(|(n, _)| *n == t) {
                Some((_, Err(_))) => "skipped".into(),
                _ => "-".into(),
            },
        }
    }

    fn round_trips_text(&self, w: &Workload) -> String {
        if !self.round_trips_enabled {
            return "n/a".into();
        }
        match self.cells.get(&(w.id, "failsafe")) {
            Some(Ok(m)) => match m.round_trips.as_ref() {
                Some(
                    r @ RoundTripCount {
                        round_trips_per_op: Some(rt),
                        ..
                    },
                ) => {
                    // RPCs no operation waited for on its own (uploads a
                    // large write leaves running) are not in the count.
                    let bg = r.delta.get("background_rpcs").copied().unwrap_or(0.0);
                    if bg > 0.0 {
                        format!(
                            "{} per {} (+{} background RPCs in all, not charged)",
                            fmt_value(*rt),
                            w.per,
                            fmt_value(bg)
                        )
                    } else {
                        format!("{} per {}", fmt_value(*rt), w.per)
                    }
                }
                _ => "n/a (no stats file)".into(),
            },
            _ => "-".into(),
        }
    }

    fn rows(&self) -> Vec<Vec<String>> {
        let mut rows = vec![vec![
            "workload".to_string(),
            "local".into(),
            "bindfs".into(),
            "failsafe".into(),
            "failsafe / bindfs".into(),
            "failsafe / local".into(),
            "round trips (failsafe)".into(),
        ]];
        for w in self.workloads {
            let mut r = vec![format!("{} ({})", w.title, w.unit.label())];
            r.extend(TARGETS.iter().map(|t| self.cell_text(w, t)));
            r.push(self.fmt_ratio(w, "bindfs"));
            r.push(self.fmt_ratio(w, "local"));
            r.push(self.round_trips_text(w));
            rows.push(r);
        }
        rows
    }

    pub(crate) fn table_text(&self) -> String {
        if self.only_dokuwiki {
            return format!("{}{}", self.dokuwiki_markdown(), self.goals_markdown());
        }
        let rows = self.rows();
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (k, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i] - c.chars().count();
                    if i == 0 {
                        format!("{c}{}", " ".repeat(pad))
                    } else {
                        format!("{}{c}", " ".repeat(pad))
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if k == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        if self.dokuwiki.is_some() {
            out.push('\n');
            out.push_str(&self.dokuwiki_markdown());
        }
        out
    }

    fn markdown_table(&self) -> String {
        let rows = self.rows();
        let mut out = String::new();
        for (k, r) in rows.iter().enumerate() {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
            if k == 0 {
                out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
            }
        }
        out
    }

    fn goals(&self) -> Vec<(String, String, String, &'static str)> {
        GOALS
            .iter()
            .filter_map(|&(id, issue, bound)| {
                let w = self.workloads.iter().find(|w| w.id == id)?;
                let (goal, met) = match (w.unit, self.ratio(w, "bindfs")) {
                    (Unit::Seconds, r) => {
                        (format!("≤ {bound}× bindfs's time"), r.map(|r| r <= bound))
                    }
                    (_, r) => (format!("≥ {bound}× bindfs"), r.map(|r| r >= bound)),
                };
                let verdict = match met {
                    Some(true) => "met",
                    Some(false) => "not met",
                    None => "not measured",
                };
                Some((
                    format!("{} (issue {issue})", w.title),
                    goal,
                    self.fmt_ratio(w, "bindfs"),
                    verdict,
                ))
            })
            .collect()
    }

    fn m(&self, key: &str) -> String {
        match &self.machine[key] {
            Value::String(s) => s.clone(),
            Value::Null => "unknown".into(),
            v => v.to_string(),
        }
    }

    fn doku(&self) -> dokuwiki::Section<'_> {
        dokuwiki::Section {
            runs: self.dokuwiki,
            city: self.doku_city,
            rtt_ms: self.rtt_ms,
            cfg: self.doku_cfg,
        }
    }

    fn dokuwiki_markdown(&self) -> String {
        self.doku().markdown()
    }

    fn doku_goals(&self) -> Vec<(String, String, String, &'static str)> {
        self.doku().goals()
    }

    fn goals_markdown(&self) -> String {
        let mut o = String::from("| workload | target | measured | |\n|---|---|---|---|\n");
        for (w, goal, got, verdict) in self.doku_goals() {
            o.push_str(&format!("| {w} | {goal} | {got} | {verdict} |\n"));
        }
        o
    }

    /// `--only dokuwiki`: that section, the goals it measures, the machine.
    fn dokuwiki_only_markdown(&self) -> String {
        let mut o = String::from("# Benchmarks: the DokuWiki section alone\n\n");
        o.push_str(&format!(
            "Written by `failsafe-bench --only dokuwiki` on {} at commit `{}`{}; build: {}. \
             Load average at the start: {}; at the end: {}; on {} cores.{}\n\n",
            self.m("date"),
            self.m("git_commit"),
            if self.machine["git_dirty"] == json!(true) {
                " (with uncommitted changes)"
            } else {
                ""
            },
            self.m("build"),
            self.m("load_average_start"),
            self.m("load_average_end"),
            self.m("cores"),
            if self.cfg.quick {
                " **Quick mode: short runs, for tests; not a measurement.**"
            } else {
                ""
            },
        ));
        if let Some(n) = self.note {
            o.push_str(&format!("{n}\n\n"));
        }
        o.push_str(&self.dokuwiki_markdown());
        o.push_str("## Against the targets of issue 12\n\n");
        o.push_str(&self.goals_markdown());
        o.push_str(&format!("\nThis run: `{}`\n", self.invocation));
        o
    }

    pub(crate) fn markdown(&self) -> String {
        if self.only_dokuwiki {
            return self.dokuwiki_only_markdown();
        }
        let c = self.cfg;
        let mut o = String::new();
        o.push_str("# Benchmarks\n\n");
        o.push_str(
            "Written by `failsafe-bench` (harness/src/bin/failsafe-bench/); run it again to \
             update this file, do not edit it by hand. Every number is also in the JSON file \
             the same run wrote.\n\n",
        );
        o.push_str(&format!(
            "One sitting on {} at commit `{}`{}: the same workloads on a local directory, a \
             bindfs passthrough of a local directory and a failsafe mount of a fresh cluster of \
             three hosts (zones a, b, c) on loopback, all on the same disk ({} on {}). Build: \
             {}.{}\n\n",
            self.m("date"),
            self.m("git_commit"),
            if self.machine["git_dirty"] == json!(true) {
                " (with uncommitted changes)"
            } else {
                ""
            },
            self.machine["filesystem"]["type"].as_str().unwrap_or("?"),
            self.machine["filesystem"]["device"].as_str().unwrap_or("?"),
            self.m("build"),
            if c.quick {
                " **Quick mode: small sizes, for tests; not a measurement.**"
            } else {
                ""
            },
        ));
        if let Some(n) = self.note {
            o.push_str(&format!("{n}\n\n"));
        }
        o.push_str(&format!(
            "Load average (1, 5, 15 min, runnable/total, last pid) at the start: {}; at the end: \
             {}; on {} cores. Anything else running on the machine competes with the run.\n\n",
            self.m("load_average_start"),
            self.m("load_average_end"),
            self.m("cores"),
        ));

        o.push_str("## Local disk, bindfs and failsafe, side by side\n\n");
        o.push_str(&self.markdown_table());
        o.push_str(
            "\nRatios: for rates (ops/s, MB/s), failsafe's rate divided by the other's (1 is \
             parity, higher is better); for times (s), how many times as long failsafe took (1 \
             is parity, lower is better). MB is 10^6 bytes.\n\n",
        );
        o.push_str("How each row is measured (wall clock):\n\n");
        o.push_str(&format!(
            "- page save, the wiki way: mkdir a lock directory, create a temp file, write {} \
             KiB, fsync, rename it over the page, append a line to a change log shared by all \
             writers (O_APPEND) and fsync it, rmdir the lock. Each writer (a thread) saves its \
             own 8 pages in turn; each saves each page once before the clock starts; then {} s.\n",
            c.page_bytes / 1024,
            c.seconds
        ));
        o.push_str(&format!(
            "- page read: open, fstat, read the {} KiB, close, over {} pages. Warm: after reading \
             each once, {} s of reads. Cold: each page once after the caches were made cold \
             (see below).\n",
            c.page_bytes / 1024,
            c.pages,
            c.seconds
        ));
        o.push_str(&format!(
            "- create: {} files of {} KiB in one directory (open O_CREAT|O_EXCL, write, close; \
             no fsync). `ls -l`: readdir and lstat of each, cold (caches made cold, one \
             listing) then warm (right after: one listing, then the median of {} more). \
             delete: unlink each, then rmdir.\n",
            crate::thousands(c.files as u64),
            c.file_bytes / 1024,
            crate::workloads::WARM_LISTINGS
        ));
        o.push_str(&format!(
            "- stream: write {} MiB in 1 MiB writes then fsync (the time includes the fsync; \
             every 4 KiB differs, so no deduplication helps); read it back in 1 MiB reads with \
             cold caches.\n",
            c.stream_bytes >> 20
        ));
        o.push_str(
            "- cold: local and bindfs: `sync; echo 3 > /proc/sys/vm/drop_caches`. failsafe: a \
             new mount process with an empty block cache, and the kernel caches dropped too (so \
             the hosts read from disk).\n\n",
        );
        let notes: Vec<String> = self
            .cells
            .iter()
            .filter_map(|((w, t), cell)| match cell {
                Err(e) => Some(format!("- {t}, {w}: {e}")),
                Ok(m) if m.note.contains("NOT cold") => Some(format!("- {t}, {w}: {}", m.note)),
                _ => None,
            })
            .collect();
        if !notes.is_empty() {
            o.push_str("Notes and failures:\n\n");
            o.push_str(&notes.join("\n"));
            o.push_str("\n\n");
        }
        o.push_str("Targets:\n\n");
        for (name, info) in self.targets {
            match info {
                Ok(setup) => o.push_str(&format!("- {name}: {setup}\n")),
                Err(why) => o.push_str(&format!("- {name}: **skipped**: {why}\n")),
            }
        }
        o.push('\n');

        o.push_str("## Against the targets of issues 11 and 12\n\n");
        o.push_str("| workload | target | failsafe / bindfs | |\n|---|---|---:|---|\n");
        for (w, goal, got, verdict) in self.goals() {
            o.push_str(&format!("| {w} | {goal} | {got} | {verdict} |\n"));
        }
        for (w, goal, got, verdict) in self.city_goals() {
            o.push_str(&format!("| {w} | {goal} | {got} | {verdict} |\n"));
        }
        for (w, goal, got, verdict) in self.doku_goals() {
            o.push_str(&format!("| {w} | {goal} | {got} | {verdict} |\n"));
        }
        o.push('\n');

        o.push_str("## Round trips per operation\n\n");
        if self.round_trips_enabled {
            o.push_str(
                "Read from the mount's `stats=PATH` file (column \"round trips\" above): the \
                 change of the counters named `round_trips` over each timed part, divided by the \
                 operations done (per save, read, file, or MiB streamed). \"n/a (no stats \
                 file)\" where the mount wrote none. The mount charges an operation only the \
                 RPCs it waits for on its own; RPCs sent outside any operation (block uploads a \
                 large write leaves running, heartbeats) are its `background_rpcs`, shown beside \
                 the count when the row had any. Every counter's change is in the JSON.\n\n",
            );
        } else {
            o.push_str(
                "**n/a: not measured in this run.** This `mount-failsafe` has no `stats=PATH` \
                 option yet (issue 11, \"Count the round trips\"). The bench looks for it in \
                 `mount-failsafe --help`; once it is there, the bench mounts with \
                 `stats=PATH` and fills the column with no change here. The contract: PATH \
                 holds one JSON object, rewritten as the mount runs, whose counters only grow \
                 while the mount lives; sequential round trips to the cluster are under keys \
                 named `round_trips` and RPCs under keys named `rpcs`, at any depth (for \
                 example one object per FUSE operation). The bench reads it before and after \
                 each timed part and divides the difference by the operations done. \
                 `--round-trips on` forces the option.\n\n",
            );
        }

        o.push_str(&self.cities_markdown());
        o.push_str(&self.dokuwiki_markdown());

        if !self.api_rows.is_empty() {
            o.push_str("## The failsafe cluster without FUSE (client library)\n\n");
            o.push_str(
                "The same cluster through `failsafe-client`, no mount: what one metadata \
                 commit, one linearizable read and one 4 MiB block cost, to tell the mount's \
                 share of a row above from the cluster's.\n\n",
            );
            o.push_str("| operation | tasks | rate | ms per operation (one task) |\n|---|---:|---:|---:|\n");
            for r in self.api_rows {
                o.push_str(&format!(
                    "| {} | {} | {} {} | {} |\n",
                    r.what,
                    r.tasks,
                    fmt_value(r.value),
                    r.unit,
                    fmt_value(r.ms_per_op)
                ));
            }
            o.push('\n');
        }

        o.push_str("## Machine\n\n");
        o.push_str(&format!(
            "- CPU: {}, {} cores; memory {} GiB\n- kernel {}\n- data directory {} on {} ({}, \
             mounted at {})\n- bindfs: {}\n- date {}; commit {}; {} build\n\n",
            self.m("cpu_model"),
            self.m("cores"),
            self.m("memory_gib"),
            self.m("kernel"),
            self.m("data_dir"),
            self.machine["filesystem"]["type"].as_str().unwrap_or("?"),
            self.machine["filesystem"]["device"].as_str().unwrap_or("?"),
            self.machine["filesystem"]["mount_point"]
                .as_str()
                .unwrap_or("?"),
            self.m("bindfs_version"),
            self.m("date"),
            self.m("git_commit"),
            self.m("build"),
        ));

        o.push_str("## How to reproduce\n\n");
        o.push_str(
            "As root (FUSE mounts, dropping caches), from the repository root:\n\n```\n\
             cargo build --release --workspace --bins\n\
             target/release/failsafe-bench\n```\n\n\
             It installs bindfs with apt-get if it is missing (or skips that column, saying \
             why), writes `BENCHMARKS.md` and `bench/results.json`, and prints the table. \
             `--quick` runs small sizes in seconds; `--help` lists the sizes. (On Debian 12 the \
             bindfs package depends on `fuse`, which `fuse3` breaks, so installing it swaps \
             `fuse3` for `fuse`; mounts as root need neither.) The DokuWiki section needs \
             Debian's `dokuwiki`, `php-cgi` and `lighttpd` (scripts/test.sh installs them; \
             without them it says so and is skipped); `--only dokuwiki` runs it alone in a \
             minute or two (with `--cities`, its row from a city without the leader too), \
             `--no-dokuwiki` skips it.\n\n",
        );
        o.push_str(&format!("This run: `{}`\n", self.invocation));
        o
    }

    fn city_row(&self, city_leader: bool, op: &str) -> Option<&CityRow> {
        let Some(Ok(c)) = self.cities else {
            return None;
        };
        let city = if city_leader {
            "the leader's city"
        } else {
            "a city without the leader"
        };
        c.rows.iter().find(|r| r.city == city && r.op == op)
    }

    /// The cities targets of issues 11 and 12: (workload, target, measured,
    /// verdict).
    fn city_goals(&self) -> Vec<(String, String, String, &'static str)> {
        let rtt = self.rtt_ms;
        let verdict = |m: Option<bool>| match m {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        let rts = |r: &CityRow| {
            r.round_trips
                .map(|x| format!("{} round trips", fmt_value(x)))
                .unwrap_or_else(|| "round trips not measured".into())
        };
        let mut out = Vec::new();
        for (leader, bound, ms) in [(true, 3.0, Some(70.0)), (false, 6.0, None)] {
            let r = self.city_row(leader, "page save");
            let got = r.map_or("not measured".into(), |r| {
                format!(
                    "median {} ms, {}; {} round trips' time",
                    fmt_value(r.median_ms),
                    rts(r),
                    fmt_value(r.median_ms / f64::from(rtt.max(1)))
                )
            });
            let met = r.map(|r| {
                r.round_trips.is_some_and(|x| x <= bound)
                    && r.median_ms / f64::from(rtt.max(1)) <= bound
                    && ms.is_none_or(|ms| r.median_ms <= ms)
            });
            out.push((
                format!(
                    "page save, hosts {rtt} ms apart, from {} (issue 11)",
                    if leader {
                        "the leader's city"
                    } else {
                        "another city"
                    }
                ),
                match ms {
                    Some(ms) => format!("≤ {bound} sequential round trips, ≤ {ms} ms"),
                    None => format!("≤ {bound} sequential round trips"),
                },
                got,
                verdict(met),
            ));
        }
        for op in ["stat", "open+read"] {
            let r = self.city_row(false, op);
            let got = r.map_or("not measured".into(), |r| {
                format!(
                    "median {} ms; {}; at most {} sequential round trips to another city by time, \
                     ≈ {} more than from the leader's city",
                    fmt_value(r.median_ms),
                    rts(r),
                    self.cross_at_most(r),
                    self.cross_extra(r).map_or("?".into(), fmt_value),
                )
            });
            // Under 1 ms is under one round trip between cities: none crossed.
            let met = r.map(|r| r.median_ms < 1.0);
            out.push((
                format!(
                    "{op} of an unchanged page, hosts {rtt} ms apart, city without the leader (issue 12)"
                ),
                "0 round trips to another city, < 1 ms".into(),
                got,
                verdict(met),
            ));
        }
        let r = self.city_row(false, crate::cities::CHANGED);
        let got = r.map_or("not measured".into(), |r| {
            format!(
                "median {} ms; {}; at most {} sequential round trips to another city by time",
                fmt_value(r.median_ms),
                rts(r),
                self.cross_at_most(r),
            )
        });
        // At most one RTT (and a little for the read itself).
        let met = r.map(|r| self.cross_at_most(r) <= 1);
        out.push((
            format!(
                "open+read of a page another mount just changed, hosts {rtt} ms apart, city without the leader (issue 12)"
            ),
            "≤ 1 round trip to another city".into(),
            got,
            verdict(met),
        ));
        out
    }

    /// Sequential round trips to another city in one (median) operation,
    /// bounded by time: each costs at least one RTT (the relays delay every
    /// byte), so at most ⌊median / RTT⌋.
    fn cross_at_most(&self, r: &CityRow) -> u64 {
        (r.median_ms / f64::from(self.rtt_ms.max(1))).floor() as u64
    }

    /// For a mount in a city without the leader: its median minus the same
    /// operation's median from the leader's city, in RTTs — the cross-city
    /// round trips it makes beyond the other mount's.
    fn cross_extra(&self, r: &CityRow) -> Option<f64> {
        if r.city == "the leader's city" {
            return None;
        }
        let near = self.city_row(true, r.op)?;
        Some(((r.median_ms - near.median_ms) / f64::from(self.rtt_ms.max(1))).max(0.0))
    }

    fn cities_markdown(&self) -> String {
        let rtt = self.rtt_ms;
        let mut o = String::new();
        let c = match self.cities {
            None => {
                o.push_str(&format!(
                    "## Cities: hosts {rtt} ms apart — NOT MEASURED in this run\n\n\
                     Run with `--cities` (root and iproute2: network namespaces and a latency \
                     relay in front of each host). No number here is measured or estimated.\n\n"
                ));
                o.push_str(
                    "| workload | time per operation | round trips per operation |\n|---|---:|---:|\n",
                );
                for r in CITY_ROWS {
                    o.push_str(&format!("| {r} | not measured | not measured |\n"));
                }
                return o;
            }
            Some(Err(e)) => {
                o.push_str(&format!(
                    "## Cities: hosts {rtt} ms apart — FAILED\n\nThe run was asked for \
                     `--cities` and could not measure it: {e}\n\nNo number here is measured \
                     or estimated.\n"
                ));
                return o;
            }
            Some(Ok(c)) => c,
        };
        o.push_str(&format!(
            "## Cities: hosts {} ms apart (round trip)\n\n",
            c.rtt_ms
        ));
        o.push_str(&format!(
            "{}. The leader was in zone {} when the mounts started and in zone {} at the end. \
             \"20 ms apart\" means a 20 ms round trip between two cities (10 ms each way), \
             as issues 11 and 12 took their numbers; `--rtt-ms` sets it.\n\n",
            c.setup,
            c.leader_zone,
            c.leader_zone_end
                .as_deref()
                .unwrap_or("unknown (no status)"),
        ));
        o.push_str(
            "| mount in | operation | n | median ms | p90 ms | round trips per op (mount's count) | \
             RPCs per op | TCP segments the mount sent, by host zone | sequential round trips \
             to another city, by time: at most ⌊median / RTT⌋ | (median − same op's median \
             from the leader's city) / RTT |\n\
             |---|---|---:|---:|---:|---:|---:|---|---:|---:|\n",
        );
        let opt = |x: Option<f64>| x.map_or("not measured".to_string(), fmt_value);
        for r in &c.rows {
            let segs = r.segs_by_zone.as_ref().map_or("not measured".into(), |by| {
                by.iter()
                    .map(|(z, n)| {
                        let tag = if *z == r.mount_zone {
                            " (own city)"
                        } else {
                            ""
                        };
                        format!("{z}{tag}: {n}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            o.push_str(&format!(
                "| {} (zone {}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.city,
                r.mount_zone,
                r.op,
                r.n,
                fmt_value(r.median_ms),
                fmt_value(r.p90_ms),
                opt(r.round_trips),
                opt(r.rpcs),
                segs,
                self.cross_at_most(r),
                self.cross_extra(r).map_or("-".into(), fmt_value),
            ));
        }
        o.push_str(
            "\nHow: each mount runs its operations one at a time, each timed by wall clock \
             (median and p90 over n). page save: the loopback workload's save (mkdir lock, \
             create temp, write, fsync, rename over the page, append to the change log and \
             fsync, rmdir lock), two saves before the clock as warm-up. stat: `stat` of a page \
             mount A wrote before both groups and nobody changed since. open+read: open, fstat, \
             read the page, close, same page. open+read after a change elsewhere (mount B \
             only): mount A rewrites the page (untimed), then B's open+read of it is timed. \
             Round trips per op: the change of the mount's \
             `stats=PATH` counters `round_trips` (and `rpcs`) over the group, summed over every \
             FUSE operation the kernel sent, divided by n; they count the mount's own \
             sequential round trips, not the ones a host makes to others inside one (a \
             commit's trip to a quorum). TCP segments: `ss -ti` in the mount's namespace \
             before and after the group, segments sent on each connection, by the zone of the \
             host at its other end: which members the mount talks to. Round trips to another \
             city are not counted by any process; they are bounded by time: the relays delay \
             every byte, so each sequential round trip between cities costs at least one RTT \
             and an operation of median m ms made at most ⌊m / RTT⌋ of them (under one RTT: \
             none). For the mount without the leader, the last column is its extra time over \
             the same operation from the leader's city, in RTTs: an estimate of the cross-city \
             round trips it makes beyond the other mount's (local work is about the same for \
             both). The mount's own round trips can go to the member in its own city (see the \
             segments) and still each cost a trip to another city, made by that member (to the \
             leader); the time shows it, the mount's counter does not.\n\n",
        );
        o
    }

    fn cities_json(&self) -> Value {
        match self.cities {
            None => json!({
                "status": "not measured",
                "requested": false,
                "rtt_ms": self.rtt_ms,
                "rows": CITY_ROWS.iter().map(|r| json!({"workload": r, "value": null})).collect::<Vec<_>>(),
            }),
            Some(Err(e)) => json!({
                "status": "failed",
                "requested": true,
                "rtt_ms": self.rtt_ms,
                "error": e,
            }),
            Some(Ok(c)) => json!({
                "status": "measured",
                "requested": true,
                "rtt_ms": c.rtt_ms,
                "one_way_ms": f64::from(c.rtt_ms) / 2.0,
                "setup": c.setup,
                "leader_zone": c.leader_zone,
                "leader_zone_end": c.leader_zone_end,
                "rows": c.rows.iter().map(|r| {
                    let mut v = r.to_json();
                    v["median_in_rtts"] = json!(r.median_ms / f64::from(c.rtt_ms.max(1)));
                    v["round_trips_to_another_city_at_most"] = json!(self.cross_at_most(r));
                    v["round_trips_to_another_city_beyond_leader_city_estimate"] =
                        json!(self.cross_extra(r));
                    v
                }).collect::<Vec<_>>(),
                "goals": self.city_goals().iter().map(|(w, g, m, v)| json!({
                    "workload": w, "target": g, "measured": m, "verdict": v
                })).collect::<Vec<_>>(),
            }),
        }
    }

    pub(crate) fn to_json(&self, cfg: &Config) -> Value {
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|w| {
                let mut results = serde_json::Map::new();
                for t in TARGETS {
                    let v = match self.cells.get(&(w.id, t)) {
                        Some(Ok(m)) => json!({
                            "value": m.value,
                            "ops": m.ops,
                            "seconds": m.secs,
                            "note": m.note,
                            "round_trips": m.round_trips.as_ref().map(|r| json!({
                                "round_trips_per_op": r.round_trips_per_op,
                                "rpcs_per_op": r.rpcs_per_op,
                                "per": w.per,
                                "delta": r.delta,
                            })),
                        }),
                        Some(Err(e)) => json!({"error": e}),
                        None => continue,
                    };
                    results.insert(t.to_string(), v);
                }
                json!({
                    "id": w.id,
                    "title": w.title,
                    "unit": w.unit.label(),
                    "higher_is_better": w.unit != Unit::Seconds,
                    "results": results,
                    "failsafe_over_bindfs": self.ratio(w, "bindfs"),
                    "failsafe_over_local": self.ratio(w, "local"),
                })
            })
            .collect();
        let targets: serde_json::Map<String, Value> = self
            .targets
            .iter()
            .map(|(n, r)| {
                let v = match r {
                    Ok(s) => json!({"setup": s}),
                    Err(e) => json!({"skipped": e}),
                };
                (n.to_string(), v)
            })
            .collect();
        json!({
            "generated_by": "failsafe-bench",
            "invocation": self.invocation,
            "note": self.note,
            "config": cfg.to_json(),
            "machine": self.machine,
            "targets": targets,
            "workloads": workloads,
            "goals": self.goals().iter().map(|(w, g, r, v)| json!({
                "workload": w, "target": g, "failsafe_over_bindfs": r, "verdict": v
            })).collect::<Vec<_>>(),
            "round_trips": {
                "enabled": self.round_trips_enabled,
                "source": "the mount's stats=PATH file: counters named round_trips and rpcs",
            },
            "cities": self.cities_json(),
            "dokuwiki": self.doku().to_json(),
            "cluster_api": self.api_rows.iter().map(ApiRow::to_json).collect::<Vec<_>>(),
        })
    }
}
