//! Directory write-behind, the mount's side (`writebehind`; the design:
//! docs/write-behind.md).
//!
//! The tracker leader may delegate a directory this mount changes (a
//! `mkdir`, `rmdir`, `unlink` or `rename` in it asks) to this mount alone.
//! While it holds the delegation, and its leases last at least [`MARGIN`]
//! longer, those changes in the directory are made here only and
//! acknowledged at once:
//!
//! - `mkdir`, under an inode number from a range of this mount's own
//!   ([`LOCAL_BASE`]); a `rmdir` of a directory made so and not yet sent
//!   takes it back, so a lock directory's `mkdir`/`rmdir` pair (DokuWiki's
//!   `io_lock`, and the lock directories of many other tools) costs nothing;
//! - `unlink` of a file not open here;
//! - `rename` of a file within the directory, over nothing or over a file
//!   not open here.
//!
//! What this mount sees in the directory is the tracker's listing with
//! those changes laid over it. They are flushed to the leader in order,
//! marked as the delegate's (`MutateRequest.flush_of`), independent ones
//! together (the leader commits them in one group):
//!
//! - [`FLUSH_AFTER`] after each change was made (like a local file
//!   system's journal commit interval; a lock directory's `mkdir`/`rmdir`
//!   pair inside it never leaves), or earlier when the leases would run
//!   out with it unflushed;
//! - as soon as a full request's worth ([`FLUSH_MAX`]) waits;
//! - when the leader recalls the directory (another client is about to read
//!   or change it): the invalidation is acknowledged only after the flush;
//! - before any other operation in the directory or on a directory made
//!   here, before an `fsync` of the directory, and before any lock
//!   operation;
//! - when the lease stream ends, and at unmount.
//!
//! A close or fsync still commits the file's bytes before it returns; a
//! rename or unlink made here alone is as durable as one on a local file
//! system before the directory is synced. The leader refuses a flush from
//! a mount that no longer holds the delegation (its leases ran out while it
//! was frozen or cut off): what it did alone is then lost, and said so in
//! the log.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use failsafe_client::pb::{self, command::Op, command_result};
use failsafe_client::{Client, ClientError};

use crate::core::Core;
use fuser::Errno;

/// Inode numbers from here on are this mount's own (the tracker numbers
/// from 1 upwards).
pub(crate) const LOCAL_BASE: u64 = 1 << 62;
/// A change made here alone is flushed at the latest this long after
/// (ext4 commits its journal every 5 s).
pub(crate) const FLUSH_AFTER: Duration = Duration::from_secs(1);
/// Nothing is done alone unless the leases last at least this much longer:
/// time for the flush.
pub(crate) const MARGIN: Duration = Duration::from_millis(150);
/// Names a directory's `known` keeps at most (more, and it starts over).
const KNOWN_MAX: usize = 20_000;
/// Changes of one flush sent in one request, at most (the leader's
/// largest group of commands in one log entry).
const FLUSH_MAX: usize = 256;
/// Requests of one flush sent side by side, at most.
const WAVE: usize = 4;

pub(crate) struct WriteBehind {
    client: Client,
    inner: Mutex<Inner>,
    /// `Inner::kernel`'s length, read without the lock.
    kernel_known: AtomicUsize,
    /// Counts the changes of `Inner::kernel`: a listing whose numbers were
    /// mapped at one count holds the numbers the kernel knows while it lasts.
    kernel_gen: AtomicU64,
    /// Told when a file made here alone gets the tracker's inode.
    core: std::sync::OnceLock<Weak<Core>>,
}

/// How much of a directory's pending changes a flush takes.
enum Upto {
    All,
    /// Those made by then.
    Made(tokio::time::Instant),
    /// The first this many.
    Oldest(usize),
    /// Those up to the creation of this local file, which goes with these
    /// bytes.
    Create(u64, Option<pb::CommitExtents>),
}

