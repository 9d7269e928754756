//! The FUSE callbacks: each moves its request into a task on the runtime
//! and replies from there, so no callback blocks the FUSE loop. Writes are
//! buffered right here, in the order the kernel sent them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::core::{system_time_ns, Core, DirCache, SetTime};
use crate::snapview;
use crate::stats::{FuseOp, MountStats};
use failsafe_client::pb::{self, FileKind};

/// What the kernel may keep of the answers to changes we make that the
/// lease cache does not hold (setattr, rename's attributes): nothing, so
/// every later lookup and stat asks us. Lookups and stats answered under a
/// lease may be kept for the rest of the lease (`Core::lookup`,
/// `Core::getattr`), and so may a name this mount just made while the
/// leader's read-back of it is cached (`Core::entry_ttl`), because a change
/// elsewhere tells the kernel to drop them (`main.rs`, the notifier thread)
/// before it completes.
const TTL: Duration = Duration::ZERO;

pub(crate) struct Fs {
    pub core: Arc<Core>,
    pub rt: tokio::runtime::Handle,
    pub stats: Arc<MountStats>,
    /// Whether this mount holds leases (readdirplus only then).
    pub leases: bool,
}

impl Fs {
    /// Runs one FUSE request, counting the RPCs and round trips it waits
    /// for as `op`. It is polled once right here, on the FUSE thread: an
    /// answer from memory (a leased lookup, stat or open, a close with
    /// nothing to write) replies at once, without waking a runtime thread
    /// (on two cores that hand-off costs more than the answer). Whatever
    /// has to wait becomes a task that replies when done, so no callback
    /// blocks the FUSE loop.
    fn run<F>(&self, op: FuseOp, f: impl FnOnce(Arc<Core>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Boxed first: a request's future is kilobytes (the RPC it may make
        // is in it), and moving it by value into the task and the box below
        // was a tenth of the mount's time on lookups answered from memory.
        let request = Box::pin(f(self.core.clone()));
        let stats = self.stats.clone();
        let started = Instant::now();
        let mut task = Box::pin(async move {
            let ((), cost) = failsafe_client::measure(request).await;
            stats.record(op, cost, started.elapsed());
        });
        let _runtime = self.rt.enter();
        // The spawned task is polled again with its own waker, so this
        // first poll's waker need not wake anything.
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        if std::future::Future::poll(task.as_mut(), &mut cx).is_pending() {
            self.rt.spawn(task);
        }
    }

    /// Runs one FUSE request as a task from the start: for requests that
    /// may read local files (block cache) before their first wait.
    fn spawn<F>(&self, op: FuseOp, f: impl FnOnce(Arc<Core>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let request = Box::pin(f(self.core.clone()));
        let stats = self.stats.clone();
        self.rt.spawn(async move {
            let started = Instant::now();
            let ((), cost) = failsafe_client::measure(request).await;
            stats.record(op, cost, started.elapsed());
        });
    }
}

/// Attributes for a `.` or `..` entry of readdirplus, of which the kernel
/// uses only the inode and kind (or, with inode 0, a negative entry).
fn dot_attr(ino: u64, kind: fuser::FileType) -> fuser::FileAttr {
    fuser::FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::SpecificTime(t) => SetTime::At(system_time_ns(t)),
        TimeOrNow::Now => SetTime::Now,
    }
}

/// How the kernel is to write through a handle opened with `flags`. An
/// O_APPEND write() must land whole, as one append, whatever another host
/// appends: through the page cache the kernel cuts a write that crosses
/// into a page it does not hold into two requests, and a flush from another
/// handle of the file here may store the first half before the second
/// comes. Direct I/O sends each write() as one request (up to `max_write`,
/// 1 MiB), so the mount buffers and commits it in one piece.
fn append_io(flags: i32) -> FopenFlags {
    let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
    if writes && flags & libc::O_APPEND != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// Whether `parent/name` is in the snapshot view: `.snapshots` in the
/// root, or anything beneath it.
fn in_view(parent: u64, name: &OsStr) -> bool {
    snapview::owns(parent) || (parent == INodeNo::ROOT.0 && name.as_bytes() == snapview::NAME)
}

/// A change of `parent/name` the snapshot view refuses: anything in it
/// (read-only), and `.snapshots` itself with `taken` (EEXIST to make it,
/// EBUSY to take it away).
fn view_refuses(parent: u64, name: &OsStr, taken: Errno) -> Option<Errno> {
    if snapview::owns(parent) {
        Some(Errno::EROFS)
    } else if in_view(parent, name) {
        Some(taken)
    } else {
        None
    }
}

/// How long a blocking lock request waits between attempts, at most.
const LOCK_POLL_MAX: Duration = Duration::from_millis(500);

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Locks go to the cluster so they hold across web hosts; without
        // these the kernel would keep them on this host only.
        let want = InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS;
        // An O_TRUNC open of an existing file comes to `open` with the flag,
        // instead of a separate truncation first: the mount commits the
        // truncation with the file's new bytes (`Core::truncate_at_open`).
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC) {
            tracing::info!(?missing, "kernel lacks atomic O_TRUNC opens");
        }
        if let Err(missing) = config.add_capabilities(want) {
            tracing::warn!(
                ?missing,
                "kernel lacks lock capabilities; locks stay local to this host"
            );
        }
        // Lookups and readdirs in one directory run side by side (the kernel
        // still serialises changes to it): PHP workers looking up pages in
        // the same namespace do not queue behind each other's round trips.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::info!(?missing, "kernel lacks parallel directory operations");
        }
        // Listings carry every entry's attributes, from memory while the
        // directory is leased: `ls -l` and PHP's stat-after-scandir make no
        // lookup each. Not without leases, where each would cost a trip.
        if self.leases {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS) {
                tracing::info!(?missing, "kernel lacks readdirplus");
            }
        }
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // No entry can have such a name; the kernel leaves NAME_MAX to us.
        if name.len() > failsafe_core::MAX_NAME_BYTES {
            self.stats.local(FuseOp::Lookup);
            return reply.error(Errno::ENAMETOOLONG);
        }
        let name = name.to_owned();
        if in_view(parent.0, &name) {
            return self.run(FuseOp::Lookup, move |c| async move {
                match c.snap_lookup(parent.0, &name).await {
                    Ok(a) => reply.entry(&Core::snap_ttl(parent.0), &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            });
        }
        self.run(FuseOp::Lookup, move |c| async move {
            match c.lookup(parent.0, &name).await {
                Ok((Some(a), ttl)) => reply.entry(&ttl, &a, Generation(0)),
                // A leased absence: inode 0 makes the kernel keep a negative
                // entry for the rest of the lease (a change to the
                // directory tells it otherwise), so PHP's file_exists of
                // missing files asks nobody.
                Ok((None, ttl)) if !ttl.is_zero() => reply.entry(
                    &ttl,
                    &dot_attr(0, fuser::FileType::RegularFile),
                    Generation(0),
                ),
                Ok((None, _)) => reply.error(Errno::ENOENT),
                Err(e) => reply.error(e),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if snapview::owns(ino.0) {
            return self.run(FuseOp::Getattr, move |c| async move {
                match c.snap_getattr(ino.0).await {
                    Ok(a) => reply.attr(&Core::snap_ttl(ino.0), &a),
                    Err(e) => reply.error(e),
                }
            });
        }
        self.run(FuseOp::Getattr, move |c| async move {
            match c.getattr(ino.0).await {
                Ok((a, ttl)) => reply.attr(&ttl, &a),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Setattr);
            return reply.error(Errno::EROFS);
        }
        self.run(FuseOp::Setattr, move |c| async move {
            let r = c
                .setattr(
                    ino.0,
                    mode,
                    uid,
                    gid,
                    size,
                    atime.map(set_time),
                    mtime.map(set_time),
                )
                .await;
            match r {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if snapview::owns(ino.0) {
            return self.run(FuseOp::Readlink, move |c| async move {
                match c.snap_readlink(ino.0).await {
                    Ok(t) => reply.data(&t),
                    Err(e) => reply.error(e),
                }
            });
        }
        self.run(FuseOp::Readlink, move |c| async move {
            match c.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        if let Some(e) = view_refuses(parent.0, name, Errno::EEXIST) {
            self.stats.local(FuseOp::Mknod);
            return reply.error(e);
        }
        let special = match mode & libc::S_IFMT {
            libc::S_IFREG => None,
            libc::S_IFIFO => Some(FileKind::KindFifo),
            libc::S_IFSOCK => Some(FileKind::KindSocket),
            libc::S_IFCHR => Some(FileKind::KindCharDevice),
            libc::S_IFBLK => Some(FileKind::KindBlockDevice),
            _ => {
                self.stats.local(FuseOp::Mknod);
                return reply.error(Errno::EINVAL);
            }
        };
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        if let Some(kind) = special {
            let mode = mode & !umask & 0o7777;
            return self.run(FuseOp::Mknod, move |c| async move {
                match c.mknod(parent.0, &name, kind, mode, rdev, uid, gid).await {
                    Ok(a) => reply.entry(&c.entry_ttl(parent.0, &name), &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            });
        }
        self.run(FuseOp::Mknod, move |c| async move {
            match c
                .create(
                    parent.0,
                    &name,
                    mode & !umask & 0o7777,
                    libc::O_EXCL,
                    uid,
                    gid,
                )
                .await
            {
                Ok((a, fh)) => {
                    let _ = c.release(fh, None).await;
                    reply.entry(&c.entry_ttl(parent.0, &name), &a, Generation(0))
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        if let Some(e) = view_refuses(parent.0, name, Errno::EEXIST) {
            self.stats.local(FuseOp::Mkdir);
            return reply.error(e);
        }
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.run(FuseOp::Mkdir, move |c| async move {
            match c
                .mkdir(parent.0, &name, mode & !umask & 0o7777, uid, gid)
                .await
            {
                Ok(a) => reply.entry(&c.entry_ttl(parent.0, &name), &a, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Some(e) = view_refuses(parent.0, name, Errno::EBUSY) {
            self.stats.local(FuseOp::Unlink);
            return reply.error(e);
        }
        let name = name.to_owned();
        self.run(FuseOp::Unlink, move |c| async move {
            match c.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Some(e) = view_refuses(parent.0, name, Errno::EBUSY) {
            self.stats.local(FuseOp::Rmdir);
            return reply.error(e);
        }
        let name = name.to_owned();
        self.run(FuseOp::Rmdir, move |c| async move {
            match c.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        if let Some(e) = view_refuses(parent.0, link_name, Errno::EEXIST) {
            self.stats.local(FuseOp::Symlink);
            return reply.error(e);
        }
        use std::os::unix::ffi::OsStrExt;
        let (name, target, uid, gid) = (
            link_name.to_owned(),
            target.as_os_str().as_bytes().to_vec(),
            req.uid(),
            req.gid(),
        );
        self.run(FuseOp::Symlink, move |c| async move {
            match c.symlink(parent.0, &name, &target, uid, gid).await {
                Ok(a) => reply.entry(&c.entry_ttl(parent.0, &name), &a, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if let Some(e) = view_refuses(parent.0, name, Errno::EBUSY)
            .or_else(|| view_refuses(newparent.0, newname, Errno::EBUSY))
        {
            self.stats.local(FuseOp::Rename);
            return reply.error(e);
        }
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            self.stats.local(FuseOp::Rename);
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.run(FuseOp::Rename, move |c| async move {
            match c
                .rename(parent.0, &name, newparent.0, &newname, no_replace, exchange)
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Link);
            return reply.error(Errno::EROFS);
        }
        if let Some(e) = view_refuses(newparent.0, newname, Errno::EEXIST) {
            self.stats.local(FuseOp::Link);
            return reply.error(e);
        }
        let newname = newname.to_owned();
        self.run(FuseOp::Link, move |c| async move {
            match c.link(ino.0, newparent.0, &newname).await {
                Ok(a) => reply.entry(&c.entry_ttl(newparent.0, &newname), &a, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if snapview::owns(ino.0) {
            return self.run(FuseOp::Open, move |c| async move {
                match c.snap_open(ino.0, flags.0).await {
                    // A snapshot never changes: the kernel keeps what it read.
                    Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                    Err(e) => reply.error(e),
                }
            });
        }
        let pid = req.pid();
        self.run(FuseOp::Open, move |c| async move {
            match c.open(ino.0, flags.0, pid).await {
                Ok(o) => {
                    let mut f = append_io(flags.0);
                    if o.keep {
                        f |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    if o.noflush {
                        f |= FopenFlags::FOPEN_NOFLUSH;
                    }
                    reply.opened(FileHandle(o.fh), f)
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if let Some(e) = view_refuses(parent.0, name, Errno::EEXIST) {
            self.stats.local(FuseOp::Create);
            return reply.error(e);
        }
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.run(FuseOp::Create, move |c| async move {
            match c
                .create(parent.0, &name, mode & !umask & 0o7777, flags, uid, gid)
                .await
            {
                Ok((a, fh)) => reply.created(
                    &c.entry_ttl(parent.0, &name),
                    &a,
                    Generation(0),
                    FileHandle(fh),
                    append_io(flags),
                ),
                Err(e) => reply.error(e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if snapview::owns(ino.0) {
            return self.spawn(FuseOp::Read, move |c| async move {
                match c.snap_read(fh.0, offset, size).await {
                    Ok(d) => reply.data(&d),
                    Err(e) => reply.error(e),
                }
            });
        }
        self.spawn(FuseOp::Read, move |c| async move {
            match c.read(fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let n = data.len() as u32;
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| self.core.mode_after_unprivileged_write(fh.0))
            .flatten();
        if let Some(mode) = kill {
            // A direct I/O write (an O_APPEND handle's) by a caller without
            // CAP_FSETID: the set-id bits go before its bytes are taken, as
            // the kernel does for writes through its cache.
            let data = data.to_vec();
            self.run(FuseOp::Write, move |c| async move {
                let cleared = c.setattr(ino.0, Some(mode), None, None, None, None, None);
                if let Err(e) = cleared.await {
                    return reply.error(e);
                }
                match c.buffer_write(fh.0, offset, &data) {
                    Ok(_) => reply.written(n),
                    Err(e) => reply.error(e),
                }
            });
            return;
        }
        if let Some(ino) = self.core.must_wait(fh.0) {
            // Backpressure: this write waits for an upload before its bytes
            // are buffered, and the upload's failure is its error (its
            // bytes not taken). The kernel sends a file's next write only
            // after this one's answer, so the order holds.
            let data = data.to_vec();
            self.run(FuseOp::Write, move |c| async move {
                if let Err(e) = c.upload_for_write(ino).await {
                    tracing::warn!(ino, error = ?e, "a write waited for an upload that failed");
                    return reply.error(e);
                }
                match c.buffer_write(fh.0, offset, &data) {
                    Ok(_) => reply.written(n),
                    Err(e) => reply.error(e),
                }
            });
            return;
        }
        // Buffered synchronously, so writes keep the kernel's order.
        match self.core.buffer_write(fh.0, offset, data) {
            Err(e) => {
                self.stats.local(FuseOp::Write);
                reply.error(e)
            }
            Ok((ino, start_upload)) => {
                self.stats.local(FuseOp::Write);
                reply.written(n);
                if start_upload {
                    // Nobody waits for it: its RPCs count as background.
                    let c = self.core.clone();
                    self.rt.spawn(async move { c.background_upload(ino).await });
                }
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Flush);
            return reply.ok();
        }
        self.run(FuseOp::Flush, move |c| async move {
            let r = c.flush_fh(fh.0).await;
            // close() drops the POSIX locks its process holds on the file.
            c.unlock_owner(c.t(ino.0), lock_owner.0).await;
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Release);
            self.core.snap_release(fh.0);
            return reply.ok();
        }
        self.run(FuseOp::Release, move |c| async move {
            match c.release(fh.0, lock_owner.map(|o| o.0)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Fsync);
            return reply.ok();
        }
        self.run(FuseOp::Fsync, move |c| async move {
            match c.flush_fh(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if snapview::owns(ino.0) {
            return self.run(FuseOp::Opendir, move |c| async move {
                match c.snap_opendir(ino.0).await {
                    Ok(fh) if ino.0 == snapview::SNAPSHOTS_DIR => {
                        reply.opened(FileHandle(fh), FopenFlags::empty())
                    }
                    Ok(fh) => reply.opened(
                        FileHandle(fh),
                        FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                    ),
                    Err(e) => reply.error(e),
                }
            });
        }
        self.run(FuseOp::Opendir, move |c| async move {
            match c.opendir(ino.0).await {
                Ok((fh, cache)) => {
                    let flags = match cache {
                        DirCache::Off => FopenFlags::empty(),
                        DirCache::Fill => FopenFlags::FOPEN_CACHE_DIR,
                        DirCache::Keep => {
                            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                        }
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.stats.local(FuseOp::Readdir);
        if let Some(entries) = self.core.snap_entries(fh.0) {
            for (i, (ino, kind, name, _)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(
                    INodeNo(*ino),
                    (i + 1) as u64,
                    *kind,
                    OsStr::from_bytes(name),
                ) {
                    break;
                }
            }
            return reply.ok();
        }
        let Some(entries) = self.core.dir_entries(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            use std::os::unix::ffi::OsStrExt;
            if reply.add(
                INodeNo(*ino),
                (i + 1) as u64,
                *kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if let Some(entries) = self.core.snap_entries(fh.0) {
            self.stats.local(FuseOp::Readdirplus);
            let ttl = Core::snap_ttl(ino.0);
            for (i, (ino, kind, name, attr)) in entries.iter().enumerate().skip(offset as usize) {
                // Without attributes (`.`, `..`, the snapshots themselves)
                // the kernel links no entry and looks the name up.
                let (attr, ttl) = match attr {
                    Some(a) => (*a, ttl),
                    None => (dot_attr(*ino, *kind), Duration::ZERO),
                };
                let name = OsStr::from_bytes(name);
                if reply.add(
                    INodeNo(*ino),
                    (i + 1) as u64,
                    name,
                    &ttl,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
            }
            return reply.ok();
        }
        let Some(entries) = self.core.dir_entries(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        self.run(FuseOp::Readdirplus, move |c| async move {
            // Once per reply: a change to the directory after this point
            // waits for the reply (the kernel's invalidation of a name
            // takes the directory's lock, which this readdir holds).
            let listing_ttl = c.opened_listing_ttl(fh.0);
            // The kernel's clock for these names starts after this.
            let sent = Instant::now();
            let mut least_ttl = listing_ttl;
            // A reply holds a few hundred entries at most: their attributes
            // are looked up a run at a time.
            const RUN: usize = 128;
            let mut i = offset as usize;
            while i < entries.len() {
                let run = &entries[i..entries.len().min(i + RUN)];
                let inos: Vec<u64> = run
                    .iter()
                    .filter(|(_, _, n)| n != b"." && n != b"..")
                    .map(|e| e.0)
                    .collect();
                let mut attrs = match c.listed_attrs(listing_ttl, &inos).await {
                    Ok(a) => a.into_iter(),
                    Err(e) => return reply.error(e),
                };
                for (ino, kind, name) in run {
                    use std::os::unix::ffi::OsStrExt;
                    i += 1;
                    let (attr, ttl) = if name == b"." || name == b".." {
                        // The kernel links no entry for these.
                        (dot_attr(*ino, *kind), Duration::ZERO)
                    } else {
                        match attrs.next().flatten() {
                            Some(found) => found,
                            None => continue,
                        }
                    };
                    if reply.add(
                        INodeNo(*ino),
                        i as u64,
                        OsStr::from_bytes(name),
                        &ttl,
                        &attr,
                        Generation(0),
                    ) {
                        c.listed(fh.0, sent + least_ttl, false);
                        return reply.ok();
                    }
                    if name != b"." && name != b".." {
                        least_ttl = least_ttl.min(ttl);
                    }
                }
            }
            c.listed(fh.0, sent + least_ttl, true);
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.local(FuseOp::Releasedir);
        if !self.core.snap_release(fh.0) {
            self.core.releasedir(fh.0);
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are committed by a Raft majority before they
        // return, except those made here alone (write-behind): flushed now.
        if self.core.behind.is_none() {
            self.stats.local(FuseOp::Fsyncdir);
            return reply.ok();
        }
        self.run(FuseOp::Fsyncdir, move |c| async move {
            match c.k(ino.0).await {
                Ok(dir) => {
                    c.settle(dir).await;
                    reply.ok()
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        if let Some(b) = &self.core.behind {
            b.forget(ino.0);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(FuseOp::Statfs, move |c| async move {
            match c.statfs().await {
                Ok(s) => {
                    const BS: u64 = 4096;
                    let files = s.files.max(1);
                    reply.statfs(
                        s.total_bytes / BS,
                        s.free_bytes / BS,
                        s.free_bytes / BS,
                        files,
                        u64::MAX / 2 - files,
                        BS as u32,
                        255,
                        BS as u32,
                    )
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _pos: u32,
        reply: ReplyEmpty,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Setxattr);
            return reply.error(Errno::EROFS);
        }
        // Only user extended attributes are kept (security.*, trusted.* and
        // system.* -- POSIX ACLs -- are not supported: EOPNOTSUPP).
        if !is_user_xattr(name) {
            self.stats.local(FuseOp::Setxattr);
            return reply.error(Errno::EOPNOTSUPP);
        }
        let change = pb::XattrChange {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            flags: flags as u32,
            remove: false,
        };
        self.run(FuseOp::Setxattr, move |c| async move {
            match c.change_xattr(ino.0, change).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() == crate::hosts_attr::NAME && snapview::owns(ino.0) {
            // A snapshot's bytes are where its blocks are; not said here.
            self.stats.local(FuseOp::Getxattr);
            return reply.error(Errno::ENODATA);
        }
        if name.as_bytes() == crate::hosts_attr::NAME {
            self.run(FuseOp::Getxattr, move |c| async move {
                match c.hosts_attr(ino.0).await {
                    Ok(v) => xattr_reply(reply, size, &v),
                    Err(e) => reply.error(e),
                }
            });
            return;
        }
        // Answered here for the names the kernel and tools ask about on
        // every write or listing (security.capability, security.selinux,
        // system.posix_acl_access): there are none, at no round trip.
        if !is_user_xattr(name) {
            self.stats.local(FuseOp::Getxattr);
            return reply.error(Errno::ENODATA);
        }
        let name = name.as_bytes().to_vec();
        self.run(FuseOp::Getxattr, move |c| async move {
            let all = if snapview::owns(ino.0) {
                c.snap_xattrs(ino.0).await
            } else {
                c.xattrs(ino.0).await
            };
            match all {
                Ok(all) => match all.into_iter().find(|x| x.name == name) {
                    Some(x) => xattr_reply(reply, size, &x.value),
                    None => reply.error(Errno::ENODATA),
                },
                Err(e) => reply.error(e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.run(FuseOp::Listxattr, move |c| async move {
            let all = if snapview::owns(ino.0) {
                c.snap_xattrs(ino.0).await
            } else {
                c.xattrs(ino.0).await
            };
            match all {
                Ok(all) => {
                    let mut names = Vec::new();
                    for x in all {
                        names.extend_from_slice(&x.name);
                        names.push(0);
                    }
                    xattr_reply(reply, size, &names)
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Removexattr);
            return reply.error(Errno::EROFS);
        }
        if !is_user_xattr(name) {
            self.stats.local(FuseOp::Removexattr);
            return reply.error(Errno::ENODATA);
        }
        let change = pb::XattrChange {
            name: name.as_bytes().to_vec(),
            remove: true,
            ..Default::default()
        };
        self.run(FuseOp::Removexattr, move |c| async move {
            match c.change_xattr(ino.0, change).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        self.stats.local(FuseOp::Access);
        reply.ok();
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Getlk);
            return reply.error(Errno::ENOLCK);
        }
        self.run(FuseOp::Getlk, move |c| async move {
            match c.getlk(ino.0, lock_owner.0, start, end, typ).await {
                Ok(Some((s, e, t))) => reply.locked(s, e, t, 0),
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Setlk);
            return reply.error(Errno::ENOLCK);
        }
        let pid = req.pid();
        self.run(FuseOp::Setlk, move |c| async move {
            let mut pause = Duration::from_millis(20);
            loop {
                match c.setlk(ino.0, pid, lock_owner.0, start, end, typ).await {
                    Ok(()) => return reply.ok(),
                    Err(e) if e == Errno::EAGAIN && sleep => {
                        // FUSE delivers no interrupts: stop waiting when the
                        // process that asked is gone.
                        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
                            return reply.error(Errno::EINTR);
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(LOCK_POLL_MAX);
                    }
                    Err(e) => return reply.error(e),
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if snapview::owns(ino.0) {
            self.stats.local(FuseOp::Fallocate);
            return reply.error(Errno::EROFS);
        }
        self.run(FuseOp::Fallocate, move |c| async move {
            match c.fallocate(fh.0, offset, length, mode).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Terminal and filesystem ioctls mean nothing here.
        self.stats.local(FuseOp::Ioctl);
        reply.error(Errno::ENOTTY);
    }

    fn destroy(&mut self) {
        let core = self.core.clone();
        // Best effort: release this mount's locks now rather than at lease expiry.
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(3), async {
                core.settle_all().await;
                core.close_session().await
            })
            .await
        });
    }
}

/// A user extended attribute's name (`user.` and something).
fn is_user_xattr(name: &OsStr) -> bool {
    name.as_bytes()
        .strip_prefix(b"user.")
        .is_some_and(|n| !n.is_empty())
}

/// getxattr/listxattr's answer: the size asked for with `size` 0, the
/// bytes when they fit in `size`, ERANGE when not.
fn xattr_reply(reply: ReplyXattr, size: u32, bytes: &[u8]) {
    if size == 0 {
        reply.size(bytes.len() as u32)
    } else if bytes.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(bytes)
    }
}
