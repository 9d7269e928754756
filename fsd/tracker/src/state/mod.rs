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
mod namespace;
mod query;
mod schema;
mod sessions;
#[cfg(test)]
mod testing;

use failsafe_core::validate_name;
use failsafe_proto::pb::ErrorCode;

pub(crate) use apply::{apply, validate};
pub use health::ReplicationCounts;
pub(crate) use health::{
    copies_on, device_space, garbage, over_replicated, recorded, referenced_after,
    repair_candidates, replication_counts,
};
pub(crate) use hosts::{delta_base, devices, host_states, hosts, ship_risk};
pub(crate) use query::{counts, query};
pub(crate) use schema::SCHEMA;
pub(crate) use sessions::anything_expired;

/// A command that was refused; its partial effects are rolled back.
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

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        // The state machine's database failing is not something a command can
        // cause; the caller treats it as fatal (see `Failure`).
        OpError::new(ErrorCode::ErrorUnspecified, format!("database: {e}"))
    }
}

type OpResult<T> = Result<T, OpError>;

fn err<T>(code: ErrorCode, message: impl Into<String>) -> OpResult<T> {
    Err(OpError::new(code, message))
}

fn check_name(name: &[u8]) -> OpResult<()> {
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
