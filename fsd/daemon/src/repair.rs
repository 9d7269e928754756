//! Self-repair: the `repair` worker, which on the tracker leader brings
//! blocks back to their copy count (and trims copies beyond it, and when
//! there is nothing else to do, moves copies toward where placement wants
//! them), and the queue of bad copies that the `copy-dropper` worker
//! removes from the tracker's records.
//!
//! The leader judges, the plans are `failsafe_core::plan_repair`,
//! `plan_trim` and `plan_rebalance`, and this module only carries them out:
//! fetch a block from a live holder, put it on the devices placement picks
//! (the put verifies the hash), record the new copies. A holder that
//! answers "missing" or "corrupt" loses its record. An extra copy loses its
//! record first (`DropCopies`, which keeps the copy count whatever changed
//! since the plan), and its holder is asked to delete it only once the
//! record is gone.
//!
//! The `copy-dropper` worker drops the records of the bad copies queued on
//! `BadCopies`, in batches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failsafe_client::Client;
use failsafe_core::{
    hash_hex, plan_rebalance, plan_repair, plan_trim, BlockView, DeviceView, HostHealth,
    RepairAction, TrimAction,
};
use failsafe_proto::pb::{self, command::Op};
use failsafe_tracker::{Tracker, TrackerError};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::cluster::{Cluster, ClusterError};
use crate::config::RepairConfig;
use crate::lock::lock;
use crate::metrics::{get, inc, Metrics};
use crate::pace::Pacer;
use crate::worker::{Worker, WorkerState};

/// Copies found missing or corrupt on this host (or by repair elsewhere),
/// waiting for `copy-dropper` to drop their records.
#[derive(Default)]
pub(crate) struct BadCopies {
    /// A std Mutex: held for a push or a swap, never across an await.
    items: Mutex<Vec<(Vec<u8>, u64)>>,
    notify: Notify,
}

/// Past this many waiting, more are forgotten: repair finds them again when
/// it reads from them.
const MAX_BAD_PENDING: usize = 4096;

impl BadCopies {
    pub(crate) fn push(&self, hash: Vec<u8>, device: u64) {
        {
            let mut items = lock(&self.items);
            if items.len() >= MAX_BAD_PENDING
                || items.iter().any(|(h, d)| *h == hash && *d == device)
            {
                return;
            }
            items.push((hash, device));
        }
        self.notify.notify_one();
    }

    /// What is waiting, after up to `wait` for something to arrive.
    pub(crate) async fn next_batch(&self, wait: Duration) -> Vec<(Vec<u8>, u64)> {
        if self.is_empty() {
            let _ = tokio::time::timeout(wait, self.notify.notified()).await;
        }
        std::mem::take(&mut *lock(&self.items))
    }

    /// Returns a batch that could not be dropped, to try again.
    pub(crate) fn put_back(&self, batch: Vec<(Vec<u8>, u64)>) {
        for (h, d) in batch {
            self.push(h, d);
        }
    }

    fn is_empty(&self) -> bool {
        lock(&self.items).is_empty()
    }
}

/// `(hash, device)` pairs as `BlockCopies`, one per hash.
pub(crate) fn group_copies(pairs: &[(Vec<u8>, u64)]) -> Vec<pb::BlockCopies> {
    let mut by_hash: BTreeMap<&[u8], Vec<u64>> = BTreeMap::new();
    for (h, d) in pairs {
        by_hash.entry(h.as_slice()).or_default().push(*d);
    }
    by_hash
        .into_iter()
        .map(|(h, device_ids)| pb::BlockCopies {
            hash: h.to_vec(),
            size: 0,
            device_ids,
        })
        .collect()
}

