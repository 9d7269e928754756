//! Round trips per FUSE operation, measured by the mount itself
//! (`stats=PATH`, `metrics=ADDR`) on a real cluster and a real mount: one
//! page save the wiki way, then a stat and a read of the page.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::Env;
use serde_json::Value;

/// Per operation: (count, rpcs, round trips).
type Table = BTreeMap<String, (u64, u64, u64)>;

fn table(v: &Value) -> Table {
    v["ops"]
        .as_object()
        .expect("ops")
        .iter()
        .map(|(op, s)| {
            let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{op}.{k}"));
            (op.clone(), (n("count"), n("rpcs"), n("round_trips")))
        })
        .collect()
}

fn diff(after: &Table, before: &Table) -> Table {
    after
        .iter()
        .map(|(op, a)| {
            let b = before.get(op).copied().unwrap_or_default();
            (op.clone(), (a.0 - b.0, a.1 - b.1, a.2 - b.2))
        })
        .filter(|(_, d)| d.0 > 0)
        .collect()
}

fn print(title: &str, t: &Table) {
    eprintln!(
        "\n{title}\n  {:<10} {:>5} {:>5} {:>11}",
        "op", "count", "rpcs", "round_trips"
    );
    let mut total = (0, 0, 0);
    for (op, (n, r, rt)) in t {
        eprintln!("  {op:<10} {n:>5} {r:>5} {rt:>11}");
        total = (total.0 + n, total.1 + r, total.2 + rt);
    }
    eprintln!(
        "  {:<10} {:>5} {:>5} {:>11}",
        "total", total.0, total.1, total.2
    );
}

