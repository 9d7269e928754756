//! Moving data between boxes: a returning host gets changed pages as
//! deltas; shipping a host; draining one; a blank box's share by rebalancing.

use std::time::{Duration, Instant};

use crate::common::{data, TestCluster, ROOT};
use crate::helpers::*;
use failsafe_client::pb;

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
    // The leader leaves the membership: openraft stops its Raft core, and a
    // call of its own workers still waiting on it is told so at ERROR (seen
    // under load, one run in several).
    tc.expected_errors
        .push("failure receiving rx from RaftCore");
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
