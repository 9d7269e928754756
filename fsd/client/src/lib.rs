//! The client library of failsafe, used by `fsctl`, `mount.failsafe`, `fsd`
//! itself (its workers' way to the rest of the cluster), the test rig
//! (`failsafe-harness`) and `failsafe-chaos`.
//!
//! Metadata requests go to the tracker leader, found by following leader hints
//! and by trying every known member; every RPC has a deadline, and a mutation
//! keeps its operation id across retries so the tracker applies it at most
//! once. Block writes go to the devices the tracker chose and succeed once the
//! write quorum has fsynced them; block reads verify the hash and fall back to
//! the next copy on timeout, error or corruption.

mod admin;
mod blocks;
mod error;
mod leases;
mod meta;
mod net;
pub mod stats;

pub use admin::{admin_at, admin_for};
pub use blocks::{inline_bytes, malformed_inline, Commit, PreparedCommit};
pub use error::ClientError;
pub use failsafe_proto::{pb, whole_file};
pub use leases::{Cached, Dropped, Leased};
pub use meta::{Behind, LockRequest, Session};
pub use net::{Client, ClientConfig};
pub use stats::{measure, OpCost, Outcome, RpcKind, RpcSnapshot};
