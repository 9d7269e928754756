//! The wiki save pattern and page reads on two mounts while each host in
//! turn is killed, frozen for 10 s, and restarted: nobody may notice.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Env;

#[derive(Default)]
struct Record {
    ops: u64,
    failures: Vec<String>,
    longest: Duration,
    longest_what: String,
    /// page -> last acknowledged content
    saved: BTreeMap<String, String>,
    /// acknowledged change-log lines
    logged: Vec<String>,
}

impl Record {
    fn op<T>(&mut self, what: &str, r: std::io::Result<T>, started: Instant) -> Option<T> {
        self.ops += 1;
        let took = started.elapsed();
        if took > Duration::from_millis(1500) {
            eprintln!(
                "slow: {what} took {took:?}, ended {:?}",
                std::time::SystemTime::now()
            );
        }
        if took > self.longest {
            self.longest = took;
            self.longest_what = what.to_string();
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.failures.push(format!("{what}: {e}"));
                None
            }
        }
    }
}

/// One editor: saves pages the way DokuWiki does.
fn editor(root: PathBuf, who: usize, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let page = format!("p{who}-{}", seq % 4);
        let content = format!("page {page} revision {seq} by editor {who}\n")
            .repeat(1 + (seq % 7) as usize * 50);
        let tmp = root.join(format!(".{page}.tmp"));
        let started = Instant::now();
        let saved = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(content.as_bytes())?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, root.join(&page))
        })();
        let mut r = rec.lock().unwrap();
        if r.op(&format!("save {page}"), saved, started).is_none() {
            continue;
        }
        r.saved.insert(page.clone(), content);
        drop(r);
        let line = format!("{who} {seq} {page}\n");
        let started = Instant::now();
        let appended = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(root.join("changes.log"))?;
            f.write_all(line.as_bytes())?;
            f.sync_all()
        })();
        let mut r = rec.lock().unwrap();
        if r.op("append changes.log", appended, started).is_some() {
            r.logged.push(line.trim_end().to_string());
        }
    }
}

