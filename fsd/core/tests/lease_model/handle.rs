//! One event of the lease model, handled.

use failsafe_core::lease::{Holder, Leases, Object};

use super::world::*;

impl Sim {
    pub(crate) fn handle(&mut self, ev: Ev) -> Check {
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
                    Down::Refresh { objs, change } => {
                        let now = self.now;
                        for (o, version) in objs {
                            let cached =
                                self.mounts[h].view.pushed(epoch, o, now, |v| *v = version);
                            if cached {
                                self.stats.pushed += 1;
                            }
                            self.note(|| {
                                format!("change {change}: v{version} of {o} cached: {cached}")
                            });
                        }
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
                // The outcome is unknown. The mount may drop what it cached
                // of it, or (as the client does for a failed call) only
                // close the write's ticket.
                if let Some((objs, ticket)) = self.mounts[h].writes.remove(&write) {
                    if self.rng.percent(50) {
                        let now = self.now;
                        objs.iter()
                            .for_each(|&o| self.mounts[h].view.forget(o, now));
                    }
                    self.mounts[h].view.read_done(ticket);
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
                let mut told = Vec::with_capacity(tell.len());
                for t in tell {
                    match self.leaders[leader].stream_of.get(&t) {
                        Some(&s) if self.streams[s].alive => {
                            told.push(t);
                            self.send_down(
                                s,
                                Down::Invalidate {
                                    objects: objects.clone(),
                                    index,
                                    change,
                                },
                            )
                        }
                        _ => self.note(|| format!("no stream to tell {t}")),
                    }
                }
                self.leaders[leader].pending.insert(
                    change,
                    Pending {
                        writer,
                        objs,
                        begun: now,
                        told,
                    },
                );
                self.poll(leader, change)?;
            }
            Ev::Poll { leader, change } => {
                if self.serving(leader) {
                    self.poll(leader, change)?;
                }
            }
            Ev::AfterChange { leader, after } => {
                if !self.deaf(leader) {
                    self.refresh_grant(leader, after);
                }
            }
            Ev::ReadBack { leader, after } => {
                if !self.deaf(leader) {
                    self.read_back(leader, after);
                }
            }
            Ev::RefreshSend {
                leader,
                after,
                read,
            } => {
                if !self.deaf(leader) {
                    self.refresh_send(leader, after, read);
                }
            }
            Ev::WriteAnswer { writer, objs, back } => {
                let heard = match writer {
                    None => true,
                    Some((h, write)) => match self.mounts[h].writes.remove(&write) {
                        None => false,
                        Some((_, ticket)) => {
                            self.own_change(h, ticket, &objs, back.as_deref());
                            true
                        }
                    },
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
}
