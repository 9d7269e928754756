//! Self-repair against a real three-host cluster: a host that was down
//! while blocks were written gets its copies once it is back, and a copy
//! found corrupt on read is quarantined, forgotten and rebuilt.

mod common;

use std::time::{Duration, Instant};

use common::{data, TestCluster, ROOT};
use failsafe_client::{pb, Client};

/// openraft logs a connection cut by a kill at ERROR, as a network error
/// rather than an unreachable node when the RPC was in flight.
const KILLED_MID_RPC: &str = "transport error";

/// Repair rounds often, so the tests take seconds.
const FAST_REPAIR: &[&str] = &["--repair-interval-ms=200"];

/// The status as the leader sees it, once `cond` holds.
async fn wait_status(tc: &TestCluster, timeout: Duration, what: &str, cond: impl Fn(&pb::StatusReply) -> bool) -> pb::StatusReply {
    match tc.c.wait_for(timeout, what, |s| s.role == "leader" && cond(s)).await {
        Ok(s) => s,
        Err(e) => panic!("{e}; last status: {:#?}", tc.status().await),
    }
}

/// The devices each block of file `ino` is recorded on.
async fn copies_of(c: &Client, ino: u64) -> Vec<Vec<u64>> {
    let fe = c.read_extents(ino, 0, u64::MAX / 2).await.expect("read extents");
    fe.copies.into_iter().map(|b| b.device_ids).collect()
}

/// Host `i`'s id and its one device's id.
fn ids_of(s: &pb::StatusReply, tc: &TestCluster, i: usize) -> (u64, u64) {
    let host = s.hosts.iter().find(|h| h.addr == tc.c.hosts[i].addr).expect("host in status").host_id;
    let device = s.devices.iter().find(|d| d.host_id == host).expect("device of host").device_id;
    (host, device)
}

