//! The metadata state machine: the SQLite schema and the one function that
//! changes it, `apply`, plus the read-only queries.
//!
//! Only `apply` mutates metadata, and it is deterministic: every input it uses
//! (times, ids) is in the command, so every tracker member computes the same
//! database from the same log.

use std::collections::BTreeMap;

use failsafe_core::{
    is_full, overlay, place, validate_name, Candidate, Extent, ReplicationClass, HASH_LEN, ROOT_INO,
};
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
-- Devices their host no longer reports (a disk replaced or removed): their
-- copies were dropped, and they take none. Tables of their own rather than
-- columns, so that databases and snapshots from before them need no
-- migration.
CREATE TABLE IF NOT EXISTS gone_devices(device_id INTEGER PRIMARY KEY, since INTEGER NOT NULL);
-- Blocks that may have no extent pointing at them, since when (the leader's
-- clock): recorded before their extents were committed, or their last
-- extent removed. Garbage collection forgets those unreferenced for longer
-- than its grace period; a block without a row here counts as idle since 0.
CREATE TABLE IF NOT EXISTS idle_blocks(hash BLOB PRIMARY KEY, since INTEGER NOT NULL) WITHOUT ROWID;
-- A block's older version at the same place in the same file (a page saved
-- again): a host that holds the older one receives the newer as a delta.
-- One row per newer block, dropped when that block is forgotten.
CREATE TABLE IF NOT EXISTS lineage(hash BLOB PRIMARY KEY, prev BLOB NOT NULL) WITHOUT ROWID;
-- Hosts in an administrative state other than active: away (shipped)
-- until a time (the leader's clock).
CREATE TABLE IF NOT EXISTS host_states(host_id INTEGER PRIMARY KEY, state TEXT NOT NULL, until INTEGER NOT NULL, since INTEGER NOT NULL);
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
        OpError {
            code,
            message: message.into(),
        }
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
    tx.query_row(
        &format!("SELECT {ATTR_COLS} FROM inodes WHERE ino = ?1"),
        [i(ino)],
        attr_row,
    )
    .optional()?
    .ok_or_else(|| OpError::new(ErrorCode::NotFound, format!("no inode {ino}")))
}

fn lookup_ino(tx: &rusqlite::Connection, parent: u64, name: &[u8]) -> OpResult<Option<u64>> {
    Ok(tx
        .query_row(
            "SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2",
            params![i(parent), name],
            |r| r.get::<_, i64>(0),
        )
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
    let ino: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_ino'", [], |r| {
        r.get(0)
    })?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'next_ino'",
        [ino + 1],
    )?;
    let nlink = if kind == FileKind::KindDir { 2 } else { 1 };
    let size = target.map_or(0, |t| t.len() as i64);
    tx.execute(
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

/// A directory's entries changed: bump its mtime, ctime and version.
fn touch_dir(tx: &Transaction<'_>, ino: u64, now: i64, nlink_delta: i64) -> OpResult<()> {
    tx.execute(
        "UPDATE inodes SET mtime = ?2, ctime = ?2, version = version + 1, nlink = nlink + ?3 WHERE ino = ?1",
        params![i(ino), now, nlink_delta],
    )?;
    Ok(())
}

/// Drops one link to `ino`; frees the inode, its extents and locks at zero.
fn drop_link(tx: &Transaction<'_>, ino: u64, now: i64, leader_now: i64) -> OpResult<()> {
    let a = get_attr(tx, ino)?;
    if a.kind == FileKind::KindDir as i32 || a.nlink <= 1 {
        tx.execute("DELETE FROM inodes WHERE ino = ?1", [i(ino)])?;
        let hashes: Vec<Vec<u8>> = tx
            .prepare_cached("SELECT DISTINCT hash FROM extents WHERE ino = ?1")?
            .query_map([i(ino)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        tx.execute("DELETE FROM extents WHERE ino = ?1", [i(ino)])?;
        note_unreferenced(tx, &hashes, leader_now)?;
        // Locks stay: descriptors open elsewhere may still hold and release
        // them (lock, unlink, unlock). Inode numbers are never reused, and
        // session close or expiry removes them.
    } else {
        tx.execute(
            "UPDATE inodes SET nlink = nlink - 1, ctime = ?2 WHERE ino = ?1",
            params![i(ino), now],
        )?;
    }
    Ok(())
}

fn is_empty_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<bool> {
    let n: i64 = tx.query_row(
        "SELECT COUNT(*) FROM (SELECT 1 FROM dentries WHERE parent = ?1 LIMIT 1)",
        [i(ino)],
        |r| r.get(0),
    )?;
    Ok(n == 0)
}

/// The directory holding directory `ino` (directories have exactly one entry).
fn parent_of_dir(tx: &rusqlite::Connection, ino: u64) -> OpResult<Option<u64>> {
    Ok(tx
        .query_row(
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
        Some(Op::RecordCopies(c)) if c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 blocks per record")
        }
        Some(Op::DropCopies(c)) if c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 blocks per drop")
        }
        Some(Op::ForgetBlocks(c)) if c.hashes.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 blocks per forget")
        }
        Some(Op::SetHostState(c))
            if !matches!(c.state.as_str(), "active" | "away" | "draining") =>
        {
            err(
                ErrorCode::Invalid,
                "a host state is active, away or draining",
            )
        }
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
                R::Error(pb::CommandError {
                    code: e.code as i32,
                    message: e.message,
                })
            }
        }
    };
    let result = pb::CommandResult {
        result: Some(result),
    };
    if cmd.client_id != 0 {
        tx.execute(
            "INSERT OR REPLACE INTO applied_ops VALUES (?1, ?2, ?3, ?4)",
            params![
                i(cmd.client_id),
                i(cmd.op_id),
                if cmd.leader_ns > 0 {
                    cmd.leader_ns
                } else {
                    cmd.now_ns
                },
                result.encode_to_vec()
            ],
        )?;
    }
    Ok(result)
}

