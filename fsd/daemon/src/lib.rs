//! fsd, the storage daemon of one host, and the pieces `fsctl` shares with it.
//!
//! One process is at once a tracker member (Raft + SQLite metadata), a block
//! store for its devices, and a gRPC server for both, with `/metrics` on the
//! same port. `run` takes its listener and a shutdown signal from the caller,
//! so tests bind port 0 and stop it cleanly.

mod admin;
mod announce;
mod blocks;
mod cluster;
pub mod config;
mod gc;
mod identity;
mod lock;
mod metrics;
mod pace;
mod repair;
mod returning;
mod scrub;
mod server;
mod worker;

pub use config::{Config, RawConfig};
pub use server::run;
