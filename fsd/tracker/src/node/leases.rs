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

use failsafe_core::lease::{ChangePoll, Holder, LeaseConfig, Leases, Object, Refusal};
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
    /// No new delegations (a hand-over is about to begin).
    no_delegations: u32,
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
    /// Grants asked for by a read or a writer's read-back and refused, by
    /// why (the first object refused in each), since this member started.
    refused: Mutex<Refused>,
    /// Renewals left unanswered because this member, still leading, had not
    /// heard from a quorum within its read lease.
    unanswered: std::sync::atomic::AtomicU64,
}

/// Refused grants by why: the lease table's reasons, and those of this
/// member (handing leadership over; no stream from the holder).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    holder_gone: u64,
    changing: u64,
    hot: u64,
    delegated: u64,
    handing_over: u64,
    no_stream: u64,
}

/// Why a grant was refused here.
#[derive(Clone, Copy)]
enum Why {
    Table(Refusal),
    HandingOver,
    NoStream,
}

impl Refused {
    fn count(&mut self, why: Why) {
        let n = match why {
            Why::Table(Refusal::HolderGone) => &mut self.holder_gone,
            Why::Table(Refusal::Changing) => &mut self.changing,
            Why::Table(Refusal::Hot) => &mut self.hot,
            Why::Table(Refusal::Delegated) => &mut self.delegated,
            Why::HandingOver => &mut self.handing_over,
            Why::NoStream => &mut self.no_stream,
        };
        *n += 1;
    }