/// One reader: reads the other editor's pages and the change log.
fn reader(root: PathBuf, other: usize, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) {
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let page = format!("p{other}-{}", k % 4);
        let started = Instant::now();
        let read = match fs::read_to_string(root.join(&page)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()), // not saved yet
            r => r,
        };
        let mut r = rec.lock().unwrap();
        if let Some(text) = r.op(&format!("read {page}"), read, started) {
            let first = text.lines().next().unwrap_or("");
            let well_formed = first.starts_with(&format!("page {page} revision"))
                && text.lines().all(|l| l == first);
            if !text.is_empty() && !well_formed {
                r.failures.push(format!(
                    "read {page}: torn or foreign content {:?}",
                    &text[..text.len().min(80)]
                ));
            }
        }
        drop(r);
        let started = Instant::now();
        let log = fs::read(root.join("changes.log")).map(|_| ());
        let log = match log {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        rec.lock().unwrap().op("read changes.log", log, started);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t40_wiki_saves_and_reads_go_on_while_each_host_fails_in_turn() {
    let mut env = Env::start(2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Mutex::new(Record::default()));
    let mut workers = Vec::new();
    for i in 0..2 {
        let root = env.mounts[i].path.clone();
        let (s, r) = (stop.clone(), rec.clone());
        workers.push(std::thread::spawn(move || editor(root.clone(), i, s, r)));
        let root = env.mounts[i].path.clone();
        let (s, r) = (stop.clone(), rec.clone());
        workers.push(std::thread::spawn(move || reader(root, 1 - i, s, r)));
    }
    let settle = |secs| tokio::time::sleep(Duration::from_secs(secs));
    settle(3).await;
    for h in 0..3 {
        eprintln!("host {h}: kill -9 at {:?}", std::time::SystemTime::now());
        env.cluster.kill(h);
        settle(5).await;
        env.cluster.restart(h, true).unwrap();
        settle(4).await;
        eprintln!(
            "host {h}: SIGSTOP for 10 s at {:?}",
            std::time::SystemTime::now()
        );
        env.cluster.freeze(h);
        settle(10).await;
        env.cluster.thaw(h);
        settle(4).await;
        eprintln!("host {h}: restart at {:?}", std::time::SystemTime::now());
        env.cluster.restart_graceful(h).unwrap();
        settle(4).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let rec = rec.lock().unwrap();
    eprintln!(
        "{} operations, {} failed; longest single-operation stall {:?} ({})",
        rec.ops,
        rec.failures.len(),
        rec.longest,
        rec.longest_what
    );
    assert!(
        rec.failures.is_empty(),
        "failed operations: {:#?}",
        rec.failures
    );
    assert!(rec.saved.len() == 8, "both editors saved all their pages");

    // Every acknowledged save reads back intact, from both mounts.
    for m in &env.mounts {
        for (page, content) in &rec.saved {
            let got = fs::read_to_string(m.p(page)).unwrap();
            assert!(
                got == *content,
                "{page} on {} is not the last acknowledged save",
                m.path.display()
            );
        }
        let log = fs::read_to_string(m.p("changes.log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        for l in &rec.logged {
            assert_eq!(
                lines.iter().filter(|x| *x == l).count(),
                1,
                "change-log line {l:?} exactly once"
            );
        }
    }
    drop(rec);
    let _ = &mut env;
}

#[tokio::test(flavor = "multi_thread")]
async fn t41_without_a_majority_reads_go_on_writes_fail_cleanly_and_recover() {
    let mut env = Env::start(1).await;
    let m = env.mounts[0].path.clone();
    fs::write(m.join("page.txt"), b"readable in limp mode").unwrap();
    env.cluster.kill(1);
    env.cluster.kill(2);
    // Reads of reachable data go on.
    assert_eq!(
        fs::read(m.join("page.txt")).unwrap(),
        b"readable in limp mode"
    );
    assert!(fs::read_dir(&m).unwrap().count() >= 1);
    // Writes fail with EIO after a bounded wait, not never.
    let started = Instant::now();
    let r = fs::write(m.join("new.txt"), b"x");
    let waited = started.elapsed();
    assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    assert!(
        waited < Duration::from_secs(60),
        "bounded wait, took {waited:?}"
    );
    eprintln!("write without a majority failed after {waited:?}");
    // The cluster comes back; the same mount recovers by itself.
    env.cluster.restart(1, true).unwrap();
    env.cluster.restart(2, true).unwrap();
    // Generous: it returns as soon as the mount recovers.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match fs::write(m.join("new.txt"), b"after recovery") {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "mount did not recover: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(fs::read(m.join("new.txt")).unwrap(), b"after recovery");
}

/// One of sixteen group-commit writers: each step creates a file with
/// O_EXCL, renames it, appends a line to a shared log and tries a mkdir
/// that must fail (EEXIST). Any command applied twice shows: the O_EXCL
/// create or the rename would fail, or the line would appear twice.
fn group_writer(
    root: PathBuf,
    w: usize,
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Record>>,
    done: Arc<Mutex<Vec<(usize, u64)>>>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let started = Instant::now();
        let step = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(root.join(format!("new-{w}-{n}")))?;
            f.write_all(format!("w{w} n{n}").as_bytes())?;
            drop(f);
            fs::rename(
                root.join(format!("new-{w}-{n}")),
                root.join(format!("f-{w}-{n}")),
            )?;
            let mut log = OpenOptions::new().append(true).open(root.join("log"))?;
            log.write_all(format!("w{w} n{n}\n").as_bytes())?;
            drop(log);
            match fs::create_dir(root.join("taken")) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
                Ok(()) => Err(std::io::Error::other("mkdir of an existing name succeeded")),
            }
        })();
        if rec
            .lock()
            .unwrap()
            .op(&format!("writer {w} step {n}"), step, started)
            .is_some()
        {
            done.lock().unwrap().push((w, n));
        } else {
            // A failed step is recorded; its files are not checked.
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t42_group_commit_applies_every_operation_of_sixteen_writers_exactly_once_across_a_leader_kill(
) {
    let mut env = Env::start(2).await;
    let g = env.mounts[0].p("g");
    fs::create_dir(&g).unwrap();
    fs::create_dir(g.join("taken")).unwrap();
    File::create(g.join("log")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Mutex::new(Record::default()));
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..16 {
        let root = env.mounts[w % 2].p("g");
        let (s, r, d) = (stop.clone(), rec.clone(), done.clone());
        workers.push(std::thread::spawn(move || group_writer(root, w, s, r, d)));
    }
    // Until the writers' commands have shared entries (the leader counts
    // them), so the kill lands in the middle of batches.
    let deadline = Instant::now() + Duration::from_secs(90);
    let batched_before_kill = loop {
        let n = env.metric_sum("failsafe_tracker_batched_entries_total");
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader = env.leader().await;
    eprintln!("kill -9 the leader, host {leader}, in the middle of the writers' batches");
    env.cluster.kill(leader);
    let at_kill = done.lock().unwrap().len();
    // Writers go on under the new leader (and some steps finish there)
    // before the old one returns.
    tokio::time::sleep(Duration::from_secs(6)).await;
    env.cluster.restart(leader, true).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let rec = rec.lock().unwrap();
    let done = done.lock().unwrap();
    eprintln!(
        "{} steps by 16 writers, {} failed; longest {:?} ({}); {batched_before_kill} batched \
         entries before the kill",
        done.len(),
        rec.failures.len(),
        rec.longest,
        rec.longest_what
    );
    assert!(rec.failures.is_empty(), "failed: {:#?}", rec.failures);
    assert!(
        batched_before_kill > 0,
        "sixteen concurrent writers shared no log entry"
    );
    assert!(
        done.len() > at_kill,
        "no step finished after the leader was killed"
    );
    // Every step is there exactly once, seen from both mounts.
    for m in &env.mounts {
        let g = m.p("g");
        let log = fs::read_to_string(g.join("log")).unwrap();
        let mut lines: Vec<&str> = log.lines().collect();
        lines.sort_unstable();
        let mut want: Vec<String> = done.iter().map(|(w, n)| format!("w{w} n{n}")).collect();
        want.sort_unstable();
        assert_eq!(
            lines,
            want,
            "the log on {} holds each step once",
            g.display()
        );
        let files = fs::read_dir(&g)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .map(|e| e.file_name().to_string_lossy().starts_with("f-"))
                    .unwrap_or(true)
            })
            .count();
        assert_eq!(files, done.len(), "one file per step on {}", g.display());
        for (w, n) in done.iter() {
            let body = fs::read_to_string(g.join(format!("f-{w}-{n}"))).unwrap();
            assert_eq!(body, format!("w{w} n{n}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t43_a_frozen_mount_holding_leases_holds_a_writer_elsewhere_up_only_until_its_leases_run_out(
) {
    let env = Env::start_mounts_with(2, "leases").await;
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    fs::write(a.p("page.txt"), "rev 0").unwrap();
    // B reads the page (and leases what it looked at), then freezes.
    env.wait_for_lease_streams(2);
    for _ in 0..3 {
        assert_eq!(fs::read_to_string(b.p("page.txt")).unwrap(), "rev 0");
    }
    let pid = b.pid().expect("mount B runs") as i32;
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = Instant::now();
    let written = fs::write(a.p("page.txt"), "rev 1");
    let waited = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    written.unwrap();
    eprintln!("a write waited {waited:?} for a frozen lease holder");
    // Thawed, B sees the change at its next open: its leases ran out.
    assert_eq!(fs::read_to_string(b.p("page.txt")).unwrap(), "rev 1");
    // And a change while B is up reaches it the same way, with no sleep.
    fs::write(a.p("page.txt"), "rev 2").unwrap();
    assert_eq!(fs::read_to_string(b.p("page.txt")).unwrap(), "rev 2");
}
