//! Self-repair against real clusters: a host that was down while blocks
//! were written gets its copies once it is back; a copy found corrupt on
//! read, or by the scrub where nobody reads it, is quarantined, forgotten
//! and rebuilt; a replaced disk's blocks are rebuilt at once; copies beyond
//! the copy count are trimmed; blocks nothing references any more are
//! garbage-collected after the grace period.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{data, TestCluster, ROOT};
use failsafe_client::{pb, Client};

/// openraft logs a connection cut by a kill at ERROR, as a network error
/// rather than an unreachable node when the RPC was in flight.
const KILLED_MID_RPC: &str = "transport error";

/// How long a wait for a condition may take before the test fails. Every
/// wait returns as soon as its condition holds, so this costs nothing when
/// things work; it is generous because CI runs these tests two at a time on
/// a slow 2-core machine, where a cluster's round trips take many times
/// longer than here.
const PATIENCE: Duration = Duration::from_secs(90);

/// Repair rounds often, so the tests take seconds.
const FAST_REPAIR: &[&str] = &["--repair-interval-ms=200"];

/// The status as the leader sees it, once `cond` holds.
async fn wait_status(
    tc: &TestCluster,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&pb::StatusReply) -> bool,
) -> pb::StatusReply {
    match tc
        .c
        .wait_for(timeout, what, |s| s.role == "leader" && cond(s))
        .await
    {
        Ok(s) => s,
        Err(e) => panic!("{e}; last status: {:#?}", tc.status().await),
    }
}

/// The devices each block of file `ino` is recorded on.
async fn copies_of(c: &Client, ino: u64) -> Vec<Vec<u64>> {
    let fe = c
        .read_extents(ino, 0, u64::MAX / 2)
        .await
        .expect("read extents");
    fe.copies.into_iter().map(|b| b.device_ids).collect()
}

/// Host `i`'s id and its one device's id.
fn ids_of(s: &pb::StatusReply, tc: &TestCluster, i: usize) -> (u64, u64) {
    let host = s
        .hosts
        .iter()
        .find(|h| h.addr == tc.c.hosts[i].addr)
        .expect("host in status")
        .host_id;
    let device = s
        .devices
        .iter()
        .find(|d| d.host_id == host)
        .expect("device of host")
        .device_id;
    (host, device)
}

