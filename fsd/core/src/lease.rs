//! Metadata leases: which mounts may answer from memory, until when, and
//! what a change must wait for before its writer hears that it is done.
//!
//! Two halves, both pure (the caller passes the time, in milliseconds of a
//! monotonic clock, and carries out every send):
//!
//! - [`Leases`], the leader's table. A mount (a *holder*, named by its
//!   session) keeps one ordered stream to the leader. [`Leases::renew`],
//!   answered on that stream, is the only thing that extends a holder's
//!   leases, and all of them together; a read that is allowed to be cached
//!   adds its objects to the holder's set ([`Leases::grant`]) without
//!   extending anything. After a change applies, [`Leases::begin_change`]
//!   names the holders to tell; the writer hears "done" once each of them
//!   acknowledged or its leases ran out ([`Leases::poll_change`]).
//! - [`HolderView`], the mount's side: when what it holds is valid, and
//!   whether an answer may be cached at all.
//!
//! Why this is safe (close-to-open, no stale read after a change is done):
//!
//! 1. A holder counts a renewal from when it *sent* it, the leader from when
//!    it *received* it (plus `drift_ms`), so the leader's idea of a holder's
//!    expiry is never earlier than the holder's. Only clock rates matter.
//! 2. The invalidation of a change and every later renewal answer travel on
//!    the same ordered stream: a holder that never got the invalidation
//!    never gets a later renewal either, and its leases run out at the
//!    expiry the change waits for at the most. A renewal that arrives after
//!    a holder's leases ran out is refused ([`Leases::renew`]): it starts
//!    over with nothing cached, as changes meanwhile did not tell it.
//! 3. A grant is registered *before* the read, so a change applied after
//!    the registration finds the holder in the table, tells it, and takes
//!    the grant back. A read answer travels beside the stream (a unary
//!    call), so it may arrive before or after that invalidation; the holder
//!    does not cache an answer to a read that was in flight when it saw an
//!    invalidation of the object ([`HolderView::offer`]), and an answer it
//!    cached before is dropped by the invalidation. Comparing log indexes
//!    is not enough: a read done after the change is fresh, but its grant
//!    was taken back, so the next change would not tell the holder.
//! 4. Grants carry the stream's epoch: a grant of a leader the holder no
//!    longer streams with is never cached, and a new leader fences its
//!    first changes ([`Leases::new`]'s `fence_until`) until every lease of
//!    its predecessor has run out.
//! 5. Objects that several holders change within `hot_ms` are not leased
//!    for a while: every access asks, instead of every change waiting. A
//!    holder that has gone (its stream closed and its leases run out)
//!    counts no more: a mount that restarts does not find what it changed
//!    just before hot.
//! 6. A holder's own change neither waits for nor tells it; it takes a
//!    ticket before sending it, and the leader, once the change is done,
//!    grants it what the change touched and reads that back for it: cached
//!    as a read under that ticket would be ([`HolderView::amend`]).
//! 7. A done change's other holders are granted its objects again and
//!    pushed what was read after that on their streams (a refresh), unless
//!    grants of those objects were taken back since ([`Leases::begun_since`],
//!    checked with the sends, under the lock `begin_change`'s invalidations
//!    are sent under): the stream's order then keeps it between
//!    invalidations. A holder's own change sends it no invalidation, so it
//!    caches no refresh of what it changed until the stream has caught up
//!    with that change ([`HolderView::pushed`]).
//! 8. A delegation ([`Leases::delegate`], for write-behind: see
//!    docs/write-behind.md; nothing asks for one yet) makes one holder the
//!    only one that may change an object without asking, and nobody else
//!    holds it meanwhile. Anyone else's change or read of it first recalls
//!    it ([`Leases::begin_recall`]): that waits, before the change is
//!    proposed, until the delegate has committed what it did and
//!    acknowledged, or its leases ran out.

use std::collections::{BTreeMap, BTreeSet};

mod holder;
#[cfg(test)]
mod tests;

pub use holder::{HolderView, ReadTicket};

/// Why a grant was refused (counted in fsd's `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The holder's stream closed or its leases ran out.
    HolderGone,
    /// A change of the object is on its way.
    Changing,
    /// Two holders changed it within `hot_ms`.
    Hot,
    /// Delegated to another holder (write-behind).
    Delegated,
}

impl Refusal {
    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::HolderGone => "holder_gone",
            Refusal::Changing => "changing",
            Refusal::Hot => "hot",
            Refusal::Delegated => "delegated",
        }
    }
}

