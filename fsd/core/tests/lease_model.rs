//! A seeded randomized model of `failsafe_core::lease` (issue 12).
//!
//! One simulated world per seed, in milliseconds of a clock every party
//! shares (same rate; the holder counts from send times, the leader from
//! receive times, as the API asks): an authoritative store, a leader that
//! can be deposed (its successor has a fresh `Leases` table), and a few
//! mounts, each with a `HolderView` and one ordered stream to the leader it
//! believes in. Messages are delayed at random (stream messages in order),
//! unary reads and write answers may be lost, streams break, mounts freeze
//! for longer than a lease while their clock runs on. Inside the leader,
//! a grant and the store read it precedes, and a change's apply and its
//! `begin_change`, are separate steps other requests can run between.
//!
//! After every step it checks close-to-open: once the writer of a change
//! heard that it is done, no mount's `get` returns an older version, and no
//! mount returns a version that never existed. It also checks that a change
//! at a leader still in office is reported done by
//! `max(begin_change, fence) + lease_ms + drift_ms` at the latest.
//!
//! Not modelled: clocks running at different rates (`drift_ms` is only
//! exercised as slack), duplicated messages, a deposed leader that still
//! answers (the model assumes Raft stops it), and a leader noticing a
//! broken stream late (`disconnect` runs when the stream breaks).
//!
//! `LEASE_MODEL_SEED=<n>` replays one seed with a full trace;
//! `LEASE_MODEL_SEEDS=<n>` changes how many seeds a run explores.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use failsafe_core::lease::{
    ChangeId, ChangePoll, Holder, HolderView, LeaseConfig, Leases, Object, ReadTicket,
};

const DEFAULT_SEEDS: u64 = 3_000;
const STEPS: usize = 400;
const TRACE_TAIL: usize = 120;

/// splitmix64: small, deterministic, good enough to pick interleavings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

/// How a new leader makes sure its predecessor's leases have run out.
#[derive(Debug, Clone, Copy)]
enum Succession {
    /// It takes over soon after, and fences its first changes until
    /// `start + lease_ms + drift_ms`.
    Fence,
    /// Raft's election keeps the two at least `lease_ms + drift_ms` apart
    /// (the old one stops at its deposal), and it starts with no fence.
    ElectionGap,
}

#[derive(Debug, Clone)]
enum Up {
    Connect,
    Renew { sent: u64 },
    Ack { change: ChangeId },
}

#[derive(Debug, Clone)]
enum Down {
    Renewed {
        sent: u64,
        ok: bool,
    },
    Invalidate {
        objects: Vec<Object>,
        index: u64,
        change: ChangeId,
    },
}

/// Who asked for a write: a mount (and its request number), or a client
/// with no cache.
type Writer = Option<(usize, u64)>;

#[derive(Debug, Clone)]
enum Ev {
    // The world.
    Depose,
    Start {
        leader: usize,
    },
    Break,
    ExternalWrite,
    LeaderTick,
    // A mount's own timers and what reaches it.
    RenewTick(usize),
    Op(usize),
    Freeze(usize),
    Thaw(usize),
    Broken {
        h: usize,
        stream: usize,
    },
    Down {
        stream: usize,
        msg: Down,
    },
    ReadAnswer {
        h: usize,
        read: u64,
        version: u64,
        granted: bool,
    },
    ReadTimeout {
        h: usize,
        read: u64,
    },
    WriteTimeout {
        h: usize,
        write: u64,
    },
    // What reaches a leader (or a writer without a mount).
    Up {
        stream: usize,
        msg: Up,
    },
    Read {
        leader: usize,
        h: usize,
        read: u64,
        obj: Object,
    },
    ReadStore {
        leader: usize,
        h: usize,
        read: u64,
        obj: Object,
        granted: bool,
    },
    /// A change of one object, or of two at once (a rename).
    Write {
        leader: usize,
        writer: Writer,
        objs: Vec<Object>,
    },
    BeginChange {
        leader: usize,
        writer: Writer,
        /// Each object with its new version.
        objs: Vec<(Object, u64)>,
        index: u64,
    },
    Poll {
        leader: usize,
        change: ChangeId,
    },
    WriteAnswer {
        writer: Writer,
        objs: Vec<(Object, u64)>,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

// A min-heap on (time, order of scheduling): events at the same time run in
// the order they were sent, which keeps each stream ordered.
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}

struct Pending {
    writer: Writer,
    objs: Vec<(Object, u64)>,
    /// When `begin_change` ran.
    begun: u64,
}

struct Leader {
    /// None until it starts (after its election).
    leases: Option<Leases>,
    fence: u64,
    deposed: bool,
    stream_of: BTreeMap<Holder, usize>,
    pending: BTreeMap<ChangeId, Pending>,
}

struct Stream {
    holder: usize,
    leader: usize,
    epoch: u64,
    alive: bool,
    /// Delivery time of the last message each way (streams are ordered).
    up_last: u64,
    down_last: u64,
}

struct Mount {
    view: HolderView<u64>,
    stream: Option<usize>,
    /// Send times of the renewals not answered yet, oldest first.
    renewals: VecDeque<u64>,
    reads: BTreeMap<u64, (ReadTicket, Object)>,
    writes: BTreeMap<u64, Vec<Object>>,
    frozen: bool,
    /// What reached it while it was frozen, in order.
    backlog: Vec<Ev>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    hits: u64,
    cached: u64,
    completed: u64,
    waited: u64,
    leader_changes: u64,
    freezes: u64,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.hits += o.hits;
        self.cached += o.cached;
        self.completed += o.completed;
        self.waited += o.waited;
        self.leader_changes += o.leader_changes;
        self.freezes += o.freezes;
    }
}

