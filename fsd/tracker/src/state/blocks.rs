//! Blocks and the extents that point at them: committing a write (as
//! blocks, or inline: the bytes in the extent itself), replacing inline
//! extents by blocks, recording and dropping copies, and forgetting garbage.

use crate::db::CachedSql;
use failsafe_core::{block_hash, overlay, Extent, Inline, HASH_LEN, MAX_FILE_INLINE_BYTES};
use failsafe_proto::pb::{self, ErrorCode, FileKind};
use rusqlite::{params, OptionalExtension, Transaction};

use super::namespace::get_attr;
use super::schema::referenced;
use super::{err, i, OpResult};

/// The columns `extent_row` reads, in its order.
pub(super) const EXTENT_COLS: &str = "offset, length, hash, block_offset, data, written";

pub(super) fn extent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Extent> {
    let data: Option<Vec<u8>> = r.get(4)?;
    Ok(Extent {
        offset: r.get::<_, i64>(0)? as u64,
        length: r.get::<_, i64>(1)? as u64,
        hash: r.get(2)?,
        block_offset: r.get::<_, i64>(3)? as u64,
        inline: match data {
            Some(data) => Some(Inline {
                data,
                written_ns: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
            }),
            None => None,
        },
    })
}

/// The extents of `ino` that reach into `[start, end)`, in offset order.
/// Two reads of the `(ino, offset)` key, so the cost follows the extents
/// in the range, not the file's (an append to a long log reads one).
pub(super) fn load_extents(
    tx: &rusqlite::Connection,
    ino: u64,
    start: u64,
    end: u64,
) -> OpResult<Vec<Extent>> {
    let (start, end) = (i(start.min(i64::MAX as u64)), i(end.min(i64::MAX as u64)));
    let mut out = Vec::new();
    // Extents never overlap: of those starting before `start`, only the
    // last can reach into the range.
    let before = tx
        .prepare_cached(&format!(
            "SELECT {EXTENT_COLS} FROM extents WHERE ino = ?1 AND offset < ?2
             ORDER BY offset DESC LIMIT 1"
        ))?
        .query_row(params![i(ino), start], extent_row)
        .optional()?;
    out.extend(before.filter(|e| e.end() > start as u64));
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {EXTENT_COLS} FROM extents WHERE ino = ?1 AND offset >= ?2 AND offset < ?3
         ORDER BY offset"
    ))?;
    for e in stmt.query_map(params![i(ino), start, end], extent_row)? {
        out.push(e?);
    }
    Ok(out)
}

/// Inline extents that continue one another are joined up to this many
/// bytes, so a file appended to a line at a time (a wiki's change log)
/// holds a row per few KiB, not one per line; an append rewrites at most
/// this much.
const JOIN_INLINE_BYTES: u64 = 8 * 1024;

/// Whether `b` continues `a` so that one extent can stand for both: inline
/// bytes within [`JOIN_INLINE_BYTES`], or consecutive bytes of one block
/// (the blockifier stores a run of inline extents as one block).
fn continues(a: &Extent, b: &Extent) -> bool {
    a.end() == b.offset
        && match (&a.inline, &b.inline) {
            (Some(_), Some(_)) => a.length + b.length <= JOIN_INLINE_BYTES,
            (None, None) => {
                a.hash == b.hash && a.block_offset.checked_add(a.length) == Some(b.block_offset)
            }
            _ => false,
        }
}

/// The part of the file `extents` cover, each `base` bytes further on;
/// `None` when there are none.
fn span(extents: &[pb::Extent], base: u64) -> Option<(u64, u64)> {
    let start = extents
        .iter()
        .map(|e| e.offset.saturating_add(base))
        .min()?;
    let end = extents
        .iter()
        .map(|e| e.offset.saturating_add(base).saturating_add(e.length))
        .max()?;
    Some((start, end))
}

