//! Locking a std `Mutex` whatever happened to a previous holder.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking it over if a thread panicked while holding it: the
/// daemon's std Mutexes guard cursors, queues and counters that are whole
/// after every assignment, so a panic elsewhere leaves nothing half-written.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
