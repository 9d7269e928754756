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

pub(crate) fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // FULL: a commit is on disk before it returns. The Raft log promises a vote
    // and appended entries are durable before it answers; the state machine
    // records `last_applied` with every effect, so they never disagree.
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;",
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}
