//! Counting what the client sends: every RPC by kind and outcome, and, per
//! caller operation, the RPCs and the *sequential round trips* it waited for.
//!
//! Where it is counted: at the few points where the client sends a request
//! and awaits its answer (the leader retry loop, `query_at`, the admin and
//! block calls). Each of those opens an [`RpcGuard`] when it sends and closes
//! it with the outcome, so an RPC that batching or caching removes stops
//! being counted by itself, and a new RPC is counted by going through one of
//! them (or by opening a guard itself).
//!
//! Round trips: a caller opens an operation scope with [`measure`] (the mount
//! does, around each FUSE request). Inside it, an RPC awaited on its own adds
//! one round trip; a retry is another RPC and adds another. A parallel
//! fan-out (the copies of a block put to several devices, a hedged block
//! read) adds one round trip for the fan-out, plus one for each request it
//! had to send *after* a failure (a spare device, the next copy), because
//! those wait for the failed one first. Requests sent from spawned tasks
//! (late block copies recorded in the background, session heartbeats) have
//! no scope: they are counted as background RPCs, never charged to the
//! operation that caused them.
//!
//! Cost: relaxed atomic increments; no locks.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What an RPC is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcKind {
    /// A metadata command (a Raft entry), sent to the leader.
    MetaMutate,
    /// A metadata query (lookup, getattr, readdir, extents, placement, …).
    MetaQuery,
    /// An admin call (hello, status, membership changes).
    Admin,
    BlockPut,
    BlockGet,
    BlockHas,
    BlockDelete,
    /// Repair's delta transfer: signature, delta, delta put.
    BlockDelta,
}

impl RpcKind {
    pub const ALL: [RpcKind; 8] = [
        RpcKind::MetaMutate,
        RpcKind::MetaQuery,
        RpcKind::Admin,
        RpcKind::BlockPut,
        RpcKind::BlockGet,
        RpcKind::BlockHas,
        RpcKind::BlockDelete,
        RpcKind::BlockDelta,
    ];

    /// The stable name used in metrics and JSON.
    pub fn name(self) -> &'static str {
        match self {
            RpcKind::MetaMutate => "meta_mutate",
            RpcKind::MetaQuery => "meta_query",
            RpcKind::Admin => "admin",
            RpcKind::BlockPut => "block_put",
            RpcKind::BlockGet => "block_get",
            RpcKind::BlockHas => "block_has",
            RpcKind::BlockDelete => "block_delete",
            RpcKind::BlockDelta => "block_delta",
        }
    }
}

/// How an RPC ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer came (it may still carry a refusal such as ENOENT).
    Ok,
    /// The member answered with an error status, or could not be reached.
    Error,
    /// No answer within the deadline.
    Timeout,
    /// Dropped before an answer came (a hedged read's loser, say).
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
        }
    }
}

const KINDS: usize = RpcKind::ALL.len();
const OUTCOMES: usize = Outcome::ALL.len();

/// A client's RPC counters (shared by its clones).
#[derive(Default)]
pub(crate) struct RpcCounters {
    sent: [AtomicU64; KINDS],
    ended: [[AtomicU64; OUTCOMES]; KINDS],
    background: AtomicU64,
}

/// A copy of a client's RPC counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RpcSnapshot {
    /// Per kind (in [`RpcKind::ALL`] order): RPCs sent.
    pub sent: [u64; KINDS],
    /// Per kind and outcome (in [`Outcome::ALL`] order): RPCs ended. Sent
    /// minus ended is in flight.
    pub ended: [[u64; OUTCOMES]; KINDS],
    /// RPCs sent outside any operation scope (background work).
    pub background: u64,
}

impl RpcSnapshot {
    pub fn total(&self) -> u64 {
        self.sent.iter().sum()
    }

    pub fn sent_of(&self, kind: RpcKind) -> u64 {
        self.sent[kind as usize]
    }

    pub fn ended_of(&self, kind: RpcKind, outcome: Outcome) -> u64 {
        self.ended[kind as usize][outcome as usize]
    }
}

impl RpcCounters {
    pub(crate) fn snapshot(&self) -> RpcSnapshot {
        let mut s = RpcSnapshot {
            background: self.background.load(Ordering::Relaxed),
            ..Default::default()
        };
        for k in 0..KINDS {
            s.sent[k] = self.sent[k].load(Ordering::Relaxed);
            for o in 0..OUTCOMES {
                s.ended[k][o] = self.ended[k][o].load(Ordering::Relaxed);
            }
        }
        s
    }

