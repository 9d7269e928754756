//! The queries clients ask: namespace lookups, file extents, placement of
//! new blocks, locks and filesystem statistics. Read-only.

use crate::db::CachedSql;
use std::collections::{BTreeMap, BTreeSet};

use failsafe_core::{is_full, place, Candidate, ReplicationClass};
use failsafe_proto::pb::{self, query_reply::Reply, query_request::Query, ErrorCode};
use rusqlite::{params, OptionalExtension};

use super::blocks::{block_copies, load_extents};
use super::hosts::{away_devices, device_locations, held_back_devices};
use super::namespace::{find_attr, get_attr, lookup_ino, require_dir};
use super::schema::LIVE_DEVICE;
use super::{check_name, err, i, kept, OpError, OpResult};

/// The largest file whose `GetAttr` answers with its extents when asked.
const GETATTR_EXTENTS_MAX: u64 = 4 << 20;

pub(crate) fn query(
    conn: &rusqlite::Connection,
    q: &Query,
    class: ReplicationClass,
) -> OpResult<Reply> {
    match q {
        Query::Lookup(l) => lookup(conn, l),
        Query::GetAttr(g) => {
            let a = get_attr(conn, g.ino)?;
            if g.extents && a.kind == pb::FileKind::KindFile as i32 && a.size <= GETATTR_EXTENTS_MAX
            {
                return read_extents(conn, &failsafe_proto::whole_file(g.ino));
            }
            Ok(Reply::Attr(a))
        }
        Query::ReadDir(r) => read_dir(conn, r),
        Query::ReadLink(r) => read_link(conn, r),
        Query::StatFs(_) => stat_fs(conn, class),
        Query::ReadExtents(r) => read_extents(conn, r),
        Query::Place(p) => place_blocks(conn, p, class),
        Query::ListLocks(l) => list_locks(conn, l),
        Query::ListXattrs(l) => list_xattrs(conn, l.ino),
        Query::ListTrash(l) => kept::list_trash(conn, l),
        Query::ListSnapshots(_) => kept::list_snapshots(conn),
        Query::InSnapshot(q) => kept::in_snapshot(conn, q),
        Query::Revalidate(r) => revalidate(conn, r),
    }
}

/// The current attributes of those of `r.inos` that still exist (linked),
/// in the order asked. (How many it may name is checked where the request
/// comes in, before any lease is recalled or granted for them.)
fn revalidate(conn: &rusqlite::Connection, r: &pb::Revalidate) -> OpResult<Reply> {
    let mut attrs = Vec::with_capacity(r.inos.len());
    for &ino in &r.inos {
        attrs.extend(find_attr(conn, ino)?);
    }
    Ok(Reply::AttrList(pb::AttrList {
        attrs,
        refused: Vec::new(),
    }))
}

/// An inode's extended attributes, in name order.
fn list_xattrs(conn: &rusqlite::Connection, ino: u64) -> OpResult<Reply> {
    get_attr(conn, ino)?;
    let entries = conn
        .prepare_cached("SELECT name, value FROM xattrs WHERE ino = ?1 ORDER BY name")?
        .query_map([i(ino)], xattr_row)?
        .collect::<Result<_, _>>()?;
    Ok(Reply::Xattrs(pb::Xattrs { entries }))
}

/// An extended attribute from a row of (name, value).
pub(super) fn xattr_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<pb::Xattr> {
    Ok(pb::Xattr {
        name: r.get(0)?,
        value: r.get(1)?,
    })
}

