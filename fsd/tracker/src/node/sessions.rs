//! Client sessions judged by the leader's monotonic clock (review B5).
//!
//! A session's renewals are stamped with the leader's wall clock, which is
//! what every member applies (it is in the log). Expiring by that clock
//! alone would drop every lock at a clock step, or when a new leader's
//! clock runs ahead of the last one's. So the reaper closes a session only
//! when this leader has not heard from it for its ttl by the monotonic
//! clock, and only after leading for its ttl plus [`GRACE`] (until then
//! it has not had the chance to hear from everyone); a session the wall
//! clock would expire but the monotonic clock says is alive, or not yet
//! judged, is renewed on its behalf instead.
//!
//! The same renewals say how far each web host's clock is from the
//! leader's: [`Tracker::clock_offsets`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use failsafe_proto::pb;

use super::{wall_clock_ns, Tracker, TrackerError};
use crate::state;

/// How long a new leader waits, beyond a session's ttl, before it judges
/// that session: time for every live client to renew with it.
pub(crate) const GRACE: Duration = Duration::from_secs(5);

/// A web host whose clock is further off than this is reported (a metric,
/// a warning in `fsctl status`): mtimes and locks no longer depend on it,
/// but wiki engines compare `time()` with `filemtime()`.
pub const CLOCK_WARN_MS: i64 = 1000;

#[derive(Default)]
pub(crate) struct SessionClock {
    /// The term this member leads in, and since when.
    led: Option<(u64, Instant)>,
    /// When this leader last heard from each session (its open or a renewal).
    heard: HashMap<u64, Instant>,
    /// Each session's clock minus the leader's at its last renewal (ms;
    /// includes the one-way delay of the request).
    offset_ms: HashMap<u64, i64>,
}

impl Tracker {
    /// A session opened or renewed through this leader, the client's clock
    /// reading `client_ns` when it asked (0: unknown) and the leader's
    /// `leader_ns`.
    pub fn heard_session(&self, session_id: u64, client_ns: i64, leader_ns: i64) {
        let mut c = self.sessions_clock();
        c.heard.insert(session_id, Instant::now());
        if client_ns > 0 {
            c.offset_ms
                .insert(session_id, (client_ns - leader_ns) / 1_000_000);
        }
    }

    /// Each session's client name and clock offset from this leader (ms),
    /// as of its last renewal here.
    pub async fn clock_offsets(&self) -> Result<Vec<(String, i64)>, TrackerError> {
        if !self.is_leader() {
            return Ok(Vec::new());
        }
        let rows = self.session_rows().await?;
        let c = self.sessions_clock();
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((r.client_name, *c.offset_ms.get(&r.id)?)))
            .collect())
    }

    /// The open sessions (the mounts connected), with their web host's
    /// clock offset where this member, as leader, has measured it.
    pub async fn clients(&self) -> Result<Vec<pb::ClientSession>, TrackerError> {
        let rows = self.session_rows().await?;
        let offsets = if self.is_leader() {
            self.sessions_clock().offset_ms.clone()
        } else {
            Default::default()
        };
        Ok(rows
            .into_iter()
            .map(|r| {
                let offset = offsets.get(&r.id).copied();
                pb::ClientSession {
                    session_id: r.id,
                    name: r.client_name,
                    clock_known: offset.is_some(),
                    clock_offset_ms: offset.unwrap_or(0),
                }
            })
            .collect())
    }

    /// Each session's clock offset from this leader (ms), by session id.
    pub fn clock_offsets_now(&self) -> Vec<(u64, i64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut v: Vec<(u64, i64)> = self
            .sessions_clock()
            .offset_ms
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort_unstable();
        v
    }

    fn sessions_clock(&self) -> std::sync::MutexGuard<'_, SessionClock> {
        self.session_clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn session_rows(&self) -> Result<Vec<state::SessionRow>, TrackerError> {
        self.sm
            .db()
            .call(|conn| state::all_sessions(conn))
            .await?
            .map_err(TrackerError::storage)
    }

    /// The leader's reaper (see the module's comment): closes the sessions
    /// (and their locks) it has not heard from for their ttl, renews those
    /// the wall clock alone would expire, then forgets old operation
    /// results.
    pub async fn expire_sessions(&self) -> Result<(), TrackerError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != openraft::ServerState::Leader {
            return Ok(());
        }
        let led_for = {
            let mut c = self.sessions_clock();
            match c.led {
                Some((term, since)) if term == m.current_term => since.elapsed(),
                _ => {
                    c.led = Some((m.current_term, Instant::now()));
                    Duration::ZERO
                }
            }
        };
        let now = wall_clock_ns();
        let mut ops = Vec::new();
        for r in self.session_rows().await? {
            let ttl = Duration::from_millis(r.ttl_ms);
            let heard = self.sessions_clock().heard.get(&r.id).copied();
            let alive = heard.is_some_and(|t| t.elapsed() < ttl);
            let wall_expired = r
                .last_seen
                .saturating_add((r.ttl_ms as i64).saturating_mul(1_000_000))
                < now;
            if !alive && led_for >= ttl + GRACE {
                tracing::info!(
                    session = format!("{:016x}", r.id),
                    client = %r.client_name,
                    "session expired: not heard from for its lease"
                );
                ops.push(pb::command::Op::CloseSession(pb::CloseSession {
                    session_id: r.id,
                }));
                let mut c = self.sessions_clock();
                c.heard.remove(&r.id);
                c.offset_ms.remove(&r.id);
            } else if wall_expired {
                ops.push(pb::command::Op::Heartbeat(pb::Heartbeat {
                    session_id: r.id,
                }));
            }
        }
        for op in ops {
            self.propose(pb::Command {
                now_ns: now,
                op: Some(op),
                ..Default::default()
            })
            .await?;
        }
        let due = self
            .sm
            .db()
            .call(move |conn| state::anything_expired(conn, now))
            .await?
            .map_err(TrackerError::storage)?;
        if due {
            let op = pb::command::Op::ExpireSessions(pb::ExpireSessions {});
            self.propose(pb::Command {
                now_ns: now,
                op: Some(op),
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }
}

/// `state`'s lock type, so `Tracker` holds one.
pub(crate) type Clock = Mutex<SessionClock>;
