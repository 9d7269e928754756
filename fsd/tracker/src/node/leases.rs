//! Metadata leases on this member while it leads (the rules are
//! `failsafe_core::lease`): the mounts' Watch streams, the grants that go
//! with query answers, and the wait of every change for the holders told
//! about it.
//!
//! One table for the life of the member, never reset: holders it granted
//! in an earlier term keep their (known) expiry here, and leases granted by
//! other leaders have run out before this member can commit anything,
//! because `lease_ms` is short of Raft's election gap (see
//! [`lease_config`]) — so the table needs no fence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use failsafe_core::lease::{ChangePoll, Holder, LeaseConfig, Leases, Object};
use failsafe_proto::pb::{self, watch_event::Event};
use tokio::sync::{mpsc, Notify};
use tonic::Status;

/// Events queued for one stream before the holder counts as unreachable
/// (its stream is closed, and changes wait for its leases to run out).
const STREAM_QUEUE: usize = 256;

/// Lease timing from Raft's: a lease the previous leader renewed while its
/// own read lease (`read_lease_ms`) held must have run out before a
/// successor can be elected, which takes at least `election_max_ms` after
/// a quorum last heard from that leader. `None` when the election timing
/// leaves no room for a useful lease.
pub(crate) fn lease_config(read_lease_ms: u64, election_max_ms: u64) -> Option<LeaseConfig> {
    const DRIFT_MS: u64 = 20;
    /// Message delay and scheduling between a quorum's acknowledgement and
    /// the followers' last contact.
    const MARGIN_MS: u64 = 100;
    let lease_ms = election_max_ms
        .checked_sub(read_lease_ms + DRIFT_MS + MARGIN_MS)
        .filter(|&l| l >= 100)?;
    Some(LeaseConfig {
        lease_ms,
        drift_ms: DRIFT_MS,
        hot_ms: 5_000,
    })
}

type Events = mpsc::Sender<Result<pb::WatchEvent, Status>>;

struct Stream {
    id: u64,
    events: Events,
}

struct Inner {
    table: Leases,
    /// No grants or renewals (a hand-over of leadership is under way).
    suspended: bool,
    streams: HashMap<Holder, Stream>,
    next_stream: u64,
    last_expire: u64,
}

