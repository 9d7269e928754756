//! Metadata leases, the mount's side (the rules: `failsafe_core::lease`).
//!
//! [`Client::enable_leases`] keeps one Watch stream open to the tracker
//! leader and renews it every third of a lease. Lookups, stats and the
//! extents an open needs ([`Client::lookup_leased`], [`Client::getattr_leased`],
//! [`Client::extents_leased`]) are answered from memory while the leases
//! last, and otherwise ask the leader for a lease with the answer. Each
//! invalidation drops what it names here, is handed to the owner (the mount
//! tells the kernel), and only then acknowledged. A broken stream drops
//! everything; the next reads ask again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failsafe_core::lease::HolderView;
use failsafe_proto::pb::{
    self, query_reply::Reply, query_request::Query, watch_event::Event, watch_request::Msg,
    Consistency, ErrorCode,
};
use tokio::sync::{mpsc, oneshot};

use crate::{Client, ClientError};

/// What this mount holds about one inode while its lease lasts.
#[derive(Debug, Default, Clone)]
pub struct Cached {
    pub attr: Option<pb::Attr>,
    /// A directory's names asked about: the inode each names, or none.
    pub names: HashMap<Vec<u8>, Option<u64>>,
    /// A file's extents, as an open needs them.
    pub extents: Option<Arc<pb::FileExtents>>,
    /// A directory's whole listing (its names are in `names` too, so a
    /// name not there does not exist).
    pub listing: Option<Arc<Vec<pb::DirEntry>>>,
}

impl Cached {
    /// Adds what a revalidation brings back to what was cached since the
    /// new stream came up (read under it, so as current): that stays, names
    /// the kernel was given meanwhile among it, so that a later change of
    /// the directory still tells the kernel to drop them.
    fn take_back(&mut self, back: Cached) {
        if self.attr.is_none() {
            self.attr = back.attr;
        }
        for (name, ino) in back.names {
            self.names.entry(name).or_insert(ino);
        }
        if self.extents.is_none() {
            self.extents = back.extents;
        }
    }
}

/// What an invalidation (or this mount's own change) took away: each inode
/// with what was cached for it. The owner tells the kernel, then answers on
/// the channel, if one is given, so the leader hears the acknowledgement.
pub struct Dropped {
    pub inodes: Vec<(u64, Cached)>,
    /// What the leader's invalidation named, cached here or not (a recall of
    /// a delegation names the directory); empty for this mount's own change.
    pub named: Vec<u64>,
    /// The lease stream ended: every lease and delegation is gone.
    pub stream_lost: bool,
    pub done: Option<oneshot::Sender<()>>,
}

impl Dropped {
    fn own(inodes: Vec<(u64, Cached)>) -> Dropped {
        Dropped {
            inodes,
            named: Vec::new(),
            stream_lost: false,
            done: None,
        }
    }
}

/// Inodes cached at most; more, and the cache starts over.
const MAX_CACHED: usize = 200_000;

/// Inodes kept for revalidation after a lost stream, at most (sixteen
/// requests).
const MAX_REVALIDATE_HELD: usize = 16 * failsafe_proto::MAX_REVALIDATE;

pub(crate) struct LeaseCache {
    view: Mutex<HolderView<Cached>>,
    start: Instant,
    /// The term of the current stream's leader; 0: no stream.
    term: AtomicU64,
    /// Unbounded, so that dropping from the cache and queueing for the
    /// kernel happen under the one lock: the kernel hears of drops in the
    /// order they happened, and an acknowledgement never overtakes a drop.
    dropped: mpsc::UnboundedSender<Dropped>,
    /// When each directory may be read ahead again (`Client::read_ahead`).
    read_ahead: Mutex<HashMap<u64, Instant>>,
    /// What was cached when the last stream was lost, for the next stream
    /// to revalidate (`revalidate`).
    held: Mutex<Vec<(u64, Cached)>>,
    /// Inodes cached again by revalidations so far.
    revalidated: AtomicU64,
}

fn lock(m: &Mutex<HolderView<Cached>>) -> std::sync::MutexGuard<'_, HolderView<Cached>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LeaseCache {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// A change this client is making, as its lease cache sees it.
pub(crate) struct OwnChange {
    ticket: failsafe_core::lease::ReadTicket,
    /// The lease stream's leader term when it was sent.
    term: u64,
    /// The lease stream's epoch when it was sent.
    epoch: u64,
}

/// A cached answer and how long the kernel may keep it.
#[derive(Debug, Clone)]
pub struct Leased<T> {
    pub value: T,
    pub ttl: Duration,
}

impl Client {
    /// Starts the lease stream; returns what invalidations take away, for
    /// the owner to pass on to the kernel (and answer).
    pub fn enable_leases(&self) -> mpsc::UnboundedReceiver<Dropped> {
        let (dropped, rx) = mpsc::unbounded_channel();
        let cache = Arc::new(LeaseCache {
            view: Mutex::new(HolderView::new(0)),
            start: Instant::now(),
            term: AtomicU64::new(0),
            dropped,
            read_ahead: Mutex::default(),
            held: Mutex::default(),
            revalidated: AtomicU64::new(0),
        });
        if self.inner.leases.set(cache.clone()).is_ok() {
            tokio::spawn(run_stream(self.clone(), cache));
        }
        rx
    }

