//! The metadata state machine: the SQLite schema and the one function that
//! changes it, `apply`, plus the read-only queries.
//!
//! Only `apply` mutates metadata, and it is deterministic: every input it uses
//! (times, ids) is in the command, so every tracker member computes the same
//! database from the same log.
//!
//! By job: `schema` (the tables), `apply` (validate, then dispatch each
//! operation to one function in `namespace`, `blocks`, `hosts` or
//! `sessions`), `query` (client queries), `hosts` (host states, ship risk,
//! delta lineage) and `health` (what repair, trimming and garbage collection
//! scan for).

mod apply;
mod blocks;
mod health;
mod hosts;
mod kept;
mod namespace;
mod query;
mod schema;
mod sessions;
#[cfg(test)]
mod testing;

use failsafe_core::validate_name;
use failsafe_proto::pb::ErrorCode;

pub(crate) use apply::{apply, changed_names, validate};
pub(crate) use blocks::old_inline;
pub(crate) use failsafe_proto::known_touched;
pub use health::ReplicationCounts;
pub(crate) use health::{
    copies_on, device_space, garbage, over_replicated, recorded, referenced_after,
    repair_candidates, replication_counts,
};
pub(crate) use hosts::{
    admin_state, delta_base, devices, host_states, hosts, key_book, ship_risk, HostStates,
};
pub(crate) use kept::{kept_counts, trash_due};
pub(crate) use namespace::inside;
pub(crate) use query::{counts, query, read_back};
pub(crate) use schema::{check_snapshot, migrate};
pub(crate) use sessions::{all_sessions, anything_expired, SessionRow};

/// A command or query that was refused: the client's mistake or a lost race
/// (no such entry, not empty, lock held). A refused command's partial
/// effects are rolled back; the client is told why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl OpError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> OpError {
        OpError {
            code,
            message: message.into(),
        }
    }
}

/// Why a command was not applied, or a query not answered. A refusal is an
/// answer, and the other commands of its batch go on; a database fault is
/// nothing a command can cause, and stops the batch (its transaction rolls
/// back, and openraft treats the storage error as fatal). Two variants, so
/// one cannot pass for the other.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("refused ({:?}): {}", .0.code, .0.message)]
    Refused(OpError),
    #[error("state machine database: {0}")]
    Db(#[from] rusqlite::Error),
}

impl From<OpError> for ApplyError {
    fn from(e: OpError) -> Self {
        ApplyError::Refused(e)
    }
}

type OpResult<T> = Result<T, ApplyError>;

/// A refusal, as the error of whichever result type the caller returns.
fn err<T, E: From<OpError>>(code: ErrorCode, message: impl Into<String>) -> Result<T, E> {
    Err(OpError::new(code, message).into())
}

fn check_name(name: &[u8]) -> Result<(), OpError> {
    validate_name(name).map_err(|e| {
        let code = match e {
            failsafe_core::NameError::TooLong(_) => ErrorCode::NameTooLong,
            _ => ErrorCode::Invalid,
        };
        OpError::new(code, e.to_string())
    })
}

// SQLite integers are i64; ids and sizes are u64 on the wire. They round-trip
// through `as` casts unchanged (two's complement), and no SQL compares them.
fn i(v: u64) -> i64 {
    v as i64
}