/// One counter or gauge from host `i`'s /metrics.
fn metric(tc: &TestCluster, i: usize, name: &str) -> Option<f64> {
    let port: u16 = tc.c.hosts[i].addr.rsplit_once(':')?.1.parse().ok()?;
    let reply = common::http(port, "GET", "/metrics", "", "").ok()?;
    reply.body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = rest.rsplit_once(' ')?.1;
        (rest.starts_with(' ') || rest.starts_with('{')).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn t60_blocks_written_while_a_host_is_down_get_their_third_copy_when_it_returns() {
    let (mut tc, c) = TestCluster::start(FAST_REPAIR).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    wait_status(&tc, Duration::from_secs(10), "fail-safe with every host up", |s| {
        s.mode == "fail-safe" && s.copies == 3 && s.hosts.iter().all(|h| h.state == "up")
    })
    .await;
    let leader = tc.leader().await;
    let victim = (leader + 1) % 3;
    let (victim_id, victim_device) = ids_of(&tc.status().await, &tc, victim);
    tc.c.kill(victim);
    let s = wait_status(&tc, Duration::from_secs(10), "the killed host down", |s| {
        s.hosts.iter().any(|h| h.host_id == victim_id && h.state == "down" && !h.dead)
    })
    .await;
    assert_eq!(s.mode, "fail-safe", "nothing is written yet, so nothing is short");

    // Two blocks, each stored on the two hosts that are up.
    let body = data(5 * 1024 * 1024, 3);
    let f = c.create(ROOT, b"written-while-down", 0o644, true).await.unwrap();
    c.write(f.ino, 0, &body).await.expect("write with one host down");
    let copies = copies_of(&c, f.ino).await;
    assert_eq!(copies.len(), 2);
    assert!(copies.iter().all(|d| d.len() == 2 && !d.contains(&victim_device)), "{copies:?}");
    let s = wait_status(&tc, Duration::from_secs(5), "limp", |s| s.mode == "limp").await;
    assert_eq!((s.under_replicated, s.unavailable), (2, 0), "{s:#?}");

    tc.c.restart(victim, true).expect("restart");
    let started = Instant::now();
    let s = wait_status(&tc, Duration::from_secs(20), "fail-safe again", |s| {
        s.mode == "fail-safe" && s.under_replicated == 0 && s.hosts.iter().all(|h| h.state == "up")
    })
    .await;
    eprintln!("fail-safe {:?} after the restart", started.elapsed());
    let copies = copies_of(&c, f.ino).await;
    assert!(copies.iter().all(|d| d.len() == 3 && d.contains(&victim_device)), "{copies:?}");
    let repair = s.repair.expect("repair status");
    assert!(repair.blocks >= 2 && repair.bytes >= body.len() as u64, "{repair:?}");

    // The repaired copies are whole: read from the host that was down.
    let near = tc.client_in(&tc.c.hosts[victim].zone).await;
    assert_eq!(near.read(f.ino, 0, body.len() as u64).await.expect("read"), body);
    // The gauge follows the leader's next repair round.
    let leader = tc.leader().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&tc, leader, "failsafe_blocks_under_replicated") != Some(0.0) {
        assert!(Instant::now() < deadline, "the under-replicated gauge never reached 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&tc, leader, "failsafe_repair_bytes_total").is_some_and(|b| b >= body.len() as f64));
    tc.check_logs();
}

#[tokio::test(flavor = "multi_thread")]
async fn t61_a_corrupt_copy_is_quarantined_on_read_and_copied_again() {
    let (mut tc, c) = TestCluster::start(FAST_REPAIR).await;
    tc.expected_errors.push("corrupt block quarantined");
    let body = data(300_000, 7);
    let f = c.create(ROOT, b"bitrot", 0o644, true).await.unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    // The third copy may be recorded just after the write returns.
    let deadline = Instant::now() + Duration::from_secs(10);
    while copies_of(&c, f.ino).await[0].len() < 3 {
        assert!(Instant::now() < deadline, "three copies never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_status(&tc, Duration::from_secs(10), "fail-safe", |s| s.mode == "fail-safe").await;

    // Flip a byte of the copy on host b.
    let victim = 1;
    let (_, victim_device) = ids_of(&tc.status().await, &tc, victim);
    let hash = c.read_extents(f.ino, 0, 1).await.unwrap().extents[0].hash.clone();
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let blocks = tc.c.hosts[victim].dir.join("blocks");
    let path = blocks.join("blocks").join(&hex[0..2]).join(&hex[2..4]).join(&hex);
    let mut bytes = std::fs::read(&path).expect("the block file on host b");
    bytes[1234] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    // A reader in zone b asks host b first, gets a refusal, and is served
    // by another copy.
    let near = tc.client_in("b").await;
    assert_eq!(near.read(f.ino, 0, body.len() as u64).await.expect("read around the bad copy"), body);
    assert!(blocks.join("quarantine").join(&hex).exists(), "the bad copy is quarantined");

    // The bad copy's record goes, repair puts a good one back on host b.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let back = std::fs::read(&path).is_ok_and(|b| b == body);
        let recorded = copies_of(&c, f.ino).await[0].contains(&victim_device);
        let s = tc.status().await;
        if back && recorded && s.mode == "fail-safe" && s.repair.as_ref().is_some_and(|r| r.blocks >= 1) {
            break;
        }
        assert!(Instant::now() < deadline, "not repaired: file back {back}, recorded {recorded}, status {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&tc, victim, "failsafe_block_corrupt_total"), Some(1.0));
    assert_eq!(metric(&tc, victim, "failsafe_copies_dropped_total"), Some(1.0));
    assert_eq!(near.read(f.ino, 0, body.len() as u64).await.unwrap(), body);
    tc.check_logs();
}

#[tokio::test(flavor = "multi_thread")]
async fn t62_a_host_down_past_dead_after_has_its_copies_rebuilt_elsewhere() {
    let (mut tc, c) =
        TestCluster::start_zones(&["a", "b", "c", "d"], &["--repair-interval-ms=200", "--dead-after-ms=3000"]).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    let body = data(200_000, 9);
    let f = c.create(ROOT, b"outlives-a-host", 0o644, true).await.unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while copies_of(&c, f.ino).await[0].len() < 3 {
        assert!(Instant::now() < deadline, "three copies never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = wait_status(&tc, Duration::from_secs(10), "fail-safe", |s| s.mode == "fail-safe").await;
    let holders = copies_of(&c, f.ino).await.remove(0);
    assert_eq!(holders.len(), 3);
    // Repair may already have recorded a third copy the write left in flight.
    let base = s.repair.as_ref().map_or(0, |r| r.blocks);
    let leader = tc.leader().await;
    let victim = (0..4)
        .find(|&i| i != leader && holders.contains(&ids_of(&s, &tc, i).1))
        .expect("a follower holding a copy");
    let (victim_id, victim_device) = ids_of(&s, &tc, victim);
    tc.c.kill(victim);

    // Down, not dead: limp, and nothing is copied yet.
    let s = wait_status(&tc, Duration::from_secs(10), "limp with the host down", |s| {
        s.mode == "limp" && s.hosts.iter().any(|h| h.host_id == victim_id && h.state == "down" && !h.dead)
    })
    .await;
    assert_eq!((s.under_replicated, s.unavailable), (1, 0));
    assert_eq!(s.repair.as_ref().map(|r| r.blocks), Some(base), "no copies while the host may come back");

    // Dead: its copy stops counting and is rebuilt on the fourth host.
    let s = wait_status(&tc, Duration::from_secs(15), "fail-safe without the dead host", |s| {
        s.mode == "fail-safe" && s.hosts.iter().any(|h| h.host_id == victim_id && h.dead)
    })
    .await;
    assert_eq!(s.repair.as_ref().map(|r| r.blocks), Some(base + 1));
    let now = copies_of(&c, f.ino).await.remove(0);
    assert_eq!(now.len(), 4, "the dead host's record stays; a new copy joins it: {now:?}");
    assert!(now.contains(&victim_device));
    assert_eq!(c.read(f.ino, 0, body.len() as u64).await.unwrap(), body);
    tc.check_logs();
}
