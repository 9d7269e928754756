//! The simulated world of the lease model: the parties, their messages,
//! and every step but the handling of one event (`handle.rs`).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use failsafe_core::lease::{
    ChangeId, ChangePoll, Holder, HolderView, LeaseConfig, Leases, Object, ReadTicket,
};

pub(crate) const DEFAULT_SEEDS: u64 = 3_000;
pub(crate) const STEPS: usize = 400;
pub(crate) const TRACE_TAIL: usize = 120;

/// splitmix64: small, deterministic, good enough to pick interleavings.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub(crate) fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

/// How a new leader makes sure its predecessor's leases have run out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Succession {
    /// It takes over soon after, and fences its first changes until
    /// `start + lease_ms + drift_ms`.
    Fence,
    /// Raft's election keeps the two at least `lease_ms + drift_ms` apart
    /// (the old one stops at its deposal), and it starts with no fence.
    ElectionGap,
}

#[derive(Debug, Clone)]
pub(crate) enum Up {
    Connect,
    Renew { sent: u64 },
    Ack { change: ChangeId },
}

#[derive(Debug, Clone)]
pub(crate) enum Down {
    Renewed {
        sent: u64,
        ok: bool,
    },
    Invalidate {
        objects: Vec<Object>,
        index: u64,
        change: ChangeId,
    },
    /// What a finished change left, read for the holders it told after
    /// registering them again (each object with the version read).
    Refresh {
        objs: Vec<(Object, u64)>,
        change: ChangeId,
    },
}

/// What a leader does for a change once it is done, before the writer
/// hears: registers the holders it told (and the writer) on its objects
/// again, reads them, pushes that to those holders and returns it to the
/// writer (`refresh.rs`).
#[derive(Debug, Clone)]
pub(crate) struct After {
    pub(crate) change: ChangeId,
    pub(crate) writer: Writer,
    /// Each object with the version the change made.
    pub(crate) objs: Vec<(Object, u64)>,
    /// The holders the change was sent to (before the grants); those
    /// registered again (after them).
    pub(crate) others: Vec<Holder>,
    pub(crate) writer_granted: bool,
    /// `change_mark` before the grants.
    pub(crate) mark: ChangeId,
}

/// Who asked for a write: a mount (and its request number), or a client
/// with no cache.
pub(crate) type Writer = Option<(usize, u64)>;

#[derive(Debug, Clone)]
pub(crate) enum Ev {
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
    /// After `poll_change` said done and `end_change` ran.
    AfterChange {
        leader: usize,
        after: After,
    },
    /// The grants are made: read the store.
    ReadBack {
        leader: usize,
        after: After,
    },
    /// What was read: pushed (unless a change began since the mark) and
    /// returned to the writer.
    RefreshSend {
        leader: usize,
        after: After,
        read: Vec<(Object, u64)>,
    },
    WriteAnswer {
        writer: Writer,
        objs: Vec<(Object, u64)>,
        /// What the leader read back for the writer after granting it, if
        /// it did.
        back: Option<Vec<(Object, u64)>>,
    },
}

pub(crate) struct Scheduled {
    pub(crate) at: u64,
    pub(crate) seq: u64,
    pub(crate) ev: Ev,
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

pub(crate) struct Pending {
    pub(crate) writer: Writer,
    pub(crate) objs: Vec<(Object, u64)>,
    /// When `begin_change` ran.
    pub(crate) begun: u64,
    /// The holders it was sent to.
    pub(crate) told: Vec<Holder>,
}

pub(crate) struct Leader {
    /// None until it starts (after its election).
    pub(crate) leases: Option<Leases>,
    pub(crate) fence: u64,
    pub(crate) deposed: bool,
    pub(crate) stream_of: BTreeMap<Holder, usize>,
    pub(crate) pending: BTreeMap<ChangeId, Pending>,
}

pub(crate) struct Stream {
    pub(crate) holder: usize,
    pub(crate) leader: usize,
    pub(crate) epoch: u64,
    pub(crate) alive: bool,
    /// Delivery time of the last message each way (streams are ordered).
    pub(crate) up_last: u64,
    pub(crate) down_last: u64,
}

pub(crate) struct Mount {
    pub(crate) view: HolderView<u64>,
    pub(crate) stream: Option<usize>,
    /// Send times of the renewals not answered yet, oldest first.
    pub(crate) renewals: VecDeque<u64>,
    pub(crate) reads: BTreeMap<u64, (ReadTicket, Object)>,
    /// Writes sent, with the ticket their read-back is judged by.
    pub(crate) writes: BTreeMap<u64, (Vec<Object>, ReadTicket)>,
    pub(crate) frozen: bool,
    /// What reached it while it was frozen, in order.
    pub(crate) backlog: Vec<Ev>,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) hits: u64,
    pub(crate) cached: u64,
    pub(crate) completed: u64,
    pub(crate) waited: u64,
    pub(crate) leader_changes: u64,
    pub(crate) freezes: u64,
    /// Own changes read back and cached (`amend`).
    pub(crate) amended: u64,
    /// Refreshes cached (`pushed`), and those not sent because a change
    /// began since the mark.
    pub(crate) pushed: u64,
    pub(crate) suppressed: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, o: Stats) {
        self.hits += o.hits;
        self.cached += o.cached;
        self.completed += o.completed;
        self.waited += o.waited;
        self.leader_changes += o.leader_changes;
        self.freezes += o.freezes;
        self.amended += o.amended;
        self.pushed += o.pushed;
        self.suppressed += o.suppressed;
    }
}

