//! Self-repair: the `repair` worker, which on the tracker leader brings
//! blocks back to their copy count, and the queue of bad copies that the
//! `copy-dropper` worker removes from the tracker's records.
//!
//! The leader judges, the plan is `failsafe_core::plan_repair`, and this
//! module only carries it out: fetch a block from a live holder, put it on
//! the devices placement picks (the put verifies the hash), record the new
//! copies. A holder that answers "missing" or "corrupt" loses its record.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failsafe_client::Client;
use failsafe_core::{hash_hex, plan_repair, DeviceView, RepairAction};
use failsafe_proto::pb::{self, command::Op};
use failsafe_tracker::Tracker;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::RepairConfig;
use crate::metrics::{get, inc, Metrics};

/// Copies found missing or corrupt on this host (or by repair elsewhere),
/// waiting for `copy-dropper` to drop their records.
#[derive(Default)]
pub struct BadCopies {
    /// A std Mutex: held for a push or a swap, never across an await.
    items: Mutex<Vec<(Vec<u8>, u64)>>,
    notify: Notify,
}

/// Past this many waiting, more are forgotten: repair finds them again when
/// it reads from them.
const MAX_BAD_PENDING: usize = 4096;

impl BadCopies {
    pub fn push(&self, hash: Vec<u8>, device: u64) {
        {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            if items.len() >= MAX_BAD_PENDING || items.iter().any(|(h, d)| *h == hash && *d == device) {
                return;
            }
            items.push((hash, device));
        }
        self.notify.notify_one();
    }

    /// What is waiting, after up to `wait` for something to arrive.
    pub async fn next_batch(&self, wait: Duration) -> Vec<(Vec<u8>, u64)> {
        if self.is_empty() {
            let _ = tokio::time::timeout(wait, self.notify.notified()).await;
        }
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Returns a batch that could not be dropped, to try again.
    pub fn put_back(&self, batch: Vec<(Vec<u8>, u64)>) {
        for (h, d) in batch {
            self.push(h, d);
        }
    }

    fn is_empty(&self) -> bool {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }
}

/// `(hash, device)` pairs as `BlockCopies`, one per hash.
pub fn group_copies(pairs: &[(Vec<u8>, u64)]) -> Vec<pb::BlockCopies> {
    let mut by_hash: BTreeMap<&[u8], Vec<u64>> = BTreeMap::new();
    for (h, d) in pairs {
        by_hash.entry(h.as_slice()).or_default().push(*d);
    }
    by_hash.into_iter().map(|(h, device_ids)| pb::BlockCopies { hash: h.to_vec(), size: 0, device_ids }).collect()
}

/// Spreads transfers so that they average at most `rate` bytes a second.
struct Pacer {
    rate: u64,
    /// When the next transfer may start. A std Mutex: held for arithmetic.
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer { rate: rate.max(1), next: Mutex::new(Instant::now()) }
    }

