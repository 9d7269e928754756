//! The `leader-placement` worker: on the tracker leader, it moves leadership
//! to the zone doing most of the writing (issue 11). A mutation from a city
//! without the leader costs two inter-city round trips instead of one.
//! `failsafe_core::leadership::decide` says when and to whom; the tracker
//! carries the hand-over out (`Tracker::hand_over`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failsafe_core::leadership::{decide, percent, Decision, LeaderView};
use failsafe_proto::pb;
use failsafe_tracker::Tracker;

use crate::worker::{Worker, WorkerState};

pub(crate) struct LeaderPlacement {
    tracker: Arc<Tracker>,
    state: WorkerState,
    handovers: AtomicU64,
}

impl LeaderPlacement {
    pub(crate) fn new(tracker: Arc<Tracker>) -> LeaderPlacement {
        let initial = if tracker.leader_policy().is_some() {
            "starting"
        } else {
            "off"
        };
        LeaderPlacement {
            tracker,
            state: WorkerState::new(initial),
            handovers: AtomicU64::new(0),
        }
    }

    pub(crate) fn status(&self) -> pb::LeaderPlacementStatus {
        pb::LeaderPlacementStatus {
            state: self.state.get(),
            writes: self
                .tracker
                .zone_writes()
                .into_iter()
                .map(|(zone, writes)| pb::ZoneWrites { zone, writes })
                .collect(),
            window_ms: self.tracker.leader_policy().map_or(0, |p| p.window_ms),
            handovers: self.handovers.load(Ordering::Relaxed),
        }
    }
}

impl Worker for LeaderPlacement {
    fn name(&self) -> &'static str {
        "leader-placement"
    }

    fn state(&self) -> Option<&WorkerState> {
        Some(&self.state)
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        let Some(policy) = self.tracker.leader_policy() else {
            self.state.set("off");
            return Ok(Duration::from_secs(60));
        };
        // Often enough to act within a bucket of the window.
        let tick = Duration::from_millis((policy.window_ms / 12).clamp(100, 1000));
        let Some(snap) = self.tracker.leader_snapshot().await? else {
            self.state.set("not leader");
            return Ok(tick);
        };
        let view = LeaderView {
            leader_id: snap.leader_id,
            leader_zone: &snap.leader_zone,
            led_for_ms: snap.led_for_ms,
            writes: &snap.writes,
            members: &snap.members,
        };
        let (to, zone, writes, total) = match decide(&policy, &view) {
            Decision::Stay(why) => {
                self.state.set(why.to_string());
                return Ok(tick);
            }
            Decision::Move {
                to,
                zone,
                writes,
                total,
            } => (to, zone, writes, total),
        };
        let reason = format!(
            "zone {zone} did {}% of the {total} writes in the last {}s, the leader's zone {} {}",
            percent(writes, total),
            policy.window_ms / 1000,
            snap.leader_zone,
            snap.writes.get(&snap.leader_zone).copied().unwrap_or(0),
        );
        self.handovers.fetch_add(1, Ordering::Relaxed);
        match self.tracker.hand_over(to).await {
            Ok(done) => {
                tracing::info!(
                    to = format!("{:016x}", done.to),
                    %zone,
                    pause_ms = done.pause.as_millis() as u64,
                    "tracker leadership handed over: {reason}"
                );
                self.state.set(format!(
                    "handed over to {:016x} in zone {zone} (writes paused {} ms): {reason}",
                    done.to,
                    done.pause.as_millis()
                ));
                Ok(tick)
            }
            Err(e) => {
                tracing::warn!(to = format!("{to:016x}"), %zone, error = %e, "tracker leadership hand-over abandoned: {reason}");
                self.state
                    .set(format!("hand-over to {to:016x} abandoned: {e}"));
                // Not again before a whole new window of evidence.
                Ok(Duration::from_millis(policy.window_ms).max(tick))
            }
        }
    }
}