/// Joins the extents of `ino` in and next to `[start, end)` that continue
/// one another (see [`continues`]). The file's bytes stay the same.
fn join_extents(tx: &Transaction<'_>, ino: u64, start: u64, end: u64) -> OpResult<()> {
    let found = load_extents(tx, ino, start.saturating_sub(1), end.saturating_add(1))?;
    let mut joined: Vec<(Extent, bool)> = Vec::with_capacity(found.len());
    for e in found {
        match joined.last_mut() {
            Some((last, grew)) if continues(last, &e) => {
                tx.exec(
                    "DELETE FROM extents WHERE ino = ?1 AND offset = ?2",
                    params![i(ino), i(e.offset)],
                )?;
                last.length += e.length;
                if let (Some(a), Some(b)) = (&mut last.inline, e.inline) {
                    a.data.extend_from_slice(&b.data);
                    a.written_ns = a.written_ns.max(b.written_ns);
                }
                *grew = true;
            }
            _ => joined.push((e, false)),
        }
    }
    for (e, _) in joined.iter().filter(|(_, grew)| *grew) {
        insert_extent(tx, ino, e)?;
    }
    Ok(())
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
        tx.exec(
            "DELETE FROM extents WHERE ino = ?1 AND offset = ?2",
            params![i(ino), i(e.offset)],
        )?;
    }
    for e in overlay(&old, start, end) {
        insert_extent(tx, ino, &e)?;
    }
    let hashes: Vec<Vec<u8>> = old
        .into_iter()
        .filter(|e| e.inline.is_none())
        .map(|e| e.hash)
        .collect();
    note_unreferenced(tx, &hashes, leader_now)
}

fn insert_extent(tx: &Transaction<'_>, ino: u64, e: &Extent) -> OpResult<()> {
    let (data, written) = match &e.inline {
        Some(inline) => (Some(inline.data.as_slice()), Some(inline.written_ns)),
        None => (None, None),
    };
    tx.exec(
        "INSERT OR REPLACE INTO extents (ino, offset, length, hash, block_offset, data, written)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            i(ino),
            i(e.offset),
            i(e.length),
            e.hash,
            i(e.block_offset),
            data,
            written
        ],
    )?;
    if e.inline.is_none() {
        tx.exec("DELETE FROM idle_blocks WHERE hash = ?1", [&e.hash])?;
    }
    Ok(())
}

/// What an extent of a command must look like, whatever the state: a block
/// extent names a 32-byte hash and carries no data; an inline one carries
/// exactly its length in data, and no hash or block offset.
pub(super) fn check_extent(e: &pb::Extent) -> Result<(), super::OpError> {
    let ok = if e.data.is_empty() {
        e.hash.len() == HASH_LEN && e.length > 0
    } else {
        e.hash.is_empty() && e.block_offset == 0 && e.length == e.data.len() as u64
    };
    if ok {
        Ok(())
    } else {
        err(
            ErrorCode::Invalid,
            "an extent needs a 32-byte hash and a length, or (inline) data of its length and no hash",
        )
    }
}

/// Of `hashes`, the recorded blocks no extent points at any more are idle
/// from `at` on: garbage collection forgets them after its grace period.
pub(super) fn note_unreferenced(tx: &Transaction<'_>, hashes: &[Vec<u8>], at: i64) -> OpResult<()> {
    let mut mark = tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO idle_blocks SELECT ?1, ?2
         WHERE EXISTS (SELECT 1 FROM blocks WHERE hash = ?1) AND NOT {}",
        referenced("?1")
    ))?;
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
    let mut size = a.size;
    if c.truncate {
        // The new bytes' blocks follow what they replace (repair sends the
        // difference), which the truncation is about to forget.
        for e in c.extents.iter().filter(|e| e.data.is_empty()) {
            tx.exec(
                "INSERT OR IGNORE INTO lineage(hash, prev) SELECT ?3, hash FROM extents
                 WHERE ino = ?1 AND offset = ?2 AND hash != ?3 AND data IS NULL",
                params![i(c.ino), i(e.offset), e.hash],
            )?;
        }
        punch(tx, c.ino, 0, u64::MAX, leader_now)?;
        size = 0;
    }
    let base = if c.append { size } else { 0 };
    for e in &c.extents {
        let e = &pb::Extent {
            offset: e.offset.saturating_add(base),
            ..e.clone()
        };
        check_extent(e)?;
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|&end| end <= MAX_FILE_BYTES);
        let Some(end) = end else {
            return err(ErrorCode::Invalid, "extent beyond the largest file size");
        };
        let inline = (!e.data.is_empty()).then(|| Inline {
            data: e.data.clone(),
            written_ns: leader_now,
        });
        if inline.is_none() {
            check_in_block(tx, e)?;
            // Rewritten in place: the block it replaces at the same offset is its older version.
            tx.exec(
                "INSERT OR IGNORE INTO lineage(hash, prev) SELECT ?3, hash FROM extents
                 WHERE ino = ?1 AND offset = ?2 AND hash != ?3 AND data IS NULL",
                params![i(c.ino), i(e.offset), e.hash],
            )?;
        }
        punch(tx, c.ino, e.offset, end, leader_now)?;
        let ext = Extent {
            offset: e.offset,
            length: e.length,
            hash: e.hash.clone(),
            block_offset: e.block_offset,
            inline,
        };
        insert_extent(tx, c.ino, &ext)?;
        size = size.max(end);
    }
    if let Some((start, end)) = span(&c.extents, base) {
        join_extents(tx, c.ino, start, end)?;
    }
    if c.extents.iter().any(|e| !e.data.is_empty()) {
        let held: i64 = tx.row(
            "SELECT COALESCE(SUM(length), 0) FROM extents WHERE ino = ?1 AND data IS NOT NULL",
            [i(c.ino)],
            |r| r.get(0),
        )?;
        if held as u64 > MAX_FILE_INLINE_BYTES {
            return err(
                ErrorCode::InlineFull,
                "the file holds as many inline bytes as it may until they become blocks",
            );
        }
    }
    tx.exec(
        "UPDATE inodes SET size = ?2, mtime = MAX(mtime, ?3), ctime = MAX(ctime, ?3), version = version + 1 WHERE ino = ?1",
        params![i(c.ino), i(size), now],
    )?;
    get_attr(tx, c.ino)
}

