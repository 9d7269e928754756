//! Group commit: commands proposed at about the same time — by every mount
//! and by this host's own workers — share one log entry, and so one log
//! fsync on each member and one replication round trip.
//!
//! A command proposed while fewer than [`IN_FLIGHT`] entries are on their
//! way goes at once, alone (straight from its proposer's task when nothing
//! is queued); the ones that arrive while the pipeline is full wait and
//! then leave together as one `Batch`. A lone writer therefore pays
//! nothing extra, and sixteen writers pay about one commit each instead of
//! sixteen in a row. Each command in a batch keeps its operation id and
//! gets its own savepoint and result (`state::apply`), so a refused one
//! fails alone and a retried one is answered from its first application.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use failsafe_proto::pb::{self, command::Op, command_result::Result as R};
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::TrackerError;
use crate::raft::{NodeId, Raft};

/// Entries proposed and not yet applied. Two keep the leader's log fsync
/// for one entry overlapping the replication of the one before it.
const IN_FLIGHT: usize = 2;
/// At most this many commands in one entry...
pub(super) const MAX_COMMANDS: usize = 256;
/// ...and about this many bytes (a command with inline data may carry up to
/// 64 KiB; an entry stays well below the largest Raft message).
const MAX_BYTES: usize = 1024 * 1024;
/// Proposals waiting for a place in an entry; a full queue makes proposers
/// wait, which is the back-pressure the mounts feel.
const QUEUE: usize = 4096;

type Answer = Result<Vec<pb::CommandResult>, TrackerError>;

/// One proposer's commands (one, or a delegate's flush: several, kept
/// together and in order in one entry) and where their results go.
struct Pending {
    cmds: Vec<pb::Command>,
    reply: oneshot::Sender<Answer>,
    /// When it was proposed.
    since: Instant,
}

/// The way into the log for every command.
pub(super) struct GroupCommit {
    queue: mpsc::Sender<Pending>,
    counts: Arc<Counts>,
    raft: Raft,
    in_flight: Arc<Semaphore>,
}

/// What group commit did since this member started: log entries it
/// proposed, commands in them, entries that held more than one, and where
/// the time went.
#[derive(Debug, Default)]
struct Counts {
    entries: AtomicU64,
    commands: AtomicU64,
    batches: AtomicU64,
    waited_ns: AtomicU64,
    committed_ns: AtomicU64,
    entry_ns: AtomicU64,
}

/// A reading of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCounts {
    pub entries: u64,
    pub commands: u64,
    pub batches: u64,
    /// Summed over commands: from the proposal to its entry's leaving for
    /// the log (waiting for room in the pipeline and for the batch).
    pub waited_ns: u64,
    /// Summed over commands: from the proposal to the result.
    pub committed_ns: u64,
    /// Summed over entries: from leaving for the log to applied here.
    pub entry_ns: u64,
}

impl Counts {
    fn add(&self, commands: usize) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands as u64, Ordering::Relaxed);
        if commands > 1 {
            self.batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self) -> GroupCounts {
        GroupCounts {
            entries: self.entries.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            waited_ns: self.waited_ns.load(Ordering::Relaxed),
            committed_ns: self.committed_ns.load(Ordering::Relaxed),
            entry_ns: self.entry_ns.load(Ordering::Relaxed),
        }
    }

    /// Counts the time of one entry of `group`, which left for the log at
    /// `left` and was applied (or failed) now.
    fn timed(&self, group: &[(usize, Instant)], left: Instant) {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let now = Instant::now();
        let (mut waited, mut committed) = (0u64, 0u64);
        for &(n, since) in group {
            let n = n as u64;
            waited = waited.saturating_add(ns(left.saturating_duration_since(since)) * n);
            committed = committed.saturating_add(ns(now.saturating_duration_since(since)) * n);
        }
        self.waited_ns.fetch_add(waited, Ordering::Relaxed);
        self.committed_ns.fetch_add(committed, Ordering::Relaxed);
        self.entry_ns
            .fetch_add(ns(now.saturating_duration_since(left)), Ordering::Relaxed);
    }
}

impl GroupCommit {
    /// Starts the task that forms and proposes entries; it ends when the
    /// `GroupCommit` is dropped.
    pub(super) fn start(raft: Raft) -> GroupCommit {
        let (queue, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(raft.clone(), rx, counts.clone(), in_flight.clone()));
        GroupCommit {
            queue,
            counts,
            raft,
            in_flight,
        }
    }

    pub(super) fn counts(&self) -> GroupCounts {
        self.counts.read()
    }

    /// Proposes `cmd` (already validated and stamped) and returns its result
    /// once it is applied.
    pub(super) async fn propose(
        &self,
        cmd: pb::Command,
    ) -> Result<pb::CommandResult, TrackerError> {
        let mut results = self.propose_all(vec![cmd]).await?;
        results.pop().ok_or_else(|| malformed(1))
    }