/// What a writer may cache after its change: the attributes of `inos`
/// (those still there), what `names` name now, and the extents of the
/// files `wrote` that are small (`READ_BACK_FILE_BYTES`).
pub(crate) fn read_back(
    conn: &rusqlite::Connection,
    inos: &[u64],
    names: &[(u64, Vec<u8>)],
    wrote: &[u64],
) -> OpResult<ReadBackState> {
    let mut attrs = Vec::with_capacity(inos.len());
    for &ino in inos {
        match get_attr(conn, ino) {
            Ok(a) => attrs.push(a),
            Err(super::ApplyError::Refused(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let mut found = Vec::with_capacity(names.len());
    for (parent, name) in names {
        found.push(pb::NameRead {
            parent: *parent,
            name: name.clone(),
            ino: lookup_ino(conn, *parent, name)?.unwrap_or(0),
        });
    }
    let mut extents = Vec::new();
    let small = |i: &u64| {
        attrs
            .iter()
            .any(|a| a.ino == *i && a.size <= failsafe_proto::READ_BACK_FILE_BYTES)
    };
    for &ino in wrote.iter().filter(|i| small(i)) {
        if let Reply::FileExtents(fe) = read_extents(conn, &failsafe_proto::whole_file(ino))? {
            extents.push(fe);
        }
    }
    Ok((attrs, found, extents))
}

/// Attributes, names and file extents a writer's read-back found.
pub(crate) type ReadBackState = (Vec<pb::Attr>, Vec<pb::NameRead>, Vec<pb::FileExtents>);

/// The attributes of the entry `name` in directory `parent`.
fn lookup(conn: &rusqlite::Connection, l: &pb::Lookup) -> OpResult<Reply> {
    check_name(&l.name)?;
    require_dir(conn, l.parent)?;
    let ino = lookup_ino(conn, l.parent, &l.name)?
        .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
    let attr = get_attr(conn, ino)?;
    if l.extents && attr.kind == pb::FileKind::KindFile as i32 {
        return read_extents(conn, &failsafe_proto::whole_file(ino));
    }
    Ok(Reply::Attr(attr))
}

/// A directory entry from a row of (name, inode, kind).
pub(super) fn dir_entry_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<pb::DirEntry> {
    Ok(pb::DirEntry {
        name: row.get(0)?,
        ino: row.get::<_, i64>(1)? as u64,
        kind: row.get(2)?,
        attr: None,
        extents: None,
    })
}

/// A page of a directory's entries, in name order, after `r.after`.
fn read_dir(conn: &rusqlite::Connection, r: &pb::ReadDir) -> OpResult<Reply> {
    require_dir(conn, r.ino)?;
    let limit = r.limit.clamp(1, 10_000) as i64;
    let mut stmt = conn.prepare_cached(
        "SELECT d.name, d.ino, i.kind FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 AND d.name > ?2 ORDER BY d.name LIMIT ?3",
    )?;
    let mut entries: Vec<pb::DirEntry> = stmt
        .query_map(params![i(r.ino), r.after, limit + 1], dir_entry_row)?
        .collect::<Result<_, _>>()?;
    let more = entries.len() as i64 > limit;
    entries.truncate(limit as usize);
    if r.plus {
        for e in &mut entries {
            e.attr = Some(get_attr(conn, e.ino)?);
        }
    }
    if r.plus && r.extents {
        let mut budget = failsafe_proto::PREFETCH_INLINE_BYTES;
        for e in &mut entries {
            if e.kind != pb::FileKind::KindFile as i32 {
                continue;
            }
            let Reply::FileExtents(fe) = read_extents(conn, &failsafe_proto::whole_file(e.ino))?
            else {
                continue;
            };
            let inline: usize = fe.extents.iter().map(|x| x.data.len()).sum();
            if inline > budget {
                break;
            }
            budget -= inline;
            e.extents = Some(fe);
        }
    }
    Ok(Reply::DirPage(pb::DirPage { entries, more }))
}

/// A symlink's target.
fn read_link(conn: &rusqlite::Connection, r: &pb::ReadLink) -> OpResult<Reply> {
    let target: Option<Option<Vec<u8>>> = conn
        .row(
            "SELECT target FROM inodes WHERE ino = ?1 AND nlink > 0",
            [i(r.ino)],
            |row| row.get(0),
        )
        .optional()?;
    target_reply(target)
}

/// The answer to a read of a symlink's target: `None`, no such inode;
/// `Some(None)`, not a symlink.
pub(super) fn target_reply(target: Option<Option<Vec<u8>>>) -> OpResult<Reply> {
    match target {
        None => err(ErrorCode::NotFound, "no such inode"),
        Some(None) => err(ErrorCode::Invalid, "not a symlink"),
        Some(Some(t)) => Ok(Reply::Target(pb::Target { target: t })),
    }
}

/// Space and counts for `statfs`.
fn stat_fs(conn: &rusqlite::Connection, class: ReplicationClass) -> OpResult<Reply> {
    let (total, free): (i64, i64) =
        conn.row(
            &format!("SELECT COALESCE(SUM(capacity), 0), COALESCE(SUM(free), 0) FROM devices WHERE {LIVE_DEVICE}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
    // Not those in the trash (no name, `nlink` 0).
    let files: i64 = conn.row("SELECT COUNT(*) FROM inodes WHERE nlink > 0", [], |r| {
        r.get(0)
    })?;
    let blocks: i64 = conn.row("SELECT COUNT(*) FROM blocks", [], |r| r.get(0))?;
    // Every byte is stored `copies` times: report what a user can still write.
    let copies = class.copies.max(1) as u64;
    Ok(Reply::FsStats(pb::FsStats {
        total_bytes: total as u64 / copies,
        free_bytes: free as u64 / copies,
        files: files as u64,
        blocks: blocks as u64,
    }))
}

/// A file range's extents, with the copies of their blocks a client may
/// read (not on a shipped host) and where those devices are.
fn read_extents(conn: &rusqlite::Connection, r: &pb::ReadExtents) -> OpResult<Reply> {
    let attr = get_attr(conn, r.ino)?;
    let end = r.offset.saturating_add(r.length.max(1));
    let extents = load_extents(conn, r.ino, r.offset, end)?;
    file_extents(conn, attr, extents)
}

/// `extents` of the file `attr` describes (live or kept), with the copies
/// of their blocks a client may read and where those devices are.
pub(super) fn file_extents(
    conn: &rusqlite::Connection,
    attr: pb::Attr,
    extents: Vec<failsafe_core::Extent>,
) -> OpResult<Reply> {
    let away = away_devices(conn)?;
    let mut copies = Vec::new();
    let mut device_ids = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for e in &extents {
        // An inline extent's bytes come with it: no copies to name.
        if e.inline.is_some() || !seen.insert(e.hash.clone()) {
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
                data: e.inline.map(|i| i.data).unwrap_or_default(),
            })
            .collect(),
        copies,
        devices,
    }))
}

/// Where new blocks go: `copies` devices each, on devices with room whose
/// host is neither away nor draining.
fn place_blocks(
    conn: &rusqlite::Connection,
    p: &pb::Place,
    class: ReplicationClass,
) -> OpResult<Reply> {
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

/// The locks held on an inode.
fn list_locks(conn: &rusqlite::Connection, l: &pb::ListLocks) -> OpResult<Reply> {
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

pub(crate) fn counts(conn: &rusqlite::Connection) -> rusqlite::Result<(u64, u64)> {
    let files: i64 = conn.row("SELECT COUNT(*) FROM inodes WHERE nlink > 0", [], |r| {
        r.get(0)
    })?;
    let blocks: i64 = conn.row("SELECT COUNT(*) FROM blocks", [], |r| r.get(0))?;
    Ok((files as u64, blocks as u64))
}

#[cfg(test)]
mod tests {
    use failsafe_proto::pb::{self, command::Op, query_reply::Reply, query_request::Query};

    use super::*;
    use crate::state::health::device_space;
    use crate::state::hosts::devices;
    use crate::state::testing::*;

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
            key_id: Vec::new(),
            zone: "a".into(),
            addr: "h:1".into(),
            devices: devices_now,
        };
        ok(run(&mut conn, Op::RegisterHost(host)));
        let states: Vec<pb::DeviceState> = devices(&conn)
            .expect("devices")
            .into_iter()
            .map(|d| d.state())
            .collect();
        use pb::DeviceState::{Full, Ok as Fine};
        assert_eq!(states, vec![Fine, Full, Fine, Fine]);
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
}
