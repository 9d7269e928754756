//! How Raft entries and messages are encoded, in the log database and
//! between members (format 2).
//!
//! The application's data is protobuf: an entry is a `pb::RaftEntry` whose
//! command is the `pb::Command` clients send, and snapshot data is raw
//! bytes. openraft's own bookkeeping (votes, log ids, membership, snapshot
//! metadata, responses) stays JSON of openraft's serde types: they have no
//! protobuf definition, carry no file metadata, and openraft owns their
//! shape. A log entry's id is spelled out in protobuf so reading the log
//! never needs JSON except for the rare membership entry.
//!
//! Format 1 (failsafe up to 9c22571) stored and sent whole entries as JSON:
//! log compatibility followed Rust field names rather than proto field
//! numbers, and block hashes became arrays of numbers.

use failsafe_proto::pb::{self, raft_entry::Payload};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use prost::Message;

use crate::raft::TypeConfig;

/// The first commit that no longer speaks format 1, for error messages.
pub(crate) const FORMAT_1_UP_TO: &str = "failsafe up to 9c22571";

#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("protobuf: {0}")]
    Proto(#[from] prost::DecodeError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a log entry without a payload")]
    NoPayload,
    #[error(
        "a raft message in format 1 (JSON, {FORMAT_1_UP_TO}); this member speaks format 2 \
         (protobuf): run the same fsd on every member"
    )]
    Format1,
}

pub(crate) fn entry_to_pb(e: Entry<TypeConfig>) -> Result<pb::RaftEntry, CodecError> {
    let payload = match e.payload {
        EntryPayload::Blank => Payload::Blank(pb::Empty {}),
        EntryPayload::Normal(cmd) => Payload::Command(cmd),
        EntryPayload::Membership(m) => Payload::MembershipJson(serde_json::to_vec(&m)?),
    };
    Ok(pb::RaftEntry {
        term: e.log_id.leader_id.term,
        leader_node: e.log_id.leader_id.node_id,
        index: e.log_id.index,
        payload: Some(payload),
    })
}

pub(crate) fn entry_from_pb(e: pb::RaftEntry) -> Result<Entry<TypeConfig>, CodecError> {
    let payload = match e.payload.ok_or(CodecError::NoPayload)? {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Command(cmd) => EntryPayload::Normal(cmd),
        Payload::MembershipJson(m) => EntryPayload::Membership(serde_json::from_slice(&m)?),
    };
    Ok(Entry {
        log_id: LogId::new(CommittedLeaderId::new(e.term, e.leader_node), e.index),
        payload,
    })
}

/// An entry as a row of the log database.
pub(crate) fn encode_entry(e: Entry<TypeConfig>) -> Result<Vec<u8>, CodecError> {
    Ok(entry_to_pb(e)?.encode_to_vec())
}

pub(crate) fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, CodecError> {
    entry_from_pb(pb::RaftEntry::decode(bytes)?)
}

/// A `RaftMessage` payload carrying only openraft bookkeeping (a vote, a
/// response).
pub(crate) fn encode_control<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    let p = pb::RaftPayload {
        control: serde_json::to_vec(v)?,
        ..Default::default()
    };
    Ok(p.encode_to_vec())
}

fn decode_payload(bytes: &[u8]) -> Result<pb::RaftPayload, CodecError> {
    // Format 1 was a JSON object; an encoded RaftPayload starts with a field
    // tag, never with '{'.
    if bytes.first() == Some(&b'{') {
        return Err(CodecError::Format1);
    }
    Ok(pb::RaftPayload::decode(bytes)?)
}

pub(crate) fn decode_control<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, CodecError> {
    Ok(serde_json::from_slice(&decode_payload(bytes)?.control)?)
}

pub(crate) fn encode_append(
    mut rpc: AppendEntriesRequest<TypeConfig>,
) -> Result<Vec<u8>, CodecError> {
    let entries = std::mem::take(&mut rpc.entries)
        .into_iter()
        .map(entry_to_pb)
        .collect::<Result<_, _>>()?;
    let p = pb::RaftPayload {
        control: serde_json::to_vec(&rpc)?,
        entries,
        snapshot_data: Vec::new(),
    };
    Ok(p.encode_to_vec())
}

pub(crate) fn decode_append(bytes: &[u8]) -> Result<AppendEntriesRequest<TypeConfig>, CodecError> {
    let p = decode_payload(bytes)?;
    let mut rpc: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(&p.control)?;
    rpc.entries = p
        .entries
        .into_iter()
        .map(entry_from_pb)
        .collect::<Result<_, _>>()?;
    Ok(rpc)
}

pub(crate) fn encode_snapshot(
    mut rpc: InstallSnapshotRequest<TypeConfig>,
) -> Result<Vec<u8>, CodecError> {
    let snapshot_data = std::mem::take(&mut rpc.data);
    let p = pb::RaftPayload {
        control: serde_json::to_vec(&rpc)?,
        entries: Vec::new(),
        snapshot_data,
    };
    Ok(p.encode_to_vec())
}

pub(crate) fn decode_snapshot(
    bytes: &[u8],
) -> Result<InstallSnapshotRequest<TypeConfig>, CodecError> {
    let p = decode_payload(bytes)?;
    let mut rpc: InstallSnapshotRequest<TypeConfig> = serde_json::from_slice(&p.control)?;
    rpc.data = p.snapshot_data;
    Ok(rpc)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{BasicNode, Membership, Vote};

    use super::*;

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 7), index)
    }

    fn entries() -> Vec<Entry<TypeConfig>> {
        let cmd = pb::Command {
            client_id: 1,
            op_id: 2,
            now_ns: 3,
            op: Some(pb::command::Op::Mkdir(pb::Mkdir {
                parent: 1,
                name: b"d".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let members = Membership::new(
            vec![BTreeSet::from([7])],
            BTreeMap::from([(7, BasicNode::new("h:1"))]),
        );
        vec![
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(1, 2),
                payload: EntryPayload::Normal(cmd),
            },
            Entry {
                log_id: log_id(2, 3),
                payload: EntryPayload::Membership(members),
            },
        ]
    }

    #[test]
    fn entries_and_append_requests_round_trip() {
        for e in entries() {
            let back = decode_entry(&encode_entry(e.clone()).expect("encode")).expect("decode");
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
        }
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 7),
            prev_log_id: Some(log_id(1, 0)),
            entries: entries(),
            leader_commit: Some(log_id(1, 1)),
        };
        let back = decode_append(&encode_append(rpc.clone()).expect("encode")).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{rpc:?}"));
    }

    #[test]
    fn a_format_1_message_is_refused() {
        let json = br#"{"vote":{"leader_id":{"term":1,"node_id":7},"committed":true}}"#;
        let e = decode_control::<Vote<u64>>(json).expect_err("format 1");
        assert!(matches!(e, CodecError::Format1), "{e}");
    }
}