/// A block extent's block is recorded and holds the extent's bytes.
fn check_in_block(tx: &Transaction<'_>, e: &pb::Extent) -> OpResult<()> {
    let block_size: Option<i64> = tx
        .row("SELECT size FROM blocks WHERE hash = ?1", [&e.hash], |r| {
            r.get(0)
        })
        .optional()?;
    match block_size {
        None => err(
            ErrorCode::Invalid,
            "extent names a block with no recorded copies",
        ),
        Some(bs) if e.block_offset.saturating_add(e.length) > bs as u64 => err(
            ErrorCode::Invalid,
            "extent reaches past the end of its block",
        ),
        Some(_) => Ok(()),
    }
}

/// The blockifier's replacement of inline extents by block extents over
/// the same bytes, all or nothing: each must still be the inline extent the
/// leader read (same offset and length, data with the expected hash), or
/// the command is refused with `CHANGED` and changes nothing. The file's
/// bytes stay the same, so neither its version nor its times change.
pub(super) fn replace_inline(
    tx: &Transaction<'_>,
    c: &pb::ReplaceInline,
    leader_now: i64,
) -> OpResult<()> {
    let a = get_attr(tx, c.ino)?;
    if a.kind != FileKind::KindFile as i32 {
        return err(ErrorCode::IsDir, "extents belong to regular files");
    }
    if c.extents.len() != c.inline_hashes.len() {
        return err(
            ErrorCode::Invalid,
            "one expected inline hash per replacing extent",
        );
    }
    for (e, expected) in c.extents.iter().zip(&c.inline_hashes) {
        if !e.data.is_empty() {
            return err(ErrorCode::Invalid, "inline data replaced by inline data");
        }
        check_extent(e)?;
        let current: Option<(i64, Option<Vec<u8>>)> = tx
            .row(
                "SELECT length, data FROM extents WHERE ino = ?1 AND offset = ?2",
                params![i(c.ino), i(e.offset)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let same = matches!(&current, Some((len, Some(data)))
            if *len as u64 == e.length && block_hash(data)[..] == expected[..]);
        if !same {
            return err(
                ErrorCode::Changed,
                "the inline extent changed since it was read",
            );
        }
    }
    record_copies(tx, &c.copies, leader_now)?;
    for e in &c.extents {
        check_in_block(tx, e)?;
        let ext = Extent {
            offset: e.offset,
            length: e.length,
            hash: e.hash.clone(),
            block_offset: e.block_offset,
            inline: None,
        };
        // Same (ino, offset): the row is replaced.
        insert_extent(tx, c.ino, &ext)?;
    }
    if let Some((start, end)) = span(&c.extents, 0) {
        join_extents(tx, c.ino, start, end)?;
    }
    Ok(())
}

/// Up to `limit` inline extents committed before `written_before`, by file
/// and offset, with their bytes: what the blockifier turns into blocks.
/// Not a file's in the trash (`nlink` 0): its bytes stay where they are
/// until it is restored or forgotten, which costs nothing, where storing
/// them as blocks would cost three copies' writes for what is mostly never
/// read again.
pub(crate) fn old_inline(
    conn: &rusqlite::Connection,
    written_before: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(u64, Extent)>> {
    conn.prepare_cached(
        "SELECT e.ino, e.offset, e.data, e.written FROM extents e
         WHERE e.data IS NOT NULL AND e.written < ?1
           AND EXISTS (SELECT 1 FROM inodes i WHERE i.ino = e.ino AND i.nlink > 0)
         ORDER BY e.ino, e.offset LIMIT ?2",
    )?
    .query_map(params![written_before, limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            Extent::inline(r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?),
        ))
    })?
    .collect()
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
        tx.exec(
            "INSERT OR IGNORE INTO blocks (hash, size) VALUES (?1, ?2)",
            params![b.hash, i(b.size)],
        )?;
        for d in &b.device_ids {
            tx.exec(
                "INSERT OR IGNORE INTO copies (hash, device_id) VALUES (?1, ?2)",
                params![b.hash, i(*d)],
            )?;
        }
        tx.exec(
            &format!(
                "INSERT OR REPLACE INTO idle_blocks SELECT ?1, ?2 WHERE NOT {}",
                referenced("?1")
            ),
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
                let others: i64 = tx.row(
                    "SELECT COUNT(*) FROM copies WHERE hash = ?1 AND device_id != ?2",
                    params![b.hash, i(*d)],
                    |r| r.get(0),
                )?;
                if (others as usize) < keep {
                    continue;
                }
            }
            tx.exec(
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
        let referenced: bool =
            tx.row(&format!("SELECT {}", referenced("?1")), [h], |r| r.get(0))?;
        let since: i64 = tx
            .row("SELECT since FROM idle_blocks WHERE hash = ?1", [h], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        if referenced || since >= idle_before {
            continue;
        }
        tx.exec("DELETE FROM copies WHERE hash = ?1", [h])?;
        tx.exec("DELETE FROM blocks WHERE hash = ?1", [h])?;
        tx.exec("DELETE FROM idle_blocks WHERE hash = ?1", [h])?;
        tx.exec("DELETE FROM lineage WHERE hash = ?1", [h])?;
    }
    Ok(())
}

pub(super) fn block_copies(conn: &rusqlite::Connection, hash: &[u8]) -> OpResult<pb::BlockCopies> {
    let size: i64 = conn
        .row("SELECT size FROM blocks WHERE hash = ?1", [hash], |r| {
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
    use failsafe_core::{block_hash, MAX_INLINE_BYTES};
    use failsafe_proto::pb::{self, command::Op, command_result::Result as R, ErrorCode};

    use super::{block_copies, load_extents, old_inline, JOIN_INLINE_BYTES};
    use crate::state::testing::{copies, create_file, db, file_with_block, ok, run, run_at};
    use crate::state::{replication_counts, validate};

    use failsafe_proto::inline_extent as inline;

    fn commit(ino: u64, extents: Vec<pb::Extent>, copies: Vec<pb::BlockCopies>) -> Op {
        Op::CommitExtents(pb::CommitExtents {
            ino,
            extents,
            copies,
            append: false,
            truncate: false,
        })
    }

    /// The file's extents as a read sees them.
    fn read(conn: &rusqlite::Connection, ino: u64) -> pb::FileExtents {
        crate::state::testing::extents(conn, ino)
    }

    /// The file's bytes, from its inline extents only.
    fn bytes(conn: &rusqlite::Connection, ino: u64) -> Vec<u8> {
        let fe = read(conn, ino);
        let size = fe.attr.as_ref().map_or(0, |a| a.size) as usize;
        let mut out = vec![0u8; size];
        for e in &fe.extents {
            assert!(e.hash.is_empty(), "a block extent: {e:?}");
            assert_eq!(e.length as usize, e.data.len());
            let at = e.offset as usize;
            out[at..at + e.data.len()].copy_from_slice(&e.data);
        }
        out
    }

    fn refused(r: &pb::CommandResult) -> ErrorCode {
        match &r.result {
            Some(R::Error(e)) => ErrorCode::try_from(e.code).expect("code"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_truncating_commit_empties_the_file_first_in_the_same_command() {
        let mut conn = db();
        let ino = create_file(&mut conn, b"page");
        ok(run(
            &mut conn,
            commit(ino, vec![inline(0, b"the old text of the page")], vec![]),
        ));
        let truncating = |extents: Vec<pb::Extent>| {
            Op::CommitExtents(pb::CommitExtents {
                ino,
                extents,
                truncate: true,
                ..Default::default()
            })
        };
        // Shorter new text: nothing of the old is left past it.
        ok(run(&mut conn, truncating(vec![inline(0, b"new")])));
        assert_eq!(bytes(&conn, ino), b"new");
        // A hole before the new bytes reads as zeros, not as old bytes.
        ok(run(&mut conn, truncating(vec![inline(2, b"xy")])));
        assert_eq!(bytes(&conn, ino), b"\0\0xy");
        // No bytes: the truncation alone.
        ok(run(&mut conn, truncating(vec![])));
        assert_eq!(bytes(&conn, ino), b"");
        assert_eq!(read(&conn, ino).attr.map(|a| a.size), Some(0));
    }

    #[test]
    fn inline_extents_follow_the_overlay_rules_and_need_no_copies() {
        let mut conn = db();
        let ino = create_file(&mut conn, b"page");
        ok(run(
            &mut conn,
            commit(ino, vec![inline(0, b"hello world")], vec![]),
        ));
        assert_eq!(bytes(&conn, ino), b"hello world");
        let fe = read(&conn, ino);
        assert!(fe.copies.is_empty() && fe.devices.is_empty(), "{fe:?}");
        // A write in the middle splits it, each piece with its own bytes;
        // inline pieces next to one another join again.
        ok(run(&mut conn, commit(ino, vec![inline(2, b"XY")], vec![])));
        assert_eq!(bytes(&conn, ino), b"heXYo world");
        assert_eq!(read(&conn, ino).extents.len(), 1);
        // Past the end, with a hole between.
        ok(run(&mut conn, commit(ino, vec![inline(13, b"!")], vec![])));
        assert_eq!(bytes(&conn, ino), b"heXYo world\0\0!");
        // A truncate cuts an inline extent like a block extent.
        ok(run(
            &mut conn,
            Op::SetAttr(pb::SetAttr {
                ino,
                size: Some(7),
                ..Default::default()
            }),
        ));
        assert_eq!(bytes(&conn, ino), b"heXYo w");
        // An inline extent is no block short of copies.
        let counts = replication_counts(&conn, &[1, 2, 3], 3).expect("counts");
        assert_eq!((counts.under_replicated, counts.unavailable), (0, 0));
        // A block written over part of it cuts it too.
        let x = [7u8; 32];
        ok(run(
            &mut conn,
            commit(
                ino,
                vec![pb::Extent {
                    offset: 1,
                    length: 2,
                    hash: x.to_vec(),
                    ..Default::default()
                }],
                vec![copies(&x, &[1, 2])],
            ),
        ));
        let fe = read(&conn, ino);
        let shapes: Vec<(u64, u64, bool)> = fe
            .extents
            .iter()
            .map(|e| (e.offset, e.length, e.data.is_empty()))
            .collect();
        assert_eq!(
            shapes,
            vec![(0, 1, false), (1, 2, true), (3, 4, false)],
            "{fe:?}"
        );
        assert_eq!(fe.extents[2].data, b"Yo w");
        assert_eq!(fe.copies.len(), 1);
    }

    #[test]
    fn a_commit_carries_at_most_64_kib_inline_and_well_formed_extents() {
        let cmd = |extents| pb::Command {
            op: Some(commit(2, extents, vec![])),
            ..Default::default()
        };
        let half = vec![1u8; MAX_INLINE_BYTES / 2];
        assert!(validate(&cmd(vec![inline(0, &half), inline(1 << 20, &half)])).is_ok());
        let e = validate(&cmd(vec![
            inline(0, &half),
            inline(1 << 20, &half),
            inline(1 << 21, b"x"),
        ]))
        .expect_err("too much inline data");
        assert_eq!(e.code, ErrorCode::Invalid);
        assert!(e.message.contains("at most 65536"), "{}", e.message);
        let mut wrong_length = inline(0, b"abc");
        wrong_length.length = 4;
        let mut with_hash = inline(0, b"abc");
        with_hash.hash = vec![1; 32];
        for bad in [wrong_length, with_hash] {
            let e = validate(&cmd(vec![bad])).expect_err("malformed");
            assert_eq!(e.code, ErrorCode::Invalid);
        }
    }

    #[test]
    fn a_file_holds_a_bounded_amount_of_inline_data() {
        let mut conn = db();
        let ino = create_file(&mut conn, b"log");
        let chunk = vec![b'a'; MAX_INLINE_BYTES];
        let limit = failsafe_core::MAX_FILE_INLINE_BYTES / MAX_INLINE_BYTES as u64;
        for n in 0..limit {
            ok(run(
                &mut conn,
                commit(ino, vec![inline(n * chunk.len() as u64, &chunk)], vec![]),
            ));
        }
        let r = run(
            &mut conn,
            commit(
                ino,
                vec![inline(limit * chunk.len() as u64, b"more")],
                vec![],
            ),
        );
        assert_eq!(refused(&r), ErrorCode::InlineFull);
        // Overwriting inline bytes does not add to them.
        ok(run(
            &mut conn,
            commit(ino, vec![inline(0, b"fresh")], vec![]),
        ));
    }

    fn replace(ino: u64, offset: u64, data: &[u8], devices: &[u64]) -> Op {
        let hash = block_hash(data);
        Op::ReplaceInline(pb::ReplaceInline {
            ino,
            extents: vec![pb::Extent {
                offset,
                length: data.len() as u64,
                hash: hash.to_vec(),
                ..Default::default()
            }],
            inline_hashes: vec![hash.to_vec()],
            copies: vec![pb::BlockCopies {
                hash: hash.to_vec(),
                size: data.len() as u64,
                device_ids: devices.to_vec(),
            }],
        })
    }

    #[test]
    fn replacing_inline_data_by_a_block_happens_only_while_it_is_unchanged() {
        let mut conn = db();
        let ino = create_file(&mut conn, b"page");
        ok(run_at(
            &mut conn,
            commit(ino, vec![inline(0, b"version 1")], vec![]),
            100,
        ));
        let version = read(&conn, ino).attr.expect("attr").version;
        // The blockifier sees it once it is old enough.
        assert!(old_inline(&conn, 100, 10).expect("scan").is_empty());
        let found = old_inline(&conn, 101, 10).expect("scan");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, ino);
        // Meanwhile the file is written again: the replacement changes nothing.
        ok(run(
            &mut conn,
            commit(ino, vec![inline(0, b"version 2")], vec![]),
        ));
        let r = run(&mut conn, replace(ino, 0, b"version 1", &[1, 2, 3]));
        assert_eq!(refused(&r), ErrorCode::Changed);
        assert_eq!(bytes(&conn, ino), b"version 2");
        let stale = block_copies(&conn, &block_hash(b"version 1")).expect("copies");
        assert!(stale.device_ids.is_empty(), "copies recorded: {stale:?}");
        // A replacement of what is there takes, records the copies in the
        // same command, and leaves the file's version alone (same bytes).
        let version = version + 1;
        ok(run(&mut conn, replace(ino, 0, b"version 2", &[1, 2, 3])));
        let fe = read(&conn, ino);
        assert_eq!(fe.attr.as_ref().map(|a| a.version), Some(version));
        assert_eq!(fe.extents.len(), 1);
        assert_eq!(fe.extents[0].hash, block_hash(b"version 2"));
        assert!(fe.extents[0].data.is_empty());
        assert_eq!(fe.copies[0].device_ids, vec![1, 2, 3]);
        assert!(old_inline(&conn, i64::MAX, 10).expect("scan").is_empty());
        // Again (a retry): no longer inline, so nothing changes.
        let r = run(&mut conn, replace(ino, 0, b"version 2", &[4]));
        assert_eq!(refused(&r), ErrorCode::Changed);
        assert_eq!(read(&conn, ino).copies[0].device_ids, vec![1, 2, 3]);
        // Only the extent there now counts: a write in the middle of the
        // one read changed it (its pieces joined again, with the new
        // bytes), and a piece of it is not it.
        ok(run(
            &mut conn,
            commit(ino, vec![inline(0, b"abcdef")], vec![]),
        ));
        ok(run(&mut conn, commit(ino, vec![inline(2, b"X")], vec![])));
        let r = run(&mut conn, replace(ino, 0, b"abcdef", &[1, 2, 3]));
        assert_eq!(refused(&r), ErrorCode::Changed);
        let r = run(&mut conn, replace(ino, 0, b"ab", &[1, 2, 3]));
        assert_eq!(refused(&r), ErrorCode::Changed);
        ok(run(&mut conn, replace(ino, 0, b"abXdef", &[1, 2, 3])));
    }

    #[test]
    fn appends_join_into_few_extents_and_a_blockified_run_into_one() {
        let mut conn = db();
        let ino = create_file(&mut conn, b"changes.log");
        let line = |n: usize| format!("{n:06}\tsaved page {n}\n").into_bytes();
        let mut want = Vec::new();
        for n in 0..2000 {
            let l = line(n);
            ok(run(
                &mut conn,
                Op::CommitExtents(pb::CommitExtents {
                    ino,
                    extents: vec![pb::Extent {
                        offset: 0,
                        length: l.len() as u64,
                        data: l.clone(),
                        ..Default::default()
                    }],
                    append: true,
                    ..Default::default()
                }),
            ));
            want.extend_from_slice(&l);
        }
        assert_eq!(bytes(&conn, ino), want);
        let fe = read(&conn, ino);
        // Each extent but the last is full but for less than a line.
        let per = JOIN_INLINE_BYTES as usize - line(9999).len();
        assert!(
            fe.extents.len() <= want.len() / per + 1,
            "{}",
            fe.extents.len()
        );
        assert!(fe.extents.iter().all(|e| e.length <= JOIN_INLINE_BYTES));
        // A range read finds exactly the extents reaching into it.
        let inside = load_extents(&conn, ino, 9000, 9001).expect("load");
        assert_eq!(inside.len(), 1);
        assert!(inside[0].offset <= 9000 && inside[0].end() > 9000);
        let span = load_extents(&conn, ino, 100, 20_000).expect("load");
        assert_eq!(span.first().map(|e| e.offset), Some(0));
        assert!(span
            .last()
            .is_some_and(|e| e.offset < 20_000 && e.end() >= 20_000));
        // The blockifier stores the run as one block: one extent again.
        let found = old_inline(&conn, i64::MAX, 1000).expect("scan");
        let hash = block_hash(&want).to_vec();
        let mut at = 0;
        let mut extents = Vec::new();
        let mut inline_hashes = Vec::new();
        for (_, e) in &found {
            let data = &e.inline.as_ref().expect("inline").data;
            extents.push(pb::Extent {
                offset: e.offset,
                length: e.length,
                hash: hash.clone(),
                block_offset: at,
                data: Vec::new(),
            });
            inline_hashes.push(block_hash(data).to_vec());
            at += e.length;
        }
        ok(run(
            &mut conn,
            Op::ReplaceInline(pb::ReplaceInline {
                ino,
                extents,
                inline_hashes,
                copies: vec![pb::BlockCopies {
                    hash: hash.clone(),
                    size: want.len() as u64,
                    device_ids: vec![1, 2],
                }],
            }),
        ));
        let fe = read(&conn, ino);
        assert_eq!(fe.extents.len(), 1, "{:?}", fe.extents);
        assert_eq!(
            (fe.extents[0].length, fe.extents[0].block_offset),
            (want.len() as u64, 0)
        );
        // Inline bytes after it stay apart from the block, and a hole
        // between two inline extents keeps them apart.
        let end = want.len() as u64;
        ok(run(
            &mut conn,
            commit(ino, vec![inline(end, b"tail")], vec![]),
        ));
        ok(run(
            &mut conn,
            commit(ino, vec![inline(end + 10, b"far")], vec![]),
        ));
        let shapes: Vec<(u64, u64)> = read(&conn, ino)
            .extents
            .iter()
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(shapes, vec![(0, end), (end, 4), (end + 10, 3)]);
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
}
