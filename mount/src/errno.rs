//! The one mapping from client errors to errno.

use failsafe_client::{pb::ErrorCode, ClientError};
use fuser::Errno;

pub(crate) fn errno(e: &ClientError) -> Errno {
    match e {
        ClientError::Refused { code, .. } => match code {
            ErrorCode::NotFound => Errno::ENOENT,
            ErrorCode::Exists => Errno::EEXIST,
            ErrorCode::NotDir => Errno::ENOTDIR,
            ErrorCode::IsDir => Errno::EISDIR,
            ErrorCode::NotEmpty => Errno::ENOTEMPTY,
            ErrorCode::Invalid | ErrorCode::Loop => Errno::EINVAL,
            ErrorCode::NameTooLong => Errno::ENAMETOOLONG,
            ErrorCode::WouldBlock => Errno::EAGAIN,
            ErrorCode::NoSpace => Errno::ENOSPC,
            ErrorCode::NoData => Errno::ENODATA,
            ErrorCode::NotPermitted => Errno::EPERM,
            // Changed and InlineFull are answers to the blockifier and to
            // the client library, which handle them; never a caller's.
            // A write-behind flush the mount could not make: it says so.
            ErrorCode::NoSession
            | ErrorCode::DelegationLost
            | ErrorCode::Changed
            | ErrorCode::InlineFull
            | ErrorCode::ErrorUnspecified => Errno::EIO,
        },
        ClientError::Invalid(_) => Errno::EINVAL,
        ClientError::Credential(_) => Errno::EACCES,
        ClientError::Rejected { status, .. } if status.code() == tonic::Code::PermissionDenied => {
            Errno::EACCES
        }
        ClientError::Unavailable(_)
        | ClientError::Rejected { .. }
        | ClientError::Quorum { .. }
        | ClientError::BlockUnreadable { .. } => Errno::EIO,
    }
}