/// The repair worker's state, shared with `Admin.Status` and `/metrics`.
pub(crate) struct Repair {
    cfg: RepairConfig,
    cluster: Arc<Cluster>,
    /// A trimmed copy stored more recently than this stays on disk (a client
    /// may have just put it again); the holder's sweep deletes it later.
    grace: Duration,
    metrics: Arc<Metrics>,
    bad: Arc<BadCopies>,
    pacer: Pacer,
    /// Where the next round's scan starts among blocks with equal copies,
    /// and among blocks with extra copies. A std Mutex: held for a clone or
    /// an assignment.
    cursor: Mutex<Vec<u8>>,
    extra_cursor: Mutex<Vec<u8>>,
    /// Where rebalancing looks next (all referenced blocks, in hash order).
    rebalance_cursor: Mutex<Vec<u8>>,
    state: WorkerState,
}

/// Blocks rebalancing looks at per round.
const REBALANCE_SLICE: usize = 256;

/// Why a copy of a block did not land, or did not count.
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("no source")]
    NoSource,
    #[error("target has no address")]
    NoAddress,
    /// A host answered with an error.
    #[error("{addr}: {message}")]
    Host { addr: String, message: String },
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error("no intact copy could be read ({0})")]
    NoIntactCopy(Box<CopyError>),
    #[error("no target took the copy ({0})")]
    NoTarget(Box<CopyError>),
    #[error("no copy landed")]
    NothingLanded,
    /// The copies exist; a later round finds the block short again and the
    /// put (idempotent) is recorded then.
    #[error("copied to {landed:?} but not recorded: {error}")]
    NotRecorded {
        landed: Vec<u64>,
        error: ClusterError,
    },
}

impl CopyError {
    fn host(addr: &str, status: &tonic::Status) -> CopyError {
        CopyError::Host {
            addr: addr.to_string(),
            message: status.message().to_string(),
        }
    }
}

impl Repair {
    pub(crate) fn new(
        cfg: RepairConfig,
        grace: Duration,
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        bad: Arc<BadCopies>,
    ) -> Repair {
        let pacer = Pacer::new(cfg.bytes_per_second);
        Repair {
            cfg,
            cluster,
            grace,
            metrics,
            bad,
            pacer,
            cursor: Mutex::default(),
            extra_cursor: Mutex::default(),
            rebalance_cursor: Mutex::default(),
            state: WorkerState::new("starting"),
        }
    }

    pub(crate) fn status(&self) -> pb::RepairStatus {
        pb::RepairStatus {
            state: self.state.get(),
            blocks: get(&self.metrics.repair_blocks),
            bytes: get(&self.metrics.repair_bytes),
            failures: get(&self.metrics.repair_failures),
            trimmed: get(&self.metrics.copies_trimmed),
        }
    }

    /// Blocks planned per round: enough to keep every slot busy for a while,
    /// few enough that a round's picture is fresh.
    fn batch(&self) -> usize {
        self.cfg.concurrency * 16
    }

    /// On the leader, one round of repair; elsewhere, nothing.
    async fn repair_step(&self) -> anyhow::Result<Duration> {
        let tracker = self.cluster.tracker();
        if !tracker.is_leader() {
            self.state.set("not leader");
            return Ok(self.cfg.interval);
        }
        let client = self.cluster.block_client().await?;
        self.round(tracker, &client).await
    }

