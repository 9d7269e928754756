//! The `blockify` worker, on the tracker leader: turns inline extents (small
//! writes that travelled inside their Raft entry) into content-addressed
//! blocks once they are older than `blockify_after_ms`, so the state machine
//! and its snapshots do not keep file data for long.
//!
//! A step reads a bounded batch of old inline extents from the leader's
//! applied state (only committed writes: it never runs ahead of a writer),
//! joins each file's adjacent ones into a block, stores the block as a
//! client write does (placement, the write quorum of copies), then proposes
//! one `ReplaceInline` per block. That command replaces the inline extents
//! only if each is still exactly what was read, and records the copies in
//! the same entry; otherwise it changes nothing (`CHANGED`) and the stored
//! block, unrecorded, is left to garbage collection's sweep. Proposing it
//! again is safe for the same reason: once applied, the extents are no
//! longer inline, so a repeat is refused and changes nothing.
//!
//! A step stores its blocks in one put and proposes its replacements side
//! by side (group commit folds them into a few entries). While a backlog
//! lasts, each step is followed by a pause of three times its length, so
//! turning 10,000 files just written into blocks takes a quarter of the
//! cluster's time at most and slows no client noticeably.

use std::sync::Arc;
use std::time::Duration;

use failsafe_core::{block_hash, Extent, MAX_BLOCK_BYTES};
use failsafe_proto::pb::{self, command::Op, command_result::Result as R, ErrorCode};

use crate::cluster::Cluster;
use crate::config::BlockifyConfig;
use crate::metrics::{get, inc, Metrics};
use crate::worker::{Worker, WorkerState};

/// Inline extents read per step.
const BATCH: usize = 256;
/// Bytes stored as blocks per step, at most (and one block at least).
const STEP_BYTES: usize = 8 << 20;
/// While a backlog lasts, steps take at most one part in this many of the
/// time.
const SHARE: u32 = 4;

/// The blockifier's state, shared with `Admin.Status`.
pub(crate) struct Blockify {
    cfg: BlockifyConfig,
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    state: WorkerState,
}

/// Adjacent inline extents of one file that become one block.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    ino: u64,
    extents: Vec<Extent>,
}

impl Run {
    fn bytes(&self) -> usize {
        self.extents
            .iter()
            .map(|e| e.inline.as_ref().map_or(0, |i| i.data.len()))
            .sum()
    }
}

/// Groups `found` (in file and offset order) into runs: a file's extents
/// that follow one another without a gap, up to a block's size each, and
/// at most about `budget` bytes in all.
fn runs(found: Vec<(u64, Extent)>, budget: usize) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut total = 0usize;
    for (ino, e) in found {
        let len = e.inline.as_ref().map_or(0, |i| i.data.len());
        if len == 0 {
            continue;
        }
        if total > 0 && total + len > budget {
            break;
        }
        total += len;
        let joins = out.last().is_some_and(|r| {
            r.ino == ino
                && r.extents.last().is_some_and(|last| last.end() == e.offset)
                && r.bytes() + len <= MAX_BLOCK_BYTES
        });
        match out.last_mut() {
            Some(r) if joins => r.extents.push(e),
            _ => out.push(Run {
                ino,
                extents: vec![e],
            }),
        }
    }
    out
}

/// The block of a run: its extents' bytes one after the other.
fn block_of(run: &Run) -> Vec<u8> {
    run.extents
        .iter()
        .filter_map(|e| e.inline.as_ref())
        .flat_map(|i| i.data.iter().copied())
        .collect()
}

/// The command that puts block `hash` (the run's bytes, stored on `copies`)
/// in the place of the run's inline extents.
fn replacement(run: &Run, hash: &[u8], copies: Vec<pb::BlockCopies>) -> Op {
    let mut at = 0u64;
    let mut extents = Vec::with_capacity(run.extents.len());
    let mut inline_hashes = Vec::with_capacity(run.extents.len());
    for e in &run.extents {
        let data = e.inline.as_ref().map_or(&[][..], |i| i.data.as_slice());
        extents.push(pb::Extent {
            offset: e.offset,
            length: e.length,
            hash: hash.to_vec(),
            block_offset: at,
            data: Vec::new(),
        });
        inline_hashes.push(block_hash(data).to_vec());
        at += e.length;
    }
    Op::ReplaceInline(pb::ReplaceInline {
        ino: run.ino,
        extents,
        inline_hashes,
        copies,
    })
}

impl Blockify {
    pub(crate) fn new(cfg: BlockifyConfig, cluster: Arc<Cluster>, metrics: Arc<Metrics>) -> Self {
        Blockify {
            cfg,
            cluster,
            metrics,
            state: WorkerState::new("starting"),
        }
    }

    pub(crate) fn status(&self) -> pb::BlockifyStatus {
        pb::BlockifyStatus {
            state: self.state.get(),
            extents: get(&self.metrics.blockify_extents),
            bytes: get(&self.metrics.blockify_bytes),
            changed: get(&self.metrics.blockify_changed),
        }
    }

