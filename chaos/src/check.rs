//! The checker: what the history and the final state must satisfy.
//!
//! - Every acknowledged write is present at the end with the right content
//!   (a page may hold a later revision whose save failed: its outcome was
//!   unknown), every acknowledged log line exactly once, no line nobody wrote.
//! - No read returned content that was never written, nor a revision older
//!   than one whose save was acknowledged before the read began.
//! - No two acknowledged saves of a page wrote the same revision (with
//!   shared pages: one overwrote the other unseen, a lost update).
//! - No mount showed a page's mtime going back in time.
//! - No operation failed (when the scenario's faults are ones users must not notice).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::workload::{Kind, Op, LOG, PAGES};

/// What one mount shows at the end.
#[derive(Debug, Default)]
pub(crate) struct FinalView {
    pub client: usize,
    /// Path (relative to the root) -> what it holds; None when absent.
    pub files: BTreeMap<String, Option<Seen>>,
    pub log: Vec<u8>,
}

/// What a file or page was found to hold.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    /// The revision its header claims (None: no header).
    pub rev: Option<u64>,
    /// The hash of its content, comparable with the write's.
    pub hash: String,
}

impl Seen {
    pub(crate) fn page(name: &str, content: &[u8]) -> Seen {
        Seen {
            rev: crate::workload::parse_rev(name, content),
            hash: crate::workload::hash(content),
        }
    }
    pub(crate) fn file(content: &[u8]) -> Seen {
        Seen {
            rev: None,
            hash: crate::workload::hash(content),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Violation {
    pub rule: &'static str,
    pub detail: String,
}

fn v(rule: &'static str, detail: String) -> Violation {
    Violation { rule, detail }
}

/// Saves of one page, by revision.
struct PageWrites<'a> {
    by_rev: BTreeMap<u64, &'a Op>,
}

/// Every page's saves by revision; of two saves of one revision the
/// acknowledged one (two acknowledged ones are `check_lost_updates`'s).
fn page_writes(ops: &[Op]) -> HashMap<&str, PageWrites<'_>> {
    let mut pages: HashMap<&str, PageWrites<'_>> = HashMap::new();
    for op in ops.iter().filter(|o| o.kind == Kind::Save) {
        let by_rev = &mut pages
            .entry(op.path.as_str())
            .or_insert_with(|| PageWrites {
                by_rev: BTreeMap::new(),
            })
            .by_rev;
        match by_rev.get(&op.rev) {
            Some(had) if had.ok && !op.ok => {}
            _ => {
                by_rev.insert(op.rev, op);
            }
        }
    }
    pages
}

/// Two acknowledged saves of one page that wrote the same revision: both
/// started from the same one, so the later overwrote the earlier unseen.
pub(crate) fn check_lost_updates(ops: &[Op]) -> Vec<Violation> {
    let mut seen: HashMap<(&str, u64), &Op> = HashMap::new();
    let mut out = Vec::new();
    for op in ops.iter().filter(|o| o.kind == Kind::Save && o.ok) {
        if let Some(first) = seen.insert((op.path.as_str(), op.rev), op) {
            out.push(v(
                "lost_update",
                format!(
                    "{}: rev {} saved by {} at {:.0} ms and by {} at {:.0} ms, both acknowledged",
                    op.path, op.rev, first.worker, first.start_ms, op.worker, op.start_ms
                ),
            ));
        }
    }
    out
}

/// A page's mtime, as one mount shows it, never goes back: a stat that
/// began after another on the same mount ended shows no older mtime.
pub(crate) fn check_mtimes(ops: &[Op]) -> Vec<Violation> {
    let mut by_file: HashMap<(usize, &str), Vec<&Op>> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::Stat && o.ok && o.rev > 0)
    {
        by_file
            .entry((op.client, op.path.as_str()))
            .or_default()
            .push(op);
    }
    let mut out = Vec::new();
    for ((client, path), mut stats) in by_file {
        stats.sort_by(|a, b| a.end_ms.total_cmp(&b.end_ms));
        let mut starts = stats.clone();
        starts.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        // The newest mtime among stats that ended before each one began.
        let (mut ended, mut newest): (usize, Option<&Op>) = (0, None);
        for b in starts {
            while ended < stats.len() && stats[ended].end_ms < b.start_ms {
                if newest.is_none_or(|n| stats[ended].rev > n.rev) {
                    newest = Some(stats[ended]);
                }
                ended += 1;
            }
            if let Some(a) = newest.filter(|a| a.rev > b.rev) {
                out.push(v(
                    "mtime_backwards",
                    format!(
                        "mount {client}: {path} showed mtime {:.3} s at {:.0} ms, then {:.3} s at {:.0} ms ({:.3} s earlier)",
                        a.rev as f64 / 1e9,
                        a.start_ms,
                        b.rev as f64 / 1e9,
                        b.start_ms,
                        (a.rev - b.rev) as f64 / 1e9
                    ),
                ));
            }
        }
    }
    out
}

