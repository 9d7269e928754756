//! What follows a change once it is done, in the lease model: the leader
//! registers the writer and the holders it told on its objects again
//! (`grant`, after `change_mark`), reads them, pushes what it read to those
//! holders on their streams unless a change of the objects began since the
//! mark (`begun_since`, checked in the same step as the sends, as the
//! leader does both under the lock `begin_change` and its invalidations
//! take), and returns it to the writer, which caches it with `amend`.

use failsafe_core::lease::{Holder, Object, ReadTicket};

use super::world::*;

/// How often a done change is read back (else the writer just hears that
/// it is done, as when the leader has no lease term to grant under).
const READ_BACK_PERCENT: u64 = 80;

impl Sim {
    /// Change `change` of leader `l` is done and ended.
    pub(crate) fn after_change(&mut self, l: usize, change: u64, p: Pending) {
        if !self.rng.percent(READ_BACK_PERCENT) {
            self.unary(Ev::WriteAnswer {
                writer: p.writer,
                objs: p.objs,
                back: None,
            });
            return;
        }
        let after = After {
            change,
            writer: p.writer,
            objs: p.objs,
            others: p.told,
            writer_granted: false,
            mark: 0,
        };
        // Other requests may run before the read-back starts.
        let t = self.now + self.local_delay();
        self.at(t, Ev::AfterChange { leader: l, after });
    }

    fn objects_of(after: &After) -> Vec<Object> {
        after.objs.iter().map(|&(o, _)| o).collect()
    }

    /// Whether `h` (with a stream here) is registered on all of `objects`.
    fn grant_all(&mut self, l: usize, h: Holder, objects: &[Object]) -> bool {
        let now = self.now;
        self.leaders[l].stream_of.contains_key(&h)
            && self.leases(l).grant(h, objects, now).iter().all(|g| *g)
    }

    /// The mark, then the grants (the holders told, then the writer).
    pub(crate) fn refresh_grant(&mut self, l: usize, mut after: After) {
        let objects = Self::objects_of(&after);
        after.mark = self.leases(l).change_mark();
        let by = after.writer.map(|(h, _)| h as Holder);
        let told = std::mem::take(&mut after.others);
        for h in told {
            if Some(h) != by && self.grant_all(l, h, &objects) {
                after.others.push(h);
            }
        }
        after.writer_granted = by.is_some_and(|h| self.grant_all(l, h, &objects));
        self.note(|| {
            format!(
                "change {}: mark {}, refresh {:?}, writer granted {}",
                after.change, after.mark, after.others, after.writer_granted
            )
        });
        if after.others.is_empty() && !after.writer_granted {
            self.unary(Ev::WriteAnswer {
                writer: after.writer,
                objs: after.objs,
                back: None,
            });
            return;
        }
        let t = self.now + self.local_delay();
        self.at(t, Ev::ReadBack { leader: l, after });
    }

    /// The read, after the grants; the sends come later still.
    pub(crate) fn read_back(&mut self, l: usize, after: After) {
        let read: Vec<(Object, u64)> = after
            .objs
            .iter()
            .map(|&(o, _)| (o, self.version[o as usize]))
            .collect();
        self.note(|| format!("change {}: read {read:?}", after.change));
        // A database call: now and then a slow one, during which holders
        // reconnect, leases run out and other changes come and go.
        let t = self.now
            + if self.rng.percent(10) {
                self.rng.range(0, self.cfg.lease_ms)
            } else {
                self.local_delay()
            };
        self.at(
            t,
            Ev::RefreshSend {
                leader: l,
                after,
                read,
            },
        );
    }

    /// The check and the sends, in one step; then the writer's answer.
    pub(crate) fn refresh_send(&mut self, l: usize, after: After, read: Vec<(Object, u64)>) {
        if !after.others.is_empty() {
            let objects = Self::objects_of(&after);
            if self.leases(l).begun_since(&objects, after.mark) {
                self.stats.suppressed += 1;
                self.note(|| format!("change {}: a change began since", after.change));
            } else {
                for &h in &after.others {
                    // Whichever stream the holder has now.
                    match self.leaders[l].stream_of.get(&h) {
                        Some(&s) if self.streams[s].alive => self.send_down(
                            s,
                            Down::Refresh {
                                objs: read.clone(),
                                change: after.change,
                            },
                        ),
                        _ => self.note(|| format!("no stream to refresh {h}")),
                    }
                }
            }
        }
        self.unary(Ev::WriteAnswer {
            writer: after.writer,
            objs: after.objs,
            back: after.writer_granted.then_some(read),
        });
    }

    /// Mount `h` hears that its write (sent under `ticket`) of `objs` is
    /// done, with what was read back for it if it was granted: each object
    /// read back is amended, any other forgotten; then the ticket closes.
    pub(crate) fn own_change(
        &mut self,
        h: usize,
        ticket: ReadTicket,
        objs: &[(Object, u64)],
        back: Option<&[(Object, u64)]>,
    ) {
        let now = self.now;
        for &(o, _) in objs {
            let read = back.and_then(|b| b.iter().find(|&&(x, _)| x == o));
            let view = &mut self.mounts[h].view;
            match read {
                Some(&(_, version)) => {
                    view.amend(ticket, o, true, now, |v| *v = version);
                    let cached = view.get(o, now).is_some();
                    if cached {
                        self.stats.amended += 1;
                    }
                    self.note(|| format!("read back v{version} of {o}, cached: {cached}"));
                }
                None => view.forget(o, now),
            }
        }
        self.mounts[h].view.read_done(ticket);
    }
}