    /// How often it looks: a few times per age, between 100 ms and 5 s.
    fn interval(&self) -> Duration {
        (self.cfg.after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    async fn blockify_step(&self) -> anyhow::Result<Duration> {
        let tracker = self.cluster.tracker();
        if tracker.cluster.get().is_empty() || !tracker.is_initialized() {
            self.state.set("not in a cluster");
            return Ok(Duration::from_millis(500));
        }
        let Some(found) = tracker.old_inline(self.cfg.after, BATCH).await? else {
            self.state.set("not leader");
            return Ok(self.interval());
        };
        if found.is_empty() {
            self.state.set("idle");
            return Ok(self.interval());
        }
        let full = found.len() == BATCH;
        let runs = runs(found, STEP_BYTES);
        self.state
            .set(format!("storing {} inline runs as blocks", runs.len()));
        let started = tokio::time::Instant::now();
        let client = self.cluster.block_client().await?;
        // Every run's block in one put (several in flight), then every
        // replacement at once: group commit makes them a few log entries
        // instead of one each.
        let blocks: Vec<Vec<u8>> = runs.iter().map(block_of).collect();
        let copies = client.put_blocks(&blocks).await?;
        let proposals = runs
            .iter()
            .zip(&blocks)
            .zip(copies)
            .map(|((run, block), copies)| {
                let cmd = pb::Command {
                    op: Some(replacement(run, &block_hash(block), vec![copies])),
                    ..Default::default()
                };
                async move { (run, tracker.propose(cmd).await) }
            });
        for (run, proposed) in futures::future::join_all(proposals).await {
            match proposed?.result {
                Some(R::Error(e)) if e.code == ErrorCode::Changed as i32 => {
                    // Written again since it was read: the new bytes have
                    // their own age; this block is garbage.
                    inc(&self.metrics.blockify_changed, 1);
                }
                // Deleted meanwhile: nothing to replace either.
                Some(R::Error(e)) if e.code == ErrorCode::NotFound as i32 => {
                    inc(&self.metrics.blockify_changed, 1);
                }
                Some(R::Error(e)) => {
                    anyhow::bail!(
                        "replacing inline extents of inode {}: {}",
                        run.ino,
                        e.message
                    )
                }
                _ => {
                    inc(&self.metrics.blockify_extents, run.extents.len() as u64);
                    inc(&self.metrics.blockify_bytes, run.bytes() as u64);
                }
            }
        }
        self.state.set("idle");
        Ok(if full {
            // A backlog (10,000 small files just written) goes on after a
            // pause, so the work is at most one part in `SHARE` of the time
            // and never crowds out client traffic; a step slowed by that
            // traffic waits longer.
            started.elapsed() * (SHARE - 1)
        } else {
            self.interval()
        })
    }
}

impl Worker for Blockify {
    fn name(&self) -> &'static str {
        "blockify"
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        self.blockify_step().await
    }

    fn state(&self) -> Option<&WorkerState> {
        Some(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(offset: u64, data: &[u8]) -> Extent {
        Extent::inline(offset, data.to_vec(), 1)
    }

    #[test]
    fn a_files_adjacent_inline_extents_make_one_block_within_the_budget() {
        let found = vec![
            (2, inline(0, b"abc")),
            (2, inline(3, b"de")),
            // A gap: a block of its own.
            (2, inline(10, b"f")),
            (3, inline(11, b"g")),
            (3, inline(12, b"hij")),
        ];
        let shape = |rs: &[Run]| -> Vec<(u64, Vec<u64>)> {
            rs.iter()
                .map(|r| (r.ino, r.extents.iter().map(|e| e.offset).collect()))
                .collect()
        };
        let all = runs(found.clone(), usize::MAX);
        assert_eq!(
            shape(&all),
            vec![(2, vec![0, 3]), (2, vec![10]), (3, vec![11, 12])]
        );
        // The budget stops the step, but never before one extent.
        assert_eq!(
            shape(&runs(found.clone(), 6)),
            vec![(2, vec![0, 3]), (2, vec![10])]
        );
        assert_eq!(shape(&runs(found, 1)), vec![(2, vec![0])]);
    }

    #[test]
    fn the_replacement_points_each_extent_into_the_block_and_names_what_it_read() {
        let run = Run {
            ino: 5,
            extents: vec![inline(100, b"hello "), inline(106, b"world")],
        };
        assert_eq!(block_of(&run), b"hello world");
        let hash = block_hash(b"hello world").to_vec();
        let op = replacement(&run, &hash, Vec::new());
        let Op::ReplaceInline(r) = op else {
            panic!("{op:?}")
        };
        assert_eq!(r.ino, 5);
        let placed: Vec<(u64, u64, u64)> = r
            .extents
            .iter()
            .map(|e| {
                assert_eq!(e.hash, hash);
                (e.offset, e.length, e.block_offset)
            })
            .collect();
        assert_eq!(placed, vec![(100, 6, 0), (106, 5, 6)]);
        assert_eq!(
            r.inline_hashes,
            vec![
                block_hash(b"hello ").to_vec(),
                block_hash(b"world").to_vec()
            ]
        );
    }
}