/// The stats file as rewritten after `since` (it is rewritten every second).
fn stats_after(path: &Path, since: SystemTime) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > since + Duration::from_millis(50));
        if fresh {
            let text = fs::read_to_string(path).expect("read stats");
            return serde_json::from_str(&text).expect("stats file is JSON");
        }
        assert!(
            Instant::now() < deadline,
            "the stats file was not rewritten"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster with two leased mounts, in zones a and b, both lease streams
/// open; the first writes its stats to the returned path.
async fn two_leased_mounts() -> (Env, std::path::PathBuf, usize, usize) {
    let mut env = Env::start(0).await;
    let stats = env.dir.path().join("stats.json");
    let a = env.mount_with("a", &format!("stats={},leases", stats.display()));
    let b = env.mount_with("b", "leases");
    env.wait_for_lease_streams(2);
    (env, stats, a, b)
}

fn scrape(addr: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// One save under `root`, as DokuWiki does it: mkdir the lock, write and
/// fsync a temp file, rename it over the page, append to the change log,
/// rmdir the lock.
fn save_page(root: &Path) {
    let p = |rel: &str| root.join(rel);
    fs::create_dir(p("locks/page")).unwrap();
    let mut tmp = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("pages/ns/page.txt.tmp"))
        .unwrap();
    tmp.write_all(b"new text of the page\n").unwrap();
    tmp.sync_all().unwrap();
    drop(tmp);
    fs::rename(p("pages/ns/page.txt.tmp"), p("pages/ns/page.txt")).unwrap();
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(p("meta/changes"))
        .unwrap();
    log.write_all(b"2 edited\n").unwrap();
    drop(log);
    fs::remove_dir(p("locks/page")).unwrap();
}

/// A wiki that has been running: its directories, the page, the log.
fn wiki(root: &Path) {
    fs::create_dir(root.join("locks")).unwrap();
    fs::create_dir_all(root.join("pages/ns")).unwrap();
    fs::create_dir(root.join("meta")).unwrap();
    fs::write(root.join("pages/ns/page.txt"), b"old text\n").unwrap();
    fs::write(root.join("meta/changes"), b"1 created\n").unwrap();
}

/// Round trips of the operations that read a file: open, read, lookup,
/// getattr.
fn read_trips(t: &Table) -> u64 {
    ["open", "read", "lookup", "getattr"]
        .iter()
        .map(|op| t.get(*op).map_or(0, |r| r.2))
        .sum()
}

/// Sums of (count, rpcs, round trips) over all operations.
fn totals(t: &Table) -> (u64, u64, u64) {
    t.values()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
}

/// Creates files `f0`.. in `dir` (each made exclusively, 4 bytes written,
/// closed) and checks, from the mount's `stats` file, that each cost its
/// two commits (the create, and its bytes at close) and nothing else.
fn creates_cost_only_their_commits(dir: &Path, files: u64, stats: &Path, title: &str) {
    let before = table(&stats_after(stats, SystemTime::now()));
    for n in 0..files {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(format!("f{n}")))
            .unwrap();
        f.write_all(b"data").unwrap();
    }
    let after = table(&stats_after(stats, SystemTime::now()));
    let created = diff(&after, &before);
    print(title, &created);
    assert!(
        totals(&created).2 <= 2 * files,
        "two commits per file and nothing else: {created:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn inline_small_writes_save_a_page_in_fewer_round_trips_than_blocks() {
    let mut env = Env::start(0).await;
    let mut saves = Vec::new();
    // Without leases, so the two differ only in how the data travels.
    for (name, opts) in [
        ("blocks (inline=0)", "inline=0,noleases"),
        ("inline", "noleases"),
    ] {
        let stats = env.dir.path().join(format!("stats-{}.json", saves.len()));
        let extra = format!("stats={}", stats.display());
        let extra = if opts.is_empty() {
            extra
        } else {
            format!("{extra},{opts}")
        };
        let i = env.mount_with("a", &extra);
        let root = env.mounts[i].p(&format!("wiki{}", saves.len()));
        fs::create_dir(&root).unwrap();
        wiki(&root);
        let before = table(&stats_after(&stats, SystemTime::now()));
        save_page(&root);
        let after = table(&stats_after(&stats, SystemTime::now()));
        let save = diff(&after, &before);
        print(&format!("one page save, {name}"), &save);
        saves.push(totals(&save));
        env.mounts[i].unmount();
    }
    let (blocks, inline) = (saves[0], saves[1]);
    eprintln!(
        "\nround trips per save: {} as blocks, {} inline",
        blocks.2, inline.2
    );
    // The fsync and the append each skip a placement query and a block
    // put: at least four round trips fewer.
    assert!(
        inline.2 + 4 <= blocks.2,
        "inline {inline:?} against blocks {blocks:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trips_of_a_page_save() {
    let mut env = Env::start(0).await;
    let stats = env.dir.path().join("stats.json");
    // Without leases: every lookup and stat asks the cluster, which is what
    // this table shows (the leases test below shows the difference).
    let i = env.mount_with(
        "a",
        &format!("stats={},metrics=127.0.0.1:0,noleases", stats.display()),
    );
    let m = &env.mounts[i];

    wiki(&m.path);
    let before = table(&stats_after(&stats, SystemTime::now()));

    save_page(&m.path);
    let saved_snap = table(&stats_after(&stats, SystemTime::now()));

    // A view: stat the page, then read it.
    let meta = fs::metadata(m.p("pages/ns/page.txt")).unwrap();
    assert_eq!(meta.len(), 21);
    let stat_snap = table(&stats_after(&stats, SystemTime::now()));
    assert_eq!(
        fs::read(m.p("pages/ns/page.txt")).unwrap(),
        b"new text of the page\n"
    );
    let read_json = stats_after(&stats, SystemTime::now());
    let read_snap = table(&read_json);

    // Port 0 above: the mount reports the port it was given.
    let metrics = read_json["metrics_addr"].as_str().expect("metrics_addr");
    let text = scrape(metrics);
    assert!(text.contains("failsafe_mount_op_round_trips_bucket{op=\"mkdir\",le=\"+Inf\"}"));
    assert!(text.contains("failsafe_client_rpcs_sent_total{kind=\"meta_mutate\"}"));

    env.mounts[i].unmount();
    let last: Value =
        serde_json::from_str(&fs::read_to_string(&stats).expect("stats at unmount")).unwrap();

    let save = diff(&saved_snap, &before);
    let stat = diff(&stat_snap, &saved_snap);
    let read = diff(&read_snap, &stat_snap);
    print(
        "one page save (mkdir lock, temp + write + fsync, rename, O_APPEND log, rmdir lock)",
        &save,
    );
    print("stat of the page", &stat);
    print("open + read of the page", &read);

    // The save reached the cluster through these operations.
    for op in [
        "mkdir", "create", "fsync", "rename", "rmdir", "lookup", "open",
    ] {
        let (n, r, rt) = save.get(op).copied().unwrap_or_default();
        assert!(
            n > 0 && rt > 0 && rt <= r,
            "{op} in the save: {n} ops, {r} rpcs, {rt} round trips"
        );
    }
    assert!(save.get("write").is_some_and(|w| w.0 >= 2), "{save:?}");
    let (n, _, rt) = stat
        .values()
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    assert!(n > 0 && rt > 0, "the stat asked the cluster: {stat:?}");
    let (n, _, rt) = read.get("open").copied().unwrap_or_default();
    assert!(n > 0 && rt > 0, "the open asked the cluster: {read:?}");

    // The totals agree with each other.
    let all = table(&last);
    let op_rpcs: u64 = all.values().map(|v| v.1).sum();
    let total = last["total_rpcs"].as_u64().unwrap();
    let background = last["background_rpcs"].as_u64().unwrap();
    let by_kind: u64 = last["rpcs_by_kind"]
        .as_object()
        .unwrap()
        .values()
        .map(|k| k["sent"].as_u64().unwrap())
        .sum();
    eprintln!("\nRPCs by kind over the whole mount (setup included)");
    for (kind, k) in last["rpcs_by_kind"].as_object().unwrap() {
        eprintln!("  {kind:<12} {k}");
    }
    eprintln!("\nat unmount: {op_rpcs} RPCs in FUSE operations, {background} in the background, {total} in all");
    assert_eq!(by_kind, total);
    assert!(
        op_rpcs + background <= total,
        "{op_rpcs} + {background} > {total}"
    );
    assert!(total > 0 && op_rpcs > 0);
    for (op, s) in last["ops"].as_object().unwrap() {
        let (count, rpcs, rts) = all[op];
        assert!(rts <= rpcs, "{op}: {rts} round trips but {rpcs} RPCs");
        let hist: u64 = s["hist"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(hist, count, "{op}: histogram");
    }
    for k in last["rpcs_by_kind"].as_object().unwrap().values() {
        let ended: u64 = ["ok", "error", "timeout", "cancelled"]
            .iter()
            .map(|o| k[*o].as_u64().unwrap())
            .sum();
        assert!(ended <= k["sent"].as_u64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn under_leases_an_unchanged_page_is_stat_and_read_from_memory() {
    let mut env = Env::start(0).await;
    let stats = env.dir.path().join("stats.json");
    let i = env.mount_with("a", &format!("stats={},leases", stats.display()));
    let m = &env.mounts[i];
    wiki(&m.path);
    // A directory for another web host's wiki (made here: a directory both
    // hosts change within seconds is hot, and not leased for a while).
    fs::create_dir(m.p("w2")).unwrap();
    // The lease stream comes up in the background; until then every read
    // asks.
    env.wait_for_lease_streams(1);
    let before = table(&stats_after(&stats, SystemTime::now()));
    save_page(&m.path);
    let saved = table(&stats_after(&stats, SystemTime::now()));
    print("one page save, holding leases", &diff(&saved, &before));
    // The first view after the save asks (and is granted leases)...
    let view = |root: &Path| {
        let page = root.join("pages/ns/page.txt");
        assert_eq!(fs::metadata(&page).unwrap().len(), 21);
        assert_eq!(fs::read(&page).unwrap(), b"new text of the page\n");
    };
    view(&m.path);
    let cold = table(&stats_after(&stats, SystemTime::now()));
    print("first stat + read of the page", &diff(&cold, &saved));
    // ...and the next ones are answered from memory.
    for _ in 0..5 {
        view(&m.path);
    }
    let warm = table(&stats_after(&stats, SystemTime::now()));
    let warm_diff = diff(&warm, &cold);
    print("five more stats + reads of the unchanged page", &warm_diff);
    assert_eq!(
        totals(&warm_diff).2,
        0,
        "an unchanged page costs no round trip: {warm_diff:?}"
    );

    // Another web host saves a page of its wiki that this one has viewed:
    // the next view here asks once — the page, with what an open of it
    // needs; its directory's new attributes and names were pushed here
    // after the change (a refresh) — the rest is still leased.
    let j = env.mount_with("b", "leases");
    env.wait_for_lease_streams(2);
    let (here, there) = (env.mounts[i].p("w2"), env.mounts[j].p("w2"));
    wiki(&there);
    save_page(&there);
    view(&here);
    save_page(&there);
    let before = table(&stats_after(&stats, SystemTime::now()));
    view(&here);
    let after = table(&stats_after(&stats, SystemTime::now()));
    let changed = diff(&after, &before);
    print("stat + read of the page another mount saved", &changed);
    assert!(
        totals(&changed).2 <= 1,
        "a page changed elsewhere costs at most one round trip: {changed:?}"
    );
}

/// Files created one after another in a directory this mount has listed:
/// the name each create looks up first is answered from the listing, which
/// the writer's own creates keep up to date, so each file costs only its
/// two commits (the create, and its bytes at close); the listing shows them
/// all, and the other mount sees them too.
#[tokio::test(flavor = "multi_thread")]
async fn files_created_in_a_listed_directory_cost_only_their_commits() {
    let (env, stats, i, j) = two_leased_mounts().await;
    let dir = env.mounts[i].p("uploads");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("first"), b"1").unwrap();
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    const FILES: u64 = 20;
    creates_cost_only_their_commits(
        &dir,
        FILES,
        &stats,
        "20 files created in a listed directory",
    );
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..FILES).map(|n| format!("f{n}")).collect();
    want.push("first".into());
    want.sort();
    assert_eq!(names, want, "the listing here");
    let mut there: Vec<String> = fs::read_dir(env.mounts[j].p("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    there.sort();
    assert_eq!(there, want, "the listing on the other mount");
    // Removed again, one by one: the listing follows.
    for n in 0..FILES {
        fs::remove_file(dir.join(format!("f{n}"))).unwrap();
    }
    let left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec!["first".to_string()]);
}

/// A web host's mount that restarts (a new process: a new lease holder)
/// goes on changing what the old process changed a moment before. That is
/// not an object two web hosts bounce between them, so it is leased at
/// once: files created in the directory cost their commits and nothing
/// else (before, the directory counted as hot for 5 s, and every create
/// looked its name up on the leader first).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_mount_leases_at_once_what_its_predecessor_just_changed() {
    let mut env = Env::start(0).await;
    let old = env.mount_with("a", "leases");
    env.wait_for_lease_streams(1);
    let dir = env.mounts[old].p("uploads");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("first"), b"1").unwrap();
    env.mounts[old].unmount();
    env.wait_for_lease_streams_to_close();
    let stats = env.dir.path().join("stats.json");
    let i = env.mount_with("a", &format!("stats={},leases", stats.display()));
    env.wait_for_lease_streams(1);
    let dir = env.mounts[i].p("uploads");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    const FILES: u64 = 20;
    creates_cost_only_their_commits(&dir, FILES, &stats, "20 files created by a restarted mount");
    assert_eq!(fs::read_dir(&dir).unwrap().count() as u64, FILES + 1);
}

/// A web host that starts cold reads a namespace's pages one after another:
/// its first lookup there reads the directory ahead (names, attributes and
/// each page's extents with its bytes), so the pages cost one round trip in
/// all; and a page another mount changes afterwards is read anew.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_mount_reads_a_directory_of_pages_in_one_round_trip() {
    let mut env = Env::start(0).await;
    let a = env.mount_with("a", "leases");
    const PAGES: usize = 40;
    let page = |n: usize, v: u8| vec![b'a' + (n % 26) as u8 + v; 4096 + n];
    fs::create_dir(env.mounts[a].p("ns")).unwrap();
    for n in 0..PAGES {
        fs::write(env.mounts[a].p(&format!("ns/p{n:02}")), page(n, 0)).unwrap();
    }
    let stats = env.dir.path().join("stats-b.json");
    let b = env.mount_with("b", &format!("stats={},leases", stats.display()));
    env.wait_for_lease_streams(2);
    let before = table(&stats_after(&stats, SystemTime::now()));
    let ns = env.mounts[b].p("ns");
    for n in 0..PAGES {
        let mut got = Vec::new();
        fs::File::open(ns.join(format!("p{n:02}")))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, page(n, 0), "page {n}");
    }
    let after = table(&stats_after(&stats, SystemTime::now()));
    let cold = diff(&after, &before);
    print("40 pages read by a cold mount", &cold);
    assert!(
        totals(&cold).2 <= 3,
        "the directory ({PAGES} pages) is read ahead at once: {cold:?}"
    );
    // Changed on A: B reads the new bytes (the read-ahead leased them).
    fs::write(env.mounts[a].p("ns/p07"), page(7, 1)).unwrap();
    assert_eq!(fs::read(ns.join("p07")).unwrap(), page(7, 1));
    assert_eq!(fs::read(ns.join("p08")).unwrap(), page(8, 0));
}

/// A file this mount just wrote is read back from memory: the close's
/// commit came back with what an open needs (its extents and bytes), so
/// reading it again asks nothing — DokuWiki reads the metadata and cache
/// files it has just written.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_just_written_here_is_opened_again_from_memory() {
    let mut env = Env::start(0).await;
    let stats = env.dir.path().join("stats.json");
    let i = env.mount_with("a", &format!("stats={},leases", stats.display()));
    env.wait_for_lease_streams(1);
    let dir = env.mounts[i].p("meta");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("page.meta"), b"first").unwrap();
    let before = table(&stats_after(&stats, SystemTime::now()));
    for n in 0..10 {
        let text = format!("metadata, version {n}");
        fs::write(dir.join("page.meta"), &text).unwrap();
        assert_eq!(fs::read_to_string(dir.join("page.meta")).unwrap(), text);
    }
    let after = table(&stats_after(&stats, SystemTime::now()));
    let d = diff(&after, &before);
    print("ten rewrites, each read back at once", &d);
    let reads = read_trips(&d);
    assert_eq!(
        reads, 0,
        "reading back what was just written asks nothing: {d:?}"
    );
    assert!(totals(&d).2 <= 10, "one commit per rewrite: {d:?}");

    // Written to a temp file and renamed into place (DokuWiki's indexer):
    // the rename leaves the bytes alone, so the next open still asks
    // nothing.
    let before = table(&stats_after(&stats, SystemTime::now()));
    for n in 0..10 {
        let text = format!("index, version {n}");
        fs::write(dir.join("page.idx.tmp"), &text).unwrap();
        fs::rename(dir.join("page.idx.tmp"), dir.join("page.idx")).unwrap();
        assert_eq!(fs::read_to_string(dir.join("page.idx")).unwrap(), text);
    }
    let after = table(&stats_after(&stats, SystemTime::now()));
    let d = diff(&after, &before);
    print(
        "ten temp files renamed into place, each read back at once",
        &d,
    );
    let reads = read_trips(&d);
    assert_eq!(
        reads, 0,
        "reading back what was renamed asks nothing: {d:?}"
    );
}

