//! Blocks and the extents that point at them: committing a write, recording
//! and dropping copies, and forgetting garbage.

use failsafe_core::{overlay, Extent, HASH_LEN};
use failsafe_proto::pb::{self, ErrorCode, FileKind};
use rusqlite::{params, OptionalExtension, Transaction};

use super::namespace::get_attr;
use super::{err, i, OpResult};

pub(super) fn load_extents(
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
pub(super) fn punch(
    tx: &Transaction<'_>,
    ino: u64,
    start: u64,
    end: u64,
    leader_now: i64,
) -> OpResult<()> {
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
pub(super) fn note_unreferenced(tx: &Transaction<'_>, hashes: &[Vec<u8>], at: i64) -> OpResult<()> {
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
pub(super) const MAX_FILE_BYTES: u64 = 1 << 60;

pub(super) fn commit_extents(
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
pub(super) fn record_copies(
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
pub(super) fn drop_copies(
    tx: &Transaction<'_>,
    copies: &[pb::BlockCopies],
    keep: usize,
) -> OpResult<()> {
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
pub(super) fn forget_blocks(
    tx: &Transaction<'_>,
    hashes: &[Vec<u8>],
    idle_before: i64,
) -> OpResult<()> {
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

pub(super) fn block_copies(conn: &rusqlite::Connection, hash: &[u8]) -> OpResult<pb::BlockCopies> {
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

#[cfg(test)]
mod tests {
    use failsafe_proto::pb::{self, command::Op};

    use super::block_copies;
    use crate::state::testing::{copies, db, file_with_block, ok, run};

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
}
