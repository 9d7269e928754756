//! What the repair tests share: waiting for the leader's judgement, reading
//! copies, metrics and block files, saving pages, running fsctl.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub(crate) use crate::common::PATIENCE;
use crate::common::{TestCluster, ROOT};
use failsafe_client::{pb, Client};

/// openraft logs a connection cut by a kill at ERROR, as a network error
/// rather than an unreachable node when the RPC was in flight.
pub(crate) const KILLED_MID_RPC: &str = "transport error";

/// Repair rounds often, so the tests take seconds.
pub(crate) const FAST_REPAIR: &[&str] = &["--repair-interval-ms=200"];

/// The status as the leader sees it, once `cond` holds.
pub(crate) async fn wait_status(
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

/// Waits until host `dead` is dead and every block is whole without it;
/// the cluster still limps, a dead voter being a member until removed.
pub(crate) async fn wait_whole_without(tc: &TestCluster, dead: u64) -> pb::StatusReply {
    let s = wait_status(
        tc,
        PATIENCE,
        "every block whole without the dead host",
        |s| {
            s.under_replicated == 0
                && s.unavailable == 0
                && s.hosts.iter().any(|h| h.host_id == dead && h.dead)
        },
    )
    .await;
    assert_eq!(
        s.mode(),
        pb::ClusterMode::Limp,
        "a dead voter is still a member"
    );
    s
}

/// The devices each block of file `ino` is recorded on.
pub(crate) async fn copies_of(c: &Client, ino: u64) -> Vec<Vec<u64>> {
    let fe = c
        .read_extents(ino, 0, u64::MAX / 2)
        .await
        .expect("read extents");
    fe.copies.into_iter().map(|b| b.device_ids).collect()
}

/// Host `i`'s id and its one device's id.
pub(crate) fn ids_of(s: &pb::StatusReply, tc: &TestCluster, i: usize) -> (u64, u64) {
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
pub(crate) fn metric(tc: &TestCluster, i: usize, name: &str) -> Option<f64> {
    tc.c.metric_samples_of(i, name).first().map(|&(_, v)| v)
}

/// Where block `hash` lives in host `i`'s one device.
pub(crate) fn block_file(tc: &TestCluster, i: usize, hash: &[u8]) -> PathBuf {
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
pub(crate) fn hosts_with_file(tc: &TestCluster, hash: &[u8]) -> BTreeSet<usize> {
    (0..tc.c.hosts.len())
        .filter(|&i| block_file(tc, i, hash).exists())
        .collect()
}

/// A counter summed over every host's /metrics.
pub(crate) fn metric_sum(tc: &TestCluster, name: &str) -> f64 {
    (0..tc.c.hosts.len())
        .filter_map(|i| metric(tc, i, name))
        .sum()
}

/// Waits until every block of file `ino` has `n` recorded copies.
pub(crate) async fn wait_copies(c: &Client, ino: u64, n: usize) {
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

/// A wiki page of `lines` lines; the lines in `changed` differ in revision `rev`.
pub(crate) fn page_text(lines: usize, changed: &[usize], rev: u32) -> Vec<u8> {
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
pub(crate) async fn save(c: &Client, name: &str, body: &[u8]) -> u64 {
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

/// Runs `fsctl --cluster ADDRS ARGS...` as the cluster's admin.
pub(crate) fn fsctl(tc: &TestCluster, args: &[&str]) -> std::process::Output {
    tc.fsctl(args)
}