    /// Waits for a slot for `bytes`, reserving the time they take at the cap.
    async fn take(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// The repair worker's state, shared with `Admin.Status` and `/metrics`.
pub struct Repair {
    cfg: RepairConfig,
    metrics: Arc<Metrics>,
    bad: Arc<BadCopies>,
    pacer: Pacer,
    /// Where the next round's scan starts among blocks with equal copies.
    /// A std Mutex: held for a clone or an assignment.
    cursor: Mutex<Vec<u8>>,
    state: Mutex<String>,
}

/// A finished copy, or why it did not happen.
enum Outcome {
    Copied { landed: Vec<u64> },
    Failed(String),
}

impl Repair {
    pub fn new(cfg: RepairConfig, metrics: Arc<Metrics>, bad: Arc<BadCopies>) -> Repair {
        let pacer = Pacer::new(cfg.bytes_per_second);
        Repair { cfg, metrics, bad, pacer, cursor: Mutex::new(Vec::new()), state: Mutex::new("starting".into()) }
    }

    pub fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s.into();
    }

    pub fn status(&self) -> pb::RepairStatus {
        pb::RepairStatus {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            blocks: get(&self.metrics.repair_blocks),
            bytes: get(&self.metrics.repair_bytes),
            failures: get(&self.metrics.repair_failures),
        }
    }

    /// Blocks planned per round: enough to keep every slot busy for a while,
    /// few enough that a round's picture is fresh.
    fn batch(&self) -> usize {
        self.cfg.concurrency * 16
    }

    /// One round: on the leader, plan and carry out a batch of copies.
    /// Returns how long to wait before the next round.
    pub async fn round(&self, tracker: &Tracker, client: &Client) -> anyhow::Result<Duration> {
        let after = self.cursor.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let view = match tracker.repair_view(after, self.batch()).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                self.set_state("not leader");
                return Ok(self.cfg.interval);
            }
            Err(e) => {
                self.set_state(format!("error: {e}"));
                return Err(e.into());
            }
        };
        self.metrics.under_replicated.store(view.counts.under_replicated, Ordering::Relaxed);
        let full = view.blocks.len() >= self.batch();
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = view.blocks.last().map(|b| b.hash.clone()).unwrap_or_default();
        let addrs: HashMap<u64, String> = view.devices.iter().map(|(d, a)| (d.candidate.device_id, a.clone())).collect();
        let devices: Vec<DeviceView> = view.devices.into_iter().map(|(d, _)| d).collect();
        let plan = plan_repair(&view.blocks, &devices, tracker.class.copies);
        if plan.is_empty() {
            self.set_state("idle");
            return Ok(self.cfg.interval);
        }
        self.set_state(format!("repairing {} blocks", plan.len()));
        let done: Vec<(RepairAction, Outcome)> = futures::stream::iter(plan)
            .map(|a| async {
                let outcome = self.copy(&a, &addrs, tracker, client).await;
                (a, outcome)
            })
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        let mut copied = 0;
        for (a, outcome) in done {
            match outcome {
                Outcome::Copied { landed } => {
                    copied += landed.len();
                    tracing::info!(block = %hash_hex(&a.hash), copies = a.counted, to = ?landed, "repaired block");
                }
                Outcome::Failed(why) => tracing::warn!(block = %hash_hex(&a.hash), %why, "repair of block failed"),
            }
        }
        self.set_state(format!("idle (last round made {copied} copies)"));
        // A full batch means more work waits: go on at once.
        Ok(if full { Duration::from_millis(10) } else { self.cfg.interval })
    }

    /// Fetches the block from the first live holder that has it intact, puts
    /// it on every target, and records the copies that landed.
    async fn copy(&self, a: &RepairAction, addrs: &HashMap<u64, String>, tracker: &Tracker, client: &Client) -> Outcome {
        let mut data = None;
        let mut why = String::from("no source");
        for &src in &a.sources {
            let Some(addr) = addrs.get(&src) else { continue };
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
                    why = format!("{addr}: {}", s.message());
                }
            }
        }
        let Some(data) = data else {
            inc(&self.metrics.repair_failures, a.targets.len() as u64);
            return Outcome::Failed(format!("no intact copy could be read ({why})"));
        };
        let mut landed = Vec::new();
        for &target in &a.targets {
            let Some(addr) = addrs.get(&target) else { continue };
            self.pacer.take(a.size).await;
            match client.put_block(addr, target, &data).await {
                Ok(()) => {
                    landed.push(target);
                    inc(&self.metrics.repair_blocks, 1);
                    inc(&self.metrics.repair_bytes, data.len() as u64);
                }
                Err(s) => {
                    inc(&self.metrics.repair_failures, 1);
                    why = format!("{addr}: {}", s.message());
                }
            }
        }
        if landed.is_empty() {
            return Outcome::Failed(format!("no target took the copy ({why})"));
        }
        let copies = vec![pb::BlockCopies { hash: a.hash.clone(), size: data.len() as u64, device_ids: landed.clone() }];
        let cmd = pb::Command { op: Some(Op::RecordCopies(pb::RecordCopies { copies })), ..Default::default() };
        match propose(tracker, cmd).await {
            Ok(()) => Outcome::Copied { landed },
            // The copies exist; a later round finds the block short again
            // and the put (idempotent) is recorded then.
            Err(e) => Outcome::Failed(format!("copied to {landed:?} but not recorded: {e}")),
        }
    }
}

/// Proposes a command on this member (the leader) and turns a refusal into
/// an error.
async fn propose(tracker: &Tracker, cmd: pb::Command) -> anyhow::Result<()> {
    match tracker.propose(cmd).await?.result {
        Some(pb::command_result::Result::Error(e)) => anyhow::bail!("refused: {}", e.message),
        _ => Ok(()),
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
    async fn the_pacer_holds_transfers_to_the_cap() {
        tokio::time::pause();
        let p = Pacer::new(1000);
        let start = Instant::now();
        p.take(500).await;
        p.take(500).await;
        p.take(500).await;
        // The third 500-byte transfer may start only after 1000 bytes' time.
        assert!(start.elapsed() >= Duration::from_millis(999), "{:?}", start.elapsed());
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
