//! The tracker's Raft storage: the log and the state machine, each a SQLite
//! database owned by its own thread (see `db`).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use failsafe_proto::pb;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rusqlite::{params, OptionalExtension};

use crate::codec::{self, FORMAT_1_UP_TO};
use crate::db::{open_connection, CachedSql, Db, Durability};
use crate::state;

pub type NodeId = u64;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = pb::Command,
        R = pb::CommandResult,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
type SResult<T> = Result<T, StorageError<NodeId>>;

fn db_gone() -> io::Error {
    io::Error::other("database thread stopped")
}

// ---------- log ----------

/// The log database's format, in SQLite's `user_version`. Format 1 (no
/// version: failsafe up to 9c22571) stored entries as JSON; format 2 stores
/// each as a protobuf `RaftEntry` (see `codec`). `raft_meta` holds openraft's
/// vote and log ids as JSON in both.
const LOG_FORMAT: i64 = 2;

const LOG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log(idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS raft_meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
";

/// A Raft log this fsd cannot read: written by another version.
#[derive(Debug, thiserror::Error)]
#[error(
    "raft log at {} is in format {found} ({}); this fsd reads format {LOG_FORMAT} (protobuf entries); \
     start from an empty data directory",
    path.display(),
    describe_format(*found)
)]
pub struct LogFormatError {
    pub path: PathBuf,
    pub found: i64,
}

