//! The filesystem's logic as async functions returning `Result<_, Errno>`;
//! `fs.rs` only moves FUSE requests here and replies.
//!
//! Consistency: the kernel is told to cache nothing about names and
//! attributes (TTL 0), so every lookup and stat asks the tracker, which is
//! what makes an `open()` here see a `close()` on another host. File content
//! stays in the kernel's page cache across opens only while the file's
//! version is unchanged. Writes are buffered per file and stored (up to 64
//! KiB per commit inline in the commit itself, larger as blocks to the write
//! quorum, then extents) on flush, fsync, close, or when the buffer grows
//! large: `close()` succeeds only once the data is durable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use failsafe_client::pb::{
    self, command::Op, query_reply::Reply, query_request::Query, ErrorCode, FileKind,
};
use failsafe_client::{
    inline_bytes, malformed_inline, Client, ClientError, LockRequest, PreparedCommit, Session,
};
use fuser::{Errno, FileAttr, FileType};

use crate::behind::{Done, Name, WriteBehind, LOCAL_BASE};
use crate::cache::BlockCache;
use crate::dirty::Dirty;
use crate::errno::errno;

/// Buffered bytes per file before an upload starts on its own: four blocks,
/// which the client puts side by side (`put_blocks`).
const FLUSH_AT: usize = 16 << 20;
/// Buffered plus uploading bytes per file at which writers wait.
const WRITE_BACKPRESSURE: usize = 64 << 20;
/// Verified blocks kept in memory, so 128 KiB reads do not re-read 4 MiB.
const MEM_BLOCKS: usize = 8;

pub(crate) type Res<T> = Result<T, Errno>;

/// A directory listing as opened: (kernel inode, kind, name), `.` and `..`
/// first (both with the directory's own inode).
pub(crate) type Listing = Arc<Vec<(u64, FileType, Vec<u8>)>>;

/// What the kernel may do with the listing of a directory opened for
/// reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DirCache {
    /// Ask us for every read (no lease on the listing).
    Off,
    /// Drop what it cached and cache the readdirplus answers of this open.
    Fill,
    /// Answer from the listing it cached: unchanged since it was given,
    /// and every name and attribute of it still valid in the kernel.
    Keep,
}

/// How long before the kernel's names of a cached listing expire it is
/// still given out whole: a reader of a large directory has this long to
/// go through it (`stat` of a name whose time ran out asks us again; the
/// leases are short, a few hundred ms, so this is too).
const KEEP_LISTING_MARGIN: Duration = Duration::from_millis(100);

/// An opened listing and, once readdirplus answered from it, until when
/// every name it gave the kernel stays valid there.
struct OpenDir {
    entries: Listing,
    source: ListingSource,
    cache: DirCache,
    fresh_until: Option<Instant>,
}

/// What a listing was made from: the lease cache's listing, weakly (so the
/// cache still changes it in place; a change it makes moves it, and this
/// no longer reaches it), and the count of changes of the kernel's numbers
/// it was mapped at.
#[derive(Clone)]
struct ListingSource {
    listing: Weak<Vec<pb::DirEntry>>,
    kernel_gen: u64,
}

impl ListingSource {
    /// Made from the cache's `listing` as it is now, at the same count.
    fn is(&self, listing: &Arc<Vec<pb::DirEntry>>, kernel_gen: u64) -> bool {
        self.kernel_gen == kernel_gen
            && self
                .listing
                .upgrade()
                .is_some_and(|l| Arc::ptr_eq(&l, listing))
    }
}

/// A listing the kernel holds whole, and until when its names stay valid
/// there (the least TTL readdirplus gave them).
struct KernelListing {
    entries: Listing,
    source: ListingSource,
    fresh_until: Instant,
}
/// Recently used verified blocks, by hash.
type MemBlocks = VecDeque<(Vec<u8>, Arc<Vec<u8>>)>;

fn err(e: ClientError) -> Errno {
    errno(&e)
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// A time a setattr sets: one given (`touch -d`, `cp -p`), or now — the
/// tracker leader's clock, not this web host's, which may be off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetTime {
    At(i64),
    Now,
}

impl SetTime {
    fn at(self) -> Option<i64> {
        match self {
            SetTime::At(t) => Some(t),
            SetTime::Now => None,
        }
    }
}