#[derive(Default)]
struct Inner {
    dirs: BTreeMap<u64, Delegation>,
    /// Directories and files made here alone, by their local inode.
    locals: BTreeMap<u64, Local>,
    /// The local inode the kernel knows each flushed one by, until it
    /// forgets it.
    kernel: BTreeMap<u64, u64>,
    next: u64,
}

impl Inner {
    /// What became of the local inode `ino`.
    fn outcome(&mut self, ino: u64, l: Local) {
        if let Local::Flushed(real) = l {
            self.kernel.insert(real, ino);
        }
        self.locals.insert(ino, l);
    }
}

struct Delegation {
    /// The lease stream it was granted on.
    epoch: u64,
    /// Recalled, or the stream ended: nothing more is done here alone.
    gone: bool,
    /// Names as changed here alone and not flushed yet (or being flushed).
    names: BTreeMap<Vec<u8>, Name>,
    /// Changes not taken by a flush yet, in the order they were made.
    pending: Vec<Pending>,
    /// One flush at a time, in order.
    flush: Arc<tokio::sync::Mutex<()>>,
    /// A timer task will flush it.
    timer: bool,
    /// A task flushes full requests' worth of changes now (thousands of
    /// unlinks in a row: the flush keeps pace instead of waiting for the
    /// timer or the end).
    full: bool,
    /// The last change made here alone (the directory's mtime and ctime).
    touched_ns: i64,
    /// Directories made here alone and not flushed yet (its link count).
    made: u32,
    /// Names of the changes a flush under way sends.
    flushing: HashSet<Vec<u8>>,
    /// What this mount's flushed changes left names as, answered while the
    /// delegation holds (nobody else can change them meanwhile; a flush's
    /// read-back the leader could not grant leaves the lease cache without
    /// them). A change of one of them sent to the tracker forgets it.
    known: BTreeMap<Vec<u8>, Name>,
}

/// A name as changed here alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Name {
    /// A directory made here (its local inode).
    Made(u64),
    /// Now this inode of the tracker's (renamed to the name).
    Is(u64),
    /// Removed.
    Gone,
}

/// A change not flushed yet, and when it was made.
#[derive(Debug, Clone)]
struct Pending {
    change: Change,
    at: tokio::time::Instant,
}

#[derive(Debug, Clone)]
enum Change {
    Mkdir {
        name: Vec<u8>,
        ino: u64,
    },
    /// A file made here alone: sent with its bytes when it is first
    /// closed or synced, or empty when something else needs it first.
    Create {
        name: Vec<u8>,
        ino: u64,
    },
    /// Of the file `ino` (the flush removes the name only if it still
    /// names that file).
    Unlink {
        name: Vec<u8>,
        ino: u64,
    },
    /// Of the file `ino`, over the file `over` or over nothing (likewise
    /// checked when it is flushed).
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
        ino: u64,
        over: Option<u64>,
    },
}

impl Change {
    fn names(&self) -> Vec<&[u8]> {
        match self {
            Change::Mkdir { name, .. }
            | Change::Create { name, .. }
            | Change::Unlink { name, .. } => vec![name],
            Change::Rename { from, to, .. } => vec![from, to],
        }
    }
}

enum Local {
    /// A directory or file made here alone: flushed as `Mkdir` or `Create`
    /// under `parent`.
    Made { parent: u64, attr: pb::Attr },
    /// Flushed: the tracker's inode.
    Flushed(u64),
    /// The flush was refused: what was made here is gone.
    Lost,
}

