//! Helpers for the state machine's unit tests: an in-memory database and
//! commands applied to it as the leader would.

use failsafe_core::ROOT_INO;
use failsafe_proto::pb::{self, command::Op};

use super::{apply, migrate};

pub(super) fn db() -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_in_memory().expect("in-memory database");
    migrate(&conn).expect("schema");
    conn
}

pub(super) fn run(conn: &mut rusqlite::Connection, op: Op) -> pb::CommandResult {
    run_at(conn, op, 1)
}

/// Applies `op` as proposed by the leader at `leader_ns`.
pub(super) fn run_at(conn: &mut rusqlite::Connection, op: Op, leader_ns: i64) -> pb::CommandResult {
    let tx = conn.transaction().expect("transaction");
    let r = apply(
        &tx,
        &pb::Command {
            now_ns: 1,
            leader_ns,
            op: Some(op),
            ..Default::default()
        },
    )
    .expect("apply");
    tx.commit().expect("commit");
    r
}

pub(super) fn device(id: u64, free: u64) -> pb::DeviceInfo {
    let path = format!("/d{id}");
    pb::DeviceInfo {
        device_id: id,
        host_id: 7,
        path,
        capacity_bytes: 1 << 40,
        free_bytes: free,
        ..Default::default()
    }
}

pub(super) const ROOMY: u64 = 1 << 39;

pub(super) fn copies(hash: &[u8], devices: &[u64]) -> pb::BlockCopies {
    pb::BlockCopies {
        hash: hash.to_vec(),
        size: 10,
        device_ids: devices.to_vec(),
    }
}

pub(super) fn ok(r: pb::CommandResult) {
    assert!(
        !matches!(r.result, Some(pb::command_result::Result::Error(_))),
        "{r:?}"
    );
}

/// A new empty file in the root directory; its inode.
pub(super) fn create_file(conn: &mut rusqlite::Connection, name: &[u8]) -> u64 {
    let r = run(
        conn,
        Op::Create(pb::Create {
            parent: ROOT_INO,
            name: name.to_vec(),
            mode: 0o644,
            ..Default::default()
        }),
    );
    let Some(pb::command_result::Result::Attr(a)) = r.result else {
        panic!("create: {r:?}")
    };
    a.ino
}

/// A file whose one extent names block `hash`, recorded on `devices`.
pub(super) fn file_with_block(
    conn: &mut rusqlite::Connection,
    name: &[u8],
    hash: &[u8],
    devices: &[u64],
) {
    let ino = create_file(conn, name);
    let extent = pb::Extent {
        offset: 0,
        length: 10,
        hash: hash.to_vec(),
        block_offset: 0,
        data: Vec::new(),
    };
    ok(run(
        conn,
        Op::CommitExtents(pb::CommitExtents {
            ino,
            extents: vec![extent],
            copies: vec![copies(hash, devices)],
            append: false,
            truncate: false,
        }),
    ));
}

/// The file's extents as a read sees them.
pub(super) fn extents(conn: &rusqlite::Connection, ino: u64) -> pb::FileExtents {
    use failsafe_proto::pb::{query_reply::Reply, query_request::Query};
    let q = Query::ReadExtents(pb::ReadExtents {
        ino,
        offset: 0,
        length: u64::MAX,
    });
    match super::query(conn, &q, failsafe_core::ReplicationClass::default()) {
        Ok(Reply::FileExtents(fe)) => fe,
        other => panic!("read extents: {other:?}"),
    }
}