pub(crate) struct Sim {
    pub(crate) succession: Succession,
    pub(crate) cfg: LeaseConfig,
    pub(crate) objects: u64,
    pub(crate) rng: Rng,
    pub(crate) now: u64,
    pub(crate) seq: u64,
    pub(crate) queue: BinaryHeap<Scheduled>,
    /// The authoritative store: each object's version, and the log index.
    pub(crate) version: Vec<u64>,
    pub(crate) index: u64,
    /// Per object, the highest version whose writer heard "done".
    pub(crate) floor: Vec<u64>,
    pub(crate) leaders: Vec<Leader>,
    pub(crate) mounts: Vec<Mount>,
    pub(crate) streams: Vec<Stream>,
    pub(crate) next_request: u64,
    pub(crate) stats: Stats,
    pub(crate) trace: Option<Vec<String>>,
}

pub(crate) type Check = Result<(), String>;

impl Sim {
    pub(crate) fn new(seed: u64, succession: Succession, tracing: bool) -> Sim {
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

    pub(crate) fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    pub(crate) fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("        {}", what()));
        }
    }

    pub(crate) fn run(&mut self) -> Check {
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
    pub(crate) fn mount_of(&self, ev: &Ev) -> Option<usize> {
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
    pub(crate) fn active(&self) -> Option<usize> {
        let l = self.leaders.len() - 1;
        let ld = &self.leaders[l];
        (ld.leases.is_some() && !ld.deposed).then_some(l)
    }

    pub(crate) fn serving(&self, l: usize) -> bool {
        self.leaders[l].leases.is_some() && !self.leaders[l].deposed
    }

    /// A leader deposed (or not started yet) answers nothing.
    pub(crate) fn deaf(&mut self, l: usize) -> bool {
        let deaf = !self.serving(l);
        if deaf {
            self.note(|| format!("dropped: leader {l} not serving"));
        }
        deaf
    }

    pub(crate) fn leases(&mut self, l: usize) -> &mut Leases {
        self.leaders[l].leases.as_mut().expect("a serving leader")
    }

    pub(crate) fn stream_delay(&mut self) -> u64 {
        let lease = self.cfg.lease_ms;
        match self.rng.range(0, 99) {
            0..=1 => self.rng.range(lease, 2 * lease),
            2..=11 => self.rng.range(0, lease / 2),
            _ => self.rng.range(0, 10),
        }
    }

    /// Work inside the leader (a queue, a database thread), during which
    /// other requests run.
    pub(crate) fn local_delay(&mut self) -> u64 {
        if self.rng.percent(10) {
            self.rng.range(0, 50)
        } else {
            self.rng.range(0, 5)
        }
    }

    /// A unary call's delay, or None when it is lost.
    pub(crate) fn unary_delay(&mut self) -> Option<u64> {
        if self.rng.percent(3) {
            None
        } else {
            Some(self.stream_delay())
        }
    }

    pub(crate) fn send_up(&mut self, s: usize, msg: Up) {
        let d = self.stream_delay();
        let at = self.streams[s].up_last.max(self.now + d);
        self.streams[s].up_last = at;
        self.at(at, Ev::Up { stream: s, msg });
    }

    pub(crate) fn send_down(&mut self, s: usize, msg: Down) {
        let d = self.stream_delay();
        let at = self.streams[s].down_last.max(self.now + d);
        self.streams[s].down_last = at;
        self.at(at, Ev::Down { stream: s, msg });
    }

    pub(crate) fn unary(&mut self, ev: Ev) {
        match self.unary_delay() {
            Some(d) => self.at(self.now + d, ev),
            None => self.note(|| format!("lost: {ev:?}")),
        }
    }

    /// Everything in flight on the stream is lost; the leader sees it close.
    pub(crate) fn break_stream(&mut self, s: usize) {
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

    pub(crate) fn reconnect(&mut self, h: usize) {
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
        // The client renews once the leader welcomed it, a round trip
        // later: here at once, or at its next renewal tick.
        if self.rng.percent(50) {
            self.renew(h, s);
        }
    }

    pub(crate) fn renew(&mut self, h: usize, s: usize) {
        self.mounts[h].renewals.push_back(self.now);
        self.send_up(s, Up::Renew { sent: self.now });
    }
}

impl Sim {
    pub(crate) fn depose(&mut self, l: usize) {
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
    pub(crate) fn pick_objects(&mut self) -> Vec<Object> {
        let first = self.rng.range(0, self.objects - 1);
        if self.objects > 1 && self.rng.percent(25) {
            let second = (first + self.rng.range(1, self.objects - 1)) % self.objects;
            vec![first, second]
        } else {
            vec![first]
        }
    }

    pub(crate) fn op(&mut self, h: usize) {
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
            // Taken before the write is sent: its read-back is judged by it.
            let ticket = self.mounts[h].view.read_sent();
            self.mounts[h].writes.insert(id, (objs.clone(), ticket));
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

    pub(crate) fn poll(&mut self, l: usize, change: ChangeId) -> Check {
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
                self.after_change(l, change, p);
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

    pub(crate) fn check(&self) -> Check {
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