/// One counter or gauge from host `i`'s /metrics.
fn metric(tc: &TestCluster, i: usize, name: &str) -> Option<f64> {
    let port: u16 = tc.c.hosts[i].addr.rsplit_once(':')?.1.parse().ok()?;
    let reply = common::http(port, "GET", "/metrics", "", "").ok()?;
    reply.body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = rest.rsplit_once(' ')?.1;
        (rest.starts_with(' ') || rest.starts_with('{'))
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn t60_blocks_written_while_a_host_is_down_get_their_third_copy_when_it_returns() {
    let (mut tc, c) = TestCluster::start(FAST_REPAIR).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    wait_status(&tc, PATIENCE, "fail-safe with every host up", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.copies == 3
            && s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up)
    })
    .await;
    let leader = tc.leader().await;
    let victim = (leader + 1) % 3;
    let (victim_id, victim_device) = ids_of(&tc.status().await, &tc, victim);
    tc.c.kill(victim);
    let s = wait_status(&tc, PATIENCE, "the killed host down", |s| {
        s.hosts
            .iter()
            .any(|h| h.host_id == victim_id && h.state() == pb::HostLiveness::Down && !h.dead)
    })
    .await;
    assert_eq!(
        s.mode(),
        pb::ClusterMode::FailSafe,
        "nothing is written yet, so nothing is short"
    );

    // Two blocks, each stored on the two hosts that are up.
    let body = data(5 * 1024 * 1024, 3);
    let f = c
        .create(ROOT, b"written-while-down", 0o644, true)
        .await
        .unwrap();
    c.write(f.ino, 0, &body)
        .await
        .expect("write with one host down");
    let copies = copies_of(&c, f.ino).await;
    assert_eq!(copies.len(), 2);
    assert!(
        copies
            .iter()
            .all(|d| d.len() == 2 && !d.contains(&victim_device)),
        "{copies:?}"
    );
    let s = wait_status(&tc, PATIENCE, "a block below its copy count", |s| {
        s.mode() == pb::ClusterMode::Limp
    })
    .await;
    assert_eq!((s.under_replicated, s.unavailable), (2, 0), "{s:#?}");

    tc.c.restart(victim, true).expect("restart");
    let started = Instant::now();
    let s = wait_status(&tc, PATIENCE, "fail-safe again", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.under_replicated == 0
            && s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up)
    })
    .await;
    eprintln!("fail-safe {:?} after the restart", started.elapsed());
    let copies = copies_of(&c, f.ino).await;
    assert!(
        copies
            .iter()
            .all(|d| d.len() == 3 && d.contains(&victim_device)),
        "{copies:?}"
    );
    let repair = s.repair.expect("repair status");
    assert!(
        repair.blocks >= 2 && repair.bytes >= body.len() as u64,
        "{repair:?}"
    );

    // The repaired copies are whole: read from the host that was down.
    let near = tc.client_in(&tc.c.hosts[victim].zone).await;
    assert_eq!(
        near.read(f.ino, 0, body.len() as u64).await.expect("read"),
        body
    );
    // The gauge follows the leader's next repair round.
    let leader = tc.leader().await;
    let deadline = Instant::now() + PATIENCE;
    while metric(&tc, leader, "failsafe_blocks_under_replicated") != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the under-replicated gauge never reached 0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(&tc, leader, "failsafe_repair_bytes_total").is_some_and(|b| b >= body.len() as f64)
    );
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
    let deadline = Instant::now() + PATIENCE;
    while copies_of(&c, f.ino).await[0].len() < 3 {
        assert!(Instant::now() < deadline, "three copies never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
    })
    .await;

    // Flip a byte of the copy on host b.
    let victim = 1;
    let (_, victim_device) = ids_of(&tc.status().await, &tc, victim);
    let hash = c.read_extents(f.ino, 0, 1).await.unwrap().extents[0]
        .hash
        .clone();
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let blocks = tc.c.hosts[victim].dir.join("blocks");
    let path = blocks
        .join("blocks")
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(&hex);
    let mut bytes = std::fs::read(&path).expect("the block file on host b");
    bytes[1234] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    // A reader in zone b asks host b first, gets a refusal, and is served
    // by another copy.
    let near = tc.client_in("b").await;
    assert_eq!(
        near.read(f.ino, 0, body.len() as u64)
            .await
            .expect("read around the bad copy"),
        body
    );
    assert!(
        blocks.join("quarantine").join(&hex).exists(),
        "the bad copy is quarantined"
    );

    // The bad copy's record goes, repair puts a good one back on host b.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let back = std::fs::read(&path).is_ok_and(|b| b == body);
        let recorded = copies_of(&c, f.ino).await[0].contains(&victim_device);
        let s = tc.status().await;
        if back
            && recorded
            && s.mode() == pb::ClusterMode::FailSafe
            && s.repair.as_ref().is_some_and(|r| r.blocks >= 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not repaired: file back {back}, recorded {recorded}, status {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&tc, victim, "failsafe_block_corrupt_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&tc, victim, "failsafe_copies_dropped_total"),
        Some(1.0)
    );
    assert_eq!(near.read(f.ino, 0, body.len() as u64).await.unwrap(), body);
    tc.check_logs();
}

#[tokio::test(flavor = "multi_thread")]
async fn t62_a_host_down_past_dead_after_has_its_copies_rebuilt_elsewhere() {
    let (mut tc, c) = TestCluster::start_zones(
        &["a", "b", "c", "d"],
        &["--repair-interval-ms=200", "--dead-after-ms=3000"],
    )
    .await;
    tc.expected_errors.push(KILLED_MID_RPC);
    let body = data(200_000, 9);
    let f = c
        .create(ROOT, b"outlives-a-host", 0o644, true)
        .await
        .unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while copies_of(&c, f.ino).await[0].len() < 3 {
        assert!(Instant::now() < deadline, "three copies never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
    })
    .await;
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
    let s = wait_status(&tc, PATIENCE, "limp with the host down", |s| {
        s.mode() == pb::ClusterMode::Limp
            && s.hosts
                .iter()
                .any(|h| h.host_id == victim_id && h.state() == pb::HostLiveness::Down && !h.dead)
    })
    .await;
    assert_eq!((s.under_replicated, s.unavailable), (1, 0));
    assert_eq!(
        s.repair.as_ref().map(|r| r.blocks),
        Some(base),
        "no copies while the host may come back"
    );

    // Dead: its copy stops counting and is rebuilt on the fourth host.
    let s = wait_status(&tc, PATIENCE, "fail-safe without the dead host", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.hosts.iter().any(|h| h.host_id == victim_id && h.dead)
    })
    .await;
    assert_eq!(s.repair.as_ref().map(|r| r.blocks), Some(base + 1));
    let now = copies_of(&c, f.ino).await.remove(0);
    assert_eq!(
        now.len(),
        4,
        "the dead host's record stays; a new copy joins it: {now:?}"
    );
    assert!(now.contains(&victim_device));
    assert_eq!(c.read(f.ino, 0, body.len() as u64).await.unwrap(), body);
    tc.check_logs();
}

