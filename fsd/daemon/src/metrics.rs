//! Counters for `/metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Metrics {
    pub block_puts: AtomicU64,
    pub block_put_bytes: AtomicU64,
    pub block_gets: AtomicU64,
    pub block_get_bytes: AtomicU64,
    pub block_corrupt: AtomicU64,
    pub block_errors: AtomicU64,
    /// Copies the repair worker on this host made, and their bytes.
    pub repair_blocks: AtomicU64,
    pub repair_bytes: AtomicU64,
    /// Copies it attempted that did not land.
    pub repair_failures: AtomicU64,
    /// Copy records dropped because the copy was missing or corrupt.
    pub copies_dropped: AtomicU64,
    /// Blocks below their copy count, as this host last judged them while
    /// it led the tracker.
    pub under_replicated: AtomicU64,
    /// Hosts with devices that do not answer (down or dead), likewise.
    pub hosts_down: AtomicU64,
    /// Copy records beyond the copy count dropped by repair on this host.
    pub copies_trimmed: AtomicU64,
    /// Bytes re-hashed by scrub, copies it found corrupt, passes finished.
    pub scrub_bytes: AtomicU64,
    pub scrub_corrupt: AtomicU64,
    pub scrub_passes: AtomicU64,
    /// Unreferenced blocks whose records this host (as leader) dropped.
    pub gc_forgotten: AtomicU64,
    /// Block files deleted on this host (garbage, trimmed copies), and bytes.
    pub gc_files_deleted: AtomicU64,
    pub gc_bytes_deleted: AtomicU64,
    /// Blocks stored here by applying a delta to an older block, and the
    /// delta bytes received for them.
    pub delta_puts: AtomicU64,
    pub delta_put_bytes: AtomicU64,
    /// Copies repair on this host made as deltas, the delta bytes sent and
    /// the signature bytes fetched for them.
    pub repair_delta_blocks: AtomicU64,
    pub repair_delta_bytes: AtomicU64,
    pub repair_signature_bytes: AtomicU64,
    /// Copies repair on this host made to move blocks toward placement.
    pub rebalance_copies: AtomicU64,
    /// Inline extents the blockifier on this host (as leader) replaced by
    /// blocks, their bytes, and replacements refused because the extent
    /// had been written again.
    pub blockify_extents: AtomicU64,
    pub blockify_bytes: AtomicU64,
    pub blockify_changed: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Metrics {
    pub(crate) fn render(&self, out: &mut String) {
        let rows = [
            ("failsafe_block_puts_total", "Blocks stored", &self.block_puts),
            ("failsafe_block_put_bytes_total", "Bytes of blocks stored", &self.block_put_bytes),
            ("failsafe_block_gets_total", "Blocks served", &self.block_gets),
            ("failsafe_block_get_bytes_total", "Bytes of blocks served", &self.block_get_bytes),
            ("failsafe_block_corrupt_total", "Blocks found corrupt on read and quarantined", &self.block_corrupt),
            ("failsafe_block_errors_total", "Block requests that failed", &self.block_errors),
            ("failsafe_repair_blocks_total", "Block copies made by repair on this host", &self.repair_blocks),
            ("failsafe_repair_bytes_total", "Bytes of block copies made by repair on this host", &self.repair_bytes),
            ("failsafe_repair_failures_total", "Block copies repair attempted that did not land", &self.repair_failures),
            ("failsafe_copies_dropped_total", "Copy records dropped as missing or corrupt", &self.copies_dropped),
            (
                "failsafe_copies_trimmed_total",
                "Copy records beyond the copy count dropped by repair on this host",
                &self.copies_trimmed,
            ),
            ("failsafe_scrub_bytes_total", "Bytes of blocks re-read and re-hashed by scrub", &self.scrub_bytes),
            ("failsafe_scrub_corrupt_total", "Copies scrub found corrupt and quarantined", &self.scrub_corrupt),
            ("failsafe_scrub_passes_total", "Scrub passes over this host's devices finished", &self.scrub_passes),
            (
                "failsafe_gc_blocks_forgotten_total",
                "Unreferenced blocks whose records this host dropped as leader",
                &self.gc_forgotten,
            ),
            (
                "failsafe_gc_files_deleted_total",
                "Block files deleted on this host (garbage, trimmed copies)",
                &self.gc_files_deleted,
            ),
            ("failsafe_gc_bytes_deleted_total", "Bytes of block files deleted on this host", &self.gc_bytes_deleted),
            ("failsafe_delta_puts_total", "Blocks stored by applying a delta to an older block", &self.delta_puts),
            ("failsafe_delta_put_bytes_total", "Delta bytes received for blocks stored from deltas", &self.delta_put_bytes),
            ("failsafe_repair_delta_blocks_total", "Copies repair on this host made as deltas", &self.repair_delta_blocks),
            ("failsafe_repair_delta_bytes_total", "Delta bytes repair on this host sent", &self.repair_delta_bytes),
            (
                "failsafe_rebalance_copies_total",
                "Copies repair on this host made to move blocks toward placement (a new box's share)",
                &self.rebalance_copies,
            ),
            (
                "failsafe_blockify_extents_total",
                "Inline extents this host (as leader) replaced by blocks",
                &self.blockify_extents,
            ),
            ("failsafe_blockify_bytes_total", "Inline bytes this host (as leader) stored as blocks", &self.blockify_bytes),
            (
                "failsafe_blockify_changed_total",
                "Inline replacements refused because the extent was written again",
                &self.blockify_changed,
            ),
            (
                "failsafe_repair_signature_bytes_total",
                "Signature bytes repair on this host fetched for deltas",
                &self.repair_signature_bytes,
            ),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

pub(crate) fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &str,
    value: impl std::fmt::Display,
) {
    if !out.contains(&format!("# HELP {name} ")) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    }
    let _ = writeln!(out, "{name}{labels} {value}");
}