    /// Waits (at most `within`) until the lease stream is up; whether it is.
    /// Until then every read asks the leader and nothing is cached: a mount
    /// waits for it before it serves, so its first listings are leased.
    pub async fn leases_up(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.lease_holder() == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    fn lease_cache(&self) -> Option<&Arc<LeaseCache>> {
        self.inner.leases.get()
    }

    /// Inodes cached again after a lost stream by revalidating them in
    /// bulk under the next one.
    pub fn lease_revalidated(&self) -> u64 {
        self.lease_cache()
            .map_or(0, |c| c.revalidated.load(Ordering::Relaxed))
    }

    /// Lease streams this client has had welcomed so far (each one after a
    /// lost stream starts empty): how often it lost what it cached.
    pub fn lease_streams(&self) -> u64 {
        self.lease_cache().map_or(0, |c| lock(&c.view).epoch())
    }

    /// The lease stream's epoch and how long what it holds stays valid
    /// (by this client's clock, from now), while the stream is up.
    pub fn lease_now(&self) -> Option<(u64, Duration)> {
        let c = self.lease_cache()?;
        if c.term.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let view = lock(&c.view);
        Some((view.epoch(), Duration::from_millis(view.remaining(c.now()))))
    }

    /// This client as a lease holder, while its stream is up.
    pub(crate) fn lease_holder(&self) -> u64 {
        match self.lease_cache() {
            Some(c) if c.term.load(Ordering::Relaxed) != 0 => self.inner.client_id,
            _ => 0,
        }
    }

    /// Before this client sends a change: the ticket its read-back is
    /// judged by (see [`Client::own_change`]).
    pub(crate) fn own_change_start(&self) -> Option<OwnChange> {
        let c = self.lease_cache()?;
        let term = c.term.load(Ordering::Relaxed);
        let mut view = lock(&c.view);
        (term != 0).then(|| OwnChange {
            ticket: view.read_sent(),
            term,
            epoch: view.epoch(),
        })
    }

    /// After this client's own change `cmd` (`reply`; `None` if it failed,
    /// when it may still have applied: what it names is dropped): the
    /// leader did not wait for this writer, so what the change touched is
    /// replaced here with what the leader read back for it when that may be
    /// cached (a granted read-back, and nothing invalidated meanwhile), else
    /// dropped; either way reads in flight do not cache what they read
    /// before it, and the owner tells the kernel (the attributes only, for
    /// what was replaced: the kernel made the change, it knows the names).
    ///
    /// Returns the stream epoch under which a delegation the reply grants
    /// holds (the read-back was granted on the stream the change was sent
    /// under, and that stream is still the current one).
    pub(crate) fn own_change(
        &self,
        own: Option<OwnChange>,
        cmd: &pb::Command,
        reply: Option<&pb::MutateReply>,
    ) -> Option<u64> {
        let c = self.lease_cache()?;
        let mut view = lock(&c.view);
        let Some(reply) = reply else {
            let inodes = view.take_own(&failsafe_proto::known_touched(cmd), c.now());
            if let Some(own) = own {
                view.read_done(own.ticket);
            }
            let _ = c.dropped.send(Dropped::own(inodes));
            return None;
        };
        let changed = reply.result.as_ref().map_or(&[][..], |r| &r.changed[..]);
        let granted = own.as_ref().is_some_and(|own| {
            reply.lease.is_some_and(|g| g.granted && g.term == own.term)
                && own.term == c.term.load(Ordering::Relaxed)
                && own.epoch == view.epoch()
        });
        let delegated = (granted && reply.delegated).then(|| view.epoch());
        let mut objects: Vec<u64> = changed.to_vec();
        objects.extend(reply.attrs.iter().map(|a| a.ino));
        objects.sort_unstable();
        objects.dedup();
        if objects.is_empty() {
            if let Some(own) = own {
                view.read_done(own.ticket);
            }
            return delegated;
        }
        let now = c.now();
        let mut inodes = Vec::with_capacity(objects.len());
        for o in objects {
            let attr = reply.attrs.iter().find(|a| a.ino == o).copied();
            // The bytes it stored, as an open needs them (read back with
            // the attributes): the writer's next open asks nothing.
            let extents = reply
                .extents
                .iter()
                .find(|fe| fe.attr.is_some_and(|a| a.ino == o) && fe.attr == attr)
                .map(|fe| Arc::new(fe.clone()));
            let replace = |cached: &mut Cached| {
                cached.attr = attr;
                // A change that left the bytes alone (a rename: the same
                // content version and size) leaves what an open needs
                // right, under the new attributes.
                let kept = cached.extents.take().and_then(|fe| {
                    let (old, new) = (fe.attr?, attr?);
                    let same =
                        old.ino == new.ino && old.version == new.version && old.size == new.size;
                    same.then(|| {
                        let mut fe = Arc::unwrap_or_clone(fe);
                        fe.attr = Some(new);
                        Arc::new(fe)
                    })
                });
                cached.extents = extents.clone().or(kept);
                let names: Vec<&pb::NameRead> =
                    reply.names.iter().filter(|n| n.parent == o).collect();
                cached.listing = cached.listing.take().and_then(|mut l| {
                    let present = |name: &[u8]| matches!(cached.names.get(name), Some(Some(_)));
                    let kept = relist(Arc::make_mut(&mut l), &names, &reply.attrs, present);
                    if !kept {
                        tracing::debug!(ino = o, "own change: a listing it could not amend");
                    }
                    kept.then_some(l)
                });
                for n in names {
                    cached
                        .names
                        .insert(n.name.clone(), (n.ino != 0).then_some(n.ino));
                }
            };
            match &own {
                Some(own) if granted && attr.is_some() => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        if let Some(why) = view.refusal(own.ticket, o, true, now) {
                            tracing::debug!(ino = o, why, "own change: dropped what was cached");
                        }
                    }
                    match view.amend(own.ticket, o, true, now, replace) {
                        None => inodes.push((o, Cached::default())),
                        Some(was) => inodes.push((o, was)),
                    }
                }
                _ => {
                    tracing::debug!(
                        ino = o,
                        granted,
                        own = own.is_some(),
                        attr = attr.is_some(),
                        "own change: dropped what was cached"
                    );
                    inodes.extend(view.take_own(&[o], now))
                }
            }
        }
        if let Some(own) = own {
            view.read_done(own.ticket);
        }
        drop(view);
        // A listing lost to this mount's own change (its read-back was not
        // granted: a busy moment of the leader) may be read again at once:
        // a writer creating names one after another in a large directory
        // would otherwise ask the leader about each new name until the
        // next read-ahead.
        let relist: Vec<u64> = inodes
            .iter()
            .filter(|(_, cached)| cached.listing.is_some())
            .map(|&(ino, _)| ino)
            .collect();
        if !relist.is_empty() {
            let mut ahead = c.read_ahead.lock().unwrap_or_else(|e| e.into_inner());
            for ino in relist {
                ahead.remove(&ino);
            }
        }
        let _ = c.dropped.send(Dropped::own(inodes));
        delegated
    }

    /// Reads `q` for the lease cache: from memory when cached, else from
    /// the leader, caching the answer with `cache` when granted.
    async fn leased<T>(
        &self,
        cached: impl Fn(&mut HolderView<Cached>, u64) -> Option<T>,
        q: Query,
        cache_it: impl FnOnce(
            &mut HolderView<Cached>,
            failsafe_core::lease::ReadTicket,
            &Reply,
            bool,
            u64,
        ) -> bool,
        answer: impl FnOnce(Reply) -> Result<T, ClientError>,
    ) -> Result<Leased<T>, ClientError> {
        let Some(c) = self.lease_cache().cloned() else {
            let r = self.query_available(q).await?;
            return answer(r).map(|value| Leased {
                value,
                ttl: Duration::ZERO,
            });
        };
        {
            let mut view = lock(&c.view);
            let now = c.now();
            if let Some(value) = cached(&mut view, now) {
                return Ok(Leased {
                    value,
                    ttl: Duration::from_millis(view.remaining(now)),
                });
            }
        }
        let term = c.term.load(Ordering::Relaxed);
        if term == 0 {
            let r = self.query_available(q).await?;
            return answer(r).map(|value| Leased {
                value,
                ttl: Duration::ZERO,
            });
        }
        let ticket = lock(&c.view).read_sent();
        let read = self
            .query_leased(
                q,
                Consistency::Linearizable,
                self.inner.cfg.op_deadline,
                self.inner.client_id,
            )
            .await;
        let mut view = lock(&c.view);
        let ttl = match &read {
            Ok((reply, Some(g))) => {
                let granted = g.granted && g.term == term && term == c.term.load(Ordering::Relaxed);
                let now = c.now();
                if cache_it(&mut view, ticket, reply, granted, now) {
                    Duration::from_millis(view.remaining(now))
                } else {
                    Duration::ZERO
                }
            }
            _ => Duration::ZERO,
        };
        view.read_done(ticket);
        // Bounded: past the limit everything goes (and the kernel is told,
        // in order with any invalidation that follows).
        if view.len() > MAX_CACHED {
            let inodes = view.drain();
            let _ = c.dropped.send(Dropped::own(inodes));
        }
        drop(view);
        let (reply, _) = read?;
        answer(reply).map(|value| Leased { value, ttl })
    }

    /// Looks `name` up in `parent`, from memory while leased; `None`: no
    /// such name (cached too).
    pub async fn lookup_leased(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Result<Leased<Option<pb::Attr>>, ClientError> {
        let key = name.to_vec();
        let key2 = key.clone();
        if let Some(c) = self.lease_cache() {
            let hit = {
                let mut v = lock(&c.view);
                let now = c.now();
                cached_lookup(&mut v, parent, name, now).map(|value| Leased {
                    value,
                    ttl: Duration::from_millis(v.remaining(now)),
                })
            };
            // From memory: one look, under one lock (every lookup).
            if let Some(l) = hit {
                return Ok(l);
            }
            if c.term.load(Ordering::Relaxed) != 0 {
                self.read_ahead(parent, &c.clone()).await;
            }
        }
        self.leased(
            |v, now| cached_lookup(v, parent, &key, now),
            Query::Lookup(pb::Lookup {
                parent,
                name: name.to_vec(),
                extents: true,
            }),
            move |v, t, reply, granted, now| match reply {
                Reply::Attr(a) => {
                    let a = *a;
                    v.offer_with(t, parent, granted, now, |c| {
                        c.names.insert(key2, Some(a.ino));
                    }) && v.offer_with(t, a.ino, granted, now, |c| c.attr = Some(a))
                }
                // A file's answer comes with what an open of it needs.
                Reply::FileExtents(fe) => {
                    let Some(a) = fe.attr else { return false };
                    let fe = Arc::new(fe.clone());
                    v.offer_with(t, parent, granted, now, |c| {
                        c.names.insert(key2, Some(a.ino));
                    }) && v.offer_with(t, a.ino, granted, now, |c| {
                        c.attr = Some(a);
                        c.extents = Some(fe);
                    })
                }
                Reply::Error(e) if e.code == ErrorCode::NotFound as i32 => {
                    v.offer_with(t, parent, granted, now, |c| {
                        c.names.insert(key2, None);
                    })
                }
                _ => false,
            },
            |r| match r {
                Reply::Error(e) if e.code == ErrorCode::NotFound as i32 => Ok(None),
                Reply::FileExtents(pb::FileExtents { attr: Some(a), .. }) => Ok(Some(a)),
                r => attr_of(r).map(Some),
            },
        )
        .await
    }

    /// An inode's attributes, from memory while leased. Asked of the
    /// leader, a small file's answer brings its extents too: a stat after
    /// a change elsewhere is followed by an open that asks nothing.
    pub async fn getattr_leased(&self, ino: u64) -> Result<Leased<pb::Attr>, ClientError> {
        self.leased(
            |v, now| v.get(ino, now)?.attr,
            Query::GetAttr(pb::GetAttr { ino, extents: true }),
            move |v, t, reply, granted, now| match reply {
                Reply::Attr(a) => {
                    let a = *a;
                    v.offer_with(t, ino, granted, now, |c| c.attr = Some(a))
                }
                Reply::FileExtents(fe) => offer_extents(v, t, ino, fe, granted, now),
                _ => false,
            },
            |r| match r {
                Reply::FileExtents(pb::FileExtents { attr: Some(a), .. }) => Ok(a),
                r => attr_of(r),
            },
        )
        .await
    }

    /// A file's attributes and extents, as an open needs them, from memory
    /// while leased.
    pub async fn extents_leased(
        &self,
        ino: u64,
    ) -> Result<Leased<Arc<pb::FileExtents>>, ClientError> {
        self.leased(
            |v, now| v.get(ino, now)?.extents.clone(),
            Query::ReadExtents(failsafe_proto::whole_file(ino)),
            move |v, t, reply, granted, now| match reply {
                Reply::FileExtents(fe) => offer_extents(v, t, ino, fe, granted, now),
                _ => false,
            },
            |r| match r {
                Reply::FileExtents(fe) => Ok(Arc::new(fe)),
                Reply::Error(e) => Err(crate::meta::refused(e)),
                _ => Err(ClientError::Unavailable("unexpected reply".into())),
            },
        )
        .await
    }
}

