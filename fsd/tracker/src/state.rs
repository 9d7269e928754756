//! The metadata state machine: the SQLite schema and the one function that
//! changes it, `apply`, plus the read-only queries.
//!
//! Only `apply` mutates metadata, and it is deterministic: every input it uses
//! (times, ids) is in the command, so every tracker member computes the same
//! database from the same log.

use std::collections::BTreeMap;

use failsafe_core::{overlay, place, validate_name, Candidate, Extent, ReplicationClass, HASH_LEN, ROOT_INO};
use failsafe_proto::pb::{self, command::Op, query_request::Query, ErrorCode, FileKind};
use prost::Message;
use rusqlite::{params, OptionalExtension, Transaction};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inodes(
  ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
  uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
  atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
  nlink INTEGER NOT NULL, version INTEGER NOT NULL, target BLOB);
CREATE TABLE IF NOT EXISTS dentries(
  parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
  PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dentries_by_ino ON dentries(ino);
CREATE TABLE IF NOT EXISTS extents(
  ino INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
  hash BLOB NOT NULL, block_offset INTEGER NOT NULL,
  PRIMARY KEY(ino, offset)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS extents_by_hash ON extents(hash);
CREATE TABLE IF NOT EXISTS blocks(hash BLOB PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS copies(
  hash BLOB NOT NULL, device_id INTEGER NOT NULL,
  PRIMARY KEY(hash, device_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts(host_id INTEGER PRIMARY KEY, zone TEXT NOT NULL, addr TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
  device_id INTEGER PRIMARY KEY, host_id INTEGER NOT NULL, path TEXT NOT NULL,
  capacity INTEGER NOT NULL, free INTEGER NOT NULL, used INTEGER NOT NULL, blocks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions(
  session_id INTEGER PRIMARY KEY, client_name TEXT NOT NULL,
  ttl_ms INTEGER NOT NULL, last_seen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS locks(
  ino INTEGER NOT NULL, session_id INTEGER NOT NULL, owner INTEGER NOT NULL,
  kind INTEGER NOT NULL, ltype INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS locks_by_ino ON locks(ino);
CREATE TABLE IF NOT EXISTS applied_ops(
  client_id INTEGER NOT NULL, op_id INTEGER NOT NULL, at INTEGER NOT NULL, result BLOB NOT NULL,
  PRIMARY KEY(client_id, op_id)) WITHOUT ROWID;
INSERT OR IGNORE INTO inodes VALUES (1, 2, 493, 0, 0, 0, 0, 0, 0, 2, 1, NULL);
INSERT OR IGNORE INTO meta VALUES ('next_ino', 2);
";

/// How long the result of an operation id is kept for retries.
const OP_RESULT_KEEP_NS: i64 = 15 * 60 * 1_000_000_000;

/// A command that was refused; its partial effects are rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OpError {
        OpError { code, message: message.into() }
    }
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        // The state machine's database failing is not something a command can
        // cause; the caller treats it as fatal (see `Failure`).
        OpError::new(ErrorCode::ErrorUnspecified, format!("database: {e}"))
    }
}

type OpResult<T> = Result<T, OpError>;

fn err<T>(code: ErrorCode, message: impl Into<String>) -> OpResult<T> {
    Err(OpError::new(code, message))
}

fn check_name(name: &[u8]) -> OpResult<()> {
    validate_name(name).map_err(|e| {
        let code = match e {
            failsafe_core::NameError::TooLong(_) => ErrorCode::NameTooLong,
            _ => ErrorCode::Invalid,
        };
        OpError::new(code, e.to_string())
    })
}

// SQLite integers are i64; ids and sizes are u64 on the wire. They round-trip
// through `as` casts unchanged (two's complement), and no SQL compares them.
fn i(v: u64) -> i64 {
    v as i64
}

pub fn attr_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<pb::Attr> {
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
    })
}

const ATTR_COLS: &str = "ino, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, version";

pub fn get_attr(tx: &rusqlite::Connection, ino: u64) -> OpResult<pb::Attr> {
    tx.query_row(&format!("SELECT {ATTR_COLS} FROM inodes WHERE ino = ?1"), [i(ino)], attr_row)
        .optional()?
        .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no inode {ino}")))
}

fn lookup_ino(tx: &rusqlite::Connection, parent: u64, name: &[u8]) -> OpResult<Option<u64>> {
    Ok(tx
        .query_row("SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2", params![i(parent), name], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        .map(|v| v as u64))
}

fn require_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<pb::Attr> {
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
    let ino: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_ino'", [], |r| r.get(0))?;
    tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_ino'", [ino + 1])?;
    let nlink = if kind == FileKind::KindDir { 2 } else { 1 };
    let size = target.map_or(0, |t| t.len() as i64);
    tx.execute(
        "INSERT INTO inodes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?8, 1, ?9)",
        params![ino, kind as i32, mode & 0o7777, uid, gid, size, now, nlink, target],
    )?;
    get_attr(tx, ino as u64)
}

/// A directory's entries changed: bump its mtime, ctime and version.
fn touch_dir(tx: &Transaction<'_>, ino: u64, now: i64, nlink_delta: i64) -> OpResult<()> {
    tx.execute(
        "UPDATE inodes SET mtime = ?2, ctime = ?2, version = version + 1, nlink = nlink + ?3 WHERE ino = ?1",
        params![i(ino), now, nlink_delta],
    )?;
    Ok(())
}

/// Drops one link to `ino`; frees the inode, its extents and locks at zero.
fn drop_link(tx: &Transaction<'_>, ino: u64, now: i64) -> OpResult<()> {
    let a = get_attr(tx, ino)?;
    if a.kind == FileKind::KindDir as i32 || a.nlink <= 1 {
        tx.execute("DELETE FROM inodes WHERE ino = ?1", [i(ino)])?;
        tx.execute("DELETE FROM extents WHERE ino = ?1", [i(ino)])?;
        // Locks stay: descriptors open elsewhere may still hold and release
        // them (lock, unlink, unlock). Inode numbers are never reused, and
        // session close or expiry removes them.
    } else {
        tx.execute("UPDATE inodes SET nlink = nlink - 1, ctime = ?2 WHERE ino = ?1", params![i(ino), now])?;
    }
    Ok(())
}

fn is_empty_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<bool> {
    let n: i64 = tx.query_row("SELECT COUNT(*) FROM (SELECT 1 FROM dentries WHERE parent = ?1 LIMIT 1)", [i(ino)], |r| {
        r.get(0)
    })?;
    Ok(n == 0)
}

/// The directory holding directory `ino` (directories have exactly one entry).
fn parent_of_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<Option<u64>> {
    Ok(tx
        .query_row("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1", [i(ino)], |r| r.get::<_, i64>(0))
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

/// Checks what can be checked without the database: names and ranges. The
/// service refuses such a command before it reaches the log.
pub fn validate(cmd: &pb::Command) -> OpResult<()> {
    match &cmd.op {
        None => err(ErrorCode::Invalid, "command without an operation"),
        Some(Op::Create(c)) => check_name(&c.name),
        Some(Op::Mkdir(c)) => check_name(&c.name),
        Some(Op::Symlink(c)) => check_name(&c.name),
        Some(Op::Link(c)) => check_name(&c.new_name),
        Some(Op::Unlink(c)) => check_name(&c.name),
        Some(Op::Rmdir(c)) => check_name(&c.name),
        Some(Op::Rename(c)) => check_name(&c.name).and_then(|()| check_name(&c.new_name)),
        Some(Op::CommitExtents(c)) if c.extents.len() > 4096 || c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 extents per commit")
        }
        Some(Op::RecordCopies(c)) if c.copies.len() > 4096 => err(ErrorCode::Invalid, "at most 4096 blocks per record"),
        Some(Op::DropCopies(c)) if c.copies.len() > 4096 => err(ErrorCode::Invalid, "at most 4096 blocks per drop"),
        Some(_) => Ok(()),
    }
}

/// Applies one command in its own savepoint. A refused command changes
/// nothing but the record of its operation id, so a retry gets the same answer.
pub fn apply(tx: &Transaction<'_>, cmd: &pb::Command) -> rusqlite::Result<pb::CommandResult> {
    use pb::command_result::Result as R;
    if cmd.client_id != 0 {
        let prev: Option<Vec<u8>> = tx
            .query_row(
                "SELECT result FROM applied_ops WHERE client_id = ?1 AND op_id = ?2",
                params![i(cmd.client_id), i(cmd.op_id)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(bytes) = prev {
            if let Ok(res) = pb::CommandResult::decode(bytes.as_slice()) {
                return Ok(res);
            }
        }
    }
    let result = {
        tx.execute_batch("SAVEPOINT cmd")?;
        match apply_op(tx, cmd) {
            Ok(attr) => {
                tx.execute_batch("RELEASE cmd")?;
                match attr {
                    Some(a) => R::Attr(a),
                    None => R::Ok(pb::Empty {}),
                }
            }
            Err(e) => {
                tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
                if e.code == ErrorCode::ErrorUnspecified {
                    // A database failure, not a refusal: abort the whole apply.
                    return Err(rusqlite::Error::ToSqlConversionFailure(e.message.into()));
                }
                R::Error(pb::CommandError { code: e.code as i32, message: e.message })
            }
        }
    };
    let result = pb::CommandResult { result: Some(result) };
    if cmd.client_id != 0 {
        tx.execute(
            "INSERT OR REPLACE INTO applied_ops VALUES (?1, ?2, ?3, ?4)",
            params![i(cmd.client_id), i(cmd.op_id), if cmd.leader_ns > 0 { cmd.leader_ns } else { cmd.now_ns }, result.encode_to_vec()],
        )?;
    }
    Ok(result)
}

fn apply_op(tx: &Transaction<'_>, cmd: &pb::Command) -> OpResult<Option<pb::Attr>> {
    let now = cmd.now_ns;
    let Some(op) = &cmd.op else { return err(ErrorCode::Invalid, "command without an operation") };
    match op {
        Op::Create(c) => {
            check_name(&c.name)?;
            require_dir(tx, c.parent)?;
            if let Some(ino) = lookup_ino(tx, c.parent, &c.name)? {
                if c.exclusive {
                    return err(ErrorCode::Exists, "file exists");
                }
                let a = get_attr(tx, ino)?;
                if a.kind == FileKind::KindDir as i32 {
                    return err(ErrorCode::IsDir, "is a directory");
                }
                return Ok(Some(a));
            }
            let a = new_inode(tx, FileKind::KindFile, c.mode, c.uid, c.gid, now, None)?;
            link_entry(tx, c.parent, &c.name, a.ino, now, 0)?;
            Ok(Some(a))
        }
        Op::Mkdir(c) => {
            check_name(&c.name)?;
            require_dir(tx, c.parent)?;
            if lookup_ino(tx, c.parent, &c.name)?.is_some() {
                return err(ErrorCode::Exists, "file exists");
            }
            let a = new_inode(tx, FileKind::KindDir, c.mode, c.uid, c.gid, now, None)?;
            link_entry(tx, c.parent, &c.name, a.ino, now, 1)?;
            Ok(Some(a))
        }
        Op::Symlink(c) => {
            check_name(&c.name)?;
            if c.target.is_empty() || c.target.len() > 4096 || c.target.contains(&0) {
                return err(ErrorCode::Invalid, "symlink target must be 1 to 4096 bytes without NUL");
            }
            require_dir(tx, c.parent)?;
            if lookup_ino(tx, c.parent, &c.name)?.is_some() {
                return err(ErrorCode::Exists, "file exists");
            }
            let a = new_inode(tx, FileKind::KindSymlink, 0o777, c.uid, c.gid, now, Some(&c.target))?;
            link_entry(tx, c.parent, &c.name, a.ino, now, 0)?;
            Ok(Some(a))
        }
        Op::Link(c) => {
            check_name(&c.new_name)?;
            let a = get_attr(tx, c.ino)?;
            if a.kind == FileKind::KindDir as i32 {
                return err(ErrorCode::IsDir, "hard links to directories are not allowed");
            }
            require_dir(tx, c.new_parent)?;
            if lookup_ino(tx, c.new_parent, &c.new_name)?.is_some() {
                return err(ErrorCode::Exists, "file exists");
            }
            link_entry(tx, c.new_parent, &c.new_name, c.ino, now, 0)?;
            tx.execute("UPDATE inodes SET nlink = nlink + 1, ctime = ?2 WHERE ino = ?1", params![i(c.ino), now])?;
            Ok(Some(get_attr(tx, c.ino)?))
        }
        Op::Unlink(c) => {
            check_name(&c.name)?;
            require_dir(tx, c.parent)?;
            let ino = lookup_ino(tx, c.parent, &c.name)?.ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
            if get_attr(tx, ino)?.kind == FileKind::KindDir as i32 {
                return err(ErrorCode::IsDir, "is a directory");
            }
            unlink_entry(tx, c.parent, &c.name, now, 0)?;
            drop_link(tx, ino, now)?;
            Ok(None)
        }
        Op::Rmdir(c) => {
            check_name(&c.name)?;
            require_dir(tx, c.parent)?;
            let ino = lookup_ino(tx, c.parent, &c.name)?.ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
            require_dir(tx, ino)?;
            if !is_empty_dir(tx, ino)? {
                return err(ErrorCode::NotEmpty, "directory not empty");
            }
            unlink_entry(tx, c.parent, &c.name, now, -1)?;
            drop_link(tx, ino, now)?;
            Ok(None)
        }
        Op::Rename(c) => rename(tx, c, now).map(|()| None),
        Op::SetAttr(c) => set_attr(tx, c, now).map(Some),
        Op::CommitExtents(c) => commit_extents(tx, c, now).map(Some),
        Op::RecordCopies(c) => {
            record_copies(tx, &c.copies)?;
            Ok(None)
        }
        Op::DropCopies(c) => {
            drop_copies(tx, &c.copies)?;
            Ok(None)
        }
        Op::RegisterHost(c) => {
            if c.host_id == 0 || c.addr.is_empty() {
                return err(ErrorCode::Invalid, "a host needs an id and an address");
            }
            tx.execute(
                "INSERT INTO hosts VALUES (?1, ?2, ?3) ON CONFLICT(host_id) DO UPDATE SET zone = ?2, addr = ?3",
                params![i(c.host_id), c.zone, c.addr],
            )?;
            report_devices(tx, c.host_id, &c.devices)?;
            Ok(None)
        }
        Op::RemoveHost(c) => {
            let devices: Vec<i64> = tx
                .prepare("SELECT device_id FROM devices WHERE host_id = ?1")?
                .query_map([i(c.host_id)], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for d in devices {
                tx.execute("DELETE FROM copies WHERE device_id = ?1", [d])?;
            }
            tx.execute("DELETE FROM devices WHERE host_id = ?1", [i(c.host_id)])?;
            tx.execute("DELETE FROM hosts WHERE host_id = ?1", [i(c.host_id)])?;
            Ok(None)
        }
        Op::ReportDevices(c) => {
            report_devices(tx, c.host_id, &c.devices)?;
            Ok(None)
        }
        Op::OpenSession(c) => {
            if c.session_id == 0 || c.ttl_ms == 0 {
                return err(ErrorCode::Invalid, "a session needs an id and a lease");
            }
            tx.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?1, ?2, ?3, ?4)",
                params![i(c.session_id), c.client_name, i(c.ttl_ms), now],
            )?;
            Ok(None)
        }
        Op::Heartbeat(c) => {
            let n = tx.execute("UPDATE sessions SET last_seen = ?2 WHERE session_id = ?1", params![i(c.session_id), now])?;
            if n == 0 {
                return err(ErrorCode::NoSession, "session expired or unknown");
            }
            Ok(None)
        }
        Op::CloseSession(c) => {
            tx.execute("DELETE FROM locks WHERE session_id = ?1", [i(c.session_id)])?;
            tx.execute("DELETE FROM sessions WHERE session_id = ?1", [i(c.session_id)])?;
            Ok(None)
        }
        Op::ExpireSessions(_) => {
            let expired: Vec<i64> = tx
                .prepare("SELECT session_id FROM sessions WHERE last_seen + ttl_ms * 1000000 < ?1")?
                .query_map([now], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for s in expired {
                tx.execute("DELETE FROM locks WHERE session_id = ?1", [s])?;
                tx.execute("DELETE FROM sessions WHERE session_id = ?1", [s])?;
            }
            tx.execute("DELETE FROM applied_ops WHERE at < ?1", [now.saturating_sub(OP_RESULT_KEEP_NS)])?;
            Ok(None)
        }
        Op::Lock(c) => lock(tx, c).map(|()| None),
    }
}

fn link_entry(tx: &Transaction<'_>, parent: u64, name: &[u8], ino: u64, now: i64, nlink_delta: i64) -> OpResult<()> {
    tx.execute("INSERT INTO dentries VALUES (?1, ?2, ?3)", params![i(parent), name, i(ino)])?;
    touch_dir(tx, parent, now, nlink_delta)
}

fn unlink_entry(tx: &Transaction<'_>, parent: u64, name: &[u8], now: i64, nlink_delta: i64) -> OpResult<()> {
    tx.execute("DELETE FROM dentries WHERE parent = ?1 AND name = ?2", params![i(parent), name])?;
    touch_dir(tx, parent, now, nlink_delta)
}

fn rename(tx: &Transaction<'_>, c: &pb::Rename, now: i64) -> OpResult<()> {
    check_name(&c.name)?;
    check_name(&c.new_name)?;
    if c.no_replace && c.exchange {
        return err(ErrorCode::Invalid, "no-replace and exchange together");
    }
    require_dir(tx, c.parent)?;
    require_dir(tx, c.new_parent)?;
    let src = lookup_ino(tx, c.parent, &c.name)?.ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
    let src_attr = get_attr(tx, src)?;
    let src_is_dir = src_attr.kind == FileKind::KindDir as i32;
    let dst = lookup_ino(tx, c.new_parent, &c.new_name)?;
    if src_is_dir && is_within(tx, c.new_parent, src)? {
        return err(ErrorCode::Loop, "cannot move a directory into itself");
    }
    if dst == Some(src) {
        // Same inode (same entry, or two hard links): POSIX says do nothing.
        return Ok(());
    }
    let moves_dir_between = |is_dir: bool| if is_dir && c.parent != c.new_parent { 1 } else { 0 };
    if c.exchange {
        let dst = dst.ok_or_else(|| OpError::new(ErrorCode::NotFound, "exchange target does not exist"))?;
        let dst_is_dir = get_attr(tx, dst)?.kind == FileKind::KindDir as i32;
        if dst_is_dir && is_within(tx, c.parent, dst)? {
            return err(ErrorCode::Loop, "cannot move a directory into itself");
        }
        tx.execute("UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2", params![i(c.parent), c.name, i(dst)])?;
        tx.execute(
            "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
            params![i(c.new_parent), c.new_name, i(src)],
        )?;
        let delta = moves_dir_between(src_is_dir) - moves_dir_between(dst_is_dir);
        touch_dir(tx, c.parent, now, -delta)?;
        touch_dir(tx, c.new_parent, now, delta)?;
        for ino in [src, dst] {
            tx.execute("UPDATE inodes SET ctime = ?2 WHERE ino = ?1", params![i(ino), now])?;
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
            (true, true) if !is_empty_dir(tx, dst)? => return err(ErrorCode::NotEmpty, "target directory not empty"),
            _ => {}
        }
        unlink_entry(tx, c.new_parent, &c.new_name, now, if dst_is_dir { -1 } else { 0 })?;
        drop_link(tx, dst, now)?;
    }
    let delta = moves_dir_between(src_is_dir);
    unlink_entry(tx, c.parent, &c.name, now, -delta)?;
    link_entry(tx, c.new_parent, &c.new_name, src, now, delta)?;
    tx.execute("UPDATE inodes SET ctime = ?2 WHERE ino = ?1", params![i(src), now])?;
    Ok(())
}

fn load_extents(tx: &rusqlite::Connection, ino: u64, start: u64, end: u64) -> OpResult<Vec<Extent>> {
    // Extents never overlap, so those starting before `start` can reach into
    // the range only if they end after it.
    let mut stmt = tx.prepare_cached(
        "SELECT offset, length, hash, block_offset FROM extents
         WHERE ino = ?1 AND offset < ?3 AND offset + length > ?2 ORDER BY offset",
    )?;
    let rows = stmt.query_map(params![i(ino), i(start), i(end.min(i64::MAX as u64))], |r| {
        Ok(Extent {
            offset: r.get::<_, i64>(0)? as u64,
            length: r.get::<_, i64>(1)? as u64,
            hash: r.get(2)?,
            block_offset: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Makes `[start, end)` of `ino` a hole: extents inside go, straddling ones are cut.
fn punch(tx: &Transaction<'_>, ino: u64, start: u64, end: u64) -> OpResult<()> {
    let old = load_extents(tx, ino, start, end)?;
    for e in &old {
        tx.execute("DELETE FROM extents WHERE ino = ?1 AND offset = ?2", params![i(ino), i(e.offset)])?;
    }
    for e in overlay(&old, start, end) {
        insert_extent(tx, ino, &e)?;
    }
    Ok(())
}

fn insert_extent(tx: &Transaction<'_>, ino: u64, e: &Extent) -> OpResult<()> {
    tx.execute(
        "INSERT OR REPLACE INTO extents VALUES (?1, ?2, ?3, ?4, ?5)",
        params![i(ino), i(e.offset), i(e.length), e.hash, i(e.block_offset)],
    )?;
    Ok(())
}

/// Largest file offset we accept: keeps `offset + length` inside SQLite's i64.
const MAX_FILE_BYTES: u64 = 1 << 60;

fn set_attr(tx: &Transaction<'_>, c: &pb::SetAttr, now: i64) -> OpResult<pb::Attr> {
    let a = get_attr(tx, c.ino)?;
    if let Some(mode) = c.mode {
        tx.execute("UPDATE inodes SET mode = ?2 WHERE ino = ?1", params![i(c.ino), mode & 0o7777])?;
    }
    if let Some(uid) = c.uid {
        tx.execute("UPDATE inodes SET uid = ?2 WHERE ino = ?1", params![i(c.ino), uid])?;
    }
    if let Some(gid) = c.gid {
        tx.execute("UPDATE inodes SET gid = ?2 WHERE ino = ?1", params![i(c.ino), gid])?;
    }
    if let Some(size) = c.size {
        if a.kind != FileKind::KindFile as i32 {
            return err(ErrorCode::IsDir, "only regular files have a size to set");
        }
        if size > MAX_FILE_BYTES {
            return err(ErrorCode::Invalid, "file size too large");
        }
        if size < a.size {
            punch(tx, c.ino, size, u64::MAX)?;
        }
        tx.execute(
            "UPDATE inodes SET size = ?2, mtime = ?3, version = version + 1 WHERE ino = ?1",
            params![i(c.ino), i(size), now],
        )?;
    }
    if let Some(t) = c.atime_ns {
        tx.execute("UPDATE inodes SET atime = ?2 WHERE ino = ?1", params![i(c.ino), t])?;
    }
    if let Some(t) = c.mtime_ns {
        tx.execute("UPDATE inodes SET mtime = ?2 WHERE ino = ?1", params![i(c.ino), t])?;
    }
    tx.execute("UPDATE inodes SET ctime = ?2 WHERE ino = ?1", params![i(c.ino), now])?;
    get_attr(tx, c.ino)
}

fn commit_extents(tx: &Transaction<'_>, c: &pb::CommitExtents, now: i64) -> OpResult<pb::Attr> {
    let a = get_attr(tx, c.ino)?;
    if a.kind != FileKind::KindFile as i32 {
        return err(ErrorCode::IsDir, "extents belong to regular files");
    }
    record_copies(tx, &c.copies)?;
    let base = if c.append { a.size } else { 0 };
    let mut size = a.size;
    for e in &c.extents {
        let e = &pb::Extent { offset: e.offset.saturating_add(base), ..e.clone() };
        if e.hash.len() != HASH_LEN || e.length == 0 {
            return err(ErrorCode::Invalid, "an extent needs a 32-byte hash and a length");
        }
        let end = e.offset.checked_add(e.length).filter(|&end| end <= MAX_FILE_BYTES);
        let Some(end) = end else { return err(ErrorCode::Invalid, "extent beyond the largest file size") };
        let block_size: Option<i64> =
            tx.query_row("SELECT size FROM blocks WHERE hash = ?1", [&e.hash], |r| r.get(0)).optional()?;
        match block_size {
            None => return err(ErrorCode::Invalid, "extent names a block with no recorded copies"),
            Some(bs) if e.block_offset.saturating_add(e.length) > bs as u64 => {
                return err(ErrorCode::Invalid, "extent reaches past the end of its block")
            }
            _ => {}
        }
        punch(tx, c.ino, e.offset, end)?;
        let ext = Extent { offset: e.offset, length: e.length, hash: e.hash.clone(), block_offset: e.block_offset };
        insert_extent(tx, c.ino, &ext)?;
        size = size.max(end);
    }
    tx.execute(
        "UPDATE inodes SET size = ?2, mtime = ?3, ctime = ?3, version = version + 1 WHERE ino = ?1",
        params![i(c.ino), i(size), now],
    )?;
    get_attr(tx, c.ino)
}

fn record_copies(tx: &Transaction<'_>, copies: &[pb::BlockCopies]) -> OpResult<()> {
    for b in copies {
        if b.hash.len() != HASH_LEN || b.size as usize > failsafe_core::MAX_BLOCK_BYTES {
            return err(ErrorCode::Invalid, "block copies need a 32-byte hash and a size within the block limit");
        }
        tx.execute("INSERT OR IGNORE INTO blocks VALUES (?1, ?2)", params![b.hash, i(b.size)])?;
        for d in &b.device_ids {
            tx.execute("INSERT OR IGNORE INTO copies VALUES (?1, ?2)", params![b.hash, i(*d)])?;
        }
    }
    Ok(())
}

/// Forgets copies found missing or corrupt. The block's row (its size)
/// stays: extents may still name it, and a repaired copy is recorded again.
fn drop_copies(tx: &Transaction<'_>, copies: &[pb::BlockCopies]) -> OpResult<()> {
    for b in copies {
        if b.hash.len() != HASH_LEN {
            return err(ErrorCode::Invalid, "block copies need a 32-byte hash");
        }
        for d in &b.device_ids {
            tx.execute("DELETE FROM copies WHERE hash = ?1 AND device_id = ?2", params![b.hash, i(*d)])?;
        }
    }
    Ok(())
}

fn report_devices(tx: &Transaction<'_>, host_id: u64, devices: &[pb::DeviceInfo]) -> OpResult<()> {
    for d in devices {
        tx.execute(
            "INSERT INTO devices VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(device_id) DO UPDATE SET host_id = ?2, path = ?3, capacity = ?4, free = ?5, used = ?6, blocks = ?7",
            params![
                i(d.device_id),
                i(host_id),
                d.path,
                i(d.capacity_bytes),
                i(d.free_bytes),
                i(d.used_bytes),
                i(d.blocks)
            ],
        )?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct HeldLock {
    session_id: u64,
    owner: u64,
    ltype: i32,
    start: u64,
    end: u64,
}

fn lock(tx: &Transaction<'_>, c: &pb::Lock) -> OpResult<()> {
    let kind = pb::LockKind::try_from(c.kind).unwrap_or(pb::LockKind::Unspecified);
    let ltype = pb::LockType::try_from(c.r#type).unwrap_or(pb::LockType::Unspecified);
    if kind == pb::LockKind::Unspecified || ltype == pb::LockType::Unspecified {
        return err(ErrorCode::Invalid, "lock kind and type are required");
    }
    let (start, end) = if kind == pb::LockKind::LockFlock { (0, u64::MAX) } else { (c.start, c.end) };
    if start >= end {
        return err(ErrorCode::Invalid, "empty lock range");
    }
    let exists: Option<i64> =
        tx.query_row("SELECT 1 FROM sessions WHERE session_id = ?1", [i(c.session_id)], |r| r.get(0)).optional()?;
    if exists.is_none() {
        return err(ErrorCode::NoSession, "session expired or unknown");
    }
    // No inode check: a file unlinked while open can still be locked and
    // unlocked through its descriptors.
    let held: Vec<HeldLock> = tx
        .prepare_cached("SELECT session_id, owner, ltype, start, end FROM locks WHERE ino = ?1 AND kind = ?2")?
        .query_map(params![i(c.ino), c.kind], |r| {
            Ok(HeldLock {
                session_id: r.get::<_, i64>(0)? as u64,
                owner: r.get::<_, i64>(1)? as u64,
                ltype: r.get(2)?,
                start: r.get::<_, i64>(3)? as u64,
                end: r.get::<_, i64>(4)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mine = |h: &HeldLock| h.session_id == c.session_id && h.owner == c.owner;
    if ltype != pb::LockType::LockUnlock {
        let conflict = held.iter().any(|h| {
            !mine(h)
                && h.start < end
                && start < h.end
                && (h.ltype == pb::LockType::LockWrite as i32 || ltype == pb::LockType::LockWrite)
        });
        if conflict {
            return err(ErrorCode::WouldBlock, "lock held by another owner");
        }
    }
    // Replace this owner's locks in the range: what lies outside stays.
    tx.execute(
        "DELETE FROM locks WHERE ino = ?1 AND kind = ?2 AND session_id = ?3 AND owner = ?4",
        params![i(c.ino), c.kind, i(c.session_id), i(c.owner)],
    )?;
    let insert = |h: &HeldLock| {
        tx.execute(
            "INSERT INTO locks VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![i(c.ino), i(h.session_id), i(h.owner), c.kind, h.ltype, i(h.start), i(h.end)],
        )
    };
    for h in held.iter().filter(|h| mine(h)) {
        if h.start < start {
            insert(&HeldLock { end: start.min(h.end), ..h.clone() })?;
        }
        if h.end > end {
            insert(&HeldLock { start: end.max(h.start), ..h.clone() })?;
        }
    }
    if ltype != pb::LockType::LockUnlock {
        insert(&HeldLock { session_id: c.session_id, owner: c.owner, ltype: ltype as i32, start, end })?;
    }
    Ok(())
}

// ---------- queries ----------

pub fn query(conn: &rusqlite::Connection, q: &Query, class: ReplicationClass) -> OpResult<pb::query_reply::Reply> {
    use pb::query_reply::Reply;
    match q {
        Query::Lookup(l) => {
            check_name(&l.name)?;
            require_dir(conn, l.parent)?;
            let ino =
                lookup_ino(conn, l.parent, &l.name)?.ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
            Ok(Reply::Attr(get_attr(conn, ino)?))
        }
        Query::GetAttr(g) => Ok(Reply::Attr(get_attr(conn, g.ino)?)),
        Query::ReadDir(r) => {
            require_dir(conn, r.ino)?;
            let limit = r.limit.clamp(1, 10_000) as i64;
            let mut stmt = conn.prepare_cached(
                "SELECT d.name, d.ino, i.kind FROM dentries d JOIN inodes i ON i.ino = d.ino
                 WHERE d.parent = ?1 AND d.name > ?2 ORDER BY d.name LIMIT ?3",
            )?;
            let mut entries: Vec<pb::DirEntry> = stmt
                .query_map(params![i(r.ino), r.after, limit + 1], |row| {
                    Ok(pb::DirEntry { name: row.get(0)?, ino: row.get::<_, i64>(1)? as u64, kind: row.get(2)? })
                })?
                .collect::<Result<_, _>>()?;
            let more = entries.len() as i64 > limit;
            entries.truncate(limit as usize);
            Ok(Reply::DirPage(pb::DirPage { entries, more }))
        }
        Query::ReadLink(r) => {
            let target: Option<Option<Vec<u8>>> =
                conn.query_row("SELECT target FROM inodes WHERE ino = ?1", [i(r.ino)], |row| row.get(0)).optional()?;
            match target {
                None => err(ErrorCode::NotFound, "no such inode"),
                Some(None) => err(ErrorCode::Invalid, "not a symlink"),
                Some(Some(t)) => Ok(Reply::Target(pb::Target { target: t })),
            }
        }
        Query::StatFs(_) => {
            let (total, free): (i64, i64) =
                conn.query_row("SELECT COALESCE(SUM(capacity), 0), COALESCE(SUM(free), 0) FROM devices", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let files: i64 = conn.query_row("SELECT COUNT(*) FROM inodes", [], |r| r.get(0))?;
            let blocks: i64 = conn.query_row("SELECT COUNT(*) FROM blocks", [], |r| r.get(0))?;
            // Every byte is stored `copies` times: report what a user can still write.
            let copies = class.copies.max(1) as u64;
            Ok(Reply::FsStats(pb::FsStats {
                total_bytes: total as u64 / copies,
                free_bytes: free as u64 / copies,
                files: files as u64,
                blocks: blocks as u64,
            }))
        }
        Query::ReadExtents(r) => {
            let attr = get_attr(conn, r.ino)?;
            let end = r.offset.saturating_add(r.length.max(1));
            let extents = load_extents(conn, r.ino, r.offset, end)?;
            let mut copies = Vec::new();
            let mut device_ids = std::collections::BTreeSet::new();
            let mut seen = std::collections::BTreeSet::new();
            for e in &extents {
                if !seen.insert(e.hash.clone()) {
                    continue;
                }
                let bc = block_copies(conn, &e.hash)?;
                device_ids.extend(bc.device_ids.iter().copied());
                copies.push(bc);
            }
            let devices = device_locations(conn)?.into_iter().filter(|d| device_ids.contains(&d.device_id)).collect();
            Ok(Reply::FileExtents(pb::FileExtents {
                attr: Some(attr),
                extents: extents
                    .into_iter()
                    .map(|e| pb::Extent { offset: e.offset, length: e.length, hash: e.hash, block_offset: e.block_offset })
                    .collect(),
                copies,
                devices,
            }))
        }
        Query::Place(p) => {
            if p.hashes.len() > 1024 {
                return err(ErrorCode::Invalid, "at most 1024 blocks per placement");
            }
            // A client may ask for spares beyond the copy count, not for more.
            let copies = if p.copies == 0 { class.copies } else { (p.copies as usize).min(class.copies + 4) };
            let locations = device_locations(conn)?;
            let free: BTreeMap<u64, u64> = conn
                .prepare_cached("SELECT device_id, free FROM devices")?
                .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))?
                .collect::<Result<_, _>>()?;
            let reserve = 2 * failsafe_core::MAX_BLOCK_BYTES as u64;
            let candidates: Vec<Candidate> = locations
                .iter()
                .filter(|d| free.get(&d.device_id).copied().unwrap_or(0) > reserve)
                .map(|d| Candidate { device_id: d.device_id, host_id: d.host_id, zone: d.zone.clone() })
                .collect();
            // The quorum follows the replication class and the devices that
            // exist, not the ones with room: full devices do not lower it.
            let quorum = class.quorum_for(class.copies.min(locations.len()));
            if candidates.len() < quorum {
                return err(ErrorCode::NoSpace, "too few devices have room for new blocks");
            }
            let choices = p
                .hashes
                .iter()
                .map(|h| pb::PlacementChoice { hash: h.clone(), device_ids: place(h, &candidates, copies) })
                .collect::<Vec<_>>();
            Ok(Reply::Placement(pb::Placement { choices, devices: locations, write_quorum: quorum as u32 }))
        }
        Query::ListLocks(l) => {
            let locks = conn
                .prepare_cached("SELECT session_id, owner, kind, ltype, start, end FROM locks WHERE ino = ?1")?
                .query_map([i(l.ino)], |r| {
                    Ok(pb::LockInfo {
                        session_id: r.get::<_, i64>(0)? as u64,
                        owner: r.get::<_, i64>(1)? as u64,
                        kind: r.get(2)?,
                        r#type: r.get(3)?,
                        start: r.get::<_, i64>(4)? as u64,
                        end: r.get::<_, i64>(5)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(Reply::LockList(pb::LockList { locks }))
        }
    }
}

fn block_copies(conn: &rusqlite::Connection, hash: &[u8]) -> OpResult<pb::BlockCopies> {
    let size: i64 = conn.query_row("SELECT size FROM blocks WHERE hash = ?1", [hash], |r| r.get(0)).optional()?.unwrap_or(0);
    let device_ids = conn
        .prepare_cached("SELECT device_id FROM copies WHERE hash = ?1")?
        .query_map([hash], |r| Ok(r.get::<_, i64>(0)? as u64))?
        .collect::<Result<_, _>>()?;
    Ok(pb::BlockCopies { hash: hash.to_vec(), size: size as u64, device_ids })
}

pub fn device_locations(conn: &rusqlite::Connection) -> OpResult<Vec<pb::DeviceLocation>> {
    Ok(conn
        .prepare_cached(
            "SELECT d.device_id, d.host_id, h.zone, h.addr FROM devices d JOIN hosts h ON h.host_id = d.host_id
             ORDER BY d.device_id",
        )?
        .query_map([], |r| {
            Ok(pb::DeviceLocation {
                device_id: r.get::<_, i64>(0)? as u64,
                host_id: r.get::<_, i64>(1)? as u64,
                zone: r.get(2)?,
                addr: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

pub fn hosts(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(u64, String, String)>> {
    conn.prepare_cached("SELECT host_id, zone, addr FROM hosts ORDER BY zone, host_id")?
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))?
        .collect()
}

pub fn devices(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<pb::DeviceStatus>> {
    conn.prepare_cached("SELECT device_id, host_id, path, capacity, used, blocks, free FROM devices ORDER BY host_id")?
        .query_map([], |r| {
            Ok(pb::DeviceStatus {
                device_id: r.get::<_, i64>(0)? as u64,
                host_id: r.get::<_, i64>(1)? as u64,
                path: r.get(2)?,
                capacity_bytes: r.get::<_, i64>(3)? as u64,
                used_bytes: r.get::<_, i64>(4)? as u64,
                blocks: r.get::<_, i64>(5)? as u64,
                free_bytes: r.get::<_, i64>(6)? as u64,
            })
        })?
        .collect()
}

/// Whether `ExpireSessions` at `now` would change anything.
pub fn anything_expired(conn: &rusqlite::Connection, now: i64) -> rusqlite::Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM sessions WHERE last_seen + ttl_ms * 1000000 < ?1)
              + (SELECT COUNT(*) FROM applied_ops WHERE at < ?2)",
        params![now, now.saturating_sub(OP_RESULT_KEEP_NS)],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

pub fn counts(conn: &rusqlite::Connection) -> rusqlite::Result<(u64, u64)> {
    let files: i64 = conn.query_row("SELECT COUNT(*) FROM inodes", [], |r| r.get(0))?;
    let blocks: i64 = conn.query_row("SELECT COUNT(*) FROM blocks", [], |r| r.get(0))?;
    Ok((files as u64, blocks as u64))
}

// ---------- replication health (read by the leader) ----------

/// Device ids as an SQL list. They are integers we produce ourselves, so
/// formatting them into the statement is safe; `NULL` matches nothing.
fn id_list(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "NULL".into();
    }
    ids.iter().map(|&d| i(d).to_string()).collect::<Vec<_>>().join(",")
}

/// Blocks referenced by files with fewer than `copies` copies on `live`
/// devices, and those with none there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationCounts {
    pub under_replicated: u64,
    pub unavailable: u64,
}

pub fn replication_counts(conn: &rusqlite::Connection, live: &[u64], copies: usize) -> rusqlite::Result<ReplicationCounts> {
    let sql = format!(
        "SELECT COALESCE(SUM(n < ?1), 0), COALESCE(SUM(n = 0), 0) FROM (
           SELECT (SELECT COUNT(*) FROM copies c WHERE c.hash = r.hash AND c.device_id IN ({})) AS n
           FROM (SELECT DISTINCT hash FROM extents) r)",
        id_list(live)
    );
    conn.query_row(&sql, [copies as i64], |r| {
        Ok(ReplicationCounts { under_replicated: r.get::<_, i64>(0)? as u64, unavailable: r.get::<_, i64>(1)? as u64 })
    })
}

/// Referenced blocks that repair can do something about: fewer than
/// `copies` copies on `counted` devices (hosts not dead), at least one on an
/// `up` device to read from, and some `target` device without one. Fewest
/// copies first; among equals, hashes after `after` first, so blocks that
/// keep failing do not crowd out the rest. Each with all its recorded copies.
pub fn repair_candidates(
    conn: &rusqlite::Connection,
    counted: &[u64],
    up: &[u64],
    targets: &[u64],
    copies: usize,
    after: &[u8],
    limit: usize,
) -> rusqlite::Result<Vec<failsafe_core::BlockView>> {
    let sql = format!(
        "SELECT hash, size FROM (
           SELECT b.hash AS hash, b.size AS size,
             (SELECT COUNT(*) FROM copies c WHERE c.hash = b.hash AND c.device_id IN ({counted})) AS counted,
             (SELECT COUNT(*) FROM copies c WHERE c.hash = b.hash AND c.device_id IN ({up})) AS live,
             (SELECT COUNT(*) FROM copies c WHERE c.hash = b.hash AND c.device_id IN ({targets})) AS on_targets
           FROM blocks b WHERE EXISTS (SELECT 1 FROM extents e WHERE e.hash = b.hash))
         WHERE counted < ?1 AND live > 0 AND on_targets < ?2
         ORDER BY counted, hash <= ?3, hash LIMIT ?4",
        counted = id_list(counted),
        up = id_list(up),
        targets = id_list(targets),
    );
    let rows: Vec<(Vec<u8>, i64)> = conn
        .prepare(&sql)?
        .query_map(params![copies as i64, targets.len() as i64, after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut holders = conn.prepare_cached("SELECT device_id FROM copies WHERE hash = ?1 ORDER BY device_id")?;
    rows.into_iter()
        .map(|(hash, size)| {
            let devices = holders.query_map([&hash], |r| Ok(r.get::<_, i64>(0)? as u64))?.collect::<Result<_, _>>()?;
            Ok(failsafe_core::BlockView { hash, size: size as u64, holders: devices })
        })
        .collect()
}

/// Every device with its host's zone and address, and whether it has room
/// for another block (the same reserve placement keeps).
pub fn device_room(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(pb::DeviceLocation, bool)>> {
    let reserve = 2 * failsafe_core::MAX_BLOCK_BYTES as i64;
    conn.prepare_cached(
        "SELECT d.device_id, d.host_id, h.zone, h.addr, d.free FROM devices d JOIN hosts h ON h.host_id = d.host_id
         ORDER BY d.device_id",
    )?
    .query_map([], |r| {
        let loc = pb::DeviceLocation {
            device_id: r.get::<_, i64>(0)? as u64,
            host_id: r.get::<_, i64>(1)? as u64,
            zone: r.get(2)?,
            addr: r.get(3)?,
        };
        Ok((loc, r.get::<_, i64>(4)? > reserve))
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().expect("in-memory database");
        conn.execute_batch(SCHEMA).expect("schema");
        conn
    }

    fn run(conn: &mut rusqlite::Connection, op: Op) -> pb::CommandResult {
        let tx = conn.transaction().expect("transaction");
        let r = apply(&tx, &pb::Command { now_ns: 1, op: Some(op), ..Default::default() }).expect("apply");
        tx.commit().expect("commit");
        r
    }

    fn copies(hash: &[u8], devices: &[u64]) -> pb::BlockCopies {
        pb::BlockCopies { hash: hash.to_vec(), size: 10, device_ids: devices.to_vec() }
    }

    fn ok(r: pb::CommandResult) {
        assert!(!matches!(r.result, Some(pb::command_result::Result::Error(_))), "{r:?}");
    }

    /// A file whose one extent names block `hash`, recorded on `devices`.
    fn file_with_block(conn: &mut rusqlite::Connection, name: &[u8], hash: &[u8], devices: &[u64]) {
        let r = run(conn, Op::Create(pb::Create { parent: ROOT_INO, name: name.to_vec(), mode: 0o644, ..Default::default() }));
        let Some(pb::command_result::Result::Attr(a)) = r.result else { panic!("create: {r:?}") };
        let extent = pb::Extent { offset: 0, length: 10, hash: hash.to_vec(), block_offset: 0 };
        ok(run(conn, Op::CommitExtents(pb::CommitExtents { ino: a.ino, extents: vec![extent], copies: vec![copies(hash, devices)], append: false })));
    }

    #[test]
    fn dropping_copies_forgets_them_and_a_missing_record_is_a_no_op() {
        let mut conn = db();
        let (x, y) = ([1u8; 32], [2u8; 32]);
        file_with_block(&mut conn, b"f", &x, &[1, 2, 3]);
        ok(run(&mut conn, Op::DropCopies(pb::DropCopies { copies: vec![copies(&x, &[2, 9]), copies(&y, &[1])] })));
        assert_eq!(block_copies(&conn, &x).expect("copies").device_ids, vec![1, 3]);
        // The size is still known, so the block can be recorded again.
        ok(run(&mut conn, Op::RecordCopies(pb::RecordCopies { copies: vec![copies(&x, &[2])] })));
        assert_eq!(block_copies(&conn, &x).expect("copies").device_ids.len(), 3);
        let bad = run(&mut conn, Op::DropCopies(pb::DropCopies { copies: vec![copies(b"short", &[1])] }));
        assert!(matches!(bad.result, Some(pb::command_result::Result::Error(_))));
    }

    #[test]
    fn counts_judge_referenced_blocks_by_their_live_copies() {
        let mut conn = db();
        file_with_block(&mut conn, b"a", &[1u8; 32], &[1, 2, 3]);
        file_with_block(&mut conn, b"b", &[2u8; 32], &[1, 2]);
        file_with_block(&mut conn, b"c", &[3u8; 32], &[3]);
        // An unreferenced block does not count.
        ok(run(&mut conn, Op::RecordCopies(pb::RecordCopies { copies: vec![copies(&[4u8; 32], &[1])] })));
        let all = replication_counts(&conn, &[1, 2, 3], 3).expect("counts");
        assert_eq!(all, ReplicationCounts { under_replicated: 2, unavailable: 0 });
        let without_3 = replication_counts(&conn, &[1, 2], 3).expect("counts");
        assert_eq!(without_3, ReplicationCounts { under_replicated: 3, unavailable: 1 });
        assert_eq!(replication_counts(&conn, &[], 3).expect("counts").unavailable, 3);

        // Repair: device 3 down (still counted), device 4 a free target.
        let c = repair_candidates(&conn, &[1, 2, 3, 4], &[1, 2, 4], &[1, 2, 4], 3, &[], 10).expect("candidates");
        let hashes: Vec<u8> = c.iter().map(|b| b.hash[0]).collect();
        // Block 3 lives only on the down device: nothing to read it from.
        assert_eq!(hashes, vec![2]);
        assert_eq!(c[0].holders, vec![1, 2]);
        // Fewest copies first; among equals, the cursor puts blocks after it first.
        file_with_block(&mut conn, b"e", &[5u8; 32], &[1, 2]);
        let c = repair_candidates(&conn, &[1, 2, 3, 4], &[1, 2, 3, 4], &[4], 3, &[2u8; 32], 10).expect("candidates");
        assert_eq!(c.iter().map(|b| b.hash[0]).collect::<Vec<_>>(), vec![3, 5, 2]);
        let c = repair_candidates(&conn, &[1, 2, 3, 4], &[1, 2, 3, 4], &[4], 3, &[], 10).expect("candidates");
        assert_eq!(c.iter().map(|b| b.hash[0]).collect::<Vec<_>>(), vec![3, 2, 5]);
    }
}