/// A mount, by its session id.
pub type Holder = u64;
/// What a lease covers: an inode (a directory's lease covers its names,
/// negative ones included, and its listing).
pub type Object = u64;
/// A change under way, as [`Leases::begin_change`] numbered it.
pub type ChangeId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a renewal lasts, counted by the holder from when it sent it.
    pub lease_ms: u64,
    /// Added to the leader's idea of every expiry: clock-rate differences
    /// and scheduling over one lease.
    pub drift_ms: u64,
    /// An object changed by two holders within this long is hot: it is not
    /// leased again until it has been quiet for this long.
    pub hot_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease_ms: 400,
            drift_ms: 20,
            hot_ms: 5_000,
        }
    }
}

#[derive(Debug)]
struct HolderState {
    /// When its leases run out, by the leader's clock (0: it has none).
    expires: u64,
    objects: BTreeSet<Object>,
    /// Its stream is open: it can be told and can acknowledge.
    connected: bool,
}

#[derive(Debug, Default)]
struct ObjectState {
    holders: BTreeSet<Holder>,
    /// Changes under way: no grants until they are done.
    changing: u32,
    /// The holder that last changed it, and when.
    last_change: Option<(Holder, u64)>,
    hot_until: u64,
    /// When grants of it were last taken back (by `Leases::taken`): a
    /// change began, or [`Leases::expire`] dropped holders of it.
    taken_back: u64,
    /// The holder it is delegated to ([`Leases::delegate`]): the only one
    /// that may change it, without asking, until it is recalled.
    delegate: Option<Holder>,
    /// Flushes of its delegate under way ([`Leases::begin_flush`]): a
    /// recall is not done before they are.
    flushing: u32,
}

#[derive(Debug)]
struct Change {
    objects: Vec<Object>,
    /// A recall ([`Leases::begin_recall`]): its end takes the delegation back.
    recall: bool,
    /// Holders still to acknowledge, with the expiry that frees the change
    /// from waiting for each.
    waiting: BTreeMap<Holder, u64>,
}

/// Whether a change may be reported done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangePoll {
    Done,
    /// Not before this time (or an acknowledgement).
    WaitUntil(u64),
}

/// The leader's lease table.
#[derive(Debug)]
pub struct Leases {
    cfg: LeaseConfig,
    fence_until: u64,
    holders: BTreeMap<Holder, HolderState>,
    objects: BTreeMap<Object, ObjectState>,
    changes: BTreeMap<ChangeId, Change>,
    next_change: ChangeId,
    /// Counts the times grants were taken back (see `change_mark`).
    taken: u64,
    /// The last `taken_back` of any object [`Leases::expire`] forgot.
    forgotten: u64,
}

impl Leases {
    /// A table for a leader that took over at `now`. Leases its predecessor
    /// granted are unknown here; `fence_until` is when the last of them has
    /// run out for sure (`now + lease_ms + drift_ms` always is; less when
    /// Raft's election timing already keeps the two leaders that far apart).
    /// Changes wait until then.
    pub fn new(cfg: LeaseConfig, fence_until: u64) -> Leases {
        Leases {
            cfg,
            fence_until,
            holders: BTreeMap::new(),
            objects: BTreeMap::new(),
            changes: BTreeMap::new(),
            next_change: 1,
            taken: 0,
            forgotten: 0,
        }
    }

    /// `h` opened its stream. It holds nothing until its first renewal.
    pub fn connect(&mut self, h: Holder) {
        let st = self.holders.entry(h).or_insert(HolderState {
            expires: 0,
            objects: BTreeSet::new(),
            connected: true,
        });
        st.connected = true;
        // It dropped everything before opening a new stream: its first
        // renewal starts afresh even when its old leases ran out.
        st.expires = 0;
    }

    /// `h`'s stream closed. Its leases stand until they run out (it may not
    /// know yet), but it can no longer acknowledge or be renewed.
    pub fn disconnect(&mut self, h: Holder) {
        if let Some(st) = self.holders.get_mut(&h) {
            st.connected = false;
        }
    }

    /// A renewal from `h`, received at `now`: every lease it holds lasts
    /// until `lease_ms` after it sent the request. False when `h` has no
    /// open stream here, or its leases ran out before this arrived (it must
    /// reconnect and start over).
    ///
    /// Once a holder's leases ran out here, changes neither wait for it nor
    /// tell it, yet it still has what it cached. A renewal it sent before
    /// (or just after) its own expiry but that arrives later would make
    /// that valid again, stale: the model test found a stalled stream whose
    /// old renewals, all answered at once, revived a value a finished
    /// change had replaced.
    pub fn renew(&mut self, h: Holder, now: u64) -> bool {
        match self.holders.get_mut(&h) {
            Some(st) if st.connected && (st.expires == 0 || st.expires > now) => {
                st.expires = st.expires.max(now + self.cfg.lease_ms + self.cfg.drift_ms);
                true
            }
            _ => false,
        }
    }

