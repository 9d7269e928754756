//! The tracker: failsafe's metadata service. Every fsd runs a member; the
//! members form one Raft group (openraft) whose log and state machine live in
//! SQLite. A one-host cluster is a group of one: there is no second code path.
//!
//! Only `state::apply`, run by the Raft state machine, changes metadata.
//! Reads are linearizable unless the caller asks for a member's local view:
//! the leader answers under its lease (a quorum acknowledged it within half
//! the election timeout) or after confirming leadership with a quorum
//! (openraft's `ensure_linearizable`); a follower asks the leader for that
//! read index, waits until it has applied it, and answers itself.

mod codec;
mod db;
mod network;
mod node;
mod raft;
mod service;
mod state;

pub use node::{
    wall_clock_ns, ClusterId, GroupCounts, HandedOver, KeyBook, LeaderSnapshot, Liveness,
    RepairView, Tracker, TrackerConfig, TrackerError, CLOCK_WARN_MS,
};
pub use raft::{LogFormatError, NodeId, Raft, TypeConfig};
pub use service::{MetadataService, RaftService};
pub use state::ReplicationCounts;
