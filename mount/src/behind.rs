//! Directory write-behind, the mount's side (`writebehind`; the design:
//! docs/write-behind.md).
//!
//! The tracker leader may delegate a directory this mount changes (a
//! `mkdir` or `rmdir` in it asks) to this mount alone. While it holds the
//! delegation, and its leases last at least [`MARGIN`] longer, a `mkdir`
//! in the directory is made here only, under an inode number from a range
//! of this mount's own ([`LOCAL_BASE`]), and a `rmdir` of a directory made
//! so and not yet sent takes it back: a lock directory's `mkdir`/`rmdir`
//! pair (DokuWiki's `io_lock`, and the lock directories of many other
//! tools) costs nothing. What is left is flushed to the leader, marked as
//! the delegate's (`MutateRequest.flush_of`):
//!
//! - [`FLUSH_AFTER`] after the first change not yet flushed;
//! - when the leader recalls the directory (another client is about to read
//!   or change it): the invalidation is acknowledged only after the flush;
//! - before any other operation in the directory, or on a directory made
//!   here, and before any lock operation;
//! - when the lease stream ends, and at unmount.
//!
//! The leader refuses a flush from a mount that no longer holds the
//! delegation (its leases ran out while it was frozen or cut off): what it
//! made alone is then lost, and said so in the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failsafe_client::pb::{self, command::Op, command_result};
use failsafe_client::{Behind as Asking, Client};
use fuser::Errno;

use crate::errno::errno;

/// Inode numbers from here on are this mount's own (the tracker numbers
/// from 1 upwards).
pub(crate) const LOCAL_BASE: u64 = 1 << 62;
/// A change made here alone is flushed at the latest this long after.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// Nothing is done alone unless the leases last at least this much longer:
/// time for the flush.
pub(crate) const MARGIN: Duration = Duration::from_millis(150);

pub(crate) struct WriteBehind {
    client: Client,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    dirs: HashMap<u64, Delegation>,
    locals: HashMap<u64, Local>,
    next: u64,
}

struct Delegation {
    /// The lease stream it was granted on.
    epoch: u64,
    /// Recalled, or the stream ended: nothing more is done here alone.
    gone: bool,
    /// Directories made here alone and not flushed yet (or being flushed),
    /// by name.
    made: BTreeMap<Vec<u8>, u64>,
    /// Those not taken by a flush yet, in the order they were made.
    pending: Vec<u64>,
    /// One flush at a time, in order.
    flush: Arc<tokio::sync::Mutex<()>>,
    /// A timer task will flush it.
    timer: bool,
    /// The last change made here alone (the directory's mtime and ctime).
    touched_ns: i64,
}

enum Local {
    /// Made here alone: flushed as `Mkdir` under `parent`.
    Made { parent: u64, attr: pb::Attr },
    /// Flushed: the tracker's inode.
    Flushed(u64),
    /// The flush was refused: what was made here is gone.
    Lost,
}