impl Client {
    /// A directory's entries (without attributes), from memory while
    /// leased, else read a page at a time with every entry's attributes,
    /// which are cached too (under the grant of the page they came in), so
    /// the stats of an `ls -l` that follow are answered from memory. The
    /// listing is cached only when every page was granted and nothing in
    /// the directory changed meanwhile.
    pub async fn list_leased(
        &self,
        dir: u64,
    ) -> Result<Leased<Arc<Vec<pb::DirEntry>>>, ClientError> {
        let cache = self.lease_cache().cloned();
        if let Some(c) = &cache {
            let view = lock(&c.view);
            let now = c.now();
            if let Some(listing) = view.get(dir, now).and_then(|d| d.listing.clone()) {
                return Ok(Leased {
                    value: listing,
                    ttl: Duration::from_millis(view.remaining(now)),
                });
            }
        }
        let (entries, ttl) = self.list_fetch(dir, cache.as_ref(), false).await?;
        Ok(Leased {
            value: Arc::new(
                entries
                    .into_iter()
                    .map(|e| pb::DirEntry {
                        attr: None,
                        extents: None,
                        ..e
                    })
                    .collect(),
            ),
            ttl,
        })
    }

    /// Reads ahead for a lookup in `dir` that memory cannot answer: the
    /// first page of its listing with every entry's attributes and each
    /// file's extents (up to `PREFETCH_INLINE_BYTES` of inline data), so
    /// the lookups and opens of the pages that follow ask nothing — a cold
    /// web host reads a namespace's pages one after another — and the
    /// pages after it up to [`AHEAD_PAGES`] with attributes only, so a
    /// directory of that size is known whole. At most once a minute per
    /// directory (a directory changed elsewhere loses its listing here;
    /// what follows is asked name by name), except after the lease stream
    /// was lost or this mount's own change lost the listing; errors are
    /// left to the lookup that asks anyway.
    async fn read_ahead(&self, dir: u64, c: &Arc<LeaseCache>) {
        {
            let mut ahead = c.read_ahead.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if ahead.get(&dir).is_some_and(|&next| now < next) {
                return;
            }
            if ahead.len() >= MAX_CACHED {
                ahead.clear();
            }
            ahead.insert(dir, now + READ_AHEAD_EVERY);
        }
        let fetched = self.list_fetch(dir, Some(c), true).await;
        // A listing small enough to be cached whole that was not (a page
        // not granted: a busy moment of the leader) is read again soon.
        if let Ok((entries, ttl)) = &fetched {
            if ttl.is_zero() && entries.len() < AHEAD_PAGES * LIST_PAGE as usize {
                c.read_ahead
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(dir, Instant::now() + READ_AHEAD_RETRY);
            }
        }
    }

