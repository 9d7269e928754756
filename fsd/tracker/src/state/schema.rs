//! The state machine's SQLite schema, and SQL fragments the modules share.

const SCHEMA: &str = "
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
-- An inline extent has an empty hash, its bytes in `data` and when they
-- were committed (the leader's clock) in `written`; a block extent has NULL
-- in both. (Both columns came with schema version 1: see `migrate`.)
-- A rowid table (since version 2), not WITHOUT ROWID: there the whole row,
-- inline bytes included, is the B-tree's key, and every seek that compares
-- against a row longer than a page reads its overflow pages from the file.
CREATE TABLE IF NOT EXISTS extents(
  ino INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
  hash BLOB NOT NULL, block_offset INTEGER NOT NULL, data BLOB, written INTEGER,
  PRIMARY KEY(ino, offset));
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
-- Hosts in an administrative state other than active (state: a
-- HostAdminState number): away (shipped) until a time (the leader's clock),
-- or draining.
CREATE TABLE IF NOT EXISTS host_states(host_id INTEGER PRIMARY KEY, state INTEGER NOT NULL, until INTEGER NOT NULL, since INTEGER NOT NULL);
-- The key each host registered with (the hash of its TLS certificate's
-- public key), and the keys of revoked credentials: tables of their own, so
-- databases and snapshots from before them need no migration.
CREATE TABLE IF NOT EXISTS host_keys(host_id INTEGER PRIMARY KEY, key_id BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS revoked(key_id BLOB PRIMARY KEY, who TEXT NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;
-- The device number of each character or block device node (mknod): a
-- table of its own, so databases and snapshots from before special files
-- need no migration.
CREATE TABLE IF NOT EXISTS device_numbers(ino INTEGER PRIMARY KEY, rdev INTEGER NOT NULL);
-- User extended attributes (setxattr), likewise a table of their own.
CREATE TABLE IF NOT EXISTS xattrs(
  ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
  PRIMARY KEY(ino, name)) WITHOUT ROWID;
-- Kept copies of inodes: a snapshot's (snap = its id, from 1) or the
-- trash's (snap = 0), with their names (snapshots only), extents and user
-- extended attributes, as the live tables hold them. Tables of their own,
-- so databases from before the trash need no migration.
CREATE TABLE IF NOT EXISTS kept_inodes(
  snap INTEGER NOT NULL, ino INTEGER NOT NULL, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
  uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
  atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
  nlink INTEGER NOT NULL, version INTEGER NOT NULL, target BLOB, rdev INTEGER,
  PRIMARY KEY(snap, ino)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kept_dentries(
  snap INTEGER NOT NULL, parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
  PRIMARY KEY(snap, parent, name)) WITHOUT ROWID;
-- (`kept_extents` a rowid table, as `extents`, since version 2.)
CREATE TABLE IF NOT EXISTS kept_extents(
  snap INTEGER NOT NULL, ino INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
  hash BLOB NOT NULL, block_offset INTEGER NOT NULL, data BLOB, written INTEGER,
  PRIMARY KEY(snap, ino, offset));
CREATE INDEX IF NOT EXISTS kept_extents_by_hash ON kept_extents(hash);
CREATE TABLE IF NOT EXISTS kept_xattrs(
  snap INTEGER NOT NULL, ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
  PRIMARY KEY(snap, ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(
  snap INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path BLOB NOT NULL,
  root INTEGER NOT NULL, created INTEGER NOT NULL);
-- What the trash holds (its inodes are kept_inodes of snap 0): the path
-- each had, when it was deleted and until when it is kept (the leader's
-- clock).
CREATE TABLE IF NOT EXISTS trash(
  ino INTEGER PRIMARY KEY, path BLOB NOT NULL, kind INTEGER NOT NULL, size INTEGER NOT NULL,
  deleted INTEGER NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS trash_by_path ON trash(path);
CREATE INDEX IF NOT EXISTS trash_by_expiry ON trash(expires);
-- Directories whose deleted files are kept for a time of their own.
CREATE TABLE IF NOT EXISTS trash_retention(ino INTEGER PRIMARY KEY, retention_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied_ops(
  client_id INTEGER NOT NULL, op_id INTEGER NOT NULL, at INTEGER NOT NULL, result BLOB NOT NULL,
  PRIMARY KEY(client_id, op_id)) WITHOUT ROWID;
INSERT OR IGNORE INTO inodes VALUES (1, 2, 493, 0, 0, 0, 0, 0, 0, 2, 1, NULL);
INSERT OR IGNORE INTO meta VALUES ('next_ino', 2);
";

/// The state machine's schema version, in SQLite's `user_version` of
/// `meta.db` (and so of every snapshot, a copy of it). 0: before inline
/// extents; 1: `extents` has `data` and `written`; 2: `extents` and
/// `kept_extents` are rowid tables.
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// Tables that were WITHOUT ROWID before schema version 2, rebuilt as rowid
/// tables with the same columns in the same order.
const ROWID_SINCE_2: &[&str] = &["extents", "kept_extents"];

/// A state machine database written by a newer failsafe than this one.
#[derive(Debug, thiserror::Error)]
#[error(
    "the state machine database has schema version {found}; this fsd knows up to {SCHEMA_VERSION} \
     (it was written by a newer failsafe: upgrade this host)"
)]
pub(crate) struct SchemaTooNew {
    found: i64,
}

/// Creates the schema in a new database, or brings an older one (or an
/// installed snapshot made by an older member) up to `SCHEMA_VERSION`, in
/// one transaction. A database from a newer version is refused.
pub(crate) fn migrate(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    use rusqlite::OptionalExtension;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(
            SchemaTooNew { found: version },
        )));
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| {
        let layout = |table: &str| -> rusqlite::Result<Option<String>> {
            conn.query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .optional()
        };
        // Version 0 → 1: a table created before inline extents lacks their
        // columns (adding nullable columns rewrites nothing).
        let has_data: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('extents') WHERE name = 'data')",
            [],
            |r| r.get(0),
        )?;
        if layout("extents")?.is_some() && !has_data {
            conn.execute_batch(
                "ALTER TABLE extents ADD COLUMN data BLOB; ALTER TABLE extents ADD COLUMN written INTEGER;",
            )?;
        }
        // Version 1 → 2: the old tables step aside (their indexes dropped,
        // the schema makes them again on the new ones) and are copied over.
        let mut rebuilt = Vec::new();
        for &table in ROWID_SINCE_2 {
            if layout(table)?.is_some_and(|sql| sql.contains("WITHOUT ROWID")) {
                conn.execute_batch(&format!("ALTER TABLE {table} RENAME TO {table}_v1"))?;
                let indexes: Vec<String> = conn
                    .prepare(
                        "SELECT name FROM sqlite_schema WHERE type = 'index' \
                         AND tbl_name = ?1 AND sql IS NOT NULL",
                    )?
                    .query_map([format!("{table}_v1")], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                for index in indexes {
                    conn.execute_batch(&format!("DROP INDEX \"{index}\""))?;
                }
                rebuilt.push(table);
            }
        }
        conn.execute_batch(SCHEMA)?;
        for table in rebuilt {
            conn.execute_batch(&format!(
                "INSERT INTO {table} SELECT * FROM {table}_v1; DROP TABLE {table}_v1;"
            ))?;
        }
        // What the blockifier scans for (after the columns exist).
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS extents_inline ON extents(written) WHERE data IS NOT NULL;",
        )?;
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
    })();
    match r {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// The tables every state machine database has had since version 0.
const CORE_TABLES: &[&str] = &[
    "meta",
    "inodes",
    "dentries",
    "extents",
    "blocks",
    "copies",
    "hosts",
    "devices",
    "sessions",
    "locks",
    "applied_ops",
];

/// Whether the database at `path` may become this member's state: SQLite
/// finds it intact, it holds every core table and no newer schema than
/// this build knows. Run on a received snapshot before it replaces
/// anything.
pub(crate) fn check_snapshot(path: &std::path::Path) -> Result<(), String> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("not a database: {e}"))?;
    let integrity: String = conn
        .query_row("PRAGMA integrity_check(1)", [], |r| r.get(0))
        .map_err(|e| format!("not a database: {e}"))?;
    if integrity != "ok" {
        return Err(format!("corrupt database: {integrity}"));
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(SchemaTooNew { found: version }.to_string());
    }
    for table in CORE_TABLES {
        let there: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [table],
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
        if !there {
            return Err(format!("not a tracker database: no table {table}"));
        }
    }
    Ok(())
}

/// The columns `namespace::attr_row` reads, in its order.
pub(super) const ATTR_COLS: &str =
    "ino, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, version, \
     (SELECT rdev FROM device_numbers WHERE device_numbers.ino = inodes.ino)";

/// Whether the block named by the SQL expression `hash` is referenced: by
/// a file's extent (live or in the trash), or by a snapshot's (SQL).
pub(super) fn referenced(hash: &str) -> String {
    format!(
        "(EXISTS (SELECT 1 FROM extents WHERE hash = {hash}) \
         OR EXISTS (SELECT 1 FROM kept_extents WHERE hash = {hash}))"
    )
}

/// Every block a file references, live or kept by a snapshot, once (SQL:
/// a `hash` column). The live ones come in index order; the snapshots'
/// part is empty when there are none, so the scan costs what it did
/// before them.
pub(super) const REFERENCED_BLOCKS: &str = "SELECT DISTINCT hash FROM extents WHERE data IS NULL \
     UNION ALL SELECT DISTINCT hash FROM kept_extents k WHERE data IS NULL \
       AND NOT EXISTS (SELECT 1 FROM extents e WHERE e.hash = k.hash)";

/// A device that is not gone (SQL, over `devices` as `d` or unaliased).
pub(super) const LIVE_DEVICE: &str = "device_id NOT IN (SELECT device_id FROM gone_devices)";

#[cfg(test)]
mod tests {
    use super::{migrate, SCHEMA_VERSION};

    /// The `extents` table as it was before schema version 1.
    const VERSION_0_EXTENTS: &str = "CREATE TABLE extents(
      ino INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
      hash BLOB NOT NULL, block_offset INTEGER NOT NULL,
      PRIMARY KEY(ino, offset)) WITHOUT ROWID;
      INSERT INTO extents VALUES (2, 0, 10, x'01', 0);";

    /// A database made by `old`, migrated (twice: the second changes
    /// nothing) to the current version.
    fn migrated(old: &str) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        conn.execute_batch(old).expect("old tables");
        migrate(&conn).expect("migrate");
        migrate(&conn).expect("migrating again changes nothing");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
        conn
    }

    #[test]
    fn a_version_0_database_gains_the_inline_columns_and_keeps_its_extents() {
        let conn = migrated(VERSION_0_EXTENTS);
        let (n, data): (i64, Option<Vec<u8>>) = conn
            .query_row("SELECT COUNT(*), MAX(data) FROM extents", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("extents");
        assert_eq!((n, data), (1, None));
    }

    /// The tables schema version 2 rebuilt, as version 1 had them, with
    /// an inline extent longer than a page.
    const VERSION_1_EXTENTS: &str = "CREATE TABLE extents(
      ino INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
      hash BLOB NOT NULL, block_offset INTEGER NOT NULL, data BLOB, written INTEGER,
      PRIMARY KEY(ino, offset)) WITHOUT ROWID;
      CREATE INDEX extents_by_hash ON extents(hash);
      CREATE INDEX extents_inline ON extents(written) WHERE data IS NOT NULL;
      CREATE TABLE kept_extents(
      snap INTEGER NOT NULL, ino INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
      hash BLOB NOT NULL, block_offset INTEGER NOT NULL, data BLOB, written INTEGER,
      PRIMARY KEY(snap, ino, offset)) WITHOUT ROWID;
      CREATE INDEX kept_extents_by_hash ON kept_extents(hash);
      INSERT INTO extents VALUES (2, 0, 10, x'01', 0, NULL, NULL);
      INSERT INTO extents VALUES (3, 0, 9000, x'', 0, zeroblob(9000), 7);
      INSERT INTO kept_extents VALUES (0, 4, 0, 5000, x'', 0, zeroblob(5000), 8);
      PRAGMA user_version = 1;";

    #[test]
    fn a_version_1_database_gets_rowid_extent_tables_with_the_same_rows() {
        let conn = migrated(VERSION_1_EXTENTS);
        for table in ["extents", "kept_extents"] {
            let sql: String = conn
                .query_row(
                    "SELECT sql FROM sqlite_schema WHERE name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .expect("table");
            assert!(!sql.contains("WITHOUT ROWID"), "{sql}");
        }
        let rows: Vec<(i64, i64, Option<i64>, Option<i64>)> = conn
            .prepare("SELECT ino, length, LENGTH(data), written FROM extents ORDER BY ino")
            .expect("select")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, [(2, 10, None, None), (3, 9000, Some(9000), Some(7))]);
        let kept: (i64, i64, i64) = conn
            .query_row(
                "SELECT snap, ino, LENGTH(data) FROM kept_extents",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("kept");
        assert_eq!(kept, (0, 4, 5000));
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL \
                 AND tbl_name IN ('extents', 'kept_extents') ORDER BY name",
            )
            .expect("select")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            indexes,
            ["extents_by_hash", "extents_inline", "kept_extents_by_hash"]
        );
        let left: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%_v1'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
        // The key still refuses a second row at the same place.
        assert!(conn
            .execute(
                "INSERT INTO extents VALUES (2, 0, 1, x'02', 0, NULL, NULL)",
                []
            )
            .is_err());
    }

    #[test]
    fn a_database_from_a_newer_version_is_refused_by_name() {
        let conn = rusqlite::Connection::open_in_memory().expect("db");
        conn.execute_batch("PRAGMA user_version = 99")
            .expect("version");
        let e = migrate(&conn).expect_err("refused").to_string();
        assert!(e.contains("schema version 99"), "{e}");
    }
}
