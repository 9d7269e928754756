//! The snapshots, read-only, at `.snapshots/NAME/...` in the mount's root
//! (not listed there, as ZFS's `.zfs`: `find`, `tar` and `rm -rf` of the
//! root do not walk into them). A snapshot never changes, so what is read
//! of it may be kept as long as the kernel likes; only the list of
//! snapshots is asked for again (after `LIST_TTL`).
//!
//! The kernel knows a snapshot's inode `ino` of snapshot `snap` as
//! `SNAP_BASE | snap << 40 | ino` (below write-behind's local numbers at
//! 2^62), and `.snapshots` itself as `SNAP_BASE`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use failsafe_client::pb::{self, in_snapshot::Read, query_reply::Reply, query_request::Query};
use fuser::{Errno, FileAttr, FileType};

use crate::core::{fuse_attr, Core};
use crate::errno::errno;

pub(crate) const SNAP_BASE: u64 = 1 << 61;
const SNAP_SHIFT: u32 = 40;
const MAX_SNAP: u64 = (1 << (61 - SNAP_SHIFT)) - 1;
/// `.snapshots`, in the mount's root.
pub(crate) const SNAPSHOTS_DIR: u64 = SNAP_BASE;
pub(crate) const NAME: &[u8] = b".snapshots";
/// How long the list of snapshots is used before it is asked for again.
const LIST_TTL: Duration = Duration::from_secs(1);
/// What the kernel may keep of a snapshot's names and attributes.
pub(crate) const TTL: Duration = Duration::from_secs(3600);

type Res<T> = Result<T, Errno>;

/// Whether the kernel's inode `ino` is in the snapshot view.
pub(crate) fn owns(ino: u64) -> bool {
    (SNAP_BASE..crate::behind::LOCAL_BASE).contains(&ino)
}

fn kernel_ino(snap: u64, ino: u64) -> Res<u64> {
    if snap == 0 || snap > MAX_SNAP || ino >= 1 << SNAP_SHIFT {
        return Err(Errno::EOVERFLOW);
    }
    Ok(SNAP_BASE | snap << SNAP_SHIFT | ino)
}

fn split(kernel: u64) -> (u64, u64) {
    (
        (kernel - SNAP_BASE) >> SNAP_SHIFT,
        kernel & ((1 << SNAP_SHIFT) - 1),
    )
}

/// A listing: (kernel inode, kind, name, attributes when known), `.` and
/// `..` first.
pub(crate) type Entries = Arc<Vec<(u64, FileType, Vec<u8>, Option<FileAttr>)>>;