struct Sim {
    succession: Succession,
    cfg: LeaseConfig,
    objects: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    /// The authoritative store: each object's version, and the log index.
    version: Vec<u64>,
    index: u64,
    /// Per object, the highest version whose writer heard "done".
    floor: Vec<u64>,
    leaders: Vec<Leader>,
    mounts: Vec<Mount>,
    streams: Vec<Stream>,
    next_request: u64,
    stats: Stats,
    trace: Option<Vec<String>>,
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64, succession: Succession, tracing: bool) -> Sim {
        let salt = match succession {
            Succession::Fence => 0x6c65_6173_6521,
            Succession::ElectionGap => 0x6761_7073_2121,
        };
        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ salt);
        let lease_ms = rng.range(100, 500);
        let cfg = LeaseConfig {
            lease_ms,
            drift_ms: rng.range(0, 40),
            // Half the worlds never turn an object hot.
            hot_ms: if rng.percent(50) {
                0
            } else {
                rng.range(100, 2_000)
            },
        };
        let objects = rng.range(1, 3);
        let holders = rng.range(2, 4) as usize;
        let mounts = (0..holders)
            .map(|_| Mount {
                view: HolderView::new(lease_ms),
                stream: None,
                renewals: VecDeque::new(),
                reads: BTreeMap::new(),
                writes: BTreeMap::new(),
                frozen: false,
                backlog: Vec::new(),
            })
            .collect();
        let first = Leader {
            leases: Some(Leases::new(cfg, 0)),
            fence: 0,
            deposed: false,
            stream_of: BTreeMap::new(),
            pending: BTreeMap::new(),
        };
        let mut sim = Sim {
            succession,
            cfg,
            objects,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            version: vec![0; objects as usize],
            index: 0,
            floor: vec![0; objects as usize],
            leaders: vec![first],
            mounts,
            streams: Vec::new(),
            next_request: 0,
            stats: Stats::default(),
            trace: tracing.then(Vec::new),
        };
        for h in 0..holders {
            let (a, b) = (sim.rng.range(0, 50), sim.rng.range(0, 100));
            sim.at(a, Ev::RenewTick(h));
            sim.at(b, Ev::Op(h));
            if sim.rng.percent(60) {
                let t = sim.rng.range(lease_ms, 6 * lease_ms);
                sim.at(t, Ev::Freeze(h));
            }
        }
        let t = sim.rng.range(0, 200);
        sim.at(t, Ev::ExternalWrite);
        sim.at(0, Ev::LeaderTick);
        let t = sim.rng.range(lease_ms, 5 * lease_ms);
        sim.at(t, Ev::Break);
        let t = sim.rng.range(2 * lease_ms, 8 * lease_ms);
        sim.at(t, Ev::Depose);
        sim
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("        {}", what()));
        }
    }

    fn run(&mut self) -> Check {
        for _ in 0..STEPS {
            let s = self.queue.pop().expect("timers keep the queue busy");
            debug_assert!(s.at >= self.now);
            self.now = s.at;
            if let Some(h) = self.mount_of(&s.ev) {
                if self.mounts[h].frozen {
                    self.mounts[h].backlog.push(s.ev);
                    continue;
                }
            }
            if let Some(t) = &mut self.trace {
                t.push(format!("t={:>6} {:?}", self.now, s.ev));
            }
            self.handle(s.ev)?;
            self.check()?;
        }
        Ok(())
    }

    /// The mount an event happens at (it waits while the mount is frozen).
    fn mount_of(&self, ev: &Ev) -> Option<usize> {
        match ev {
            Ev::RenewTick(h)
            | Ev::Op(h)
            | Ev::Broken { h, .. }
            | Ev::ReadAnswer { h, .. }
            | Ev::ReadTimeout { h, .. }
            | Ev::WriteTimeout { h, .. } => Some(*h),
            Ev::WriteAnswer {
                writer: Some((h, _)),
                ..
            } => Some(*h),
            Ev::Down { stream, .. } => Some(self.streams[*stream].holder),
            _ => None,
        }
    }

    /// The newest leader, if it has started and is still in office.
    fn active(&self) -> Option<usize> {
        let l = self.leaders.len() - 1;
        let ld = &self.leaders[l];
        (ld.leases.is_some() && !ld.deposed).then_some(l)
    }

    fn serving(&self, l: usize) -> bool {
        self.leaders[l].leases.is_some() && !self.leaders[l].deposed
    }

    /// A leader deposed (or not started yet) answers nothing.
    fn deaf(&mut self, l: usize) -> bool {
        let deaf = !self.serving(l);
        if deaf {
            self.note(|| format!("dropped: leader {l} not serving"));
        }
        deaf
    }

    fn leases(&mut self, l: usize) -> &mut Leases {
        self.leaders[l].leases.as_mut().expect("a serving leader")
    }

    fn stream_delay(&mut self) -> u64 {
        let lease = self.cfg.lease_ms;
        match self.rng.range(0, 99) {
            0..=1 => self.rng.range(lease, 2 * lease),
            2..=11 => self.rng.range(0, lease / 2),
            _ => self.rng.range(0, 10),
        }
    }

    /// Work inside the leader (a queue, a database thread), during which
    /// other requests run.
    fn local_delay(&mut self) -> u64 {
        if self.rng.percent(10) {
            self.rng.range(0, 50)
        } else {
            self.rng.range(0, 5)
        }
    }

    /// A unary call's delay, or None when it is lost.
    fn unary_delay(&mut self) -> Option<u64> {
        if self.rng.percent(3) {
            None
        } else {
            Some(self.stream_delay())
        }
    }

    fn send_up(&mut self, s: usize, msg: Up) {
        let d = self.stream_delay();
        let at = self.streams[s].up_last.max(self.now + d);
        self.streams[s].up_last = at;
        self.at(at, Ev::Up { stream: s, msg });
    }

    fn send_down(&mut self, s: usize, msg: Down) {
        let d = self.stream_delay();
        let at = self.streams[s].down_last.max(self.now + d);
        self.streams[s].down_last = at;
        self.at(at, Ev::Down { stream: s, msg });
    }

    fn unary(&mut self, ev: Ev) {
        match self.unary_delay() {
            Some(d) => self.at(self.now + d, ev),
            None => self.note(|| format!("lost: {ev:?}")),
        }
    }

    /// Everything in flight on the stream is lost; the leader sees it close.
    fn break_stream(&mut self, s: usize) {
        let st = &mut self.streams[s];
        if !st.alive {
            return;
        }
        st.alive = false;
        let (h, l) = (st.holder, st.leader);
        if self.leaders[l].stream_of.get(&(h as Holder)) == Some(&s) {
            self.leaders[l].stream_of.remove(&(h as Holder));
            if let Some(leases) = &mut self.leaders[l].leases {
                leases.disconnect(h as Holder);
            }
        }
    }

    fn reconnect(&mut self, h: usize) {
        if let Some(s) = self.mounts[h].stream.take() {
            self.break_stream(s);
        }
        let epoch = self.mounts[h].view.reconnected();
        self.mounts[h].renewals.clear();
        let Some(l) = self.active() else {
            self.note(|| format!("mount {h}: no leader to connect to"));
            return;
        };
        let s = self.streams.len();
        self.streams.push(Stream {
            holder: h,
            leader: l,
            epoch,
            alive: true,
            up_last: 0,
            down_last: 0,
        });
        self.mounts[h].stream = Some(s);
        self.note(|| format!("mount {h}: stream {s} (epoch {epoch}) to leader {l}"));
        self.send_up(s, Up::Connect);
        self.renew(h, s);
    }

    fn renew(&mut self, h: usize, s: usize) {
        self.mounts[h].renewals.push_back(self.now);
        self.send_up(s, Up::Renew { sent: self.now });
    }

    fn handle(&mut self, ev: Ev) -> Check {
        let lease = self.cfg.lease_ms;
        match ev {
            Ev::Depose => {
                if let Some(l) = self.active() {
                    self.depose(l);
                }
                let t = self.now + self.rng.range(3 * lease, 12 * lease);
                self.at(t, Ev::Depose);
            }
            Ev::Start { leader } => {
                let fence = match self.succession {
                    Succession::Fence => self.now + lease + self.cfg.drift_ms,
                    Succession::ElectionGap => 0,
                };
                self.leaders[leader].fence = fence;
                self.leaders[leader].leases = Some(Leases::new(self.cfg, fence));
            }
            Ev::Break => {
                let live: Vec<usize> = (0..self.mounts.len())
                    .filter_map(|h| self.mounts[h].stream)
                    .filter(|&s| self.streams[s].alive)
                    .collect();
                if !live.is_empty() {
                    let s = live[self.rng.range(0, live.len() as u64 - 1) as usize];
                    self.break_stream(s);
                    let h = self.streams[s].holder;
                    let t = self.now + self.rng.range(0, 30);
                    self.at(t, Ev::Broken { h, stream: s });
                }
                let t = self.now + self.rng.range(lease, 6 * lease);
                self.at(t, Ev::Break);
            }
            Ev::ExternalWrite => {
                if let Some(l) = self.active() {
                    let objs = self.pick_objects();
                    self.unary(Ev::Write {
                        leader: l,
                        writer: None,
                        objs,
                    });
                }
                let t = self.now + self.rng.range(50, 3 * lease);
                self.at(t, Ev::ExternalWrite);
            }
            Ev::LeaderTick => {
                if let Some(l) = self.active() {
                    let now = self.now;
                    self.leases(l).expire(now);
                }
                let t = self.now + self.rng.range(20, lease / 2);
                self.at(t, Ev::LeaderTick);
            }
            Ev::RenewTick(h) => {
                match self.mounts[h].stream {
                    None => self.reconnect(h),
                    Some(s) => {
                        let overdue = self.mounts[h]
                            .renewals
                            .front()
                            .is_some_and(|&sent| self.now - sent > lease);
                        if overdue {
                            self.note(|| format!("mount {h}: renewal overdue, reconnects"));
                            self.reconnect(h);
                        } else {
                            self.renew(h, s);
                        }
                    }
                }
                let t = self.now + self.rng.range(lease / 4, lease / 3);
                self.at(t, Ev::RenewTick(h));
            }
            Ev::Op(h) => {
                self.op(h);
                let t = self.now + self.rng.range(5, lease / 2);
                self.at(t, Ev::Op(h));
            }
            Ev::Freeze(h) => {
                self.mounts[h].frozen = true;
                self.stats.freezes += 1;
                let t = self.now + self.rng.range(lease / 2, 3 * lease);
                self.at(t, Ev::Thaw(h));
            }
            Ev::Thaw(h) => {
                self.mounts[h].frozen = false;
                // What waited runs now, in order, before anything else
                // reaches the mount.
                for ev in std::mem::take(&mut self.mounts[h].backlog) {
                    if let Some(t) = &mut self.trace {
                        t.push(format!("t={:>6} (thawed) {:?}", self.now, ev));
                    }
                    self.handle(ev)?;
                    self.check()?;
                }
                if self.rng.percent(50) {
                    let t = self.now + self.rng.range(lease, 8 * lease);
                    self.at(t, Ev::Freeze(h));
                }
            }
            Ev::Broken { h, stream } => {
                if self.mounts[h].stream == Some(stream) {
                    self.reconnect(h);
                }
            }
            Ev::Down { stream, msg } => {
                let st = &self.streams[stream];
                let (h, epoch) = (st.holder, st.epoch);
                if !st.alive || self.mounts[h].stream != Some(stream) {
                    self.note(|| "dropped: stream closed".into());
                    return Ok(());
                }
                match msg {
                    Down::Renewed { sent, ok } => {
                        let oldest = self.mounts[h].renewals.pop_front();
                        if oldest != Some(sent) {
                            return Err(format!(
                                "model: renewal answers out of order ({oldest:?} vs {sent})"
                            ));
                        }
                        if ok {
                            self.mounts[h].view.renewed(epoch, sent);
                        } else {
                            self.reconnect(h);
                        }
                    }
                    Down::Invalidate {
                        objects,
                        index,
                        change,
                    } => {
                        // The view needs no log index: see `offer`.
                        self.note(|| format!("change {change} was at index {index}"));
                        self.mounts[h].view.invalidate(&objects);
                        self.send_up(stream, Up::Ack { change });
                    }
                }
            }
            Ev::ReadAnswer {
                h,
                read,
                version,
                granted,
            } => {
                // A read that timed out was cancelled: its answer is never
                // seen (as with a deadline on a unary call).
                if let Some((ticket, obj)) = self.mounts[h].reads.remove(&read) {
                    let now = self.now;
                    let v = &mut self.mounts[h].view;
                    let cached = v.offer(ticket, obj, version, granted, now);
                    v.read_done(ticket);
                    if cached {
                        self.stats.cached += 1;
                    }
                    self.note(|| format!("cached: {cached}"));
                }
            }
            Ev::ReadTimeout { h, read } => {
                if let Some((ticket, _)) = self.mounts[h].reads.remove(&read) {
                    self.mounts[h].view.read_done(ticket);
                }
            }
            Ev::WriteTimeout { h, write } => {
                // The outcome is unknown: drop what it cached.
                if let Some(objs) = self.mounts[h].writes.remove(&write) {
                    objs.iter().for_each(|&o| self.mounts[h].view.forget(o));
                }
            }
            Ev::Up { stream, msg } => {
                let st = &self.streams[stream];
                let (h, l) = (st.holder, st.leader);
                if !st.alive || !self.serving(l) {
                    self.note(|| "dropped: stream closed or leader not serving".into());
                    return Ok(());
                }
                let now = self.now;
                match msg {
                    Up::Connect => {
                        self.leaders[l].stream_of.insert(h as Holder, stream);
                        self.leases(l).connect(h as Holder);
                    }
                    Up::Renew { sent } => {
                        let ok = self.leases(l).renew(h as Holder, now);
                        self.send_down(stream, Down::Renewed { sent, ok });
                    }
                    Up::Ack { change } => {
                        self.leases(l).ack(h as Holder, change);
                        self.poll(l, change)?;
                    }
                }
            }
            Ev::Read {
                leader,
                h,
                read,
                obj,
            } => {
                if self.deaf(leader) {
                    return Ok(());
                }
                let now = self.now;
                // Grant first, then read what the store holds; other work
                // may run in between.
                let granted = self.leases(leader).grant(h as Holder, &[obj], now)[0];
                let t = now + self.local_delay();
                self.at(
                    t,
                    Ev::ReadStore {
                        leader,
                        h,
                        read,
                        obj,
                        granted,
                    },
                );
            }
            Ev::ReadStore {
                leader,
                h,
                read,
                obj,
                granted,
            } => {
                if self.deaf(leader) {
                    return Ok(());
                }
                let (version, index) = (self.version[obj as usize], self.index);
                self.note(|| format!("granted {granted}, v{version} at index {index}"));
                self.unary(Ev::ReadAnswer {
                    h,
                    read,
                    version,
                    granted,
                });
            }
            Ev::Write {
                leader,
                writer,
                objs,
            } => {
                if self.deaf(leader) {
                    return Ok(());
                }
                self.index += 1;
                let index = self.index;
                let objs = objs
                    .into_iter()
                    .map(|o| {
                        self.version[o as usize] += 1;
                        (o, self.version[o as usize])
                    })
                    .collect();
                // The change is applied; the lease table hears of it a
                // little later.
                let t = self.now + self.local_delay();
                self.at(
                    t,
                    Ev::BeginChange {
                        leader,
                        writer,
                        objs,
                        index,
                    },
                );
            }
            Ev::BeginChange {
                leader,
                writer,
                objs,
                index,
            } => {
                if self.deaf(leader) {
                    return Ok(());
                }
                let now = self.now;
                let by = writer.map(|(h, _)| h as Holder);
                let objects: Vec<Object> = objs.iter().map(|&(o, _)| o).collect();
                let (change, tell) = self.leases(leader).begin_change(&objects, by, now);
                self.note(|| format!("{objs:?} at index {index}: change {change}, tell {tell:?}"));
                for t in tell {
                    match self.leaders[leader].stream_of.get(&t) {
                        Some(&s) if self.streams[s].alive => self.send_down(
                            s,
                            Down::Invalidate {
                                objects: objects.clone(),
                                index,
                                change,
                            },
                        ),
                        _ => self.note(|| format!("no stream to tell {t}")),
                    }
                }
                self.leaders[leader].pending.insert(
                    change,
                    Pending {
                        writer,
                        objs,
                        begun: now,
                    },
                );
                self.poll(leader, change)?;
            }
            Ev::Poll { leader, change } => {
                if self.serving(leader) {
                    self.poll(leader, change)?;
                }
            }
            Ev::WriteAnswer { writer, objs } => {
                let heard = match writer {
                    None => true,
                    Some((h, write)) => {
                        let heard = self.mounts[h].writes.remove(&write).is_some();
                        if heard {
                            objs.iter()
                                .for_each(|&(o, _)| self.mounts[h].view.forget(o));
                        }
                        heard
                    }
                };
                if heard {
                    for (o, version) in objs {
                        let f = &mut self.floor[o as usize];
                        *f = (*f).max(version);
                    }
                    self.stats.completed += 1;
                }
            }
        }
        Ok(())
    }

    fn depose(&mut self, l: usize) {
        let lease = self.cfg.lease_ms;
        self.leaders[l].deposed = true;
        self.stats.leader_changes += 1;
        // Either the old leader's process died (its streams break and
        // mounts notice soon) or it is cut off (they hear nothing).
        if self.rng.percent(50) {
            for s in 0..self.streams.len() {
                if self.streams[s].leader == l && self.streams[s].alive {
                    self.break_stream(s);
                    let h = self.streams[s].holder;
                    let t = self.now + self.rng.range(0, 50);
                    self.at(t, Ev::Broken { h, stream: s });
                }
            }
        }
        let gap = match self.succession {
            Succession::Fence => self.rng.range(0, lease / 2),
            Succession::ElectionGap => lease + self.cfg.drift_ms + self.rng.range(0, lease / 2),
        };
        self.leaders.push(Leader {
            leases: None,
            fence: 0,
            deposed: false,
            stream_of: BTreeMap::new(),
            pending: BTreeMap::new(),
        });
        let leader = self.leaders.len() - 1;
        self.note(|| format!("leader {l} deposed; leader {leader} starts in {gap}"));
        self.at(self.now + gap, Ev::Start { leader });
    }

    /// One object, or now and then two (a rename between directories).
    fn pick_objects(&mut self) -> Vec<Object> {
        let first = self.rng.range(0, self.objects - 1);
        if self.objects > 1 && self.rng.percent(25) {
            let second = (first + self.rng.range(1, self.objects - 1)) % self.objects;
            vec![first, second]
        } else {
            vec![first]
        }
    }

    fn op(&mut self, h: usize) {
        let lease = self.cfg.lease_ms;
        let obj = self.rng.range(0, self.objects - 1);
        let write = self.rng.percent(25);
        let Some(s) = self.mounts[h].stream else {
            return;
        };
        let leader = self.streams[s].leader;
        self.next_request += 1;
        let id = self.next_request;
        if write {
            let objs = self.pick_objects();
            self.mounts[h].writes.insert(id, objs.clone());
            self.note(|| format!("mount {h} writes {objs:?} (write {id})"));
            self.unary(Ev::Write {
                leader,
                writer: Some((h, id)),
                objs,
            });
            self.at(self.now + 10 * lease, Ev::WriteTimeout { h, write: id });
        } else if self.mounts[h].view.get(obj, self.now).is_some() {
            self.stats.hits += 1;
        } else {
            let ticket = self.mounts[h].view.read_sent();
            self.mounts[h].reads.insert(id, (ticket, obj));
            self.note(|| format!("mount {h} reads {obj} (read {id})"));
            self.unary(Ev::Read {
                leader,
                h,
                read: id,
                obj,
            });
            self.at(self.now + 3 * lease, Ev::ReadTimeout { h, read: id });
        }
    }

    fn poll(&mut self, l: usize, change: ChangeId) -> Check {
        if !self.leaders[l].pending.contains_key(&change) {
            return Ok(());
        }
        let now = self.now;
        match self.leases(l).poll_change(change, now) {
            ChangePoll::Done => {
                self.leases(l).end_change(change);
                let p = self.leaders[l].pending.remove(&change).expect("pending");
                if now > p.begun {
                    self.stats.waited += 1;
                }
                self.note(|| format!("change {change} done"));
                self.unary(Ev::WriteAnswer {
                    writer: p.writer,
                    objs: p.objs,
                });
            }
            ChangePoll::WaitUntil(t) if t <= now => {
                return Err(format!(
                    "poll_change({change}) waits until {t}, not after now"
                ));
            }
            ChangePoll::WaitUntil(t) => self.at(t, Ev::Poll { leader: l, change }),
        }
        Ok(())
    }

    fn check(&self) -> Check {
        for (h, m) in self.mounts.iter().enumerate() {
            for o in 0..self.objects {
                if let Some(&v) = m.view.get(o, self.now) {
                    let (floor, newest) = (self.floor[o as usize], self.version[o as usize]);
                    if v < floor {
                        return Err(format!(
                            "stale read: mount {h} returns v{v} of object {o}, \
                             but a write of v{floor} is done"
                        ));
                    }
                    if v > newest {
                        return Err(format!(
                            "mount {h} returns v{v} of object {o}, which never existed"
                        ));
                    }
                }
            }
        }
        let lc = self.cfg.lease_ms + self.cfg.drift_ms;
        if let Some(l) = self.active() {
            let fence = self.leaders[l].fence;
            for (id, p) in &self.leaders[l].pending {
                let bound = p.begun.max(fence) + lc;
                if self.now > bound {
                    return Err(format!(
                        "change {id} (begun at {}) not done by {bound}: stuck",
                        p.begun
                    ));
                }
            }
        }
        Ok(())
    }
}

