//! Client sessions and the POSIX and flock locks they hold.

use crate::db::CachedSql;
use failsafe_proto::pb::{self, ErrorCode};
use rusqlite::{params, OptionalExtension, Transaction};

use super::{err, i, OpResult};

/// How long the result of an operation id is kept for retries.
const OP_RESULT_KEEP_NS: i64 = 15 * 60 * 1_000_000_000;

pub(super) fn open_session(tx: &Transaction<'_>, c: &pb::OpenSession, now: i64) -> OpResult<()> {
    if c.session_id == 0 || c.ttl_ms == 0 {
        return err(ErrorCode::Invalid, "a session needs an id and a lease");
    }
    tx.exec(
        "INSERT OR REPLACE INTO sessions VALUES (?1, ?2, ?3, ?4)",
        params![i(c.session_id), c.client_name, i(c.ttl_ms), now],
    )?;
    Ok(())
}

pub(super) fn heartbeat(tx: &Transaction<'_>, c: &pb::Heartbeat, now: i64) -> OpResult<()> {
    let n = tx.exec(
        "UPDATE sessions SET last_seen = ?2 WHERE session_id = ?1",
        params![i(c.session_id), now],
    )?;
    if n == 0 {
        return err(ErrorCode::NoSession, "session expired or unknown");
    }
    Ok(())
}

pub(super) fn close_session(tx: &Transaction<'_>, c: &pb::CloseSession) -> OpResult<()> {
    tx.exec("DELETE FROM locks WHERE session_id = ?1", [i(c.session_id)])?;
    tx.exec(
        "DELETE FROM sessions WHERE session_id = ?1",
        [i(c.session_id)],
    )?;
    Ok(())
}

/// Ends the sessions whose lease ran out before `now`, with their locks, and
/// forgets operation results older than their retry window.
pub(super) fn expire_sessions(tx: &Transaction<'_>, now: i64) -> OpResult<()> {
    let expired: Vec<i64> = tx
        .prepare("SELECT session_id FROM sessions WHERE last_seen + ttl_ms * 1000000 < ?1")?
        .query_map([now], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for s in expired {
        tx.exec("DELETE FROM locks WHERE session_id = ?1", [s])?;
        tx.exec("DELETE FROM sessions WHERE session_id = ?1", [s])?;
    }
    tx.exec(
        "DELETE FROM applied_ops WHERE at < ?1",
        [now.saturating_sub(OP_RESULT_KEEP_NS)],
    )?;
    Ok(())
}

/// A session as the leader's reaper judges it.
#[derive(Debug, Clone)]
pub(crate) struct SessionRow {
    pub id: u64,
    pub client_name: String,
    pub ttl_ms: u64,
    /// The leader's wall clock at its last renewal (ns).
    pub last_seen: i64,
}

/// Every open session.
pub(crate) fn all_sessions(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<SessionRow>> {
    conn.prepare("SELECT session_id, client_name, ttl_ms, last_seen FROM sessions")?
        .query_map([], |r| {
            Ok(SessionRow {
                id: r.get::<_, i64>(0)? as u64,
                client_name: r.get(1)?,
                ttl_ms: r.get::<_, i64>(2)? as u64,
                last_seen: r.get(3)?,
            })
        })?
        .collect()
}

/// Whether `ExpireSessions` at `now` would change anything.
pub(crate) fn anything_expired(conn: &rusqlite::Connection, now: i64) -> rusqlite::Result<bool> {
    let n: i64 = conn.row(
        "SELECT (SELECT COUNT(*) FROM sessions WHERE last_seen + ttl_ms * 1000000 < ?1)
              + (SELECT COUNT(*) FROM applied_ops WHERE at < ?2)",
        params![now, now.saturating_sub(OP_RESULT_KEEP_NS)],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

#[derive(Debug, Clone)]
struct HeldLock {
    session_id: u64,
    owner: u64,
    ltype: i32,
    start: u64,
    end: u64,
}

pub(super) fn lock(tx: &Transaction<'_>, c: &pb::Lock) -> OpResult<()> {
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
        .row(
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
    tx.exec(
        "DELETE FROM locks WHERE ino = ?1 AND kind = ?2 AND session_id = ?3 AND owner = ?4",
        params![i(c.ino), c.kind, i(c.session_id), i(c.owner)],
    )?;
    let insert = |h: &HeldLock| {
        tx.exec(
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