fn apply_op(tx: &Transaction<'_>, cmd: &pb::Command) -> OpResult<Option<pb::Attr>> {
    let now = cmd.now_ns;
    // What garbage collection judges by: the leader's clock, not a client's.
    let leader_now = if cmd.leader_ns > 0 {
        cmd.leader_ns
    } else {
        cmd.now_ns
    };
    let Some(op) = &cmd.op else {
        return err(ErrorCode::Invalid, "command without an operation");
    };
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
            Ok(Some(a))
        }
        Op::Link(c) => {
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
            tx.execute(
                "UPDATE inodes SET nlink = nlink + 1, ctime = ?2 WHERE ino = ?1",
                params![i(c.ino), now],
            )?;
            Ok(Some(get_attr(tx, c.ino)?))
        }
        Op::Unlink(c) => {
            check_name(&c.name)?;
            require_dir(tx, c.parent)?;
            let ino = lookup_ino(tx, c.parent, &c.name)?
                .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
            if get_attr(tx, ino)?.kind == FileKind::KindDir as i32 {
                return err(ErrorCode::IsDir, "is a directory");
            }
            unlink_entry(tx, c.parent, &c.name, now, 0)?;
            drop_link(tx, ino, now, leader_now)?;
            Ok(None)
        }
        Op::Rmdir(c) => {
            check_name(&c.name)?;
            require_dir(tx, c.parent)?;
            let ino = lookup_ino(tx, c.parent, &c.name)?
                .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
            require_dir(tx, ino)?;
            if !is_empty_dir(tx, ino)? {
                return err(ErrorCode::NotEmpty, "directory not empty");
            }
            unlink_entry(tx, c.parent, &c.name, now, -1)?;
            drop_link(tx, ino, now, leader_now)?;
            Ok(None)
        }
        Op::Rename(c) => rename(tx, c, now, leader_now).map(|()| None),
        Op::SetAttr(c) => set_attr(tx, c, now, leader_now).map(Some),
        Op::CommitExtents(c) => commit_extents(tx, c, now, leader_now).map(Some),
        Op::RecordCopies(c) => {
            record_copies(tx, &c.copies, leader_now)?;
            Ok(None)
        }
        Op::DropCopies(c) => {
            drop_copies(tx, &c.copies, c.keep as usize)?;
            Ok(None)
        }
        Op::ForgetBlocks(c) => {
            forget_blocks(tx, &c.hashes, c.idle_before_ns)?;
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
            report_devices(tx, c.host_id, &c.devices, leader_now)?;
            Ok(None)
        }
        Op::SetHostState(c) => {
            if c.state == "active" {
                tx.execute("DELETE FROM host_states WHERE host_id = ?1", [i(c.host_id)])?;
            } else {
                tx.execute(
                    "INSERT OR REPLACE INTO host_states VALUES (?1, ?2, ?3, ?4)",
                    params![i(c.host_id), c.state, c.until_ns, leader_now],
                )?;
            }
            Ok(None)
        }
        Op::RemoveHost(c) => {
            tx.execute("DELETE FROM host_states WHERE host_id = ?1", [i(c.host_id)])?;
            let devices: Vec<i64> = tx
                .prepare("SELECT device_id FROM devices WHERE host_id = ?1")?
                .query_map([i(c.host_id)], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for d in devices {
                tx.execute("DELETE FROM copies WHERE device_id = ?1", [d])?;
                tx.execute("DELETE FROM gone_devices WHERE device_id = ?1", [d])?;
            }
            tx.execute("DELETE FROM devices WHERE host_id = ?1", [i(c.host_id)])?;
            tx.execute("DELETE FROM hosts WHERE host_id = ?1", [i(c.host_id)])?;
            Ok(None)
        }
        Op::ReportDevices(c) => {
            report_devices(tx, c.host_id, &c.devices, leader_now)?;
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
            let n = tx.execute(
                "UPDATE sessions SET last_seen = ?2 WHERE session_id = ?1",
                params![i(c.session_id), now],
            )?;
            if n == 0 {
                return err(ErrorCode::NoSession, "session expired or unknown");
            }
            Ok(None)
        }
        Op::CloseSession(c) => {
            tx.execute("DELETE FROM locks WHERE session_id = ?1", [i(c.session_id)])?;
            tx.execute(
                "DELETE FROM sessions WHERE session_id = ?1",
                [i(c.session_id)],
            )?;
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
            tx.execute(
                "DELETE FROM applied_ops WHERE at < ?1",
                [now.saturating_sub(OP_RESULT_KEEP_NS)],
            )?;
            Ok(None)
        }
        Op::Lock(c) => lock(tx, c).map(|()| None),
    }
}

fn link_entry(
    tx: &Transaction<'_>,
    parent: u64,
    name: &[u8],
    ino: u64,
    now: i64,
    nlink_delta: i64,
) -> OpResult<()> {
    tx.execute(
        "INSERT INTO dentries VALUES (?1, ?2, ?3)",
        params![i(parent), name, i(ino)],
    )?;
    touch_dir(tx, parent, now, nlink_delta)
}

fn unlink_entry(
    tx: &Transaction<'_>,
    parent: u64,
    name: &[u8],
    now: i64,
    nlink_delta: i64,
) -> OpResult<()> {
    tx.execute(
        "DELETE FROM dentries WHERE parent = ?1 AND name = ?2",
        params![i(parent), name],
    )?;
    touch_dir(tx, parent, now, nlink_delta)
}

fn rename(tx: &Transaction<'_>, c: &pb::Rename, now: i64, leader_now: i64) -> OpResult<()> {
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
        tx.execute(
            "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
            params![i(c.parent), c.name, i(dst)],
        )?;
        tx.execute(
            "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
            params![i(c.new_parent), c.new_name, i(src)],
        )?;
        let delta = moves_dir_between(src_is_dir) - moves_dir_between(dst_is_dir);
        touch_dir(tx, c.parent, now, -delta)?;
        touch_dir(tx, c.new_parent, now, delta)?;
        for ino in [src, dst] {
            tx.execute(
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
            tx.execute(
                "INSERT OR IGNORE INTO lineage(hash, prev)
                 SELECT n.hash, o.hash FROM extents n JOIN extents o ON o.ino = ?2 AND o.offset = n.offset
                 WHERE n.ino = ?1 AND n.hash != o.hash",
                params![i(src), i(dst)],
            )?;
        }
        drop_link(tx, dst, now, leader_now)?;
    }
    let delta = moves_dir_between(src_is_dir);
    unlink_entry(tx, c.parent, &c.name, now, -delta)?;
    link_entry(tx, c.new_parent, &c.new_name, src, now, delta)?;
    tx.execute(
        "UPDATE inodes SET ctime = ?2 WHERE ino = ?1",
        params![i(src), now],
    )?;
    Ok(())
}