    /// One round: on the leader, plan and carry out a batch of copies, then
    /// a batch of trims. Returns how long to wait before the next round.
    async fn round(&self, tracker: &Tracker, client: &Client) -> anyhow::Result<Duration> {
        let after = lock(&self.cursor).clone();
        let extra_after = lock(&self.extra_cursor).clone();
        let Some(view) = tracker
            .repair_view(after, extra_after, self.batch())
            .await?
        else {
            self.state.set("not leader");
            return Ok(self.cfg.interval);
        };
        self.metrics
            .under_replicated
            .store(view.counts.under_replicated, Ordering::Relaxed);
        let down: std::collections::BTreeSet<u64> = view
            .devices
            .iter()
            .filter(|(d, _)| matches!(d.health, HostHealth::Down | HostHealth::Dead))
            .map(|(d, _)| d.candidate.host_id)
            .collect();
        self.metrics
            .hosts_down
            .store(down.len() as u64, Ordering::Relaxed);
        let full = view.blocks.len() >= self.batch() || view.extra.len() >= self.batch();
        *lock(&self.cursor) = view
            .blocks
            .last()
            .map(|b| b.hash.clone())
            .unwrap_or_default();
        *lock(&self.extra_cursor) = view
            .extra
            .last()
            .map(|b| b.hash.clone())
            .unwrap_or_default();
        let addrs: HashMap<u64, String> = view
            .devices
            .iter()
            .map(|(d, a)| (d.candidate.device_id, a.clone()))
            .collect();
        let devices: Vec<DeviceView> = view.devices.into_iter().map(|(d, _)| d).collect();
        let mut plan = plan_repair(&view.blocks, &devices, tracker.class.copies);
        for a in &mut plan {
            a.sources.retain(|d| !view.no_source.contains(d));
        }
        let trims = plan_trim(&view.extra, &devices, tracker.class.copies);
        let trims = self
            .confirm_kept(trims, &view.extra, &devices, &addrs, client)
            .await;
        if plan.is_empty() && trims.is_empty() {
            // Nothing short and nothing extra: move copies toward placement
            // (a new box gets its share), a slice of the blocks per round.
            let after = lock(&self.rebalance_cursor).clone();
            let blocks = tracker.referenced_after(after, REBALANCE_SLICE).await?;
            *lock(&self.rebalance_cursor) =
                blocks.last().map(|b| b.hash.clone()).unwrap_or_default();
            let mut moves = plan_rebalance(&blocks, &devices, tracker.class.copies);
            for a in &mut moves {
                a.sources.retain(|d| !view.no_source.contains(d));
            }
            moves.retain(|a| !a.sources.is_empty());
            if moves.is_empty() {
                self.state.set("idle");
                return Ok(if blocks.len() == REBALANCE_SLICE {
                    Duration::from_millis(10)
                } else {
                    self.cfg.interval
                });
            }
            self.state
                .set(format!("rebalancing {} blocks", moves.len()));
            let copied = self.repair(moves, &addrs, tracker, client).await;
            inc(&self.metrics.rebalance_copies, copied as u64);
            self.state.set(format!(
                "idle (last round made {copied} copies for balance)"
            ));
            return Ok(Duration::from_millis(10));
        }
        let copied = self.repair(plan, &addrs, tracker, client).await;
        let trimmed = if trims.is_empty() {
            0
        } else {
            self.state.set(format!("trimming {} blocks", trims.len()));
            self.trim(trims, &addrs, tracker, client).await?
        };
        self.state.set(format!(
            "idle (last round made {copied} copies, trimmed {trimmed})"
        ));
        // A full batch means more work waits: go on at once.
        Ok(if full {
            Duration::from_millis(10)
        } else {
            self.cfg.interval
        })
    }

    /// Carries out a repair plan; returns the copies made.
    async fn repair(
        &self,
        plan: Vec<RepairAction>,
        addrs: &HashMap<u64, String>,
        tracker: &Tracker,
        client: &Client,
    ) -> usize {
        if plan.is_empty() {
            return 0;
        }
        self.state.set(format!("repairing {} blocks", plan.len()));
        let done: Vec<(RepairAction, Result<Vec<u64>, CopyError>)> = futures::stream::iter(plan)
            .map(|a| async {
                let outcome = self.copy(&a, addrs, tracker, client).await;
                (a, outcome)
            })
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        let mut copied = 0;
        for (a, outcome) in done {
            match outcome {
                Ok(landed) => {
                    copied += landed.len();
                    tracing::info!(block = %hash_hex(&a.hash), copies = a.counted, to = ?landed, "repaired block");
                }
                Err(why) => {
                    tracing::warn!(block = %hash_hex(&a.hash), %why, "repair of block failed")
                }
            }
        }
        copied
    }