pub(crate) struct LeaseTable {
    cfg: LeaseConfig,
    start: Instant,
    inner: Mutex<Inner>,
    /// Woken by every acknowledgement and closed stream.
    acked: Notify,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LeaseTable {
    pub(crate) fn new(cfg: LeaseConfig) -> LeaseTable {
        LeaseTable {
            cfg,
            start: Instant::now(),
            inner: Mutex::new(Inner {
                table: Leases::new(cfg, 0),
                suspended: false,
                streams: HashMap::new(),
                next_stream: 1,
                last_expire: 0,
            }),
            acked: Notify::new(),
        }
    }

    pub(crate) fn lease_ms(&self) -> u64 {
        self.cfg.lease_ms
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A new stream from `holder` (replacing any earlier one): its id and
    /// the events to send on it, the first of which welcomes it.
    pub(crate) fn open_stream(
        &self,
        holder: Holder,
        term: u64,
    ) -> (u64, mpsc::Receiver<Result<pb::WatchEvent, Status>>) {
        let (events, rx) = mpsc::channel(STREAM_QUEUE);
        let welcome = pb::WatchEvent {
            event: Some(Event::Welcome(pb::WatchWelcome {
                term,
                lease_ms: self.cfg.lease_ms,
            })),
        };
        // Cannot fail: the queue is empty and the receiver is here.
        let _ = events.try_send(Ok(welcome));
        let mut inner = lock(&self.inner);
        let id = inner.next_stream;
        inner.next_stream += 1;
        inner.table.connect(holder);
        inner.streams.insert(holder, Stream { id, events });
        (id, rx)
    }

    /// Stream `id` of `holder` ended (or misbehaved).
    pub(crate) fn close_stream(&self, holder: Holder, id: u64) {
        let mut inner = lock(&self.inner);
        if inner.streams.get(&holder).is_some_and(|s| s.id == id) {
            inner.streams.remove(&holder);
            inner.table.disconnect(holder);
        }
        drop(inner);
        self.acked.notify_waiters();
    }

    /// A renewal on stream `id`, while this member leads with its read
    /// lease: answered on the stream. False: the stream must end.
    pub(crate) fn renew(&self, holder: Holder, id: u64, seq: u64) -> bool {
        let now = self.now();
        let mut inner = lock(&self.inner);
        let Some(events) = inner
            .streams
            .get(&holder)
            .filter(|s| s.id == id)
            .map(|s| s.events.clone())
        else {
            return false;
        };
        if inner.suspended || !inner.table.renew(holder, now) {
            return false;
        }
        if now >= inner.last_expire + 1_000 {
            inner.last_expire = now;
            inner.table.expire(now);
        }
        let renewed = pb::WatchEvent {
            event: Some(Event::Renewed(pb::WatchRenewed { seq })),
        };
        // Sent under the lock, so renewals and invalidations keep their
        // order on the stream.
        events.try_send(Ok(renewed)).is_ok()
    }

    pub(crate) fn ack(&self, holder: Holder, change: u64) {
        lock(&self.inner).table.ack(holder, change);
        self.acked.notify_waiters();
    }

    /// Before reading `objects` for `holder`: whether the answer may be
    /// cached.
    pub(crate) fn grant(&self, holder: Holder, objects: &[Object]) -> bool {
        if objects.is_empty() {
            return false;
        }
        let now = self.now();
        let mut inner = lock(&self.inner);
        if inner.suspended || !inner.streams.contains_key(&holder) {
            return false;
        }
        inner.table.grant(holder, objects, now).iter().all(|g| *g)
    }

    /// A change to `objects` (about to be proposed, or applied): tells every
    /// other holder now,
    /// and grants none of them until the returned change is over. `by`:
    /// the holder whose request it is. Wait for the holders with
    /// [`Change::done`]; dropping it ends the change without waiting (the
    /// command failed).
    pub(crate) fn begin(&self, objects: &[Object], by: Option<Holder>) -> Change<'_> {
        if objects.is_empty() {
            return Change {
                table: self,
                id: None,
                told: Vec::new(),
            };
        }
        let now = self.now();
        let mut inner = lock(&self.inner);
        let (id, tell) = inner.table.begin_change(objects, by, now);
        let event = pb::WatchEvent {
            event: Some(Event::Invalidate(pb::Invalidate {
                change_id: id,
                inos: objects.to_vec(),
            })),
        };
        let mut told = Vec::with_capacity(tell.len());
        for h in tell {
            let sent = inner
                .streams
                .get(&h)
                .is_some_and(|s| s.events.try_send(Ok(event.clone())).is_ok());
            if !sent {
                // Its stream is gone or stuck: it cannot acknowledge, so the
                // change waits for its leases to run out.
                if inner.streams.remove(&h).is_some() {
                    tracing::info!(holder = h, "lease stream stuck; closing it");
                }
                inner.table.disconnect(h);
            } else {
                told.push(h);
            }
        }
        Change {
            table: self,
            id: Some(id),
            told,
        }
    }

    /// Before reading what a finished change left for the holders it told
    /// (`holders`): registers each on `objects` again. Returns those
    /// registered and where the numbering of changes stood.
    pub(crate) fn refresh_grant(
        &self,
        holders: &[Holder],
        objects: &[Object],
    ) -> (Vec<Holder>, u64) {
        let now = self.now();
        let mut inner = lock(&self.inner);
        let mark = inner.table.change_mark();
        if inner.suspended || objects.is_empty() {
            return (Vec::new(), mark);
        }
        let granted = holders
            .iter()
            .copied()
            .filter(|h| {
                inner.streams.contains_key(h)
                    && inner.table.grant(*h, objects, now).iter().all(|g| *g)
            })
            .collect();
        (granted, mark)
    }

    /// Pushes `refresh` (read after [`LeaseTable::refresh_grant`] returned
    /// `mark`) to `holders`, unless a change of `objects` began since: its
    /// invalidation may already be on their streams, ahead of this.
    pub(crate) fn refresh_send(
        &self,
        holders: &[Holder],
        objects: &[Object],
        mark: u64,
        refresh: pb::Refresh,
    ) {
        let mut inner = lock(&self.inner);
        if inner.table.begun_since(objects, mark) {
            return;
        }
        let event = pb::WatchEvent {
            event: Some(Event::Refresh(refresh)),
        };
        for &h in holders {
            let sent = inner
                .streams
                .get(&h)
                .is_some_and(|s| s.events.try_send(Ok(event.clone())).is_ok());
            if !sent && inner.streams.remove(&h).is_some() {
                tracing::info!(holder = h, "lease stream stuck; closing it");
                inner.table.disconnect(h);
            }
        }
    }

    /// Before this member hands leadership to another on purpose (which
    /// does not wait out the election gap these leases rely on): no more
    /// grants or renewals until the guard is dropped. Returns the guard and
    /// how long until every lease granted so far has run out.
    pub(crate) fn suspend(&self) -> (Suspended<'_>, Duration) {
        let now = self.now();
        let mut inner = lock(&self.inner);
        inner.suspended = true;
        let left = inner.table.last_expiry().saturating_sub(now);
        (Suspended(self), Duration::from_millis(left))
    }

    /// Holders with a stream here, and objects the table tracks.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        (inner.streams.len(), inner.table.sizes().1)
    }
}

