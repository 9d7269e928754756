//! What a run reports: a human summary, `report.json`, the history
//! (`history.jsonl`), and `latency.svg` — every operation's latency over
//! time, failures in red, fault windows shaded.

use std::io::Write;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::check::Violation;
use crate::scenario::{FaultKind, Scenario};
use crate::workload::{Kind, Op};
use crate::world::Target;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct FaultWindow {
    pub kind: FaultKind,
    /// `"host": N` or `"mount": N`.
    #[serde(flatten)]
    pub target: Target,
    pub what: String,
    pub start_s: f64,
    pub end_s: f64,
    /// The longest operation that overlapped the window, not counting the
    /// operations of a mount it froze (they only wait): what the fault cost
    /// everyone else.
    pub longest_op_ms: f64,
    pub longest_op: String,
}

impl FaultWindow {
    pub(crate) fn new(
        kind: FaultKind,
        target: Target,
        what: String,
        start_s: f64,
        end_s: f64,
    ) -> FaultWindow {
        FaultWindow {
            kind,
            target,
            what,
            start_s,
            end_s,
            longest_op_ms: 0.0,
            longest_op: String::new(),
        }
    }

    fn overlaps(&self, o: &Op) -> bool {
        o.start_ms <= self.end_s * 1000.0 && o.end_ms >= self.start_s * 1000.0
    }

    /// Whether `o` is an operation on the mount this window froze, while frozen.
    fn froze(&self, o: &Op) -> bool {
        self.target == Target::Mount(o.client) && self.overlaps(o)
    }
}

/// The longest of `ops`, and what it was.
fn longest<'a>(ops: impl Iterator<Item = &'a Op>) -> Option<(f64, String)> {
    let o = ops.max_by(|a, b| a.took_ms().total_cmp(&b.took_ms()))?;
    Some((
        o.took_ms(),
        format!(
            "{:?} {} by {} at {:.1} s",
            o.kind,
            o.path,
            o.worker,
            o.start_ms / 1000.0
        ),
    ))
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn latency<'a>(ops: impl Iterator<Item = &'a Op>) -> Latency {
    let mut t: Vec<f64> = ops.map(Op::took_ms).collect();
    if t.is_empty() {
        return Latency::default();
    }
    t.sort_by(f64::total_cmp);
    let q = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize];
    Latency {
        count: t.len(),
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        max_ms: q(1.0),
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    pub network_namespaces: bool,
    pub hosts: usize,
    pub mounts: usize,
    pub operations: usize,
    pub failed_operations: usize,
    /// Failed operations by kind.
    pub errors: std::collections::BTreeMap<String, usize>,
    /// The longest single operation: what, when, how long.
    pub longest_stall_ms: f64,
    pub longest_stall: String,
    /// When a mount was frozen: the longest operation that was not one of
    /// its own while it was frozen (those only wait for it to thaw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_stall_unfrozen_ms: Option<f64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub longest_stall_unfrozen: String,
    pub latency: Latency,
    pub latency_by_kind: std::collections::BTreeMap<String, Latency>,
    /// Seconds from the last fault's end until every block was at its copy count.
    pub failsafe_after_s: Option<f64>,
    /// Most blocks seen below their copy count at once.
    pub max_below_copy_count: u64,
    pub bytes_rereplicated: u64,
    /// Of those copies, how many went as rsync deltas.
    pub copies_as_deltas: u64,
    /// Stored copies whose bytes do not match their hash when the run ended.
    pub corrupt_copies_at_end: usize,
    pub faults: Vec<FaultWindow>,
    /// Faults this run could not inject, and why.
    pub skipped: Vec<String>,
    /// What the cluster's status warned of when the workload ended (as
    /// `fsctl status` prints it: a web host's clock off, a disk low…).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// With latency between zones: what single operations cost before the
    /// workload starts (see `World::probe_cities`).
    #[serde(default)]
    pub cities: Vec<String>,
    pub violations: Vec<Violation>,
    #[serde(skip)]
    ops: Vec<Op>,
}