fn describe_format(format: i64) -> String {
    match format {
        1 => format!("JSON entries, {FORMAT_1_UP_TO}"),
        n if n > LOG_FORMAT => "written by a newer fsd".into(),
        _ => "unknown".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenLogError {
    #[error(transparent)]
    Format(#[from] LogFormatError),
    #[error("raft log: {0}")]
    Db(#[from] rusqlite::Error),
}

/// Creates a new log in the current format, or checks an existing one's.
fn open_log(path: &Path) -> Result<rusqlite::Connection, OpenLogError> {
    let conn = open_connection(path, Durability::Commit)?;
    let version: i64 = conn.row("PRAGMA user_version", [], |r| r.get(0))?;
    let has_log: bool = conn.row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'log')",
        [],
        |r| r.get(0),
    )?;
    let found = match (version, has_log) {
        (0, false) => {
            conn.execute_batch(&format!(
                "BEGIN; {LOG_SCHEMA} PRAGMA user_version = {LOG_FORMAT}; COMMIT;"
            ))?;
            return Ok(conn);
        }
        // Format 1 predates the version number.
        (0, true) => 1,
        (v, _) => v,
    };
    if found != LOG_FORMAT {
        return Err(LogFormatError {
            path: path.to_path_buf(),
            found,
        }
        .into());
    }
    conn.execute_batch(LOG_SCHEMA)?;
    Ok(conn)
}

/// The Raft log and vote in `raft.db`. Writes commit (fsync) before they are
/// acknowledged to openraft.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Db,
    recent: Arc<Mutex<Recent>>,
}

impl LogStore {
    pub(crate) fn open(path: &Path) -> Result<LogStore, OpenLogError> {
        let conn = open_log(path)?;
        Ok(LogStore {
            db: Db::spawn("raft-log", conn)?,
            recent: Arc::default(),
        })
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The newest entries of the log, in memory as well: the leader's
/// replication to each follower and every member's apply read what was
/// just appended, and each read of the database is a trip to its thread.
#[derive(Default)]
struct Recent {
    /// Consecutive indexes, each with its encoded size.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

/// At most this many entries and bytes (encoded) stay in [`Recent`].
const RECENT_ENTRIES: usize = 1024;
const RECENT_BYTES: usize = 16 << 20;

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    /// After a durable append: entries that do not follow the ones held
    /// start the window anew.
    fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        let follows = match self.entries.back() {
            Some((last, _)) => last.log_id.index + 1 == entry.log_id.index,
            None => true,
        };
        if !follows {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            match self.entries.pop_front() {
                Some((_, size)) => self.bytes -= size,
                None => break,
            }
        }
    }

    /// Entries `start..end`, if all are held.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let first = self.first()?;
        let held_end = first + self.entries.len() as u64;
        if start < first || end > held_end {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    /// Forgets index `from` and after (a truncation).
    fn truncate(&mut self, from: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= from)
        {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Forgets index `upto` and before (a purge).
    fn purge(&mut self, upto: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= upto)
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }
}

fn get_meta<T: serde::de::DeserializeOwned>(
    conn: &rusqlite::Connection,
    table: &str,
    key: &str,
) -> rusqlite::Result<Option<T>> {
    let raw: Option<Vec<u8>> = conn
        .row(
            &format!("SELECT value FROM {table} WHERE key = ?1"),
            [key],
            |r| r.get(0),
        )
        .optional()?;
    Ok(raw.and_then(|b| serde_json::from_slice(&b).ok()))
}

fn put_meta<T: serde::Serialize>(
    conn: &rusqlite::Connection,
    table: &str,
    key: &str,
    v: &T,
) -> rusqlite::Result<()> {
    let bytes =
        serde_json::to_vec(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    // An upsert, not INSERT OR REPLACE: a replaced row gets a new rowid,
    // which rewrites the key's index page too (once per applied entry, for
    // `last_applied`).
    conn.exec(
        &format!(
            "INSERT INTO {table} VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        ),
        params![key, bytes],
    )?;
    Ok(())
}

fn decode_entry(bytes: &[u8]) -> rusqlite::Result<Entry<TypeConfig>> {
    codec::decode_entry(bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

fn bound_range(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(&x) => x,
        Bound::Excluded(&x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&x) => x.saturating_add(1),
        Bound::Excluded(&x) => x,
        Bound::Unbounded => u64::MAX,
    };
    (
        start.min(i64::MAX as u64) as i64,
        end.min(i64::MAX as u64) as i64,
    )
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let (start, end) = bound_range(&range);
        if let Some(held) = self.recent().get(start as u64, end as u64) {
            return Ok(held);
        }
        let r = self
            .db
            .call(move |conn| -> rusqlite::Result<Vec<Entry<TypeConfig>>> {
                let mut stmt = conn.prepare_cached(
                    "SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
                )?;
                let rows = stmt.query_map([start, end], |r| r.get::<_, Vec<u8>>(0))?;
                rows.map(|b| decode_entry(&b?)).collect()
            })
            .await
            .map_err(|_| StorageIOError::read_logs(&db_gone()))?;
        r.map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let r = self
            .db
            .call(|conn| -> rusqlite::Result<LogState<TypeConfig>> {
                let last_purged: Option<LogId<NodeId>> =
                    get_meta(conn, "raft_meta", "last_purged")?;
                let last: Option<Vec<u8>> = conn
                    .row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let last_log_id = match last {
                    Some(b) => Some(decode_entry(&b)?.log_id),
                    None => last_purged,
                };
                Ok(LogState {
                    last_purged_log_id: last_purged,
                    last_log_id,
                })
            })
            .await
            .map_err(|_| StorageIOError::read_logs(&db_gone()))?;
        r.map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        let vote = *vote;
        let r = self
            .db
            .call(move |conn| put_meta(conn, "raft_meta", "vote", &vote))
            .await;
        r.map_err(|_| db_gone())
            .and_then(|r| r.map_err(io::Error::other))
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        let r = self
            .db
            .call(|conn| get_meta(conn, "raft_meta", "vote"))
            .await;
        r.map_err(|_| db_gone())
            .and_then(|r| r.map_err(io::Error::other))
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    // No save_committed/read_committed (openraft's defaults: nothing is
    // stored). Saving the commit index would cost an fsync awaited before
    // every apply; without it, a restarted member applies what it has
    // once a leader tells it the commit index again.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut appended = Vec::new();
        for e in entries {
            let idx = e.log_id.index as i64;
            let bytes =
                codec::encode_entry(e.clone()).map_err(|e| StorageIOError::write_logs(&e))?;
            appended.push((e, bytes.len()));
            rows.push((idx, bytes));
        }
        let r = self
            .db
            .call(move |conn| -> rusqlite::Result<()> {
                let tx = conn.transaction()?;
                {
                    let mut stmt =
                        tx.prepare_cached("INSERT OR REPLACE INTO log VALUES (?1, ?2)")?;
                    for (idx, bytes) in &rows {
                        stmt.execute(params![idx, bytes])?;
                    }
                }
                tx.commit()
            })
            .await;
        let r = r
            .map_err(|_| db_gone())
            .and_then(|r| r.map_err(io::Error::other));
        match r {
            Ok(()) => {
                let mut recent = self.recent();
                for (e, size) in appended {
                    recent.push(e, size);
                }
                drop(recent);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(e));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.recent().truncate(log_id.index);
        let idx = log_id.index as i64;
        let r = self
            .db
            .call(move |conn| {
                conn.exec("DELETE FROM log WHERE idx >= ?1", [idx])
                    .map(|_| ())
            })
            .await;
        r.map_err(|_| db_gone())
            .and_then(|r| r.map_err(io::Error::other))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.recent().purge(log_id.index);
        let r = self
            .db
            .call(move |conn| -> rusqlite::Result<()> {
                let tx = conn.transaction()?;
                put_meta(&tx, "raft_meta", "last_purged", &log_id)?;
                tx.exec("DELETE FROM log WHERE idx <= ?1", [log_id.index as i64])?;
                tx.commit()
            })
            .await;
        r.map_err(|_| db_gone())
            .and_then(|r| r.map_err(io::Error::other))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

// ---------- state machine ----------

/// The metadata state machine in `meta.db`, and its latest snapshot (a
/// consistent copy of that database) in `snapshot.db` + `snapshot.json`.
#[derive(Clone)]
pub(crate) struct StateMachine {
    db: Db,
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
}

impl StateMachine {
    pub(crate) fn open(dir: &Path) -> rusqlite::Result<StateMachine> {
        Ok(StateMachine {
            db: {
                let conn = open_connection(&dir.join("meta.db"), Durability::Checkpoint)?;
                state::migrate(&conn)?;
                Db::spawn("state-machine", conn)?
            },
            dir: dir.to_path_buf(),
        })
    }

    /// The database, for queries.
    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    fn snapshot_paths(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("snapshot.db"), self.dir.join("snapshot.json"))
    }

    fn load_snapshot(&self) -> io::Result<Option<Snapshot<TypeConfig>>> {
        let (data_path, meta_path) = self.snapshot_paths();
        let meta = match std::fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let file: SnapshotFile = serde_json::from_slice(&meta).map_err(io::Error::other)?;
        let data = std::fs::read(data_path)?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }

    fn store_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: &[u8],
    ) -> io::Result<()> {
        let (data_path, meta_path) = self.snapshot_paths();
        write_durably(&data_path, data)?;
        let json =
            serde_json::to_vec(&SnapshotFile { meta: meta.clone() }).map_err(io::Error::other)?;
        write_durably(&meta_path, &json)
    }
}

pub(crate) fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

type Applied = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

fn read_applied(conn: &rusqlite::Connection) -> rusqlite::Result<Applied> {
    let last: Option<LogId<NodeId>> = get_meta(conn, "meta", "last_applied")?;
    let membership: Option<StoredMembership<NodeId, BasicNode>> =
        get_meta(conn, "meta", "membership")?;
    Ok((last, membership.unwrap_or_default()))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let tmp = self.dir.join("snapshot-build.db");
        let tmp2 = tmp.clone();
        let r = self
            .db
            .call(move |conn| -> rusqlite::Result<Applied> {
                let _ = std::fs::remove_file(&tmp2);
                // Commits reach the disk at checkpoints (`Durability`): make
                // everything applied so far durable before openraft forgets
                // the log entries this snapshot covers.
                checkpoint(conn)?;
                // One statement, so the copy and `last_applied` agree.
                conn.exec("VACUUM INTO ?1", [tmp2.to_string_lossy()])?;
                read_applied(conn)
            })
            .await
            .map_err(|_| StorageIOError::write_snapshot(None, &db_gone()))?;
        let (last, membership) = r.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // The copy is tens of megabytes: read and stored off the runtime's
        // threads, which meanwhile answer the leader's AppendEntries (a
        // worker blocked here made a follower miss the heartbeat's deadline).
        let data = blocking(move || {
            let data = std::fs::read(&tmp);
            let _ = std::fs::remove_file(&tmp);
            data
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, rand_suffix()),
            None => format!("0-0-{}", rand_suffix()),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id,
        };
        let (me, stored_meta) = (self.clone(), meta.clone());
        let data = blocking(move || me.store_snapshot(&stored_meta, &data).map(|()| data))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built tracker snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Runs file work that may take a while on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("a blocking task failed: {e}")))?
}

/// Writes the state machine's WAL into its database, both fsynced.
fn checkpoint(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let busy: i64 = conn.row("PRAGMA wal_checkpoint(FULL)", [], |r| r.get(0))?;
    if busy != 0 {
        // Only this thread uses the database, so nothing can hold it.
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("the state machine's checkpoint could not complete".into()),
        ));
    }
    Ok(())
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> SResult<Applied> {
        let r = self
            .db
            .call(|conn| read_applied(conn))
            .await
            .map_err(|_| StorageIOError::read_state_machine(&db_gone()))?;
        r.map_err(|e| StorageIOError::read_state_machine(&e).into())
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<pb::CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let r = self
            .db
            .call(move |conn| -> rusqlite::Result<Vec<pb::CommandResult>> {
                // One transaction per batch; each command runs in its own
                // savepoint inside it, and `last_applied` commits with them.
                let tx = conn.transaction()?;
                let mut out = Vec::with_capacity(entries.len());
                for e in &entries {
                    match &e.payload {
                        EntryPayload::Blank => out.push(pb::CommandResult::default()),
                        EntryPayload::Normal(cmd) => out.push(state::apply(&tx, cmd)?),
                        EntryPayload::Membership(m) => {
                            put_meta(
                                &tx,
                                "meta",
                                "membership",
                                &StoredMembership::new(Some(e.log_id), m.clone()),
                            )?;
                            out.push(pb::CommandResult::default());
                        }
                    }
                    put_meta(&tx, "meta", "last_applied", &e.log_id)?;
                }
                tx.commit()?;
                Ok(out)
            })
            .await
            .map_err(|_| StorageIOError::write_state_machine(&db_gone()))?;
        r.map_err(|e| StorageIOError::write_state_machine(&e).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let data = snapshot.into_inner();
        let sig = meta.signature();
        let db_path = self.dir.join("meta.db");
        let incoming = self.dir.join("meta-incoming.db");
        let (me, stored_meta, to) = (self.clone(), meta.clone(), incoming.clone());
        // Off the runtime's threads, as in `build_snapshot`.
        blocking(move || {
            me.store_snapshot(&stored_meta, &data)?;
            write_durably(&to, &data)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), &e))?;
        let meta = meta.clone();
        let r = self
            .db
            .call(move |conn| -> rusqlite::Result<()> {
                // Close the live database, swap in the snapshot's, reopen.
                *conn = rusqlite::Connection::open_in_memory()?;
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
                }
                // The rename made durable before anything relies on it: a
                // crash must not bring the old meta.db back over a log
                // already purged up to the snapshot.
                std::fs::rename(&incoming, &db_path)
                    .and_then(|()| {
                        let dir = db_path.parent().unwrap_or(std::path::Path::new("."));
                        std::fs::File::open(dir)?.sync_all()
                    })
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                let fresh = open_connection(&db_path, Durability::Checkpoint)?;
                // A snapshot from a member of an older version is brought
                // up to this one's schema (or refused if newer).
                state::migrate(&fresh)?;
                put_meta(&fresh, "meta", "last_applied", &meta.last_log_id)?;
                put_meta(&fresh, "meta", "membership", &meta.last_membership)?;
                *conn = fresh;
                Ok(())
            })
            .await
            .map_err(|_| StorageIOError::write_snapshot(Some(sig.clone()), &db_gone()))?;
        r.map_err(|e| StorageIOError::write_snapshot(Some(sig), &e))?;
        tracing::info!(snapshot = %meta_id(&self.dir), "installed tracker snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        self.load_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

fn meta_id(dir: &Path) -> String {
    std::fs::read(dir.join("snapshot.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<SnapshotFile>(&b).ok())
        .map(|f| f.meta.snapshot_id)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: Option<Vec<Entry<TypeConfig>>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_entries_are_served_only_while_all_are_held() {
        let mut r = Recent::default();
        assert_eq!(indexes(r.get(1, 2)), None);
        for i in 5..10 {
            r.push(blank(i), 10);
        }
        assert_eq!(indexes(r.get(5, 10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(r.get(7, 8)), Some(vec![7]));
        assert_eq!(indexes(r.get(4, 6)), None, "4 was never held");
        assert_eq!(indexes(r.get(9, 11)), None, "10 is not appended yet");
        // A truncation, then the new entries that replace it.
        r.truncate(8);
        assert_eq!(indexes(r.get(8, 9)), None);
        r.push(blank(8), 10);
        assert_eq!(indexes(r.get(5, 9)), Some(vec![5, 6, 7, 8]));
        // A purge forgets the front; an entry that does not follow starts anew.
        r.purge(6);
        assert_eq!(indexes(r.get(6, 8)), None);
        assert_eq!(indexes(r.get(7, 9)), Some(vec![7, 8]));
        r.push(blank(20), 10);
        assert_eq!(indexes(r.get(7, 8)), None);
        assert_eq!(indexes(r.get(20, 21)), Some(vec![20]));
        assert_eq!(r.bytes, 10);
        // Bounded by count.
        for i in 21..(21 + RECENT_ENTRIES as u64 + 10) {
            r.push(blank(i), 1);
        }
        assert_eq!(r.entries.len(), RECENT_ENTRIES);
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> SResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let log = LogStore::open(&dir.path().join("raft.db"))
                .map_err(|e| StorageIOError::write(&e))?;
            let sm = StateMachine::open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log and state machine storage.
    #[test]
    fn openraft_storage_suite() {
        if let Err(e) = Suite::test_all(Builder) {
            panic!("openraft storage suite: {e}");
        }
    }

    /// A log written by failsafe up to 9c22571: entries as JSON, no format
    /// number. Built by hand with that version's schema and rows.
    #[test]
    fn a_format_1_log_is_refused_in_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.db");
        let old = rusqlite::Connection::open(&path).expect("open");
        old.execute_batch(
            r#"
            CREATE TABLE log(idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
            CREATE TABLE raft_meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
            INSERT INTO log VALUES (1, CAST('{"log_id":{"leader_id":{"term":1,"node_id":7},"index":1},"payload":"Blank"}' AS BLOB));
            INSERT INTO raft_meta VALUES ('vote', CAST('{"leader_id":{"term":1,"node_id":7},"committed":true}' AS BLOB));
            "#,
        )
        .expect("format 1 log");
        drop(old);
        let Err(e) = LogStore::open(&path) else {
            panic!("a format 1 log opened")
        };
        assert!(
            matches!(e, OpenLogError::Format(LogFormatError { found: 1, .. })),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "raft log at {} is in format 1 (JSON entries, failsafe up to 9c22571); this fsd \
                 reads format 2 (protobuf entries); start from an empty data directory",
                path.display()
            )
        );
        // A fresh log is format 2, and opens again.
        let fresh = dir.path().join("fresh.db");
        drop(LogStore::open(&fresh).expect("new log"));
        let v: i64 = rusqlite::Connection::open(&fresh)
            .expect("open")
            .row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, LOG_FORMAT);
        LogStore::open(&fresh).expect("format 2 log");
    }
}
