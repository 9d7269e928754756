//! Files and directories: inodes, directory entries and attributes.

use crate::db::CachedSql;
use failsafe_core::ROOT_INO;
use failsafe_proto::pb::{self, ErrorCode, FileKind};
use rusqlite::{params, OptionalExtension, Transaction};

use super::blocks::{note_unreferenced, punch, MAX_FILE_BYTES};
use super::schema::ATTR_COLS;
use super::{check_name, err, i, kept, OpError, OpResult};

pub(super) fn attr_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<pb::Attr> {
    Ok(pb::Attr {
        ino: row.get::<_, i64>(0)? as u64,
        kind: row.get(1)?,
        mode: row.get(2)?,
        uid: row.get(3)?,
        gid: row.get(4)?,
        size: row.get::<_, i64>(5)? as u64,
        atime_ns: row.get(6)?,
        mtime_ns: row.get(7)?,
        ctime_ns: row.get(8)?,
        nlink: row.get(9)?,
        version: row.get::<_, i64>(10)? as u64,
        rdev: row.get::<_, Option<u32>>(11)?.unwrap_or(0),
    })
}

/// A file's attributes. One in the trash (no name left, `nlink` 0) is not
/// found: it is nobody's to read or change until it is restored.
pub(super) fn get_attr(tx: &rusqlite::Connection, ino: u64) -> OpResult<pb::Attr> {
    find_attr(tx, ino)?
        .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no inode {ino}")).into())
}

/// [`get_attr`], with `None` for an inode that is not found.
pub(super) fn find_attr(tx: &rusqlite::Connection, ino: u64) -> rusqlite::Result<Option<pb::Attr>> {
    tx.row(
        &format!("SELECT {ATTR_COLS} FROM inodes WHERE ino = ?1 AND nlink > 0"),
        [i(ino)],
        attr_row,
    )
    .optional()
}

/// A file's attributes, in the trash or not (what the trash forgets).
pub(super) fn any_attr(tx: &rusqlite::Connection, ino: u64) -> OpResult<pb::Attr> {
    tx.row(
        &format!("SELECT {ATTR_COLS} FROM inodes WHERE ino = ?1"),
        [i(ino)],
        attr_row,
    )
    .optional()?
    .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no inode {ino}")).into())
}
pub(super) fn lookup_ino(
    tx: &rusqlite::Connection,
    parent: u64,
    name: &[u8],
) -> OpResult<Option<u64>> {
    Ok(tx
        .row(
            "SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2",
            params![i(parent), name],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|v| v as u64))
}

pub(super) fn require_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<pb::Attr> {
    let a = get_attr(tx, ino)?;
    if a.kind != FileKind::KindDir as i32 {
        return err(ErrorCode::NotDir, format!("inode {ino} is not a directory"));
    }
    Ok(a)
}

fn new_inode(
    tx: &Transaction<'_>,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    now: i64,
    target: Option<&[u8]>,
) -> OpResult<pb::Attr> {
    let ino: i64 = tx.row("SELECT value FROM meta WHERE key = 'next_ino'", [], |r| {
        r.get(0)
    })?;
    tx.exec(
        "UPDATE meta SET value = ?1 WHERE key = 'next_ino'",
        [ino + 1],
    )?;
    let nlink = if kind == FileKind::KindDir { 2 } else { 1 };
    let size = target.map_or(0, |t| t.len() as i64);
    tx.exec(
        "INSERT INTO inodes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?8, 1, ?9)",
        params![
            ino,
            kind as i32,
            mode & 0o7777,
            uid,
            gid,
            size,
            now,
            nlink,
            target
        ],
    )?;
    get_attr(tx, ino as u64)
}

