//! The pure domain of failsafe: what a valid name is, where copies of a block
//! go, how many acknowledgements make a write durable, how extents overlay,
//! which copies repair makes and which extra copies it trims, and how a
//! host's liveness and administrative state decide what its copies are worth,
//! and which zone the tracker leader should be in.
//!
//! Nothing here does I/O, reads the clock or draws random numbers: placement
//! is a function of the block hash and the layout, so every tracker member
//! and every test computes the same answer.

pub mod delta;
pub mod extent;
pub mod health;
pub mod leadership;
pub mod lease;
pub mod name;
pub mod placement;
pub mod repair;

pub use extent::{overlay, Extent, Inline};
pub use health::{judge, AdminState, Judgement, Liveness};
pub use leadership::{validate_zone, LeaderPolicy, ZoneError};
pub use name::{validate_name, NameError, MAX_NAME_BYTES};
pub use placement::{is_full, place, place_more, reserve_bytes, Candidate, ReplicationClass};
pub use repair::{
    plan_rebalance, plan_repair, plan_trim, BlockView, DeviceView, HostHealth, RepairAction,
    TrimAction,
};

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;

/// Largest block the client writes and a block store accepts.
pub const MAX_BLOCK_BYTES: usize = 4 * 1024 * 1024;

/// Most bytes one metadata command may carry inline (in its extents): a
/// commit of at most this much data travels in the Raft entry instead of
/// in blocks.
pub const MAX_INLINE_BYTES: usize = 64 * 1024;

/// Most inline bytes one file may hold, all its inline extents together:
/// bounds what a read of the file's extents returns while the blockifier
/// has not caught up with a busy writer. A commit past it is refused
/// (`INLINE_FULL`) and the client sends its data as blocks.
pub const MAX_FILE_INLINE_BYTES: u64 = 1024 * 1024;

/// Length of a block hash (BLAKE3).
pub const HASH_LEN: usize = 32;

/// The name of a block: the BLAKE3 hash of its bytes.
pub fn block_hash(data: &[u8]) -> [u8; HASH_LEN] {
    *blake3::hash(data).as_bytes()
}

/// A hash received from outside, checked for length.
pub fn parse_hash(bytes: &[u8]) -> Option<[u8; HASH_LEN]> {
    bytes.try_into().ok()
}

pub fn hash_hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}
