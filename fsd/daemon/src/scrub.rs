//! Scrub: the `scrub` worker, on every host, re-reads and re-hashes the
//! blocks on this host's own devices at a capped rate, so a copy that rotted
//! where nobody reads it is found before the other copies are needed.
//!
//! It reads through the block store's verifying `get`, so a corrupt copy is
//! quarantined exactly as on a client's read, and queued on `BadCopies`: the
//! `copy-dropper` drops its record and the leader's repair worker copies the
//! block again from a good copy. A pass walks each device in hash order, a
//! batch at a time, and logs one INFO line when it has covered them all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use failsafe_blockstore::{BlockStore, Hash, StoreError, StoredBlock};
use failsafe_core::hash_hex;
use failsafe_proto::pb;
use tokio::time::Instant;

use crate::config::ScrubConfig;
use crate::lock::lock;
use crate::metrics::{get, inc, Metrics};
use crate::pace::Pacer;
use crate::repair::BadCopies;
use crate::worker::{Worker, WorkerState};

/// Blocks listed per step: a step ends between batches, so the worker
/// notices shutdown and its state stays fresh.
const BATCH: usize = 64;

/// A walk over every block on this host's devices, a device at a time and
/// in hash order on each, a batch at a time: what scrub and a returning
/// host's verification read.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DeviceWalk {
    /// Index into the store's devices, and the last block passed there.
    device: usize,
    after: Option<Hash>,
}

impl DeviceWalk {
    /// The next up to `limit` blocks after the last one passed, and their
    /// device (moving on to the next device when one has no more); None
    /// when every device is done.
    pub(crate) async fn next(
        &mut self,
        store: &Arc<BlockStore>,
        limit: usize,
    ) -> anyhow::Result<Option<(u64, Vec<StoredBlock>)>> {
        let devices = store.device_ids();
        while let Some(&device) = devices.get(self.device) {
            let (s, after) = (store.clone(), self.after);
            let batch = tokio::task::spawn_blocking(move || s.list(device, after.as_ref(), limit))
                .await??;
            if !batch.is_empty() {
                return Ok(Some((device, batch)));
            }
            self.device += 1;
            self.after = None;
        }
        Ok(None)
    }

    /// Marks block `hash` as done: the walk goes on after it.
    pub(crate) fn passed(&mut self, hash: Hash) {
        self.after = Some(hash);
    }

    /// Devices finished.
    fn devices_done(&self) -> usize {
        self.device
    }
}

/// Where a pass is.
#[derive(Default)]
struct Progress {
    walk: DeviceWalk,
    /// When the pass under way started (None: between passes).
    started: Option<Instant>,
    /// When the last pass started.
    last_started: Option<Instant>,
    blocks: u64,
    bytes: u64,
    corrupt: u64,
}

/// The scrub worker's state, shared with `Admin.Status`.
pub(crate) struct Scrub {
    cfg: ScrubConfig,
    store: Arc<BlockStore>,
    metrics: Arc<Metrics>,
    bad: Arc<BadCopies>,
    pacer: Pacer,
    /// A std Mutex: held to read or update the cursor, never across an await.
    progress: Mutex<Progress>,
    state: WorkerState,
}

