//! Leadership follows the writers (issue 11), on real fsd processes and a
//! real FUSE mount: the tracker leader moves to the host in the zone whose
//! mount does the writing, stays there, and no operation fails meanwhile.
//! Windows are shortened by fsd's flags; the decision itself (and that two
//! zones writing about equally move nothing) is unit-tested in
//! `failsafe_core::leadership`.

mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Env;

/// Short windows, so a test sees a hand-over within seconds. The tenure
/// (the least time between two hand-overs) is shorter than the time the
/// test watches the new leader, so a second move would show.
const FLAGS: &[&str] = &[
    "--leader-window-ms",
    "3000",
    "--leader-min-writes",
    "30",
    "--leader-min-tenure-ms",
    "4000",
];

#[derive(Default)]
struct Record {
    saves: u64,
    failures: Vec<String>,
    longest: Duration,
}

/// Saves small pages the way a wiki does (temp file, fsync, rename) until
/// told to stop, recording failures and the slowest save.
fn writer(root: PathBuf, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let page = format!("page-{}", seq % 8);
        let tmp = root.join(format!(".{page}.tmp"));
        let started = Instant::now();
        let saved = (|| -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(format!("revision {seq}\n").as_bytes())?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, root.join(&page))
        })();
        let took = started.elapsed();
        let mut r = rec.lock().unwrap();
        r.saves += 1;
        r.longest = r.longest.max(took);
        if let Err(e) = saved {
            r.failures.push(format!("save {seq} of {page}: {e}"));
        }
        drop(r);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cluster started with `FLAGS`, its first leader's status, the
/// leader's index and a follower's.
async fn start() -> (Env, failsafe_client::pb::StatusReply, usize, usize) {
    let env = Env::start_with(0, FLAGS).await;
    let first = env
        .cluster
        .wait_for(Duration::from_secs(60), "a leader", |s| s.leader_id != 0)
        .await
        .expect("leader");
    let hosts = &env.cluster.hosts;
    let leader = hosts
        .iter()
        .position(|h| h.addr == first.leader_addr)
        .expect("the leader is one of ours");
    let follower = (0..hosts.len()).find(|i| *i != leader).expect("a follower");
    (env, first, leader, follower)
}

#[tokio::test(flavor = "multi_thread")]
async fn t50_the_leader_moves_to_the_writing_city_and_stays() {
    // The writing city: that of the first host that does not lead.
    let (mut env, _, old, target) = start().await;
    let hosts = &env.cluster.hosts;
    let zone = hosts[target].zone.clone();
    let target_addr = hosts[target].addr.clone();
    let m = env.mount(&zone);
    let root = env.mounts[m].path.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Mutex::new(Record::default()));
    let thread = {
        let (stop, rec) = (stop.clone(), rec.clone());
        std::thread::spawn(move || writer(root, stop, rec))
    };
    let started = Instant::now();
    let moved = env
        .cluster
        .wait_for(
            Duration::from_secs(60),
            "the leader in the writing zone",
            |s| s.leader_addr == target_addr,
        )
        .await;
    let took = started.elapsed();
    let moved = match moved {
        Ok(s) => s,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
            panic!("{e}");
        }
    };

    // Under the same load, for longer than the tenure: no further change.
    let watch_until = Instant::now() + Duration::from_secs(10);
    let mut changed = None;
    while Instant::now() < watch_until {
        if let Ok(s) = env.cluster.client().await.expect("client").status().await {
            if s.leader_id != moved.leader_id || s.term != moved.term {
                changed = Some((s.leader_addr, s.term));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("writer");
    let rec = std::mem::take(&mut *rec.lock().unwrap());
    eprintln!(
        "leader moved after {took:?}; {} saves, the slowest took {:?}",
        rec.saves, rec.longest
    );
    assert_eq!(changed, None, "the leader moved on from {target_addr}");
    assert!(rec.failures.is_empty(), "{:#?}", rec.failures);
    assert!(rec.saves > 50, "only {} saves", rec.saves);
    assert!(
        rec.longest < Duration::from_secs(2),
        "a save took {:?} (a hand-over must pause writes well under 2 s)",
        rec.longest
    );

    // The new leader says why it stays, and shows the writing zone's share.
    let placement = moved.leader_placement.clone().unwrap_or_default();
    let s = env
        .cluster
        .client()
        .await
        .expect("client")
        .status()
        .await
        .expect("status");
    let p = s.leader_placement.expect("leader placement status");
    assert!(
        p.writes.first().is_some_and(|w| w.zone == zone),
        "{p:?} (at the move: {placement:?})"
    );
    assert_eq!(p.state, "the leader is in the zone writing most", "{p:?}");
    // The old leader logged the hand-over and its reason, once.
    let log = fs::read_to_string(env.cluster.hosts[old].log_path()).expect("log");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tracker leadership handed over"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    eprintln!("{}", lines[0]);
    assert!(
        lines[0].contains(&format!("zone {zone} did")),
        "{}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t51_two_cities_writing_alike_do_not_move_the_leader() {
    let (mut env, first, leader, other) = start().await;
    let hosts = &env.cluster.hosts;
    let zones = [hosts[leader].zone.clone(), hosts[other].zone.clone()];
    let stop = Arc::new(AtomicBool::new(false));
    let recs: Vec<Arc<Mutex<Record>>> = (0..2).map(|_| Arc::default()).collect();
    let mut threads = Vec::new();
    for (zone, rec) in zones.iter().zip(&recs) {
        let m = env.mount(zone);
        let root = env.mounts[m].path.join(zone);
        fs::create_dir_all(&root).expect("a directory per city");
        let (stop, rec) = (stop.clone(), rec.clone());
        threads.push(std::thread::spawn(move || writer(root, stop, rec)));
    }
    // Several windows, and past the tenure: time enough to move twice.
    let watch_until = Instant::now() + Duration::from_secs(15);
    let mut changed = None;
    let mut last = None;
    while Instant::now() < watch_until {
        if let Ok(s) = env.cluster.client().await.expect("client").status().await {
            if s.leader_id != first.leader_id || s.term != first.term {
                changed = Some((s.leader_addr.clone(), s.term));
                break;
            }
            last = s.leader_placement;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("writer");
    }
    let saves: Vec<u64> = recs.iter().map(|r| r.lock().unwrap().saves).collect();
    eprintln!("saves per city {saves:?}; placement at the end: {last:?}");
    assert_eq!(changed, None, "leadership moved; placement: {last:?}");
    for r in &recs {
        let r = r.lock().unwrap();
        assert!(r.failures.is_empty(), "{:#?}", r.failures);
        assert!(r.saves > 50, "only {} saves", r.saves);
    }
    let last = last.expect("placement status");
    assert!(
        last.state.contains("no clear majority") || last.state.contains("writing most"),
        "{last:?}"
    );
    assert_eq!(last.writes.len(), 2, "{last:?}");
}