/// A change that holders were told of (`LeaseTable::begin`).
pub(crate) struct Change<'a> {
    table: &'a LeaseTable,
    id: Option<u64>,
    /// The holders it was sent to.
    told: Vec<Holder>,
}

impl Change<'_> {
    pub(crate) fn told(&self) -> &[Holder] {
        &self.told
    }

    /// Returns once every holder told has acknowledged or its leases have
    /// run out.
    pub(crate) async fn done(self) {
        let Some(id) = self.id else { return };
        let t = self.table;
        loop {
            let notified = t.acked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let poll = lock(&t.inner).table.poll_change(id, t.now());
            match poll {
                ChangePoll::Done => break,
                ChangePoll::WaitUntil(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(t.now()).max(1));
                    let _ = tokio::time::timeout(wait, notified).await;
                }
            }
        }
        // Dropped here: the change ends.
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.table.inner).table.end_change(id);
        }
    }
}

/// Leases are granted and renewed again when this is dropped.
pub(crate) struct Suspended<'a>(&'a LeaseTable);

impl Drop for Suspended<'_> {
    fn drop(&mut self) {
        lock(&self.0.inner).suspended = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_fit_inside_the_election_gap() {
        let cfg = lease_config(175, 700).expect("room for a lease");
        assert!(175 + cfg.lease_ms + cfg.drift_ms < 700);
        assert!(lease_config(175, 300).is_none());
    }

    #[tokio::test]
    async fn a_change_waits_for_the_acknowledgement_of_a_holder() {
        let t = std::sync::Arc::new(LeaseTable::new(LeaseConfig {
            lease_ms: 10_000,
            drift_ms: 0,
            hot_ms: 5_000,
        }));
        let (id, mut rx) = t.open_stream(7, 3);
        assert!(matches!(
            rx.recv().await,
            Some(Ok(pb::WatchEvent {
                event: Some(Event::Welcome(_))
            }))
        ));
        assert!(t.renew(7, id, 1));
        assert!(matches!(
            rx.recv().await,
            Some(Ok(pb::WatchEvent {
                event: Some(Event::Renewed(pb::WatchRenewed { seq: 1 }))
            }))
        ));
        assert!(t.grant(7, &[42]));
        let t2 = t.clone();
        let change = tokio::spawn(async move { t2.begin(&[42], None).done().await });
        let Some(Ok(pb::WatchEvent {
            event: Some(Event::Invalidate(inv)),
        })) = rx.recv().await
        else {
            panic!("no invalidation")
        };
        assert_eq!(inv.inos, vec![42]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!change.is_finished(), "the change waits for the holder");
        t.ack(7, inv.change_id);
        tokio::time::timeout(Duration::from_secs(5), change)
            .await
            .expect("done after the acknowledgement")
            .expect("task");
    }
}