/// Reads against the writes: nothing never written, nothing stale.
pub(crate) fn check_reads(ops: &[Op]) -> Vec<Violation> {
    let pages = page_writes(ops);
    let mut out = Vec::new();
    for r in ops.iter().filter(|o| {
        o.kind == Kind::Read && o.ok && (o.path.starts_with(PAGES) || o.path.starts_with("wiki/"))
    }) {
        let writes = pages.get(r.path.as_str());
        // The newest revision acknowledged before this read began.
        let floor = writes
            .and_then(|w| {
                w.by_rev
                    .values()
                    .filter(|s| s.ok && s.end_ms < r.start_ms)
                    .map(|s| s.rev)
                    .max()
            })
            .unwrap_or(0);
        if r.rev == u64::MAX {
            out.push(v(
                "read_never_written",
                format!(
                    "{} at {:.0} ms by {}: content without a page header: {:?}",
                    r.path, r.start_ms, r.worker, r.note
                ),
            ));
            continue;
        }
        if r.rev == 0 {
            if floor > 0 {
                out.push(v(
                    "stale_read",
                    format!(
                        "{} at {:.0} ms by {}: absent, but rev {floor} was acknowledged before",
                        r.path, r.start_ms, r.worker
                    ),
                ));
            }
            continue;
        }
        match writes.and_then(|w| w.by_rev.get(&r.rev)) {
            None => out.push(v("read_never_written", format!("{} at {:.0} ms by {}: rev {} was never written", r.path, r.start_ms, r.worker, r.rev))),
            Some(w) if w.hash != r.hash => out.push(v(
                "read_never_written",
                format!("{} at {:.0} ms by {}: rev {} with content other than what was written", r.path, r.start_ms, r.worker, r.rev),
            )),
            Some(w) if w.start_ms > r.end_ms => out.push(v(
                "read_never_written",
                format!("{} at {:.0} ms by {}: rev {} before its save began", r.path, r.start_ms, r.worker, r.rev),
            )),
            Some(_) if r.rev < floor => out.push(v(
                "stale_read",
                format!("{} at {:.0} ms by {}: rev {} but rev {floor} was acknowledged before the read began", r.path, r.start_ms, r.worker, r.rev),
            )),
            Some(_) => {}
        }
    }
    out
}