    /// Reads `dir`'s listing with attributes (all of it; or, `ahead`, its
    /// first page with each file's extents too) and caches what was granted:
    /// each entry's attributes (and extents), and the listing itself when it
    /// is whole, every page was granted and nothing in the directory changed
    /// meanwhile (else the names of a granted page). Returns the entries and
    /// how long the kernel may keep the listing.
    async fn list_fetch(
        &self,
        dir: u64,
        cache: Option<&Arc<LeaseCache>>,
        ahead: bool,
    ) -> Result<(Vec<pb::DirEntry>, Duration), ClientError> {
        let term = cache.map_or(0, |c| c.term.load(Ordering::Relaxed));
        let leasing = cache.filter(|_| term != 0);
        let ticket = leasing.map(|c| lock(&c.view).read_sent());
        let read = self.list_pages(dir, leasing.map(|_| term), ahead).await;
        let (Some(c), Some(ticket)) = (leasing, ticket) else {
            return read.map(|(entries, _, _)| (entries, Duration::ZERO));
        };
        let mut view = lock(&c.view);
        let mut ttl = Duration::ZERO;
        if let Ok((entries, pages, complete)) = &read {
            let now = c.now();
            let mut whole = *complete;
            for (page, granted) in pages {
                let granted = *granted && term == c.term.load(Ordering::Relaxed);
                whole &= granted;
                for e in &entries[page.clone()] {
                    if let Some(a) = e.attr {
                        let fe = e.extents.clone().map(Arc::new);
                        view.offer_with(ticket, e.ino, granted, now, |c| {
                            c.attr = Some(a);
                            if fe.is_some() {
                                c.extents = fe;
                            }
                        });
                    }
                }
                if !*complete {
                    // Part of a listing: its names, under the page's grant.
                    view.offer_with(ticket, dir, granted, now, |d| {
                        d.names.extend(
                            entries[page.clone()]
                                .iter()
                                .map(|e| (e.name.clone(), Some(e.ino))),
                        );
                    });
                }
            }
            if *complete {
                let listing: Arc<Vec<pb::DirEntry>> = Arc::new(
                    entries
                        .iter()
                        .map(|e| pb::DirEntry {
                            attr: None,
                            extents: None,
                            ..e.clone()
                        })
                        .collect(),
                );
                let cached = view.offer_with(ticket, dir, whole, now, |d| {
                    d.names
                        .extend(listing.iter().map(|e| (e.name.clone(), Some(e.ino))));
                    d.listing = Some(listing.clone());
                });
                if cached {
                    ttl = Duration::from_millis(view.remaining(now));
                }
            }
        }
        view.read_done(ticket);
        if view.len() > MAX_CACHED {
            let inodes = view.drain();
            let _ = c.dropped.send(Dropped::own(inodes));
        }
        drop(view);
        let (entries, _, _) = read?;
        Ok((entries, ttl))
    }

