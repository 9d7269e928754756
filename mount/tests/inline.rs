//! Inline small writes (issue 11): a small write travels inside its Raft
//! entry, so it survives the loss of any one host without a block copy;
//! later the leader's blockifier turns it into blocks on distinct zones,
//! and the content never changes on the way.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

use common::Env;
use failsafe_client::{pb, Client};

/// How long a condition the cluster reaches by itself may take.
const PATIENCE: Duration = Duration::from_secs(60);

/// Writes `data` to `path` and fsyncs it.
fn write_synced(path: &std::path::Path, data: &[u8], append: bool) {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .expect("open for writing");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// The inode of `name` in the root directory and its extents, as the
/// tracker has them.
async fn extents_of(client: &Client, name: &str) -> pb::FileExtents {
    let attr = client
        .lookup(failsafe_core::ROOT_INO, name.as_bytes())
        .await
        .expect("lookup");
    client
        .read_extents(attr.ino, 0, u64::MAX >> 4)
        .await
        .expect("read extents")
}

fn all_inline(fe: &pb::FileExtents) -> bool {
    !fe.extents.is_empty()
        && fe
            .extents
            .iter()
            .all(|e| e.hash.is_empty() && e.data.len() as u64 == e.length)
}

/// Waits until every host is up and has the leader's whole log.
async fn all_caught_up(env: &Env) {
    env.cluster
        .wait_for(PATIENCE, "every host up and caught up", |s| {
            let last = s.last_log_index;
            s.hosts.len() == 3
                && s.hosts
                    .iter()
                    .all(|h| h.state == pb::HostLiveness::Up as i32 && h.matched_index >= last)
        })
        .await
        .expect("hosts back");
}

#[tokio::test(flavor = "multi_thread")]
async fn t50_inline_data_survives_the_loss_of_any_one_host() {
    // The blockifier waits longer than the test lasts: the data stays inline.
    let mut env = Env::start_with(1, &["--blockify-after-ms", "600000"]).await;
    let page = b"# Small page\n\nSaved the wiki way: inline, in its Raft entry.\n".repeat(20);
    let m = env.mounts[0].path.clone();
    write_synced(&m.join("page.txt"), &page, false);
    write_synced(&m.join("changes.log"), b"1 saved page.txt\n", true);
    write_synced(&m.join("changes.log"), b"2 saved page.txt\n", true);
    let client = env.cluster.client().await.expect("client");
    for name in ["page.txt", "changes.log"] {
        let fe = extents_of(&client, name).await;
        assert!(all_inline(&fe), "{name} is stored inline: {fe:?}");
        assert!(fe.copies.is_empty(), "{name} has no block copies");
    }
    // The leader first, then a follower, then the host left (leading or not).
    let mut killed: Vec<usize> = Vec::new();
    for round in 0..3 {
        let s = env
            .cluster
            .wait_for(PATIENCE, "a leader", |s| s.leader_id != 0)
            .await
            .expect("status");
        let leader = env
            .cluster
            .addrs()
            .iter()
            .position(|a| *a == s.leader_addr)
            .expect("the leader is one of the hosts");
        let h = if round == 0 {
            leader
        } else {
            (0..3)
                .find(|h| !killed.contains(h))
                .expect("a host not killed yet")
        };
        killed.push(h);
        eprintln!("round {round}: host {h} killed (the leader is host {leader})");
        env.cluster.kill(h);
        // A fresh mount: nothing cached, every byte from the tracker.
        let i = env.mount(["b", "c", "a"][h]);
        let fresh = env.mounts[i].path.clone();
        assert_eq!(
            fs::read(fresh.join("page.txt")).expect("read page"),
            page,
            "page.txt with host {h} down"
        );
        assert_eq!(
            fs::read(fresh.join("changes.log")).expect("read log"),
            b"1 saved page.txt\n2 saved page.txt\n",
            "changes.log with host {h} down"
        );
        env.mounts[i].unmount();
        env.cluster.restart(h, true).expect("restart");
        all_caught_up(&env).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t51_inline_data_becomes_blocks_on_distinct_zones_later() {
    // Three seconds: both appends below are inline by then, so they become
    // one block even on a slow machine.
    let mut env = Env::start_with(1, &["--blockify-after-ms", "3000"]).await;
    let page = b"A page saved inline, made a block a few seconds later.\n".repeat(30);
    let m = env.mounts[0].path.clone();
    write_synced(&m.join("page.txt"), &page, false);
    // Two appends: adjacent inline extents (joined into one), one block.
    write_synced(&m.join("changes.log"), b"first line\n", true);
    write_synced(&m.join("changes.log"), b"second line\n", true);
    let client = env.cluster.client().await.expect("client");
    let deadline = Instant::now() + PATIENCE;
    for name in ["page.txt", "changes.log"] {
        loop {
            let fe = extents_of(&client, name).await;
            let blocks = fe.extents.iter().all(|e| e.data.is_empty());
            let zones: Vec<BTreeSet<&str>> = fe
                .copies
                .iter()
                .map(|c| {
                    c.device_ids
                        .iter()
                        .filter_map(|d| fe.devices.iter().find(|l| l.device_id == *d))
                        .map(|l| l.zone.as_str())
                        .collect()
                })
                .collect();
            // Every block on three devices in three zones (the third copy
            // may be recorded a moment after the first two).
            if blocks && !zones.is_empty() && zones.iter().all(|z| z.len() == 3) {
                let hashes: BTreeSet<&[u8]> =
                    fe.extents.iter().map(|e| e.hash.as_slice()).collect();
                assert_eq!(
                    hashes.len(),
                    1,
                    "{name}: one block for adjacent extents: {fe:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not become blocks on three zones: {fe:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The same bytes, read from blocks by a mount that never saw them.
    let i = env.mount("c");
    let fresh = env.mounts[i].path.clone();
    assert_eq!(fs::read(fresh.join("page.txt")).expect("read page"), page);
    assert_eq!(
        fs::read(fresh.join("changes.log")).expect("read log"),
        b"first line\nsecond line\n"
    );
    // And through the writer's mount, which had them inline.
    assert_eq!(fs::read(m.join("page.txt")).expect("read page"), page);
    let status = env
        .cluster
        .wait_for(PATIENCE, "fail-safe, the blockifier's work counted", |s| {
            s.mode == pb::ClusterMode::FailSafe as i32
                // The page's extent and the log's (its appends joined).
                && s.blockify.as_ref().is_some_and(|b| b.extents >= 2)
        })
        .await;
    assert!(status.is_ok(), "{status:?}");
}

/// A backlog of more small files than one step of the blockifier takes
/// (256): each step stores its blocks in one put and proposes their
/// replacements side by side, then pauses; every file ends as a block of
/// its own bytes, read back by a mount that never saw them.
#[tokio::test(flavor = "multi_thread")]
async fn t52_a_backlog_of_small_files_becomes_blocks_step_by_step() {
    const FILES: usize = 600;
    let mut env = Env::start_with(1, &["--blockify-after-ms", "2000"]).await;
    let m = env.mounts[0].path.clone();
    fs::create_dir(m.join("many")).expect("mkdir");
    let body = |i: usize| format!("file {i}\n").repeat(1 + i % 40).into_bytes();
    for i in 0..FILES {
        fs::write(m.join(format!("many/f{i:04}")), body(i)).expect("write");
    }
    let status = env
        .cluster
        .wait_for(PATIENCE, "every small file made a block", |s| {
            s.blockify
                .as_ref()
                .is_some_and(|b| b.extents >= FILES as u64)
        })
        .await;
    assert!(status.is_ok(), "{status:?}");
    let client = env.cluster.client().await.expect("client");
    let many = client
        .lookup(failsafe_core::ROOT_INO, b"many")
        .await
        .expect("lookup many");
    for i in (0..FILES).step_by(37) {
        let attr = client
            .lookup(many.ino, format!("f{i:04}").as_bytes())
            .await
            .expect("lookup");
        let fe = client
            .read_extents(attr.ino, 0, u64::MAX >> 4)
            .await
            .expect("read extents");
        assert!(
            !fe.extents.is_empty() && fe.extents.iter().all(|e| e.data.is_empty()),
            "f{i:04} is not a block: {fe:?}"
        );
    }
    let c = env.mount("c");
    let fresh = env.mounts[c].path.clone();
    for i in 0..FILES {
        let got = fs::read(fresh.join(format!("many/f{i:04}"))).expect("read");
        assert_eq!(got, body(i), "f{i:04}");
    }
}