impl Scrub {
    pub(crate) fn new(
        cfg: ScrubConfig,
        store: Arc<BlockStore>,
        metrics: Arc<Metrics>,
        bad: Arc<BadCopies>,
    ) -> Scrub {
        let pacer = Pacer::new(cfg.bytes_per_second);
        let state = if cfg.bytes_per_second == 0 {
            "off"
        } else {
            "starting"
        };
        Scrub {
            cfg,
            store,
            metrics,
            bad,
            pacer,
            progress: Mutex::default(),
            state: WorkerState::new(state),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cfg.bytes_per_second > 0
    }

    pub(crate) fn status(&self) -> pb::ScrubStatus {
        pb::ScrubStatus {
            state: self.state.get(),
            passes: get(&self.metrics.scrub_passes),
            bytes: get(&self.metrics.scrub_bytes),
            corrupt: get(&self.metrics.scrub_corrupt),
        }
    }

    /// One step: checks a batch of blocks, or finishes a pass, or waits for
    /// the next. Returns how long to wait before the next step.
    async fn scrub_step(&self) -> anyhow::Result<Duration> {
        let mut walk = {
            let mut p = lock(&self.progress);
            if p.started.is_none() {
                if let Some(last) = p.last_started {
                    let due = last + self.cfg.interval;
                    if Instant::now() < due {
                        drop(p);
                        let wait = due - Instant::now();
                        self.state
                            .set(format!("idle (next pass in {})", rough(wait)));
                        return Ok(wait.min(Duration::from_secs(60)));
                    }
                }
                *p = Progress {
                    started: Some(Instant::now()),
                    ..Progress::default()
                };
            }
            p.walk
        };
        self.state.set(format!(
            "scrubbing pass {}",
            get(&self.metrics.scrub_passes) + 1
        ));
        let Some((device, batch)) = walk.next(&self.store, BATCH).await? else {
            let mut p = lock(&self.progress);
            p.walk = walk;
            self.finish_pass(&mut p);
            return Ok(Duration::ZERO);
        };
        lock(&self.progress).walk = walk;
        for b in batch {
            self.pacer.take(b.size).await;
            let check = verify(&self.store, &self.bad, device, b.hash).await?;
            let mut p = lock(&self.progress);
            p.walk.passed(b.hash);
            match check {
                Verified::Intact(bytes) => {
                    p.blocks += 1;
                    p.bytes += bytes;
                    inc(&self.metrics.scrub_bytes, bytes);
                }
                Verified::Corrupt => {
                    p.corrupt += 1;
                    inc(&self.metrics.scrub_corrupt, 1);
                }
                Verified::Unreadable => {}
            }
        }
        Ok(Duration::ZERO)
    }

    fn finish_pass(&self, p: &mut Progress) {
        let took = p.started.map(|s| s.elapsed()).unwrap_or_default();
        inc(&self.metrics.scrub_passes, 1);
        tracing::info!(
            blocks = p.blocks,
            bytes = p.bytes,
            corrupt = p.corrupt,
            took = ?took,
            devices = p.walk.devices_done(),
            "scrub pass finished"
        );
        *p = Progress {
            last_started: p.started,
            ..Progress::default()
        };
    }
}

impl Worker for Scrub {
    fn name(&self) -> &'static str {
        "scrub"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        self.scrub_step().await
    }

    fn state(&self) -> Option<&WorkerState> {
        Some(&self.state)
    }
}

/// What re-reading one stored block found.
pub(crate) enum Verified {
    /// Its bytes match its hash; this many.
    Intact(u64),
    /// Quarantined, and queued for its record to go (repair replaces it).
    Corrupt,
    /// Gone since it was listed (garbage collection, trimming), or unreadable.
    Unreadable,
}

/// Re-reads block `hash` on `device` through the store's hash check; a
/// corrupt copy is quarantined by the store and queued on `bad`.
pub(crate) async fn verify(
    store: &Arc<BlockStore>,
    bad: &BadCopies,
    device: u64,
    hash: Hash,
) -> anyhow::Result<Verified> {
    let s = store.clone();
    Ok(
        match tokio::task::spawn_blocking(move || s.get(&hash, Some(device))).await? {
            Ok((_, data)) => Verified::Intact(data.len() as u64),
            Err(StoreError::Corrupt { device, .. }) => {
                tracing::warn!(block = %hash_hex(&hash), device = format!("{device:016x}"), "found a corrupt copy; its record goes and repair replaces it");
                bad.push(hash.to_vec(), device);
                Verified::Corrupt
            }
            Err(StoreError::NotFound(_)) => Verified::Unreadable,
            Err(e) => {
                tracing::warn!(block = %hash_hex(&hash), error = %e, "could not read a block");
                Verified::Unreadable
            }
        },
    )
}

/// A wait as a person reads it: "40s", "12m", "23h".
fn rough(d: Duration) -> String {
    match d.as_secs() {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_read_roughly() {
        assert_eq!(rough(Duration::from_millis(400)), "0s");
        assert_eq!(rough(Duration::from_secs(600)), "10m");
        assert_eq!(rough(Duration::from_secs(86_399)), "23h");
    }
}