fn load_extents(
    tx: &rusqlite::Connection,
    ino: u64,
    start: u64,
    end: u64,
) -> OpResult<Vec<Extent>> {
    // Extents never overlap, so those starting before `start` can reach into
    // the range only if they end after it.
    let mut stmt = tx.prepare_cached(
        "SELECT offset, length, hash, block_offset FROM extents
         WHERE ino = ?1 AND offset < ?3 AND offset + length > ?2 ORDER BY offset",
    )?;
    let rows = stmt.query_map(
        params![i(ino), i(start), i(end.min(i64::MAX as u64))],
        |r| {
            Ok(Extent {
                offset: r.get::<_, i64>(0)? as u64,
                length: r.get::<_, i64>(1)? as u64,
                hash: r.get(2)?,
                block_offset: r.get::<_, i64>(3)? as u64,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Makes `[start, end)` of `ino` a hole: extents inside go, straddling ones are cut.
fn punch(tx: &Transaction<'_>, ino: u64, start: u64, end: u64, leader_now: i64) -> OpResult<()> {
    let old = load_extents(tx, ino, start, end)?;
    for e in &old {
        tx.execute(
            "DELETE FROM extents WHERE ino = ?1 AND offset = ?2",
            params![i(ino), i(e.offset)],
        )?;
    }
    for e in overlay(&old, start, end) {
        insert_extent(tx, ino, &e)?;
    }
    let hashes: Vec<Vec<u8>> = old.into_iter().map(|e| e.hash).collect();
    note_unreferenced(tx, &hashes, leader_now)
}

fn insert_extent(tx: &Transaction<'_>, ino: u64, e: &Extent) -> OpResult<()> {
    tx.execute(
        "INSERT OR REPLACE INTO extents VALUES (?1, ?2, ?3, ?4, ?5)",
        params![i(ino), i(e.offset), i(e.length), e.hash, i(e.block_offset)],
    )?;
    tx.execute("DELETE FROM idle_blocks WHERE hash = ?1", [&e.hash])?;
    Ok(())
}

/// Of `hashes`, the recorded blocks no extent points at any more are idle
/// from `at` on: garbage collection forgets them after its grace period.
fn note_unreferenced(tx: &Transaction<'_>, hashes: &[Vec<u8>], at: i64) -> OpResult<()> {
    let mut mark = tx.prepare_cached(
        "INSERT OR REPLACE INTO idle_blocks SELECT ?1, ?2
         WHERE EXISTS (SELECT 1 FROM blocks WHERE hash = ?1) AND NOT EXISTS (SELECT 1 FROM extents WHERE hash = ?1)",
    )?;
    for h in hashes {
        mark.execute(params![h, at])?;
    }
    Ok(())
}

/// Largest file offset we accept: keeps `offset + length` inside SQLite's i64.
const MAX_FILE_BYTES: u64 = 1 << 60;

fn set_attr(
    tx: &Transaction<'_>,
    c: &pb::SetAttr,
    now: i64,
    leader_now: i64,
) -> OpResult<pb::Attr> {
    let a = get_attr(tx, c.ino)?;
    if let Some(mode) = c.mode {
        tx.execute(
            "UPDATE inodes SET mode = ?2 WHERE ino = ?1",
            params![i(c.ino), mode & 0o7777],
        )?;
    }
    if let Some(uid) = c.uid {
        tx.execute(
            "UPDATE inodes SET uid = ?2 WHERE ino = ?1",
            params![i(c.ino), uid],
        )?;
    }
    if let Some(gid) = c.gid {
        tx.execute(
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
        tx.execute(
            "UPDATE inodes SET size = ?2, mtime = ?3, version = version + 1 WHERE ino = ?1",
            params![i(c.ino), i(size), now],
        )?;
    }
    if let Some(t) = c.atime_ns {
        tx.execute(
            "UPDATE inodes SET atime = ?2 WHERE ino = ?1",
            params![i(c.ino), t],
        )?;
    }
    if let Some(t) = c.mtime_ns {
        tx.execute(
            "UPDATE inodes SET mtime = ?2 WHERE ino = ?1",
            params![i(c.ino), t],
        )?;
    }
    tx.execute(
        "UPDATE inodes SET ctime = ?2 WHERE ino = ?1",
        params![i(c.ino), now],
    )?;
    get_attr(tx, c.ino)
}

fn commit_extents(
    tx: &Transaction<'_>,
    c: &pb::CommitExtents,
    now: i64,
    leader_now: i64,
) -> OpResult<pb::Attr> {
    let a = get_attr(tx, c.ino)?;
    if a.kind != FileKind::KindFile as i32 {
        return err(ErrorCode::IsDir, "extents belong to regular files");
    }
    record_copies(tx, &c.copies, leader_now)?;
    let base = if c.append { a.size } else { 0 };
    let mut size = a.size;
    for e in &c.extents {
        let e = &pb::Extent {
            offset: e.offset.saturating_add(base),
            ..e.clone()
        };
        if e.hash.len() != HASH_LEN || e.length == 0 {
            return err(
                ErrorCode::Invalid,
                "an extent needs a 32-byte hash and a length",
            );
        }
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|&end| end <= MAX_FILE_BYTES);
        let Some(end) = end else {
            return err(ErrorCode::Invalid, "extent beyond the largest file size");
        };
        let block_size: Option<i64> = tx
            .query_row("SELECT size FROM blocks WHERE hash = ?1", [&e.hash], |r| {
                r.get(0)
            })
            .optional()?;
        match block_size {
            None => {
                return err(
                    ErrorCode::Invalid,
                    "extent names a block with no recorded copies",
                )
            }
            Some(bs) if e.block_offset.saturating_add(e.length) > bs as u64 => {
                return err(
                    ErrorCode::Invalid,
                    "extent reaches past the end of its block",
                )
            }
            _ => {}
        }
        // Rewritten in place: the block it replaces at the same offset is its older version.
        tx.execute(
            "INSERT OR IGNORE INTO lineage(hash, prev) SELECT ?3, hash FROM extents WHERE ino = ?1 AND offset = ?2 AND hash != ?3",
            params![i(c.ino), i(e.offset), e.hash],
        )?;
        punch(tx, c.ino, e.offset, end, leader_now)?;
        let ext = Extent {
            offset: e.offset,
            length: e.length,
            hash: e.hash.clone(),
            block_offset: e.block_offset,
        };
        insert_extent(tx, c.ino, &ext)?;
        size = size.max(end);
    }
    tx.execute(
        "UPDATE inodes SET size = ?2, mtime = ?3, ctime = ?3, version = version + 1 WHERE ino = ?1",
        params![i(c.ino), i(size), now],
    )?;
    get_attr(tx, c.ino)
}

/// Records copies. A block no extent points at yet (its write is not
/// committed) is idle from `leader_now`, which gives the write the grace
/// period to commit before garbage collection may take it.
fn record_copies(
    tx: &Transaction<'_>,
    copies: &[pb::BlockCopies],
    leader_now: i64,
) -> OpResult<()> {
    for b in copies {
        if b.hash.len() != HASH_LEN || b.size as usize > failsafe_core::MAX_BLOCK_BYTES {
            return err(
                ErrorCode::Invalid,
                "block copies need a 32-byte hash and a size within the block limit",
            );
        }
        tx.execute(
            "INSERT OR IGNORE INTO blocks (hash, size) VALUES (?1, ?2)",
            params![b.hash, i(b.size)],
        )?;
        for d in &b.device_ids {
            tx.execute(
                "INSERT OR IGNORE INTO copies (hash, device_id) VALUES (?1, ?2)",
                params![b.hash, i(*d)],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO idle_blocks SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM extents WHERE hash = ?1)",
            params![b.hash, leader_now],
        )?;
    }
    Ok(())
}

/// Forgets copies found missing or corrupt, or trimmed. The block's row (its
/// size) stays: extents may still name it, and a repaired copy is recorded
/// again. With `keep`, a copy goes only while `keep` others stay recorded.
fn drop_copies(tx: &Transaction<'_>, copies: &[pb::BlockCopies], keep: usize) -> OpResult<()> {
    for b in copies {
        if b.hash.len() != HASH_LEN {
            return err(ErrorCode::Invalid, "block copies need a 32-byte hash");
        }
        for d in &b.device_ids {
            if keep > 0 {
                let others: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM copies WHERE hash = ?1 AND device_id != ?2",
                    params![b.hash, i(*d)],
                    |r| r.get(0),
                )?;
                if (others as usize) < keep {
                    continue;
                }
            }
            tx.execute(
                "DELETE FROM copies WHERE hash = ?1 AND device_id = ?2",
                params![b.hash, i(*d)],
            )?;
        }
    }
    Ok(())
}

/// Garbage collection: forgets the blocks of `hashes` that no extent points
/// at and that have been idle since before `idle_before` (a block without an
/// idle time predates them, and counts as idle since 0). A block referenced
/// or recorded again since it was picked is left alone.
fn forget_blocks(tx: &Transaction<'_>, hashes: &[Vec<u8>], idle_before: i64) -> OpResult<()> {
    for h in hashes {
        if h.len() != HASH_LEN {
            return err(ErrorCode::Invalid, "a block hash is 32 bytes");
        }
        let referenced: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM extents WHERE hash = ?1)",
            [h],
            |r| r.get(0),
        )?;
        let since: i64 = tx
            .query_row("SELECT since FROM idle_blocks WHERE hash = ?1", [h], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        if referenced || since >= idle_before {
            continue;
        }
        tx.execute("DELETE FROM copies WHERE hash = ?1", [h])?;
        tx.execute("DELETE FROM blocks WHERE hash = ?1", [h])?;
        tx.execute("DELETE FROM idle_blocks WHERE hash = ?1", [h])?;
        tx.execute("DELETE FROM lineage WHERE hash = ?1", [h])?;
    }
    Ok(())
}

/// Hosts in an administrative state: (host, state, until, since), times
/// on the leader's clock.
pub fn host_states(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(u64, String, i64, i64)>> {
    conn.prepare_cached("SELECT host_id, state, until, since FROM host_states")?
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect()
}

/// Devices of hosts that are away or draining.
pub fn held_back_devices(
    conn: &rusqlite::Connection,
) -> rusqlite::Result<std::collections::BTreeSet<u64>> {
    conn.prepare_cached(
        "SELECT d.device_id FROM devices d JOIN host_states s ON s.host_id = d.host_id",
    )?
    .query_map([], |r| r.get::<_, i64>(0).map(|d| d as u64))?
    .collect()
}

/// Devices of hosts that are away (shipped).
pub fn away_devices(
    conn: &rusqlite::Connection,
) -> rusqlite::Result<std::collections::BTreeSet<u64>> {
    conn.prepare_cached(
        "SELECT d.device_id FROM devices d JOIN host_states s ON s.host_id = d.host_id WHERE s.state = 'away'",
    )?
    .query_map([], |r| r.get::<_, i64>(0).map(|d| d as u64))?
    .collect()
}

/// What shipping (or removing) `host_id` would put at risk: the blocks it
/// holds, how many are at risk, and (`with_names`) the names of files with a
/// block that has fewer than `needed` copies on
/// devices in `live` (other hosts that are up and not away), or — when
/// `other_zones` — none outside the host's own zone.
pub fn ship_risk(
    conn: &rusqlite::Connection,
    host_id: u64,
    live: &[u64],
    needed: usize,
    other_zones: bool,
    with_names: bool,
) -> rusqlite::Result<(u64, u64, Vec<String>)> {
    let zone: String = conn
        .query_row(
            "SELECT zone FROM hosts WHERE host_id = ?1",
            [i(host_id)],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or_default();
    let live: std::collections::BTreeSet<u64> = live.iter().copied().collect();
    let held: Vec<Vec<u8>> = conn
        .prepare(
            "SELECT DISTINCT c.hash FROM copies c JOIN devices d ON d.device_id = c.device_id
             WHERE d.host_id = ?1 AND EXISTS (SELECT 1 FROM extents e WHERE e.hash = c.hash)",
        )?
        .query_map([i(host_id)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut risky = Vec::new();
    for h in &held {
        let elsewhere: Vec<(u64, String)> = conn
            .prepare_cached(
                "SELECT c.device_id, h.zone FROM copies c JOIN devices d ON d.device_id = c.device_id
                 JOIN hosts h ON h.host_id = d.host_id WHERE c.hash = ?1 AND d.host_id != ?2",
            )?
            .query_map(params![h, i(host_id)], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|(d, _)| live.contains(d))
            .collect();
        if elsewhere.len() < needed || (other_zones && elsewhere.iter().all(|(_, z)| *z == zone)) {
            risky.push(h.clone());
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for h in risky.iter().take(if with_names { 1000 } else { 0 }) {
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT d.name FROM extents e JOIN dentries d ON d.ino = e.ino WHERE e.hash = ?1 LIMIT 5",
        )?;
        for n in stmt.query_map([h], |r| r.get::<_, Vec<u8>>(0))? {
            names.insert(String::from_utf8_lossy(&n?).to_string());
        }
        if names.len() >= 50 {
            break;
        }
    }
    Ok((
        held.len() as u64,
        risky.len() as u64,
        names.into_iter().collect(),
    ))
}

/// An older version of block `hash` that `device_id` holds (by the records),
/// following the lineage back up to 64 versions (a page saved many times
/// while a host was away): the base for a delta.
pub fn delta_base(
    conn: &rusqlite::Connection,
    hash: &[u8],
    device_id: u64,
) -> rusqlite::Result<Option<Vec<u8>>> {
    let mut at = hash.to_vec();
    for _ in 0..64 {
        let prev: Option<Vec<u8>> = conn
            .query_row("SELECT prev FROM lineage WHERE hash = ?1", [&at], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(prev) = prev else { return Ok(None) };
        let held: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM copies WHERE hash = ?1 AND device_id = ?2)",
            params![prev, i(device_id)],
            |r| r.get(0),
        )?;
        if held {
            return Ok(Some(prev));
        }
        at = prev;
    }
    Ok(None)
}

/// A host's report of its devices, which is the whole list: a device the
/// tracker knows on this host that is not in it is *gone* (its directory
/// was wiped or the disk replaced; a fresh directory gets a new device id).
/// Its copies are dropped at once, so repair rebuilds them without waiting
/// for anything: the data is not coming back. A gone device that is
/// reported again is a device again, without copies.
fn report_devices(
    tx: &Transaction<'_>,
    host_id: u64,
    devices: &[pb::DeviceInfo],
    leader_now: i64,
) -> OpResult<()> {
    let known: Vec<i64> = tx
        .prepare_cached(
            "SELECT device_id FROM devices WHERE host_id = ?1
             AND device_id NOT IN (SELECT device_id FROM gone_devices) ORDER BY device_id",
        )?
        .query_map([i(host_id)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in known {
        if devices.iter().any(|d| i(d.device_id) == id) {
            continue;
        }
        let dropped = tx.execute("DELETE FROM copies WHERE device_id = ?1", [id])?;
        tx.execute(
            "INSERT OR REPLACE INTO gone_devices VALUES (?1, ?2)",
            params![id, leader_now],
        )?;
        tracing::warn!(
            host = format!("{host_id:016x}"),
            device = format!("{:016x}", id as u64),
            copies = dropped,
            "device no longer reported by its host: marked gone, its copies dropped for repair to rebuild"
        );
    }
    for d in devices {
        tx.execute(
            "DELETE FROM gone_devices WHERE device_id = ?1",
            [i(d.device_id)],
        )?;
        tx.execute(
            "INSERT INTO devices (device_id, host_id, path, capacity, free, used, blocks) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
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
    let (start, end) = if kind == pb::LockKind::LockFlock {
        (0, u64::MAX)
    } else {
        (c.start, c.end)
    };
    if start >= end {
        return err(ErrorCode::Invalid, "empty lock range");
    }
    let exists: Option<i64> = tx
        .query_row(
            "SELECT 1 FROM sessions WHERE session_id = ?1",
            [i(c.session_id)],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return err(ErrorCode::NoSession, "session expired or unknown");
    }
    // No inode check: a file unlinked while open can still be locked and
    // unlocked through its descriptors.
    let held: Vec<HeldLock> = tx
        .prepare_cached(
            "SELECT session_id, owner, ltype, start, end FROM locks WHERE ino = ?1 AND kind = ?2",
        )?
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
            params![
                i(c.ino),
                i(h.session_id),
                i(h.owner),
                c.kind,
                h.ltype,
                i(h.start),
                i(h.end)
            ],
        )
    };
    for h in held.iter().filter(|h| mine(h)) {
        if h.start < start {
            insert(&HeldLock {
                end: start.min(h.end),
                ..h.clone()
            })?;
        }
        if h.end > end {
            insert(&HeldLock {
                start: end.max(h.start),
                ..h.clone()
            })?;
        }
    }
    if ltype != pb::LockType::LockUnlock {
        insert(&HeldLock {
            session_id: c.session_id,
            owner: c.owner,
            ltype: ltype as i32,
            start,
            end,
        })?;
    }
    Ok(())
}

// ---------- queries ----------

pub fn query(
    conn: &rusqlite::Connection,
    q: &Query,
    class: ReplicationClass,
) -> OpResult<pb::query_reply::Reply> {
    use pb::query_reply::Reply;
    match q {
        Query::Lookup(l) => {
            check_name(&l.name)?;
            require_dir(conn, l.parent)?;
            let ino = lookup_ino(conn, l.parent, &l.name)?
                .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
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
                    Ok(pb::DirEntry {
                        name: row.get(0)?,
                        ino: row.get::<_, i64>(1)? as u64,
                        kind: row.get(2)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let more = entries.len() as i64 > limit;
            entries.truncate(limit as usize);
            Ok(Reply::DirPage(pb::DirPage { entries, more }))
        }
        Query::ReadLink(r) => {
            let target: Option<Option<Vec<u8>>> = conn
                .query_row(
                    "SELECT target FROM inodes WHERE ino = ?1",
                    [i(r.ino)],
                    |row| row.get(0),
                )
                .optional()?;
            match target {
                None => err(ErrorCode::NotFound, "no such inode"),
                Some(None) => err(ErrorCode::Invalid, "not a symlink"),
                Some(Some(t)) => Ok(Reply::Target(pb::Target { target: t })),
            }
        }
        Query::StatFs(_) => {
            let (total, free): (i64, i64) =
                conn.query_row(
                    &format!("SELECT COALESCE(SUM(capacity), 0), COALESCE(SUM(free), 0) FROM devices WHERE {LIVE_DEVICE}"),
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
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
            let away = away_devices(conn)?;
            let mut copies = Vec::new();
            let mut device_ids = std::collections::BTreeSet::new();
            let mut seen = std::collections::BTreeSet::new();
            for e in &extents {
                if !seen.insert(e.hash.clone()) {
                    continue;
                }
                let mut bc = block_copies(conn, &e.hash)?;
                // A shipped host serves no reads until it is back and verified.
                bc.device_ids.retain(|d| !away.contains(d));
                device_ids.extend(bc.device_ids.iter().copied());
                copies.push(bc);
            }
            let devices = device_locations(conn)?
                .into_iter()
                .filter(|d| device_ids.contains(&d.device_id))
                .collect();
            Ok(Reply::FileExtents(pb::FileExtents {
                attr: Some(attr),
                extents: extents
                    .into_iter()
                    .map(|e| pb::Extent {
                        offset: e.offset,
                        length: e.length,
                        hash: e.hash,
                        block_offset: e.block_offset,
                    })
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
            let copies = if p.copies == 0 {
                class.copies
            } else {
                (p.copies as usize).min(class.copies + 4)
            };
            let locations = device_locations(conn)?;
            let space: BTreeMap<u64, (u64, u64)> = conn
                .prepare_cached("SELECT device_id, capacity, free FROM devices")?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                    ))
                })?
                .collect::<Result<_, _>>()?;
            // Shipped and draining hosts take no new blocks.
            let leaving = held_back_devices(conn)?;
            let candidates: Vec<Candidate> = locations
                .iter()
                .filter(|d| !leaving.contains(&d.device_id))
                .filter(|d| {
                    space
                        .get(&d.device_id)
                        .is_some_and(|&(capacity, free)| !is_full(capacity, free))
                })
                .map(|d| Candidate {
                    device_id: d.device_id,
                    host_id: d.host_id,
                    zone: d.zone.clone(),
                })
                .collect();
            // The quorum follows the replication class and the devices that
            // exist, not the ones with room: full devices do not lower it.
            let quorum = class.quorum_for(class.copies.min(locations.len()));
            if candidates.len() < quorum {
                return err(
                    ErrorCode::NoSpace,
                    "too few devices have room for new blocks",
                );
            }
            let choices = p
                .hashes
                .iter()
                .map(|h| pb::PlacementChoice {
                    hash: h.clone(),
                    device_ids: place(h, &candidates, copies),
                })
                .collect::<Vec<_>>();
            Ok(Reply::Placement(pb::Placement {
                choices,
                devices: locations,
                write_quorum: quorum as u32,
            }))
        }
        Query::ListLocks(l) => {
            let locks = conn
                .prepare_cached(
                    "SELECT session_id, owner, kind, ltype, start, end FROM locks WHERE ino = ?1",
                )?
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
    let size: i64 = conn
        .query_row("SELECT size FROM blocks WHERE hash = ?1", [hash], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0);
    let device_ids = conn
        .prepare_cached("SELECT device_id FROM copies WHERE hash = ?1")?
        .query_map([hash], |r| Ok(r.get::<_, i64>(0)? as u64))?
        .collect::<Result<_, _>>()?;
    Ok(pb::BlockCopies {
        hash: hash.to_vec(),
        size: size as u64,
        device_ids,
    })
}

/// A device that is not gone (SQL, over `devices` as `d` or unaliased).
const LIVE_DEVICE: &str = "device_id NOT IN (SELECT device_id FROM gone_devices)";

/// Every device that is not gone, with its host's zone and address.
pub fn device_locations(conn: &rusqlite::Connection) -> OpResult<Vec<pb::DeviceLocation>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT d.device_id, d.host_id, h.zone, h.addr FROM devices d JOIN hosts h ON h.host_id = d.host_id
             WHERE d.{LIVE_DEVICE} ORDER BY d.device_id"
        ))?
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
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })?
        .collect()
}

/// Every device with its state: "gone" (no longer reported by its host),
/// "full" (less free space than its reserve) or "ok".
pub fn devices(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<pb::DeviceStatus>> {
    conn.prepare_cached(
        "SELECT device_id, host_id, path, capacity, used, blocks, free,
                device_id IN (SELECT device_id FROM gone_devices)
         FROM devices ORDER BY host_id, device_id",
    )?
    .query_map([], |r| {
        let (capacity_bytes, free_bytes) = (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(6)? as u64);
        let state = if r.get::<_, bool>(7)? {
            "gone"
        } else if is_full(capacity_bytes, free_bytes) {
            "full"
        } else {
            "ok"
        };
        Ok(pb::DeviceStatus {
            device_id: r.get::<_, i64>(0)? as u64,
            host_id: r.get::<_, i64>(1)? as u64,
            path: r.get(2)?,
            capacity_bytes,
            used_bytes: r.get::<_, i64>(4)? as u64,
            blocks: r.get::<_, i64>(5)? as u64,
            free_bytes,
            state: state.into(),
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
    ids.iter()
        .map(|&d| i(d).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Blocks referenced by files with fewer than `copies` copies on `live`
/// devices, and those with none there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationCounts {
    pub under_replicated: u64,
    pub unavailable: u64,
}

pub fn replication_counts(
    conn: &rusqlite::Connection,
    live: &[u64],
    copies: usize,
) -> rusqlite::Result<ReplicationCounts> {
    let sql = format!(
        "SELECT COALESCE(SUM(n < ?1), 0), COALESCE(SUM(n = 0), 0) FROM (
           SELECT (SELECT COUNT(*) FROM copies c WHERE c.hash = r.hash AND c.device_id IN ({})) AS n
           FROM (SELECT DISTINCT hash FROM extents) r)",
        id_list(live)
    );
    conn.query_row(&sql, [copies as i64], |r| {
        Ok(ReplicationCounts {
            under_replicated: r.get::<_, i64>(0)? as u64,
            unavailable: r.get::<_, i64>(1)? as u64,
        })
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
        .query_map(
            params![copies as i64, targets.len() as i64, after, limit as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    holders_of(conn, rows)
}

/// Up to `limit` blocks files reference, after `after` in hash order, with
/// their holders: what rebalancing looks at, a slice at a time.
pub fn referenced_after(
    conn: &rusqlite::Connection,
    after: &[u8],
    limit: usize,
) -> rusqlite::Result<Vec<failsafe_core::BlockView>> {
    let rows: Vec<(Vec<u8>, i64)> = conn
        .prepare_cached(
            "SELECT b.hash, b.size FROM blocks b WHERE b.hash > ?1
               AND EXISTS (SELECT 1 FROM extents e WHERE e.hash = b.hash) ORDER BY b.hash LIMIT ?2",
        )?
        .query_map(params![after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    holders_of(conn, rows)
}

/// A device as repair sees it: where it is, and its space.
#[derive(Debug, Clone)]
pub struct DeviceSpace {
    pub location: pb::DeviceLocation,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

impl DeviceSpace {
    /// Room for another block: not full (the reserve placement keeps).
    pub fn has_room(&self) -> bool {
        !is_full(self.capacity_bytes, self.free_bytes)
    }
}

/// Every device that is not gone, with its host's zone and address and its
/// space.
pub fn device_space(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<DeviceSpace>> {
    conn.prepare_cached(&format!(
        "SELECT d.device_id, d.host_id, h.zone, h.addr, d.capacity, d.free FROM devices d JOIN hosts h ON h.host_id = d.host_id
         WHERE d.{LIVE_DEVICE} ORDER BY d.device_id"
    ))?
    .query_map([], |r| {
        let location = pb::DeviceLocation {
            device_id: r.get::<_, i64>(0)? as u64,
            host_id: r.get::<_, i64>(1)? as u64,
            zone: r.get(2)?,
            addr: r.get(3)?,
        };
        Ok(DeviceSpace { location, capacity_bytes: r.get::<_, i64>(4)? as u64, free_bytes: r.get::<_, i64>(5)? as u64 })
    })?
    .collect()
}

/// Each block's recorded copies, in `hash`'s order.
fn holders_of(
    conn: &rusqlite::Connection,
    rows: Vec<(Vec<u8>, i64)>,
) -> rusqlite::Result<Vec<failsafe_core::BlockView>> {
    let mut holders =
        conn.prepare_cached("SELECT device_id FROM copies WHERE hash = ?1 ORDER BY device_id")?;
    rows.into_iter()
        .map(|(hash, size)| {
            let devices = holders
                .query_map([&hash], |r| Ok(r.get::<_, i64>(0)? as u64))?
                .collect::<Result<_, _>>()?;
            Ok(failsafe_core::BlockView {
                hash,
                size: size as u64,
                holders: devices,
            })
        })
        .collect()
}

/// Referenced blocks with more than `copies` copies on `up` devices (a dead
/// host came back, repair raced a late write), hashes after `after` first,
/// each with all its recorded copies.
pub fn over_replicated(
    conn: &rusqlite::Connection,
    up: &[u64],
    copies: usize,
    after: &[u8],
    limit: usize,
) -> rusqlite::Result<Vec<failsafe_core::BlockView>> {
    let sql = format!(
        "SELECT c.hash, b.size FROM copies c JOIN blocks b ON b.hash = c.hash
         WHERE c.device_id IN ({}) AND EXISTS (SELECT 1 FROM extents e WHERE e.hash = c.hash)
         GROUP BY c.hash HAVING COUNT(*) > ?1
         ORDER BY c.hash <= ?2, c.hash LIMIT ?3",
        id_list(up)
    );
    let rows: Vec<(Vec<u8>, i64)> = conn
        .prepare(&sql)?
        .query_map(params![copies as i64, after, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    holders_of(conn, rows)
}

/// Blocks no extent references that have been idle since before
/// `idle_before` (see `idle_blocks`), each with its recorded copies.
pub fn garbage(
    conn: &rusqlite::Connection,
    idle_before: i64,
    limit: usize,
) -> rusqlite::Result<Vec<failsafe_core::BlockView>> {
    let rows: Vec<(Vec<u8>, i64)> = conn
        .prepare_cached(
            "SELECT b.hash, b.size FROM blocks b LEFT JOIN idle_blocks i ON i.hash = b.hash
             WHERE NOT EXISTS (SELECT 1 FROM extents e WHERE e.hash = b.hash) AND COALESCE(i.since, 0) < ?1
               -- A shipped host's old blocks stay known: its catch-up sends
               -- deltas against them, and its sweep must not take them.
               AND NOT EXISTS (SELECT 1 FROM copies c JOIN devices d ON d.device_id = c.device_id
                               JOIN host_states s ON s.host_id = d.host_id WHERE c.hash = b.hash)
             ORDER BY b.hash LIMIT ?2",
        )?
        .query_map(params![idle_before, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    holders_of(conn, rows)
}

/// The devices each of `hashes` is recorded on; `None` for a block the
/// tracker does not know (any more).
pub fn recorded(
    conn: &rusqlite::Connection,
    hashes: &[Vec<u8>],
) -> rusqlite::Result<Vec<Option<Vec<u64>>>> {
    let mut known = conn.prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1")?;
    let mut holders =
        conn.prepare_cached("SELECT device_id FROM copies WHERE hash = ?1 ORDER BY device_id")?;
    hashes
        .iter()
        .map(|h| {
            if !known.exists([h])? {
                return Ok(None);
            }
            holders
                .query_map([h], |r| Ok(r.get::<_, i64>(0)? as u64))?
                .collect::<Result<_, _>>()
                .map(Some)
        })
        .collect()
}

/// Which of `hashes` have a copy recorded on `device_id`, if that device is
/// one of `host_id`'s and not gone; `None` otherwise (a host sweeping its
/// own garbage must not act on a device the tracker does not know as its).
pub fn copies_on(
    conn: &rusqlite::Connection,
    host_id: u64,
    device_id: u64,
    hashes: &[Vec<u8>],
) -> rusqlite::Result<Option<std::collections::BTreeSet<Vec<u8>>>> {
    let mine = conn
        .prepare_cached(&format!(
            "SELECT 1 FROM devices WHERE device_id = ?1 AND host_id = ?2 AND {LIVE_DEVICE}"
        ))?
        .exists(params![i(device_id), i(host_id)])?;
    if !mine {
        return Ok(None);
    }
    let mut has = conn.prepare_cached("SELECT 1 FROM copies WHERE hash = ?1 AND device_id = ?2")?;
    let mut out = std::collections::BTreeSet::new();
    for h in hashes {
        if has.exists(params![h, i(device_id)])? {
            out.insert(h.clone());
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::query_reply::Reply;

    fn db() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().expect("in-memory database");
        conn.execute_batch(SCHEMA).expect("schema");
        conn
    }

    fn run(conn: &mut rusqlite::Connection, op: Op) -> pb::CommandResult {
        run_at(conn, op, 1)
    }

    /// Applies `op` as proposed by the leader at `leader_ns`.
    fn run_at(conn: &mut rusqlite::Connection, op: Op, leader_ns: i64) -> pb::CommandResult {
        let tx = conn.transaction().expect("transaction");
        let r = apply(
            &tx,
            &pb::Command {
                now_ns: 1,
                leader_ns,
                op: Some(op),
                ..Default::default()
            },
        )
        .expect("apply");
        tx.commit().expect("commit");
        r
    }

    fn device(id: u64, free: u64) -> pb::DeviceInfo {
        let path = format!("/d{id}");
        pb::DeviceInfo {
            device_id: id,
            host_id: 7,
            path,
            capacity_bytes: 1 << 40,
            free_bytes: free,
            ..Default::default()
        }
    }

    const ROOMY: u64 = 1 << 39;

    fn copies(hash: &[u8], devices: &[u64]) -> pb::BlockCopies {
        pb::BlockCopies {
            hash: hash.to_vec(),
            size: 10,
            device_ids: devices.to_vec(),
        }
    }

    fn ok(r: pb::CommandResult) {
        assert!(
            !matches!(r.result, Some(pb::command_result::Result::Error(_))),
            "{r:?}"
        );
    }

    /// A file whose one extent names block `hash`, recorded on `devices`.
    fn file_with_block(conn: &mut rusqlite::Connection, name: &[u8], hash: &[u8], devices: &[u64]) {
        let r = run(
            conn,
            Op::Create(pb::Create {
                parent: ROOT_INO,
                name: name.to_vec(),
                mode: 0o644,
                ..Default::default()
            }),
        );
        let Some(pb::command_result::Result::Attr(a)) = r.result else {
            panic!("create: {r:?}")
        };
        let extent = pb::Extent {
            offset: 0,
            length: 10,
            hash: hash.to_vec(),
            block_offset: 0,
        };
        ok(run(
            conn,
            Op::CommitExtents(pb::CommitExtents {
                ino: a.ino,
                extents: vec![extent],
                copies: vec![copies(hash, devices)],
                append: false,
            }),
        ));
    }

    #[test]
    fn dropping_copies_forgets_them_and_a_missing_record_is_a_no_op() {
        let mut conn = db();
        let (x, y) = ([1u8; 32], [2u8; 32]);
        file_with_block(&mut conn, b"f", &x, &[1, 2, 3]);
        ok(run(
            &mut conn,
            Op::DropCopies(pb::DropCopies {
                copies: vec![copies(&x, &[2, 9]), copies(&y, &[1])],
                keep: 0,
            }),
        ));
        assert_eq!(
            block_copies(&conn, &x).expect("copies").device_ids,
            vec![1, 3]
        );
        // The size is still known, so the block can be recorded again.
        ok(run(
            &mut conn,
            Op::RecordCopies(pb::RecordCopies {
                copies: vec![copies(&x, &[2])],
            }),
        ));
        assert_eq!(block_copies(&conn, &x).expect("copies").device_ids.len(), 3);
        let bad = run(
            &mut conn,
            Op::DropCopies(pb::DropCopies {
                copies: vec![copies(b"short", &[1])],
                keep: 0,
            }),
        );
        assert!(matches!(
            bad.result,
            Some(pb::command_result::Result::Error(_))
        ));
    }

    #[test]
    fn counts_judge_referenced_blocks_by_their_live_copies() {
        let mut conn = db();
        file_with_block(&mut conn, b"a", &[1u8; 32], &[1, 2, 3]);
        file_with_block(&mut conn, b"b", &[2u8; 32], &[1, 2]);
        file_with_block(&mut conn, b"c", &[3u8; 32], &[3]);
        // An unreferenced block does not count.
        ok(run(
            &mut conn,
            Op::RecordCopies(pb::RecordCopies {
                copies: vec![copies(&[4u8; 32], &[1])],
            }),
        ));
        let all = replication_counts(&conn, &[1, 2, 3], 3).expect("counts");
        assert_eq!(
            all,
            ReplicationCounts {
                under_replicated: 2,
                unavailable: 0
            }
        );
        let without_3 = replication_counts(&conn, &[1, 2], 3).expect("counts");
        assert_eq!(
            without_3,
            ReplicationCounts {
                under_replicated: 3,
                unavailable: 1
            }
        );
        assert_eq!(
            replication_counts(&conn, &[], 3)
                .expect("counts")
                .unavailable,
            3
        );

        // Repair: device 3 down (still counted), device 4 a free target.
        let c = repair_candidates(&conn, &[1, 2, 3, 4], &[1, 2, 4], &[1, 2, 4], 3, &[], 10)
            .expect("candidates");
        let hashes: Vec<u8> = c.iter().map(|b| b.hash[0]).collect();
        // Block 3 lives only on the down device: nothing to read it from.
        assert_eq!(hashes, vec![2]);
        assert_eq!(c[0].holders, vec![1, 2]);
        // Fewest copies first; among equals, the cursor puts blocks after it first.
        file_with_block(&mut conn, b"e", &[5u8; 32], &[1, 2]);
        let c = repair_candidates(&conn, &[1, 2, 3, 4], &[1, 2, 3, 4], &[4], 3, &[2u8; 32], 10)
            .expect("candidates");
        assert_eq!(
            c.iter().map(|b| b.hash[0]).collect::<Vec<_>>(),
            vec![3, 5, 2]
        );
        let c = repair_candidates(&conn, &[1, 2, 3, 4], &[1, 2, 3, 4], &[4], 3, &[], 10)
            .expect("candidates");
        assert_eq!(
            c.iter().map(|b| b.hash[0]).collect::<Vec<_>>(),
            vec![3, 2, 5]
        );
    }

    #[test]
    fn a_device_its_host_no_longer_reports_is_gone_and_its_copies_are_dropped() {
        let mut conn = db();
        let host = Op::RegisterHost(pb::RegisterHost {
            host_id: 7,
            zone: "a".into(),
            addr: "h:1".into(),
            devices: vec![device(1, ROOMY), device(2, ROOMY)],
        });
        ok(run(&mut conn, host));
        file_with_block(&mut conn, b"f", &[1u8; 32], &[1, 2]);
        // The disk behind device 1 was replaced: a fresh directory, device 3.
        let report = |devices| {
            Op::ReportDevices(pb::ReportDevices {
                host_id: 7,
                devices,
            })
        };
        ok(run_at(
            &mut conn,
            report(vec![device(2, ROOMY), device(3, ROOMY)]),
            50,
        ));
        assert_eq!(
            block_copies(&conn, &[1u8; 32]).expect("copies").device_ids,
            vec![2]
        );
        let states: Vec<(u64, String)> = devices(&conn)
            .expect("devices")
            .into_iter()
            .map(|d| (d.device_id, d.state))
            .collect();
        assert_eq!(
            states,
            vec![(1, "gone".into()), (2, "ok".into()), (3, "ok".into())]
        );
        // Short of copies at once: no waiting for the host to be declared dead.
        assert_eq!(
            replication_counts(&conn, &[1, 2, 3], 2)
                .expect("counts")
                .under_replicated,
            1
        );
        // Neither placement nor repair sees it.
        let place = Query::Place(pb::Place {
            hashes: vec![vec![9; 32]],
            copies: 0,
        });
        let Reply::Placement(p) = query(&conn, &place, ReplicationClass::default()).expect("place")
        else {
            panic!()
        };
        assert!(p.choices[0].device_ids.iter().all(|&d| d != 1), "{p:?}");
        assert!(device_space(&conn)
            .expect("space")
            .iter()
            .all(|d| d.location.device_id != 1));
        // Reported again (it was only left out of the configuration): a device again.
        ok(run(
            &mut conn,
            report(vec![device(1, ROOMY), device(2, ROOMY), device(3, ROOMY)]),
        ));
        assert!(devices(&conn)
            .expect("devices")
            .iter()
            .all(|d| d.state == "ok"));
    }

    #[test]
    fn a_full_device_takes_no_new_copies() {
        let mut conn = db();
        let devices_now = vec![
            device(1, ROOMY),
            device(2, 1 << 20),
            device(3, ROOMY),
            device(4, ROOMY),
        ];
        let host = pb::RegisterHost {
            host_id: 7,
            zone: "a".into(),
            addr: "h:1".into(),
            devices: devices_now,
        };
        ok(run(&mut conn, Op::RegisterHost(host)));
        let states: Vec<String> = devices(&conn)
            .expect("devices")
            .into_iter()
            .map(|d| d.state)
            .collect();
        assert_eq!(states, vec!["ok", "full", "ok", "ok"]);
        for n in 0u8..20 {
            let place = Query::Place(pb::Place {
                hashes: vec![vec![n; 32]],
                copies: 0,
            });
            let Reply::Placement(p) =
                query(&conn, &place, ReplicationClass::default()).expect("place")
            else {
                panic!()
            };
            assert_eq!(p.choices[0].device_ids.len(), 3);
            assert!(!p.choices[0].device_ids.contains(&2));
        }
        let space = device_space(&conn).expect("space");
        assert_eq!(
            space
                .iter()
                .filter(|d| !d.has_room())
                .map(|d| d.location.device_id)
                .collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn trimming_drops_a_copy_only_while_enough_others_stay() {
        let mut conn = db();
        let x = [1u8; 32];
        file_with_block(&mut conn, b"f", &x, &[1, 2, 3, 4]);
        let over = over_replicated(&conn, &[1, 2, 3, 4], 3, &[], 10).expect("over");
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].holders, vec![1, 2, 3, 4]);
        // Only up copies count: with device 4 down it is not over.
        assert!(over_replicated(&conn, &[1, 2, 3], 3, &[], 10)
            .expect("over")
            .is_empty());
        // Two drops planned against a view that has since lost copies: only
        // one goes, three stay.
        ok(run(
            &mut conn,
            Op::DropCopies(pb::DropCopies {
                copies: vec![copies(&x, &[1, 2])],
                keep: 3,
            }),
        ));
        assert_eq!(
            block_copies(&conn, &x).expect("copies").device_ids,
            vec![2, 3, 4]
        );
        assert!(over_replicated(&conn, &[1, 2, 3, 4], 3, &[], 10)
            .expect("over")
            .is_empty());
    }

    #[test]
    fn unreferenced_blocks_become_garbage_after_the_grace_period() {
        let mut conn = db();
        let (old, new, stray) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let create = |name: &[u8]| {
            Op::Create(pb::Create {
                parent: ROOT_INO,
                name: name.to_vec(),
                mode: 0o644,
                ..Default::default()
            })
        };
        let f = run(&mut conn, create(b"f"));
        let Some(pb::command_result::Result::Attr(a)) = f.result else {
            panic!("create: {f:?}")
        };
        let commit = |hash: &[u8; 32]| {
            let extent = pb::Extent {
                offset: 0,
                length: 10,
                hash: hash.to_vec(),
                block_offset: 0,
            };
            let copies = vec![copies(hash, &[1, 2])];
            Op::CommitExtents(pb::CommitExtents {
                ino: a.ino,
                extents: vec![extent],
                copies,
                append: false,
            })
        };
        ok(run_at(&mut conn, commit(&old), 100));
        assert!(
            garbage(&conn, i64::MAX, 10).expect("garbage").is_empty(),
            "referenced"
        );
        // Overwritten at 200: the old block is idle from then.
        ok(run_at(&mut conn, commit(&new), 200));
        // A block put and recorded at 300 whose commit has not come yet.
        ok(run_at(
            &mut conn,
            Op::RecordCopies(pb::RecordCopies {
                copies: vec![copies(&stray, &[1])],
            }),
            300,
        ));
        let hashes =
            |v: Vec<failsafe_core::BlockView>| v.into_iter().map(|b| b.hash[0]).collect::<Vec<_>>();
        assert!(garbage(&conn, 200, 10).expect("garbage").is_empty());
        assert_eq!(hashes(garbage(&conn, 201, 10).expect("garbage")), vec![1]);
        assert_eq!(
            hashes(garbage(&conn, 301, 10).expect("garbage")),
            vec![1, 3]
        );
        assert_eq!(
            garbage(&conn, 201, 10).expect("garbage")[0].holders,
            vec![1, 2]
        );

        // Forgetting re-checks: the stray block is too young at 250, the
        // referenced one is never forgotten.
        let all = vec![old.to_vec(), new.to_vec(), stray.to_vec()];
        let forget = |before| {
            Op::ForgetBlocks(pb::ForgetBlocks {
                hashes: all.clone(),
                idle_before_ns: before,
            })
        };
        ok(run(&mut conn, forget(250)));
        assert_eq!(
            recorded(&conn, &all).expect("recorded"),
            vec![None, Some(vec![1, 2]), Some(vec![1])]
        );
        // The stray block's write commits after all: referenced, not garbage.
        let late = pb::Extent {
            offset: 10,
            length: 10,
            hash: stray.to_vec(),
            block_offset: 0,
        };
        let commit_late = pb::CommitExtents {
            ino: a.ino,
            extents: vec![late],
            copies: vec![copies(&stray, &[1])],
            append: false,
        };
        ok(run_at(&mut conn, Op::CommitExtents(commit_late), 400));
        ok(run(&mut conn, forget(i64::MAX)));
        assert!(recorded(&conn, &[stray.to_vec()]).expect("recorded")[0].is_some());

        // Renamed over: the replaced file's blocks are idle from the rename.
        let g = run(&mut conn, create(b"g"));
        let Some(pb::command_result::Result::Attr(_)) = g.result else {
            panic!("create: {g:?}")
        };
        let (name, new_name) = (b"g".to_vec(), b"f".to_vec());
        let rename = pb::Rename {
            parent: ROOT_INO,
            name,
            new_parent: ROOT_INO,
            new_name,
            ..Default::default()
        };
        let rename = Op::Rename(rename);
        ok(run_at(&mut conn, rename, 500));
        assert_eq!(
            hashes(garbage(&conn, 501, 10).expect("garbage")),
            vec![2, 3]
        );
        assert!(garbage(&conn, 500, 10).expect("garbage").is_empty());
    }

    #[test]
    fn a_host_sees_only_its_own_devices_records() {
        let mut conn = db();
        let host = pb::RegisterHost {
            host_id: 7,
            zone: "a".into(),
            addr: "h:1".into(),
            devices: vec![device(1, ROOMY)],
        };
        ok(run(&mut conn, Op::RegisterHost(host)));
        file_with_block(&mut conn, b"f", &[1u8; 32], &[1, 2]);
        let asked = vec![vec![1u8; 32], vec![2u8; 32]];
        assert_eq!(
            copies_on(&conn, 7, 1, &asked).expect("copies"),
            Some([vec![1u8; 32]].into_iter().collect())
        );
        // Device 2 is not host 7's; device 1 is not host 8's.
        assert_eq!(copies_on(&conn, 7, 2, &asked).expect("copies"), None);
        assert_eq!(copies_on(&conn, 8, 1, &asked).expect("copies"), None);
    }
}