    /// Before reading `objects` for `h`: which of them it may cache. Call it
    /// before the read, and take the read's log index after it. Extends
    /// nothing: a granted object is valid for as long as `h`'s renewals.
    pub fn grant(&mut self, h: Holder, objects: &[Object], now: u64) -> Vec<bool> {
        self.grant_why(h, objects, now)
            .iter()
            .map(Result::is_ok)
            .collect()
    }

    /// [`Leases::grant`], saying for each object refused why.
    pub fn grant_why(
        &mut self,
        h: Holder,
        objects: &[Object],
        now: u64,
    ) -> Vec<Result<(), Refusal>> {
        let live = self
            .holders
            .get(&h)
            .is_some_and(|st| st.connected && st.expires > now);
        let mut out = Vec::with_capacity(objects.len());
        for &o in objects {
            let why = match self.objects.get(&o) {
                _ if !live => Err(Refusal::HolderGone),
                Some(s) if s.changing != 0 => Err(Refusal::Changing),
                Some(s) if s.hot_until > now => Err(Refusal::Hot),
                Some(s) if s.delegate.is_some_and(|d| d != h) => Err(Refusal::Delegated),
                _ => Ok(()),
            };
            if why.is_ok() {
                self.objects.entry(o).or_default().holders.insert(h);
                if let Some(st) = self.holders.get_mut(&h) {
                    st.objects.insert(o);
                }
            }
            out.push(why);
        }
        out
    }

    /// `objects` changed (the change is applied); `by` is the holder whose
    /// request it was, if any: it is not waited for nor told (it calls
    /// [`HolderView::amend`] or [`HolderView::take_own`] on the objects
    /// when it hears the answer) but stays a holder of them. Returns the change's id and the holders to
    /// tell about it (each must get the objects on its stream), including
    /// those an unfinished earlier change of the same objects waits for. No
    /// grants of these objects until [`Leases::end_change`].
    pub fn begin_change(
        &mut self,
        objects: &[Object],
        by: Option<Holder>,
        now: u64,
    ) -> (ChangeId, Vec<Holder>) {
        let id = self.next_change;
        self.next_change += 1;
        self.taken += 1;
        let mut waiting = BTreeMap::new();
        for &o in objects {
            let os = self.objects.entry(o).or_default();
            os.changing += 1;
            os.taken_back = self.taken;
            if let Some(b) = by {
                if let Some((prev, at)) = os.last_change {
                    // A holder that has gone (stream closed, leases run
                    // out: a web host's mount restarted, say) bounces
                    // nothing any more: its successor is alone.
                    let present = self
                        .holders
                        .get(&prev)
                        .is_some_and(|st| st.connected || st.expires > now);
                    if prev != b && present && now.saturating_sub(at) < self.cfg.hot_ms {
                        os.hot_until = now + self.cfg.hot_ms;
                    }
                }
                os.last_change = Some((b, now));
            }
            if os.delegate.is_some_and(|d| Some(d) != by) {
                // Recalled before this change was proposed, or its
                // delegate's leases ran out: it is nobody's alone any more.
                os.delegate = None;
            }
            for h in std::mem::take(&mut os.holders) {
                let Some(st) = self.holders.get_mut(&h) else {
                    continue;
                };
                if Some(h) == by {
                    // The writer is not waited for, but stays a holder: a
                    // read it sent before may still be answered with what
                    // this change replaced, so the next change must tell it.
                    os.holders.insert(h);
                    continue;
                }
                st.objects.remove(&o);
                if st.expires > now {
                    waiting.insert(h, st.expires);
                }
            }
        }
        // An earlier change of the same objects took their holders out of
        // the table; those it still waits for may still hold what it
        // replaced, which is older than this change too. Without this, a
        // second change of a leased object found nobody to wait for and was
        // done while a holder still answered with the version before the
        // first (the model test found it).
        for c in self.changes.values() {
            if !c.objects.iter().any(|o| objects.contains(o)) {
                continue;
            }
            for (&h, &expires) in &c.waiting {
                if Some(h) != by && expires > now {
                    let w = waiting.entry(h).or_insert(expires);
                    *w = (*w).max(expires);
                }
            }
        }
        let tell = waiting.keys().copied().collect();
        self.changes.insert(
            id,
            Change {
                objects: objects.to_vec(),
                recall: false,
                waiting,
            },
        );
        (id, tell)
    }