impl Report {
    pub(crate) fn new(s: &Scenario, seed: u64, netns: bool) -> Report {
        Report {
            scenario: s.name.clone(),
            description: s.description.clone(),
            seed,
            network_namespaces: netns,
            hosts: s.zones.len(),
            mounts: s.clients,
            operations: 0,
            failed_operations: 0,
            errors: Default::default(),
            longest_stall_ms: 0.0,
            longest_stall: String::new(),
            longest_stall_unfrozen_ms: None,
            longest_stall_unfrozen: String::new(),
            latency: Latency::default(),
            latency_by_kind: Default::default(),
            failsafe_after_s: None,
            max_below_copy_count: 0,
            bytes_rereplicated: 0,
            copies_as_deltas: 0,
            corrupt_copies_at_end: 0,
            faults: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
            cities: Vec::new(),
            violations: Vec::new(),
            ops: Vec::new(),
        }
    }

    pub(crate) fn finish(
        &mut self,
        ops: Vec<Op>,
        faults: Vec<FaultWindow>,
        violations: Vec<Violation>,
    ) {
        self.operations = ops.len();
        self.failed_operations = ops.iter().filter(|o| !o.ok).count();
        for o in ops.iter().filter(|o| !o.ok) {
            *self
                .errors
                .entry(format!("{:?}", o.kind).to_lowercase())
                .or_default() += 1;
        }
        if let Some((ms, what)) = longest(ops.iter()) {
            (self.longest_stall_ms, self.longest_stall) = (ms, what);
        }
        let mut faults = faults;
        let frozen = |o: &Op| faults.iter().any(|w| w.froze(o));
        if faults.iter().any(|w| matches!(w.target, Target::Mount(_))) {
            if let Some((ms, what)) = longest(ops.iter().filter(|o| !frozen(o))) {
                self.longest_stall_unfrozen_ms = Some(ms);
                self.longest_stall_unfrozen = what;
            }
        }
        let longest_in: Vec<Option<(f64, String)>> = faults
            .iter()
            .map(|w| longest(ops.iter().filter(|o| w.overlaps(o) && !frozen(o))))
            .collect();
        for (w, l) in faults.iter_mut().zip(longest_in) {
            if let Some((ms, what)) = l {
                (w.longest_op_ms, w.longest_op) = (ms, what);
            }
        }
        self.latency = latency(ops.iter());
        for k in [
            Kind::Save,
            Kind::Append,
            Kind::Read,
            Kind::Lock,
            Kind::Unlock,
            Kind::Create,
            Kind::Delete,
            Kind::List,
            Kind::Conflict,
            Kind::Stat,
        ] {
            let l = latency(ops.iter().filter(|o| o.kind == k));
            if l.count > 0 {
                self.latency_by_kind
                    .insert(format!("{k:?}").to_lowercase(), l);
            }
        }
        self.faults = faults;
        self.violations = violations;
        self.ops = ops;
    }

    pub(crate) fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub(crate) fn summary(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        s += &format!(
            "{verdict}  {} ({} hosts, {} mounts, seed {})\n",
            self.scenario, self.hosts, self.mounts, self.seed
        );
        if !self.network_namespaces {
            s += "  hosts ran as loopback processes (no network namespaces)\n";
        }
        for f in &self.faults {
            s += &format!("  fault {:6.1}s–{:6.1}s  {}", f.start_s, f.end_s, f.what);
            if !f.longest_op.is_empty() {
                let elsewhere = match f.target {
                    Target::Mount(_) => " on the other mounts",
                    Target::Host(_) => "",
                };
                s += &format!(
                    "; longest operation meanwhile{elsewhere} {:.2} s ({})",
                    f.longest_op_ms / 1000.0,
                    f.longest_op
                );
            }
            s += "\n";
        }
        for w in &self.warnings {
            s += &format!("  cluster warning: {w}\n");
        }
        for k in &self.skipped {
            s += &format!("  skipped: {k}\n");
        }
        for c in &self.cities {
            s += &format!("  cities: {c}\n");
        }
        s += &format!(
            "  operations {}, failed {}",
            self.operations, self.failed_operations
        );
        if !self.errors.is_empty() {
            s += &format!(" {:?}", self.errors);
        }
        s += "\n";
        s += &format!(
            "  latency p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms; longest stall {:.2} s ({})\n",
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.longest_stall_ms / 1000.0,
            self.longest_stall
        );
        if let Some(ms) = self.longest_stall_unfrozen_ms {
            s += &format!(
                "  longest stall not counting a frozen mount's own operations {:.2} s ({})\n",
                ms / 1000.0,
                self.longest_stall_unfrozen
            );
        }
        match self.failsafe_after_s {
            Some(t) => s += &format!("  fail-safe {:.1} s after the last fault ended", t),
            None => s += "  never back in fail-safe mode",
        }
        s += &format!(
            " (at most {} blocks below their copy count; {} bytes re-replicated, {} copies as deltas; {} corrupt copies at the end)\n",
            self.max_below_copy_count, self.bytes_rereplicated, self.copies_as_deltas, self.corrupt_copies_at_end
        );
        for v in self.violations.iter().take(20) {
            s += &format!("  VIOLATION {}: {}\n", v.rule, v.detail);
        }
        if self.violations.len() > 20 {
            s += &format!(
                "  … and {} more violations (report.json)\n",
                self.violations.len() - 20
            );
        }
        s
    }