/// The final state on every mount against the acknowledged writes.
pub(crate) fn check_final(ops: &[Op], views: &[FinalView]) -> Vec<Violation> {
    let pages = page_writes(ops);
    let mut out = Vec::new();
    for view in views {
        let m = view.client;
        for (path, writes) in &pages {
            let last_ok = writes.by_rev.values().filter(|s| s.ok).map(|s| s.rev).max();
            let got = view.files.get(*path).cloned().flatten();
            let Some(last_ok) = last_ok else { continue };
            let Some(seen) = got else {
                out.push(v(
                    "lost_write",
                    format!("mount {m}: {path} is gone; rev {last_ok} was acknowledged"),
                ));
                continue;
            };
            let h = seen.hash;
            match seen.rev {
                Some(rev) if rev < last_ok => out.push(v(
                    "lost_write",
                    format!("mount {m}: {path} holds rev {rev}; rev {last_ok} was acknowledged"),
                )),
                Some(rev) => match writes.by_rev.get(&rev) {
                    Some(w) if w.hash == h && (rev == last_ok || !w.ok) => {}
                    Some(w) if w.hash != h => out.push(v(
                        "lost_write",
                        format!("mount {m}: {path} rev {rev} holds other bytes than were written"),
                    )),
                    _ => out.push(v(
                        "lost_write",
                        format!("mount {m}: {path} holds rev {rev}, which nobody wrote"),
                    )),
                },
                None => out.push(v(
                    "lost_write",
                    format!("mount {m}: {path} holds content nobody wrote"),
                )),
            }
        }
        // Scratch files: acknowledged creates present (unless deleted), acknowledged deletes gone.
        let mut created: BTreeMap<&str, &Op> = BTreeMap::new();
        for op in ops.iter().filter(|o| o.ok && o.kind == Kind::Create) {
            created.insert(op.path.as_str(), op);
        }
        for op in ops.iter().filter(|o| o.kind == Kind::Delete) {
            let got = view.files.get(op.path.as_str()).cloned().flatten();
            if op.ok && got.is_some() {
                out.push(v(
                    "lost_write",
                    format!(
                        "mount {m}: {} exists after its delete was acknowledged",
                        op.path
                    ),
                ));
            }
            created.remove(op.path.as_str());
        }
        for (path, op) in created {
            match view.files.get(path).cloned().flatten() {
                None => out.push(v(
                    "lost_write",
                    format!("mount {m}: {path} is gone; its create was acknowledged"),
                )),
                Some(c) if c.hash != op.hash => out.push(v(
                    "lost_write",
                    format!("mount {m}: {path} holds other bytes than were written"),
                )),
                Some(_) => {}
            }
        }
        let present = view
            .files
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| p);
        for path in present.filter(|p| p.starts_with(crate::workload::SCRATCH)) {
            if !ops
                .iter()
                .any(|o| o.kind == Kind::Create && o.path == *path)
            {
                out.push(v(
                    "file_never_written",
                    format!("mount {m}: {path} exists but nobody created it"),
                ));
            }
        }
        // The log: acknowledged lines exactly once, others at most once, nothing unknown.
        let mut count: HashMap<&str, usize> = HashMap::new();
        let text = String::from_utf8_lossy(&view.log);
        for l in text.lines() {
            *count.entry(l).or_default() += 1;
        }
        let mut known: HashMap<&str, bool> = HashMap::new();
        for op in ops.iter().filter(|o| o.kind == Kind::Append) {
            let e = known.entry(op.note.as_str()).or_default();
            *e |= op.ok;
        }
        for (line, n) in &count {
            match known.get(line) {
                None => out.push(v(
                    "log_line_never_written",
                    format!("mount {m}: {LOG} holds {line:?}, which nobody appended"),
                )),
                Some(_) if *n > 1 => out.push(v(
                    "log_line_duplicated",
                    format!("mount {m}: {LOG} holds {line:?} {n} times"),
                )),
                Some(_) => {}
            }
        }
        for (line, acked) in known {
            if acked && !count.contains_key(line) {
                out.push(v(
                    "lost_write",
                    format!("mount {m}: {LOG} lacks acknowledged line {line:?}"),
                ));
            }
        }
    }
    out
}

