//! The wire protocol of failsafe: generated message types and gRPC services,
//! plus the protocol version and the header every request carries.
//!
//! Metadata commands (`pb::Command`) are also the tracker's Raft log entries
//! (`pb::RaftEntry`), stored and sent as protobuf, so the log and the wire
//! speak one language and need no translation layer.

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("failsafe.v1");
}

/// The names states go by in status output and JSON: lowercase, stable, for
/// operators and their scripts.
macro_rules! labels {
    ($($module:ident: $t:ident { $($variant:ident => $label:literal),+ $(,)? })+) => {
        $(
            impl pb::$t {
                pub fn label(self) -> &'static str {
                    match self {
                        $(pb::$t::$variant => $label),+
                    }
                }
            }
        )+
        /// serde adapters for the enum fields of status messages (see build.rs).
        pub(crate) mod names {
            $(
                pub(crate) mod $module {
                    use serde::{Deserialize, Deserializer, Serializer};

                    use crate::pb::$t;

                    pub(crate) fn serialize<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
                        s.serialize_str($t::try_from(*v).map_or("unknown", $t::label))
                    }

                    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                        let name = String::deserialize(d)?;
                        [$($t::$variant),+]
                            .into_iter()
                            .find(|v| v.label() == name)
                            .map(|v| v as i32)
                            .ok_or_else(|| serde::de::Error::custom(format!("unknown state {name:?}")))
                    }
                }
            )+
        }
    };
}

labels! {
    host_liveness: HostLiveness { Unknown => "unknown", Up => "up", Down => "down" }
    host_admin_state: HostAdminState {
        Unspecified => "unspecified",
        Active => "active",
        Away => "away",
        Draining => "draining",
    }
    device_state: DeviceState { Unspecified => "unknown", Ok => "ok", Full => "full", Gone => "gone" }
    cluster_mode: ClusterMode { Unknown => "unknown", FailSafe => "fail-safe", Limp => "limp" }
}

/// Bumped whenever a change to the `.proto` files is not backward compatible.
/// 2: log entries may hold a `Batch` and extents inline data, which a
/// member speaking 1 would skip (unknown fields) and so apply differently
/// from the others. 3: `CommitExtents.truncate`, likewise. 4: `Revoke` and
/// `RegisterHost.key_id` (pinned host keys), likewise. 5: a change's mtime
/// and ctime never go back (a leader whose clock is behind the last one's),
/// which a member speaking 4 would apply differently. 6: `SetAttr`'s
/// `atime_now`/`mtime_now` (UTIME_NOW stamped by the leader). 7: special
/// files (`Create.kind`, `Create.rdev`), which a member speaking 6 would
/// apply as regular files, and extended attributes (`SetAttr.xattr`),
/// which it would skip. 8: the trash and snapshots (a deleted file kept,
/// `CreateSnapshot`), which a member speaking 7 would not apply alike.
pub const PROTOCOL_VERSION: u32 = 8;

/// The largest gRPC message a client or server accepts (a block is sent in
/// chunks well below this).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How big a file may be for a writer's read-back to carry its extents
/// (`MutateReply.extents`): a wiki page, not a large file or a long log
/// (each append to which would carry the whole log back, and make the
/// leader read all of it).
pub const READ_BACK_FILE_BYTES: u64 = 64 * 1024;

/// Inline bytes a listing page read ahead for a mount carries at most
/// (`ReadDir.extents`): half a message, so the page's names, attributes and
/// block references fit beside them.
pub const PREFETCH_INLINE_BYTES: usize = MAX_MESSAGE_BYTES / 2;

/// Inodes one `Revalidate` query may name at most.
pub const MAX_REVALIDATE: usize = 1024;

/// Response metadata key naming the leader's address on a NOT_LEADER refusal.
pub const LEADER_ADDR_KEY: &str = "x-failsafe-leader-addr";

/// The inodes `cmd` changes if it applies that the command itself names
/// (the directories it changes names in, the inode it changes): known
/// before it is applied. The tracker adds those found by name (an unlinked or replaced inode).
pub fn known_touched(cmd: &pb::Command) -> Vec<u64> {
    use pb::command::Op;
    let mut out = match &cmd.op {
        Some(Op::Create(c)) => vec![c.parent],
        Some(Op::Mkdir(c)) => vec![c.parent],
        Some(Op::Symlink(c)) => vec![c.parent],
        Some(Op::Link(c)) => vec![c.ino, c.new_parent],
        Some(Op::Unlink(c)) => vec![c.parent],
        Some(Op::Rmdir(c)) => vec![c.parent],
        Some(Op::Rename(c)) => vec![c.parent, c.new_parent],
        Some(Op::SetAttr(c)) => vec![c.ino],
        Some(Op::CommitExtents(c)) => vec![c.ino],
        // A delegate's flush: what each of its changes names.
        Some(Op::Batch(b)) => b.commands.iter().flat_map(known_touched).collect(),
        // Not ReplaceInline: the blockifier's change keeps a file's bytes,
        // attributes and version, so what a lease holder cached of it
        // (inline extents included: the same bytes) stays true.
        _ => Vec::new(),
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// `data` at `offset` as an extent carried inside the log entry (inline).
pub fn inline_extent(offset: u64, data: &[u8]) -> pb::Extent {
    pb::Extent {
        offset,
        length: data.len() as u64,
        data: data.to_vec(),
        ..Default::default()
    }
}

/// A read of a whole file's extents, as an open asks for them.
pub fn whole_file(ino: u64) -> pb::ReadExtents {
    pb::ReadExtents {
        ino,
        offset: 0,
        length: u64::MAX >> 4,
    }
}

pub fn header(cluster_id: &str) -> pb::Header {
    pb::Header {
        cluster_id: cluster_id.to_string(),
        protocol_version: PROTOCOL_VERSION,
    }
}

/// Checks the header of an incoming request against this host's cluster.
/// A host not yet in a cluster (`cluster_id` empty) refuses everything but
/// what the caller handles itself.
pub fn check_header(h: Option<&pb::Header>, cluster_id: &str) -> Result<(), tonic::Status> {
    let h = h.ok_or_else(|| tonic::Status::invalid_argument("request without a header"))?;
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(tonic::Status::failed_precondition(format!(
            "protocol version {} is not spoken here (this host speaks {PROTOCOL_VERSION})",
            h.protocol_version
        )));
    }
    if cluster_id.is_empty() {
        return Err(tonic::Status::failed_precondition(
            "this host is not part of a cluster yet",
        ));
    }
    if h.cluster_id != cluster_id {
        return Err(tonic::Status::permission_denied(format!(
            "request for cluster {:?}, but this host belongs to cluster {cluster_id:?}",
            h.cluster_id
        )));
    }
    Ok(())
}

/// A refusal that tells the client where the leader is.
pub fn not_leader(leader_addr: Option<&str>) -> tonic::Status {
    let mut status = tonic::Status::unavailable("not the tracker leader");
    if let Some(addr) = leader_addr {
        if let Ok(v) = addr.parse() {
            status.metadata_mut().insert(LEADER_ADDR_KEY, v);
        }
    }
    status
}
