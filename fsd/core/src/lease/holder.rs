//! A mount's side of the leases: see the module [`crate::lease`].

use std::collections::BTreeMap;

use super::Object;

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
    /// Objects this mount changed itself, with when it heard the outcome
    /// (this mount's clock), until a renewal sent after that is answered:
    /// see [`HolderView::pushed`].
    own: BTreeMap<Object, u64>,
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
            own: BTreeMap::new(),
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
        // What is pushed from now on comes on a new stream.
        self.own.clear();
    }

    /// A renewal sent at `sent` (this mount's clock) on stream `epoch` was
    /// answered.
    pub fn renewed(&mut self, epoch: u64, sent: u64) {
        if epoch == self.epoch {
            self.expires = self.expires.max(sent + self.lease_ms);
            // The leader answered it after this mount's changes heard of
            // before `sent` had begun: whatever it pushed before them has
            // arrived (see `pushed`).
            self.own.retain(|_, &mut heard| heard >= sent);
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

    /// Why an answer read under `ticket` may not be cached for `object`
    /// (`None`: it may), for the logs.
    pub fn refusal(
        &self,
        ticket: ReadTicket,
        object: Object,
        granted: bool,
        now: u64,
    ) -> Option<&'static str> {
        if !granted {
            Some("not granted")
        } else if ticket.epoch != self.epoch {
            Some("another stream since")
        } else if self
            .invalidated
            .get(&object)
            .is_some_and(|&at| at > ticket.dropped)
        {
            Some("changed since")
        } else if now >= self.expires {
            Some("leases ran out")
        } else {
            None
        }
    }

    fn may_cache(&self, ticket: ReadTicket, object: Object, granted: bool, now: u64) -> bool {
        self.refusal(ticket, object, granted, now).is_none()
    }

    /// This holder's own change to `object`, read back for it by the leader
    /// (granted or not) after the change applied, under `ticket`, taken
    /// before the change was sent: like a read sent then and answered now.
    /// Updates what is cached for `object` in place when it may be cached
    /// ([`HolderView::offer`]'s rule: nothing invalidated it since the
    /// ticket), else drops it and returns what was cached. Either way no
    /// read sent before this one is cached for `object`: it may have
    /// returned what the change replaced; nor is a refresh for a while (see
    /// [`HolderView::pushed`]).
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
        self.own.insert(object, now);
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
    ///
    /// Not for an object this mount changed itself
    /// ([`HolderView::amend`], [`HolderView::take_own`]) until a renewal
    /// sent after it heard of that change is answered: its own change sends
    /// it no invalidation, so a refresh pushed before that change began may
    /// arrive after its answer, and would replace what the change made with
    /// what it replaced (the model test found it).
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
        let ok = epoch == self.epoch && now < self.expires && !self.own.contains_key(&object);
        if ok {
            update(self.cached.entry(object).or_default());
        }
        ok
    }

    /// [`HolderView::take`] for `objects` this mount changed itself, heard
    /// of at `now` (its change's answer, when not read back with
    /// [`HolderView::amend`]): no refresh of them is cached until a renewal
    /// sent after `now` is answered (see [`HolderView::pushed`]).
    pub fn take_own(&mut self, objects: &[Object], now: u64) -> Vec<(Object, V)> {
        for &o in objects {
            self.own.insert(o, now);
        }
        self.take(objects)
    }

    /// Drops `objects` (as [`HolderView::invalidate`]) and returns what was
    /// cached for them (the caller tells the kernel about each name it had
    /// answered). For what this mount changed itself, see
    /// [`HolderView::take_own`].
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

    /// [`HolderView::get`] to fill in what the cached value already implies
    /// (a name a whole listing leaves out, recorded as absent).
    pub fn get_mut(&mut self, object: Object, now: u64) -> Option<&mut V> {
        if now < self.expires {
            self.cached.get_mut(&object)
        } else {
            None
        }
    }

    /// Drops `object`, which this mount changed (heard of at `now`), as
    /// [`HolderView::take_own`]. A read of it in flight is not cached
    /// either: the leader neither waited for nor told this mount, and the
    /// read may have returned what the change replaced.
    pub fn forget(&mut self, object: Object, now: u64) {
        self.take_own(&[object], now);
    }

    /// The current stream (see [`HolderView::reconnected`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How long what is cached stays valid from `now`, for the kernel's
    /// entry and attribute timeouts.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires.saturating_sub(now)
    }
}