    /// Writes summary.txt, report.json, history.jsonl and latency.svg.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("summary.txt"), self.summary())?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        let mut h = std::io::BufWriter::new(std::fs::File::create(dir.join("history.jsonl"))?);
        for op in &self.ops {
            serde_json::to_writer(&mut h, op)?;
            h.write_all(b"\n")?;
        }
        h.flush()?;
        self.plot(&dir.join("latency.svg"))
    }

    fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let end_s = self
            .ops
            .iter()
            .map(|o| o.end_ms / 1000.0)
            .fold(1.0, f64::max);
        let max_ms = self.ops.iter().map(Op::took_ms).fold(10.0, f64::max) * 1.5;
        let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let title = format!(
            "{} — operation latency (fault windows shaded)",
            self.scenario
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end_s, (0.1..max_ms).log_scale())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("latency (ms)")
            .draw()
            .map_err(plot_err)?;
        for f in &self.faults {
            let end = if f.end_s > f.start_s {
                f.end_s
            } else {
                f.start_s + end_s / 300.0
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(f.start_s, 0.1), (end, max_ms)],
                    RGBColor(255, 200, 120).mix(0.35).filled(),
                )))
                .map_err(plot_err)?;
        }
        let ok = self.ops.iter().filter(|o| o.ok).map(|o| {
            Circle::new(
                (o.start_ms / 1000.0, o.took_ms().max(0.11)),
                1,
                BLUE.mix(0.5).filled(),
            )
        });
        chart
            .draw_series(ok)
            .map_err(plot_err)?
            .label("operation")
            .legend(|(x, y)| Circle::new((x, y), 3, BLUE.filled()));
        let failed = self.ops.iter().filter(|o| !o.ok).map(|o| {
            Cross::new(
                (o.start_ms / 1000.0, o.took_ms().max(0.11)),
                4,
                RED.stroke_width(2),
            )
        });
        chart
            .draw_series(failed)
            .map_err(plot_err)?
            .label("failed")
            .legend(|(x, y)| Cross::new((x, y), 4, RED));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
        Ok(())
    }
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the latency plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, start_ms: f64, end_ms: f64) -> Op {
        Op {
            client,
            worker: format!("c{client}w0"),
            kind: Kind::Save,
            path: "pages/p".into(),
            start_ms,
            end_ms,
            ok: true,
            error: None,
            rev: 1,
            hash: String::new(),
            note: String::new(),
        }
    }

    #[test]
    fn a_frozen_mounts_own_waits_are_told_apart_from_what_others_waited() {
        let s: Scenario = toml::from_str("name = 'x'\nduration_s = 30\n").unwrap();
        let mut r = Report::new(&s, 1, false);
        let freeze =
            |target| FaultWindow::new(FaultKind::Freeze, target, String::new(), 10.0, 13.0);
        r.finish(
            vec![
                op(1, 9_900.0, 16_000.0),  // the frozen mount's save, across the freeze
                op(0, 10_100.0, 10_500.0), // the other mount's save, waiting out a lease
                op(0, 20_000.0, 20_100.0),
            ],
            vec![freeze(Target::Mount(1))],
            Vec::new(),
        );
        assert_eq!(r.longest_stall_ms, 6_100.0);
        assert_eq!(r.longest_stall_unfrozen_ms, Some(400.0));
        assert_eq!(r.faults[0].longest_op_ms, 400.0);
        assert!(r.summary().contains("on the other mounts 0.40 s"));
        // A host's freeze: every mount's operations count.
        let mut r = Report::new(&s, 1, false);
        r.finish(
            vec![op(1, 9_900.0, 16_000.0), op(0, 10_100.0, 10_500.0)],
            vec![freeze(Target::Host(1))],
            Vec::new(),
        );
        assert_eq!(r.longest_stall_unfrozen_ms, None);
        assert_eq!(r.faults[0].longest_op_ms, 6_100.0);
    }
}