    /// Delegates `o` to `h`, if it may have it alone: `h` is live, `o` is
    /// not changing nor hot, nobody else holds it and it is not delegated
    /// to anyone else. `h` then holds it (as a grant would) and is the only
    /// one that may change it without asking, until a recall
    /// ([`Leases::begin_recall`]) or its leases run out. (Design:
    /// docs/write-behind.md; nothing asks for delegations yet.)
    pub fn delegate(&mut self, h: Holder, o: Object, now: u64) -> bool {
        let live = self
            .holders
            .get(&h)
            .is_some_and(|st| st.connected && st.expires > now);
        let os = self.objects.entry(o).or_default();
        let free = os.changing == 0
            && os.hot_until <= now
            && os.holders.iter().all(|&x| x == h)
            && os.delegate.is_none_or(|d| d == h);
        if !(live && free) {
            return false;
        }
        os.delegate = Some(h);
        os.holders.insert(h);
        if let Some(st) = self.holders.get_mut(&h) {
            st.objects.insert(o);
        }
        true
    }

    /// Whether anyone but `h` holds `o`.
    pub fn held_by_others(&self, o: Object, h: Holder) -> bool {
        self.objects
            .get(&o)
            .is_some_and(|os| os.holders.iter().any(|&x| x != h))
    }

    /// The holder `o` is delegated to, if its leases still last at `now`.
    pub fn delegate_of(&self, o: Object, now: u64) -> Option<Holder> {
        let d = self.objects.get(&o)?.delegate?;
        self.holders
            .get(&d)
            .is_some_and(|st| st.expires > now)
            .then_some(d)
    }

    /// Before `by` (a holder, or `None` for any other client) changes or
    /// reads `objects`: the delegations of them to others must come back
    /// first. Returns the recall (a change to poll like any other, which
    /// must be done *before* the change is proposed or the read made) and
    /// the delegates to tell; a delegate acknowledges once what it did
    /// under the delegation is committed. `None`: nothing to recall. No
    /// grants of these objects until [`Leases::end_change`], which takes
    /// the delegations back.
    pub fn begin_recall(
        &mut self,
        objects: &[Object],
        by: Option<Holder>,
        now: u64,
    ) -> Option<(ChangeId, Vec<Holder>)> {
        let mut waiting = BTreeMap::new();
        let mut recalled = Vec::new();
        for &o in objects {
            let Some(os) = self.objects.get_mut(&o) else {
                continue;
            };
            let Some(d) = os.delegate.filter(|&d| Some(d) != by) else {
                continue;
            };
            os.changing += 1;
            recalled.push(o);
            if let Some(st) = self.holders.get(&d) {
                if st.expires > now {
                    let w = waiting.entry(d).or_insert(st.expires);
                    *w = (*w).max(st.expires);
                }
            }
        }
        if recalled.is_empty() {
            return None;
        }
        let id = self.next_change;
        self.next_change += 1;
        let tell = waiting.keys().copied().collect();
        self.changes.insert(
            id,
            Change {
                objects: recalled,
                recall: true,
                waiting,
            },
        );
        Some((id, tell))
    }

    /// Every object delegated now (to recall them all: a follower's read
    /// cannot say what it reads).
    pub fn delegated(&self) -> Vec<Object> {
        self.objects
            .iter()
            .filter(|(_, os)| os.delegate.is_some())
            .map(|(&o, _)| o)
            .collect()
    }

    /// Those of `objects` delegated to anyone but `by` (to recall before
    /// an answer that tells about them is given).
    pub fn delegated_to_others(&self, objects: &[Object], by: Option<Holder>) -> Vec<Object> {
        objects
            .iter()
            .copied()
            .filter(|o| {
                self.objects
                    .get(o)
                    .and_then(|os| os.delegate)
                    .is_some_and(|d| Some(d) != by)
            })
            .collect()
    }

    /// Before proposing `h`'s flush of what it did alone in `o`: whether it
    /// still holds the delegation at `now`. If so, a recall of `o` is not
    /// done until [`Leases::end_flush`], even if `h`'s leases run out
    /// meanwhile: the flush is ordered before whatever waits for the recall.
    pub fn begin_flush(&mut self, h: Holder, o: Object, now: u64) -> bool {
        if self.delegate_of(o, now) != Some(h) {
            return false;
        }
        if let Some(os) = self.objects.get_mut(&o) {
            os.flushing += 1;
        }
        true
    }

