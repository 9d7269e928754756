//! The async/sync seam for SQLite: each database is owned by one thread, and
//! async code sends it closures. rusqlite's `Connection` is not `Sync`, and
//! running its blocking calls on that thread keeps them off the tokio workers.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

#[derive(Debug, thiserror::Error)]
#[error("the database thread has stopped")]
pub(crate) struct DbGone;

#[derive(Clone)]
pub(crate) struct Db {
    jobs: mpsc::Sender<Job>,
}

impl Db {
    /// Hands `conn`, already opened and set up, to a thread named `name`.
    pub(crate) fn spawn(name: &str, mut conn: Connection) -> rusqlite::Result<Db> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Db { jobs })
    }

    /// Runs `f` on the database thread and waits for its result.
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> Result<T, DbGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| DbGone)?;
        rx.await.map_err(|_| DbGone)
    }
}

/// When a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Before the commit returns (an fsync per commit). The Raft log: it
    /// promises that a vote and appended entries are durable before it
    /// answers.
    Commit,
    /// At the next checkpoint; a crash of the machine (not of the process)
    /// may lose the last commits. The state machine: it is rebuilt from the
    /// log, which is the durable copy — it records `last_applied` with every
    /// effect, so after such a crash it re-applies from where it really is.
    /// Anything the log is about to forget must be checkpointed first
    /// (`StateMachine::build_snapshot`).
    Checkpoint,
}

pub(crate) fn open_connection(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    let synchronous = match durability {
        Durability::Commit => "FULL",
        Durability::Checkpoint => "NORMAL",
    };
    // Exclusive: this process is the database's only user, so SQLite takes
    // its file lock once and keeps the WAL index in its own memory, instead
    // of locking and unlocking the file around every transaction (fourteen
    // fcntl calls per metadata commit on the leader). A second fsd on the
    // same data directory finds it locked.
    conn.execute_batch(&format!(
        "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL; \
         PRAGMA synchronous={synchronous}; PRAGMA foreign_keys=OFF;"
    ))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // One plan per statement whatever its parameters: otherwise SQLite
    // marks some parameters (a LIMIT, a range bound) as worth planning for
    // again, and re-prepares the cached statement at each new value (a
    // tenth of the leader's state-machine thread under page saves).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// `execute` and `query_row` through the connection's statement cache: the
/// state machine runs the same few statements for every command, and
/// SQLite's parser had been a third of its thread's time.
pub(crate) trait CachedSql {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl CachedSql for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Statements a connection keeps prepared (rusqlite's default is 16; the
/// state machine alone runs more than that).
pub(crate) const STATEMENT_CACHE: usize = 256;
