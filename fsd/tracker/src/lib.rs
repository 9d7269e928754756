//! The tracker: failsafe's metadata service. Every fsd runs a member; the
//! members form one Raft group (openraft) whose log and state machine live in
//! SQLite. A one-host cluster is a group of one: there is no second code path.
//!
//! Only `state::apply`, run by the Raft state machine, changes metadata.
//! Reads are linearizable (openraft's ReadIndex: the leader confirms its
//! leadership with a quorum, then answers from its applied state) unless the
//! caller asks for a member's local view.

pub mod db;
mod network;
mod node;
pub mod raft;
mod service;
pub mod state;

pub use network::Network;
pub use node::{ClusterId, Tracker, TrackerConfig, TrackerError};
pub use service::{MetadataService, RaftService};
