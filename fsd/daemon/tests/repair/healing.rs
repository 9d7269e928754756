//! A host down, dead or returning; a copy corrupt on read or found by the
//! scrub; a replaced disk; copies beyond the copy count; unreferenced blocks.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::{data, TestCluster, ROOT};
use crate::helpers::*;
use failsafe_client::pb;

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
        (s.mode(), s.under_replicated),
        (pb::ClusterMode::Limp, 0),
        "nothing is written yet, so no block is short, but a voting tracker \
         member is down: one more failure would stop metadata changes"
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
    // Every block is whole again; the cluster limps until the dead host,
    // still a voting member, is removed.
    let s = wait_whole_without(&tc, victim_id).await;
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
    wait_whole_without(&tc, victim_id).await;
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
        data: Vec::new(),
    };
    c.commit_extents(h.ino, vec![extent], vec![late.clone()])
        .await
        .unwrap();

    // Past the grace period the old version and the abandoned block are
    // gone from every device; what files reference stays, and so does the
    // replaced file's block while the trash keeps that file.
    let gone = |hashes: &[&Vec<u8>], what: &str| {
        let deadline = Instant::now() + PATIENCE;
        let tc = &tc;
        let what = what.to_string();
        let hashes: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_vec()).collect();
        async move {
            loop {
                let left: Vec<BTreeSet<usize>> =
                    hashes.iter().map(|h| hosts_with_file(tc, h)).collect();
                if left.iter().all(BTreeSet::is_empty) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "garbage left on hosts ({what}): {left:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    gone(&[&old_f, &abandoned.hash], "old f, abandoned").await;
    let s = tc.status().await;
    assert_eq!(s.blocks, 4, "the tracker forgot the old blocks: {s:#?}");
    assert_eq!(s.trash_items, 1, "the replaced file is in the trash");
    assert_eq!(
        hosts_with_file(&tc, &old_g).len(),
        3,
        "the trash keeps old g"
    );
    // Purged from the trash, its block is garbage in its turn.
    c.mutate(pb::command::Op::PurgeTrash(pb::PurgeTrash {
        path: b"/replaced".to_vec(),
        id: 0,
    }))
    .await
    .unwrap();
    gone(&[&old_g], "old g").await;
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
