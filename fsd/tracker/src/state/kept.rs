//! What is kept of the namespace beyond the live files: the trash (a file
//! whose last name went, kept for its retention time) and snapshots (the
//! namespace beneath a directory at one point in the log).
//!
//! A file in the trash stays where it was, in `inodes` and `extents`, with
//! `nlink` 0 and no name, and a `trash` row with the path it had: going to
//! the trash costs less than being freed, and restoring is linking it
//! again. Nobody reads or changes it meanwhile (`namespace::get_attr` does
//! not find it); its blocks count as referenced, as every extent's do, and
//! its inline bytes stay inline (`blocks::old_inline`).
//!
//! A snapshot is a copy of its subtree's inodes, names, extents and
//! extended attributes in the `kept_*` tables; blocks are shared with the
//! live files, and garbage collection keeps every block a kept extent names
//! (`schema::referenced`).
//!
//! A snapshot copies its subtree's rows in one command rather than sharing
//! them copy-on-write: the cost is one pass over the subtree when it is
//! taken (a wiki's few thousand pages: milliseconds), and nothing on the
//! path of any live change.

use crate::db::CachedSql;
use failsafe_core::ROOT_INO;
use failsafe_proto::pb::{self, query_reply::Reply, ErrorCode, FileKind};
use rusqlite::{params, OptionalExtension, Transaction};

use super::blocks::{extent_row, note_unreferenced, EXTENT_COLS};
use super::namespace::{
    any_attr, attr_row, drop_link, free_inode, link_entry, lookup_ino, unlink_entry,
};
use super::query::{dir_entry_row, file_extents, target_reply, xattr_row};
use super::{check_name, err, i, OpError, OpResult};

/// How long deleted files are kept unless the policy says otherwise.
pub(crate) const DEFAULT_RETENTION_MS: u64 = 24 * 3600 * 1000;
/// Paths a wiki rewrites all the time, whose old versions nobody wants
/// back: lock files, caches, temporary files.
const DEFAULT_EXCLUDE: &[&str] = &["*/locks/*", "*/cache/*", "*/tmp/*"];
/// Items one command restores, purges or expires at most.
const ITEMS_PER_COMMAND: usize = 4096;
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_BYTES: usize = 256;
const MAX_PATH_BYTES: usize = 4096;

/// The columns of `kept_inodes` that `namespace::attr_row` reads, in its order.
const KEPT_ATTR_COLS: &str =
    "ino, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, version, rdev";

// ---------- paths ----------

/// `path` as the trash and snapshots name places: absolute, no empty, `.`
/// or `..` component, no trailing slash ("/" is the root). The leading
/// slash may be left out.
fn clean_path(path: &[u8]) -> Result<Vec<u8>, OpError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(OpError::new(ErrorCode::NameTooLong, "path too long"));
    }
    let mut out = Vec::with_capacity(path.len() + 1);
    for part in path.split(|b| *b == b'/').filter(|p| !p.is_empty()) {
        check_name(part)
            .map_err(|e| OpError::new(e.code, format!("{}: {}", show(path), e.message)))?;
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

/// A path for messages.
fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// `dir`'s path joined with `name`.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = if dir == b"/" {
        Vec::new()
    } else {
        dir.to_vec()
    };
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// The paths strictly beneath `path` are those in `[lo, hi)`.
fn beneath(path: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if path == b"/" {
        return (b"/".to_vec(), b"0".to_vec());
    }
    (join(path, b""), [path, b"0"].concat())
}

/// `path`, at or beneath `from`, moved to `to`.
fn rebase(from: &[u8], to: &[u8], path: &[u8]) -> Vec<u8> {
    let rest = if from == b"/" {
        path
    } else {
        &path[from.len()..]
    };
    match (to, rest) {
        (b"/", b"") => b"/".to_vec(),
        (b"/", rest) => rest.to_vec(),
        (to, rest) => [to, rest].concat(),
    }
}

/// The live directory at `path`.
fn resolve_dir(tx: &rusqlite::Connection, path: &[u8]) -> OpResult<u64> {
    let mut ino = ROOT_INO;
    for part in path.split(|b| *b == b'/').filter(|p| !p.is_empty()) {
        ino = lookup_ino(tx, ino, part)?.ok_or_else(|| {
            OpError::new(
                ErrorCode::NotFound,
                format!("{}: no such directory", show(path)),
            )
        })?;
    }
    let kind: i32 = tx.row("SELECT kind FROM inodes WHERE ino = ?1", [i(ino)], |r| {
        r.get(0)
    })?;
    if kind != FileKind::KindDir as i32 {
        return err(
            ErrorCode::NotDir,
            format!("{}: not a directory", show(path)),
        );
    }
    Ok(ino)
}

/// The path of live directory `dir`, and the retention of the nearest
/// directory on it (itself included) that has its own.
fn dir_path(tx: &rusqlite::Connection, mut dir: u64) -> OpResult<(Vec<u8>, Option<u64>)> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut retention = None;
    for _ in 0..4096 {
        if retention.is_none() {
            retention = tx
                .row(
                    "SELECT retention_ms FROM trash_retention WHERE ino = ?1",
                    [i(dir)],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .map(|v| v as u64);
        }
        if dir == ROOT_INO {
            break;
        }
        let Some((parent, name)) = tx
            .row(
                "SELECT parent, name FROM dentries WHERE ino = ?1 LIMIT 1",
                [i(dir)],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?
        else {
            break;
        };
        names.push(name);
        dir = parent;
    }
    let mut path = Vec::new();
    for n in names.iter().rev() {
        path.push(b'/');
        path.extend_from_slice(n);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    Ok((path, retention))
}

/// Whether `path` matches `pattern`: `*` any run of bytes ('/' included),
/// `?` any one byte, everything else itself.
fn matches(pattern: &[u8], path: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < path.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, s));
                p += 1;
            }
            Some(&c) if c == b'?' || c == path[s] => {
                p += 1;
                s += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    p = sp + 1;
                    s = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

// ---------- the policy ----------

fn meta_int(tx: &rusqlite::Connection, key: &str) -> OpResult<Option<u64>> {
    Ok(tx
        .row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        .map(|v| v as u64))
}

/// The cluster's trash policy, every field set.
pub(crate) fn policy(tx: &rusqlite::Connection) -> OpResult<pb::TrashPolicy> {
    let exclude: Option<String> = tx
        .row(
            "SELECT value FROM meta WHERE key = 'trash_exclude'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(pb::TrashPolicy {
        retention_ms: Some(meta_int(tx, "trash_retention_ms")?.unwrap_or(DEFAULT_RETENTION_MS)),
        max_bytes: Some(meta_int(tx, "trash_max_bytes")?.unwrap_or(0)),
        exclude: match exclude {
            Some(list) => list.lines().map(str::to_string).collect(),
            None => DEFAULT_EXCLUDE.iter().map(|p| p.to_string()).collect(),
        },
        set_exclude: true,
    })
}

