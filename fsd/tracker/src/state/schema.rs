//! The state machine's SQLite schema, and SQL fragments the modules share.

pub(crate) const SCHEMA: &str = "
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
-- Hosts in an administrative state other than active (state: a
-- HostAdminState number): away (shipped) until a time (the leader's clock),
-- or draining.
CREATE TABLE IF NOT EXISTS host_states(host_id INTEGER PRIMARY KEY, state INTEGER NOT NULL, until INTEGER NOT NULL, since INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied_ops(
  client_id INTEGER NOT NULL, op_id INTEGER NOT NULL, at INTEGER NOT NULL, result BLOB NOT NULL,
  PRIMARY KEY(client_id, op_id)) WITHOUT ROWID;
INSERT OR IGNORE INTO inodes VALUES (1, 2, 493, 0, 0, 0, 0, 0, 0, 2, 1, NULL);
INSERT OR IGNORE INTO meta VALUES ('next_ino', 2);
";

/// The columns `namespace::attr_row` reads, in its order.
pub(super) const ATTR_COLS: &str =
    "ino, kind, mode, uid, gid, size, atime, mtime, ctime, nlink, version";

/// A device that is not gone (SQL, over `devices` as `d` or unaliased).
pub(super) const LIVE_DEVICE: &str = "device_id NOT IN (SELECT device_id FROM gone_devices)";
