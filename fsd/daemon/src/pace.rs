//! A bandwidth cap shared by the workers that move or read blocks in the
//! background (repair, scrub), so they never crowd out client traffic.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::lock::lock;

/// Spreads transfers so that they average at most `rate` bytes a second.
/// Idle time earns no credit: a burst after a pause is paced like any other.
pub(crate) struct Pacer {
    rate: u64,
    /// When the next transfer may start. A std Mutex: held for arithmetic.
    next: Mutex<Instant>,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Pacer {
        Pacer {
            rate: rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for a slot for `bytes`, reserving the time they take at the cap.
    pub(crate) async fn take(&self, bytes: u64) {
        let start = {
            let mut next = lock(&self.next);
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_holds_transfers_to_the_cap() {
        tokio::time::pause();
        let p = Pacer::new(1000);
        let start = Instant::now();
        p.take(500).await;
        p.take(500).await;
        p.take(500).await;
        // The third 500-byte transfer may start only after 1000 bytes' time.
        assert!(
            start.elapsed() >= Duration::from_millis(999),
            "{:?}",
            start.elapsed()
        );
    }
}
