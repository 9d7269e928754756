//! The client library's one error type: a refusal the tracker answered, a
//! cluster that could not be reached in time, or bad input; the mount maps
//! each to one errno.

use failsafe_proto::pb::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The tracker refused the operation (ENOENT, EEXIST, …): a clean answer.
    #[error("{message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    /// No tracker member answered in time, or none could take the request
    /// (no leader, no majority).
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A member answered but refused the request itself (wrong cluster,
    /// protocol version, malformed request).
    #[error("request rejected by {addr}: {status}")]
    Rejected { addr: String, status: tonic::Status },
    /// Fewer devices than the write quorum stored a block.
    #[error("block write reached {acked} of the {needed} copies it needs: {last_error}")]
    Quorum {
        acked: usize,
        needed: usize,
        last_error: String,
    },
    /// No copy of a block could be read intact.
    #[error("block {hash} unreadable from every copy: {last_error}")]
    BlockUnreadable { hash: String, last_error: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// This client's credential was refused (or it refused a member's):
    /// no retry helps; the message says why and what to check.
    #[error("{0}")]
    Credential(String),
}

impl ClientError {
    /// The tracker's error code, if the tracker refused the operation.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether a change may have applied although no answer came: no
    /// member answered in time. Anything else is a clean answer: refused,
    /// rejected, or failed before the change was sent.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }

    /// Whether a change that must not apply twice (an append) is to be
    /// sent again as it was, under its operation id, rather than taken
    /// back: its outcome is unknown, or a leader refused it before its log
    /// for want of disk space (NO_SPACE), which says nothing of an earlier
    /// attempt of the same command that a deposed leader may have applied.
    pub fn retry_verbatim(&self) -> bool {
        self.outcome_unknown() || self.code() == Some(ErrorCode::NoSpace)
    }
}