fn explore(succession: Succession, test: &str) {
    if let Ok(s) = std::env::var("LEASE_MODEL_SEED") {
        let seed: u64 = s.parse().expect("LEASE_MODEL_SEED is a number");
        let mut sim = Sim::new(seed, succession, true);
        let result = sim.run();
        for line in sim.trace.take().unwrap_or_default() {
            println!("{line}");
        }
        if let Err(e) = result {
            panic!("seed {seed} ({succession:?}): {e}");
        }
        return;
    }
    let seeds = std::env::var("LEASE_MODEL_SEEDS")
        .ok()
        .map(|s| s.parse().expect("LEASE_MODEL_SEEDS is a number"))
        .unwrap_or(DEFAULT_SEEDS);
    let mut total = Stats::default();
    for seed in 0..seeds {
        let mut sim = Sim::new(seed, succession, false);
        if let Err(e) = sim.run() {
            // Deterministic: run it again, this time writing the trace.
            let mut again = Sim::new(seed, succession, true);
            let _ = again.run();
            let trace = again.trace.take().unwrap_or_default();
            let tail = &trace[trace.len().saturating_sub(TRACE_TAIL)..];
            panic!(
                "seed {seed} ({succession:?}, {:?}): {e}\nlast steps:\n{}\n\
                 replay: LEASE_MODEL_SEED={seed} cargo test -p failsafe-core \
                 --test lease_model {test} -- --nocapture",
                again.cfg,
                tail.join("\n")
            );
        }
        total.add(sim.stats);
    }
    println!("{succession:?}, {seeds} seeds × {STEPS} steps: {total:?}");
    // A model that never caches or never finishes a write proves nothing.
    assert!(total.hits > 0 && total.cached > 0, "{total:?}");
    assert!(total.completed > 0 && total.waited > 0, "{total:?}");
    assert!(total.leader_changes > 0 && total.freezes > 0, "{total:?}");
}

#[test]
fn t10_close_to_open_holds_with_a_fenced_new_leader() {
    explore(
        Succession::Fence,
        "t10_close_to_open_holds_with_a_fenced_new_leader",
    );
}

#[test]
fn t20_close_to_open_holds_across_an_election_gap() {
    explore(
        Succession::ElectionGap,
        "t20_close_to_open_holds_across_an_election_gap",
    );
}