    /// Keeps the trims whose remaining copies are really there: a record
    /// says a copy exists, and a trim trusts the others when it deletes one.
    /// A kept copy its holder lacks is queued as a bad copy (repair then
    /// replaces it); its block is not trimmed this round, nor one whose
    /// holders could not be asked.
    async fn confirm_kept(
        &self,
        plan: Vec<TrimAction>,
        blocks: &[BlockView],
        devices: &[DeviceView],
        addrs: &HashMap<u64, String>,
        client: &Client,
    ) -> Vec<TrimAction> {
        let up: BTreeSet<u64> = devices
            .iter()
            .filter(|d| d.health == HostHealth::Up)
            .map(|d| d.candidate.device_id)
            .collect();
        let mut asks: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for a in &plan {
            let Some(b) = blocks.iter().find(|b| b.hash == a.hash) else {
                continue;
            };
            for d in b
                .holders
                .iter()
                .filter(|d| up.contains(d) && !a.drop.contains(d))
            {
                asks.entry(*d).or_default().push(a.hash.clone());
            }
        }
        let answers = futures::stream::iter(asks)
            .map(|(device, hashes)| async move {
                let found = match addrs.get(&device) {
                    Some(addr) => client.has_blocks(addr, device, &hashes).await.ok(),
                    None => None,
                };
                (device, hashes, found)
            })
            .buffer_unordered(self.cfg.concurrency)
            .collect::<Vec<_>>()
            .await;
        let mut unsure: BTreeSet<Vec<u8>> = BTreeSet::new();
        for (device, hashes, found) in answers {
            match found {
                Some(found) => {
                    for (hash, there) in hashes.into_iter().zip(found) {
                        if !there {
                            tracing::warn!(block = %hash_hex(&hash), device = format!("{device:016x}"), "recorded copy is missing");
                            self.bad.push(hash.clone(), device);
                            unsure.insert(hash);
                        }
                    }
                }
                None => unsure.extend(hashes),
            }
        }
        plan.into_iter()
            .filter(|a| !unsure.contains(&a.hash))
            .collect()
    }

    /// Carries out a trim plan: drops the extra copies' records (keeping the
    /// copy count whatever changed since the plan), then asks the holders
    /// of the copies whose records are gone to delete them. Returns the
    /// records dropped.
    async fn trim(
        &self,
        plan: Vec<TrimAction>,
        addrs: &HashMap<u64, String>,
        tracker: &Tracker,
        client: &Client,
    ) -> anyhow::Result<usize> {
        let copies: Vec<pb::BlockCopies> = plan
            .iter()
            .map(|a| pb::BlockCopies {
                hash: a.hash.clone(),
                size: 0,
                device_ids: a.drop.clone(),
            })
            .collect();
        let keep = tracker.class.copies as u32;
        self.cluster
            .propose(Op::DropCopies(pb::DropCopies { copies, keep }))
            .await?;
        let now = tracker
            .recorded(plan.iter().map(|a| a.hash.clone()).collect())
            .await?;
        let mut deletes = Vec::new();
        let mut dropped = 0;
        for (a, recorded) in plan.iter().zip(now) {
            let recorded = recorded.unwrap_or_default();
            for &device in a.drop.iter().filter(|d| !recorded.contains(d)) {
                dropped += 1;
                tracing::debug!(block = %hash_hex(&a.hash), device = format!("{device:016x}"), "trimmed an extra copy");
                if let Some(addr) = addrs.get(&device) {
                    deletes.push((a.hash.clone(), device, addr.clone()));
                }
            }
        }
        inc(&self.metrics.copies_trimmed, dropped as u64);
        let grace = self.grace;
        futures::stream::iter(deletes)
            .map(|(hash, device, addr)| async move {
                match client.delete_block(&addr, device, &hash, grace).await {
                    Ok(r) if r.kept => {
                        tracing::debug!(block = %hash_hex(&hash), %addr, "trimmed copy stored too recently to delete; its host sweeps it later")
                    }
                    Ok(_) => {}
                    Err(s) => {
                        tracing::debug!(block = %hash_hex(&hash), %addr, error = %s.message(), "deleting a trimmed copy failed; its host sweeps it later")
                    }
                }
            })
            .buffer_unordered(self.cfg.concurrency)
            .collect::<Vec<()>>()
            .await;
        if dropped > 0 {
            tracing::info!(
                copies = dropped,
                blocks = plan.len(),
                "trimmed copies beyond the copy count"
            );
        }
        Ok(dropped)
    }