    /// How long the kernel may keep `name` in `parent` and the attributes
    /// of what it names: the rest of the lease while both are cached here
    /// (after this mount's own change, from the leader's read-back), else
    /// nothing.
    pub fn entry_ttl(&self, parent: u64, name: &[u8]) -> Duration {
        let Some(c) = self.lease_cache() else {
            return Duration::ZERO;
        };
        let mut view = lock(&c.view);
        let now = c.now();
        match cached_lookup(&mut view, parent, name, now) {
            Some(Some(_)) => Duration::from_millis(view.remaining(now)),
            _ => Duration::ZERO,
        }
    }

    /// The attributes of `inos` this mount holds leases on, looked up under
    /// one lock (a listing's entries, for readdirplus); `None` for each not
    /// cached.
    pub fn cached_attrs(&self, inos: &[u64]) -> Vec<Option<Leased<pb::Attr>>> {
        let Some(c) = self.lease_cache() else {
            return vec![None; inos.len()];
        };
        let view = lock(&c.view);
        let now = c.now();
        let ttl = Duration::from_millis(view.remaining(now));
        inos.iter()
            .map(|&ino| {
                view.get(ino, now)
                    .and_then(|cached| cached.attr)
                    .map(|value| Leased { value, ttl })
            })
            .collect()
    }

    /// How long the kernel may keep names from `dir`'s listing: the rest of
    /// the lease while the whole listing is cached, else nothing.
    pub fn listing_ttl(&self, dir: u64) -> Duration {
        self.listing_ttl_if(dir, |_| true)
    }

    /// [`Client::listing_ttl`], if the listing cached now is one `same`
    /// accepts (the one a reader took its names from), else nothing.
    pub fn listing_ttl_if(
        &self,
        dir: u64,
        same: impl FnOnce(&Arc<Vec<pb::DirEntry>>) -> bool,
    ) -> Duration {
        let Some(c) = self.lease_cache() else {
            return Duration::ZERO;
        };
        let view = lock(&c.view);
        let now = c.now();
        match view.get(dir, now).and_then(|d| d.listing.as_ref()) {
            Some(l) if same(l) => Duration::from_millis(view.remaining(now)),
            _ => Duration::ZERO,
        }
    }

    /// Every entry of `dir` with its attributes, a page at a time; with a
    /// lease stream (`term`: its leader's), each page's range in the
    /// entries and whether it was granted.
    #[allow(clippy::type_complexity)]
    async fn list_pages(
        &self,
        dir: u64,
        term: Option<u64>,
        ahead: bool,
    ) -> Result<(Vec<pb::DirEntry>, Vec<(std::ops::Range<usize>, bool)>, bool), ClientError> {
        let mut entries: Vec<pb::DirEntry> = Vec::new();
        let mut pages = Vec::new();
        let mut after = Vec::new();
        loop {
            let q = Query::ReadDir(pb::ReadDir {
                ino: dir,
                after: std::mem::take(&mut after),
                limit: LIST_PAGE,
                // Attributes only to cache: without leases each stat asks.
                plus: term.is_some(),
                extents: ahead && pages.is_empty() && term.is_some(),
            });
            let (reply, granted) = match term {
                Some(term) => {
                    let (reply, grant) = self
                        .query_leased(
                            q,
                            Consistency::Linearizable,
                            self.inner.cfg.op_deadline,
                            self.inner.client_id,
                        )
                        .await?;
                    let granted = grant.is_some_and(|g| g.granted && g.term == term);
                    (reply, granted)
                }
                None => (self.query_available(q).await?, false),
            };
            let page = match reply {
                Reply::DirPage(p) => p,
                Reply::Error(e) => return Err(crate::meta::refused(e)),
                _ => return Err(ClientError::Unavailable("unexpected reply".into())),
            };
            let start = entries.len();
            if let Some(last) = page.entries.last() {
                after = last.name.clone();
            }
            entries.extend(page.entries);
            pages.push((start..entries.len(), granted));
            if !page.more || after.is_empty() {
                return Ok((entries, pages, true));
            }
            if ahead && pages.len() >= AHEAD_PAGES {
                return Ok((entries, pages, false));
            }
        }
    }
}

