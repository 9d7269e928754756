//! The Neon-style log check: a run fails on ERROR lines it did not expect.
//!
//! The binaries log with `tracing`'s default format, without colours when
//! the output is a file, so an ERROR line has `ERROR` right after its
//! timestamp. A panic counts as an error too.

use std::path::Path;

use anyhow::bail;

/// ERROR lines openraft writes whenever a peer is killed, frozen or cut off:
/// a peer it cannot reach, one that does not answer in time, a connection
/// cut mid-call (which HTTP/2 may report as a transport or a protocol
/// error, and over TLS also as a cancelled operation). Tests kill and freeze hosts on purpose (and drop their clusters
/// with SIGKILL), so these are expected everywhere.
pub fn expected_by_openraft(line: &str) -> bool {
    line.contains("Unreachable node")
        || line.contains("err=timeout after")
        // A vote or heartbeat to a frozen peer, as openraft's core logs it.
        || (line.contains("openraft::") && line.contains("error=timeout after"))
        || (line.contains("openraft::")
            && (line.contains("transport error")
                || line.contains("h2 protocol error")
                || line.contains("operation was canceled")))
}

/// The ERROR line fuser writes when the kernel no longer waits for the
/// request a reply answers (ENOENT: the request was interrupted, or its
/// connection aborted by an unmount while the reply was on its way). Seen at
/// a test's teardown under load, when the mount is stopped while a request
/// is in flight; nothing is lost by it.
pub fn expected_from_fuser(line: &str) -> bool {
    line.contains("fuser::reply: Failed to send FUSE reply: No such file or directory")
}

/// Whether `line` is a log line at ERROR level (the field after the
/// timestamp), or a panic's message.
pub fn is_error(line: &str) -> bool {
    line.split_whitespace().nth(1) == Some("ERROR") || line.contains("' panicked at ")
}

/// The ERROR lines of `text` that neither openraft's expected ones nor any
/// of the `allowed` substrings match.
pub fn unexpected_errors<'a>(text: &'a str, allowed: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| is_error(l) && !expected_by_openraft(l) && !expected_from_fuser(l))
        .filter(|l| !allowed.iter().any(|a| l.contains(a)))
        .collect()
}

/// Fails with the first unexpected ERROR line (and its file) of any of
/// `logs`; a log that does not exist (yet) has none.
pub fn check<'p>(logs: impl IntoIterator<Item = &'p Path>, allowed: &[&str]) -> anyhow::Result<()> {
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = unexpected_errors(&text, allowed).first() {
            bail!("unexpected error in {}: {line}", log.display());
        }
    }
    Ok(())
}

/// The last `n` lines of the file at `path` (empty if it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unexpected_error_lines_are_reported() {
        let log = "\
2025-01-01T00:00:00Z  INFO fsd: started
2025-01-01T00:00:01Z ERROR openraft::replication: transport error: connection reset
2025-01-01T00:00:02Z ERROR openraft::network: Unreachable node 3
2025-01-01T00:00:02Z ERROR openraft::core::raft_core: timeout error=timeout after 350ms when Vote 1->2 target=2
2025-01-01T00:00:02Z ERROR openraft::replication: RPCError err=NetworkError: 127.0.0.1:1: h2 protocol error: http2 error
2025-01-01T00:00:02Z ERROR fuser::reply: Failed to send FUSE reply: No such file or directory (os error 2)
2025-01-01T00:00:03Z ERROR failsafe_fsd::repair: corrupt block quarantined
2025-01-01T00:00:04Z ERROR failsafe_fsd::server: something broke
2025-01-01T00:00:05Z  WARN failsafe_fsd::server: an ERROR in a message at WARN
thread 'tokio-runtime-worker' panicked at fsd/daemon/src/server.rs:1:1:";
        assert_eq!(
            unexpected_errors(log, &["quarantined", "panicked"]),
            vec!["2025-01-01T00:00:04Z ERROR failsafe_fsd::server: something broke"]
        );
        assert_eq!(unexpected_errors(log, &["quarantined", "broke"]).len(), 1);
        assert_eq!(unexpected_errors(log, &[]).len(), 3);
    }
}