    /// Fetches the block from the first live holder that has it intact, puts
    /// it on every target, and records the copies that landed.
    async fn copy(
        &self,
        a: &RepairAction,
        addrs: &HashMap<u64, String>,
        tracker: &Tracker,
        client: &Client,
    ) -> Result<Vec<u64>, CopyError> {
        let mut landed = Vec::new();
        let mut full = Vec::new();
        // A target that holds an older version of the block gets a delta.
        for &target in &a.targets {
            match self.copy_as_delta(a, target, addrs, tracker, client).await {
                Ok(true) => landed.push(target),
                Ok(false) => full.push(target),
                Err(why) => {
                    tracing::debug!(block = %hash_hex(&a.hash), %why, "delta copy failed; sending the whole block");
                    full.push(target);
                }
            }
        }
        if !full.is_empty() {
            match self.copy_whole(a, &full, addrs, client).await {
                Ok(more) => landed.extend(more),
                Err(why) if landed.is_empty() => return Err(why),
                Err(why) => {
                    tracing::warn!(block = %hash_hex(&a.hash), %why, "some copies of a block did not land")
                }
            }
        }
        self.record(a, landed).await
    }

    /// Sends block `a` to `target` as a delta against an older version
    /// recorded there: the target's signature of it, a source's delta, the
    /// target applies and verifies it. Ok(false): no older version to use.
    async fn copy_as_delta(
        &self,
        a: &RepairAction,
        target: u64,
        addrs: &HashMap<u64, String>,
        tracker: &Tracker,
        client: &Client,
    ) -> Result<bool, CopyError> {
        let Some(base) = tracker.delta_base(a.hash.clone(), target).await? else {
            return Ok(false);
        };
        let taddr = addrs.get(&target).ok_or(CopyError::NoAddress)?;
        let signature = client
            .block_signature(taddr, target, &base)
            .await
            .map_err(|s| CopyError::host(taddr, &s))?;
        let sig_len = signature.len() as u64;
        let mut why = CopyError::NoSource;
        for &src in &a.sources {
            let Some(saddr) = addrs.get(&src) else {
                continue;
            };
            let delta = match client
                .block_delta(saddr, src, &a.hash, signature.clone())
                .await
            {
                Ok(d) => d,
                Err(s) => {
                    why = CopyError::host(saddr, &s);
                    continue;
                }
            };
            // A delta no smaller than the block is no gain.
            if delta.len() as u64 >= a.size {
                return Ok(false);
            }
            let sent = delta.len() as u64;
            self.pacer.take(sent + sig_len).await;
            client
                .put_delta(taddr, target, &a.hash, &base, delta)
                .await
                .map_err(|s| CopyError::host(taddr, &s))?;
            inc(&self.metrics.repair_blocks, 1);
            inc(&self.metrics.repair_bytes, sent);
            inc(&self.metrics.repair_delta_blocks, 1);
            inc(&self.metrics.repair_delta_bytes, sent);
            inc(&self.metrics.repair_signature_bytes, sig_len);
            return Ok(true);
        }
        Err(why)
    }