/// With `writebehind`, a directory this mount changes is delegated to it
/// alone: a lock directory made and removed again (DokuWiki's `io_lock`)
/// costs no round trip. Another mount sees a lock held there at once (the
/// leader recalls the directory first) and can take it once it is dropped;
/// one made and kept reaches the tracker without anyone asking.
#[tokio::test(flavor = "multi_thread")]
async fn with_writebehind_a_lock_directory_costs_no_round_trip() {
    let mut env = Env::start(0).await;
    let stats = env.dir.path().join("stats.json");
    let i = env.mount_with("a", &format!("stats={},writebehind", stats.display()));
    let j = env.mount_with("b", "");
    env.wait_for_lease_streams(2);
    let locks = env.mounts[i].p("locks");
    fs::create_dir(&locks).unwrap();
    // The first pair goes to the tracker and brings the delegation.
    fs::create_dir(locks.join("page.lock")).unwrap();
    fs::remove_dir(locks.join("page.lock")).unwrap();
    let before = table(&stats_after(&stats, SystemTime::now()));
    const PAIRS: u64 = 20;
    for _ in 0..PAIRS {
        fs::create_dir(locks.join("page.lock")).unwrap();
        assert!(locks.join("page.lock").is_dir());
        fs::remove_dir(locks.join("page.lock")).unwrap();
    }
    let after = table(&stats_after(&stats, SystemTime::now()));
    let pairs = diff(&after, &before);
    print("20 lock directories made and removed", &pairs);
    assert_eq!(totals(&pairs).2, 0, "no round trip: {pairs:?}");

    // Held here: the other mount cannot take it.
    fs::create_dir(locks.join("held")).unwrap();
    let there = env.mounts[j].p("locks").join("held");
    assert_eq!(
        fs::create_dir(&there).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    assert!(there.is_dir());
    fs::remove_dir(locks.join("held")).unwrap();
    fs::create_dir(&there).unwrap();
    assert_eq!(
        fs::create_dir(locks.join("held")).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    fs::remove_dir(&there).unwrap();

    // Made here alone and kept: flushed by itself within the write-behind
    // interval (1 s), nobody asking (a read from the other mount would
    // recall it, which flushes it too: watch this mount's own changes).
    let own = env.mounts[i].p("own");
    fs::create_dir(&own).unwrap();
    fs::create_dir(own.join("first")).unwrap();
    let sent = |v: &Value| {
        v["rpcs_by_kind"]["meta_mutate"]["sent"]
            .as_u64()
            .expect("sent")
    };
    let before = sent(&stats_after(&stats, SystemTime::now()));
    fs::create_dir(own.join("kept")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while sent(&stats_after(&stats, SystemTime::now())) == before {
        assert!(
            Instant::now() < deadline,
            "a directory made here alone was never flushed"
        );
    }
    assert!(env.mounts[j].p("own").join("kept").is_dir());
    assert!(own.join("kept").is_dir());

    // A page saved the wiki way: the temp file is made here alone and
    // created with its bytes at its fsync, the rename and the lock pair are
    // made here alone, so only the fsync and the log's close wait for the
    // cluster.
    let root = env.mounts[i].p("wiki");
    fs::create_dir(&root).unwrap();
    wiki(&root);
    // A change log of a wiki that has run a while: longer than a writer's
    // read-back brings back, so only its attributes are cached here (an
    // append's open needs no more).
    fs::write(root.join("meta/changes"), vec![b'l'; 100 << 10]).unwrap();
    save_page(&root);
    save_page(&root);
    let before = table(&stats_after(&stats, SystemTime::now()));
    save_page(&root);
    let after = table(&stats_after(&stats, SystemTime::now()));
    let saved = diff(&after, &before);
    print("a page saved with writebehind", &saved);
    assert_eq!(totals(&saved).2, 2, "{saved:?}");
    assert_eq!(saved.get("create").map(|r| r.2), Some(0), "{saved:?}");
    assert_eq!(saved.get("rename").map(|r| r.2), Some(0), "{saved:?}");
    assert_eq!(saved.get("mkdir").map(|r| r.2), Some(0), "{saved:?}");
    assert_eq!(saved.get("rmdir").map(|r| r.2), Some(0), "{saved:?}");
    let page = env.mounts[j].p("wiki/pages/ns/page.txt");
    assert_eq!(fs::read(&page).unwrap(), b"new text of the page\n");
    let pages: Vec<_> = fs::read_dir(env.mounts[j].p("wiki/pages/ns"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        pages,
        vec![std::ffi::OsString::from("page.txt")],
        "no temp file left"
    );

    // Files removed here alone: no round trip each, and the other mount
    // finds them gone.
    let files = env.mounts[i].p("files");
    fs::create_dir(&files).unwrap();
    const FILES: u64 = 20;
    for n in 0..=FILES {
        fs::write(files.join(format!("f{n}")), b"x").unwrap();
    }
    fs::remove_file(files.join(format!("f{FILES}"))).unwrap();
    let before = table(&stats_after(&stats, SystemTime::now()));
    for n in 0..FILES {
        fs::remove_file(files.join(format!("f{n}"))).unwrap();
        assert!(!files.join(format!("f{n}")).exists());
    }
    let after = table(&stats_after(&stats, SystemTime::now()));
    let removed = diff(&after, &before);
    print("20 files removed with writebehind", &removed);
    assert_eq!(removed.get("unlink").map(|r| r.2), Some(0), "{removed:?}");
    assert_eq!(fs::read_dir(env.mounts[j].p("files")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(&files).unwrap().count(), 0);
}

/// A directory two web hosts change within seconds is hot: the leader
/// refuses to lease it for a while, and says so in its metrics
/// (`failsafe_lease_grants_refused_total{why="hot"}`), so an operator can
/// tell why a mount keeps asking.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_lease_is_counted_by_why() {
    let mut env = Env::start(0).await;
    let a = env.mount_with("a", "leases");
    let b = env.mount_with("b", "leases");
    env.wait_for_lease_streams(2);
    let hot =
        |env: &Env| env.metric_sum_labelled("failsafe_lease_grants_refused_total", "why=\"hot\"");
    let before = hot(&env);
    fs::create_dir(env.mounts[a].p("shared")).unwrap();
    fs::write(env.mounts[a].p("shared/from-a"), b"a").unwrap();
    fs::write(env.mounts[b].p("shared/from-b"), b"b").unwrap();
    // Looked up on A: the leader answers, and leases nothing.
    assert!(!env.mounts[a].p("shared/nothing").exists());
    assert!(env.mounts[a].p("shared/from-b").exists());
    assert!(
        hot(&env) > before,
        "a lookup in a hot directory is counted as refused for being hot"
    );
}

/// A leader that does not hear from a quorum for a moment (both followers
/// frozen for less than an election timeout: a busy machine looks the same)
/// keeps its mounts' lease streams: a renewal that arrives then goes
/// unanswered, and the mount's leases run on by its own clock. Before, the
/// leader closed the stream, and the mount started over with nothing
/// cached: every name of a large directory it was writing in was asked of
/// the leader again (the benchmark's create row).
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_without_a_quorum_for_a_moment_keeps_the_lease_streams() {
    // Slow elections, so that the followers can be frozen well past the
    // leader's read lease (half the shortest election timeout) and still
    // not start an election when they wake.
    let mut env = Env::start_with(
        0,
        &["--election-min-ms", "2000", "--election-max-ms", "4000"],
    )
    .await;
    let stats = env.dir.path().join("stats.json");
    let i = env.mount_with("a", &format!("stats={},leases", stats.display()));
    env.wait_for_lease_streams(1);
    let dir = env.mounts[i].p("many");
    fs::create_dir(&dir).unwrap();
    for n in 0..50 {
        fs::write(dir.join(format!("f{n}")), b"x").unwrap();
    }
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 50);
    let streams = || {
        stats_after(&stats, SystemTime::now())["lease_streams"]
            .as_u64()
            .expect("lease_streams in the stats")
    };
    let before = streams();
    let leader = env.leader().await;
    let followers: Vec<usize> = (0..3).filter(|&h| h != leader).collect();
    // A renewal comes every third of a lease (about 0.94 s of 2.83 s
    // here); each freeze leaves the leader 0.5 s past its read lease (1 s),
    // so about every other freeze catches one. Between two answered
    // renewals there are then at most 2.4 s, well inside the lease, and a
    // follower wakes 1.6 s at most after the last heartbeat it had, well
    // before its election timeout (2 s at least).
    let unanswered = "failsafe_lease_renewals_unanswered_total";
    let mut freezes = 0;
    while env.metric_sum(unanswered) < 1 && freezes < 12 {
        for &f in &followers {
            env.cluster.freeze(f);
        }
        std::thread::sleep(Duration::from_millis(1500));
        for &f in &followers {
            env.cluster.thaw(f);
        }
        std::thread::sleep(Duration::from_millis(700));
        freezes += 1;
    }
    assert!(
        env.metric_sum(unanswered) >= 1,
        "renewals came while the leader lacked its quorum ({freezes} freezes)"
    );
    assert_eq!(env.leader().await, leader, "the leader stayed");
    assert_eq!(streams(), before, "the mount's lease stream stayed up");
    // And what it caches was kept or read again: the directory lists whole.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 50);
}

/// After its lease stream is lost (here the leader is killed), a mount asks
/// the next leader about what it had cached in one request, and keeps what
/// did not change: its next look at an unchanged name costs no round trip,
/// while a file another mount changed meanwhile reads new and a name made
/// meanwhile is found.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_lost_lease_stream_the_mount_revalidates_what_it_held_in_bulk() {
    let (mut env, stats, a, b) = two_leased_mounts().await;
    let kept = env.mounts[a].p("kept");
    fs::create_dir(&kept).unwrap();
    let files: Vec<_> = (0..20).map(|n| kept.join(format!("f{n}"))).collect();
    for f in &files {
        fs::write(f, b"x").unwrap();
    }
    fs::create_dir(env.mounts[a].p("changed")).unwrap();
    fs::write(env.mounts[a].p("changed/page"), b"old").unwrap();
    for f in &files {
        assert_eq!(fs::metadata(f).unwrap().len(), 1);
    }
    assert_eq!(fs::read(env.mounts[a].p("changed/page")).unwrap(), b"old");
    let counter = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    let before = stats_after(&stats, SystemTime::now());

    let leader = env.leader().await;
    env.cluster.kill(leader);
    // Through the next leader, the other mount changes what A had cached.
    fs::write(env.mounts[b].p("changed/page"), b"new").unwrap();
    fs::write(env.mounts[b].p("changed/made"), b"made").unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let v = stats_after(&stats, SystemTime::now());
        if counter(&v, "lease_streams") > counter(&before, "lease_streams")
            && counter(&v, "lease_revalidated") >= files.len() as u64
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no revalidation after the new lease stream: {v}"
        );
    };
    for f in &files {
        assert_eq!(fs::metadata(f).unwrap().len(), 1);
    }
    let looked = diff(
        &table(&stats_after(&stats, SystemTime::now())),
        &table(&after),
    );
    print("stat of 20 unchanged files after the revalidation", &looked);
    let trips: u64 = looked.values().map(|t| t.2).sum();
    assert_eq!(trips, 0, "{looked:?}");
    assert_eq!(fs::read(env.mounts[a].p("changed/page")).unwrap(), b"new");
    assert_eq!(fs::read(env.mounts[a].p("changed/made")).unwrap(), b"made");
}