/// Failed operations, when the scenario promises nobody notices.
pub(crate) fn check_failures(ops: &[Op]) -> Vec<Violation> {
    ops.iter()
        .filter(|o| !o.ok)
        .map(|o| {
            v(
                "failed_operation",
                format!(
                    "{:?} {} by {} at {:.0} ms after {:.0} ms: {}",
                    o.kind,
                    o.path,
                    o.worker,
                    o.start_ms,
                    o.took_ms(),
                    o.error.as_deref().unwrap_or("?")
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{hash, page_content};

    fn save(path: &str, rev: u64, start: f64, end: f64, ok: bool) -> Op {
        let name = path.rsplit('/').next().unwrap();
        Op {
            client: 0,
            worker: "c0w0".into(),
            kind: Kind::Save,
            path: path.into(),
            start_ms: start,
            end_ms: end,
            ok,
            error: None,
            rev,
            hash: hash(&page_content(name, rev, 100)),
            note: String::new(),
        }
    }

    fn read(path: &str, rev: u64, start: f64) -> Op {
        let name = path.rsplit('/').next().unwrap();
        Op {
            kind: Kind::Read,
            worker: "c1r0".into(),
            start_ms: start,
            end_ms: start + 1.0,
            hash: hash(&page_content(name, rev, 100)),
            ..save(path, rev, 0.0, 0.0, true)
        }
    }

    #[test]
    fn stale_and_invented_reads_are_caught() {
        let p = "pages/x.txt";
        let ops = vec![
            save(p, 1, 0.0, 10.0, true),
            save(p, 2, 20.0, 30.0, true),
            read(p, 1, 15.0),
            read(p, 2, 25.0),
        ];
        assert!(check_reads(&ops).is_empty(), "{:?}", check_reads(&ops));
        let stale = vec![
            save(p, 1, 0.0, 10.0, true),
            save(p, 2, 20.0, 30.0, true),
            read(p, 1, 31.0),
        ];
        assert_eq!(check_reads(&stale)[0].rule, "stale_read");
        let invented = vec![save(p, 1, 0.0, 10.0, true), read(p, 7, 31.0)];
        assert_eq!(check_reads(&invented)[0].rule, "read_never_written");
        let mut forged = read(p, 1, 31.0);
        forged.hash = "00".into();
        assert_eq!(
            check_reads(&[save(p, 1, 0.0, 10.0, true), forged])[0].rule,
            "read_never_written"
        );
    }

    #[test]
    fn lost_updates_and_mtimes_going_back_are_caught() {
        let p = "wiki/Shared0";
        let mut other = save(p, 2, 12.0, 18.0, true);
        other.worker = "c1w0".into();
        let ops = vec![save(p, 1, 0.0, 10.0, true), save(p, 2, 11.0, 20.0, true)];
        assert!(check_lost_updates(&ops).is_empty());
        let both = [ops.clone(), vec![other.clone()]].concat();
        assert_eq!(check_lost_updates(&both)[0].rule, "lost_update");
        other.ok = false;
        let unknown = [ops, vec![other]].concat();
        assert!(
            check_lost_updates(&unknown).is_empty(),
            "a failed save may not have landed"
        );

        let stat = |client: usize, mtime: u64, start: f64| Op {
            client,
            kind: Kind::Stat,
            start_ms: start,
            end_ms: start + 1.0,
            rev: mtime,
            ..save(p, 0, 0.0, 0.0, true)
        };
        let fine = [
            stat(0, 5, 0.0),
            stat(0, 5, 2.0),
            stat(0, 9, 4.0),
            stat(1, 3, 6.0),
        ];
        assert!(check_mtimes(&fine).is_empty(), "{:?}", check_mtimes(&fine));
        let overlapping = [stat(0, 9, 0.0), stat(0, 5, 0.5)];
        assert!(
            check_mtimes(&overlapping).is_empty(),
            "concurrent stats may see either"
        );
        let back = [stat(0, 9, 0.0), stat(0, 12, 2.0), stat(0, 5, 4.0)];
        let found = check_mtimes(&back);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].rule, "mtime_backwards");
        assert!(found[0].detail.contains("mount 0"), "{}", found[0].detail);
    }

    #[test]
    fn lost_and_unknown_writes_are_caught() {
        let p = "pages/x.txt";
        let ops = vec![save(p, 1, 0.0, 10.0, true), save(p, 2, 20.0, 30.0, false)];
        let view = |rev: Option<u64>| FinalView {
            client: 0,
            files: [(
                p.to_string(),
                rev.map(|r| Seen::page("x.txt", &page_content("x.txt", r, 100))),
            )]
            .into(),
            log: Vec::new(),
        };
        assert!(check_final(&ops, &[view(Some(1))]).is_empty());
        assert!(
            check_final(&ops, &[view(Some(2))]).is_empty(),
            "a failed save may have landed"
        );
        assert_eq!(check_final(&ops, &[view(None)])[0].rule, "lost_write");
        assert_eq!(check_final(&ops, &[view(Some(3))])[0].rule, "lost_write");
        let ok = vec![save(p, 1, 0.0, 10.0, true), save(p, 2, 20.0, 30.0, true)];
        assert_eq!(check_final(&ok, &[view(Some(1))])[0].rule, "lost_write");

        let mut append = save(crate::workload::LOG, 1, 0.0, 1.0, true);
        append.kind = Kind::Append;
        append.note = "c0w0 1 x".into();
        let log = |s: &str| FinalView {
            client: 0,
            files: BTreeMap::new(),
            log: s.as_bytes().to_vec(),
        };
        assert!(check_final(&[append.clone()], &[log("c0w0 1 x\n")]).is_empty());
        assert_eq!(
            check_final(&[append.clone()], &[log("")])[0].rule,
            "lost_write"
        );
        assert_eq!(
            check_final(&[append.clone()], &[log("c0w0 1 x\nc0w0 1 x\n")])[0].rule,
            "log_line_duplicated"
        );
        assert_eq!(
            check_final(&[append], &[log("c0w0 1 x\nforged\n")])[0].rule,
            "log_line_never_written"
        );
    }
}
