//! Garbage collection: the `gc` worker, on every host.
//!
//! On the tracker leader it *collects*: blocks no extent has referenced for
//! longer than the grace period (old versions of rewritten or replaced
//! files) lose their records through `ForgetBlocks`, which the state machine
//! re-checks as it applies it, and only then are their holders asked to
//! delete them. On every host it *sweeps*: block files on its own devices
//! that the tracker (read at the leader's read index) has no record of, and
//! that are older than the grace period, are deleted, so a host that was
//! away, or a delete that never arrived, leaves no garbage behind.
//!
//! The grace period is what makes this safe against a write in flight: a
//! client stores its blocks before it commits the extents that reference
//! them. A block file is never deleted within the grace period of its last
//! store (the block store refreshes the time when a block is put again), and
//! a block the tracker records but nothing references yet is idle only from
//! when it was recorded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use failsafe_blockstore::{BlockStore, Hash, Removal};
use failsafe_client::Client;
use failsafe_core::{hash_hex, Liveness};
use failsafe_proto::pb::{self, command::Op};
use failsafe_tracker::TrackerError;
use futures::StreamExt;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::config::GcConfig;
use crate::lock::lock;
use crate::metrics::{get, inc, Metrics};
use crate::worker::{Worker, WorkerState};

/// Blocks collected, or files looked at, per step.
const BATCH: usize = 1024;
/// Deletes in flight at once.
const DELETES_AT_ONCE: usize = 8;

/// Where the sweep of this host's devices is.
#[derive(Default)]
struct Sweep {
    device: usize,
    after: Option<Hash>,
    started: Option<Instant>,
    last_started: Option<Instant>,
    deleted: u64,
}

/// The gc worker's state, shared with `Admin.Status`.
pub(crate) struct Gc {
    cfg: GcConfig,
    cluster: Arc<Cluster>,
    store: Arc<BlockStore>,
    metrics: Arc<Metrics>,
    /// A std Mutex: held to read or move the cursor, never across an await.
    sweep: Mutex<Sweep>,
    state: WorkerState,
}

impl Gc {
    pub(crate) fn new(
        cfg: GcConfig,
        cluster: Arc<Cluster>,
        store: Arc<BlockStore>,
        metrics: Arc<Metrics>,
    ) -> Gc {
        Gc {
            cfg,
            cluster,
            store,
            metrics,
            sweep: Mutex::default(),
            state: WorkerState::new("starting"),
        }
    }

    pub(crate) fn status(&self) -> pb::GcStatus {
        pb::GcStatus {
            state: self.state.get(),
            forgotten: get(&self.metrics.gc_forgotten),
            files_deleted: get(&self.metrics.gc_files_deleted),
            bytes_deleted: get(&self.metrics.gc_bytes_deleted),
        }
    }

    /// One step: a batch of collection (on the leader) and of sweeping.
    /// Returns how long to wait before the next.
    async fn gc_step(&self) -> anyhow::Result<Duration> {
        let tracker = self.cluster.tracker();
        if tracker.cluster.get().is_empty() || !tracker.is_initialized() {
            self.state.set("not in a cluster");
            return Ok(Duration::from_millis(500));
        }
        let client = self.cluster.block_client().await?;
        let expired = self.expire_trash().await?;
        let collected = self.collect(&client).await?;
        let swept = match self.sweep().await {
            Ok(more) => more,
            // No leader to ask, or this member cannot catch up: sweep later.
            Err(
                e @ (TrackerError::NoQuorum(_)
                | TrackerError::NotLeader { .. }
                | TrackerError::NotInitialized),
            ) => {
                self.state.set(format!("sweep waits for the tracker: {e}"));
                return Ok(self.cfg.interval());
            }
            Err(e) => return Err(e.into()),
        };
        if expired || collected || swept {
            return Ok(Duration::ZERO);
        }
        self.state.set("idle");
        Ok(self.cfg.interval())
    }

    /// On the leader: forgets what the trash holds past its time (or beyond
    /// its size); the blocks only it kept then become garbage in their
    /// turn. True if there may be more.
    async fn expire_trash(&self) -> anyhow::Result<bool> {
        if !self.cluster.tracker().trash_due().await? {
            return Ok(false);
        }
        self.state.set("expiring the trash");
        self.cluster
            .propose(Op::ExpireTrash(pb::ExpireTrash {}))
            .await
            .context("expiring the trash")?;
        tracing::debug!("expired from the trash");
        // The next step looks again.
        Ok(true)
    }

