//! Replication health, read by the leader: how many referenced blocks are
//! short of copies, and the scans repair, trimming, rebalancing and garbage
//! collection work from. Which devices count is the caller's judgement
//! (host liveness and administrative state); these functions only count.

use crate::db::CachedSql;
use std::collections::BTreeSet;

use failsafe_core::{is_full, BlockView};
use failsafe_proto::pb;
use rusqlite::params;

use super::i;
use super::schema::{referenced, LIVE_DEVICE, REFERENCED_BLOCKS};

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

pub(crate) fn replication_counts(
    conn: &rusqlite::Connection,
    live: &[u64],
    copies: usize,
) -> rusqlite::Result<ReplicationCounts> {
    let sql = format!(
        "SELECT COALESCE(SUM(n < ?1), 0), COALESCE(SUM(n = 0), 0) FROM (
           SELECT (SELECT COUNT(*) FROM copies c WHERE c.hash = r.hash AND c.device_id IN ({})) AS n
           FROM ({REFERENCED_BLOCKS}) r)",
        id_list(live)
    );
    conn.row(&sql, [copies as i64], |r| {
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
pub(crate) fn repair_candidates(
    conn: &rusqlite::Connection,
    counted: &[u64],
    up: &[u64],
    targets: &[u64],
    copies: usize,
    after: &[u8],
    limit: usize,
) -> rusqlite::Result<Vec<BlockView>> {
    let sql = format!(
        "SELECT hash, size FROM (
           SELECT b.hash AS hash, b.size AS size,
             (SELECT COUNT(*) FROM copies c WHERE c.hash = b.hash AND c.device_id IN ({counted})) AS counted,
             (SELECT COUNT(*) FROM copies c WHERE c.hash = b.hash AND c.device_id IN ({up})) AS live,
             (SELECT COUNT(*) FROM copies c WHERE c.hash = b.hash AND c.device_id IN ({targets})) AS on_targets
           FROM blocks b WHERE {referenced})
         WHERE counted < ?1 AND live > 0 AND on_targets < ?2
         ORDER BY counted, hash <= ?3, hash LIMIT ?4",
        counted = id_list(counted),
        up = id_list(up),
        targets = id_list(targets),
        referenced = referenced("b.hash"),
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
pub(crate) fn referenced_after(
    conn: &rusqlite::Connection,
    after: &[u8],
    limit: usize,
) -> rusqlite::Result<Vec<BlockView>> {
    let rows: Vec<(Vec<u8>, i64)> = conn
        .prepare_cached(&format!(
            "SELECT b.hash, b.size FROM blocks b WHERE b.hash > ?1
               AND {} ORDER BY b.hash LIMIT ?2",
            referenced("b.hash")
        ))?
        .query_map(params![after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    holders_of(conn, rows)
}

/// A device as repair sees it: where it is, and its space.
#[derive(Debug, Clone)]
pub(crate) struct DeviceSpace {
    pub(crate) location: pb::DeviceLocation,
    pub(crate) capacity_bytes: u64,
    pub(crate) free_bytes: u64,
}

impl DeviceSpace {
    /// Room for another block: not full (the reserve placement keeps).
    pub(crate) fn has_room(&self) -> bool {
        !is_full(self.capacity_bytes, self.free_bytes)
    }
}

/// Every device that is not gone, with its host's zone and address and its
/// space.
pub(crate) fn device_space(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<DeviceSpace>> {
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
) -> rusqlite::Result<Vec<BlockView>> {
    let mut holders =
        conn.prepare_cached("SELECT device_id FROM copies WHERE hash = ?1 ORDER BY device_id")?;
    rows.into_iter()
        .map(|(hash, size)| {
            let devices = holders
                .query_map([&hash], |r| Ok(r.get::<_, i64>(0)? as u64))?
                .collect::<Result<_, _>>()?;
            Ok(BlockView {
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
pub(crate) fn over_replicated(
    conn: &rusqlite::Connection,
    up: &[u64],
    copies: usize,
    after: &[u8],
    limit: usize,
) -> rusqlite::Result<Vec<BlockView>> {
    let sql = format!(
        "SELECT c.hash, b.size FROM copies c JOIN blocks b ON b.hash = c.hash
         WHERE c.device_id IN ({}) AND {}
         GROUP BY c.hash HAVING COUNT(*) > ?1
         ORDER BY c.hash <= ?2, c.hash LIMIT ?3",
        id_list(up),
        referenced("c.hash")
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
pub(crate) fn garbage(
    conn: &rusqlite::Connection,
    idle_before: i64,
    limit: usize,
) -> rusqlite::Result<Vec<BlockView>> {
    let rows: Vec<(Vec<u8>, i64)> = conn
        .prepare_cached(&format!(
            "SELECT b.hash, b.size FROM blocks b LEFT JOIN idle_blocks i ON i.hash = b.hash
             WHERE NOT {} AND COALESCE(i.since, 0) < ?1
               -- A shipped host's old blocks stay known: its catch-up sends
               -- deltas against them, and its sweep must not take them.
               AND NOT EXISTS (SELECT 1 FROM copies c JOIN devices d ON d.device_id = c.device_id
                               JOIN host_states s ON s.host_id = d.host_id WHERE c.hash = b.hash)
             ORDER BY b.hash LIMIT ?2",
            referenced("b.hash")
        ))?
        .query_map(params![idle_before, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    holders_of(conn, rows)
}

/// The devices each of `hashes` is recorded on; `None` for a block the
/// tracker does not know (any more).
pub(crate) fn recorded(
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
pub(crate) fn copies_on(
    conn: &rusqlite::Connection,
    host_id: u64,
    device_id: u64,
    hashes: &[Vec<u8>],
) -> rusqlite::Result<Option<BTreeSet<Vec<u8>>>> {
    let mine = conn
        .prepare_cached(&format!(
            "SELECT 1 FROM devices WHERE device_id = ?1 AND host_id = ?2 AND {LIVE_DEVICE}"
        ))?
        .exists(params![i(device_id), i(host_id)])?;
    if !mine {
        return Ok(None);
    }
    let mut has = conn.prepare_cached("SELECT 1 FROM copies WHERE hash = ?1 AND device_id = ?2")?;
    let mut out = BTreeSet::new();
    for h in hashes {
        if has.exists(params![h, i(device_id)])? {
            out.insert(h.clone());
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use failsafe_core::ROOT_INO;
    use failsafe_proto::pb::{self, command::Op};

    use super::*;
    use crate::state::blocks::block_copies;
    use crate::state::testing::*;

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
        // With the trash off: a replaced file's blocks are unreferenced at
        // once (the trash keeps them otherwise: `kept`'s tests).
        let off = pb::TrashPolicy {
            retention_ms: Some(0),
            ..Default::default()
        };
        ok(run(
            &mut conn,
            Op::SetTrashPolicy(pb::SetTrashPolicy {
                policy: Some(off),
                path: Vec::new(),
            }),
        ));
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
                data: Vec::new(),
            };
            let copies = vec![copies(hash, &[1, 2])];
            Op::CommitExtents(pb::CommitExtents {
                ino: a.ino,
                extents: vec![extent],
                copies,
                append: false,
                truncate: false,
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
            data: Vec::new(),
        };
        let commit_late = pb::CommitExtents {
            ino: a.ino,
            extents: vec![late],
            copies: vec![copies(&stray, &[1])],
            append: false,
            truncate: false,
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
            key_id: Vec::new(),
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
