//! The tracker's own reserve of disk space (review B3). A full disk under
//! raft.db or meta.db stops openraft for good; so the tracker's directory
//! holds a file of `bytes` zeros, `reserve`, that nothing else can take.
//! When the disk fills up anyway (another program, the logs, a block
//! device on the same filesystem) the reserve is released: the tracker
//! keeps room for what must go on (votes, heartbeats, deletes, sessions,
//! locks) while, as leader, it refuses changes that add metadata
//! (ENOSPC to the application) and hands leadership to a member with room
//! ([`failsafe_tracker::Tracker::set_space_low`]). Once there is room for
//! it again, the reserve is put back and writes resume.
//!
//! The rule, with `free` what the filesystem has left: with the reserve in
//! place the disk is *low* when `free < bytes`; without it, while
//! `free < 2 × bytes`; the reserve is put back once `free >= 2 × bytes`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use failsafe_tracker::Tracker;

use crate::worker::{Worker, WorkerState};

const FILE: &str = "reserve";

/// Whether the disk under `dir` is low, releasing the reserve if it is
/// (before the tracker opens, too: a restart on a full disk needs the room
/// to open its databases).
pub(crate) fn keep(dir: &Path, bytes: u64) -> anyhow::Result<bool> {
    if bytes == 0 {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(FILE);
    let held = std::fs::metadata(&path).map_or(0, |m| m.len());
    let (_, free) =
        failsafe_blockstore::fs_space(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let low = if held >= bytes {
        free < bytes
    } else {
        free < 2 * bytes
    };
    if low && held > 0 {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        tracing::warn!(
            free_bytes = free,
            reserve_bytes = held,
            "the disk under the tracker is nearly full: its reserve is released"
        );
    } else if !low && held < bytes && free >= 2 * bytes {
        write_zeros(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(
            reserve_bytes = bytes,
            "the tracker's disk reserve is in place"
        );
    }
    Ok(low)
}

fn write_zeros(path: &Path, bytes: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let chunk = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The `tracker-reserve` worker: [`keep`] every second, telling the
/// tracker, and as a leader on a low disk, handing leadership to a voter
/// with room.
pub(crate) struct TrackerReserve {
    pub tracker: Arc<Tracker>,
    pub dir: PathBuf,
    pub bytes: u64,
    pub state: WorkerState,
}

impl Worker for TrackerReserve {
    fn name(&self) -> &'static str {
        "tracker-reserve"
    }

    fn state(&self) -> Option<&WorkerState> {
        Some(&self.state)
    }

    async fn step(&self) -> anyhow::Result<Duration> {
        let low = keep(&self.dir, self.bytes)?;
        self.tracker.set_space_low(low);
        if !low {
            self.state.set("room");
            return Ok(Duration::from_secs(1));
        }
        self.state
            .set("disk nearly full: refusing changes that add metadata");
        for to in self.tracker.other_voters() {
            match self.tracker.hand_over(to).await {
                Ok(done) => {
                    tracing::warn!(
                        to = format!("{:016x}", done.to),
                        "tracker leadership handed over: the disk under this member's tracker is nearly full"
                    );
                    break;
                }
                Err(e) => {
                    tracing::info!(to = format!("{to:016x}"), error = %e, "no hand-over for a full disk to this voter")
                }
            }
        }
        Ok(Duration::from_secs(1))
    }
}
