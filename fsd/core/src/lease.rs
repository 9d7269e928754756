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
//!    for a while: every access asks, instead of every change waiting.

use std::collections::{BTreeMap, BTreeSet};

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
    /// The last change begun on it.
    begun: ChangeId,
}

#[derive(Debug)]
struct Change {
    objects: Vec<Object>,
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
        let live = self
            .holders
            .get(&h)
            .is_some_and(|st| st.connected && st.expires > now);
        let mut out = Vec::with_capacity(objects.len());
        for &o in objects {
            let ok = live
                && self
                    .objects
                    .get(&o)
                    .is_none_or(|s| s.changing == 0 && s.hot_until <= now);
            if ok {
                self.objects.entry(o).or_default().holders.insert(h);
                if let Some(st) = self.holders.get_mut(&h) {
                    st.objects.insert(o);
                }
            }
            out.push(ok);
        }
        out
    }

    /// `objects` changed (the change is applied); `by` is the holder whose
    /// request it was, if any: it is not waited for (it calls
    /// [`HolderView::forget`] on the objects when it hears the answer) but
    /// stays a holder of them. Returns the change's id and the holders to
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
        let mut waiting = BTreeMap::new();
        for &o in objects {
            let os = self.objects.entry(o).or_default();
            os.changing += 1;
            os.begun = id;
            if let Some(b) = by {
                if let Some((prev, at)) = os.last_change {
                    if prev != b && now.saturating_sub(at) < self.cfg.hot_ms {
                        os.hot_until = now + self.cfg.hot_ms;
                    }
                }
                os.last_change = Some((b, now));
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
                waiting,
            },
        );
        (id, tell)
    }

    /// Where the numbering of changes stands: see [`Leases::begun_since`].
    pub fn change_mark(&self) -> ChangeId {
        self.next_change
    }

    /// Whether a change of any of `objects` began since `mark`
    /// ([`Leases::change_mark`]): what was read of them since may be older
    /// than an invalidation already sent.
    pub fn begun_since(&self, objects: &[Object], mark: ChangeId) -> bool {
        objects
            .iter()
            .any(|o| self.objects.get(o).is_some_and(|os| os.begun >= mark))
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
            }
        }
    }

    /// Forgets holders whose leases have run out and who are gone, and
    /// objects nobody holds or changes.
    pub fn expire(&mut self, now: u64) {
        let gone: Vec<Holder> = self
            .holders
            .iter()
            .filter(|(_, st)| st.expires <= now && !st.connected)
            .map(|(h, _)| *h)
            .collect();
        for h in gone {
            if let Some(st) = self.holders.remove(&h) {
                for o in st.objects {
                    if let Some(os) = self.objects.get_mut(&o) {
                        os.holders.remove(&h);
                    }
                }
            }
        }
        for st in self.holders.values_mut() {
            if st.expires <= now {
                // Run out: nothing to wait for or tell any more.
                st.objects.clear();
            }
        }
        let (holders, hot_ms) = (&self.holders, self.cfg.hot_ms);
        self.objects.retain(|_, os| {
            os.holders
                .retain(|h| holders.get(h).is_some_and(|st| st.expires > now));
            let recently_changed = os
                .last_change
                .is_some_and(|(_, at)| now.saturating_sub(at) < hot_ms);
            !os.holders.is_empty() || os.changing > 0 || os.hot_until > now || recently_changed
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

/// A mount's side: whether what it cached may be used, and whether an
/// answer may be cached at all. `V` is whatever it caches per object.
#[derive(Debug)]
pub struct HolderView<V> {
    lease_ms: u64,
    /// The stream this view belongs to (a new one after every reconnect).
    epoch: u64,
    /// When everything cached runs out, by this mount's clock (0: nothing
    /// is valid).
    expires: u64,
    cached: BTreeMap<Object, V>,
    /// Invalidations (and forgets) seen so far, counted.
    dropped: u64,
    /// When each object was last invalidated (by `dropped`), while reads
    /// sent before it may still be answered.
    invalidated: BTreeMap<Object, u64>,
    /// Reads sent and not yet answered.
    in_flight: u64,
}

/// A read sent to the leader: the stream epoch it was sent under, and how
/// many invalidations had been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTicket {
    epoch: u64,
    dropped: u64,
}

impl<V> HolderView<V> {
    pub fn new(lease_ms: u64) -> HolderView<V> {
        HolderView {
            lease_ms,
            epoch: 0,
            expires: 0,
            cached: BTreeMap::new(),
            dropped: 0,
            invalidated: BTreeMap::new(),
            in_flight: 0,
        }
    }

    /// A new stream to a (possibly new) leader: nothing cached is valid any
    /// more. Returns the stream's epoch, which its grants must carry.
    pub fn reconnected(&mut self) -> u64 {
        self.lost();
        self.epoch += 1;
        self.epoch
    }

    /// [`HolderView::reconnected`] to a leader whose leases last `lease_ms`.
    pub fn reconnected_with(&mut self, lease_ms: u64) -> u64 {
        self.lease_ms = lease_ms;
        self.reconnected()
    }

    /// The stream broke, a renewal was refused, or the leader changed:
    /// drop everything.
    pub fn lost(&mut self) {
        self.expires = 0;
        self.cached.clear();
    }

    /// A renewal sent at `sent` (this mount's clock) on stream `epoch` was
    /// answered.
    pub fn renewed(&mut self, epoch: u64, sent: u64) {
        if epoch == self.epoch {
            self.expires = self.expires.max(sent + self.lease_ms);
        }
    }

    /// The leader says `objects` changed: drop them. The caller tells the
    /// kernel, then acknowledges.
    pub fn invalidate(&mut self, objects: &[Object]) {
        self.dropped += 1;
        for o in objects {
            self.cached.remove(o);
            if self.in_flight > 0 {
                self.invalidated.insert(*o, self.dropped);
            }
        }
    }

    /// Before sending a read that may grant a lease.
    pub fn read_sent(&mut self) -> ReadTicket {
        self.in_flight += 1;
        ReadTicket {
            epoch: self.epoch,
            dropped: self.dropped,
        }
    }

    /// The answer to a read: `value` of `object`, `granted` or not. Caches
    /// it when the grant belongs to the current stream and `object` was not
    /// invalidated (or forgotten) since the read was sent: whatever the read
    /// returned, such a grant may have been taken back by the change.
    /// Returns whether it was cached.
    pub fn offer(
        &mut self,
        ticket: ReadTicket,
        object: Object,
        value: V,
        granted: bool,
        now: u64,
    ) -> bool {
        let ok = self.may_cache(ticket, object, granted, now);
        if ok {
            self.cached.insert(object, value);
        }
        ok
    }

    /// [`HolderView::offer`] that changes what is cached for `object` in
    /// place (a directory's entry learns one more name) instead of
    /// replacing it.
    pub fn offer_with(
        &mut self,
        ticket: ReadTicket,
        object: Object,
        granted: bool,
        now: u64,
        update: impl FnOnce(&mut V),
    ) -> bool
    where
        V: Default,
    {
        let ok = self.may_cache(ticket, object, granted, now);
        if ok {
            update(self.cached.entry(object).or_default());
        }
        ok
    }

    fn may_cache(&self, ticket: ReadTicket, object: Object, granted: bool, now: u64) -> bool {
        let fresh = self
            .invalidated
            .get(&object)
            .is_none_or(|&at| at <= ticket.dropped);
        granted && ticket.epoch == self.epoch && fresh && now < self.expires
    }

    /// This holder's own change to `object`, read back for it by the leader
    /// (granted or not) after the change applied, under `ticket`, taken
    /// before the change was sent: like a read sent then and answered now.
    /// Updates what is cached for `object` in place when it may be cached
    /// ([`HolderView::offer`]'s rule: nothing invalidated it since the
    /// ticket), else drops it and returns what was cached. Either way no
    /// read sent before this one is cached for `object`: it may have
    /// returned what the change replaced.
    pub fn amend(
        &mut self,
        ticket: ReadTicket,
        object: Object,
        granted: bool,
        now: u64,
        update: impl FnOnce(&mut V),
    ) -> Option<V>
    where
        V: Default,
    {
        if !self.may_cache(ticket, object, granted, now) {
            return self.take(&[object]).pop().map(|(_, v)| v);
        }
        self.dropped += 1;
        if self.in_flight > 0 {
            self.invalidated.insert(object, self.dropped);
        }
        update(self.cached.entry(object).or_default());
        None
    }

    /// What the leader pushed on stream `epoch` after a change (a refresh):
    /// the stream's order makes it newer than every invalidation seen so far
    /// and older than every one to come, so it is cached as it is (in
    /// place) while the leases last. Returns whether it was.
    pub fn pushed(
        &mut self,
        epoch: u64,
        object: Object,
        now: u64,
        update: impl FnOnce(&mut V),
    ) -> bool
    where
        V: Default,
    {
        let ok = epoch == self.epoch && now < self.expires;
        if ok {
            update(self.cached.entry(object).or_default());
        }
        ok
    }

    /// Drops `objects` (as [`HolderView::invalidate`]) and returns what was
    /// cached for them (the caller tells the kernel about each name it had
    /// answered).
    pub fn take(&mut self, objects: &[Object]) -> Vec<(Object, V)> {
        let out = objects
            .iter()
            .filter_map(|o| self.cached.remove(o).map(|v| (*o, v)))
            .collect();
        self.invalidate(objects);
        out
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.cached.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cached.is_empty()
    }

    /// Drops everything cached (to bound memory) and returns it, for the
    /// caller to tell the kernel, as for [`HolderView::take`].
    pub fn drain(&mut self) -> Vec<(Object, V)> {
        let objects: Vec<Object> = self.cached.keys().copied().collect();
        self.take(&objects)
    }

    /// A read answered (or failed): call once per [`HolderView::read_sent`],
    /// after its [`HolderView::offer`]s.
    pub fn read_done(&mut self, _ticket: ReadTicket) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.invalidated.clear();
        }
    }

    /// What is cached for `object`, while the leases last.
    pub fn get(&self, object: Object, now: u64) -> Option<&V> {
        if now < self.expires {
            self.cached.get(&object)
        } else {
            None
        }
    }

    /// Drops `object` (this mount changed it, or no longer needs it). A
    /// read of it in flight is not cached either: when this mount changed
    /// it, the leader neither waited for nor told this mount, and the read
    /// may have returned what the change replaced.
    pub fn forget(&mut self, object: Object) {
        self.invalidate(&[object]);
    }

    /// How long what is cached stays valid from `now`, for the kernel's
    /// entry and attribute timeouts.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: LeaseConfig = LeaseConfig {
        lease_ms: 400,
        drift_ms: 20,
        hot_ms: 5_000,
    };

    #[test]
    fn a_change_waits_for_each_holder_until_it_acknowledges_or_runs_out() {
        let mut l = Leases::new(CFG, 0);
        for h in [1, 2, 3] {
            l.connect(h);
            assert!(l.renew(h, 100));
        }
        assert_eq!(l.grant(1, &[10], 100), vec![true]);
        assert_eq!(l.grant(2, &[10, 11], 100), vec![true, true]);
        // Holder 3 changes 10: 1 and 2 are told, 3 is not waited for.
        let (id, tell) = l.begin_change(&[10], Some(3), 200);
        assert_eq!(tell, vec![1, 2]);
        // No grant of 10 while it changes.
        assert_eq!(l.grant(3, &[10], 200), vec![false]);
        assert_eq!(l.poll_change(id, 200), ChangePoll::WaitUntil(520));
        l.ack(1, id);
        assert_eq!(l.poll_change(id, 210), ChangePoll::WaitUntil(520));
        // Holder 2 never answers: its leases run out at 520.
        assert_eq!(l.poll_change(id, 520), ChangePoll::Done);
        l.end_change(id);
        assert_eq!(l.grant(1, &[10], 530), vec![false], "run out");
        assert!(!l.renew(1, 530), "run out: it must start over");
        l.connect(1);
        assert!(l.renew(1, 530));
        assert_eq!(l.grant(1, &[10], 530), vec![true]);
    }

    #[test]
    fn grants_need_a_live_renewed_stream_and_do_not_extend_it() {
        let mut l = Leases::new(CFG, 0);
        assert_eq!(l.grant(1, &[10], 0), vec![false]);
        l.connect(1);
        assert_eq!(l.grant(1, &[10], 0), vec![false], "not renewed yet");
        assert!(l.renew(1, 0));
        assert_eq!(l.grant(1, &[10], 100), vec![true]);
        assert_eq!(l.grant(1, &[11], 420), vec![false], "run out");
        l.disconnect(1);
        assert!(!l.renew(1, 430));
    }

    #[test]
    fn an_object_two_holders_change_turns_hot_and_is_not_leased() {
        let mut l = Leases::new(CFG, 0);
        for h in [1, 2] {
            l.connect(h);
            l.renew(h, 0);
        }
        let (a, _) = l.begin_change(&[10], Some(1), 10);
        l.end_change(a);
        let (b, _) = l.begin_change(&[10], Some(2), 20);
        l.end_change(b);
        assert_eq!(l.grant(1, &[10], 30), vec![false]);
        // (Its leases ran out meanwhile: it starts over.)
        l.connect(1);
        assert!(l.renew(1, 5_100));
        assert_eq!(l.grant(1, &[10], 5_100), vec![true]);
    }

    #[test]
    fn a_new_leader_fences_its_first_changes() {
        let mut l = Leases::new(CFG, 1_000);
        let (id, tell) = l.begin_change(&[10], None, 600);
        assert!(tell.is_empty());
        assert_eq!(l.poll_change(id, 600), ChangePoll::WaitUntil(1_000));
        assert_eq!(l.poll_change(id, 1_000), ChangePoll::Done);
    }

    #[test]
    fn an_answer_to_a_read_in_flight_across_an_invalidation_is_not_cached() {
        let mut v: HolderView<&str> = HolderView::new(400);
        let e = v.reconnected();
        v.renewed(e, 0);
        let before = v.read_sent();
        v.invalidate(&[10]);
        let after = v.read_sent();
        assert!(!v.offer(before, 10, "old or new", true, 10));
        v.read_done(before);
        assert!(v.offer(after, 10, "new", true, 10));
        v.read_done(after);
        assert_eq!(v.get(10, 10), Some(&"new"));
        assert_eq!(v.get(10, 400), None, "run out");
    }

    #[test]
    fn an_own_change_read_back_is_cached_unless_something_invalidated_it_meanwhile() {
        let mut v: HolderView<String> = HolderView::new(400);
        let e = v.reconnected();
        v.renewed(e, 0);
        let older = v.read_sent();
        let change = v.read_sent();
        // Read back after the change: cached, in place.
        assert_eq!(v.amend(change, 10, true, 5, |s| s.push_str("mine")), None);
        assert_eq!(v.get(10, 5).map(String::as_str), Some("mine"));
        // A read sent before the change is not cached over it.
        assert!(!v.offer(older, 10, "before".into(), true, 6));
        v.read_done(older);
        v.read_done(change);
        // Invalidated while the change was on its way: dropped instead.
        let change = v.read_sent();
        v.invalidate(&[10]);
        let read = v.read_sent();
        assert!(v.offer_with(read, 11, true, 7, |s| s.push('x')));
        v.read_done(read);
        assert_eq!(v.amend(change, 10, true, 8, |s| s.push_str("stale")), None);
        assert_eq!(v.get(10, 8), None);
        // Not granted: dropped, and what was cached is handed back.
        let change = v.read_sent();
        assert_eq!(
            v.amend(change, 11, false, 9, |s| s.push('y')),
            Some("x".to_string())
        );
        assert_eq!(v.get(11, 9), None);
    }

    // The model test (tests/lease_model.rs) found each of the following.

    /// A leader whose `holders` connected and renewed at 0, and the view of
    /// the first of them.
    fn streaming(holders: &[Holder]) -> (Leases, HolderView<&'static str>) {
        let mut l = Leases::new(CFG, 0);
        let mut v = HolderView::new(CFG.lease_ms);
        let e = v.reconnected();
        for &h in holders {
            l.connect(h);
            assert!(l.renew(h, 0));
        }
        v.renewed(e, 0);
        (l, v)
    }

    #[test]
    fn issue_12_a_second_change_waits_for_whom_the_first_still_waits_for() {
        let mut l = Leases::new(CFG, 0);
        for h in [1, 2] {
            l.connect(h);
            assert!(l.renew(h, 0));
        }
        assert_eq!(l.grant(1, &[10], 0), vec![true]);
        // 1 caches version 1; change A makes version 2 and tells 1, whose
        // stream is slow.
        let (a, tell) = l.begin_change(&[10], None, 10);
        assert_eq!(tell, vec![1]);
        // Change B makes version 3 before 1 heard of A. Were B done at
        // once, 1 would still answer version 1 after B's writer heard.
        let (b, tell) = l.begin_change(&[10], Some(2), 20);
        assert_eq!(tell, vec![1]);
        assert_eq!(l.poll_change(b, 20), ChangePoll::WaitUntil(420));
        l.ack(1, a);
        assert_eq!(l.poll_change(b, 30), ChangePoll::WaitUntil(420));
        l.ack(1, b);
        assert_eq!(l.poll_change(b, 40), ChangePoll::Done);
    }

    #[test]
    fn issue_12_a_renewal_that_arrives_after_the_leases_ran_out_is_refused() {
        let (mut l, mut v) = streaming(&[1]);
        let t = v.read_sent();
        assert_eq!(l.grant(1, &[10], 5), vec![true]);
        assert!(v.offer(t, 10, "version 1", true, 10));
        v.read_done(t);
        // 1's stream stalls with a renewal sent at 300 in it. Its leases
        // run out at 420 here; a change at 430 neither tells nor waits.
        let (c, tell) = l.begin_change(&[10], None, 430);
        assert!(tell.is_empty());
        assert_eq!(l.poll_change(c, 430), ChangePoll::Done);
        // The renewal arrives at 440. Answering it would let 1 use
        // "version 1" until 700.
        assert!(!l.renew(1, 440));
        v.lost();
        let e = v.reconnected();
        l.connect(1);
        assert!(l.renew(1, 450));
        v.renewed(e, 445);
        assert_eq!(v.get(10, 450), None);
    }

    #[test]
    fn issue_12_a_read_granted_before_a_change_and_done_after_it_is_not_cached() {
        let (mut l, mut v) = streaming(&[1]);
        let t = v.read_sent();
        assert_eq!(l.grant(1, &[10], 5), vec![true]);
        // A change lands between the grant and the read: 1 is told, and
        // its grant is taken back.
        let (a, tell) = l.begin_change(&[10], None, 6);
        assert_eq!(tell, vec![1]);
        v.invalidate(&[10]);
        l.ack(1, a);
        assert_eq!(l.poll_change(a, 8), ChangePoll::Done);
        l.end_change(a);
        // The read returns the new version, but a later change would not
        // tell 1: caching it would go stale.
        assert!(!v.offer(t, 10, "version 2", true, 9));
        v.read_done(t);
        let (_, tell) = l.begin_change(&[10], None, 20);
        assert!(tell.is_empty());
    }

    #[test]
    fn issue_12_the_writer_stays_a_holder_and_its_read_in_flight_is_not_cached() {
        let (mut l, mut v) = streaming(&[1, 2]);
        // 1 reads 10 (granted, version 1 read), then changes it itself.
        let t = v.read_sent();
        assert_eq!(l.grant(1, &[10], 5), vec![true]);
        let (a, tell) = l.begin_change(&[10], Some(1), 10);
        assert!(tell.is_empty(), "the writer is not waited for");
        assert_eq!(l.poll_change(a, 10), ChangePoll::Done);
        l.end_change(a);
        // Its read may still be answered with version 1, before or after
        // it hears of its own change: the next change must tell it...
        let (_, tell) = l.begin_change(&[10], Some(2), 20);
        assert_eq!(tell, vec![1]);
        // ...and once it forgot what it changed, the answer is not cached.
        v.forget(10);
        assert!(!v.offer(t, 10, "version 1", true, 30));
        v.read_done(t);
    }

    #[test]
    fn a_grant_from_an_earlier_stream_is_not_cached() {
        let mut v: HolderView<&str> = HolderView::new(400);
        let e = v.reconnected();
        v.renewed(e, 0);
        let t = v.read_sent();
        let e2 = v.reconnected();
        v.renewed(e2, 5);
        assert!(!v.offer(t, 10, "from the old leader", true, 10));
        v.read_done(t);
        assert_eq!(v.get(10, 10), None);
    }
}