pub(crate) fn system_time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// `a` as the kernel is told it, as inode `ino` of `size` bytes.
pub(crate) fn fuse_attr(a: &pb::Attr, ino: u64, size: u64) -> FileAttr {
    FileAttr {
        ino: fuser::INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: kind(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// An open file.
struct Handle {
    ino: u64,
    append: bool,
    /// Opened for reading with no POSIX lock held here on the file: the
    /// kernel sends no flush at its close (FOPEN_NOFLUSH), so the lock
    /// owners of the process that opened it (`pid`) are recorded when they
    /// lock the file, and unlocked at its release.
    noflush: bool,
    pid: u32,
    lockers: Vec<u64>,
}

/// An open file, as the kernel is told of it.
pub(crate) struct Open {
    pub fh: u64,
    /// The kernel may keep the pages it has cached.
    pub keep: bool,
    /// The kernel need not send a flush at close (FOPEN_NOFLUSH).
    pub noflush: bool,
}

/// Files closed with bytes that could not be stored (the close, or the
/// flush before it, failed): an application that ignores close()'s error
/// (PHP does) must not lose them. Their state stays here, serving reads,
/// and [`Core::store_kept`] tries again until the cluster takes them.
#[derive(Default)]
pub(crate) struct Kept {
    /// Tracker inode -> failed attempts since it was kept.
    files: Mutex<BTreeMap<u64, u64>>,
    /// Attempts that failed again.
    pub(crate) retries: AtomicU64,
    /// Files whose bytes were stored late, after a failed close.
    pub(crate) stored_late: AtomicU64,
}

impl Kept {
    /// Files kept now.
    pub(crate) fn count(&self) -> usize {
        locked(&self.files).len()
    }
}

/// What this mount knows about a file while it is open here.
struct FileState {
    inner: Mutex<FileInner>,
    /// Serializes uploads of this file's buffer, so appends commit in order.
    upload: tokio::sync::Mutex<()>,
}

struct Unconfirmed {
    commit: PreparedCommit,
    appended: Arc<Dirty>,
}

#[derive(Default)]
struct FileInner {
    opens: usize,
    attr: Option<pb::Attr>,
    extents: Option<Arc<pb::FileExtents>>,
    dirty: Dirty,
    /// Being uploaded now; still visible to reads until committed.
    inflight: Option<Arc<Dirty>>,
    /// An append sent that got no answer: it may have applied. Sent again
    /// verbatim (its operation id) before anything newer of this file, so
    /// it applies exactly once; its bytes stay visible here meanwhile.
    unconfirmed: Option<Unconfirmed>,
    /// A background upload failed: the next flush or fsync reports it.
    error: Option<Errno>,
    /// Gone from the tracker while open here: served from what we hold.
    unlinked: bool,
    /// Bumped whenever a commit of ours changes where the bytes are.
    generation: u64,
    /// An O_TRUNC open emptied the file here; its next commit (the close's at
    /// the latest) carries the truncation with the new bytes, so no other
    /// host sees it empty in between and a crash before then leaves the old
    /// content. Until then the stored bytes are hidden here.
    truncated: bool,
}

impl FileInner {
    /// Holds bytes (or a truncation) the cluster does not have yet.
    fn unstored(&self) -> bool {
        !self.unlinked && (!self.dirty.is_empty() || self.truncated || self.unconfirmed.is_some())
    }

    fn local_size(&self) -> u64 {
        self.size_over(self.attr.as_ref().map_or(0, |a| a.size))
    }

    /// The file's size as this mount sees it, over `stored` bytes on the
    /// tracker: what it truncated, buffered or is uploading included.
    fn size_over(&self, stored: u64) -> u64 {
        let stored = if self.truncated { 0 } else { stored };
        let inflight = self.inflight.as_ref().map_or(0, |d| d.end());
        stored
            .max(inflight)
            .max(self.dirty.end())
            .max(self.appends_base(stored) + self.dirty.appended())
    }

    /// Where the buffered appends start, over `stored` bytes: after the
    /// unconfirmed and the inflight ones.
    fn appends_base(&self, stored: u64) -> u64 {
        stored
            + self
                .unconfirmed
                .as_ref()
                .map_or(0, |u| u.appended.appended())
            + self.inflight.as_ref().map_or(0, |d| d.appended())
    }
}

pub(crate) struct Core {
    pub client: Client,
    root: u64,
    pub read_only: bool,
    cache: BlockCache,
    mem: Mutex<MemBlocks>,
    files: Mutex<HashMap<u64, Arc<FileState>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    dirs: Mutex<HashMap<u64, OpenDir>>,
    /// Per directory, the listing this mount last gave the kernel whole by
    /// readdirplus while the kernel cached it (`FOPEN_CACHE_DIR`).
    kernel_listings: Mutex<HashMap<u64, KernelListing>>,
    /// The version each file had when this mount last read or wrote it: the
    /// kernel's cached pages are good while it is unchanged.
    versions: Mutex<HashMap<u64, u64>>,
    next_fh: AtomicU64,
    session: tokio::sync::Mutex<Option<Session>>,
    /// (inode, lock owner) pairs that took a lock through this mount.
    lock_owners: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// `writebehind`: directories delegated to this mount.
    pub behind: Option<Arc<WriteBehind>>,
    /// Closed files whose bytes are still to be stored.
    pub(crate) kept: Arc<Kept>,
    /// The cluster's status for `failsafe.hosts`.
    view: crate::hosts_attr::ClusterView,
    /// The snapshot view's open files and listings.
    pub(crate) snaps: crate::snapview::Snaps,
}

// Locks held in these std Mutexes guard short bookkeeping and are never held
// across an await.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn kind(k: i32) -> FileType {
    match FileKind::try_from(k) {
        Ok(FileKind::KindDir) => FileType::Directory,
        Ok(FileKind::KindSymlink) => FileType::Symlink,
        Ok(FileKind::KindFifo) => FileType::NamedPipe,
        Ok(FileKind::KindSocket) => FileType::Socket,
        Ok(FileKind::KindCharDevice) => FileType::CharDevice,
        Ok(FileKind::KindBlockDevice) => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn name_bytes(name: &std::ffi::OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().to_vec()
}

impl Core {
    pub(crate) fn new(client: Client, root: u64, read_only: bool, cache: BlockCache) -> Core {
        Core {
            client,
            root,
            read_only,
            cache,
            mem: Mutex::new(VecDeque::new()),
            files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            kernel_listings: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            session: tokio::sync::Mutex::new(None),
            lock_owners: Mutex::new(Default::default()),
            behind: None,
            kept: Arc::default(),
            view: Default::default(),
            snaps: Default::default(),
        }
    }

    /// Counting kept files in `kept` (the metrics' copy).
    pub(crate) fn with_kept(mut self, kept: Arc<Kept>) -> Core {
        self.kept = kept;
        self
    }

    /// With `writebehind`.
    pub(crate) fn with_write_behind(mut self) -> Core {
        self.behind = Some(WriteBehind::new(self.client.clone()));
        self
    }

    /// FUSE inode → tracker inode (the mounted directory is FUSE's root),
    /// as far as known without waiting (a directory made here alone and not
    /// flushed yet keeps its own number: see [`Core::k`]).
    pub(crate) fn t(&self, ino: u64) -> u64 {
        if ino == fuser::INodeNo::ROOT.0 {
            self.root
        } else if ino >= LOCAL_BASE {
            self.behind.as_ref().map_or(ino, |b| b.mapped(ino))
        } else {
            ino
        }
    }

    /// FUSE inode → tracker inode, flushing a directory made here alone
    /// first (write-behind).
    pub(crate) async fn k(&self, ino: u64) -> Res<u64> {
        match &self.behind {
            Some(b) if ino >= LOCAL_BASE => b.resolve(ino).await,
            _ => Ok(self.t(ino)),
        }
    }

    /// Before an operation in directory `dir` that goes to the tracker:
    /// what was done in it here alone goes first.
    pub(crate) async fn settle(&self, dir: u64) {
        if let Some(b) = &self.behind {
            b.settle(dir).await;
        }
    }

    /// Before a change of `dir/name` goes to the tracker: what was done to
    /// that name here alone goes first.
    async fn settle_for(&self, dir: u64, name: &[u8]) {
        if let Some(b) = &self.behind {
            b.settle_for(dir, &[name]).await;
        }
    }

    /// Before a lock operation, and at unmount: everything done here alone
    /// goes to the tracker.
    pub(crate) async fn settle_all(&self) {
        if let Some(b) = &self.behind {
            b.settle_all().await;
        }
    }

    /// The kernel's number for tracker inode `ino`.
    pub(crate) fn f(&self, ino: u64) -> u64 {
        if ino == self.root {
            fuser::INodeNo::ROOT.0
        } else {
            // Made here alone, the kernel knows it by the local number.
            self.behind
                .as_ref()
                .and_then(|b| b.kernel_ino(ino))
                .unwrap_or(ino)
        }
    }

    fn writable(&self) -> Res<()> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    pub(crate) fn file_attr(&self, a: &pb::Attr) -> FileAttr {
        let size = match locked(&self.files).get(&a.ino) {
            Some(st) => {
                let inner = locked(&st.inner);
                // Emptied here (O_TRUNC), the tracker's size does not count.
                if inner.truncated {
                    inner.local_size()
                } else {
                    a.size.max(inner.local_size())
                }
            }
            None => a.size,
        };
        fuse_attr(a, self.f(a.ino), size)
    }

    async fn query_attr(&self, q: Query) -> Result<pb::Attr, ClientError> {
        match self.client.query_available(q).await? {
            Reply::Attr(a) => Ok(a),
            _ => Err(ClientError::Unavailable("unexpected reply".into())),
        }
    }

    async fn mutate_attr(&self, op: Op) -> Res<pb::Attr> {
        match self.client.mutate(op).await.map_err(err)? {
            pb::command_result::Result::Attr(a) => Ok(a),
            _ => Err(Errno::EIO),
        }
    }

    /// A name's attributes (`None`: no such name), and how long the kernel
    /// may keep the answer (zero unless this mount holds a lease on it).
    pub(crate) async fn lookup(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
    ) -> Res<(Option<FileAttr>, Duration)> {
        let parent = self.k(parent).await?;
        let name = name_bytes(name);
        if let Some(b) = &self.behind {
            let ttl = || {
                self.client
                    .lease_now()
                    .map_or(Duration::ZERO, |(_, left)| left)
            };
            match b.name(parent, &name) {
                // (Made here alone, or just flushed: `getattr` knows which.)
                Some(Name::Made(ino) | Name::Is(ino)) => {
                    let (a, ttl) = self.getattr(ino).await?;
                    return Ok((Some(a), ttl));
                }
                Some(Name::Gone) => return Ok((None, ttl())),
                None => {}
            }
        }
        let l = self
            .client
            .lookup_leased(parent, &name)
            .await
            .map_err(err)?;
        let attr = l.value.map(|mut a| {
            self.adjust(&mut a);
            self.file_attr(&a)
        });
        Ok((attr, l.ttl))
    }

    /// A directory's attributes with what was made in it here alone.
    fn adjust(&self, a: &mut pb::Attr) {
        if let Some(b) = &self.behind {
            b.adjust(a);
        }
    }

    pub(crate) async fn getattr(&self, ino: u64) -> Res<(FileAttr, Duration)> {
        if let Some(a) = self.behind.as_ref().and_then(|b| b.getattr(ino)) {
            let ttl = self
                .client
                .lease_now()
                .map_or(Duration::ZERO, |(_, left)| left);
            return Ok((self.file_attr(&a), ttl));
        }
        let tino = self.k(ino).await?;
        match self.client.getattr_leased(tino).await {
            Ok(mut l) => {
                self.adjust(&mut l.value);
                Ok((self.file_attr(&l.value), l.ttl))
            }
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                // Unlinked elsewhere while open here: it lives on until closed.
                // (Only a failed commit decides that the file is gone: a
                // lagging member's answer must not make us drop writes.)
                // Otherwise the kernel's inode is stale (replaced by a rename
                // since its lookup): ESTALE makes the VFS walk the path again.
                let st = locked(&self.files)
                    .get(&tino)
                    .cloned()
                    .ok_or(Errno::ESTALE)?;
                let a = locked(&st.inner).attr.ok_or(Errno::ESTALE)?;
                Ok((
                    FileAttr {
                        nlink: 0,
                        ..self.file_attr(&a)
                    },
                    Duration::ZERO,
                ))
            }
            Err(e) => Err(err(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> Res<FileAttr> {
        self.writable()?;
        let tino = self.k(ino).await?;
        if let Some(st) = self.state(tino) {
            // Buffered bytes go first, so their commit cannot undo what this
            // sets (a size, or times that `cp -p` preserves).
            if let Some(size) = size {
                locked(&st.inner).dirty.truncate(size);
            }
            self.upload(tino, &st).await?;
        }
        let set = pb::SetAttr {
            ino: tino,
            mode,
            uid,
            gid,
            size,
            atime_ns: atime.and_then(SetTime::at),
            mtime_ns: mtime.and_then(SetTime::at),
            atime_now: matches!(atime, Some(SetTime::Now)),
            mtime_now: matches!(mtime, Some(SetTime::Now)),
            xattr: None,
        };
        let a = self.client.setattr(set).await.map_err(err)?;
        if let Some(st) = self.state(tino) {
            let mut inner = locked(&st.inner);
            inner.attr = Some(a);
            inner.extents = None;
        }
        Ok(self.file_attr(&a))
    }

    /// `ino`'s `failsafe.hosts` attribute (see `hosts_attr`).
    pub(crate) async fn hosts_attr(&self, ino: u64) -> Res<Vec<u8>> {
        let tino = self.k(ino).await?;
        // Not a regular file (a directory, a link): no extents, no bytes.
        let extents = self.client.extents_leased(tino).await.ok().map(|l| l.value);
        let status = self.view.status(&self.client).await;
        if let Err(e) = &status {
            tracing::debug!(error = %e, "failsafe.hosts: no member answered a status");
        }
        Ok(crate::hosts_attr::render(
            status.as_deref().ok(),
            extents.as_deref(),
        ))
    }

    /// The extended attributes of `ino` (user ones: no other kind is kept).
    pub(crate) async fn xattrs(&self, ino: u64) -> Res<Vec<pb::Xattr>> {
        self.client.xattrs(self.k(ino).await?).await.map_err(err)
    }

    /// Sets or removes one user extended attribute of `ino` (its ctime
    /// changes).
    pub(crate) async fn change_xattr(&self, ino: u64, x: pb::XattrChange) -> Res<()> {
        self.writable()?;
        let tino = self.k(ino).await?;
        let set = pb::SetAttr {
            ino: tino,
            xattr: Some(x),
            ..Default::default()
        };
        let a = self.client.setattr(set).await.map_err(err)?;
        if let Some(st) = self.state(tino) {
            locked(&st.inner).attr = Some(a);
        }
        Ok(())
    }

    pub(crate) async fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        match self
            .client
            .query_available(Query::ReadLink(pb::ReadLink {
                ino: self.k(ino).await?,
            }))
            .await
            .map_err(err)?
        {
            Reply::Target(t) => Ok(t.target),
            _ => Err(Errno::EIO),
        }
    }

    pub(crate) async fn mkdir(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Res<FileAttr> {
        self.writable()?;
        let (parent, name) = (self.k(parent).await?, name_bytes(name));
        if let Some(b) = &self.behind {
            if b.delegated(parent) {
                let free = match b.name(parent, &name) {
                    Some(_) => true,
                    None => self.named(parent, &name).await?.is_none(),
                };
                if let Some(made) = b.mkdir(parent, &name, free, mode, uid, gid) {
                    return made.map(|a| self.file_attr(&a));
                }
            }
            b.settle_for(parent, &[&name]).await;
        }
        let op = Op::Mkdir(pb::Mkdir {
            parent,
            name,
            mode,
            uid,
            gid,
        });
        match self.mutate_delegating(op, parent).await? {
            pb::command_result::Result::Attr(a) => Ok(self.file_attr(&a)),
            _ => Err(Errno::EIO),
        }
    }

    /// A change in `dir` that, with write-behind, asks for `dir` to be
    /// delegated here.
    async fn mutate_delegating(&self, op: Op, dir: u64) -> Res<pb::command_result::Result> {
        let asking = failsafe_client::Behind {
            delegate: if self.behind.is_some() { dir } else { 0 },
            flush_of: 0,
        };
        let (r, delegated) = self.client.mutate_behind(op, asking).await.map_err(err)?;
        if let (Some(b), Some(epoch)) = (&self.behind, delegated) {
            b.granted(dir, epoch);
        }
        Ok(r)
    }

    /// Makes `parent/name` at the cluster at once: `op` is the command
    /// for the parent's and name's cluster form.
    async fn make(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        op: impl FnOnce(u64, Vec<u8>) -> Op,
    ) -> Res<FileAttr> {
        self.writable()?;
        let (parent, name) = (self.k(parent).await?, name_bytes(name));
        self.settle_for(parent, &name).await;
        let a = self.mutate_attr(op(parent, name)).await?;
        Ok(self.file_attr(&a))
    }

    pub(crate) async fn symlink(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Res<FileAttr> {
        self.make(parent, name, |parent, name| {
            Op::Symlink(pb::Symlink {
                parent,
                name,
                target: target.to_vec(),
                uid,
                gid,
            })
        })
        .await
    }

    /// A special file (`kind` a FIFO, socket or device node): made at the
    /// cluster at once, like a symlink; the kernel of each web host serves
    /// it (a FIFO's pipe, a socket's binding, a device's driver) locally.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn mknod(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        kind: FileKind,
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Res<FileAttr> {
        self.make(parent, name, |parent, name| {
            Op::Create(pb::Create {
                parent,
                name,
                mode,
                uid,
                gid,
                exclusive: true,
                kind: kind as i32,
                rdev,
                ..Default::default()
            })
        })
        .await
    }

    pub(crate) async fn link(
        &self,
        ino: u64,
        parent: u64,
        name: &std::ffi::OsStr,
    ) -> Res<FileAttr> {
        self.writable()?;
        let (ino, parent) = (self.k(ino).await?, self.k(parent).await?);
        self.settle_for(parent, &name_bytes(name)).await;
        let op = Op::Link(pb::Link {
            ino,
            new_parent: parent,
            new_name: name_bytes(name),
        });
        match self.mutate_attr(op).await {
            Err(e) if e == Errno::EISDIR => Err(Errno::EPERM),
            r => r.map(|a| self.file_attr(&a)),
        }
    }

    /// Notes that `parent/name` is about to disappear: if it is open here,
    /// it stays readable until closed.
    /// Before `parent/name` may disappear: if it is open here, keep what is
    /// needed to go on reading it (its extents). Returns its inode.
    async fn before_removal(&self, parent: u64, name: &[u8]) -> Option<u64> {
        if locked(&self.files).is_empty() {
            return None;
        }
        let q = Query::Lookup(pb::Lookup {
            parent,
            name: name.to_vec(),
            extents: false,
        });
        let a = self.query_attr(q).await.ok()?;
        let st = self.state(a.ino)?;
        let cached = locked(&st.inner).extents.is_some();
        if !cached {
            if let Ok(fe) = self.file_extents(a.ino).await {
                locked(&st.inner).extents = Some(Arc::new(fe));
            }
        }
        Some(a.ino)
    }

    /// After a removal succeeded: if the inode is really gone from the
    /// tracker, this mount serves it from what it holds until closed.
    async fn after_removal(&self, ino: Option<u64>) {
        let Some(ino) = ino else { return };
        let Some(st) = self.state(ino) else { return };
        if let Err(e) = self.client.getattr(ino).await {
            if e.code() == Some(ErrorCode::NotFound) {
                locked(&st.inner).unlinked = true;
            }
        }
    }

    /// What `parent/name` is, from the lease cache when it can: `None` for
    /// no such name.
    async fn named(&self, parent: u64, name: &[u8]) -> Res<Option<pb::Attr>> {
        let l = self.client.lookup_leased(parent, name).await.map_err(err)?;
        Ok(l.value)
    }

    /// With write-behind and `dir` delegated here: the inode of the file
    /// (not a directory, not open here, with no other hard link: its link
    /// count seen elsewhere must change at once) `dir/name` names, which
    /// may be unlinked or renamed here alone. `Err(ENOENT)`: no such name.
    async fn plain_file(&self, b: &WriteBehind, dir: u64, name: &[u8]) -> Res<Option<u64>> {
        if !b.delegated(dir) {
            return Ok(None);
        }
        let a = match b.name(dir, name) {
            Some(Name::Gone) => return Err(Errno::ENOENT),
            Some(Name::Made(_)) => return Ok(None),
            // Renamed here: its attributes as leased, without a round trip
            // (not leased: taken as one link, as before the rename).
            Some(Name::Is(ino)) => match self.client.cached_attrs(&[ino]).pop().flatten() {
                Some(l) => l.value,
                None => return Ok(self.state(ino).is_none().then_some(ino)),
            },
            None => match self.named(dir, name).await? {
                None => return Err(Errno::ENOENT),
                Some(a) => a,
            },
        };
        if a.kind == FileKind::KindDir as i32 || a.nlink > 1 {
            return Ok(None);
        }
        Ok(self.state(a.ino).is_none().then_some(a.ino))
    }

    pub(crate) async fn unlink(&self, parent: u64, name: &std::ffi::OsStr) -> Res<()> {
        self.writable()?;
        let (parent, name) = (self.k(parent).await?, name_bytes(name));
        if let Some(b) = &self.behind {
            if let Some(ino) = self.plain_file(b, parent, &name).await? {
                if matches!(b.unlink(parent, &name, ino), Done::Here) {
                    return Ok(());
                }
            }
            b.settle_for(parent, &[&name]).await;
        }
        let open = self.before_removal(parent, &name).await;
        let op = Op::Unlink(pb::Unlink {
            parent,
            name: name.clone(),
            expect: 0,
        });
        self.mutate_delegating(op, parent).await?;
        self.after_removal(open).await;
        Ok(())
    }

    pub(crate) async fn rmdir(&self, parent: u64, name: &std::ffi::OsStr) -> Res<()> {
        self.writable()?;
        let (parent, name) = (self.k(parent).await?, name_bytes(name));
        let Some(b) = &self.behind else {
            return self.client.rmdir(parent, &name).await.map_err(err);
        };
        match b.rmdir(parent, &name).await {
            Done::Here => Ok(()),
            Done::Tracker => {
                // What was done inside it here alone goes first (it may
                // have emptied it).
                if let Ok(Some(a)) = self.named(parent, &name).await {
                    b.settle(a.ino).await;
                }
                let op = Op::Rmdir(pb::Rmdir { parent, name });
                self.mutate_delegating(op, parent).await.map(|_| ())
            }
        }
    }

    pub(crate) async fn rename(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        new_parent: u64,
        new_name: &std::ffi::OsStr,
        no_replace: bool,
        exchange: bool,
    ) -> Res<()> {
        self.writable()?;
        let (np, nn) = (self.k(new_parent).await?, name_bytes(new_name));
        let parent = self.k(parent).await?;
        if let Some(b) = &self.behind {
            let name = name_bytes(name);
            if parent == np && name != nn && !no_replace && !exchange {
                if let Some(ino) = self.plain_file(b, parent, &name).await? {
                    // Over nothing, or over a file not open here.
                    let over = match self.plain_file(b, parent, &nn).await {
                        Err(Errno::ENOENT) => Some(None),
                        Ok(Some(t)) if t != ino => Some(Some(t)),
                        _ => None,
                    };
                    if let Some(over) = over {
                        if matches!(b.rename(parent, &name, &nn, ino, over), Done::Here) {
                            return Ok(());
                        }
                    }
                }
            }
            b.settle_for(parent, &[&name]).await;
            b.settle_for(np, &[&nn]).await;
        }
        let replaced = if exchange || no_replace {
            None
        } else {
            self.before_removal(np, &nn).await
        };
        let r = pb::Rename {
            parent,
            name: name_bytes(name),
            new_parent: np,
            new_name: nn,
            no_replace,
            exchange,
            ..Default::default()
        };
        if parent == np {
            self.mutate_delegating(Op::Rename(r), parent).await?;
        } else {
            self.client.rename(r).await.map_err(err)?;
        }
        self.after_removal(replaced).await;
        Ok(())
    }

    pub(crate) async fn statfs(&self) -> Res<pb::FsStats> {
        match self
            .client
            .query_available(Query::StatFs(pb::StatFs {}))
            .await
            .map_err(err)?
        {
            Reply::FsStats(s) => Ok(s),
            _ => Err(Errno::EIO),
        }
    }

    fn state(&self, tino: u64) -> Option<Arc<FileState>> {
        locked(&self.files).get(&tino).cloned()
    }

    /// Registers an open of `tino` with attributes `a`; returns the handle and
    /// whether the kernel may keep its cached pages.
    fn register_open(
        &self,
        a: pb::Attr,
        append: bool,
        extents: Option<Arc<pb::FileExtents>>,
    ) -> (u64, bool) {
        let tino = a.ino;
        let keep = {
            let mut versions = locked(&self.versions);
            if versions.len() > 100_000 {
                versions.clear();
            }
            let keep = versions.get(&tino) == Some(&a.version);
            versions.insert(tino, a.version);
            keep
        };
        let st = {
            let mut files = locked(&self.files);
            let st = files
                .entry(tino)
                .or_insert_with(|| {
                    Arc::new(FileState {
                        inner: Mutex::new(FileInner::default()),
                        upload: tokio::sync::Mutex::new(()),
                    })
                })
                .clone();
            // Counted under the table's lock, so a concurrent last release
            // cannot drop the state this open is about to use.
            locked(&st.inner).opens += 1;
            st
        };
        {
            let mut inner = locked(&st.inner);
            let changed = inner.attr.as_ref().map(|o| o.version) != Some(a.version);
            if changed {
                inner.extents = None;
            }
            let newer = inner.attr.as_ref().is_none_or(|o| a.version >= o.version);
            if newer {
                if extents.is_some() {
                    inner.extents = extents;
                }
                inner.attr = Some(a);
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        locked(&self.handles).insert(
            fh,
            Handle {
                ino: tino,
                append,
                noflush: false,
                pid: 0,
                lockers: Vec::new(),
            },
        );
        (fh, keep)
    }

    pub(crate) async fn open(&self, ino: u64, flags: i32, pid: u32) -> Res<Open> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.writable()?;
        }
        let tino = self.k(ino).await?;
        // Close-to-open: ask the tracker what the file is now, and where its
        // bytes are (or hold a lease on the answer, which a change elsewhere
        // revokes before it completes), so it stays readable if another host
        // deletes or replaces it while it is open here. A write-only open
        // reads nothing: its attributes do (a log opened to append to, whose
        // extents a writer's read-back does not bring back once it is long).
        let found = if acc == libc::O_WRONLY {
            let l = self.client.getattr_leased(tino).await;
            l.map(|l| (Some(l.value), None))
        } else {
            let l = self.client.extents_leased(tino).await;
            l.map(|l| (l.value.attr, Some(l.value)))
        };
        let (a, extents) = match found {
            Ok((a, extents)) => (a.ok_or(Errno::EIO)?, extents),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                // Replaced or removed between the kernel's lookup and this
                // open: ESTALE makes the VFS look the name up again.
                let st = self.state(tino).ok_or(Errno::ESTALE)?;
                let a = locked(&st.inner).attr.ok_or(Errno::ESTALE)?;
                (a, None)
            }
            Err(e) if e.code() == Some(ErrorCode::IsDir) => return Err(Errno::EISDIR),
            Err(e) => return Err(err(e)),
        };
        if a.kind == FileKind::KindDir as i32 {
            return Err(Errno::EISDIR);
        }
        let (fh, keep) = self.register_open(a, flags & libc::O_APPEND != 0, extents);
        if flags & libc::O_TRUNC != 0 {
            self.truncate_at_open(tino, fh).await?;
        }
        // A read-only open has nothing to store at close, and its close
        // need not release POSIX locks while nobody here holds one on the
        // file: the kernel sends no flush for it (one synchronous request
        // less for every page a wiki reads). Locks its process takes on the
        // file later go at its release, which the kernel sends right after
        // the last close of the descriptor (without waiting for it).
        let noflush = acc == libc::O_RDONLY
            && flags & libc::O_TRUNC == 0
            && !locked(&self.lock_owners).iter().any(|&(i, _)| i == tino);
        if noflush {
            if let Some(h) = locked(&self.handles).get_mut(&fh) {
                h.noflush = true;
                h.pid = pid;
            }
        }
        Ok(Open { fh, keep, noflush })
    }

    async fn file_extents(&self, tino: u64) -> Result<pb::FileExtents, ClientError> {
        match self
            .client
            .query_available(Query::ReadExtents(failsafe_client::whole_file(tino)))
            .await?
        {
            Reply::FileExtents(fe) => Ok(fe),
            _ => Err(ClientError::Unavailable("unexpected reply".into())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create(
        &self,
        parent: u64,
        name: &std::ffi::OsStr,
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Res<(FileAttr, u64)> {
        self.writable()?;
        let exclusive = flags & libc::O_EXCL != 0;
        let (parent, name) = (self.k(parent).await?, name_bytes(name));
        if let Some(b) = &self.behind {
            if b.delegated(parent) {
                let free = match b.name(parent, &name) {
                    Some(Name::Gone) => true,
                    Some(_) => false,
                    None => self.named(parent, &name).await?.is_none(),
                };
                if let Some(a) = free
                    .then(|| b.create(parent, &name, mode, uid, gid))
                    .flatten()
                {
                    let extents = Some(Arc::new(pb::FileExtents {
                        attr: Some(a),
                        ..Default::default()
                    }));
                    let (fh, _) = self.register_open(a, flags & libc::O_APPEND != 0, extents);
                    return Ok((self.file_attr(&a), fh));
                }
            }
            b.settle_for(parent, &[&name]).await;
        }
        let c = pb::Create {
            parent,
            name,
            mode,
            uid,
            gid,
            exclusive,
            ..Default::default()
        };
        let a = match self.mutate_delegating(Op::Create(c), parent).await? {
            pb::command_result::Result::Attr(a) => a,
            _ => return Err(Errno::EIO),
        };
        let truncate = flags & libc::O_TRUNC != 0 && a.size > 0;
        locked(&self.versions).remove(&a.ino);
        let extents = if a.size == 0 || truncate {
            Some(Arc::new(pb::FileExtents {
                attr: Some(a),
                ..Default::default()
            }))
        } else {
            self.file_extents(a.ino).await.ok().map(Arc::new)
        };
        let (fh, _) = self.register_open(a, flags & libc::O_APPEND != 0, extents);
        if truncate {
            self.truncate_at_open(a.ino, fh).await?;
        }
        Ok((self.file_attr(&a), fh))
    }

    /// An O_TRUNC open of `tino` (registered as `fh`, released again if
    /// this fails): empties it here and leaves the truncation to its next
    /// commit (see `FileInner::truncated`). What another descriptor
    /// buffered before is stored first: the truncation comes after it.
    async fn truncate_at_open(&self, tino: u64, fh: u64) -> Res<()> {
        let st = self.state(tino).ok_or(Errno::EBADF)?;
        if locked(&st.inner).local_size() == 0 {
            return Ok(());
        }
        if let Err(e) = self.upload(tino, &st).await {
            let _ = self.release(fh, None).await;
            return Err(e);
        }
        let mut inner = locked(&st.inner);
        inner.dirty.truncate(0);
        inner.truncated = true;
        // Reads under way read again, from the emptied file.
        inner.generation += 1;
        Ok(())
    }

    fn handle_ino(&self, fh: u64) -> Res<(u64, bool)> {
        locked(&self.handles)
            .get(&fh)
            .map(|h| (h.ino, h.append))
            .ok_or(Errno::EBADF)
    }

    /// A verified block, from memory, the disk cache, or the nearest copy.
    async fn block(&self, hash: &[u8], fe: &pb::FileExtents) -> Res<Arc<Vec<u8>>> {
        if let Some((_, b)) = locked(&self.mem).iter().find(|(h, _)| h == hash) {
            return Ok(b.clone());
        }
        let data = match self.cache.get(hash) {
            Some(d) => d,
            None => {
                let devices = fe
                    .copies
                    .iter()
                    .find(|c| c.hash == hash)
                    .map_or(&[][..], |c| c.device_ids.as_slice());
                let d = self
                    .client
                    .read_block(hash, devices, &fe.devices)
                    .await
                    .map_err(err)?;
                self.cache.put(hash, &d);
                d
            }
        };
        let b = Arc::new(data);
        let mut mem = locked(&self.mem);
        mem.push_back((hash.to_vec(), b.clone()));
        while mem.len() > MEM_BLOCKS {
            mem.pop_front();
        }
        Ok(b)
    }

    /// Fills `buf` (the file's bytes from `offset` on) with what `fe`
    /// says the first `stored` bytes are: inline bytes, and blocks fetched
    /// (or from the caches). Holes stay as they are.
    pub(crate) async fn fill(
        &self,
        fe: &pb::FileExtents,
        offset: u64,
        stored: u64,
        buf: &mut [u8],
    ) -> Res<()> {
        let end = offset + buf.len() as u64;
        for e in &fe.extents {
            let (from, to) = (
                e.offset.max(offset),
                (e.offset + e.length).min(end).min(stored),
            );
            if from >= to {
                continue;
            }
            if !e.data.is_empty() {
                // Inline: the bytes came with the extents, no block to fetch.
                let src = inline_bytes(e, from, to).ok_or_else(|| err(malformed_inline()))?;
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
                continue;
            }
            let block = self.block(&e.hash, fe).await?;
            let b0 = (e.block_offset + (from - e.offset)) as usize;
            let src = block.get(b0..b0 + (to - from) as usize).ok_or(Errno::EIO)?;
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        Ok(())
    }

    pub(crate) async fn read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        let (tino, _) = self.handle_ino(fh)?;
        let st = self.state(tino).ok_or(Errno::EBADF)?;
        // An upload that commits while we fetch blocks changes which bytes
        // are where: then read again from the new state.
        for _ in 0..4 {
            if let Some(buf) = self.read_once(tino, &st, offset, size).await? {
                return Ok(buf);
            }
        }
        Err(Errno::EAGAIN)
    }

    async fn read_once(
        &self,
        tino: u64,
        st: &FileState,
        offset: u64,
        size: u32,
    ) -> Res<Option<Vec<u8>>> {
        let (extents, stored, total, unlinked, generation, truncated) = {
            let inner = locked(&st.inner);
            (
                inner.extents.clone(),
                inner.attr.as_ref().map_or(0, |a| a.size),
                inner.local_size(),
                inner.unlinked,
                inner.generation,
                inner.truncated,
            )
        };
        let extents = match extents {
            // Emptied here by an O_TRUNC open: nothing stored shows.
            _ if truncated => None,
            Some(e) => Some(e),
            None if unlinked && stored > 0 => return Err(Errno::ESTALE),
            None if unlinked => None,
            None => match self.file_extents(tino).await {
                Ok(fe) => {
                    let fe = Arc::new(fe);
                    let mut inner = locked(&st.inner);
                    let newer = fe.attr.as_ref().map(|a| a.version)
                        >= inner.attr.as_ref().map(|a| a.version);
                    if inner.generation == generation && newer {
                        // Someone else's change since our open: the version
                        // we serve from is the one we fetched.
                        inner.attr = fe.attr;
                        inner.extents = Some(fe.clone());
                    }
                    Some(fe)
                }
                // Deleted elsewhere, and we hold no map of its bytes: an
                // error, never invented zeros.
                Err(e) if e.code() == Some(ErrorCode::NotFound) && stored > 0 => {
                    return Err(Errno::ESTALE)
                }
                Err(e) if e.code() == Some(ErrorCode::NotFound) => None,
                Err(e) => return Err(err(e)),
            },
        };
        let stored = if truncated {
            0
        } else {
            extents
                .as_ref()
                .and_then(|fe| fe.attr.as_ref())
                .map_or(stored, |a| a.size)
        };
        let total = total.max(stored);
        if offset >= total {
            return Ok(Some(Vec::new()));
        }
        let end = offset.saturating_add(u64::from(size)).min(total);
        let mut buf = vec![0u8; (end - offset) as usize];
        if let Some(fe) = &extents {
            self.fill(fe, offset, stored, &mut buf).await?;
        }
        let inner = locked(&st.inner);
        if inner.generation != generation {
            return Ok(None);
        }
        let unconfirmed = match &inner.unconfirmed {
            Some(u) => {
                u.appended.overlay_appends(stored, offset, &mut buf);
                u.appended.appended()
            }
            None => 0,
        };
        if let Some(d) = &inner.inflight {
            d.overlay_appends(stored + unconfirmed, offset, &mut buf);
            d.overlay(offset, &mut buf);
        }
        inner
            .dirty
            .overlay_appends(inner.appends_base(stored), offset, &mut buf);
        inner.dirty.overlay(offset, &mut buf);
        Ok(Some(buf))
    }

    /// Buffers a write. Returns the file's inode, and true when the buffer
    /// is big enough that an upload should start.
    pub(crate) fn buffer_write(&self, fh: u64, offset: u64, data: &[u8]) -> Res<(u64, bool)> {
        self.writable()?;
        let (tino, append) = self.handle_ino(fh)?;
        let st = self.state(tino).ok_or(Errno::EBADF)?;
        let mut inner = locked(&st.inner);
        if append {
            inner.dirty.append(data);
        } else {
            inner.dirty.write(offset, data);
        }
        Ok((tino, inner.dirty.bytes() >= FLUSH_AT))
    }

    /// The mode a write through `fh` by a caller without CAP_FSETID leaves
    /// the file with, when that clears set-id bits: set-user-ID always,
    /// set-group-ID when group members may execute it (as the kernel rules
    /// for writes through its page cache; on direct I/O it asks us).
    pub(crate) fn mode_after_unprivileged_write(&self, fh: u64) -> Option<u32> {
        let (tino, _) = self.handle_ino(fh).ok()?;
        let st = self.state(tino)?;
        let mode = locked(&st.inner).attr.as_ref()?.mode & 0o7777;
        let mut kill = libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kill |= libc::S_ISGID;
        }
        (mode & kill != 0).then_some(mode & !kill)
    }

    /// Backpressure: the file's inode when `fh`'s file already holds as
    /// many bytes not yet stored as a mount keeps for one file, so the next
    /// write must wait for an upload first.
    pub(crate) fn must_wait(&self, fh: u64) -> Option<u64> {
        let (tino, _) = self.handle_ino(fh).ok()?;
        let st = self.state(tino)?;
        let inner = locked(&st.inner);
        let pending = inner.dirty.bytes()
            + inner.inflight.as_ref().map_or(0, |d| d.bytes())
            + inner.unconfirmed.as_ref().map_or(0, |u| u.appended.bytes());
        (pending >= WRITE_BACKPRESSURE).then_some(tino)
    }

    /// Stores this file's buffered bytes: blocks to the write quorum, then
    /// the extents. Reports (once) an earlier background upload's failure.
    pub(crate) async fn flush_ino(&self, tino: u64) -> Res<()> {
        let Some(st) = self.state(tino) else {
            return Ok(());
        };
        self.upload(tino, &st).await?;
        let earlier = locked(&st.inner).error.take();
        match earlier {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(crate) async fn flush_fh(&self, fh: u64) -> Res<()> {
        let (tino, _) = self.handle_ino(fh)?;
        self.flush_ino(tino).await
    }

    async fn upload(&self, tino: u64, st: &FileState) -> Res<()> {
        let tino = match self.behind.as_ref().filter(|_| tino >= LOCAL_BASE) {
            Some(b) => match self.create_behind(b, tino, st).await? {
                None => return Ok(()),
                Some(real) => real,
            },
            None => tino,
        };
        let _turn = st.upload.lock().await;
        self.confirm(st).await?;
        let (batch, truncate) = {
            let mut inner = locked(&st.inner);
            if (inner.dirty.is_empty() && !inner.truncated) || inner.unlinked {
                return Ok(());
            }
            let d = Arc::new(std::mem::take(&mut inner.dirty));
            inner.inflight = Some(d.clone());
            (d, inner.truncated)
        };
        let data_commits = batch.segment_count() as u64 + u64::from(batch.appended() > 0);
        let commits = data_commits.max(u64::from(truncate));
        let result = self.store(tino, &batch, truncate).await;
        let mut inner = locked(&st.inner);
        inner.inflight = None;
        inner.generation += 1;
        match result {
            Ok(Some(a)) => {
                // The truncation went with the first commit (a failure
                // keeps it for the retry, which sends every byte again).
                inner.truncated = false;
                let mut versions = locked(&self.versions);
                let before = inner.attr.as_ref().map(|o| o.version);
                // Our pages are still right if only our commits happened,
                // and held what we wrote: appends do not go through them
                // (direct I/O, see `fs::append_io`).
                if before.is_some_and(|v| a.version == v + commits)
                    && batch.appended() == 0
                    && versions.get(&tino) == before.as_ref()
                {
                    versions.insert(tino, a.version);
                }
                inner.attr = Some(a);
                inner.extents = None;
                Ok(())
            }
            Ok(None) => {
                inner.unlinked = true;
                inner.dirty = Arc::unwrap_or_clone(batch).under(std::mem::take(&mut inner.dirty));
                Ok(())
            }
            Err((e, Some(commit))) => {
                // Everything before the append applied; the append itself
                // may have: it goes again as it is, before anything newer.
                inner.truncated = commit.truncates();
                inner.unconfirmed = Some(Unconfirmed {
                    commit,
                    appended: Arc::new(batch.appends_only()),
                });
                Err(e)
            }
            Err((e, None)) => {
                inner.dirty = Arc::unwrap_or_clone(batch).under(std::mem::take(&mut inner.dirty));
                Err(e)
            }
        }
    }

    /// Sends again the append whose outcome was unknown, if there is one,
    /// under its first operation id: applied once whether or not the first
    /// attempt had. Refused (it applied nothing), its bytes go back to the
    /// buffer, to be sent with the next upload as new.
    async fn confirm(&self, st: &FileState) -> Res<()> {
        let Some(mut commit) = locked(&st.inner)
            .unconfirmed
            .as_ref()
            .map(|u| u.commit.clone())
        else {
            return Ok(());
        };
        let r = self.client.commit_prepared(&mut commit).await;
        let mut inner = locked(&st.inner);
        match r {
            Err(e) if e.retry_verbatim() => {
                if let Some(u) = inner.unconfirmed.as_mut() {
                    u.commit = commit;
                }
                Err(err(e))
            }
            Ok(a) => {
                inner.unconfirmed = None;
                inner.generation += 1;
                inner.truncated = false;
                inner.attr = Some(a);
                inner.extents = None;
                Ok(())
            }
            Err(e) => {
                let gone = e.code() == Some(ErrorCode::NotFound);
                if let Some(u) = inner.unconfirmed.take() {
                    inner.dirty =
                        Arc::unwrap_or_clone(u.appended).under(std::mem::take(&mut inner.dirty));
                }
                inner.generation += 1;
                if gone {
                    inner.unlinked = true;
                    return Ok(());
                }
                Err(err(e))
            }
        }
    }

    /// Uploads a file made here alone (write-behind, local inode `tino`):
    /// created with its bytes in one command when they are one run from
    /// the start (what a file written and closed is), else created first.
    /// `None`: done; else the tracker's inode, whose upload is the usual.
    async fn create_behind(&self, b: &WriteBehind, tino: u64, st: &FileState) -> Res<Option<u64>> {
        let turn = st.upload.lock().await;
        if !b.creation_pending(tino) {
            // Flushed already: its bytes go the usual way (not stored as
            // blocks for a creation that will not carry them).
            drop(turn);
            return self.k(tino).await.map(Some);
        }
        let (batch, data) = {
            let mut inner = locked(&st.inner);
            let d = Arc::new(std::mem::take(&mut inner.dirty));
            let data = d.clone_from_start();
            if data.is_some() {
                inner.inflight = Some(d.clone());
            } else {
                inner.dirty =
                    Arc::unwrap_or_clone(d.clone()).under(std::mem::take(&mut inner.dirty));
            }
            (d, data)
        };
        let put_back = |inner: &mut FileInner| {
            inner.inflight = None;
            if data.is_some() {
                inner.dirty =
                    Arc::unwrap_or_clone(batch.clone()).under(std::mem::take(&mut inner.dirty));
            }
        };
        let content = match self.client.content_of(data.as_deref().unwrap_or(&[])).await {
            Ok(c) => c,
            Err(e) => {
                put_back(&mut locked(&st.inner));
                return Err(err(e));
            }
        };
        let Some(r) = b.create_flushed(tino, content).await else {
            // Flushed already (or now, in order after what came before it).
            put_back(&mut locked(&st.inner));
            drop(turn);
            return self.k(tino).await.map(Some);
        };
        let mut inner = locked(&st.inner);
        match r {
            Ok(a) => {
                inner.inflight = None;
                inner.generation += 1;
                inner.attr = Some(a);
                inner.extents = None;
                drop(inner);
                drop(turn);
                self.rekey(tino, &a);
                locked(&self.versions).insert(a.ino, a.version);
                Ok(if data.is_some() { None } else { Some(a.ino) })
            }
            Err(e) => {
                put_back(&mut inner);
                tracing::error!(ino = tino, error = %e, "write-behind: a file made here could not be created");
                Err(err(e))
            }
        }
    }

    /// A file made here alone (local inode `local`) now has the tracker's
    /// attributes `a`: its open state, handles and version follow.
    pub(crate) fn rekey(&self, local: u64, a: &pb::Attr) {
        let mut files = locked(&self.files);
        if let Some(st) = files.remove(&local) {
            {
                let mut inner = locked(&st.inner);
                if inner.attr.is_none_or(|o| o.ino == local) {
                    inner.attr = Some(*a);
                }
                if inner
                    .extents
                    .as_ref()
                    .is_some_and(|fe| fe.attr.is_some_and(|x| x.ino == local))
                {
                    inner.extents = Some(Arc::new(pb::FileExtents {
                        attr: Some(*a),
                        ..Default::default()
                    }));
                }
            }
            files.insert(a.ino, st);
        }
        drop(files);
        {
            let mut kept = locked(&self.kept.files);
            if let Some(tries) = kept.remove(&local) {
                kept.insert(a.ino, tries);
            }
        }
        for h in locked(&self.handles).values_mut() {
            if h.ino == local {
                h.ino = a.ino;
            }
        }
        let mut versions = locked(&self.versions);
        if versions.remove(&local).is_some() {
            versions.insert(a.ino, a.version);
        }
    }

    /// Stores one batch, the first commit emptying the file first when
    /// `truncate`. `None`: the file no longer exists on the tracker. On
    /// failure, with the error, the append commit that got no answer (then
    /// every commit before it applied).
    async fn store(
        &self,
        tino: u64,
        batch: &Dirty,
        truncate: bool,
    ) -> Result<Option<pb::Attr>, (Errno, Option<PreparedCommit>)> {
        let (segments, appends) = batch.clone().into_parts();
        let mut attr = None;
        let mut truncate = truncate;
        let writes = segments
            .iter()
            .map(|(o, d)| (*o, d.as_slice(), false))
            .chain((!appends.is_empty()).then_some((0u64, appends.as_slice(), true)));
        let empty: &[u8] = &[];
        let only_truncate = (truncate && batch.is_empty()).then_some((0u64, empty, false));
        for (extents_at, data, append) in writes.chain(only_truncate) {
            // Inline when small (the Raft entry is the durable copy), else
            // blocks to the write quorum, then the extents.
            let how = failsafe_client::Commit {
                append,
                truncate: std::mem::take(&mut truncate),
            };
            let mut commit = self
                .client
                .prepare_store(tino, extents_at, data, how)
                .await
                .map_err(|e| (err(e), None))?;
            match self.client.commit_prepared(&mut commit).await {
                Ok(a) => attr = Some(a),
                Err(e) if e.code() == Some(ErrorCode::NotFound) => return Ok(None),
                // A positioned write sent again lands the same; an append
                // would land twice (see `ClientError::retry_verbatim`).
                Err(e) if append && e.retry_verbatim() => return Err((err(e), Some(commit))),
                Err(e) => return Err((err(e), None)),
            }
        }
        Ok(attr)
    }

    /// The upload a write waits for (backpressure): its failure is that
    /// write's error. The bytes stay buffered for the next attempt.
    pub(crate) async fn upload_for_write(&self, tino: u64) -> Res<()> {
        let Some(st) = self.state(tino) else {
            return Ok(());
        };
        self.upload(tino, &st).await
    }

    /// A background upload started by a write that filled the buffer.
    pub(crate) async fn background_upload(&self, tino: u64) {
        let Some(st) = self.state(tino) else { return };
        if let Err(e) = self.upload(tino, &st).await {
            tracing::warn!(ino = tino, error = ?e, "background upload failed; the next flush retries it");
            locked(&st.inner).error = Some(e);
        }
    }

    pub(crate) async fn release(&self, fh: u64, lock_owner: Option<u64>) -> Res<()> {
        let (tino, _) = self.handle_ino(fh)?;
        let flushed = self.flush_ino(tino).await;
        // A file made here alone has the tracker's inode now.
        let (tino, _) = self.handle_ino(fh).unwrap_or((tino, false));
        if let Some(owner) = lock_owner {
            self.unlock_owner(tino, owner).await;
        }
        let lockers = locked(&self.handles)
            .remove(&fh)
            .map(|h| h.lockers)
            .unwrap_or_default();
        for owner in lockers {
            self.unlock_owner(tino, owner).await;
        }
        let mut files = locked(&self.files);
        let mut kept = false;
        if let Some(st) = files.get(&tino).cloned() {
            let mut inner = locked(&st.inner);
            inner.opens = inner.opens.saturating_sub(1);
            if inner.opens == 0 {
                kept = flushed.is_err() && inner.unstored();
                drop(inner);
                if kept {
                    locked(&self.kept.files).entry(tino).or_insert(0);
                } else {
                    files.remove(&tino);
                }
            }
        }
        drop(files);
        if let Err(e) = &flushed {
            if kept {
                tracing::error!(ino = tino, error = ?e, "data of a closed file could not be stored; kept here and stored as soon as the cluster takes it");
            } else {
                tracing::error!(ino = tino, error = ?e, "data of a closed file could not be stored");
            }
        }
        flushed
    }

    /// Stores the bytes of files closed after a failed flush, every few
    /// seconds (at most every 30 s after repeated failures), until the
    /// cluster takes them. Runs for the life of the mount.
    pub(crate) async fn store_kept(self: Arc<Self>) {
        const FIRST: Duration = Duration::from_secs(2);
        loop {
            let waiting: Vec<(u64, u64)> = locked(&self.kept.files)
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect();
            let pause = waiting
                .iter()
                .map(|(_, tries)| FIRST * (1u32 << (*tries).min(4)))
                .min()
                .unwrap_or(FIRST)
                .min(Duration::from_secs(30));
            tokio::time::sleep(pause).await;
            for (tino, _) in waiting {
                let r = self.flush_ino(tino).await;
                let mut files = locked(&self.files);
                let mut kept = locked(&self.kept.files);
                let Some(st) = files.get(&tino).cloned() else {
                    kept.remove(&tino);
                    continue;
                };
                let inner = locked(&st.inner);
                match r {
                    Ok(()) if !inner.unstored() => {
                        kept.remove(&tino);
                        self.kept.stored_late.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            ino = tino,
                            "data of a file closed after a failed flush is stored now"
                        );
                        if inner.opens == 0 {
                            drop(inner);
                            files.remove(&tino);
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        self.kept.retries.fetch_add(1, Ordering::Relaxed);
                        let tries = kept.entry(tino).or_insert(0);
                        *tries += 1;
                        if tries.is_power_of_two() {
                            tracing::warn!(ino = tino, tries = *tries, error = ?e, "data of a closed file still cannot be stored; trying again");
                        }
                    }
                }
            }
        }
    }

    pub(crate) async fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        if mode != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let (tino, _) = self.handle_ino(fh)?;
        let want = offset.saturating_add(length);
        let size = self.getattr(self.f(tino)).await?.0.size;
        if want > size {
            self.flush_ino(tino).await?;
            self.setattr(self.f(tino), None, None, None, Some(want), None, None)
                .await?;
        }
        Ok(())
    }

    // ---------- directories ----------

    /// Opens `ino`'s listing: its handle and what the kernel may cache of
    /// it. The kernel keeps its cached listing only while it is the one
    /// this mount holds under lease now and every name readdirplus gave it
    /// is still valid there (a listing from the kernel's cache carries no
    /// attributes and renews no name: were names to expire, `ls -l` would
    /// look each up again).
    pub(crate) async fn opendir(&self, ino: u64) -> Res<(u64, DirCache)> {
        let tino = self.k(ino).await?;
        self.settle(tino).await;
        let listing = self.client.list_leased(tino).await.map_err(err)?.value;
        let kernel_gen = self.kernel_gen();
        let source = ListingSource {
            listing: Arc::downgrade(&listing),
            kernel_gen,
        };
        let cached = !self.listing_ttl(ino).is_zero();
        if cached {
            // Unchanged since the kernel took it whole: nothing to build
            // (a large directory's listing costs a millisecond to make).
            let kept = locked(&self.kernel_listings);
            if let Some(k) = kept.get(&ino).filter(|k| {
                k.fresh_until > Instant::now() + KEEP_LISTING_MARGIN
                    && k.source.is(&listing, kernel_gen)
            }) {
                let entries = k.entries.clone();
                drop(kept);
                return Ok((
                    self.open_dir(entries, source, DirCache::Keep),
                    DirCache::Keep,
                ));
            }
        }
        let mut entries: Vec<(u64, FileType, Vec<u8>)> = Vec::with_capacity(listing.len() + 2);
        entries.push((ino, FileType::Directory, b".".to_vec()));
        entries.push((ino, FileType::Directory, b"..".to_vec()));
        entries.extend(
            listing
                .iter()
                .map(|e| (self.f(e.ino), kind(e.kind), e.name.clone())),
        );
        let (entries, cache) = if !cached {
            (Arc::new(entries), DirCache::Off)
        } else {
            let mut kept = locked(&self.kernel_listings);
            let now = Instant::now();
            kept.retain(|_, k| k.fresh_until > now);
            match kept.get_mut(&ino) {
                Some(k) if k.fresh_until > now + KEEP_LISTING_MARGIN && *k.entries == entries => {
                    k.source = source.clone();
                    (k.entries.clone(), DirCache::Keep)
                }
                _ => {
                    kept.remove(&ino);
                    (Arc::new(entries), DirCache::Fill)
                }
            }
        };
        Ok((self.open_dir(entries, source, cache), cache))
    }

    /// A handle for an opened listing.
    fn open_dir(&self, entries: Listing, source: ListingSource, cache: DirCache) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let open = OpenDir {
            entries,
            source,
            cache,
            fresh_until: None,
        };
        locked(&self.dirs).insert(fh, open);
        fh
    }

    /// One entry of an opened listing for readdirplus: its attributes now
    /// and how long the kernel may keep the entry; `None` when the name is
    /// gone since the listing was read. `dir` is the listing's directory.
    pub(crate) async fn listed_attr(
        &self,
        listing_ttl: Duration,
        ino: u64,
    ) -> Res<Option<(FileAttr, Duration)>> {
        match self.getattr(ino).await {
            Ok((a, _)) if a.nlink == 0 => Ok(None),
            // The name may stay as long as the directory's listing is
            // leased, the attributes as long as the inode's.
            Ok((a, ttl)) => Ok(Some((a, ttl.min(listing_ttl)))),
            Err(Errno::ESTALE) | Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Core::listed_attr`] for a run of a listing's entries: those held
    /// under lease answered under one lock, the others asked one by one.
    pub(crate) async fn listed_attrs(
        &self,
        listing_ttl: Duration,
        inos: &[u64],
    ) -> Res<Vec<Option<(FileAttr, Duration)>>> {
        let tinos: Vec<u64> = inos.iter().map(|&i| self.t(i)).collect();
        let cached = self.client.cached_attrs(&tinos);
        let mut out = Vec::with_capacity(inos.len());
        for (&ino, hit) in inos.iter().zip(cached) {
            out.push(match hit {
                Some(l) if l.value.nlink == 0 => None,
                Some(l) => Some((self.file_attr(&l.value), l.ttl.min(listing_ttl))),
                None => self.listed_attr(listing_ttl, ino).await?,
            });
        }
        Ok(out)
    }

    /// How long the kernel may keep `name` in `parent` with the attributes
    /// of what it names, as this mount just made it: the rest of the lease
    /// while the leader's read-back of it is cached, else nothing. (An
    /// invalidation the notifier sends after this waits for the reply: the
    /// kernel holds the directory's lock through the request.)
    pub(crate) fn entry_ttl(&self, parent: u64, name: &std::ffi::OsStr) -> Duration {
        self.client.entry_ttl(self.t(parent), &name_bytes(name))
    }

    /// How long the kernel may keep names from `dir`'s listing (see
    /// [`failsafe_client::Client::listing_ttl`]).
    pub(crate) fn listing_ttl(&self, dir: u64) -> Duration {
        self.client.listing_ttl(self.t(dir))
    }

    /// How many times the kernel's numbers for flushed inodes have changed
    /// (write-behind; 0 without it): a listing mapped at another count
    /// names what the kernel no longer knows by those numbers.
    fn kernel_gen(&self) -> u64 {
        self.behind.as_ref().map_or(0, |b| b.kernel_gen())
    }

    /// How long the kernel may keep the names readdirplus gives it from
    /// the listing opened as `fh`: as long as [`Core::listing_ttl`] while
    /// that listing is still the one cached now, else nothing. A listing opened before a change in the directory
    /// still names what the change moved or removed (a temp file renamed
    /// over a page, by the inode that is now the page's): given a lease,
    /// the kernel would keep that name for it, and a later `open(O_CREAT)`
    /// of the temp name would open the page, or a rename of it fail.
    pub(crate) fn opened_listing_ttl(&self, fh: u64) -> Duration {
        // An opened listing starts with its directory's `.`.
        let Some((dir, source)) = locked(&self.dirs)
            .get(&fh)
            .and_then(|d| Some((d.entries.first()?.0, d.source.clone())))
        else {
            return Duration::ZERO;
        };
        let kernel_gen = self.kernel_gen();
        self.client
            .listing_ttl_if(self.t(dir), |l| source.is(l, kernel_gen))
    }

    pub(crate) fn dir_entries(&self, fh: u64) -> Option<Listing> {
        locked(&self.dirs).get(&fh).map(|d| d.entries.clone())
    }

    /// Readdirplus gave the kernel names of `fh`'s listing valid there
    /// until `until`, up to its end if `end`: a listing the kernel now
    /// caches whole is kept for the next open while it stays fresh.
    pub(crate) fn listed(&self, fh: u64, until: Instant, end: bool) {
        let mut dirs = locked(&self.dirs);
        let Some(open) = dirs.get_mut(&fh) else {
            return;
        };
        let until = open.fresh_until.map_or(until, |t| t.min(until));
        open.fresh_until = Some(until);
        if end && open.cache == DirCache::Fill {
            let Some(&(dir, _, _)) = open.entries.first() else {
                return;
            };
            let kept = KernelListing {
                entries: open.entries.clone(),
                source: open.source.clone(),
                fresh_until: until,
            };
            drop(dirs);
            locked(&self.kernel_listings).insert(dir, kept);
        }
    }

    pub(crate) fn releasedir(&self, fh: u64) {
        locked(&self.dirs).remove(&fh);
    }

    // ---------- locks ----------

    /// Opens the lock session now rather than at the first lock: its
    /// renewals tell the leader this web host's clock, so a clock that is
    /// off shows in `fsctl status` and the metrics whether or not the wiki
    /// ever takes a lock (most lock with mkdir).
    pub(crate) async fn open_session(self: Arc<Self>) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.with_session(|_, _| Box::pin(async { Ok(()) })).await {
            tracing::info!(error = %e, "no lock session yet; one opens at the first lock");
        }
    }

    async fn with_session<T>(
        &self,
        f: impl for<'a> Fn(
            &'a Client,
            &'a Session,
        ) -> futures::future::BoxFuture<'a, Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let mut slot = self.session.lock().await;
        for _ in 0..2 {
            if slot.is_none() {
                *slot = Some(self.client.open_session(Duration::from_secs(15)).await?);
            }
            let Some(session) = slot.as_ref() else {
                continue;
            };
            match f(&self.client, session).await {
                Err(e) if e.code() == Some(ErrorCode::NoSession) => {
                    // The lease lapsed (a long partition): locks are gone;
                    // start a new session for this request.
                    tracing::warn!("lock session expired; opening a new one");
                    *slot = None;
                }
                r => return r,
            }
        }
        Err(ClientError::Unavailable("no lock session".into()))
    }

    /// One attempt at a lock change. `typ` is F_RDLCK, F_WRLCK or F_UNLCK;
    /// `end` is inclusive, as FUSE sends it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn setlk(
        &self,
        ino: u64,
        pid: u32,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
    ) -> Res<()> {
        let tino = self.k(ino).await?;
        // A lock orders what this mount did before it for everyone else.
        self.settle_all().await;
        let ltype = match typ {
            libc::F_RDLCK => pb::LockType::LockRead,
            libc::F_WRLCK => pb::LockType::LockWrite,
            libc::F_UNLCK => pb::LockType::LockUnlock,
            _ => return Err(Errno::EINVAL),
        };
        let end = if end >= i64::MAX as u64 {
            u64::MAX
        } else {
            end + 1
        };
        let req = LockRequest {
            ino: tino,
            owner,
            kind: pb::LockKind::LockPosix,
            ltype,
            start,
            end,
        };
        self.with_session(|c, s| Box::pin(c.lock(s, req)))
            .await
            .map_err(err)?;
        if ltype != pb::LockType::LockUnlock {
            locked(&self.lock_owners).insert((tino, owner));
            // POSIX: closing any descriptor of the file drops the locks of
            // the process; its read-only ones send no flush (see `open`).
            for h in locked(&self.handles).values_mut() {
                if h.noflush && h.ino == tino && h.pid == pid && !h.lockers.contains(&owner) {
                    h.lockers.push(owner);
                }
            }
        }
        Ok(())
    }

    /// The lock that would block `owner` from `typ` on [start, end], if any.
    pub(crate) async fn getlk(
        &self,
        ino: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
    ) -> Res<Option<(u64, u64, i32)>> {
        let tino = self.k(ino).await?;
        let end = if end >= i64::MAX as u64 {
            u64::MAX
        } else {
            end + 1
        };
        let locks = self.client.list_locks(tino).await.map_err(err)?;
        let my_session = self.session.lock().await.as_ref().map(|s| s.id);
        for l in locks {
            let mine = Some(l.session_id) == my_session && l.owner == owner;
            let overlaps = l.start < end && start < l.end;
            let writes = l.r#type == pb::LockType::LockWrite as i32 || typ == libc::F_WRLCK;
            if !mine && overlaps && writes {
                let t = if l.r#type == pb::LockType::LockWrite as i32 {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                let e = if l.end == u64::MAX {
                    i64::MAX as u64
                } else {
                    l.end - 1
                };
                return Ok(Some((l.start, e, t)));
            }
        }
        Ok(None)
    }

    /// Drops every lock `owner` holds on `tino` through this mount (close of
    /// a POSIX lock owner's file, or the last close of a flock'ed file).
    pub(crate) async fn unlock_owner(&self, tino: u64, owner: u64) {
        if !locked(&self.lock_owners).remove(&(tino, owner)) {
            return;
        }
        let req = LockRequest {
            ino: tino,
            owner,
            kind: pb::LockKind::LockPosix,
            ltype: pb::LockType::LockUnlock,
            start: 0,
            end: u64::MAX,
        };
        if let Err(e) = self.with_session(|c, s| Box::pin(c.lock(s, req))).await {
            tracing::warn!(ino = tino, error = %e, "releasing locks failed; the session lease will release them");
        }
    }

    pub(crate) async fn close_session(&self) {
        if let Some(s) = self.session.lock().await.take() {
            let _ = s.close().await;
        }
    }
}