pub(super) fn set_policy(tx: &Transaction<'_>, c: &pb::SetTrashPolicy) -> OpResult<()> {
    let p = c.policy.clone().unwrap_or_default();
    if !c.path.is_empty() {
        let dir = resolve_dir(tx, &clean_path(&c.path)?)?;
        match p.retention_ms {
            Some(ms) => tx.exec(
                "INSERT OR REPLACE INTO trash_retention VALUES (?1, ?2)",
                params![i(dir), i(ms)],
            )?,
            None => tx.exec("DELETE FROM trash_retention WHERE ino = ?1", [i(dir)])?,
        };
        return Ok(());
    }
    let set = |key: &str, v: i64| {
        tx.exec(
            "INSERT OR REPLACE INTO meta VALUES (?1, ?2)",
            params![key, v],
        )
    };
    if let Some(ms) = p.retention_ms {
        set("trash_retention_ms", i(ms))?;
    }
    if let Some(b) = p.max_bytes {
        set("trash_max_bytes", i(b))?;
    }
    if p.set_exclude {
        if p.exclude.len() > MAX_PATTERNS {
            return err(
                ErrorCode::Invalid,
                format!("at most {MAX_PATTERNS} exclusion patterns"),
            );
        }
        for pat in &p.exclude {
            if pat.is_empty() || pat.len() > MAX_PATTERN_BYTES || pat.contains(['\n', '\0']) {
                return err(
                    ErrorCode::Invalid,
                    format!("exclusion pattern {pat:?}: 1 to {MAX_PATTERN_BYTES} bytes, one line"),
                );
            }
        }
        tx.exec(
            "INSERT OR REPLACE INTO meta VALUES ('trash_exclude', ?1)",
            [p.exclude.join("\n")],
        )?;
    }
    Ok(())
}

// ---------- into the trash ----------

/// Copies the live subtree beneath directory `root` into the kept tables
/// as snapshot `snap`'s: inodes, extents, extended attributes and the
/// directories' entries (`SUBTREE` finds the inodes). Returns how many
/// inodes.
fn copy_subtree(tx: &Transaction<'_>, snap: i64, root: u64) -> OpResult<usize> {
    let copy = |sql: &str| tx.exec(&format!("{SUBTREE} {sql}"), params![snap, i(root)]);
    let inodes = copy(
        "INSERT INTO kept_inodes SELECT ?1, ino, kind, mode, uid, gid, size, atime, mtime, ctime,
           nlink, version, target, (SELECT rdev FROM device_numbers d WHERE d.ino = inodes.ino)
         FROM inodes WHERE ino IN sub",
    )?;
    copy(
        "INSERT INTO kept_extents SELECT ?1, ino, offset, length, hash, block_offset, data, written
         FROM extents WHERE ino IN sub",
    )?;
    copy("INSERT INTO kept_xattrs SELECT ?1, ino, name, value FROM xattrs WHERE ino IN sub")?;
    copy(
        "INSERT INTO kept_dentries SELECT ?1, parent, name, ino FROM dentries WHERE parent IN sub",
    )?;
    Ok(inodes)
}

/// The last name of `a` (entry `name` of directory `parent`) is going:
/// whether the trash keeps it (and then it has its row there). A directory
/// is kept only when the trash holds something deleted from beneath it, so
/// an `rm -rf` can be put back whole and a wiki's lock directories leave
/// nothing behind.
pub(super) fn to_trash(
    tx: &Transaction<'_>,
    a: &pb::Attr,
    parent: u64,
    name: &[u8],
    leader_now: i64,
) -> OpResult<bool> {
    let (dir, own) = dir_path(tx, parent)?;
    let policy = policy(tx)?;
    let retention = own.or(policy.retention_ms).unwrap_or(0);
    if retention == 0 {
        return Ok(false);
    }
    let path = join(&dir, name);
    if policy.exclude.iter().any(|p| matches(p.as_bytes(), &path)) {
        return Ok(false);
    }
    if a.kind == FileKind::KindDir as i32 {
        let (lo, hi) = beneath(&path);
        let holds: bool = tx.row(
            "SELECT EXISTS (SELECT 1 FROM trash WHERE path >= ?1 AND path < ?2)",
            params![lo, hi],
            |r| r.get(0),
        )?;
        if !holds {
            return Ok(false);
        }
    }
    let expires = leader_now
        .saturating_add(i64::try_from(retention.saturating_mul(1_000_000)).unwrap_or(i64::MAX));
    tx.exec(
        "INSERT OR REPLACE INTO trash VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![i(a.ino), path, a.kind, i(a.size), leader_now, expires],
    )?;
    Ok(true)
}

/// A directory that is gone takes its own retention with it.
pub(super) fn forget_dir(tx: &Transaction<'_>, ino: u64) -> OpResult<()> {
    tx.exec("DELETE FROM trash_retention WHERE ino = ?1", [i(ino)])?;
    Ok(())
}

// ---------- out of the trash ----------