    /// A flush [`Leases::begin_flush`] admitted has applied (or failed).
    pub fn end_flush(&mut self, o: Object) {
        if let Some(os) = self.objects.get_mut(&o) {
            os.flushing = os.flushing.saturating_sub(1);
        }
    }

    /// A mark to take before granting what will be pushed (a refresh):
    /// see [`Leases::begun_since`].
    pub fn change_mark(&self) -> u64 {
        self.taken + 1
    }

    /// Whether grants of any of `objects` were taken back since `mark`
    /// ([`Leases::change_mark`]), so that what was read of them since must
    /// not be pushed: a change of them began (what was read may be older
    /// than its invalidation, already sent, and the change took back the
    /// grants made before it), or [`Leases::expire`] dropped holders of
    /// them (the model test found both of these, the second twice: a holder
    /// that reconnected had its grants dropped before its first renewal,
    /// and was then pushed, on its new stream, what it was no longer told
    /// of; and an object a change began on was forgotten, and with it that
    /// the change began).
    pub fn begun_since(&self, objects: &[Object], mark: u64) -> bool {
        self.forgotten >= mark
            || objects
                .iter()
                .any(|o| self.objects.get(o).is_some_and(|os| os.taken_back >= mark))
    }

    /// `h` has dropped what change `id` touched.
    pub fn ack(&mut self, h: Holder, id: ChangeId) {
        if let Some(c) = self.changes.get_mut(&id) {
            c.waiting.remove(&h);
        }
    }

    /// Whether change `id` may be reported done at `now`.
    pub fn poll_change(&mut self, id: ChangeId, now: u64) -> ChangePoll {
        let fence = self.fence_until;
        let Some(c) = self.changes.get_mut(&id) else {
            return ChangePoll::Done;
        };
        c.waiting.retain(|_, expires| *expires > now);
        let flushing = c.recall
            && c.objects
                .iter()
                .any(|o| self.objects.get(o).is_some_and(|os| os.flushing > 0));
        if flushing {
            // Woken by the flush's end (an acknowledgement's wake-up).
            return ChangePoll::WaitUntil(now + 10);
        }
        match c.waiting.values().min() {
            // Poll again then, or on an acknowledgement; the fence is
            // checked again too.
            Some(&t) => ChangePoll::WaitUntil(t),
            None if now < fence => ChangePoll::WaitUntil(fence),
            None => ChangePoll::Done,
        }
    }

    /// Change `id` was reported done (or given up): its objects may be
    /// granted again.
    pub fn end_change(&mut self, id: ChangeId) {
        let Some(c) = self.changes.remove(&id) else {
            return;
        };
        for o in c.objects {
            if let Some(os) = self.objects.get_mut(&o) {
                os.changing = os.changing.saturating_sub(1);
                if c.recall {
                    os.delegate = None;
                }
            }
        }
    }

    /// Forgets holders whose leases have run out and who are gone, and
    /// objects nobody holds or changes.
    pub fn expire(&mut self, now: u64) {
        self.holders
            .retain(|_, st| st.expires > now || st.connected);
        for st in self.holders.values_mut() {
            if st.expires <= now {
                // Run out: nothing to wait for or tell any more.
                st.objects.clear();
            }
        }
        self.taken += 1;
        let (holders, hot_ms, taken) = (&self.holders, self.cfg.hot_ms, self.taken);
        let forgotten = &mut self.forgotten;
        self.objects.retain(|_, os| {
            let before = os.holders.len();
            os.holders
                .retain(|h| holders.get(h).is_some_and(|st| st.expires > now));
            if os.delegate.is_some_and(|d| !os.holders.contains(&d)) {
                os.delegate = None;
            }
            if os.holders.len() < before {
                // Those dropped are not told of its changes any more.
                os.taken_back = taken;
            }
            let recently_changed = os
                .last_change
                .is_some_and(|(_, at)| now.saturating_sub(at) < hot_ms);
            let keep = !os.holders.is_empty()
                || os.changing > 0
                || os.flushing > 0
                || os.hot_until > now
                || recently_changed;
            if !keep {
                *forgotten = (*forgotten).max(os.taken_back);
            }
            keep
        });
    }

    /// When the last lease granted so far runs out, by the leader's clock
    /// (0: none is held).
    pub fn last_expiry(&self) -> u64 {
        self.holders
            .values()
            .map(|st| st.expires)
            .max()
            .unwrap_or(0)
    }

    /// How many holders and leased objects the table tracks (for metrics).
    pub fn sizes(&self) -> (usize, usize) {
        (self.holders.len(), self.objects.len())
    }
}
