//! The `announcer` worker: joins the cluster on first start, keeps this
//! host's address in the membership current (a host may come back
//! elsewhere), and reports its devices' usage.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_blockstore::BlockStore;
use failsafe_proto::pb::{self, command::Op};

use crate::admin::device_infos;
use crate::cluster::Cluster;
use crate::lock::lock;
use crate::worker::Worker;

pub(crate) struct Announcer {
    cluster: Arc<Cluster>,
    store: Arc<BlockStore>,
    report_interval: Duration,
    /// What this host last reported about its devices, and when. A std
    /// Mutex: held for a comparison, never across an await.
    last_report: Mutex<Option<(Vec<pb::DeviceInfo>, Instant)>>,
}

impl Announcer {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        store: Arc<BlockStore>,
        report_interval: Duration,
    ) -> Announcer {
        Announcer {
            cluster,
            store,
            report_interval,
            last_report: Mutex::new(None),
        }
    }
}

/// Whether device usage changed enough to be worth a Raft entry: free space
/// that moved by more than the slack placement tolerates
/// (`failsafe_core::repair::USAGE_SLACK`).
fn usage_moved(prev: &[pb::DeviceInfo], now: &[pb::DeviceInfo]) -> bool {
    let slack = |capacity: u64| (capacity as f64 * failsafe_core::repair::USAGE_SLACK) as u64;
    prev.len() != now.len()
        || prev.iter().zip(now).any(|(a, b)| {
            a.device_id != b.device_id
                || a.blocks != b.blocks
                || a.free_bytes.abs_diff(b.free_bytes) > slack(a.capacity_bytes)
        })
}

impl Worker for Announcer {
    fn name(&self) -> &'static str {
        "announcer"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        let t = self.cluster.tracker();
        let advertise = self.cluster.advertise();
        if t.cluster.get().is_empty() {
            return Ok(Duration::from_millis(500));
        }
        if !t.is_initialized() {
            if !self.cluster.joins() {
                // Waiting for `fsctl host add` to bring us in.
                return Ok(Duration::from_millis(500));
            }
            let client = self.cluster.client().await?;
            client.add_host(advertise).await?;
            tracing::info!(addr = %advertise, "joined the cluster");
            return Ok(Duration::from_millis(100));
        }
        let known = t
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&t.host_id)
            .map(|n| n.addr.clone());
        let Some(known) = known else {
            // Removed from, or not yet in, the membership.
            return Ok(Duration::from_millis(500));
        };
        if known != advertise {
            tracing::info!(old = %known, new = %advertise, "this host's address changed; telling the cluster");
            if t.is_leader() {
                t.set_address(t.host_id, advertise).await?;
            } else {
                self.cluster
                    .client()
                    .await?
                    .update_address(t.host_id, advertise)
                    .await?;
            }
            return Ok(Duration::from_millis(100));
        }
        let devices = device_infos(&self.store, t.host_id);
        if let Some((prev, at)) = lock(&self.last_report).as_ref() {
            // Every report is a Raft entry: send one when usage moved, or
            // once a minute as a sign of life.
            if !usage_moved(prev, &devices) && at.elapsed() < Duration::from_secs(60) {
                return Ok(self.report_interval);
            }
        }
        let report = Op::ReportDevices(pb::ReportDevices {
            host_id: t.host_id,
            devices: devices.clone(),
        });
        self.cluster.propose(report).await?;
        *lock(&self.last_report) = Some((devices, Instant::now()));
        Ok(self.report_interval)
    }
}