#[derive(Default)]
pub(crate) struct Snaps {
    list: Mutex<Option<(Instant, Arc<Vec<pb::Snapshot>>)>>,
    files: Mutex<HashMap<u64, Arc<pb::FileExtents>>>,
    dirs: Mutex<HashMap<u64, Entries>>,
    next_fh: AtomicU64,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot's inode as the kernel sees it: read-only.
fn snap_attr(snap: u64, a: &pb::Attr) -> Res<FileAttr> {
    let mut f = fuse_attr(a, kernel_ino(snap, a.ino)?, a.size);
    f.perm &= !0o222;
    Ok(f)
}

/// `.snapshots` itself: a read-only directory, as old as the newest
/// snapshot.
fn dir_attr(list: &[pb::Snapshot]) -> FileAttr {
    let newest = list.iter().map(|s| s.created_ns).max().unwrap_or(0);
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(newest.max(0) as u64);
    FileAttr {
        ino: fuser::INodeNo(SNAPSHOTS_DIR),
        size: 0,
        blocks: 0,
        atime: at,
        mtime: at,
        ctime: at,
        crtime: at,
        kind: FileType::Directory,
        perm: 0o555,
        nlink: 2 + list.len() as u32,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

impl Snaps {
    fn fh(&self) -> u64 {
        // Apart from the mount's own handles, for the logs' sake.
        (1 << 62) | self.next_fh.fetch_add(1, Ordering::Relaxed)
    }
}

impl Core {
    async fn ask(&self, snap: u64, read: Read) -> Res<Reply> {
        let q = Query::InSnapshot(pb::InSnapshot {
            snapshot: snap,
            read: Some(read),
        });
        self.client.query_available(q).await.map_err(|e| errno(&e))
    }

    async fn snapshots(&self) -> Res<Arc<Vec<pb::Snapshot>>> {
        if let Some((at, list)) = locked(&self.snaps.list).as_ref() {
            if at.elapsed() < LIST_TTL {
                return Ok(list.clone());
            }
        }
        let list = match self
            .client
            .query_available(Query::ListSnapshots(pb::ListSnapshots {}))
            .await
        {
            Ok(Reply::SnapshotList(l)) => Arc::new(l.snapshots),
            Ok(_) => return Err(Errno::EIO),
            Err(e) => return Err(errno(&e)),
        };
        *locked(&self.snaps.list) = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    async fn snap_getattr_of(&self, snap: u64, ino: u64) -> Res<FileAttr> {
        match self
            .ask(
                snap,
                Read::GetAttr(pb::GetAttr {
                    ino,
                    extents: false,
                }),
            )
            .await?
        {
            Reply::Attr(a) => snap_attr(snap, &a),
            _ => Err(Errno::EIO),
        }
    }

    /// What `.snapshots/NAME` shows of snapshot `s`: the mounted directory
    /// as the snapshot has it, so paths read as on the mount (a snapshot
    /// keeps inode numbers, and a mount of a subtree knows its top's);
    /// the snapshot's own top when it does not hold that directory.
    async fn view_root(&self, s: &pb::Snapshot) -> Res<FileAttr> {
        let top = self.t(fuser::INodeNo::ROOT.0);
        if top != s.root {
            match self.snap_getattr_of(s.id, top).await {
                Ok(a) if a.kind == FileType::Directory => return Ok(a),
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        self.snap_getattr_of(s.id, s.root).await
    }

    /// A name in the view (or `.snapshots` in the root).
    pub(crate) async fn snap_lookup(&self, parent: u64, name: &OsStr) -> Res<FileAttr> {
        if parent == SNAPSHOTS_DIR {
            let list = self.snapshots().await?;
            let s = list
                .iter()
                .find(|s| s.name.as_bytes() == name.as_bytes())
                .ok_or(Errno::ENOENT)?;
            return self.view_root(s).await;
        }
        if !owns(parent) {
            // The root's `.snapshots`.
            return Ok(dir_attr(&self.snapshots().await?));
        }
        let (snap, dir) = split(parent);
        let read = Read::Lookup(pb::Lookup {
            parent: dir,
            name: name.as_bytes().to_vec(),
            extents: false,
        });
        match self.ask(snap, read).await? {
            Reply::Attr(a) => snap_attr(snap, &a),
            _ => Err(Errno::EIO),
        }
    }

    /// How long the kernel may keep a name of directory `parent` and its
    /// attributes: a snapshot's for long, the list of snapshots a second.
    pub(crate) fn snap_ttl(parent: u64) -> Duration {
        if owns(parent) && parent != SNAPSHOTS_DIR {
            TTL
        } else {
            LIST_TTL
        }
    }

    pub(crate) async fn snap_getattr(&self, ino: u64) -> Res<FileAttr> {
        if ino == SNAPSHOTS_DIR {
            return Ok(dir_attr(&self.snapshots().await?));
        }
        let (snap, ino) = split(ino);
        self.snap_getattr_of(snap, ino).await
    }

    pub(crate) async fn snap_readlink(&self, ino: u64) -> Res<Vec<u8>> {
        let (snap, ino) = split(ino);
        match self.ask(snap, Read::ReadLink(pb::ReadLink { ino })).await? {
            Reply::Target(t) => Ok(t.target),
            _ => Err(Errno::EIO),
        }
    }

    /// Reads a directory of the view whole; its handle.
    pub(crate) async fn snap_opendir(&self, ino: u64) -> Res<u64> {
        let mut entries = vec![(ino, FileType::Directory, b".".to_vec(), None)];
        if ino == SNAPSHOTS_DIR {
            entries.push((
                fuser::INodeNo::ROOT.0,
                FileType::Directory,
                b"..".to_vec(),
                None,
            ));
            for s in self.snapshots().await?.iter() {
                let root = self.view_root(s).await?;
                entries.push((
                    root.ino.0,
                    FileType::Directory,
                    s.name.as_bytes().to_vec(),
                    Some(root),
                ));
            }
        } else {
            // The kernel takes `..` from its own dentries.
            entries.push((ino, FileType::Directory, b"..".to_vec(), None));
            let (snap, dir) = split(ino);
            let mut after = Vec::new();
            loop {
                let read = Read::ReadDir(pb::ReadDir {
                    ino: dir,
                    after: after.clone(),
                    limit: 1000,
                    plus: true,
                    extents: false,
                });
                let Reply::DirPage(page) = self.ask(snap, read).await? else {
                    return Err(Errno::EIO);
                };
                for e in &page.entries {
                    let attr = e.attr.as_ref().map(|a| snap_attr(snap, a)).transpose()?;
                    entries.push((
                        kernel_ino(snap, e.ino)?,
                        crate::core::kind(e.kind),
                        e.name.clone(),
                        attr,
                    ));
                }
                match (page.more, page.entries.last()) {
                    (true, Some(last)) => after = last.name.clone(),
                    _ => break,
                }
            }
        }
        let fh = self.snaps.fh();
        locked(&self.snaps.dirs).insert(fh, Arc::new(entries));
        Ok(fh)
    }

    pub(crate) fn snap_entries(&self, fh: u64) -> Option<Entries> {
        locked(&self.snaps.dirs).get(&fh).cloned()
    }

    /// Whether `fh` is a handle of the view (and forgets it).
    pub(crate) fn snap_release(&self, fh: u64) -> bool {
        locked(&self.snaps.dirs).remove(&fh).is_some()
            || locked(&self.snaps.files).remove(&fh).is_some()
    }

    /// Opens a file of the view for reading (writing: EROFS); its handle.
    pub(crate) async fn snap_open(&self, ino: u64, flags: i32) -> Res<u64> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(Errno::EROFS);
        }
        if ino == SNAPSHOTS_DIR {
            return Err(Errno::EISDIR);
        }
        let (snap, ino) = split(ino);
        let read = Read::ReadExtents(failsafe_client::whole_file(ino));
        let Reply::FileExtents(fe) = self.ask(snap, read).await? else {
            return Err(Errno::EIO);
        };
        let fh = self.snaps.fh();
        locked(&self.snaps.files).insert(fh, Arc::new(fe));
        Ok(fh)
    }

    pub(crate) async fn snap_read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        let fe = locked(&self.snaps.files)
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)?;
        let stored = fe.attr.as_ref().map_or(0, |a| a.size);
        if offset >= stored {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(u64::from(size)).min(stored);
        let mut buf = vec![0u8; (end - offset) as usize];
        self.fill(&fe, offset, stored, &mut buf).await?;
        Ok(buf)
    }

    pub(crate) async fn snap_xattrs(&self, ino: u64) -> Res<Vec<pb::Xattr>> {
        if ino == SNAPSHOTS_DIR {
            return Ok(Vec::new());
        }
        let (snap, ino) = split(ino);
        match self
            .ask(snap, Read::ListXattrs(pb::ListXattrs { ino }))
            .await?
        {
            Reply::Xattrs(x) => Ok(x.entries),
            _ => Err(Errno::EIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{kernel_ino, owns, split, SNAPSHOTS_DIR};

    #[test]
    fn snapshot_inodes_are_apart_from_the_mounts_own() {
        let k = kernel_ino(3, 12345).expect("fits");
        assert!(owns(k) && owns(SNAPSHOTS_DIR));
        assert!(!owns(12345) && !owns(crate::behind::LOCAL_BASE));
        assert_eq!(split(k), (3, 12345));
        assert!(kernel_ino(0, 1).is_err());
        assert!(kernel_ino(1, 1 << 40).is_err());
    }
}
