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
//!    expiry the change waits for at the most.
//! 3. A read answer travels beside the stream (a unary call), so it may
//!    arrive after an invalidation of what it read. It carries the log
//!    index it was read at, and the holder does not cache it when it read
//!    before an invalidation it has already seen ([`HolderView::offer`]).
//!    A grant is registered *before* the read, so a change applied after
//!    the registration finds the holder in the table.
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

    pub fn config(&self) -> LeaseConfig {
        self.cfg
    }

    /// `h` opened its stream. It holds nothing until its first renewal.
    pub fn connect(&mut self, h: Holder) {
        let st = self.holders.entry(h).or_insert(HolderState {
            expires: 0,
            objects: BTreeSet::new(),
            connected: true,
        });
        st.connected = true;
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
    /// open stream here (it must reconnect and start over).
    pub fn renew(&mut self, h: Holder, now: u64) -> bool {
        match self.holders.get_mut(&h) {
            Some(st) if st.connected => {
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
    /// request it was (it updates its own cache from the answer), if any.
    /// Returns the change's id and the holders to tell about it (each must
    /// get the objects and the change's log index on its stream). No grants
    /// of these objects until [`Leases::end_change`].
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
                st.objects.remove(&o);
                if Some(h) != by && st.expires > now {
                    waiting.insert(h, st.expires);
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
    /// The log index of the last invalidation of each object, while reads
    /// sent before it may still be answered.
    invalidated: BTreeMap<Object, u64>,
    /// Reads sent and not yet answered.
    in_flight: u64,
}

/// A read sent to the leader: the stream epoch it was sent under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTicket {
    epoch: u64,
}

impl<V> HolderView<V> {
    pub fn new(lease_ms: u64) -> HolderView<V> {
        HolderView {
            lease_ms,
            epoch: 0,
            expires: 0,
            cached: BTreeMap::new(),
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

    /// The leader says `objects` changed at log index `index`: drop them.
    /// The caller tells the kernel, then acknowledges.
    pub fn invalidate(&mut self, objects: &[Object], index: u64) {
        for o in objects {
            self.cached.remove(o);
            if self.in_flight > 0 {
                let e = self.invalidated.entry(*o).or_insert(index);
                *e = (*e).max(index);
            }
        }
    }

    /// Before sending a read that may grant a lease.
    pub fn read_sent(&mut self) -> ReadTicket {
        self.in_flight += 1;
        ReadTicket { epoch: self.epoch }
    }

    /// The answer to a read: `value` of `object`, read at log index
    /// `index`, `granted` or not. Caches it when the grant belongs to the
    /// current stream and no invalidation newer than the read was seen.
    /// Returns whether it was cached.
    pub fn offer(
        &mut self,
        ticket: ReadTicket,
        object: Object,
        value: V,
        index: u64,
        granted: bool,
        now: u64,
    ) -> bool {
        let fresh = self.invalidated.get(&object).is_none_or(|&i| index >= i);
        let ok = granted && ticket.epoch == self.epoch && fresh && now < self.expires;
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
        index: u64,
        granted: bool,
        now: u64,
        update: impl FnOnce(&mut V),
    ) -> bool
    where
        V: Default,
    {
        let fresh = self.invalidated.get(&object).is_none_or(|&i| index >= i);
        let ok = granted && ticket.epoch == self.epoch && fresh && now < self.expires;
        if ok {
            update(self.cached.entry(object).or_default());
        }
        ok
    }

    /// Drops `objects` and returns what was cached for them (the caller
    /// tells the kernel about each name it had answered).
    pub fn take(&mut self, objects: &[Object], index: u64) -> Vec<(Object, V)> {
        let out = objects
            .iter()
            .filter_map(|o| self.cached.remove(o).map(|v| (*o, v)))
            .collect();
        self.invalidate(objects, index);
        out
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

    /// Drops `object` (this mount changed it, or no longer needs it).
    pub fn forget(&mut self, object: Object) {
        self.cached.remove(&object);
    }

    /// How long what is cached stays valid from `now`, for the kernel's
    /// entry and attribute timeouts.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires.saturating_sub(now)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
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
        l.renew(1, 5_100);
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
    fn an_answer_read_before_an_invalidation_is_not_cached() {
        let mut v: HolderView<&str> = HolderView::new(400);
        let e = v.reconnected();
        v.renewed(e, 0);
        let t = v.read_sent();
        v.invalidate(&[10], 7);
        assert!(!v.offer(t, 10, "old", 6, true, 10));
        assert!(v.offer(t, 10, "new", 7, true, 10));
        v.read_done(t);
        assert_eq!(v.get(10, 10), Some(&"new"));
        assert_eq!(v.get(10, 400), None, "run out");
    }

    #[test]
    fn a_grant_from_an_earlier_stream_is_not_cached() {
        let mut v: HolderView<&str> = HolderView::new(400);
        let e = v.reconnected();
        v.renewed(e, 0);
        let t = v.read_sent();
        let e2 = v.reconnected();
        v.renewed(e2, 5);
        assert!(!v.offer(t, 10, "from the old leader", 3, true, 10));
        v.read_done(t);
        assert_eq!(v.get(10, 10), None);
    }
}