    /// Counts an RPC being sent. `round_trip`: whether the caller awaits it
    /// on its own (false for the members of a parallel fan-out, which
    /// counts its round trip once itself).
    pub(crate) fn start(self: &Arc<Self>, kind: RpcKind, round_trip: bool) -> RpcGuard {
        self.sent[kind as usize].fetch_add(1, Ordering::Relaxed);
        let scoped = SCOPE
            .try_with(|s| {
                s.rpcs.fetch_add(1, Ordering::Relaxed);
                if round_trip {
                    s.round_trips.fetch_add(1, Ordering::Relaxed);
                }
            })
            .is_ok();
        if !scoped {
            self.background.fetch_add(1, Ordering::Relaxed);
        }
        RpcGuard {
            counters: self.clone(),
            kind,
            done: false,
        }
    }
}

/// One RPC in flight; records its outcome when told, or `Cancelled` when
/// dropped unanswered.
#[must_use]
pub(crate) struct RpcGuard {
    counters: Arc<RpcCounters>,
    kind: RpcKind,
    done: bool,
}

impl RpcGuard {
    pub(crate) fn end(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if !self.done {
            self.done = true;
            self.counters.ended[self.kind as usize][outcome as usize]
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the RPC by the result of a tonic call.
    pub(crate) fn end_with<T>(self, r: &Result<T, tonic::Status>) {
        self.end(match r {
            Ok(_) => Outcome::Ok,
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => Outcome::Timeout,
            Err(_) => Outcome::Error,
        });
    }

    /// Ends the RPC by the result of a tonic call under a client-side
    /// deadline (`tokio::time::timeout`).
    pub(crate) fn end_timed<T>(
        self,
        r: &Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>,
    ) {
        match r {
            Ok(r) => self.end_with(r),
            Err(_) => self.end(Outcome::Timeout),
        }
    }
}

impl Drop for RpcGuard {
    fn drop(&mut self) {
        self.record(Outcome::Cancelled);
    }
}

/// One operation's count so far.
#[derive(Debug, Default)]
struct Scope {
    rpcs: AtomicU64,
    round_trips: AtomicU64,
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// What one operation sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCost {
    /// RPCs sent on its behalf (fan-out members and retries included).
    pub rpcs: u64,
    /// Sequential round trips it waited for.
    pub round_trips: u64,
}

/// Runs `f` as one operation and returns what it sent. RPCs from tasks `f`
/// spawns are not part of it (they count as background). A scope opened
/// inside another adds its cost to the outer one when it ends.
pub async fn measure<F: Future>(f: F) -> (F::Output, OpCost) {
    let scope = Arc::new(Scope::default());
    let out = SCOPE.scope(scope.clone(), f).await;
    let cost = OpCost {
        rpcs: scope.rpcs.load(Ordering::Relaxed),
        round_trips: scope.round_trips.load(Ordering::Relaxed),
    };
    let _ = SCOPE.try_with(|outer| {
        outer.rpcs.fetch_add(cost.rpcs, Ordering::Relaxed);
        outer
            .round_trips
            .fetch_add(cost.round_trips, Ordering::Relaxed);
    });
    (out, cost)
}

/// Adds one sequential round trip to the current operation, for a parallel
/// fan-out (whose members are sent with `round_trip: false`), or for a
/// request a fan-out sends after a failure.
pub(crate) fn fan_out_round_trip() {
    let _ = SCOPE.try_with(|s| s.round_trips.fetch_add(1, Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scopes_and_background() {
        let c = Arc::new(RpcCounters::default());
        c.start(RpcKind::Admin, true).end(Outcome::Ok);
        let (_, cost) = measure(async {
            c.start(RpcKind::MetaQuery, true).end(Outcome::Ok);
            c.start(RpcKind::MetaMutate, true).end(Outcome::Timeout);
            fan_out_round_trip();
            let a = c.start(RpcKind::BlockPut, false);
            let b = c.start(RpcKind::BlockPut, false);
            a.end(Outcome::Ok);
            drop(b);
            let c2 = c.clone();
            tokio::spawn(async move { c2.start(RpcKind::MetaMutate, true).end(Outcome::Ok) })
                .await
                .unwrap();
        })
        .await;
        assert_eq!(
            cost,
            OpCost {
                rpcs: 4,
                round_trips: 3
            }
        );
        let s = c.snapshot();
        assert_eq!(s.total(), 6);
        assert_eq!(s.background, 2);
        assert_eq!(s.sent_of(RpcKind::BlockPut), 2);
        assert_eq!(s.ended_of(RpcKind::BlockPut, Outcome::Cancelled), 1);
        assert_eq!(s.ended_of(RpcKind::MetaMutate, Outcome::Timeout), 1);
    }
}