    /// Reads block `a` from a live holder and puts it whole on `targets`;
    /// returns those it landed on.
    async fn copy_whole(
        &self,
        a: &RepairAction,
        targets: &[u64],
        addrs: &HashMap<u64, String>,
        client: &Client,
    ) -> Result<Vec<u64>, CopyError> {
        let mut data = None;
        let mut why = CopyError::NoSource;
        for &src in &a.sources {
            let Some(addr) = addrs.get(&src) else {
                continue;
            };
            self.pacer.take(a.size).await;
            match client.get_block(addr, src, &a.hash).await {
                Ok(d) => {
                    data = Some(d);
                    break;
                }
                Err(s) => {
                    if matches!(s.code(), tonic::Code::NotFound | tonic::Code::DataLoss) {
                        // The record lies: forget it, and the block is
                        // judged again without it next round.
                        tracing::warn!(block = %hash_hex(&a.hash), device = format!("{src:016x}"), %addr, error = %s.message(), "recorded copy is missing or corrupt");
                        self.bad.push(a.hash.clone(), src);
                    }
                    why = CopyError::host(addr, &s);
                }
            }
        }
        let Some(data) = data else {
            inc(&self.metrics.repair_failures, targets.len() as u64);
            return Err(CopyError::NoIntactCopy(Box::new(why)));
        };
        let mut landed = Vec::new();
        for &target in targets {
            let Some(addr) = addrs.get(&target) else {
                continue;
            };
            self.pacer.take(a.size).await;
            match client.put_block(addr, target, &data).await {
                Ok(()) => {
                    landed.push(target);
                    inc(&self.metrics.repair_blocks, 1);
                    inc(&self.metrics.repair_bytes, data.len() as u64);
                }
                Err(s) => {
                    inc(&self.metrics.repair_failures, 1);
                    why = CopyError::host(addr, &s);
                }
            }
        }
        if landed.is_empty() {
            return Err(CopyError::NoTarget(Box::new(why)));
        }
        Ok(landed)
    }

    /// Records the copies that landed.
    async fn record(&self, a: &RepairAction, landed: Vec<u64>) -> Result<Vec<u64>, CopyError> {
        if landed.is_empty() {
            return Err(CopyError::NothingLanded);
        }
        let copies = vec![pb::BlockCopies {
            hash: a.hash.clone(),
            size: a.size,
            device_ids: landed.clone(),
        }];
        match self
            .cluster
            .propose(Op::RecordCopies(pb::RecordCopies { copies }))
            .await
        {
            Ok(()) => Ok(landed),
            Err(error) => Err(CopyError::NotRecorded { landed, error }),
        }
    }
}

impl Worker for Repair {
    fn name(&self) -> &'static str {
        "repair"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        self.repair_step().await
    }

    fn state(&self) -> Option<&WorkerState> {
        Some(&self.state)
    }
}

/// The `copy-dropper` worker: drops the records of copies found missing or
/// corrupt, in batches.
pub(crate) struct CopyDropper {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) bad: Arc<BadCopies>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Worker for CopyDropper {
    fn name(&self) -> &'static str {
        "copy-dropper"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        let batch = self.bad.next_batch(Duration::from_secs(1)).await;
        if batch.is_empty() {
            return Ok(Duration::ZERO);
        }
        let op = Op::DropCopies(pb::DropCopies {
            copies: group_copies(&batch),
            keep: 0,
        });
        match self.cluster.propose(op).await {
            Ok(()) => {
                inc(&self.metrics.copies_dropped, batch.len() as u64);
                for (h, d) in &batch {
                    tracing::info!(block = %hash_hex(h), device = format!("{d:016x}"), "dropped the record of a bad copy");
                }
                Ok(Duration::ZERO)
            }
            Err(e) => {
                self.bad.put_back(batch);
                Err(anyhow::Error::new(e).context("dropping bad copy records"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_group_by_hash() {
        let g = group_copies(&[(vec![1], 10), (vec![2], 20), (vec![1], 11)]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].device_ids, vec![10, 11]);
        assert_eq!(g[1].device_ids, vec![20]);
    }

    #[tokio::test]
    async fn bad_copies_are_deduplicated_and_wait_for_a_taker() {
        let b = BadCopies::default();
        b.push(vec![1], 1);
        b.push(vec![1], 1);
        b.push(vec![1], 2);
        assert_eq!(b.next_batch(Duration::from_millis(1)).await.len(), 2);
        assert!(b.next_batch(Duration::from_millis(1)).await.is_empty());
    }
}