    /// Each count with its name in metrics.
    pub(crate) fn named(&self) -> [(&'static str, u64); 6] {
        [
            (Refusal::HolderGone.name(), self.holder_gone),
            (Refusal::Changing.name(), self.changing),
            (Refusal::Hot.name(), self.hot),
            (Refusal::Delegated.name(), self.delegated),
            ("handing_over", self.handing_over),
            ("no_stream", self.no_stream),
        ]
    }
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
                no_delegations: 0,
                streams: HashMap::new(),
                next_stream: 1,
                last_expire: 0,
            }),
            acked: Notify::new(),
            refused: Mutex::default(),
            unanswered: Default::default(),
        }
    }

    /// A renewal goes unanswered: this member leads but has not heard from
    /// a quorum lately (the stream stays).
    pub(crate) fn renewal_unanswered(&self) {
        self.unanswered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Renewals left unanswered so far.
    pub(crate) fn unanswered(&self) -> u64 {
        self.unanswered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Grants refused so far, by why.
    pub(crate) fn refused(&self) -> Refused {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner())
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
        !objects.is_empty() && self.grant_each(holder, objects).iter().all(|&g| g)
    }

    /// [`LeaseTable::grant`] for each of `objects` alone: which may be
    /// cached.
    pub(crate) fn grant_each(&self, holder: Holder, objects: &[Object]) -> Vec<bool> {
        let now = self.now();
        let mut inner = lock(&self.inner);
        let whys: Vec<Option<Why>> = if inner.suspended {
            vec![Some(Why::HandingOver); objects.len()]
        } else if !inner.streams.contains_key(&holder) {
            vec![Some(Why::NoStream); objects.len()]
        } else {
            inner
                .table
                .grant_why(holder, objects, now)
                .into_iter()
                .map(|r| r.err().map(Why::Table))
                .collect()
        };
        drop(inner);
        // One refusal counted per request, as for a single read.
        if let Some(why) = whys.iter().flatten().next() {
            self.refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .count(*why);
        }
        whys.iter().map(Option::is_none).collect()
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
        self.tell(&mut inner, id, tell, objects)
    }

    /// Sends change `id`'s invalidation of `objects` to the holders in
    /// `tell`; the change to wait for.
    fn tell(
        &self,
        inner: &mut Inner,
        id: u64,
        tell: Vec<Holder>,
        objects: &[Object],
    ) -> Change<'_> {
        let event = pb::WatchEvent {
            event: Some(Event::Invalidate(pb::Invalidate {
                change_id: id,
                inos: objects.to_vec(),
            })),
        };
        let told = self.send_all(inner, tell, &event);
        Change {
            table: self,
            id: Some(id),
            told,
        }
    }

    /// After `h`'s change in directory `dir` (it asked, for write-behind):
    /// whether `dir` is now delegated to it (see
    /// `failsafe_core::lease::Leases::delegate`).
    pub(crate) fn delegate(&self, h: Holder, dir: Object) -> bool {
        let now = self.now();
        let mut inner = lock(&self.inner);
        if inner.suspended || inner.no_delegations > 0 || !inner.streams.contains_key(&h) {
            return false;
        }
        inner.table.delegate(h, dir, now)
    }

    /// Whether anyone but `h` holds `o`.
    pub(crate) fn held_by_others(&self, o: Object, h: Holder) -> bool {
        lock(&self.inner).table.held_by_others(o, h)
    }

    /// Before `by` (a holder, or `None`) changes or reads `objects`: takes
    /// back their delegations to anyone else, waiting until each delegate
    /// has flushed what it did alone and acknowledged (or its leases ran
    /// out). Returns at once when none of them is delegated.
    pub(crate) async fn recall(&self, objects: &[Object], by: Option<Holder>) {
        if objects.is_empty() {
            return;
        }
        let recall = {
            let now = self.now();
            let mut inner = lock(&self.inner);
            let Some((id, tell)) = inner.table.begin_recall(objects, by, now) else {
                return;
            };
            self.tell(&mut inner, id, tell, objects)
        };
        tracing::debug!(?objects, delegates = ?recall.told(), "recalling delegations");
        recall.done().await;
    }

    /// Those of `objects` delegated to anyone but `by`.
    pub(crate) fn delegated_to_others(
        &self,
        objects: &[Object],
        by: Option<Holder>,
    ) -> Vec<Object> {
        let inner = lock(&self.inner);
        if inner.table.sizes().1 == 0 {
            return Vec::new();
        }
        inner.table.delegated_to_others(objects, by)
    }

    /// Takes back every delegation (before leadership is handed over, and
    /// for a follower's read, which cannot say what it reads).
    pub(crate) async fn recall_all(&self) {
        let all = lock(&self.inner).table.delegated();
        self.recall(&all, None).await;
    }

    /// Before leadership is handed over: no new delegations while the guard
    /// lives, and every one granted so far taken back.
    pub(crate) async fn recall_for_handover(&self) -> NoDelegations<'_> {
        lock(&self.inner).no_delegations += 1;
        let guard = NoDelegations(self);
        self.recall_all().await;
        guard
    }

    /// Before proposing `h`'s flush of what it did alone in `dir`: `None`
    /// when it no longer holds the delegation (the flush must be refused).
    /// While the guard lives, a recall of `dir` waits for it.
    pub(crate) fn begin_flush(&self, h: Holder, dir: Object) -> Option<Flushing<'_>> {
        let now = self.now();
        let admitted = lock(&self.inner).table.begin_flush(h, dir, now);
        // (Built only when admitted: its drop takes the lock.)
        admitted.then(|| Flushing { table: self, dir })
    }

    /// Sends `event` to each of `holders`; returns those it reached (a
    /// holder whose stream is gone or stuck is disconnected: it cannot
    /// acknowledge, so what waits for it waits for its leases to run out).
    fn send_all(
        &self,
        inner: &mut Inner,
        holders: Vec<Holder>,
        event: &pb::WatchEvent,
    ) -> Vec<Holder> {
        let mut told = Vec::with_capacity(holders.len());
        for h in holders {
            let sent = inner
                .streams
                .get(&h)
                .is_some_and(|s| s.events.try_send(Ok(event.clone())).is_ok());
            if sent {
                told.push(h);
            } else {
                if inner.streams.remove(&h).is_some() {
                    tracing::info!(holder = h, "lease stream stuck; closing it");
                }
                inner.table.disconnect(h);
            }
        }
        told
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
        self.send_all(&mut inner, holders.to_vec(), &event);
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

/// A delegate's flush under way (`LeaseTable::begin_flush`).
pub(crate) struct Flushing<'a> {
    table: &'a LeaseTable,
    dir: Object,
}

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        lock(&self.table.inner).table.end_flush(self.dir);
        self.table.acked.notify_waiters();
    }
}

/// Delegations are granted again when this is dropped.
pub(crate) struct NoDelegations<'a>(&'a LeaseTable);

impl Drop for NoDelegations<'_> {
    fn drop(&mut self) {
        let mut inner = lock(&self.0.inner);
        inner.no_delegations = inner.no_delegations.saturating_sub(1);
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
