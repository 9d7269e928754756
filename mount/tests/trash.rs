//! The trash and snapshots, through real mounts of a real cluster and
//! `fsctl`: an `rm -rf` put back byte for byte, a page replaced by a save
//! kept, retention running out, a snapshot taken under load read back
//! whole through `.snapshots/` across a leader kill, and garbage
//! collection taking back what only a deleted snapshot held.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Env;
use failsafe_harness::local::sibling_binary;

/// Runs fsctl as the cluster's admin.
fn run_fsctl(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(sibling_binary("fsctl").expect("the fsctl binary"))
        .args(env.cluster.fsctl_flags())
        .arg("--cluster")
        .arg(env.cluster.addrs().join(","))
        .args(args)
        .output()
        .expect("run fsctl")
}

/// fsctl's stdout, or the test fails with what it said.
fn fsctl(env: &Env, args: &[&str]) -> String {
    let out = run_fsctl(env, args);
    assert!(
        out.status.success(),
        "fsctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `fsctl trash list --json` says the trash holds: (path, size).
fn trash_items(env: &Env, path: &str) -> Vec<(String, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&fsctl(env, &["trash", "list", path, "--json"])).expect("json");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["path"].as_str().expect("path").to_string(),
                i["size"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Every file beneath `dir`, by path relative to it, with its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("beneath").to_path_buf();
                out.insert(rel, fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Some bytes that differ by `seed`, `len` long.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Polls `what` every 200 ms for up to 60 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Blocks the tracker knows (`fsctl status --json`, whatever its exit
/// status: 1 while the cluster limps).
fn blocks_known(env: &Env) -> u64 {
    let out = run_fsctl(env, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["blocks"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn t90_rm_rf_of_the_pages_then_trash_restore_brings_every_page_back_byte_identical() {
    let env = Env::start(2).await;
    let pages = env.mounts[0].p("wiki/data/pages");
    for (i, dir) in ["", "ns", "ns/deeper", "other"].iter().enumerate() {
        let d = pages.join(dir);
        fs::create_dir_all(&d).unwrap();
        for j in 0..6u64 {
            // Pages of a few bytes up to 300 KB: inline and in blocks.
            let len = [12, 700, 5_000, 40_000, 300_000, 0][j as usize];
            fs::write(
                d.join(format!("page{j}.txt")),
                bytes(i as u64 * 10 + j, len),
            )
            .unwrap();
        }
    }
    let locks = env.mounts[0].p("wiki/data/locks");
    fs::create_dir_all(&locks).unwrap();
    fs::write(locks.join("start.lock"), b"web1").unwrap();
    let before = tree(&pages);
    assert_eq!(before.len(), 24);

    fs::remove_dir_all(&pages).unwrap();
    fs::remove_file(locks.join("start.lock")).unwrap();
    assert!(!pages.exists());
    let held = trash_items(&env, "/wiki");
    assert_eq!(
        held.iter().filter(|(p, _)| p.ends_with(".txt")).count(),
        24,
        "{held:?}"
    );
    assert!(
        !held.iter().any(|(p, _)| p.contains("/locks/")),
        "a lock file is in the trash: {held:?}"
    );
    let status = fsctl(&env, &["status"]);
    assert!(status.contains("trash 28 item(s)"), "{status}");

    // Named by its path on this machine's mount, as a sysadmin would.
    let out = fsctl(&env, &["trash", "restore", pages.to_str().unwrap()]);
    assert!(out.contains("restored 28 item(s)"), "{out}");
    assert_eq!(tree(&pages), before, "restored through the same mount");
    let other = env.mounts[1].p("wiki/data/pages");
    assert_eq!(tree(&other), before, "and seen by the other mount");
    assert!(trash_items(&env, "/wiki/data/pages").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn t91_a_page_replaced_by_rename_is_in_the_trash() {
    let env = Env::start(1).await;
    let page = env.mounts[0].p("start.txt");
    let (v1, v2) = (b"version one\n".to_vec(), bytes(7, 100_000));
    fs::write(&page, &v1).unwrap();
    // A wiki's save: the new version written aside, renamed over the page.
    let tmp = env.mounts[0].p(".start.txt.tmp");
    fs::write(&tmp, &v2).unwrap();
    fs::rename(&tmp, &page).unwrap();
    assert_eq!(trash_items(&env, "/start.txt"), [("/start.txt".into(), 12)]);
    fsctl(
        &env,
        &["trash", "restore", "/start.txt", "--to", "/start.old.txt"],
    );
    assert_eq!(fs::read(env.mounts[0].p("start.old.txt")).unwrap(), v1);
    assert_eq!(fs::read(&page).unwrap(), v2);
    // Purged, it is gone from the list.
    fs::remove_file(env.mounts[0].p("start.old.txt")).unwrap();
    fsctl(&env, &["trash", "purge", "--all"]);
    assert!(trash_items(&env, "").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn t92_retention_expiry_empties_the_trash_and_gc_takes_its_blocks() {
    let env = Env::start_with(1, &["--gc-grace-ms=2000"]).await;
    let out = fsctl(&env, &["trash", "policy", "--retention", "3s"]);
    assert!(out.contains("kept for 3s"), "{out}");
    let dir = env.mounts[0].p("d");
    fs::create_dir(&dir).unwrap();
    for i in 0..4 {
        fs::write(dir.join(format!("f{i}")), bytes(i, 200_000)).unwrap();
    }
    // The blockifier and the writes settle: every file's block is known.
    eventually("the blocks are recorded", || blocks_known(&env) >= 4).await;
    let known = blocks_known(&env);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(trash_items(&env, "/d").len(), 5);
    eventually("the trash empties", || trash_items(&env, "").is_empty()).await;
    eventually("its blocks are collected", || {
        blocks_known(&env) <= known - 4
    })
    .await;
}

/// A writer that saves `files` pages again and again, wiki-style (written
/// aside, renamed over), each page whole at one version ("p{i} v{n}"
/// repeated), then records in `last` the version every page has reached.
fn writer(root: PathBuf, files: usize, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        for i in 0..files {
            let line = format!("p{i} v{n}\n");
            let body = line.repeat(if i % 2 == 0 { 40 } else { 4_000 });
            let tmp = root.join(format!(".p{i}.tmp"));
            fs::write(&tmp, body).unwrap();
            fs::rename(&tmp, root.join(format!("p{i}"))).unwrap();
        }
        let tmp = root.join(".last.tmp");
        fs::write(&tmp, n.to_string()).unwrap();
        fs::rename(&tmp, root.join("last")).unwrap();
    }
}

/// Checks a writer's directory as a snapshot shows it: every page whole at
/// one version, and at least at the version `last` says. Returns the tree.
fn check_consistent(dir: &Path, files: usize) -> BTreeMap<PathBuf, Vec<u8>> {
    let t = tree(dir);
    let last: u64 = String::from_utf8_lossy(&t[Path::new("last")])
        .parse()
        .expect("last");
    for i in 0..files {
        let body = String::from_utf8(t[&PathBuf::from(format!("p{i}"))].clone()).unwrap();
        let first = body.lines().next().expect("a line").to_string();
        assert!(
            body.lines().all(|l| l == first),
            "p{i} in the snapshot mixes versions"
        );
        let v: u64 = first.rsplit('v').next().unwrap().parse().unwrap();
        assert!(v >= last, "p{i} is at v{v}, before last = {last}");
    }
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn t93_a_snapshot_taken_under_writes_is_consistent_and_survives_a_leader_kill() {
    let mut env = Env::start(2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let root = env.mounts[w].p(&format!("w{w}"));
        fs::create_dir(&root).unwrap();
        let s = stop.clone();
        writers.push(std::thread::spawn(move || writer(root, 6, s)));
    }
    eventually("both writers saved a round", || {
        (0..2).all(|w| env.mounts[0].p(&format!("w{w}/last")).exists())
    })
    .await;
    let out = fsctl(&env, &["snapshot", "create", "mid-load"]);
    assert!(out.contains("snapshot mid-load of /"), "{out}");
    // Read on the other mount from the one each writer uses.
    let view = |m: usize, w: usize| env.mounts[m].p(&format!(".snapshots/mid-load/w{w}"));
    let seen: Vec<_> = (0..2)
        .map(|w| check_consistent(&view(1 - w, w), 6))
        .collect();
    // The snapshot is read-only.
    let e = fs::write(view(0, 0).join("p0"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Hidden from the root's listing, as ZFS's .zfs.
    let names: Vec<_> = fs::read_dir(env.mounts[0].p(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!names.iter().any(|n| n == ".snapshots"), "{names:?}");

    let leader = env.leader().await;
    env.cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let list = fsctl(&env, &["snapshot", "list"]);
    assert!(list.contains("mid-load"), "{list}");
    for (w, before) in seen.iter().enumerate() {
        // Through a fresh lookup on the mount that wrote it, after the
        // kill: the same bytes.
        assert_eq!(&tree(&view(w, w)), before, "w{w} changed in the snapshot");
    }
    // Restoring a page is `cp`.
    let cp = Command::new("cp")
        .arg(view(0, 0).join("p1"))
        .arg(env.mounts[0].p("restored-p1"))
        .status()
        .unwrap();
    assert!(cp.success());
    assert_eq!(
        fs::read(env.mounts[0].p("restored-p1")).unwrap(),
        seen[0][Path::new("p1")]
    );
    env.cluster.restart(leader, true).unwrap();
    env.expected_errors.push("Connection refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn t94_deleting_a_snapshot_lets_gc_take_back_what_only_it_held() {
    let mut env = Env::start_with(1, &["--gc-grace-ms=2000"]).await;
    fsctl(&env, &["trash", "policy", "--retention", "0"]);
    fs::create_dir(env.mounts[0].p("wiki")).unwrap();
    let f = env.mounts[0].p("wiki/big.bin");
    let body = bytes(42, 3 << 20);
    fs::write(&f, &body).unwrap();
    // A web host that mounts the wiki's subtree.
    let sub = env.mount_of("b", "/wiki", "", &[]);
    eventually("the file's blocks are recorded", || blocks_known(&env) >= 1).await;
    let known = blocks_known(&env);
    fsctl(&env, &["snapshot", "create", "keep"]);
    fs::remove_file(&f).unwrap();
    // Well past the grace period, the snapshot still holds the bytes; the
    // subtree's mount reads it as its own paths.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(blocks_known(&env), known);
    assert_eq!(
        fs::read(env.mounts[0].p(".snapshots/keep/wiki/big.bin")).unwrap(),
        body
    );
    assert_eq!(
        fs::read(env.mounts[sub].p(".snapshots/keep/big.bin")).unwrap(),
        body
    );
    let out = fsctl(&env, &["snapshot", "delete", "keep"]);
    assert!(out.contains("deleted snapshot keep"), "{out}");
    eventually("the blocks only the snapshot held are collected", || {
        blocks_known(&env) < known
    })
    .await;
    assert!(!env.mounts[0].p(".snapshots/keep").exists());
}
