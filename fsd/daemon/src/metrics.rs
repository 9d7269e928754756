//! Counters for `/metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub block_puts: AtomicU64,
    pub block_put_bytes: AtomicU64,
    pub block_gets: AtomicU64,
    pub block_get_bytes: AtomicU64,
    pub block_corrupt: AtomicU64,
    pub block_errors: AtomicU64,
}

pub fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl Metrics {
    pub fn render(&self, out: &mut String) {
        let rows = [
            ("failsafe_block_puts_total", "Blocks stored", &self.block_puts),
            ("failsafe_block_put_bytes_total", "Bytes of blocks stored", &self.block_put_bytes),
            ("failsafe_block_gets_total", "Blocks served", &self.block_gets),
            ("failsafe_block_get_bytes_total", "Bytes of blocks served", &self.block_get_bytes),
            ("failsafe_block_corrupt_total", "Blocks found corrupt on read and quarantined", &self.block_corrupt),
            ("failsafe_block_errors_total", "Block requests that failed", &self.block_errors),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

pub fn gauge(out: &mut String, name: &str, help: &str, labels: &str, value: impl std::fmt::Display) {
    if !out.contains(&format!("# HELP {name} ")) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    }
    let _ = writeln!(out, "{name}{labels} {value}");
}