    /// Proposes `cmds` together, in this order, in one entry (none is a
    /// batch; at most [`MAX_COMMANDS`]) and returns their results, in the
    /// same order, once they are applied.
    pub(super) async fn propose_all(&self, cmds: Vec<pb::Command>) -> Answer {
        let (reply, answer) = oneshot::channel();
        let since = Instant::now();
        let stopped = || TrackerError::Stopped("the tracker's proposer has stopped".into());
        // Alone (nothing waits for a place, and the pipeline has room): it
        // goes at once from here, without the trip through the queue.
        if self.queue.capacity() == self.queue.max_capacity() {
            if let Ok(permit) = self.in_flight.clone().try_acquire_owned() {
                self.counts.add(cmds.len());
                commit(
                    &self.raft,
                    &self.counts,
                    vec![Pending { cmds, reply, since }],
                )
                .await;
                drop(permit);
                return answer.await.map_err(|_| stopped())?;
            }
        }
        self.queue
            .send(Pending { cmds, reply, since })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    counts: Arc<Counts>,
    in_flight: Arc<Semaphore>,
) {
    while let Some(first) = rx.recv().await {
        // Wait for room in the pipeline first: whatever arrives meanwhile
        // joins this entry.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes: usize = first.cmds.iter().map(|c| c.encoded_len()).sum();
        let mut commands = first.cmds.len();
        let mut group = vec![first];
        while commands < MAX_COMMANDS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.cmds.iter().map(|c| c.encoded_len()).sum::<usize>();
                    commands += p.cmds.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        counts.add(commands);
        let raft = raft.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            commit(&raft, &counts, group).await;
            drop(permit);
        });
    }
}

/// Proposes one entry for `group` and hands each proposer its own results.
async fn commit(raft: &Raft, counts: &Counts, group: Vec<Pending>) {
    let left = Instant::now();
    let mut sizes = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut commands = Vec::new();
    let mut times = Vec::with_capacity(group.len());
    for p in group {
        times.push((p.cmds.len(), p.since));
        sizes.push(p.cmds.len());
        replies.push(p.reply);
        commands.extend(p.cmds);
    }
    let n = commands.len();
    let entry = match <[pb::Command; 1]>::try_from(commands) {
        Ok([one]) => one,
        Err(commands) => pb::Command {
            op: Some(Op::Batch(pb::Batch { commands })),
            ..Default::default()
        },
    };
    let results = match raft.client_write(entry).await {
        Ok(resp) if n == 1 => Ok(vec![resp.data]),
        Ok(resp) => match resp.data.result {
            Some(R::Batch(b)) if b.results.len() == n => Ok(b.results),
            other => {
                // Cannot happen with a state machine of this version; say so
                // rather than guess which command did what.
                tracing::error!(
                    ?other,
                    commands = n,
                    "a batch applied with a malformed result"
                );
                Err(malformed(n))
            }
        },
        Err(e) => Err(write_error(e)),
    };
    counts.timed(&times, left);
    match results {
        Ok(results) => {
            let mut results = results.into_iter();
            for (reply, size) in replies.into_iter().zip(sizes) {
                let _ = reply.send(Ok(results.by_ref().take(size).collect()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(copy(&e)));
            }
        }
    }
}

fn malformed(n: usize) -> TrackerError {
    TrackerError::Stopped(format!("a batch of {n} commands applied with a malformed result").into())
}

pub(super) fn write_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> TrackerError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => TrackerError::NotLeader {
            leader_addr: f.leader_node.map(|n| n.addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            TrackerError::Membership(e.to_string())
        }
        RaftError::Fatal(f) => TrackerError::Stopped(Box::new(f)),
    }
}

/// The same error for every proposer of a batch (the cause is kept as text).
fn copy(e: &TrackerError) -> TrackerError {
    match e {
        TrackerError::NotLeader { leader_addr } => TrackerError::NotLeader {
            leader_addr: leader_addr.clone(),
        },
        TrackerError::NoQuorum(s) => TrackerError::NoQuorum(s.clone()),
        TrackerError::NotInitialized => TrackerError::NotInitialized,
        TrackerError::Invalid(s) => TrackerError::Invalid(s.clone()),
        TrackerError::Membership(s) => TrackerError::Membership(s.clone()),
        TrackerError::Handover(s) => TrackerError::Handover(s.clone()),
        TrackerError::Storage(b) => TrackerError::Storage(b.to_string().into()),
        TrackerError::LogFormat(_) | TrackerError::Stopped(_) => {
            TrackerError::Stopped(e.to_string().into())
        }
    }
}