/// What [`WriteBehind::rmdir`] did.
pub(crate) enum Removed {
    /// It was made here alone and never sent: gone without a trace.
    Here,
    /// Not made here alone: remove it at the tracker.
    Elsewhere,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WriteBehind {
    pub(crate) fn new(client: Client) -> Arc<WriteBehind> {
        Arc::new(WriteBehind {
            client,
            inner: Mutex::default(),
        })
    }

    /// Whether `dir` may be changed here alone now.
    fn usable(&self, d: &Delegation) -> bool {
        !d.gone
            && self
                .client
                .lease_now()
                .is_some_and(|(epoch, left)| epoch == d.epoch && left >= MARGIN)
    }

    /// The leader delegated `dir` to this mount on lease stream `epoch`.
    pub(crate) fn granted(&self, dir: u64, epoch: u64) {
        let mut inner = lock(&self.inner);
        let d = inner.dirs.entry(dir).or_insert_with(|| Delegation {
            epoch,
            gone: false,
            made: BTreeMap::new(),
            pending: Vec::new(),
            flush: Arc::default(),
            timer: false,
            touched_ns: 0,
        });
        d.epoch = epoch;
        d.gone = false;
    }

    /// `mkdir dir/name` here alone, if `dir` is delegated here: `None` when
    /// it must go to the tracker.
    pub(crate) async fn mkdir(
        self: &Arc<Self>,
        dir: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Option<Result<pb::Attr, Errno>> {
        {
            let inner = lock(&self.inner);
            let d = inner.dirs.get(&dir)?;
            if !self.usable(d) {
                return None;
            }
            if d.made.contains_key(name) {
                return Some(Err(Errno::EEXIST));
            }
        }
        // The name must be free at the tracker (nobody else can take it
        // while the directory is delegated here); usually known here.
        match self.client.lookup_leased(dir, name).await {
            Ok(l) if l.value.is_some() => return Some(Err(Errno::EEXIST)),
            Ok(_) => {}
            Err(e) => return Some(Err(errno(&e))),
        }
        let now = crate::core::now_ns();
        let mut inner = lock(&self.inner);
        inner.next += 1;
        let ino = LOCAL_BASE + inner.next;
        let d = inner.dirs.get_mut(&dir)?;
        // Checked again: a recall may have come meanwhile.
        if !self.usable(d) {
            return None;
        }
        if d.made.contains_key(name) {
            return Some(Err(Errno::EEXIST));
        }
        d.made.insert(name.to_vec(), ino);
        d.pending.push(ino);
        d.touched_ns = now;
        let start_timer = !std::mem::replace(&mut d.timer, true);
        let attr = pb::Attr {
            ino,
            kind: pb::FileKind::KindDir as i32,
            mode: mode & 0o7777,
            uid,
            gid,
            nlink: 2,
            size: 0,
            atime_ns: now,
            mtime_ns: now,
            ctime_ns: now,
            ..Default::default()
        };
        inner.locals.insert(ino, Local::Made { parent: dir, attr });
        drop(inner);
        if start_timer {
            let me = self.clone();
            tokio::spawn(async move { me.flush_later(dir).await });
        }
        Some(Ok(attr))
    }

    /// `rmdir dir/name`: taken back here if it was made here alone and not
    /// sent yet (it is empty: anything done inside it flushes it first).
    pub(crate) async fn rmdir(&self, dir: u64, name: &[u8]) -> Removed {
        {
            let mut inner = lock(&self.inner);
            let Some(d) = inner.dirs.get_mut(&dir) else {
                return Removed::Elsewhere;
            };
            if let Some(&ino) = d.made.get(name) {
                if let Some(i) = d.pending.iter().position(|&p| p == ino) {
                    d.pending.remove(i);
                    d.made.remove(name);
                    d.touched_ns = crate::core::now_ns();
                    inner.locals.remove(&ino);
                    return Removed::Here;
                }
            }
        }
        // Being flushed, or something else made here is pending: in order.
        self.settle(dir).await;
        Removed::Elsewhere
    }

    /// A directory made here alone, by name.
    pub(crate) fn lookup(&self, dir: u64, name: &[u8]) -> Option<pb::Attr> {
        let inner = lock(&self.inner);
        let ino = *inner.dirs.get(&dir)?.made.get(name)?;
        match inner.locals.get(&ino) {
            Some(Local::Made { attr, .. }) => Some(*attr),
            _ => None,
        }
    }

    /// The attributes of a directory made here alone and not flushed yet.
    pub(crate) fn getattr(&self, ino: u64) -> Option<pb::Attr> {
        match lock(&self.inner).locals.get(&ino) {
            Some(Local::Made { attr, .. }) => Some(*attr),
            _ => None,
        }
    }

    /// `dir`'s attributes as the tracker gave them, with what was made here
    /// alone in it counted.
    pub(crate) fn adjust(&self, a: &mut pb::Attr) {
        let inner = lock(&self.inner);
        if let Some(d) = inner.dirs.get(&a.ino) {
            a.nlink += d.made.len() as u32;
            a.mtime_ns = a.mtime_ns.max(d.touched_ns);
            a.ctime_ns = a.ctime_ns.max(d.touched_ns);
        }
    }

    /// The tracker's inode for the kernel's `ino`, as far as known without
    /// waiting.
    pub(crate) fn mapped(&self, ino: u64) -> u64 {
        match lock(&self.inner).locals.get(&ino) {
            Some(Local::Flushed(real)) => *real,
            _ => ino,
        }
    }

    /// The tracker's inode for the kernel's `ino` (one of this mount's own
    /// numbers): flushes it first if it was made here alone.
    pub(crate) async fn resolve(&self, ino: u64) -> Result<u64, Errno> {
        for _ in 0..2 {
            let parent = match lock(&self.inner).locals.get(&ino) {
                Some(Local::Flushed(real)) => return Ok(*real),
                Some(Local::Lost) => return Err(Errno::EIO),
                None => return Err(Errno::ESTALE),
                Some(Local::Made { parent, .. }) => *parent,
            };
            self.settle(parent).await;
        }
        Err(Errno::EIO)
    }

    /// The kernel forgot `ino`.
    pub(crate) fn forget(&self, ino: u64) {
        let mut inner = lock(&self.inner);
        if matches!(
            inner.locals.get(&ino),
            Some(Local::Flushed(_) | Local::Lost)
        ) {
            inner.locals.remove(&ino);
        }
    }

    /// The leader recalls `inos` (an invalidation names them): nothing more
    /// is done in them alone. Returns those with something to flush.
    pub(crate) fn recalled(&self, inos: &[u64]) -> Vec<u64> {
        let mut inner = lock(&self.inner);
        let mut flush = Vec::new();
        for o in inos {
            let Some(d) = inner.dirs.get_mut(o) else {
                continue;
            };
            d.gone = true;
            if !d.made.is_empty() {
                flush.push(*o);
            } else if !d.timer {
                inner.dirs.remove(o);
            }
        }
        flush
    }

    /// The lease stream ended: every delegation is gone. Returns the
    /// directories with something to flush.
    pub(crate) fn stream_lost(&self) -> Vec<u64> {
        let all: Vec<u64> = lock(&self.inner).dirs.keys().copied().collect();
        self.recalled(&all)
    }

    async fn flush_later(self: Arc<Self>, dir: u64) {
        loop {
            tokio::time::sleep(FLUSH_AFTER).await;
            self.settle(dir).await;
            let mut inner = lock(&self.inner);
            let Some(d) = inner.dirs.get_mut(&dir) else {
                return;
            };
            if d.pending.is_empty() {
                d.timer = false;
                return;
            }
        }
    }

    /// Flushes everything made in `dir` here alone, and waits for a flush
    /// already under way: afterwards the tracker has all of it (or it is
    /// reported lost).
    pub(crate) async fn settle(&self, dir: u64) {
        let flush = {
            let inner = lock(&self.inner);
            match inner.dirs.get(&dir) {
                Some(d) if !d.made.is_empty() => d.flush.clone(),
                _ => return,
            }
        };
        let _one = flush.lock().await;
        let batch: Vec<(u64, Vec<u8>, pb::Attr)> = {
            let mut inner = lock(&self.inner);
            let Some(d) = inner.dirs.get_mut(&dir) else {
                return;
            };
            let pending = std::mem::take(&mut d.pending);
            let names: HashMap<u64, Vec<u8>> =
                d.made.iter().map(|(n, &i)| (i, n.clone())).collect();
            pending
                .into_iter()
                .filter_map(|ino| {
                    let name = names.get(&ino)?.clone();
                    match inner.locals.get(&ino) {
                        Some(Local::Made { attr, .. }) => Some((ino, name, *attr)),
                        _ => None,
                    }
                })
                .collect()
        };
        for (ino, name, attr) in batch {
            let op = Op::Mkdir(pb::Mkdir {
                parent: dir,
                name: name.clone(),
                mode: attr.mode,
                uid: attr.uid,
                gid: attr.gid,
            });
            let asking = Asking {
                delegate: 0,
                flush_of: dir,
            };
            let outcome = match self.client.mutate_behind(op, asking).await {
                Ok((command_result::Result::Attr(a), _)) => Local::Flushed(a.ino),
                Ok(_) => Local::Lost,
                Err(e) => {
                    tracing::warn!(
                        dir,
                        name = %String::from_utf8_lossy(&name),
                        error = %e,
                        "write-behind: a directory made here alone is lost"
                    );
                    Local::Lost
                }
            };
            let mut inner = lock(&self.inner);
            inner.locals.insert(ino, outcome);
            if let Some(d) = inner.dirs.get_mut(&dir) {
                if d.made.get(&name) == Some(&ino) {
                    d.made.remove(&name);
                }
            }
        }
        let mut inner = lock(&self.inner);
        if inner
            .dirs
            .get(&dir)
            .is_some_and(|d| d.gone && d.made.is_empty() && !d.timer)
        {
            inner.dirs.remove(&dir);
        }
    }

    /// [`WriteBehind::settle`] for every directory.
    pub(crate) async fn settle_all(&self) {
        let dirs: Vec<u64> = lock(&self.inner)
            .dirs
            .iter()
            .filter(|(_, d)| !d.made.is_empty())
            .map(|(&o, _)| o)
            .collect();
        for dir in dirs {
            self.settle(dir).await;
        }
    }
}
