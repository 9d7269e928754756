//! The `return` worker: a shipped host that was started again after it was
//! shipped (it is back, at whatever address) verifies every block it holds —
//! corrupt ones go to repair — and then asks to serve again. Its catch-up
//! (the blocks written while it was away, as deltas where it holds an older
//! version) runs meanwhile: repair already sends it copies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use failsafe_blockstore::BlockStore;
use failsafe_proto::pb;

use crate::cluster::Cluster;
use crate::repair::BadCopies;
use crate::scrub::{verify, DeviceWalk, Verified};
use crate::worker::Worker;

/// Blocks listed at a time.
const BATCH: usize = 1024;

pub(crate) struct Return {
    cluster: Arc<Cluster>,
    store: Arc<BlockStore>,
    bad: Arc<BadCopies>,
    /// When this process started (wall clock): a host shipped before that
    /// has come back.
    started_ns: i64,
}

impl Return {
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        store: Arc<BlockStore>,
        bad: Arc<BadCopies>,
    ) -> Return {
        Return {
            cluster,
            store,
            bad,
            started_ns: failsafe_tracker::wall_clock_ns(),
        }
    }
}

impl Worker for Return {
    fn name(&self) -> &'static str {
        "return"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        let t = self.cluster.tracker();
        let away = t.away_since().await?;
        let Some(&(until, since)) = away.get(&t.host_id) else {
            return Ok(Duration::from_secs(1));
        };
        let now = failsafe_tracker::wall_clock_ns();
        if since >= self.started_ns && now < until {
            // Shipped while running: still on its way out.
            return Ok(Duration::from_secs(1));
        }
        let started = Instant::now();
        tracing::info!(
            "back from being shipped: verifying every stored block before serving reads"
        );
        let (mut blocks, mut corrupt) = (0u64, 0u64);
        let mut walk = DeviceWalk::default();
        while let Some((device, batch)) = walk.next(&self.store, BATCH).await? {
            for b in batch {
                match verify(&self.store, &self.bad, device, b.hash).await? {
                    Verified::Intact(_) => blocks += 1,
                    Verified::Corrupt => corrupt += 1,
                    Verified::Unreadable => {}
                }
                walk.passed(b.hash);
            }
        }
        self.cluster
            .set_host_state(t.host_id, pb::HostAdminState::Active, 0)
            .await?;
        tracing::info!(blocks, corrupt, took = ?started.elapsed(), "verified after shipping; serving reads again");
        Ok(Duration::from_secs(1))
    }
}