/// What a change asked of [`WriteBehind`] did.
pub(crate) enum Done {
    /// Made here alone (acknowledge it).
    Here,
    /// It goes to the tracker (everything before it in the directory went
    /// first).
    Tracker,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WriteBehind {
    pub(crate) fn new(client: Client) -> Arc<WriteBehind> {
        Arc::new(WriteBehind {
            client,
            inner: Mutex::default(),
            kernel_known: AtomicUsize::new(0),
            kernel_gen: AtomicU64::new(0),
            core: std::sync::OnceLock::new(),
        })
    }

    /// The mount this serves, told when a file made here alone gets the
    /// tracker's inode (`Core::rekey`).
    pub(crate) fn set_core(&self, core: Weak<Core>) {
        let _ = self.core.set(core);
    }

    fn local_number(&self) -> u64 {
        let mut inner = lock(&self.inner);
        inner.next += 1;
        LOCAL_BASE + inner.next
    }

    /// Whether `d` may be changed here alone now.
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
            names: BTreeMap::new(),
            pending: Vec::new(),
            flush: Arc::default(),
            timer: false,
            full: false,
            touched_ns: 0,
            made: 0,
            flushing: HashSet::new(),
            known: BTreeMap::new(),
        });
        if d.epoch != epoch {
            d.known.clear();
        }
        d.epoch = epoch;
        d.gone = false;
    }

    /// `dir/name` as changed here alone, if it was.
    pub(crate) fn name(&self, dir: u64, name: &[u8]) -> Option<Name> {
        let inner = lock(&self.inner);
        let d = inner.dirs.get(&dir)?;
        if let Some(n) = d.names.get(name) {
            return Some(*n);
        }
        let known = d.known.get(name).copied()?;
        self.usable(d).then_some(known)
    }

    /// Whether `dir` may be changed here alone now (checked again when the
    /// change is recorded).
    fn may(&self, dir: u64) -> bool {
        lock(&self.inner)
            .dirs
            .get(&dir)
            .is_some_and(|d| self.usable(d))
    }

    /// Records `change` in `dir` and what it does to names (under the lock,
    /// with the delegation checked again: a recall may have come since the
    /// caller looked). False: it must go to the tracker.
    fn record(
        self: &Arc<Self>,
        dir: u64,
        change: Change,
        names: &[(&[u8], Name)],
        local: Option<(u64, Local)>,
    ) -> bool {
        let now = crate::core::now_ns();
        let mut inner = lock(&self.inner);
        let Some(d) = inner.dirs.get_mut(&dir) else {
            return false;
        };
        if !self.usable(d) {
            return false;
        }
        for (name, n) in names {
            d.known.remove(*name);
            d.names.insert(name.to_vec(), *n);
        }
        if matches!(change, Change::Mkdir { .. }) {
            d.made += 1;
        }
        d.pending.push(Pending {
            change,
            at: tokio::time::Instant::now(),
        });
        d.touched_ns = now;
        let start_timer = !std::mem::replace(&mut d.timer, true);
        let start_full = d.pending.len() >= FLUSH_MAX && !std::mem::replace(&mut d.full, true);
        if let Some((ino, l)) = local {
            inner.locals.insert(ino, l);
        }
        drop(inner);
        if start_timer {
            let me = self.clone();
            tokio::spawn(async move { me.flush_later(dir).await });
        }
        if start_full {
            let me = self.clone();
            tokio::spawn(async move { me.flush_full(dir).await });
        }
        true
    }

    /// `mkdir dir/name` here alone, if `dir` is delegated here: `None` when
    /// it must go to the tracker. `free`: the name is free at the tracker
    /// (nobody else can take it while the directory is delegated here).
    pub(crate) fn mkdir(
        self: &Arc<Self>,
        dir: u64,
        name: &[u8],
        free: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Option<Result<pb::Attr, Errno>> {
        if !self.may(dir) {
            return None;
        }
        match self.name(dir, name) {
            Some(Name::Made(_) | Name::Is(_)) => return Some(Err(Errno::EEXIST)),
            Some(Name::Gone) => {}
            None if !free => return Some(Err(Errno::EEXIST)),
            None => {}
        }
        let attr = self.made(pb::FileKind::KindDir, mode, uid, gid);
        let change = Change::Mkdir {
            name: name.to_vec(),
            ino: attr.ino,
        };
        self.record_made(dir, name, change, attr)
            .then_some(Ok(attr))
    }

    /// The attributes of a new inode made here alone (a number of this
    /// mount's own).
    fn made(&self, kind: pb::FileKind, mode: u32, uid: u32, gid: u32) -> pb::Attr {
        let now = crate::core::now_ns();
        pb::Attr {
            ino: self.local_number(),
            kind: kind as i32,
            mode: mode & 0o7777,
            uid,
            gid,
            nlink: if kind == pb::FileKind::KindDir { 2 } else { 1 },
            size: 0,
            atime_ns: now,
            mtime_ns: now,
            ctime_ns: now,
            ..Default::default()
        }
    }

    /// Records `change`, which made `attr`'s inode as `dir/name`.
    fn record_made(
        self: &Arc<Self>,
        dir: u64,
        name: &[u8],
        change: Change,
        attr: pb::Attr,
    ) -> bool {
        let made = Local::Made { parent: dir, attr };
        self.record(
            dir,
            change,
            &[(name, Name::Made(attr.ino))],
            Some((attr.ino, made)),
        )
    }

    /// `create dir/name` of a new file here alone (the caller knows the
    /// name is free): its attributes, or `None` when it must go to the
    /// tracker.
    pub(crate) fn create(
        self: &Arc<Self>,
        dir: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Option<pb::Attr> {
        if !self.may(dir) {
            return None;
        }
        let attr = self.made(pb::FileKind::KindFile, mode, uid, gid);
        let change = Change::Create {
            name: name.to_vec(),
            ino: attr.ino,
        };
        self.record_made(dir, name, change, attr).then_some(attr)
    }

    /// Whether the creation of the file `ino` made here alone still waits
    /// to be sent (then [`WriteBehind::create_flushed`] can carry its bytes).
    pub(crate) fn creation_pending(&self, ino: u64) -> bool {
        let inner = lock(&self.inner);
        let Some(Local::Made { parent, .. }) = inner.locals.get(&ino) else {
            return false;
        };
        inner.dirs.get(parent).is_some_and(|d| {
            d.pending
                .iter()
                .any(|p| matches!(p.change, Change::Create { ino: i, .. } if i == ino))
        })
    }

    /// The file `ino` made here alone is being closed or synced: creates
    /// it with `content` (its bytes from the start; `None`: empty) in one
    /// flush of its directory, after every change made there before it and
    /// in the same request, so a page's temp file goes with the rename of
    /// the one before. `None`: its creation is not pending (a flush took it
    /// already: store its bytes the usual way).
    pub(crate) async fn create_flushed(
        &self,
        ino: u64,
        content: Option<pb::CommitExtents>,
    ) -> Option<Result<pb::Attr, ClientError>> {
        let dir = match lock(&self.inner).locals.get(&ino) {
            Some(Local::Made { parent, .. }) => *parent,
            _ => return None,
        };
        self.flush(dir, Upto::Create(ino, content)).await
    }

    /// `rmdir dir/name`: taken back here if it was made here alone and not
    /// sent yet (it is empty: anything done inside it flushes it first).
    pub(crate) async fn rmdir(&self, dir: u64, name: &[u8]) -> Done {
        {
            let mut inner = lock(&self.inner);
            let Some(d) = inner.dirs.get_mut(&dir) else {
                return Done::Tracker;
            };
            if let Some(Name::Made(ino)) = d.names.get(name).copied() {
                let at = d
                    .pending
                    .iter()
                    .position(|p| matches!(p.change, Change::Mkdir { ino: i, .. } if i == ino));
                if let Some(at) = at {
                    d.pending.remove(at);
                    // It was free when made: it is again (until the next
                    // flush confirms the tracker has it so).
                    d.names.insert(name.to_vec(), Name::Gone);
                    d.made = d.made.saturating_sub(1);
                    d.touched_ns = crate::core::now_ns();
                    inner.locals.remove(&ino);
                    return Done::Here;
                }
            }
        }
        self.settle_for(dir, &[name]).await;
        Done::Tracker
    }

    /// `unlink dir/name` of a file (inode `ino`, not open here) here alone.
    pub(crate) fn unlink(self: &Arc<Self>, dir: u64, name: &[u8], ino: u64) -> Done {
        let change = Change::Unlink {
            name: name.to_vec(),
            ino,
        };
        if self.record(dir, change, &[(name, Name::Gone)], None) {
            Done::Here
        } else {
            Done::Tracker
        }
    }

    /// `rename dir/from dir/to` of a file (inode `ino`) over nothing or
    /// over a file not open here, here alone.
    pub(crate) fn rename(
        self: &Arc<Self>,
        dir: u64,
        from: &[u8],
        to: &[u8],
        ino: u64,
        over: Option<u64>,
    ) -> Done {
        let change = Change::Rename {
            from: from.to_vec(),
            to: to.to_vec(),
            ino,
            over,
        };
        let names = [(from, Name::Gone), (to, Name::Is(ino))];
        if self.record(dir, change, &names, None) {
            Done::Here
        } else {
            Done::Tracker
        }
    }

    /// Whether `dir` may be changed here alone now.
    pub(crate) fn delegated(&self, dir: u64) -> bool {
        self.may(dir)
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
            a.nlink += d.made;
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
        match inner.locals.get(&ino) {
            Some(Local::Flushed(real)) => {
                let real = *real;
                if inner.kernel.get(&real) == Some(&ino) {
                    inner.kernel.remove(&real);
                    self.kernel_changed(&inner);
                }
                inner.locals.remove(&ino);
            }
            Some(Local::Lost) => {
                inner.locals.remove(&ino);
            }
            _ => {}
        }
    }

    /// Called under the lock after `Inner::kernel` may have changed.
    fn kernel_changed(&self, inner: &Inner) {
        self.kernel_known
            .store(inner.kernel.len(), Ordering::Relaxed);
        self.kernel_gen.fetch_add(1, Ordering::Release);
    }

    /// How many times the numbers the kernel knows flushed inodes by have
    /// changed: [`WriteBehind::kernel_ino`] answers alike while it stays.
    pub(crate) fn kernel_gen(&self) -> u64 {
        self.kernel_gen.load(Ordering::Acquire)
    }

    /// The kernel's number for the tracker's inode `real`: the local one it
    /// knows it by, while it does (a new number for a name it holds would
    /// make it drop the name, and with it the working directory of any
    /// process inside a directory made here).
    pub(crate) fn kernel_ino(&self, real: u64) -> Option<u64> {
        if self.kernel_known.load(Ordering::Relaxed) == 0 {
            return None;
        }
        lock(&self.inner).kernel.get(&real).copied()
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
            d.known.clear();
            if !d.names.is_empty() {
                flush.push(*o);
            } else if !d.timer && !d.full {
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

    /// Flushes `dir`'s oldest changes a full request at a time while at
    /// least that many wait.
    async fn flush_full(self: Arc<Self>, dir: u64) {
        loop {
            self.flush(dir, Upto::Oldest(FLUSH_MAX)).await;
            let mut inner = lock(&self.inner);
            let Some(d) = inner.dirs.get_mut(&dir) else {
                return;
            };
            if d.pending.len() < FLUSH_MAX {
                d.full = false;
                return;
            }
        }
    }

    /// Flushes `dir`'s changes as they come due (see [`WriteBehind::due`])
    /// until none is left.
    async fn flush_later(self: Arc<Self>, dir: u64) {
        loop {
            let (due, low) = {
                let mut inner = lock(&self.inner);
                let Some(d) = inner.dirs.get_mut(&dir) else {
                    return;
                };
                match self.due(d) {
                    Some(due) => due,
                    None => {
                        d.timer = false;
                        return;
                    }
                }
            };
            let now = tokio::time::Instant::now();
            if due > now {
                tokio::time::sleep_until(due).await;
                continue;
            }
            // The changes made FLUSH_AFTER ago or earlier; every one when
            // the leases run low.
            let upto = match now.checked_sub(FLUSH_AFTER).filter(|_| !low) {
                Some(t) => Upto::Made(t),
                None => Upto::All,
            };
            self.flush(dir, upto).await;
        }
    }

    /// When `d`'s oldest change not flushed yet is due: [`FLUSH_AFTER`]
    /// after it was made, or earlier when the leases would otherwise run
    /// out with it unflushed (then also "low": flush every change).
    /// `None`: nothing is pending.
    fn due(&self, d: &Delegation) -> Option<(tokio::time::Instant, bool)> {
        let oldest = d.pending.first()?.at;
        let now = tokio::time::Instant::now();
        let left = match self.client.lease_now() {
            Some((epoch, left)) if epoch == d.epoch && !d.gone => left,
            _ => Duration::ZERO,
        };
        let by_lease = now + left.saturating_sub(MARGIN);
        let by_age = oldest + FLUSH_AFTER;
        Some((by_age.min(by_lease), by_lease <= by_age && left < MARGIN))
    }

    /// Flushes everything done in `dir` here alone, and waits for a flush
    /// already under way: afterwards the tracker has all of it (or it is
    /// reported lost).
    pub(crate) async fn settle(&self, dir: u64) {
        self.flush(dir, Upto::All).await;
    }

    /// Flushes the changes made in `dir` here alone `upto` where it says,
    /// in order, after a flush already under way. For [`Upto::Create`],
    /// the file's attributes or why it could not be created (`None`: its
    /// creation was not pending).
    async fn flush(&self, dir: u64, upto: Upto) -> Option<Result<pb::Attr, ClientError>> {
        let flush = {
            let inner = lock(&self.inner);
            match inner.dirs.get(&dir) {
                Some(d) if !d.names.is_empty() => d.flush.clone(),
                _ => return None,
            }
        };
        let _one = flush.lock().await;
        let (batch, content) = {
            let mut inner = lock(&self.inner);
            let d = inner.dirs.get_mut(&dir)?;
            let (upto, content) = match upto {
                Upto::All => (d.pending.len(), None),
                Upto::Made(t) => (d.pending.partition_point(|p| p.at <= t), None),
                Upto::Oldest(n) => (n.min(d.pending.len()), None),
                Upto::Create(ino, content) => {
                    let at = d.pending.iter().position(
                        |p| matches!(p.change, Change::Create { ino: i, .. } if i == ino),
                    )?;
                    (at + 1, Some((ino, content)))
                }
            };
            let batch: Vec<Change> = d.pending.drain(..upto).map(|p| p.change).collect();
            d.flushing = batch
                .iter()
                .flat_map(|c| c.names().into_iter().map(<[u8]>::to_vec))
                .collect();
            (batch, content)
        };
        // In order, in requests of at most FLUSH_MAX changes (each one log
        // entry at the leader); a file created with its bytes is the last.
        // Requests whose changes touch different names go side by side, up
        // to WAVE at a time (their order does not matter); one touching a
        // name of its wave waits for it.
        let mut waves: Vec<Vec<&[Change]>> = Vec::new();
        let mut seen: HashSet<&[u8]> = HashSet::new();
        for chunk in batch.chunks(FLUSH_MAX) {
            let names: Vec<&[u8]> = chunk.iter().flat_map(Change::names).collect();
            let full = waves.last().is_none_or(|w| w.len() >= WAVE);
            if full || names.iter().any(|n| seen.contains(n)) {
                waves.push(Vec::new());
                seen.clear();
            }
            seen.extend(names);
            if let Some(w) = waves.last_mut() {
                w.push(chunk);
            }
        }
        let mut all_applied = true;
        let mut created = None;
        let mut content = content;
        for wave in waves {
            let sends = wave.into_iter().map(|chunk| {
                let mine = chunk.iter().any(|c| {
                    matches!(c, Change::Create { ino, .. }
                        if content.as_ref().is_some_and(|(i, _)| i == ino))
                });
                let mine = if mine { content.take() } else { None };
                self.send(dir, chunk, mine)
            });
            for (applied, made) in futures::future::join_all(sends).await {
                all_applied &= applied;
                created = created.or(made);
            }
        }
        let mut inner = lock(&self.inner);
        let Inner { dirs, locals, .. } = &mut *inner;
        let d = dirs.get_mut(&dir)?;
        d.flushing.clear();
        // The tracker (and this mount's lease cache, from the flush's
        // read-back) now has what the flushed changes did to these names,
        // unless a change made since touches them again.
        let later: HashSet<Vec<u8>> = d
            .pending
            .iter()
            .flat_map(|p| p.change.names().into_iter().map(<[u8]>::to_vec))
            .collect();
        // (Every change before them is flushed: this holds the flush lock.)
        let mut done = Vec::new();
        d.names.retain(|n, v| {
            let keep = later.contains(n);
            if !keep {
                done.push((n.clone(), *v));
            }
            keep
        });
        if d.gone || !all_applied || d.known.len() + done.len() > KNOWN_MAX {
            d.known.clear();
        } else {
            for (n, v) in done {
                let v = match v {
                    Name::Made(l) => match locals.get(&l) {
                        Some(Local::Flushed(real)) => Name::Is(*real),
                        _ => continue,
                    },
                    v => v,
                };
                d.known.insert(n, v);
            }
        }
        let flushed = batch
            .iter()
            .filter(|c| matches!(c, Change::Mkdir { .. }))
            .count() as u32;
        d.made = d.made.saturating_sub(flushed);
        if d.gone && d.names.is_empty() && !d.timer && !d.full {
            dirs.remove(&dir);
        }
        created
    }

    /// Sends `changes` of `dir`'s flush in one request; whether all
    /// applied. The creation of `content`'s file, if among them, goes with
    /// its bytes: then also its outcome.
    async fn send(
        &self,
        dir: u64,
        changes: &[Change],
        mut content: Option<(u64, Option<pb::CommitExtents>)>,
    ) -> (bool, Option<Result<pb::Attr, ClientError>>) {
        let mut sent = Vec::with_capacity(changes.len());
        let mut ops = Vec::with_capacity(changes.len());
        let mut with_bytes = None;
        for c in changes {
            if let Some(mut op) = self.op_of(dir, c) {
                if let (Op::Create(x), Change::Create { ino, .. }) = (&mut op, c) {
                    if content.as_ref().is_some_and(|(i, _)| i == ino) {
                        x.content = content.take().and_then(|(_, bytes)| bytes);
                        with_bytes = Some(*ino);
                    }
                }
                sent.push(c);
                ops.push(op);
            }
        }
        let mut all_applied = sent.len() == changes.len();
        if ops.is_empty() {
            return (all_applied, None);
        }
        let results = match self.client.flush_behind(ops, dir).await {
            Err(e) => {
                let e = e.to_string();
                sent.iter()
                    .map(|_| Err(ClientError::Unavailable(e.clone())))
                    .collect()
            }
            Ok(results) => results,
        };
        let mut created = None;
        for (c, outcome) in sent.into_iter().zip(results) {
            if matches!(c, Change::Create { ino, .. } if Some(*ino) == with_bytes) {
                created = Some(match &outcome {
                    Ok(command_result::Result::Attr(a)) => Ok(*a),
                    Ok(_) => Err(ClientError::Unavailable(
                        "unexpected reply to a create".into(),
                    )),
                    Err(e) => Err(ClientError::Unavailable(e.to_string())),
                });
            }
            all_applied &= self.outcome(dir, c, outcome);
        }
        (all_applied, created)
    }

    /// The command that sends `c` (`None`: what it made is gone here).
    fn op_of(&self, dir: u64, c: &Change) -> Option<Op> {
        let made_attr = |ino: &u64| match lock(&self.inner).locals.get(ino) {
            Some(Local::Made { attr, .. }) => Some(*attr),
            _ => None,
        };
        Some(match c {
            Change::Mkdir { name, ino } => {
                let attr = made_attr(ino)?;
                Op::Mkdir(pb::Mkdir {
                    parent: dir,
                    name: name.clone(),
                    mode: attr.mode,
                    uid: attr.uid,
                    gid: attr.gid,
                })
            }
            Change::Create { name, ino } => {
                let attr = made_attr(ino)?;
                Op::Create(pb::Create {
                    parent: dir,
                    name: name.clone(),
                    mode: attr.mode,
                    uid: attr.uid,
                    gid: attr.gid,
                    exclusive: true,
                    ..Default::default()
                })
            }
            Change::Unlink { name, ino } => Op::Unlink(pb::Unlink {
                parent: dir,
                name: name.clone(),
                expect: *ino,
            }),
            Change::Rename {
                from,
                to,
                ino,
                over,
            } => Op::Rename(pb::Rename {
                parent: dir,
                name: from.clone(),
                new_parent: dir,
                new_name: to.clone(),
                no_replace: over.is_none(),
                exchange: false,
                expect: *ino,
                expect_over: over.unwrap_or(0),
            }),
        })
    }

    /// What became of the flushed change `c`; whether it applied.
    fn outcome(
        &self,
        dir: u64,
        c: &Change,
        outcome: Result<command_result::Result, ClientError>,
    ) -> bool {
        if let Err(e) = &outcome {
            tracing::warn!(
                dir,
                change = ?c,
                error = %e,
                "write-behind: a change made here alone is lost"
            );
        }
        let applied = outcome.is_ok();
        if let Change::Mkdir { ino, .. } | Change::Create { ino, .. } = c {
            let l = match outcome {
                Ok(command_result::Result::Attr(a)) => {
                    if matches!(c, Change::Create { .. }) {
                        // Open here: its state follows it to its inode.
                        if let Some(core) = self.core.get().and_then(Weak::upgrade) {
                            core.rekey(*ino, &a);
                        }
                    }
                    Local::Flushed(a.ino)
                }
                _ => Local::Lost,
            };
            let mut inner = lock(&self.inner);
            inner.outcome(*ino, l);
            self.kernel_changed(&inner);
        }
        applied
    }

    /// Before a change of `names` in `dir` goes to the tracker: flushes
    /// `dir` if something done here alone touched one of them. (Changes of
    /// other names may stay behind: nobody else reads the directory before
    /// it is recalled, which flushes them.)
    pub(crate) async fn settle_for(&self, dir: u64, names: &[&[u8]]) {
        let touched = lock(&self.inner)
            .dirs
            .get(&dir)
            .is_some_and(|d| names.iter().any(|n| d.names.contains_key(*n)));
        if touched {
            self.settle(dir).await;
        }
        // The change about to go to the tracker makes what is known of
        // these names stale (forgotten after the flush, which adds to it).
        if let Some(d) = lock(&self.inner).dirs.get_mut(&dir) {
            for n in names {
                d.known.remove(*n);
            }
        }
    }

    /// [`WriteBehind::settle`] for every directory.
    pub(crate) async fn settle_all(&self) {
        let dirs: Vec<u64> = lock(&self.inner)
            .dirs
            .iter()
            .filter(|(_, d)| !d.names.is_empty())
            .map(|(&o, _)| o)
            .collect();
        for dir in dirs {
            self.settle(dir).await;
        }
    }
}