    /// On the leader: forgets a batch of unreferenced blocks idle past the
    /// grace period, then asks their holders to delete them. True if there
    /// may be more.
    async fn collect(&self, client: &Client) -> anyhow::Result<bool> {
        let tracker = self.cluster.tracker();
        let Some((idle_before, garbage)) = tracker.garbage(self.cfg.grace, BATCH).await? else {
            return Ok(false);
        };
        if garbage.is_empty() {
            return Ok(false);
        }
        self.state
            .set(format!("collecting {} blocks", garbage.len()));
        let hashes: Vec<Vec<u8>> = garbage.iter().map(|b| b.hash.clone()).collect();
        self.cluster
            .propose(Op::ForgetBlocks(pb::ForgetBlocks {
                hashes: hashes.clone(),
                idle_before_ns: idle_before,
            }))
            .await
            .context("forgetting garbage")?;
        // The state machine re-checked each block as it applied the command:
        // only those it no longer knows are deleted. Never before the record
        // is gone.
        let now_known = tracker.recorded(hashes).await?;
        let locations = tracker.device_locations().await?;
        let mut deletes = Vec::new();
        let mut forgotten = 0;
        for (block, known) in garbage.iter().zip(now_known) {
            if known.is_some() {
                continue;
            }
            forgotten += 1;
            tracing::debug!(block = %hash_hex(&block.hash), holders = ?block.holders, "forgot unreferenced block");
            for &device in &block.holders {
                let Some((host, addr)) = locations.get(&device) else {
                    continue;
                };
                // A holder that is not up sweeps its copy itself when it is back.
                if tracker.liveness(*host) == Liveness::Up {
                    deletes.push((block.hash.clone(), device, addr.clone()));
                }
            }
        }
        inc(&self.metrics.gc_forgotten, forgotten);
        let grace = self.cfg.grace;
        let failed: usize = futures::stream::iter(deletes)
            .map(|(hash, device, addr)| async move {
                match client.delete_block(&addr, device, &hash, grace).await {
                    Ok(_) => 0,
                    Err(s) => {
                        tracing::debug!(block = %hash_hex(&hash), %addr, error = %s.message(), "deleting garbage failed; its host sweeps it later");
                        1
                    }
                }
            })
            .buffer_unordered(DELETES_AT_ONCE)
            .fold(0, |n, f| async move { n + f })
            .await;
        tracing::info!(
            blocks = forgotten,
            failed_deletes = failed,
            "collected unreferenced blocks"
        );
        Ok(garbage.len() >= BATCH)
    }

    /// Sweeps a batch of this host's block files: those the tracker has no
    /// record of and that are older than the grace period go. A pass over
    /// every device starts at most once per grace period. True if there is
    /// more to do now.
    async fn sweep(&self) -> Result<bool, TrackerError> {
        let tracker = self.cluster.tracker();
        let devices = self.store.device_ids();
        let (index, after) = {
            let mut s = lock(&self.sweep);
            if s.started.is_none() {
                if s.last_started.is_some_and(|t| t.elapsed() < self.cfg.grace) {
                    return Ok(false);
                }
                *s = Sweep {
                    started: Some(Instant::now()),
                    last_started: s.last_started,
                    ..Sweep::default()
                };
            }
            if s.device >= devices.len() {
                if s.deleted > 0 {
                    tracing::info!(
                        files = s.deleted,
                        "swept block files the tracker has no record of"
                    );
                }
                *s = Sweep {
                    last_started: s.started,
                    ..Sweep::default()
                };
                return Ok(false);
            }
            (s.device, s.after)
        };
        let device = devices[index];
        let store = self.store.clone();
        let listed = tokio::task::spawn_blocking(move || store.list(device, after.as_ref(), BATCH))
            .await
            .map_err(|e| TrackerError::Storage(format!("listing blocks: {e}").into()))?
            .map_err(|e| TrackerError::Storage(format!("listing blocks: {e}").into()))?;
        let next = |s: &mut Sweep, after: Option<Hash>| match after {
            Some(h) => s.after = Some(h),
            None => {
                s.device += 1;
                s.after = None;
            }
        };
        let Some(last) = listed.last().map(|b| b.hash) else {
            next(&mut lock(&self.sweep), None);
            return Ok(true);
        };
        let cutoff = SystemTime::now()
            .checked_sub(self.cfg.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let old: Vec<Vec<u8>> = listed
            .iter()
            .filter(|b| b.stored_at < cutoff)
            .map(|b| b.hash.to_vec())
            .collect();
        if old.is_empty() {
            next(&mut lock(&self.sweep), Some(last));
            return Ok(true);
        }
        self.state.set(format!("sweeping device {device:016x}"));
        let Some(recorded) = tracker.copies_on(device, old.clone()).await? else {
            // Not a device the tracker knows as this host's (not reported
            // yet, or this host is no longer a member): not ours to judge.
            next(&mut lock(&self.sweep), None);
            return Ok(true);
        };
        let unrecorded: Vec<Hash> = old
            .into_iter()
            .filter(|h| !recorded.contains(h))
            .filter_map(|h| failsafe_core::parse_hash(&h))
            .collect();
        let store = self.store.clone();
        let grace = self.cfg.grace;
        let removed = tokio::task::spawn_blocking(move || {
            let mut removed = Vec::new();
            for h in unrecorded {
                // The time is checked again under the store's lock: a put
                // since the listing keeps the file.
                match store.delete(device, &h, grace) {
                    Ok(Removal::Removed { bytes }) => removed.push((h, bytes)),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(block = %hash_hex(&h), error = %e, "could not delete an unrecorded block file"),
                }
            }
            removed
        })
        .await
        .map_err(|e| TrackerError::Storage(format!("deleting blocks: {e}").into()))?;
        for (h, bytes) in &removed {
            inc(&self.metrics.gc_files_deleted, 1);
            inc(&self.metrics.gc_bytes_deleted, *bytes);
            tracing::debug!(block = %hash_hex(h), device = format!("{device:016x}"), "deleted an unrecorded block file");
        }
        let mut s = lock(&self.sweep);
        s.deleted += removed.len() as u64;
        next(&mut s, Some(last));
        Ok(true)
    }
}

impl Worker for Gc {
    fn name(&self) -> &'static str {
        "gc"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        self.gc_step().await
    }

    fn state(&self) -> Option<&WorkerState> {
        Some(&self.state)
    }
}