/// Brings a directory's cached listing up to date with this mount's own
/// change to it, from the names the change left (`names`: each name of the
/// directory the leader read back, `ino` 0 for a name gone; `present`: whether
/// a name was listed before) and the attributes of the inodes it touched or
/// made: so the names a writer creates one after another (and the absence
/// of the next) are still answered from memory. False (ask again) when a
/// new entry's kind is not among `attrs`.
fn relist(
    entries: &mut Vec<pb::DirEntry>,
    names: &[&pb::NameRead],
    attrs: &[pb::Attr],
    present: impl Fn(&[u8]) -> bool,
) -> bool {
    for n in names {
        if present(&n.name) {
            entries.retain(|e| e.name != n.name);
        }
        if n.ino != 0 {
            let Some(a) = attrs.iter().find(|a| a.ino == n.ino) else {
                return false;
            };
            entries.push(pb::DirEntry {
                name: n.name.clone(),
                ino: n.ino,
                kind: a.kind,
                attr: None,
                extents: None,
            });
        }
    }
    true
}

/// `name` in `parent` from memory: its attributes, `Some(None)` for a name
/// known to be absent, `None` when memory cannot tell.
fn cached_lookup(
    v: &mut HolderView<Cached>,
    parent: u64,
    name: &[u8],
    now: u64,
) -> Option<Option<pb::Attr>> {
    let dir = v.get_mut(parent, now)?;
    match dir.names.get(name) {
        Some(None) => Some(None),
        Some(&Some(ino)) => Some(Some(v.get(ino, now)?.attr?)),
        // Not in a whole listing: no such name. Recorded, so that the
        // kernel, which may keep the answer, is told when the directory
        // changes.
        None => {
            dir.listing.as_ref()?;
            dir.names.insert(name.to_vec(), None);
            Some(None)
        }
    }
}

/// How often a directory is read ahead at most (see `Client::read_ahead`).
const READ_AHEAD_EVERY: Duration = Duration::from_secs(60);

/// How soon a read-ahead whose listing could not be cached is tried again.
const READ_AHEAD_RETRY: Duration = Duration::from_secs(1);

/// Entries per page of a listing with attributes (about 100 bytes each).
const LIST_PAGE: u32 = 2000;

/// Pages a read-ahead reads at most (the first with each file's extents):
/// a directory of up to 16,000 names is then cached whole, and the absence
/// of a name a writer is about to create is known without asking.
const AHEAD_PAGES: usize = 8;

/// Caches what the leader pushed after a change (see
/// [`HolderView::pushed`]): the attributes of the inodes it touched or made
/// and the names it changed.
fn refreshed(
    view: &mut HolderView<Cached>,
    epoch: u64,
    now: u64,
    attrs: &[pb::Attr],
    names: &[pb::NameRead],
) {
    for a in attrs {
        view.pushed(epoch, a.ino, now, |c| c.attr = Some(*a));
    }
    for n in names {
        view.pushed(epoch, n.parent, now, |c| {
            c.names
                .insert(n.name.clone(), (n.ino != 0).then_some(n.ino));
        });
    }
}

/// Caches a file's extents (and attributes) read under ticket `t`.
fn offer_extents(
    v: &mut HolderView<Cached>,
    t: failsafe_core::lease::ReadTicket,
    ino: u64,
    fe: &pb::FileExtents,
    granted: bool,
    now: u64,
) -> bool {
    let fe = Arc::new(fe.clone());
    v.offer_with(t, ino, granted, now, |c| {
        c.attr = fe.attr;
        c.extents = Some(fe);
    })
}

fn attr_of(r: Reply) -> Result<pb::Attr, ClientError> {
    match r {
        Reply::Attr(a) => Ok(a),
        Reply::Error(e) => Err(crate::meta::refused(e)),
        _ => Err(ClientError::Unavailable("unexpected reply".into())),
    }
}