/// Where block `hash` lives in host `i`'s one device.
fn block_file(tc: &TestCluster, i: usize, hash: &[u8]) -> PathBuf {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    tc.c.hosts[i]
        .dir
        .join("blocks")
        .join("blocks")
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(&hex)
}

/// The hosts (by index) holding a file for block `hash`.
fn hosts_with_file(tc: &TestCluster, hash: &[u8]) -> BTreeSet<usize> {
    (0..tc.c.hosts.len())
        .filter(|&i| block_file(tc, i, hash).exists())
        .collect()
}

/// A counter summed over every host's /metrics.
fn metric_sum(tc: &TestCluster, name: &str) -> f64 {
    (0..tc.c.hosts.len())
        .filter_map(|i| metric(tc, i, name))
        .sum()
}

/// Waits until every block of file `ino` has `n` recorded copies.
async fn wait_copies(c: &Client, ino: u64, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while !copies_of(c, ino).await.iter().all(|d| d.len() == n) {
        assert!(
            Instant::now() < deadline,
            "{n} copies never recorded: {:?}",
            copies_of(c, ino).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t63_a_replaced_disk_is_gone_and_its_blocks_are_rebuilt_at_once() {
    // dead_after stays at its default (10 minutes): a replaced disk's data
    // is gone for good, so nothing waits for it.
    let (mut tc, c) = TestCluster::start(FAST_REPAIR).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    let body = data(300_000, 5);
    let f = c
        .create(ROOT, b"on-a-disk-that-fails", 0o644, true)
        .await
        .unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    wait_copies(&c, f.ino, 3).await;
    wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
    })
    .await;
    let leader = tc.leader().await;
    let victim = (leader + 1) % 3;
    let (victim_id, old_device) = ids_of(&tc.status().await, &tc, victim);
    let hash = c.read_extents(f.ino, 0, 1).await.unwrap().extents[0]
        .hash
        .clone();

    // The disk is replaced: the host comes back with an empty block directory.
    tc.c.kill(victim);
    std::fs::remove_dir_all(tc.c.hosts[victim].dir.join("blocks")).expect("wipe the device");
    tc.c.restart(victim, true).expect("restart");
    let started = Instant::now();
    let s = wait_status(
        &tc,
        PATIENCE,
        "the old device gone and the block rebuilt",
        |s| {
            let gone = s
                .devices
                .iter()
                .any(|d| d.device_id == old_device && d.state() == pb::DeviceState::Gone);
            let fresh = s.devices.iter().any(|d| {
                d.host_id == victim_id
                    && d.device_id != old_device
                    && d.state() == pb::DeviceState::Ok
            });
            gone && fresh && s.mode() == pb::ClusterMode::FailSafe && s.under_replicated == 0
        },
    )
    .await;
    eprintln!(
        "fail-safe {:?} after the restart with a new disk",
        started.elapsed()
    );
    let new_device = s
        .devices
        .iter()
        .find(|d| d.host_id == victim_id && d.device_id != old_device)
        .expect("the new device")
        .device_id;
    let holders = copies_of(&c, f.ino).await.remove(0);
    assert!(
        holders.contains(&new_device) && !holders.contains(&old_device),
        "{holders:?}"
    );
    assert_eq!(
        std::fs::read(block_file(&tc, victim, &hash)).expect("the rebuilt copy"),
        body
    );
    let logs: String =
        tc.c.hosts
            .iter()
            .map(|h| std::fs::read_to_string(h.log_path()).unwrap_or_default())
            .collect();
    assert!(
        logs.contains("WARN") && logs.contains("device no longer reported by its host"),
        "no warning about the gone device"
    );
    tc.check_logs();
}

#[tokio::test(flavor = "multi_thread")]
async fn t64_scrub_finds_a_corrupt_copy_nobody_reads_and_repair_replaces_it() {
    let (mut tc, c) = TestCluster::start(&[
        "--repair-interval-ms=200",
        "--scrub-mb-per-s=256",
        "--scrub-interval-ms=300",
    ])
    .await;
    tc.expected_errors.push("corrupt block quarantined");
    let body = data(300_000, 11);
    let f = c.create(ROOT, b"rots-unread", 0o644, true).await.unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    wait_copies(&c, f.ino, 3).await;
    wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
    })
    .await;

    let victim = 1;
    let (_, victim_device) = ids_of(&tc.status().await, &tc, victim);
    let hash = c.read_extents(f.ino, 0, 1).await.unwrap().extents[0]
        .hash
        .clone();
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let path = block_file(&tc, victim, &hash);
    let mut bytes = std::fs::read(&path).expect("the block file on host b");
    bytes[777] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    // Nobody reads the file: the scrub finds the bad copy, quarantines it,
    // its record goes and repair puts a good copy back.
    let quarantine = tc.c.hosts[victim]
        .dir
        .join("blocks")
        .join("quarantine")
        .join(&hex);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let quarantined = quarantine.exists();
        let back = std::fs::read(&path).is_ok_and(|b| b == body);
        let recorded = copies_of(&c, f.ino).await[0].contains(&victim_device);
        let s = tc.status().await;
        if quarantined && back && recorded && s.mode() == pb::ClusterMode::FailSafe {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not scrubbed and repaired: quarantined {quarantined}, back {back}, recorded {recorded}, status {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&tc, victim, "failsafe_scrub_corrupt_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&tc, victim, "failsafe_block_corrupt_total"),
        Some(0.0),
        "no reader found it"
    );
    assert_eq!(
        metric(&tc, victim, "failsafe_copies_dropped_total"),
        Some(1.0)
    );
    // The next passes re-read the repaired copy, intact.
    let deadline = Instant::now() + PATIENCE;
    while !metric(&tc, victim, "failsafe_scrub_bytes_total").is_some_and(|b| b >= body.len() as f64)
    {
        assert!(
            Instant::now() < deadline,
            "the repaired copy was never scrubbed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&tc, victim, "failsafe_scrub_corrupt_total"),
        Some(1.0)
    );
    let status = tc
        .client_in("b")
        .await
        .status_of(&tc.c.hosts[victim].addr)
        .await
        .expect("host b's status");
    assert!(status
        .scrub
        .is_some_and(|s| s.corrupt == 1 && s.passes >= 1));
    let log = std::fs::read_to_string(tc.c.hosts[victim].log_path()).unwrap_or_default();
    assert!(
        log.contains("scrub pass finished"),
        "no INFO line for a finished pass"
    );
    assert_eq!(c.read(f.ino, 0, body.len() as u64).await.unwrap(), body);
    tc.check_logs();
}

#[tokio::test(flavor = "multi_thread")]
async fn t65_a_dead_host_that_returns_has_its_extra_copies_trimmed() {
    let (mut tc, c) = TestCluster::start_zones(
        &["a", "b", "c", "d"],
        &[
            "--repair-interval-ms=200",
            "--dead-after-ms=3000",
            "--gc-grace-ms=2000",
        ],
    )
    .await;
    tc.expected_errors.push(KILLED_MID_RPC);
    // Two blocks.
    let body = data(5 * 1024 * 1024, 13);
    let f = c
        .create(ROOT, b"outlives-a-host-then-slims", 0o644, true)
        .await
        .unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    wait_copies(&c, f.ino, 3).await;
    let s = wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
    })
    .await;
    let leader = tc.leader().await;
    let first = copies_of(&c, f.ino).await.remove(0);
    let victim = (0..4)
        .find(|&i| i != leader && first.contains(&ids_of(&s, &tc, i).1))
        .expect("a follower holding a copy");
    let (victim_id, victim_device) = ids_of(&s, &tc, victim);
    let held: usize = copies_of(&c, f.ino)
        .await
        .iter()
        .filter(|d| d.contains(&victim_device))
        .count();
    tc.c.kill(victim);

    // Dead: what it held is rebuilt on the fourth host; its records stay.
    wait_status(&tc, PATIENCE, "fail-safe without the dead host", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.hosts.iter().any(|h| h.host_id == victim_id && h.dead)
    })
    .await;
    let copies = copies_of(&c, f.ino).await;
    assert!(
        copies
            .iter()
            .all(|d| d.len() == if d.contains(&victim_device) { 4 } else { 3 }),
        "{copies:?}"
    );

    // Back: one copy too many of what it held, trimmed back to three.
    tc.c.restart(victim, true).expect("restart");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let copies = copies_of(&c, f.ino).await;
        let s = tc.status().await;
        let up = s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up);
        if up && s.mode() == pb::ClusterMode::FailSafe && copies.iter().all(|d| d.len() == 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not trimmed: {copies:?}, status {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric_sum(&tc, "failsafe_copies_trimmed_total") >= held as f64);

    // On disk too: each block's files are where its records say, no more
    // (a trimmed copy stored recently is left to its host's sweep).
    let s = tc.status().await;
    let host_of = |device: u64| {
        let host = s
            .devices
            .iter()
            .find(|d| d.device_id == device)
            .expect("device")
            .host_id;
        let addr = &s
            .hosts
            .iter()
            .find(|h| h.host_id == host)
            .expect("host")
            .addr;
        tc.c.hosts
            .iter()
            .position(|h| h.addr == *addr)
            .expect("one of ours")
    };
    let fe = c.read_extents(f.ino, 0, u64::MAX / 2).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    for b in &fe.copies {
        let want: BTreeSet<usize> = b.device_ids.iter().map(|&d| host_of(d)).collect();
        while hosts_with_file(&tc, &b.hash) != want {
            assert!(
                Instant::now() < deadline,
                "files on {:?}, records on {want:?}",
                hosts_with_file(&tc, &b.hash)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(c.read(f.ino, 0, body.len() as u64).await.unwrap(), body);
    tc.check_logs();
}

#[tokio::test(flavor = "multi_thread")]
async fn t66_blocks_nothing_references_are_collected_after_the_grace_period() {
    let (tc, c) = TestCluster::start(&["--repair-interval-ms=200", "--gc-grace-ms=2000"]).await;
    let hash_of = |fe: &pb::FileExtents| fe.extents[0].hash.clone();
    // f is rewritten in place; g is replaced by a rename over it.
    let f = c.create(ROOT, b"rewritten", 0o644, true).await.unwrap();
    c.write(f.ino, 0, &data(300_000, 21)).await.unwrap();
    let g = c.create(ROOT, b"replaced", 0o644, true).await.unwrap();
    c.write(g.ino, 0, &data(200_000, 22)).await.unwrap();
    wait_copies(&c, f.ino, 3).await;
    wait_copies(&c, g.ino, 3).await;
    let old_f = hash_of(&c.read_extents(f.ino, 0, 1).await.unwrap());
    let old_g = hash_of(&c.read_extents(g.ino, 0, 1).await.unwrap());

    let new_f = data(300_000, 23);
    c.write(f.ino, 0, &new_f).await.unwrap();
    let new_g = data(100_000, 24);
    let tmp = c.create(ROOT, b"replaced.tmp", 0o644, true).await.unwrap();
    c.write(tmp.ino, 0, &new_g).await.unwrap();
    c.rename(pb::Rename {
        parent: ROOT,
        name: b"replaced.tmp".to_vec(),
        new_parent: ROOT,
        new_name: b"replaced".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A write abandoned after storing its block: never committed.
    let abandoned = c.put_blocks(&[data(50_000, 25)]).await.unwrap().remove(0);
    // A write that stores its block now and commits it a while later, but
    // within the grace period: its block must survive.
    let late_data = data(60_000, 26);
    let late = c
        .put_blocks(std::slice::from_ref(&late_data))
        .await
        .unwrap()
        .remove(0);
    let h = c
        .create(ROOT, b"committed-late", 0o644, true)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !hosts_with_file(&tc, &abandoned.hash).is_empty(),
        "an uncommitted block went within the grace period"
    );
    let extent = pb::Extent {
        offset: 0,
        length: late_data.len() as u64,
        hash: late.hash.clone(),
        block_offset: 0,
    };
    c.commit_extents(h.ino, vec![extent], vec![late.clone()])
        .await
        .unwrap();

    // Past the grace period the old versions and the abandoned block are
    // gone from every device; what files reference stays.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left: Vec<BTreeSet<usize>> = [&old_f, &old_g, &abandoned.hash]
            .iter()
            .map(|h| hosts_with_file(&tc, h))
            .collect();
        if left.iter().all(BTreeSet::is_empty) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garbage left on hosts (old f, old g, abandoned): {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = tc.status().await;
    assert_eq!(s.blocks, 3, "the tracker forgot the old blocks: {s:#?}");
    // `replaced` is now the inode written as `replaced.tmp`.
    wait_copies(&c, h.ino, 3).await;
    for ino in [f.ino, tmp.ino, h.ino] {
        let hash = hash_of(&c.read_extents(ino, 0, 1).await.unwrap());
        assert_eq!(
            hosts_with_file(&tc, &hash).len(),
            3,
            "a referenced block lost a file (inode {ino})"
        );
    }
    assert_eq!(c.read(f.ino, 0, new_f.len() as u64).await.unwrap(), new_f);
    assert_eq!(c.lookup(ROOT, b"replaced").await.unwrap().ino, tmp.ino);
    assert_eq!(c.read(tmp.ino, 0, new_g.len() as u64).await.unwrap(), new_g);
    assert_eq!(
        c.read(h.ino, 0, late_data.len() as u64).await.unwrap(),
        late_data
    );
    assert!(metric_sum(&tc, "failsafe_gc_blocks_forgotten_total") >= 2.0);
    assert!(metric_sum(&tc, "failsafe_gc_files_deleted_total") >= 7.0);
    tc.check_logs();
}

/// A wiki page of `lines` lines; the lines in `changed` differ in revision `rev`.
fn page_text(lines: usize, changed: &[usize], rev: u32) -> Vec<u8> {
    let mut s = String::new();
    for l in 0..lines {
        if changed.contains(&l) {
            s += &format!("Line {l} was edited in revision {rev} by someone with a keyboard.\n");
        } else {
            s += &format!("Line {l} of a page about failsafe, which mostly stays as it was.\n");
        }
    }
    s.into_bytes()
}

/// The wiki save: a temp file written, then renamed over the page.
async fn save(c: &Client, name: &str, body: &[u8]) -> u64 {
    let tmp = format!(".{name}.tmp");
    let f = c
        .create(ROOT, tmp.as_bytes(), 0o644, true)
        .await
        .expect("create temp");
    c.write(f.ino, 0, body).await.expect("write temp");
    c.rename(pb::Rename {
        parent: ROOT,
        name: tmp.into_bytes(),
        new_parent: ROOT,
        new_name: name.as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .expect("rename over the page");
    f.ino
}

#[tokio::test(flavor = "multi_thread")]
async fn t67_a_returning_host_receives_changed_pages_as_deltas() {
    let (mut tc, c) = TestCluster::start(FAST_REPAIR).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    let (pages, lines) = (20usize, 500usize);
    for p in 0..pages {
        save(&c, &format!("page{p}"), &page_text(lines, &[], 0)).await;
    }
    wait_status(&tc, PATIENCE, "fail-safe with every page written", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up)
    })
    .await;
    let leader = tc.leader().await;
    let victim = (leader + 1) % 3;
    let victim_id = ids_of(&tc.status().await, &tc, victim).0;
    tc.c.kill(victim);
    wait_status(&tc, PATIENCE, "the killed host down", |s| {
        s.hosts
            .iter()
            .any(|h| h.host_id == victim_id && h.state() == pb::HostLiveness::Down)
    })
    .await;

    // While it is away, every page changes by three lines.
    let (mut changed_bytes, mut full_bytes) = (0u64, 0u64);
    let mut inos = Vec::new();
    for p in 0..pages {
        let edits = [p * 7 % lines, 100 + p * 13 % 300, lines - 1 - p];
        let old = page_text(lines, &[], 0);
        let new = page_text(lines, &edits, 1);
        let old_lines: Vec<&[u8]> = old.split(|b| *b == b'\n').collect();
        changed_bytes += new
            .split(|b| *b == b'\n')
            .zip(&old_lines)
            .filter(|(n, o)| n != *o)
            .map(|(n, _)| n.len() as u64 + 1)
            .sum::<u64>();
        full_bytes += new.len() as u64;
        inos.push((save(&c, &format!("page{p}"), &new).await, new));
    }

    tc.c.restart(victim, true).expect("restart");
    wait_status(&tc, PATIENCE, "fail-safe again", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.under_replicated == 0
            && s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up)
    })
    .await;
    // What reached the returning host: deltas, and whole blocks if any.
    let deltas = metric(&tc, victim, "failsafe_delta_put_bytes_total").unwrap_or(0.0) as u64;
    let delta_puts = metric(&tc, victim, "failsafe_delta_puts_total").unwrap_or(0.0) as u64;
    let whole = metric(&tc, victim, "failsafe_block_put_bytes_total").unwrap_or(0.0) as u64;
    let leader = tc.leader().await;
    let signatures =
        metric(&tc, leader, "failsafe_repair_signature_bytes_total").unwrap_or(0.0) as u64;
    let received = deltas + whole;
    eprintln!(
        "{pages} pages of {} bytes, 3 lines each changed while away: {changed_bytes} changed bytes, {signatures} signature bytes; \
         sent to the returning host {received} bytes ({delta_puts} deltas, {deltas} delta bytes, {whole} whole-block bytes) \
         against {full_bytes} for a plain copy",
        full_bytes / pages as u64
    );
    assert_eq!(
        delta_puts, pages as u64,
        "every changed page went as a delta"
    );
    assert!(
        received * 2 <= 3 * (changed_bytes + signatures),
        "{received} > 1.5 x ({changed_bytes} + {signatures})"
    );
    assert!(
        received * 10 < full_bytes,
        "deltas are a small part of a plain copy"
    );
    // The host's copies are whole: read each page from its zone.
    let near = tc.client_in(&tc.c.hosts[victim].zone).await;
    for (ino, body) in inos {
        assert_eq!(
            near.read(ino, 0, body.len() as u64).await.expect("read"),
            body
        );
    }
}

/// Runs `fsctl --cluster ADDRS ARGS...`.
fn fsctl(tc: &TestCluster, args: &[&str]) -> std::process::Output {
    let addrs: Vec<String> =
        tc.c.hosts
            .iter()
            .filter(|h| !h.addr.is_empty())
            .map(|h| h.addr.clone())
            .collect();
    std::process::Command::new(env!("CARGO_BIN_EXE_fsctl"))
        .arg("--cluster")
        .arg(addrs.join(","))
        .args(args)
        .output()
        .expect("run fsctl")
}

#[tokio::test(flavor = "multi_thread")]
async fn t68_a_shipped_host_starts_no_repair_and_catches_up_by_deltas_at_a_new_address() {
    let (mut tc, c) =
        TestCluster::start(&["--repair-interval-ms=200", "--dead-after-ms=1500"]).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    let (pages, lines) = (10usize, 500usize);
    for p in 0..pages {
        save(&c, &format!("page{p}"), &page_text(lines, &[], 0)).await;
    }
    wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up)
    })
    .await;
    let leader = tc.leader().await;
    let victim = (leader + 1) % 3;
    let victim_id = ids_of(&tc.status().await, &tc, victim).0;

    let out = fsctl(&tc, &["host", "ship", &format!("{victim_id:016x}")]);
    assert!(
        out.status.success(),
        "ship: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("may now be shut down"));
    let s = tc.status().await;
    let base = s.repair.as_ref().map_or(0, |r| r.blocks);
    tc.c.stop(victim);

    // Away longer than dead_after while every page changes by three lines:
    // no re-replication, and it is shown as shipped, not dead.
    let mut inos = Vec::new();
    for p in 0..pages {
        let new = page_text(lines, &[p, 200 + p, 400 + p], 1);
        inos.push((save(&c, &format!("page{p}"), &new).await, new));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = tc.status().await;
    let row = s
        .hosts
        .iter()
        .find(|h| h.host_id == victim_id)
        .expect("victim row");
    assert_eq!(
        (row.admin(), row.state(), row.dead),
        (pb::HostAdminState::Away, pb::HostLiveness::Down, false),
        "{row:?}"
    );
    assert_eq!(
        s.mode(),
        pb::ClusterMode::Limp,
        "two copies of what changed meanwhile"
    );
    assert_eq!(
        s.repair.as_ref().map(|r| r.blocks),
        Some(base),
        "no copies made while it was away"
    );
    let status_text = String::from_utf8_lossy(&fsctl(&tc, &["status"]).stdout).to_string();
    assert!(status_text.contains("SHIPPED"), "{status_text}");

    // Back, at a new address: it verifies, catches up by deltas only, serves again.
    tc.c.restart(victim, false).expect("start at a new address");
    wait_status(&tc, PATIENCE, "fail-safe with the shipped host back", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.hosts.iter().any(|h| {
                h.host_id == victim_id
                    && h.admin() == pb::HostAdminState::Active
                    && h.state() == pb::HostLiveness::Up
                    && h.addr == tc.c.hosts[victim].addr
            })
    })
    .await;
    let deltas = metric(&tc, victim, "failsafe_delta_puts_total").unwrap_or(0.0) as u64;
    let delta_bytes = metric(&tc, victim, "failsafe_delta_put_bytes_total").unwrap_or(0.0) as u64;
    let whole = metric(&tc, victim, "failsafe_block_put_bytes_total").unwrap_or(0.0) as u64;
    eprintln!("catch-up after shipping: {deltas} deltas, {delta_bytes} delta bytes, {whole} whole-block bytes");
    assert_eq!((deltas, whole), (pages as u64, 0), "only deltas");
    let near = tc.client_in(&tc.c.hosts[victim].zone).await;
    for (ino, body) in inos {
        assert_eq!(
            near.read(ino, 0, body.len() as u64).await.expect("read"),
            body
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t69_ship_refuses_a_host_holding_the_last_good_copy() {
    // Repair waits an hour; scrub runs often and finds the rot.
    let (mut tc, c) = TestCluster::start(&[
        "--repair-interval-ms=3600000",
        "--scrub-interval-ms=300",
        "--scrub-mb-per-s=100",
    ])
    .await;
    tc.expected_errors.push("corrupt");
    let body = data(100_000, 5);
    let f = c.create(ROOT, b"precious.txt", 0o644, true).await.unwrap();
    c.write(f.ino, 0, &body).await.unwrap();
    wait_copies(&c, f.ino, 3).await;
    let hash = c.read_extents(f.ino, 0, 1).await.unwrap().extents[0]
        .hash
        .clone();
    let keeper = tc.leader().await;
    // Rot on the other two hosts: scrub finds it, their records go.
    for i in (0..3).filter(|&i| i != keeper) {
        let p = block_file(&tc, i, &hash);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&p, bytes).unwrap();
    }
    wait_copies(&c, f.ino, 1).await;
    let keeper_id = ids_of(&tc.status().await, &tc, keeper).0;
    let out = fsctl(&tc, &["host", "ship", &format!("{keeper_id:016x}")]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "ship of the last good copy must be refused"
    );
    assert!(
        err.contains("refusing to ship") && err.contains("precious.txt"),
        "{err}"
    );
    assert!(
        tc.status()
            .await
            .hosts
            .iter()
            .all(|h| h.admin() == pb::HostAdminState::Active),
        "nothing shipped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t70_a_drained_leader_hands_over_its_copies_and_leadership_and_leaves() {
    let (mut tc, c) = TestCluster::start_zones(&["a", "b", "c", "d"], FAST_REPAIR).await;
    tc.expected_errors.push(KILLED_MID_RPC);
    // Six files: the leader holds copies of some (3 of 4 hosts hold each).
    let mut files = Vec::new();
    for n in 0..6u8 {
        let body = data(300_000, n);
        let f = c
            .create(ROOT, format!("moves-house-{n}").as_bytes(), 0o644, true)
            .await
            .unwrap();
        c.write(f.ino, 0, &body).await.unwrap();
        wait_copies(&c, f.ino, 3).await;
        files.push((f.ino, body));
    }
    let s = wait_status(&tc, PATIENCE, "every block at its copy count", |s| {
        s.mode() == pb::ClusterMode::FailSafe
    })
    .await;
    let leader = tc.leader().await;
    let (leader_id, leader_device) = ids_of(&s, &tc, leader);
    let holders = copies_of(&c, files[0].0).await.remove(0);

    // A holder cannot simply be removed: that would leave the block short.
    let holder = (0..4)
        .find(|&i| holders.contains(&ids_of(&s, &tc, i).1))
        .expect("a holder");
    let holder_id = ids_of(&s, &tc, holder).0;
    let out = fsctl(&tc, &["host", "remove", &format!("{holder_id:016x}")]);
    assert!(!out.status.success(), "remove of a holder must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("below their copy count"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Draining the leader: copies move, then it leaves; another host leads.
    let out = fsctl(&tc, &["host", "drain", &format!("{leader_id:016x}")]);
    assert!(
        out.status.success(),
        "drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("drained and removed") && !said.contains(" 0 blocks held"),
        "{said}"
    );
    let s = wait_status(&tc, PATIENCE, "fail-safe under a new leader", |s| {
        s.mode() == pb::ClusterMode::FailSafe
            && s.leader_id != leader_id
            && s.hosts.iter().all(|h| h.host_id != leader_id)
    })
    .await;
    assert_eq!(s.hosts.len(), 3);
    tc.c.stop(leader);
    for (ino, body) in files {
        let copies = copies_of(&c, ino).await.remove(0);
        assert_eq!(copies.len(), 3, "{copies:?}");
        assert!(!copies.contains(&leader_device));
        assert_eq!(c.read(ino, 0, body.len() as u64).await.unwrap(), body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t71_a_blank_box_receives_its_share_of_copies_by_rebalancing() {
    let (mut tc, c) = TestCluster::start(FAST_REPAIR).await;
    let mut files = Vec::new();
    for n in 0..16u8 {
        let body = data(50_000, n);
        let f = c
            .create(ROOT, format!("old-{n}").as_bytes(), 0o644, true)
            .await
            .unwrap();
        c.write(f.ino, 0, &body).await.unwrap();
        wait_copies(&c, f.ino, 3).await;
        files.push((f.ino, body));
    }
    let dir = tc.dir.path().join("host-d");
    let d = tc.c.add_host(&dir, "d", 0, &[]).expect("start a blank box");
    tc.c.admit(d, &c).await.expect("admit it");
    // Its share: rendezvous placement ranks it in the top three of about
    // three blocks in four; those move, and every block keeps three copies.
    let deadline = Instant::now() + PATIENCE;
    let d_device = loop {
        let s = tc.status().await;
        let d_host = s
            .hosts
            .iter()
            .find(|h| h.addr == tc.c.hosts[d].addr)
            .map(|h| h.host_id);
        let dev = s
            .devices
            .iter()
            .find(|x| Some(x.host_id) == d_host)
            .map(|x| x.device_id);
        let mut on_d = 0;
        let mut all_three = true;
        for (ino, _) in &files {
            let copies = copies_of(&c, *ino).await.remove(0);
            all_three &= copies.len() == 3;
            on_d += usize::from(dev.is_some_and(|dv| copies.contains(&dv)));
        }
        if all_three && on_d >= 6 && s.mode() == pb::ClusterMode::FailSafe {
            eprintln!(
                "{on_d} of {} files now have a copy on the new box",
                files.len()
            );
            break dev;
        }
        assert!(
            Instant::now() < deadline,
            "no rebalance: {on_d} on the new box, all three copies: {all_three}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(d_device.is_some());
    assert!(metric_sum(&tc, "failsafe_rebalance_copies_total") >= 6.0);
    for (ino, body) in files {
        assert_eq!(c.read(ino, 0, body.len() as u64).await.unwrap(), body);
    }
}