/// Forgets trash item `ino` and the file it keeps.
fn forget_item(tx: &Transaction<'_>, ino: u64, leader_now: i64) -> OpResult<()> {
    tx.exec("DELETE FROM trash WHERE ino = ?1", [i(ino)])?;
    match any_attr(tx, ino) {
        Ok(a) => free_inode(tx, &a, leader_now),
        // Not there: nothing more to forget.
        Err(super::ApplyError::Refused(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One item of the trash.
struct Item {
    ino: u64,
    path: Vec<u8>,
    kind: i32,
    uid: u32,
    gid: u32,
}

fn item_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    Ok(Item {
        ino: r.get::<_, i64>(0)? as u64,
        path: r.get(1)?,
        kind: r.get(2)?,
        uid: r.get(3)?,
        gid: r.get(4)?,
    })
}

const ITEM_COLS: &str = "t.ino, t.path, t.kind, k.uid, k.gid";
/// The trash's items with their inodes (as `t` and `k`).
const ITEMS: &str = "trash t JOIN inodes k ON k.ino = t.ino";

/// The newest item the trash holds at exactly `path`.
fn newest_at(tx: &rusqlite::Connection, path: &[u8]) -> OpResult<Option<Item>> {
    Ok(tx
        .row(
            &format!(
                "SELECT {ITEM_COLS} FROM {ITEMS}
                 WHERE t.path = ?1 ORDER BY t.deleted DESC, t.ino DESC LIMIT 1"
            ),
            [path],
            item_row,
        )
        .optional()?)
}

/// Puts trash item `item` back as entry `name` of live directory `dir`.
fn relink(tx: &Transaction<'_>, item: &Item, dir: u64, name: &[u8], now: i64) -> OpResult<()> {
    let is_dir = item.kind == FileKind::KindDir as i32;
    tx.exec(
        "UPDATE inodes SET nlink = ?2, ctime = MAX(ctime, ?3), version = version + 1 WHERE ino = ?1",
        params![i(item.ino), if is_dir { 2 } else { 1 }, now],
    )?;
    tx.exec("DELETE FROM trash WHERE ino = ?1", [i(item.ino)])?;
    link_entry(tx, dir, name, item.ino, now, if is_dir { 1 } else { 0 })
}

/// The live directory at `path`, made (and its missing parents) when it is
/// not there: from the trash's newest directory of that path, else anew
/// (0755, owned as `owner`). The directories changed go into `changed`.
fn ensure_dir(
    tx: &Transaction<'_>,
    path: &[u8],
    owner: (u32, u32),
    now: i64,
    changed: &mut Vec<u64>,
) -> OpResult<u64> {
    let mut ino = ROOT_INO;
    let mut at = Vec::new();
    for part in path.split(|b| *b == b'/').filter(|p| !p.is_empty()) {
        at.push(b'/');
        at.extend_from_slice(part);
        ino = match lookup_ino(tx, ino, part)? {
            Some(next) => {
                let kind: i32 =
                    tx.row("SELECT kind FROM inodes WHERE ino = ?1", [i(next)], |r| {
                        r.get(0)
                    })?;
                if kind != FileKind::KindDir as i32 {
                    return err(ErrorCode::NotDir, format!("{}: not a directory", show(&at)));
                }
                next
            }
            None => {
                changed.push(ino);
                match newest_at(tx, &at)?.filter(|d| d.kind == FileKind::KindDir as i32) {
                    Some(kept) => {
                        relink(tx, &kept, ino, part, now)?;
                        kept.ino
                    }
                    None => {
                        let a = super::namespace::mkdir(
                            tx,
                            &pb::Mkdir {
                                parent: ino,
                                name: part.to_vec(),
                                mode: 0o755,
                                uid: owner.0,
                                gid: owner.1,
                            },
                            now,
                        )?;
                        a.ino
                    }
                }
            }
        };
    }
    Ok(ino)
}

fn kind_name(kind: i32) -> &'static str {
    match FileKind::try_from(kind) {
        Ok(FileKind::KindDir) => "directory",
        Ok(FileKind::KindSymlink) => "symlink",
        Ok(FileKind::KindFile) => "file",
        _ => "special file",
    }
}

pub(super) fn restore(
    tx: &Transaction<'_>,
    c: &pb::RestoreTrash,
    now: i64,
    leader_now: i64,
    changed: &mut Vec<u64>,
) -> OpResult<pb::AdminOutcome> {
    let from = clean_path(&c.path)?;
    let to = if c.to.is_empty() {
        from.clone()
    } else {
        clean_path(&c.to)?
    };
    let limit = (c.limit as usize).clamp(1, ITEMS_PER_COMMAND);
    let items: Vec<Item> = if c.id != 0 {
        let item = tx
            .row(
                &format!("SELECT {ITEM_COLS} FROM {ITEMS} WHERE t.ino = ?1"),
                [i(c.id)],
                item_row,
            )
            .optional()?
            .ok_or_else(|| {
                OpError::new(
                    ErrorCode::NotFound,
                    format!("no item {} in the trash", c.id),
                )
            })?;
        if item.path != from && !item.path.starts_with(&beneath(&from).0) {
            return err(
                ErrorCode::Invalid,
                format!(
                    "item {} is {}, not at {}",
                    c.id,
                    show(&item.path),
                    show(&from)
                ),
            );
        }
        vec![item]
    } else {
        let (lo, hi) = beneath(&from);
        tx.prepare_cached(&format!(
            "SELECT {ITEM_COLS} FROM {ITEMS}
             WHERE (t.path = ?1 OR (t.path >= ?2 AND t.path < ?3)) AND t.path > ?4
               AND t.ino = (SELECT u.ino FROM trash u WHERE u.path = t.path
                            ORDER BY u.deleted DESC, u.ino DESC LIMIT 1)
             ORDER BY t.path LIMIT ?5"
        ))?
        .query_map(params![from, lo, hi, c.after, (limit + 1) as i64], item_row)?
        .collect::<Result<_, _>>()?
    };
    let more = items.len() > limit;
    let mut out = pb::AdminOutcome {
        more,
        ..Default::default()
    };
    for item in items.into_iter().take(limit) {
        out.last = item.path.clone();
        // Not restored by an earlier step (a parent made from it).
        let there: bool = tx.row(
            "SELECT EXISTS (SELECT 1 FROM trash WHERE ino = ?1)",
            [i(item.ino)],
            |r| r.get(0),
        )?;
        if !there {
            continue;
        }
        let dest = rebase(&from, &to, &item.path);
        let Some(split) = dest.iter().rposition(|b| *b == b'/') else {
            continue;
        };
        let (dir_path, name) = (&dest[..split.max(1)], &dest[split + 1..]);
        if name.is_empty() {
            out.skipped.push(format!("{}: not a name", show(&dest)));
            continue;
        }
        let dir = match ensure_dir(tx, dir_path, (item.uid, item.gid), now, changed) {
            Ok(d) => d,
            Err(super::ApplyError::Refused(e)) => {
                out.skipped.push(e.message);
                continue;
            }
            Err(e) => return Err(e),
        };
        changed.push(dir);
        let item_is_dir = item.kind == FileKind::KindDir as i32;
        match lookup_ino(tx, dir, name)? {
            None => relink(tx, &item, dir, name, now)?,
            Some(live) => {
                let live_kind: i32 =
                    tx.row("SELECT kind FROM inodes WHERE ino = ?1", [i(live)], |r| {
                        r.get(0)
                    })?;
                let live_is_dir = live_kind == FileKind::KindDir as i32;
                if item_is_dir && live_is_dir {
                    // Already there: what was beneath it comes back into it.
                    forget_item(tx, item.ino, leader_now)?;
                } else if !item_is_dir && !live_is_dir {
                    // The restored file replaces the one there, which goes
                    // to the trash in its turn: nothing is lost.
                    changed.push(live);
                    unlink_entry(tx, dir, name, now, 0)?;
                    drop_link(tx, live, dir, name, now, leader_now)?;
                    relink(tx, &item, dir, name, now)?;
                } else {
                    out.skipped.push(format!(
                        "{}: a {} is there, not putting back a {}",
                        show(&dest),
                        kind_name(live_kind),
                        kind_name(item.kind)
                    ));
                    continue;
                }
            }
        }
        changed.push(item.ino);
        out.count += 1;
    }
    Ok(out)
}

pub(super) fn purge(
    tx: &Transaction<'_>,
    c: &pb::PurgeTrash,
    leader_now: i64,
) -> OpResult<pb::AdminOutcome> {
    let inos: Vec<i64> = if c.id != 0 {
        vec![i(c.id)]
    } else {
        let from = clean_path(&c.path)?;
        let (lo, hi) = beneath(&from);
        tx.prepare_cached(
            "SELECT ino FROM trash WHERE path = ?1 OR (path >= ?2 AND path < ?3) LIMIT ?4",
        )?
        .query_map(params![from, lo, hi, (ITEMS_PER_COMMAND + 1) as i64], |r| {
            r.get(0)
        })?
        .collect::<Result<_, _>>()?
    };
    let more = inos.len() > ITEMS_PER_COMMAND;
    let mut count = 0;
    for &ino in inos.iter().take(ITEMS_PER_COMMAND) {
        let there: bool = tx.row(
            "SELECT EXISTS (SELECT 1 FROM trash WHERE ino = ?1)",
            [ino],
            |r| r.get(0),
        )?;
        if there {
            forget_item(tx, ino as u64, leader_now)?;
            count += 1;
        }
    }
    if c.id != 0 && count == 0 {
        return err(
            ErrorCode::NotFound,
            format!("no item {} in the trash", c.id),
        );
    }
    Ok(pb::AdminOutcome {
        count,
        more,
        ..Default::default()
    })
}

/// Forgets the items whose time has come, then the oldest while the trash
/// holds more than the policy's bytes.
pub(super) fn expire(tx: &Transaction<'_>, leader_now: i64) -> OpResult<pb::AdminOutcome> {
    let due: Vec<i64> = tx
        .prepare_cached("SELECT ino FROM trash WHERE expires <= ?1 ORDER BY expires LIMIT ?2")?
        .query_map(params![leader_now, (ITEMS_PER_COMMAND + 1) as i64], |r| {
            r.get(0)
        })?
        .collect::<Result<_, _>>()?;
    let mut out = pb::AdminOutcome {
        more: due.len() > ITEMS_PER_COMMAND,
        ..Default::default()
    };
    for &ino in due.iter().take(ITEMS_PER_COMMAND) {
        forget_item(tx, ino as u64, leader_now)?;
        out.count += 1;
    }
    let max = policy(tx)?.max_bytes.unwrap_or(0);
    if max > 0 && !out.more {
        let (_, mut bytes) = trash_totals(tx)?;
        let mut oldest =
            tx.prepare_cached("SELECT ino, size FROM trash ORDER BY deleted, ino LIMIT ?1")?;
        let over: Vec<(i64, i64)> = oldest
            .query_map([ITEMS_PER_COMMAND as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        drop(oldest);
        for (ino, size) in over {
            if bytes <= max {
                break;
            }
            forget_item(tx, ino as u64, leader_now)?;
            bytes = bytes.saturating_sub(size as u64);
            out.count += 1;
        }
        out.more = bytes > max;
    }
    Ok(out)
}

/// Whether `expire` at `now` would forget anything.
pub(crate) fn trash_due(conn: &rusqlite::Connection, now: i64) -> rusqlite::Result<bool> {
    let due: bool = conn.row(
        "SELECT EXISTS (SELECT 1 FROM trash WHERE expires <= ?1)",
        [now],
        |r| r.get(0),
    )?;
    let max = conn
        .row(
            "SELECT value FROM meta WHERE key = 'trash_max_bytes'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0);
    Ok(due || (max > 0 && trash_totals(conn)?.1 > max as u64))
}

/// Items in the trash, and the bytes of its files.
fn trash_totals(conn: &rusqlite::Connection) -> rusqlite::Result<(u64, u64)> {
    conn.row(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN kind = ?1 THEN size ELSE 0 END), 0) FROM trash",
        [FileKind::KindFile as i32],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
}

pub(super) fn list_trash(conn: &rusqlite::Connection, l: &pb::ListTrash) -> OpResult<Reply> {
    let from = clean_path(&l.path)?;
    let (lo, hi) = beneath(&from);
    let limit = l.limit.clamp(1, 10_000) as usize;
    let mut items: Vec<pb::TrashItem> = conn
        .prepare_cached(
            "SELECT ino, path, kind, size, deleted, expires FROM trash
             WHERE (path = ?1 OR (path >= ?2 AND path < ?3)) AND (path, ino) > (?4, ?5)
             ORDER BY path, ino LIMIT ?6",
        )?
        .query_map(
            params![
                from,
                lo,
                hi,
                l.after_path,
                i(l.after_id),
                (limit + 1) as i64
            ],
            |r| {
                Ok(pb::TrashItem {
                    id: r.get::<_, i64>(0)? as u64,
                    path: r.get(1)?,
                    kind: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    deleted_ns: r.get(4)?,
                    expires_ns: r.get(5)?,
                })
            },
        )?
        .collect::<Result<_, _>>()?;
    let more = items.len() > limit;
    items.truncate(limit);
    let (total_items, total_bytes) = trash_totals(conn)?;
    let dirs: Vec<(i64, i64)> = conn
        .prepare_cached("SELECT ino, retention_ms FROM trash_retention ORDER BY ino")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut retention = Vec::with_capacity(dirs.len());
    for (ino, ms) in dirs {
        retention.push(pb::DirRetention {
            path: dir_path(conn, ino as u64)?.0,
            retention_ms: ms as u64,
        });
    }
    Ok(Reply::TrashPage(pb::TrashPage {
        items,
        more,
        policy: Some(policy(conn)?),
        total_items,
        total_bytes,
        retention,
    }))
}

// ---------- snapshots ----------

fn check_snapshot_name(name: &str) -> Result<(), OpError> {
    let ok = failsafe_tls::valid_name(name) && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(OpError::new(
            ErrorCode::Invalid,
            format!("snapshot name {name:?}: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'"),
        ))
    }
}

/// The inodes beneath (and including) live directory `?2`, as SQL.
const SUBTREE: &str = "WITH RECURSIVE sub(ino) AS (
    SELECT ?2 UNION SELECT d.ino FROM dentries d JOIN sub ON d.parent = sub.ino)";

pub(super) fn create_snapshot(
    tx: &Transaction<'_>,
    c: &pb::CreateSnapshot,
    leader_now: i64,
) -> OpResult<pb::AdminOutcome> {
    check_snapshot_name(&c.name)?;
    let path = clean_path(&c.path)?;
    let taken: bool = tx.row(
        "SELECT EXISTS (SELECT 1 FROM snapshots WHERE name = ?1)",
        [&c.name],
        |r| r.get(0),
    )?;
    if taken {
        return err(
            ErrorCode::Exists,
            format!("a snapshot named {} exists", c.name),
        );
    }
    let root = resolve_dir(tx, &path)?;
    // Numbers are never reused: a mount that still knows a deleted
    // snapshot's inodes finds nothing, not another snapshot's.
    let snap = meta_int(tx, "next_snap")?.unwrap_or(1).max(1);
    tx.exec(
        "INSERT OR REPLACE INTO meta VALUES ('next_snap', ?1)",
        [i(snap + 1)],
    )?;
    let snap = i(snap);
    let files = copy_subtree(tx, snap, root)?;
    tx.exec(
        "INSERT INTO snapshots VALUES (?1, ?2, ?3, ?4, ?5)",
        params![snap, c.name, path, i(root), leader_now],
    )?;
    Ok(pb::AdminOutcome {
        count: files as u64,
        id: snap as u64,
        ..Default::default()
    })
}

pub(super) fn delete_snapshot(
    tx: &Transaction<'_>,
    c: &pb::DeleteSnapshot,
    leader_now: i64,
) -> OpResult<pb::AdminOutcome> {
    let snap: i64 = tx
        .row(
            "SELECT snap FROM snapshots WHERE name = ?1",
            [&c.name],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| {
            OpError::new(ErrorCode::NotFound, format!("no snapshot named {}", c.name))
        })?;
    let hashes: Vec<Vec<u8>> = tx
        .prepare_cached("SELECT DISTINCT hash FROM kept_extents WHERE snap = ?1 AND data IS NULL")?
        .query_map([snap], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let files = tx.exec("DELETE FROM kept_inodes WHERE snap = ?1", [snap])?;
    for table in ["kept_dentries", "kept_extents", "kept_xattrs"] {
        tx.exec(&format!("DELETE FROM {table} WHERE snap = ?1"), [snap])?;
    }
    tx.exec("DELETE FROM snapshots WHERE snap = ?1", [snap])?;
    note_unreferenced(tx, &hashes, leader_now)?;
    Ok(pb::AdminOutcome {
        count: files as u64,
        id: snap as u64,
        ..Default::default()
    })
}

pub(super) fn list_snapshots(conn: &rusqlite::Connection) -> OpResult<Reply> {
    let snapshots = conn
        .prepare_cached(
            "SELECT s.snap, s.name, s.path, s.root, s.created,
               (SELECT COUNT(*) FROM kept_inodes k WHERE k.snap = s.snap AND k.kind = ?1),
               (SELECT COALESCE(SUM(size), 0) FROM kept_inodes k WHERE k.snap = s.snap AND k.kind = ?1)
             FROM snapshots s ORDER BY s.created, s.snap",
        )?
        .query_map([FileKind::KindFile as i32], |r| {
            Ok(pb::Snapshot {
                id: r.get::<_, i64>(0)? as u64,
                name: r.get(1)?,
                path: r.get(2)?,
                root: r.get::<_, i64>(3)? as u64,
                created_ns: r.get(4)?,
                files: r.get::<_, i64>(5)? as u64,
                bytes: r.get::<_, i64>(6)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Reply::SnapshotList(pb::SnapshotList { snapshots }))
}

/// What the trash holds (items, bytes of files) and how many snapshots
/// there are.
pub(crate) fn kept_counts(conn: &rusqlite::Connection) -> rusqlite::Result<(u64, u64, u64)> {
    let (items, bytes) = trash_totals(conn)?;
    let snapshots: i64 = conn.row("SELECT COUNT(*) FROM snapshots", [], |r| r.get(0))?;
    Ok((items, bytes, snapshots as u64))
}

// ---------- reads of a snapshot ----------

fn snap_attr(conn: &rusqlite::Connection, snap: i64, ino: u64) -> OpResult<pb::Attr> {
    conn.row(
        &format!("SELECT {KEPT_ATTR_COLS} FROM kept_inodes WHERE snap = ?1 AND ino = ?2"),
        params![snap, i(ino)],
        attr_row,
    )
    .optional()?
    .ok_or_else(|| {
        OpError::new(
            ErrorCode::NotFound,
            format!("no inode {ino} in the snapshot"),
        )
        .into()
    })
}

fn snap_dir(conn: &rusqlite::Connection, snap: i64, ino: u64) -> OpResult<()> {
    if snap_attr(conn, snap, ino)?.kind != FileKind::KindDir as i32 {
        return err(ErrorCode::NotDir, format!("inode {ino} is not a directory"));
    }
    Ok(())
}

fn snap_extents(conn: &rusqlite::Connection, snap: i64, r: &pb::ReadExtents) -> OpResult<Reply> {
    let attr = snap_attr(conn, snap, r.ino)?;
    let start = i(r.offset.min(i64::MAX as u64));
    let end = i(r
        .offset
        .saturating_add(r.length.max(1))
        .min(i64::MAX as u64));
    let extents = conn
        .prepare_cached(&format!(
            "SELECT {EXTENT_COLS} FROM kept_extents WHERE snap = ?1 AND ino = ?2
               AND offset < ?4 AND offset + length > ?3 ORDER BY offset"
        ))?
        .query_map(params![snap, i(r.ino), start, end], extent_row)?
        .collect::<Result<Vec<_>, _>>()?;
    file_extents(conn, attr, extents)
}

/// A read of snapshot `q.snapshot`, answered as the live read would be.
pub(super) fn in_snapshot(conn: &rusqlite::Connection, q: &pb::InSnapshot) -> OpResult<Reply> {
    use pb::in_snapshot::Read;
    let snap = i(q.snapshot);
    let known: bool = conn.row(
        "SELECT EXISTS (SELECT 1 FROM snapshots WHERE snap = ?1)",
        [snap],
        |r| r.get(0),
    )?;
    if !known {
        return err(ErrorCode::NotFound, format!("no snapshot {}", q.snapshot));
    }
    let whole = |ino| failsafe_proto::whole_file(ino);
    match &q.read {
        None => err(ErrorCode::Invalid, "a snapshot read without a question"),
        Some(Read::GetAttr(g)) => {
            let a = snap_attr(conn, snap, g.ino)?;
            if g.extents && a.kind == FileKind::KindFile as i32 {
                return snap_extents(conn, snap, &whole(g.ino));
            }
            Ok(Reply::Attr(a))
        }
        Some(Read::Lookup(l)) => {
            check_name(&l.name)?;
            snap_dir(conn, snap, l.parent)?;
            let ino: i64 = conn
                .row(
                    "SELECT ino FROM kept_dentries WHERE snap = ?1 AND parent = ?2 AND name = ?3",
                    params![snap, i(l.parent), l.name],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| OpError::new(ErrorCode::NotFound, "no such entry"))?;
            let a = snap_attr(conn, snap, ino as u64)?;
            if l.extents && a.kind == FileKind::KindFile as i32 {
                return snap_extents(conn, snap, &whole(a.ino));
            }
            Ok(Reply::Attr(a))
        }
        Some(Read::ReadDir(r)) => {
            snap_dir(conn, snap, r.ino)?;
            let limit = r.limit.clamp(1, 10_000) as i64;
            let mut entries: Vec<pb::DirEntry> = conn
                .prepare_cached(
                    "SELECT d.name, d.ino, k.kind FROM kept_dentries d
                     JOIN kept_inodes k ON k.snap = d.snap AND k.ino = d.ino
                     WHERE d.snap = ?1 AND d.parent = ?2 AND d.name > ?3 ORDER BY d.name LIMIT ?4",
                )?
                .query_map(params![snap, i(r.ino), r.after, limit + 1], dir_entry_row)?
                .collect::<Result<_, _>>()?;
            let more = entries.len() as i64 > limit;
            entries.truncate(limit as usize);
            if r.plus {
                for e in &mut entries {
                    e.attr = Some(snap_attr(conn, snap, e.ino)?);
                }
            }
            Ok(Reply::DirPage(pb::DirPage { entries, more }))
        }
        Some(Read::ReadLink(r)) => {
            let target: Option<Option<Vec<u8>>> = conn
                .row(
                    "SELECT target FROM kept_inodes WHERE snap = ?1 AND ino = ?2",
                    params![snap, i(r.ino)],
                    |row| row.get(0),
                )
                .optional()?;
            target_reply(target)
        }
        Some(Read::ReadExtents(r)) => snap_extents(conn, snap, r),
        Some(Read::ListXattrs(l)) => {
            snap_attr(conn, snap, l.ino)?;
            let entries = conn
                .prepare_cached(
                    "SELECT name, value FROM kept_xattrs WHERE snap = ?1 AND ino = ?2 ORDER BY name",
                )?
                .query_map(params![snap, i(l.ino)], xattr_row)?
                .collect::<Result<_, _>>()?;
            Ok(Reply::Xattrs(pb::Xattrs { entries }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{clean_path, matches, rebase};

    use failsafe_core::ROOT_INO;
    use failsafe_proto::pb::{
        self, command::Op, command_result::Result as R, query_reply::Reply, query_request::Query,
        ErrorCode,
    };

    use crate::state::testing::{copies, db, ok, run, run_at};
    use crate::state::{garbage, query};

    const H1: [u8; 32] = [1; 32];
    const H2: [u8; 32] = [2; 32];

    fn ask(conn: &rusqlite::Connection, q: Query) -> Reply {
        query(conn, &q, failsafe_core::ReplicationClass::default()).expect("query")
    }

    fn mkdir(conn: &mut rusqlite::Connection, parent: u64, name: &[u8]) -> u64 {
        match run(
            conn,
            Op::Mkdir(pb::Mkdir {
                parent,
                name: name.to_vec(),
                mode: 0o750,
                uid: 33,
                gid: 33,
            }),
        )
        .result
        {
            Some(R::Attr(a)) => a.ino,
            r => panic!("mkdir: {r:?}"),
        }
    }

    /// A file `name` in `parent` whose one extent is block `hash`.
    fn file(conn: &mut rusqlite::Connection, parent: u64, name: &[u8], hash: &[u8]) -> u64 {
        let ino = match run(
            conn,
            Op::Create(pb::Create {
                parent,
                name: name.to_vec(),
                mode: 0o640,
                uid: 33,
                gid: 33,
                ..Default::default()
            }),
        )
        .result
        {
            Some(R::Attr(a)) => a.ino,
            r => panic!("create: {r:?}"),
        };
        ok(run(
            conn,
            Op::CommitExtents(pb::CommitExtents {
                ino,
                extents: vec![pb::Extent {
                    offset: 0,
                    length: 10,
                    hash: hash.to_vec(),
                    ..Default::default()
                }],
                copies: vec![copies(hash, &[1, 2, 3])],
                ..Default::default()
            }),
        ));
        ino
    }

    fn lookup(conn: &rusqlite::Connection, parent: u64, name: &[u8]) -> Option<pb::Attr> {
        let q = Query::Lookup(pb::Lookup {
            parent,
            name: name.to_vec(),
            extents: false,
        });
        match query(conn, &q, failsafe_core::ReplicationClass::default()) {
            Ok(Reply::Attr(a)) => Some(a),
            _ => None,
        }
    }

    fn trash(conn: &rusqlite::Connection) -> Vec<(String, u64)> {
        match ask(
            conn,
            Query::ListTrash(pb::ListTrash {
                limit: 100,
                ..Default::default()
            }),
        ) {
            Reply::TrashPage(p) => p
                .items
                .iter()
                .map(|i| (String::from_utf8_lossy(&i.path).into_owned(), i.id))
                .collect(),
            r => panic!("list: {r:?}"),
        }
    }

    fn outcome(r: pb::CommandResult) -> pb::AdminOutcome {
        match r.result {
            Some(R::Outcome(o)) => o,
            r => panic!("outcome: {r:?}"),
        }
    }

    fn idle_blocks(conn: &rusqlite::Connection) -> usize {
        garbage(conn, i64::MAX, 100).expect("garbage").len()
    }

    #[test]
    fn an_rm_rf_comes_back_whole_from_the_trash_and_its_blocks_stay() {
        let mut conn = db();
        let wiki = mkdir(&mut conn, ROOT_INO, b"wiki");
        let pages = mkdir(&mut conn, wiki, b"pages");
        let ns = mkdir(&mut conn, pages, b"ns");
        let a = file(&mut conn, pages, b"a.txt", &H1);
        let b = file(&mut conn, ns, b"b.txt", &H2);
        // rm -rf wiki/pages, as the kernel does it: children first.
        for (parent, name) in [(pages, &b"a.txt"[..]), (ns, b"b.txt")] {
            ok(run(
                &mut conn,
                Op::Unlink(pb::Unlink {
                    parent,
                    name: name.to_vec(),
                    expect: 0,
                }),
            ));
        }
        for (parent, name) in [(pages, &b"ns"[..]), (wiki, b"pages")] {
            ok(run(
                &mut conn,
                Op::Rmdir(pb::Rmdir {
                    parent,
                    name: name.to_vec(),
                }),
            ));
        }
        assert!(lookup(&conn, wiki, b"pages").is_none());
        let held = trash(&conn);
        assert_eq!(
            held.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            [
                "/wiki/pages",
                "/wiki/pages/a.txt",
                "/wiki/pages/ns",
                "/wiki/pages/ns/b.txt"
            ]
        );
        assert_eq!(idle_blocks(&conn), 0, "the trash keeps its blocks");
        let o = outcome(run(
            &mut conn,
            Op::RestoreTrash(pb::RestoreTrash {
                path: b"/wiki/pages".to_vec(),
                limit: 100,
                ..Default::default()
            }),
        ));
        assert_eq!((o.count, o.more), (4, false), "{o:?}");
        let pages2 = lookup(&conn, wiki, b"pages").expect("pages back");
        assert_eq!(
            (pages2.ino, pages2.mode, pages2.uid, pages2.nlink),
            (pages, 0o750, 33, 3)
        );
        assert_eq!(lookup(&conn, pages, b"a.txt").expect("a back").ino, a);
        assert_eq!(lookup(&conn, ns, b"b.txt").expect("b back").ino, b);
        assert_eq!(crate::state::testing::extents(&conn, b).extents[0].hash, H2);
        assert!(trash(&conn).is_empty());
    }

    #[test]
    fn a_page_replaced_by_rename_is_in_the_trash_and_restores_over_the_new_one() {
        let mut conn = db();
        let old = file(&mut conn, ROOT_INO, b"page.txt", &H1);
        let new = file(&mut conn, ROOT_INO, b".page.tmp", &H2);
        ok(run(
            &mut conn,
            Op::Rename(pb::Rename {
                parent: ROOT_INO,
                name: b".page.tmp".to_vec(),
                new_parent: ROOT_INO,
                new_name: b"page.txt".to_vec(),
                ..Default::default()
            }),
        ));
        assert_eq!(trash(&conn), [("/page.txt".to_string(), old)]);
        let o = outcome(run(
            &mut conn,
            Op::RestoreTrash(pb::RestoreTrash {
                path: b"page.txt".to_vec(),
                limit: 10,
                ..Default::default()
            }),
        ));
        assert_eq!(o.count, 1);
        assert_eq!(lookup(&conn, ROOT_INO, b"page.txt").expect("back").ino, old);
        // The newer one is not lost: it is in the trash now.
        assert_eq!(trash(&conn), [("/page.txt".to_string(), new)]);
        // --to puts it elsewhere, making the directories it needs.
        let o = outcome(run(
            &mut conn,
            Op::RestoreTrash(pb::RestoreTrash {
                path: b"/page.txt".to_vec(),
                to: b"/old/page.txt".to_vec(),
                limit: 10,
                ..Default::default()
            }),
        ));
        assert_eq!(o.count, 1);
        let dir = lookup(&conn, ROOT_INO, b"old").expect("made");
        assert_eq!(lookup(&conn, dir.ino, b"page.txt").expect("there").ino, new);
    }

    #[test]
    fn excluded_paths_zero_retention_and_expiry_keep_nothing() {
        let mut conn = db();
        let locks = mkdir(&mut conn, ROOT_INO, b"locks");
        let cache = mkdir(&mut conn, ROOT_INO, b"scratch");
        file(&mut conn, locks, b"x.lock", &H1);
        file(&mut conn, cache, b"y", &H2);
        ok(run(
            &mut conn,
            Op::SetTrashPolicy(pb::SetTrashPolicy {
                path: b"/scratch".to_vec(),
                policy: Some(pb::TrashPolicy {
                    retention_ms: Some(0),
                    ..Default::default()
                }),
            }),
        ));
        ok(run(
            &mut conn,
            Op::Unlink(pb::Unlink {
                parent: locks,
                name: b"x.lock".to_vec(),
                expect: 0,
            }),
        ));
        ok(run(
            &mut conn,
            Op::Unlink(pb::Unlink {
                parent: cache,
                name: b"y".to_vec(),
                expect: 0,
            }),
        ));
        assert!(trash(&conn).is_empty(), "{:?}", trash(&conn));
        assert_eq!(idle_blocks(&conn), 2);
        // A kept file expires by the leader's clock.
        ok(run(
            &mut conn,
            Op::SetTrashPolicy(pb::SetTrashPolicy {
                path: Vec::new(),
                policy: Some(pb::TrashPolicy {
                    retention_ms: Some(1000),
                    ..Default::default()
                }),
            }),
        ));
        file(&mut conn, ROOT_INO, b"z", &[3; 32]);
        ok(run_at(
            &mut conn,
            Op::Unlink(pb::Unlink {
                parent: ROOT_INO,
                name: b"z".to_vec(),
                expect: 0,
            }),
            10,
        ));
        assert_eq!(trash(&conn).len(), 1);
        let early = outcome(run_at(
            &mut conn,
            Op::ExpireTrash(pb::ExpireTrash {}),
            10 + 999_999_999,
        ));
        assert_eq!(early.count, 0);
        let due = outcome(run_at(
            &mut conn,
            Op::ExpireTrash(pb::ExpireTrash {}),
            10 + 1_000_000_000,
        ));
        assert_eq!(due.count, 1);
        assert!(trash(&conn).is_empty());
        assert_eq!(idle_blocks(&conn), 3, "its block is garbage now");
    }

    #[test]
    fn a_snapshot_reads_as_the_tree_was_and_keeps_its_blocks_until_deleted() {
        let mut conn = db();
        let dir = mkdir(&mut conn, ROOT_INO, b"wiki");
        let f = file(&mut conn, dir, b"p.txt", &H1);
        let o = outcome(run(
            &mut conn,
            Op::CreateSnapshot(pb::CreateSnapshot {
                name: "before".into(),
                path: b"/wiki".to_vec(),
            }),
        ));
        assert_eq!(o.count, 2);
        let again = run(
            &mut conn,
            Op::CreateSnapshot(pb::CreateSnapshot {
                name: "before".into(),
                path: Vec::new(),
            }),
        );
        assert!(matches!(again.result, Some(R::Error(e)) if e.code == ErrorCode::Exists as i32));
        // Replace and purge the live page: the snapshot still has it.
        file(&mut conn, dir, b"new", &H2);
        ok(run(
            &mut conn,
            Op::Rename(pb::Rename {
                parent: dir,
                name: b"new".to_vec(),
                new_parent: dir,
                new_name: b"p.txt".to_vec(),
                ..Default::default()
            }),
        ));
        ok(run(
            &mut conn,
            Op::PurgeTrash(pb::PurgeTrash {
                path: Vec::new(),
                id: f,
            }),
        ));
        assert_eq!(idle_blocks(&conn), 0, "the snapshot keeps H1");
        // Repair counts it: with one of its three devices up, both blocks
        // (H2 live, H1 the snapshot's) are short.
        let counts = crate::state::replication_counts(&conn, &[1], 3).expect("counts");
        assert_eq!(counts.under_replicated, 2);
        let snap = match ask(&conn, Query::ListSnapshots(pb::ListSnapshots {})) {
            Reply::SnapshotList(l) => l.snapshots[0].clone(),
            r => panic!("{r:?}"),
        };
        assert_eq!(
            (snap.name.as_str(), snap.root, snap.files, snap.bytes),
            ("before", dir, 1, 10)
        );
        let read = |q| {
            ask(
                &conn,
                Query::InSnapshot(pb::InSnapshot {
                    snapshot: snap.id,
                    read: Some(q),
                }),
            )
        };
        use pb::in_snapshot::Read;
        let Reply::Attr(a) = read(Read::Lookup(pb::Lookup {
            parent: dir,
            name: b"p.txt".to_vec(),
            extents: false,
        })) else {
            panic!("lookup")
        };
        assert_eq!(a.ino, f);
        let Reply::FileExtents(fe) = read(Read::ReadExtents(failsafe_proto::whole_file(f))) else {
            panic!("extents")
        };
        assert_eq!(fe.extents[0].hash, H1);
        assert_eq!(fe.copies[0].device_ids, [1, 2, 3]);
        let Reply::DirPage(p) = read(Read::ReadDir(pb::ReadDir {
            ino: dir,
            limit: 10,
            plus: true,
            ..Default::default()
        })) else {
            panic!("readdir")
        };
        assert_eq!(p.entries.len(), 1);
        ok(run(
            &mut conn,
            Op::DeleteSnapshot(pb::DeleteSnapshot {
                name: "before".into(),
            }),
        ));
        assert_eq!(
            idle_blocks(&conn),
            1,
            "H1 is garbage once the snapshot is gone"
        );
        assert!(query(
            &conn,
            &Query::InSnapshot(pb::InSnapshot {
                snapshot: snap.id,
                read: Some(Read::GetAttr(pb::GetAttr {
                    ino: dir,
                    extents: false
                })),
            }),
            failsafe_core::ReplicationClass::default()
        )
        .is_err());
    }

    #[test]
    fn restored_paths_move_from_one_place_to_another() {
        assert_eq!(rebase(b"/a", b"/b", b"/a/x/y"), b"/b/x/y");
        assert_eq!(rebase(b"/a/f", b"/g", b"/a/f"), b"/g");
        assert_eq!(rebase(b"/", b"/old", b"/a/f"), b"/old/a/f");
        assert_eq!(rebase(b"/a", b"/", b"/a/f"), b"/f");
        assert_eq!(rebase(b"/", b"/", b"/a"), b"/a");
    }

    #[test]
    fn patterns_match_whole_paths_and_star_crosses_slashes() {
        assert!(matches(b"*/locks/*", b"/wiki/data/locks/start.lock"));
        assert!(matches(b"*/cache/*", b"/wiki/data/cache/a/b/c.xhtml"));
        assert!(!matches(b"*/cache/*", b"/wiki/data/pages/cache.txt"));
        assert!(matches(b"*.tmp", b"/a/.x.tmp"));
        assert!(!matches(b"*.tmp", b"/a/x.tmp.txt"));
        assert!(matches(b"/a/?.txt", b"/a/b.txt"));
        assert!(!matches(b"/a/?.txt", b"/a/bc.txt"));
        assert!(matches(b"*", b"/anything"));
    }

    #[test]
    fn paths_are_made_absolute_and_checked() {
        assert_eq!(clean_path(b"wiki//pages/").expect("clean"), b"/wiki/pages");
        assert_eq!(clean_path(b"").expect("root"), b"/");
        assert_eq!(clean_path(b"/").expect("root"), b"/");
        assert!(clean_path(b"/a/../b").is_err());
    }
}