/// Under a new stream (of leader term `term`): asks the leader which of
/// the inodes cached under the last one are unchanged, up to
/// `MAX_REVALIDATE` in each request, and caches again what may be
/// ([`revalidated`]), each under the rules of any leased read.
async fn revalidate(client: Client, cache: Arc<LeaseCache>, term: u64, held: Vec<(u64, Cached)>) {
    let mut again = 0u64;
    'chunks: for chunk in held.chunks(failsafe_proto::MAX_REVALIDATE) {
        // A new leader may not grant at once (its read lease starts with a
        // quorum's answer): a read that failed or granted nothing is tried
        // again a few times while this stream lasts.
        let mut pause = Duration::from_millis(50);
        for attempt in 0.. {
            if cache.term.load(Ordering::Relaxed) != term {
                break 'chunks;
            }
            let inos = chunk.iter().map(|(ino, _)| *ino).collect();
            let ticket = lock(&cache.view).read_sent();
            let read = client
                .query_leased(
                    Query::Revalidate(pb::Revalidate { inos }),
                    Consistency::Linearizable,
                    client.inner.cfg.op_deadline,
                    client.inner.client_id,
                )
                .await;
            let granted = {
                let mut view = lock(&cache.view);
                let granted = match &read {
                    Ok((Reply::AttrList(list), Some(g))) => {
                        let granted = g.granted
                            && g.term == term
                            && term == cache.term.load(Ordering::Relaxed);
                        let current: HashMap<u64, &pb::Attr> =
                            list.attrs.iter().map(|a| (a.ino, a)).collect();
                        let now = cache.now();
                        for (ino, old) in chunk {
                            let Some(attr) = current.get(ino) else {
                                continue;
                            };
                            let ok = granted && !list.refused.contains(ino);
                            let back = revalidated(old, attr);
                            if view.offer_with(ticket, *ino, ok, now, |cur| cur.take_back(back)) {
                                again += 1;
                            }
                        }
                        granted
                    }
                    _ => false,
                };
                view.read_done(ticket);
                granted
            };
            if granted {
                break;
            }
            if attempt == 5 {
                tracing::debug!(
                    outcome = ?read.map(|(_, g)| g),
                    "revalidation not granted; what is left is asked for as needed"
                );
                break 'chunks;
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    cache.revalidated.fetch_add(again, Ordering::Relaxed);
    tracing::debug!(
        held = held.len(),
        again,
        "revalidated after a new lease stream"
    );
}

/// What may be cached again of `old` now that its inode's attributes are
/// `attr`: the attributes; a directory's names and a file's inline extents
/// only if its version is unchanged (a name made or removed in a directory
/// and any change to a file's bytes move its version). Extents naming
/// blocks are not kept: their copies move without the version.
fn revalidated(old: &Cached, attr: &pb::Attr) -> Cached {
    let same = old
        .attr
        .as_ref()
        .is_some_and(|a| a.version == attr.version && a.kind == attr.kind);
    let extents = old
        .extents
        .as_ref()
        .filter(|fe| same && fe.copies.is_empty() && fe.extents.iter().all(|e| e.hash.is_empty()))
        .map(|fe| {
            Arc::new(pb::FileExtents {
                attr: Some(*attr),
                ..(**fe).clone()
            })
        });
    Cached {
        attr: Some(*attr),
        names: if same {
            old.names.clone()
        } else {
            HashMap::new()
        },
        extents,
        listing: None,
    }
}

/// Keeps the lease stream up for as long as the client lives.
async fn run_stream(client: Client, cache: Arc<LeaseCache>) {
    let mut pause = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        if let Err(e) = stream_once(&client, &cache).await {
            tracing::debug!(error = %e, "lease stream ended");
        }
        cache.term.store(0, Ordering::Relaxed);
        // Everything cached goes; a directory may be read ahead again at
        // once under the next stream.
        cache
            .read_ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let (done, told) = oneshot::channel();
        {
            // The kernel may hold what was cached for as long as the leases
            // lasted, and the next stream's leader does not know to wait for
            // that: tell the kernel, and wait until it is told before
            // reconnecting.
            let mut view = lock(&cache.view);
            let inodes = view.drain();
            view.lost();
            // Kept to be asked about in one request under the next stream
            // (listings not: their entries' attributes change without the
            // directory's version). A stream that ended before its welcome
            // dropped nothing: what the last one held is still to be asked
            // about (a revalidation compares versions, so age is no harm).
            let keep: Vec<(u64, Cached)> = inodes
                .iter()
                .filter(|(_, c)| c.attr.is_some())
                .take(MAX_REVALIDATE_HELD)
                .map(|(ino, c)| {
                    (
                        *ino,
                        Cached {
                            listing: None,
                            ..c.clone()
                        },
                    )
                })
                .collect();
            if !keep.is_empty() {
                *cache.held.lock().unwrap_or_else(|e| e.into_inner()) = keep;
            }
            let _ = cache.dropped.send(Dropped {
                inodes,
                named: Vec::new(),
                stream_lost: true,
                done: Some(done),
            });
        }
        let _ = told.await;
        if cache.dropped.is_closed() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            pause = Duration::from_millis(50);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

async fn stream_once(client: &Client, cache: &Arc<LeaseCache>) -> Result<(), ClientError> {
    let addr = client.leader_addr().await?;
    let r = stream_at(client, cache, &addr).await;
    if r.is_err() {
        // Whatever went wrong there, the next stream asks who leads; a
        // leader hint, if it gave one, was followed already.
        client.forget_leader(&addr);
    }
    r
}

async fn stream_at(
    client: &Client,
    cache: &Arc<LeaseCache>,
    addr: &str,
) -> Result<(), ClientError> {
    let rpc_timeout = client.inner.cfg.rpc_timeout;
    let addr = addr.to_string();
    let (out, outbound) = mpsc::channel(64);
    let say = |msg| pb::WatchRequest {
        header: client.header(),
        msg: Some(msg),
    };
    let _ = out
        .send(say(Msg::Hello(pb::WatchHello {
            holder: client.inner.client_id,
        })))
        .await;
    let mut meta = client.meta(&addr)?;
    let mut events = tokio::time::timeout(
        rpc_timeout,
        meta.watch(tokio_stream::wrappers::ReceiverStream::new(outbound)),
    )
    .await
    .map_err(|_| ClientError::Unavailable(format!("{addr}: no lease stream in time")))?
    .map_err(|status| {
        if let Some(hint) = status
            .metadata()
            .get(failsafe_proto::LEADER_ADDR_KEY)
            .and_then(|v| v.to_str().ok())
        {
            client.set_leader(hint);
        }
        ClientError::Rejected {
            addr: addr.clone(),
            status,
        }
    })?
    .into_inner();
    let first = tokio::time::timeout(rpc_timeout, events.message())
        .await
        .map_err(|_| ClientError::Unavailable(format!("{addr}: no welcome in time")))?
        .map_err(|status| ClientError::Rejected {
            addr: addr.clone(),
            status,
        })?;
    let Some(pb::WatchEvent {
        event: Some(Event::Welcome(welcome)),
    }) = first
    else {
        return Err(ClientError::Unavailable(format!(
            "{addr}: a lease stream without a welcome"
        )));
    };
    let lease_ms = welcome.lease_ms.max(1);
    let epoch = lock(&cache.view).reconnected_with(lease_ms);
    cache.term.store(welcome.term, Ordering::Relaxed);
    let held = std::mem::take(&mut *cache.held.lock().unwrap_or_else(|e| e.into_inner()));
    if !held.is_empty() {
        tokio::spawn(revalidate(
            client.clone(),
            cache.clone(),
            welcome.term,
            held,
        ));
    }
    let mut sent: VecDeque<(u64, u64)> = VecDeque::new();
    let mut seq = 0u64;
    let mut last_answer = cache.now();
    let mut ticker = tokio::time::interval(Duration::from_millis((lease_ms / 3).max(1)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = cache.now();
                if now.saturating_sub(last_answer) > 2 * lease_ms {
                    return Err(ClientError::Unavailable(format!("{addr}: renewals unanswered")));
                }
                seq += 1;
                sent.push_back((seq, now));
                if sent.len() > 64 {
                    sent.pop_front();
                }
                if out.send(say(Msg::Renew(pb::WatchRenew { seq }))).await.is_err() {
                    return Ok(());
                }
            }
            ev = events.message() => {
                let ev = ev.map_err(|status| ClientError::Rejected { addr: addr.clone(), status })?;
                match ev.and_then(|e| e.event) {
                    Some(Event::Renewed(r)) => {
                        last_answer = cache.now();
                        while let Some(&(s, at)) = sent.front() {
                            if s > r.seq {
                                break;
                            }
                            sent.pop_front();
                            if s == r.seq {
                                lock(&cache.view).renewed(epoch, at);
                            }
                        }
                    }
                    Some(Event::Refresh(r)) => {
                        let mut view = lock(&cache.view);
                        let now = cache.now();
                        refreshed(&mut view, epoch, now, &r.attrs, &r.names);
                    }
                    Some(Event::Invalidate(inv)) => {
                        let (done, told) = oneshot::channel();
                        {
                            let mut view = lock(&cache.view);
                            let inodes = view.take(&inv.inos);
                            let d = Dropped { inodes, named: inv.inos.clone(), stream_lost: false, done: Some(done) };
                            if cache.dropped.send(d).is_err() {
                                return Ok(());
                            }
                        }
                        // The owner told the kernel: acknowledge. If it takes
                        // longer than a lease, acknowledging is still safe:
                        // whatever the kernel was given about these inodes
                        // was given before this invalidation, for at most
                        // what was left of a lease then.
                        let _ = tokio::time::timeout(Duration::from_millis(lease_ms), told).await;
                        if out.send(say(Msg::Ack(pb::WatchAck { change_id: inv.change_id }))).await.is_err() {
                            return Ok(());
                        }
                    }
                    _ => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use failsafe_proto::pb;

    use super::{revalidated, Cached};

    fn attr(ino: u64, kind: pb::FileKind, version: u64) -> pb::Attr {
        pb::Attr {
            ino,
            kind: kind as i32,
            version,
            ..Default::default()
        }
    }

    fn file_with(extent: pb::Extent, version: u64) -> Cached {
        Cached {
            attr: Some(attr(7, pb::FileKind::KindFile, version)),
            extents: Some(Arc::new(pb::FileExtents {
                attr: Some(attr(7, pb::FileKind::KindFile, version)),
                extents: vec![extent],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn inline() -> pb::Extent {
        pb::Extent {
            length: 3,
            data: b"abc".to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn an_unchanged_directory_keeps_its_names_but_never_its_listing() {
        let old = Cached {
            attr: Some(attr(2, pb::FileKind::KindDir, 5)),
            names: HashMap::from([(b"page".to_vec(), Some(9)), (b"gone".to_vec(), None)]),
            listing: Some(Arc::new(Vec::new())),
            ..Default::default()
        };
        let mut now = attr(2, pb::FileKind::KindDir, 5);
        now.mtime_ns = 42;
        let kept = revalidated(&old, &now);
        assert_eq!(kept.names, old.names);
        assert!(kept.listing.is_none());
        assert_eq!(kept.attr, Some(now), "the attributes are the new ones");
        // A name made or removed moved the version: the names go.
        let moved = revalidated(&old, &attr(2, pb::FileKind::KindDir, 6));
        assert!(moved.names.is_empty());
        assert_eq!(moved.attr, Some(attr(2, pb::FileKind::KindDir, 6)));
    }

    #[test]
    fn a_file_keeps_its_inline_bytes_only_while_its_version_stands() {
        let old = file_with(inline(), 3);
        let kept = revalidated(&old, &attr(7, pb::FileKind::KindFile, 3));
        let fe = kept.extents.expect("inline bytes kept");
        assert_eq!(fe.extents, [inline()]);
        assert_eq!(fe.attr, kept.attr, "with the new attributes");
        assert!(revalidated(&old, &attr(7, pb::FileKind::KindFile, 4))
            .extents
            .is_none());
        // Blocks are not kept: their copies move without the version.
        let block = pb::Extent {
            length: 4096,
            hash: vec![1; 32],
            ..Default::default()
        };
        assert!(
            revalidated(&file_with(block, 3), &attr(7, pb::FileKind::KindFile, 3))
                .extents
                .is_none()
        );
    }
}
