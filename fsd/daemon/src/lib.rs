//! fsd, the storage daemon of one host, as a library the `fsd` binary runs.
//! (`fsctl`, the other binary of this crate, uses only `status_text`, so
//! it words a status as the status page does: it speaks to fsd through
//! `failsafe-client`.)
//!
//! One process is at once a tracker member (Raft + SQLite metadata), a block
//! store for its devices, and a gRPC server for both, with `/metrics` on the
//! same port. `run` takes its listener and a shutdown signal from the caller:
//! the binary binds the configured address (port 0 picks a free one, written
//! to `fsd.addr` in the data dir) and stops on SIGTERM or Ctrl-C.

mod admin;
mod announce;
mod auth;
mod blockify;
mod blocks;
mod cluster;
pub mod config;
mod gc;
mod health;
mod identity;
pub mod kept_cmd;
mod lock;
mod metrics;
mod pace;
mod placement;
mod repair;
mod reserve;
mod returning;
mod scrub;
mod server;
mod status_page;
pub mod status_text;
mod worker;

pub use config::{Config, RawConfig};
pub use server::run;
