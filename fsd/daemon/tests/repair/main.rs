//! Self-repair against real clusters: a host that was down while blocks
//! were written gets its copies once it is back; a copy found corrupt on
//! read, or by the scrub where nobody reads it, is quarantined, forgotten
//! and rebuilt; a replaced disk's blocks are rebuilt at once; copies beyond
//! the copy count are trimmed; blocks nothing references any more are
//! garbage-collected after the grace period.
//!
//! One test binary in three files: `healing` (t60–t66: down, dead, corrupt,
//! replaced, trimmed, collected), `migration` (t67–t71: deltas, shipping,
//! draining, rebalancing onto a new box) and the helpers they share.

#[path = "../common/mod.rs"]
mod common;
mod healing;
mod helpers;
mod migration;