/// Forgets inode `a` with its extents, extended attributes and device
/// number; the blocks no file references any more are idle from
/// `leader_now`.
pub(super) fn free_inode(tx: &Transaction<'_>, a: &pb::Attr, leader_now: i64) -> OpResult<()> {
    let ino = a.ino;
    tx.exec("DELETE FROM inodes WHERE ino = ?1", [i(ino)])?;
    if is_device(a.kind) {
        tx.exec("DELETE FROM device_numbers WHERE ino = ?1", [i(ino)])?;
    }
    tx.exec("DELETE FROM xattrs WHERE ino = ?1", [i(ino)])?;
    let hashes: Vec<Vec<u8>> = tx
        .prepare_cached("SELECT DISTINCT hash FROM extents WHERE ino = ?1 AND data IS NULL")?
        .query_map([i(ino)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tx.exec("DELETE FROM extents WHERE ino = ?1", [i(ino)])?;
    note_unreferenced(tx, &hashes, leader_now)
}

/// A directory's entries changed: bump its mtime, ctime and version.
fn touch_dir(tx: &Transaction<'_>, ino: u64, now: i64, nlink_delta: i64) -> OpResult<()> {
    tx.exec(
        "UPDATE inodes SET mtime = MAX(mtime, ?2), ctime = MAX(ctime, ?2), version = version + 1, nlink = nlink + ?3 WHERE ino = ?1",
        params![i(ino), now, nlink_delta],
    )?;
    Ok(())
}

/// Drops one link to `ino`, whose entry `name` of directory `parent` went.
/// At zero the inode goes to the trash, where the policy keeps it: it
/// stays as it is, with `nlink` 0 and no name; otherwise it is freed.
pub(super) fn drop_link(
    tx: &Transaction<'_>,
    ino: u64,
    parent: u64,
    name: &[u8],
    now: i64,
    leader_now: i64,
) -> OpResult<()> {
    let a = get_attr(tx, ino)?;
    if a.kind == FileKind::KindDir as i32 || a.nlink <= 1 {
        if a.kind == FileKind::KindDir as i32 {
            kept::forget_dir(tx, ino)?;
        }
        if kept::to_trash(tx, &a, parent, name, leader_now)? {
            tx.exec(
                "UPDATE inodes SET nlink = 0, ctime = MAX(ctime, ?2) WHERE ino = ?1",
                params![i(ino), now],
            )?;
        } else {
            free_inode(tx, &a, leader_now)?;
        }
        // Locks stay: descriptors open elsewhere may still hold and release
        // them (lock, unlink, unlock). Inode numbers are never reused, and
        // session close or expiry removes them.
    } else {
        tx.exec(
            "UPDATE inodes SET nlink = nlink - 1, ctime = ?2 WHERE ino = ?1",
            params![i(ino), now],
        )?;
    }
    Ok(())
}

fn is_empty_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<bool> {
    let n: i64 = tx.row(
        "SELECT COUNT(*) FROM (SELECT 1 FROM dentries WHERE parent = ?1 LIMIT 1)",
        [i(ino)],
        |r| r.get(0),
    )?;
    Ok(n == 0)
}

/// The directory holding directory `ino` (directories have exactly one entry).
fn parent_of_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<Option<u64>> {
    Ok(tx
        .row(
            "SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1",
            [i(ino)],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|v| v as u64))
}

/// Whether `dir` is `ancestor` or lies beneath it.
fn is_within(tx: &rusqlite::Connection, mut dir: u64, ancestor: u64) -> OpResult<bool> {
    loop {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT_INO {
            return Ok(false);
        }
        match parent_of_dir(tx, dir)? {
            Some(p) => dir = p,
            None => return Ok(false),
        }
    }
}

fn is_device(kind: i32) -> bool {
    kind == FileKind::KindCharDevice as i32 || kind == FileKind::KindBlockDevice as i32
}

/// What a `Create` makes: a file, or a special file (made exclusively and
/// empty, as mknod does).
fn created_kind(c: &pb::Create) -> OpResult<FileKind> {
    let kind = match FileKind::try_from(c.kind) {
        Ok(FileKind::KindUnspecified | FileKind::KindFile) => return Ok(FileKind::KindFile),
        Ok(
            k @ (FileKind::KindFifo
            | FileKind::KindSocket
            | FileKind::KindCharDevice
            | FileKind::KindBlockDevice),
        ) => k,
        _ => {
            return err(
                ErrorCode::Invalid,
                "create makes a file, a FIFO, a socket or a device node",
            )
        }
    };
    if !c.exclusive || c.content.is_some() {
        return err(
            ErrorCode::Invalid,
            "a special file is made exclusively and without content",
        );
    }
    Ok(kind)
}

pub(super) fn create(tx: &Transaction<'_>, c: &pb::Create, now: i64) -> OpResult<pb::Attr> {
    check_name(&c.name)?;
    let kind = created_kind(c)?;
    require_dir(tx, c.parent)?;
    if let Some(ino) = lookup_ino(tx, c.parent, &c.name)? {
        if c.exclusive {
            return err(ErrorCode::Exists, "file exists");
        }
        let a = get_attr(tx, ino)?;
        if a.kind == FileKind::KindDir as i32 {
            return err(ErrorCode::IsDir, "is a directory");
        }
        return Ok(a);
    }
    let mut a = new_inode(tx, kind, c.mode, c.uid, c.gid, now, None)?;
    if is_device(kind as i32) {
        tx.exec(
            "INSERT INTO device_numbers VALUES (?1, ?2)",
            params![i(a.ino), c.rdev],
        )?;
        a.rdev = c.rdev;
    }
    link_entry(tx, c.parent, &c.name, a.ino, now, 0)?;
    Ok(a)
}

pub(super) fn mkdir(tx: &Transaction<'_>, c: &pb::Mkdir, now: i64) -> OpResult<pb::Attr> {
    check_name(&c.name)?;
    require_dir(tx, c.parent)?;
    if lookup_ino(tx, c.parent, &c.name)?.is_some() {
        return err(ErrorCode::Exists, "file exists");
    }
    let a = new_inode(tx, FileKind::KindDir, c.mode, c.uid, c.gid, now, None)?;
    link_entry(tx, c.parent, &c.name, a.ino, now, 1)?;
    Ok(a)
}

pub(super) fn symlink(tx: &Transaction<'_>, c: &pb::Symlink, now: i64) -> OpResult<pb::Attr> {
    check_name(&c.name)?;
    if c.target.is_empty() || c.target.len() > 4096 || c.target.contains(&0) {
        return err(
            ErrorCode::Invalid,
            "symlink target must be 1 to 4096 bytes without NUL",
        );
    }
    require_dir(tx, c.parent)?;
    if lookup_ino(tx, c.parent, &c.name)?.is_some() {
        return err(ErrorCode::Exists, "file exists");
    }
    let a = new_inode(
        tx,
        FileKind::KindSymlink,
        0o777,
        c.uid,
        c.gid,
        now,
        Some(&c.target),
    )?;
    link_entry(tx, c.parent, &c.name, a.ino, now, 0)?;
    Ok(a)
}

pub(super) fn link(tx: &Transaction<'_>, c: &pb::Link, now: i64) -> OpResult<pb::Attr> {
    check_name(&c.new_name)?;
    let a = get_attr(tx, c.ino)?;
    if a.kind == FileKind::KindDir as i32 {
        return err(
            ErrorCode::IsDir,
            "hard links to directories are not allowed",
        );
    }
    require_dir(tx, c.new_parent)?;
    if lookup_ino(tx, c.new_parent, &c.new_name)?.is_some() {
        return err(ErrorCode::Exists, "file exists");
    }
    link_entry(tx, c.new_parent, &c.new_name, c.ino, now, 0)?;
    tx.exec(
        "UPDATE inodes SET nlink = nlink + 1, ctime = ?2 WHERE ino = ?1",
        params![i(c.ino), now],
    )?;
    get_attr(tx, c.ino)
}

pub(super) fn unlink(
    tx: &Transaction<'_>,
    c: &pb::Unlink,
    now: i64,
    leader_now: i64,
) -> OpResult<()> {
    check_name(&c.name)?;
    require_dir(tx, c.parent)?;
    let ino = lookup_ino(tx, c.parent, &c.name)?
        .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
    if c.expect != 0 && ino != c.expect {
        return err(ErrorCode::Changed, "the name names another file now");
    }
    if get_attr(tx, ino)?.kind == FileKind::KindDir as i32 {
        return err(ErrorCode::IsDir, "is a directory");
    }
    unlink_entry(tx, c.parent, &c.name, now, 0)?;
    drop_link(tx, ino, c.parent, &c.name, now, leader_now)
}

pub(super) fn rmdir(
    tx: &Transaction<'_>,
    c: &pb::Rmdir,
    now: i64,
    leader_now: i64,
) -> OpResult<()> {
    check_name(&c.name)?;
    require_dir(tx, c.parent)?;
    let ino = lookup_ino(tx, c.parent, &c.name)?
        .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
    require_dir(tx, ino)?;
    if !is_empty_dir(tx, ino)? {
        return err(ErrorCode::NotEmpty, "directory not empty");
    }
    unlink_entry(tx, c.parent, &c.name, now, -1)?;
    drop_link(tx, ino, c.parent, &c.name, now, leader_now)
}

pub(super) fn link_entry(
    tx: &Transaction<'_>,
    parent: u64,
    name: &[u8],
    ino: u64,
    now: i64,
    nlink_delta: i64,
) -> OpResult<()> {
    tx.exec(
        "INSERT INTO dentries VALUES (?1, ?2, ?3)",
        params![i(parent), name, i(ino)],
    )?;
    touch_dir(tx, parent, now, nlink_delta)
}

pub(super) fn unlink_entry(
    tx: &Transaction<'_>,
    parent: u64,
    name: &[u8],
    now: i64,
    nlink_delta: i64,
) -> OpResult<()> {
    tx.exec(
        "DELETE FROM dentries WHERE parent = ?1 AND name = ?2",
        params![i(parent), name],
    )?;
    touch_dir(tx, parent, now, nlink_delta)
}

pub(super) fn rename(
    tx: &Transaction<'_>,
    c: &pb::Rename,
    now: i64,
    leader_now: i64,
) -> OpResult<()> {
    check_name(&c.name)?;
    check_name(&c.new_name)?;
    if c.no_replace && c.exchange {
        return err(ErrorCode::Invalid, "no-replace and exchange together");
    }
    require_dir(tx, c.parent)?;
    require_dir(tx, c.new_parent)?;
    let src = lookup_ino(tx, c.parent, &c.name)?
        .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
    let src_attr = get_attr(tx, src)?;
    let src_is_dir = src_attr.kind == FileKind::KindDir as i32;
    let dst = lookup_ino(tx, c.new_parent, &c.new_name)?;
    if (c.expect != 0 && src != c.expect) || (c.expect_over != 0 && dst != Some(c.expect_over)) {
        return err(ErrorCode::Changed, "the names name other files now");
    }
    if src_is_dir && is_within(tx, c.new_parent, src)? {
        return err(ErrorCode::Loop, "cannot move a directory into itself");
    }
    if dst == Some(src) {
        // Same inode (same entry, or two hard links): POSIX says do nothing.
        return Ok(());
    }
    let moves_dir_between = |is_dir: bool| {
        if is_dir && c.parent != c.new_parent {
            1
        } else {
            0
        }
    };
    if c.exchange {
        let dst =
            dst.ok_or_else(|| OpError::new(ErrorCode::NotFound, "exchange target does not exist"))?;
        let dst_is_dir = get_attr(tx, dst)?.kind == FileKind::KindDir as i32;
        if dst_is_dir && is_within(tx, c.parent, dst)? {
            return err(ErrorCode::Loop, "cannot move a directory into itself");
        }
        tx.exec(
            "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
            params![i(c.parent), c.name, i(dst)],
        )?;
        tx.exec(
            "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
            params![i(c.new_parent), c.new_name, i(src)],
        )?;
        let delta = moves_dir_between(src_is_dir) - moves_dir_between(dst_is_dir);
        touch_dir(tx, c.parent, now, -delta)?;
        touch_dir(tx, c.new_parent, now, delta)?;
        for ino in [src, dst] {
            tx.exec(
                "UPDATE inodes SET ctime = ?2 WHERE ino = ?1",
                params![i(ino), now],
            )?;
        }
        return Ok(());
    }
    if let Some(dst) = dst {
        if c.no_replace {
            return err(ErrorCode::Exists, "target exists");
        }
        let dst_is_dir = get_attr(tx, dst)?.kind == FileKind::KindDir as i32;
        match (src_is_dir, dst_is_dir) {
            (true, false) => return err(ErrorCode::NotDir, "target is not a directory"),
            (false, true) => return err(ErrorCode::IsDir, "target is a directory"),
            (true, true) if !is_empty_dir(tx, dst)? => {
                return err(ErrorCode::NotEmpty, "target directory not empty")
            }
            _ => {}
        }
        unlink_entry(
            tx,
            c.new_parent,
            &c.new_name,
            now,
            if dst_is_dir { -1 } else { 0 },
        )?;
        if !dst_is_dir {
            // The file that replaces another is its new version (a wiki save).
            tx.exec(
                "INSERT OR IGNORE INTO lineage(hash, prev)
                 SELECT n.hash, o.hash FROM extents n JOIN extents o ON o.ino = ?2 AND o.offset = n.offset
                 WHERE n.ino = ?1 AND n.hash != o.hash AND n.data IS NULL AND o.data IS NULL",
                params![i(src), i(dst)],
            )?;
        }
        drop_link(tx, dst, c.new_parent, &c.new_name, now, leader_now)?;
    }
    let delta = moves_dir_between(src_is_dir);
    unlink_entry(tx, c.parent, &c.name, now, -delta)?;
    link_entry(tx, c.new_parent, &c.new_name, src, now, delta)?;
    tx.exec(
        "UPDATE inodes SET ctime = ?2 WHERE ino = ?1",
        params![i(src), now],
    )?;
    Ok(())
}

/// The longest extended attribute name and value (Linux's XATTR_NAME_MAX
/// and XATTR_SIZE_MAX), and all of one inode's names and values together.
const XATTR_NAME_MAX: usize = 255;
const XATTR_VALUE_MAX: usize = 64 << 10;
const XATTRS_PER_INODE_BYTES: i64 = 256 << 10;
const XATTR_CREATE: u32 = 1;
const XATTR_REPLACE: u32 = 2;

/// Sets or removes one user extended attribute of `a` (setxattr(2) and
/// removexattr(2) rules; only `user.` names, on regular files and
/// directories, as Linux allows for them).
fn change_xattr(tx: &Transaction<'_>, a: &pb::Attr, x: &pb::XattrChange) -> OpResult<()> {
    if !x.name.starts_with(b"user.") || x.name.len() == 5 || x.name.contains(&0) {
        return err(
            ErrorCode::Invalid,
            "only user.NAME extended attributes are kept",
        );
    }
    if x.name.len() > XATTR_NAME_MAX || x.value.len() > XATTR_VALUE_MAX {
        return err(
            ErrorCode::Invalid,
            "extended attribute name or value too long",
        );
    }
    if x.flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || x.flags == XATTR_CREATE | XATTR_REPLACE {
        return err(ErrorCode::Invalid, "setxattr flags");
    }
    if a.kind != FileKind::KindFile as i32 && a.kind != FileKind::KindDir as i32 {
        return err(
            ErrorCode::NotPermitted,
            "user extended attributes are for regular files and directories",
        );
    }
    let there = tx
        .row(
            "SELECT 1 FROM xattrs WHERE ino = ?1 AND name = ?2",
            params![i(a.ino), x.name],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if x.remove || x.flags & XATTR_REPLACE != 0 {
        if !there {
            return err(ErrorCode::NoData, "no such extended attribute");
        }
    } else if x.flags & XATTR_CREATE != 0 && there {
        return err(ErrorCode::Exists, "the extended attribute exists");
    }
    if x.remove {
        tx.exec(
            "DELETE FROM xattrs WHERE ino = ?1 AND name = ?2",
            params![i(a.ino), x.name],
        )?;
        return Ok(());
    }
    let others: i64 = tx.row(
        "SELECT COALESCE(SUM(LENGTH(name) + LENGTH(value)), 0) FROM xattrs WHERE ino = ?1 AND name != ?2",
        params![i(a.ino), x.name],
        |r| r.get(0),
    )?;
    if others + (x.name.len() + x.value.len()) as i64 > XATTRS_PER_INODE_BYTES {
        return err(
            ErrorCode::NoSpace,
            "no room for more extended attributes on this inode",
        );
    }
    tx.exec(
        "INSERT OR REPLACE INTO xattrs VALUES (?1, ?2, ?3)",
        params![i(a.ino), x.name, x.value],
    )?;
    Ok(())
}

pub(super) fn set_attr(
    tx: &Transaction<'_>,
    c: &pb::SetAttr,
    now: i64,
    leader_now: i64,
) -> OpResult<pb::Attr> {
    let a = get_attr(tx, c.ino)?;
    if let Some(x) = &c.xattr {
        change_xattr(tx, &a, x)?;
    }
    if let Some(mode) = c.mode {
        tx.exec(
            "UPDATE inodes SET mode = ?2 WHERE ino = ?1",
            params![i(c.ino), mode & 0o7777],
        )?;
    }
    if let Some(uid) = c.uid {
        tx.exec(
            "UPDATE inodes SET uid = ?2 WHERE ino = ?1",
            params![i(c.ino), uid],
        )?;
    }
    if let Some(gid) = c.gid {
        tx.exec(
            "UPDATE inodes SET gid = ?2 WHERE ino = ?1",
            params![i(c.ino), gid],
        )?;
    }
    if let Some(size) = c.size {
        if a.kind != FileKind::KindFile as i32 {
            return err(ErrorCode::IsDir, "only regular files have a size to set");
        }
        if size > MAX_FILE_BYTES {
            return err(ErrorCode::Invalid, "file size too large");
        }
        if size < a.size {
            punch(tx, c.ino, size, u64::MAX, leader_now)?;
        }
        tx.exec(
            "UPDATE inodes SET size = ?2, mtime = MAX(mtime, ?3), version = version + 1 WHERE ino = ?1",
            params![i(c.ino), i(size), now],
        )?;
    }
    if let Some(t) = c.atime_ns {
        tx.exec(
            "UPDATE inodes SET atime = ?2 WHERE ino = ?1",
            params![i(c.ino), t],
        )?;
    }
    if let Some(t) = c.mtime_ns {
        tx.exec(
            "UPDATE inodes SET mtime = ?2 WHERE ino = ?1",
            params![i(c.ino), t],
        )?;
    }
    // "Now" is the leader's clock, whatever the asking web host's says.
    if c.atime_now {
        tx.exec(
            "UPDATE inodes SET atime = ?2 WHERE ino = ?1",
            params![i(c.ino), leader_now],
        )?;
    }
    if c.mtime_now {
        tx.exec(
            "UPDATE inodes SET mtime = ?2 WHERE ino = ?1",
            params![i(c.ino), leader_now],
        )?;
    }
    tx.exec(
        "UPDATE inodes SET ctime = ?2 WHERE ino = ?1",
        params![i(c.ino), now],
    )?;
    get_attr(tx, c.ino)
}

/// Whether every inode of `inos` lies under the directory at path `subdir`
/// (or is it): some name of it sits in a directory beneath. False when
/// `subdir` does not exist (any more). `lookup`, a name looked up in a
/// directory, passes when it is a step of the path to `subdir` itself (how
/// a confined mount finds its root).
pub(crate) fn inside(
    conn: &rusqlite::Connection,
    subdir: &str,
    inos: &[u64],
    lookup: Option<(u64, &[u8])>,
) -> rusqlite::Result<bool> {
    let mut top = ROOT_INO;
    let mut on_path = false;
    for part in subdir.split('/').filter(|p| !p.is_empty()) {
        on_path |= lookup == Some((top, part.as_bytes()));
        let next: Option<i64> = conn
            .prepare_cached("SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2")?
            .query_row(params![i(top), part.as_bytes()], |r| r.get(0))
            .optional()?;
        match next {
            Some(n) => top = n as u64,
            None => return Ok(false),
        }
    }
    if on_path {
        return Ok(true);
    }
    let mut parents = conn.prepare_cached("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 64")?;
    for &ino in inos {
        if ino == top {
            continue;
        }
        let mut any = false;
        for p in parents.query_map([i(ino)], |r| r.get::<_, i64>(0))? {
            // Directories have one parent: the walk up is the depth.
            let mut dir = p? as u64;
            loop {
                if dir == top {
                    any = true;
                    break;
                }
                if dir == ROOT_INO {
                    break;
                }
                let up: Option<i64> = conn
                    .prepare_cached("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1")?
                    .query_row([i(dir)], |r| r.get(0))
                    .optional()?;
                match up {
                    Some(u) => dir = u as u64,
                    None => break,
                }
            }
            if any {
                break;
            }
        }
        if !any {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{db, run};
    use failsafe_core::ROOT_INO;
    use failsafe_proto::pb::{self, command::Op, command_result::Result as R, ErrorCode, FileKind};

    fn mknod(kind: FileKind, exclusive: bool, rdev: u32) -> Op {
        Op::Create(pb::Create {
            parent: ROOT_INO,
            name: format!("{kind:?}").into_bytes(),
            mode: 0o640,
            exclusive,
            kind: kind as i32,
            rdev,
            ..Default::default()
        })
    }

    #[test]
    fn special_files_keep_their_kind_and_a_device_its_number_until_unlinked() {
        let mut conn = db();
        for kind in [
            FileKind::KindFifo,
            FileKind::KindSocket,
            FileKind::KindCharDevice,
            FileKind::KindBlockDevice,
        ] {
            let device = matches!(kind, FileKind::KindCharDevice | FileKind::KindBlockDevice);
            let r = run(&mut conn, mknod(kind, true, 0x0103));
            let Some(R::Attr(a)) = r.result else {
                panic!("{kind:?}: {r:?}")
            };
            assert_eq!((a.kind, a.mode, a.size), (kind as i32, 0o640, 0));
            assert_eq!(a.rdev, if device { 0x0103 } else { 0 }, "{kind:?}");
            let again = super::get_attr(&conn, a.ino).unwrap();
            assert_eq!(again.rdev, a.rdev);
            // Made only exclusively: a second one is EEXIST.
            let r = run(&mut conn, mknod(kind, true, 0));
            assert!(
                matches!(&r.result, Some(R::Error(e)) if e.code == ErrorCode::Exists as i32),
                "{r:?}"
            );
        }
        let numbers = |conn: &rusqlite::Connection| -> i64 {
            conn.query_row("SELECT COUNT(*) FROM device_numbers", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(numbers(&conn), 2);
        for kind in [FileKind::KindCharDevice, FileKind::KindBlockDevice] {
            let r = run(
                &mut conn,
                Op::Unlink(pb::Unlink {
                    parent: ROOT_INO,
                    name: format!("{kind:?}").into_bytes(),
                    ..Default::default()
                }),
            );
            assert!(!matches!(r.result, Some(R::Error(_))), "{r:?}");
        }
        assert_eq!(numbers(&conn), 2, "kept in the trash, number and all");
        run(&mut conn, Op::PurgeTrash(pb::PurgeTrash::default()));
        assert_eq!(
            numbers(&conn),
            0,
            "an unlinked device leaves no number behind"
        );
    }

    #[test]
    fn a_special_file_is_made_exclusively_and_empty_and_a_directory_not_at_all() {
        let mut conn = db();
        for op in [
            mknod(FileKind::KindFifo, false, 0),
            mknod(FileKind::KindDir, true, 0),
            mknod(FileKind::KindSymlink, true, 0),
            Op::Create(pb::Create {
                parent: ROOT_INO,
                name: b"fifo with data".to_vec(),
                exclusive: true,
                kind: FileKind::KindFifo as i32,
                content: Some(pb::CommitExtents::default()),
                ..Default::default()
            }),
        ] {
            let r = run(&mut conn, op);
            assert!(
                matches!(&r.result, Some(R::Error(e)) if e.code == ErrorCode::Invalid as i32),
                "{r:?}"
            );
        }
    }

    #[test]
    fn extended_attributes_follow_setxattr_rules_and_go_with_the_inode() {
        use super::super::testing::create_file;
        let mut conn = db();
        let ino = create_file(&mut conn, b"page");
        let set = |name: &str, len: usize, flags: u32, remove: bool| {
            Op::SetAttr(pb::SetAttr {
                ino,
                xattr: Some(pb::XattrChange {
                    name: name.as_bytes().to_vec(),
                    value: vec![1; len],
                    flags,
                    remove,
                }),
                ..Default::default()
            })
        };
        let code = |r: pb::CommandResult| match r.result {
            Some(R::Error(e)) => e.code,
            _ => 0,
        };
        // Four values of 64 KiB fit; a fifth is over the inode's 256 KiB.
        for n in 0..3 {
            assert_eq!(
                code(run(&mut conn, set(&format!("user.{n}"), 65536, 0, false))),
                0
            );
        }
        assert_eq!(
            code(run(&mut conn, set("user.3", 65536, 0, false))),
            ErrorCode::NoSpace as i32
        );
        // Replacing one with a smaller value is not counted twice.
        assert_eq!(code(run(&mut conn, set("user.0", 100, 2, false))), 0);
        assert_eq!(
            code(run(&mut conn, set("user.0", 1, 1, false))),
            ErrorCode::Exists as i32
        );
        assert_eq!(
            code(run(&mut conn, set("user.9", 1, 2, false))),
            ErrorCode::NoData as i32
        );
        assert_eq!(
            code(run(&mut conn, set("user.9", 0, 0, true))),
            ErrorCode::NoData as i32
        );
        for bad in ["security.x", "user.", "trusted.y"] {
            assert_eq!(
                code(run(&mut conn, set(bad, 1, 0, false))),
                ErrorCode::Invalid as i32
            );
        }
        run(
            &mut conn,
            Op::Unlink(pb::Unlink {
                parent: ROOT_INO,
                name: b"page".to_vec(),
                ..Default::default()
            }),
        );
        let left = |conn: &rusqlite::Connection| -> i64 {
            conn.query_row("SELECT COUNT(*) FROM xattrs", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(left(&conn), 3, "kept in the trash with the file");
        run(&mut conn, Op::PurgeTrash(pb::PurgeTrash::default()));
        assert_eq!(
            left(&conn),
            0,
            "an unlinked inode leaves no attribute behind"
        );
    }
}
