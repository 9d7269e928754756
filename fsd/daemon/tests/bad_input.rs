//! Hostile and malformed requests: each gets a clear error, the daemon stays
//! up, and nothing changes.

mod common;

use common::{TestCluster, ROOT};
use failsafe_client::pb::{self, ErrorCode};
use failsafe_proto::{header, PROTOCOL_VERSION};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn t85_hostile_names_are_refused_and_change_nothing() {
    let (_tc, c) = TestCluster::start(&[]).await;
    let f = c.create(ROOT, b"ok", 0o644, true).await.unwrap();
    let long = vec![b'x'; 256];
    let hostile: [(&[u8], ErrorCode); 6] = [
        (b"a/b", ErrorCode::Invalid),
        (b"../../etc/passwd", ErrorCode::Invalid),
        (b"nul\0byte", ErrorCode::Invalid),
        (b".", ErrorCode::Invalid),
        (b"..", ErrorCode::Invalid),
        (&long, ErrorCode::NameTooLong),
    ];
    for (name, want) in hostile {
        let shown = String::from_utf8_lossy(name).to_string();
        assert_eq!(
            c.create(ROOT, name, 0o644, false).await.unwrap_err().code(),
            Some(want),
            "create {shown}"
        );
        assert_eq!(
            c.mkdir(ROOT, name, 0o755).await.unwrap_err().code(),
            Some(want),
            "mkdir {shown}"
        );
        assert_eq!(
            c.symlink(ROOT, name, b"ok").await.unwrap_err().code(),
            Some(want),
            "symlink {shown}"
        );
        assert_eq!(
            c.link(f.ino, ROOT, name).await.unwrap_err().code(),
            Some(want),
            "link {shown}"
        );
        assert_eq!(
            c.lookup(ROOT, name).await.unwrap_err().code(),
            Some(want),
            "lookup {shown}"
        );
        assert_eq!(
            c.unlink(ROOT, name).await.unwrap_err().code(),
            Some(want),
            "unlink {shown}"
        );
        let r = pb::Rename {
            parent: ROOT,
            name: b"ok".to_vec(),
            new_parent: ROOT,
            new_name: name.to_vec(),
            ..Default::default()
        };
        assert_eq!(
            c.rename(r).await.unwrap_err().code(),
            Some(want),
            "rename to {shown}"
        );
    }
    let names: Vec<Vec<u8>> = c
        .readdir(ROOT)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"ok".to_vec()]);
    // Extents that point at nothing, or past their block, are refused too.
    let bogus = pb::Extent {
        offset: 0,
        length: 10,
        hash: vec![0; 32],
        block_offset: 0,
        data: Vec::new(),
    };
    assert_eq!(
        c.commit_extents(f.ino, vec![bogus], vec![])
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::Invalid)
    );
    let short = pb::Extent {
        offset: 0,
        length: 10,
        hash: vec![1; 5],
        block_offset: 0,
        data: Vec::new(),
    };
    assert_eq!(
        c.commit_extents(f.ino, vec![short], vec![])
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(c.getattr(f.ino).await.unwrap().size, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn t86_requests_for_another_cluster_or_version_are_refused() {
    let (tc, c) = TestCluster::start(&[]).await;
    let addr = format!("http://{}", tc.c.hosts[0].addr);
    let mut meta = pb::metadata_client::MetadataClient::connect(addr.clone())
        .await
        .unwrap();
    let mkdir = |h: Option<pb::Header>| pb::MutateRequest {
        header: h,
        lease_holder: 0,
        command: Some(pb::Command {
            op: Some(pb::command::Op::Mkdir(pb::Mkdir {
                parent: ROOT,
                name: b"intruder".to_vec(),
                mode: 0o755,
                ..Default::default()
            })),
            ..Default::default()
        }),
        writer_zone: String::new(),
        delegate: 0,
        flush_of: 0,
    };
    let foreign = meta
        .mutate(mkdir(Some(header("another-cluster"))))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied);
    assert!(
        foreign.message().contains("another-cluster"),
        "{}",
        foreign.message()
    );
    let old = pb::Header {
        cluster_id: c.cluster_id().to_string(),
        protocol_version: PROTOCOL_VERSION + 1,
    };
    assert_eq!(
        meta.mutate(mkdir(Some(old))).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        meta.mutate(mkdir(None)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    for zone in ["two words".to_string(), "z".repeat(65), "bell\u{7}".into()] {
        let req = pb::MutateRequest {
            writer_zone: zone.clone(),
            ..mkdir(Some(header(c.cluster_id())))
        };
        let refused = meta.mutate(req).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{zone:?}");
        assert!(refused.message().contains("writer_zone"), "{refused}");
    }

    let mut raft = pb::raft_transport_client::RaftTransportClient::connect(addr.clone())
        .await
        .unwrap();
    let vote = pb::RaftMessage {
        header: Some(header("another-cluster")),
        payload: b"{}".to_vec(),
    };
    assert_eq!(
        raft.vote(vote).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let garbage = pb::RaftMessage {
        header: Some(header(c.cluster_id())),
        payload: b"not json".to_vec(),
    };
    assert_eq!(
        raft.append_entries(garbage).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A hand-over request from another cluster, or naming a term or leader
    // this member does not follow, makes nobody stand for election.
    let take = |h: pb::Header, term: u64| pb::TakeLeadershipRequest {
        header: Some(h),
        leader_id: 1,
        term,
        last_log_index: 0,
    };
    let term = tc.status().await.term;
    assert_eq!(
        raft.take_leadership(take(header("another-cluster"), term))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let leader = tc.leader().await;
    for i in (0..3).filter(|i| *i != leader) {
        let mut at = pb::raft_transport_client::RaftTransportClient::connect(format!(
            "http://{}",
            tc.c.hosts[i].addr
        ))
        .await
        .unwrap();
        let stale = at
            .take_leadership(take(header(c.cluster_id()), term + 5))
            .await
            .unwrap_err();
        assert_eq!(stale.code(), Code::FailedPrecondition, "{stale}");
    }
    assert_eq!(tc.status().await.term, term, "no election");

    let mut blocks = pb::blocks_client::BlocksClient::connect(addr)
        .await
        .unwrap();
    let get = pb::GetRequest {
        header: Some(header("another-cluster")),
        hash: vec![0; 32],
        device_id: 0,
    };
    assert_eq!(
        blocks.get(get).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    assert!(
        c.readdir(ROOT).await.unwrap().is_empty(),
        "nothing was created"
    );
    assert_eq!(tc.status().await.hosts.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn t87_an_oversized_message_is_refused_and_the_daemon_stays_up() {
    let (tc, c) = TestCluster::start(&[]).await;
    let addr = format!("http://{}", tc.c.hosts[1].addr);
    let mut meta = pb::metadata_client::MetadataClient::connect(addr)
        .await
        .unwrap()
        .max_encoding_message_size(64 * 1024 * 1024);
    let req = pb::MutateRequest {
        header: Some(header(c.cluster_id())),
        lease_holder: 0,
        command: Some(pb::Command {
            op: Some(pb::command::Op::Create(pb::Create {
                parent: ROOT,
                name: vec![b'a'; 20 * 1024 * 1024],
                ..Default::default()
            })),
            ..Default::default()
        }),
        writer_zone: String::new(),
        delegate: 0,
        flush_of: 0,
    };
    let err = meta.mutate(req).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{err:?}"
    );
    for i in 0..3 {
        assert!(tc.status_at(i).await.is_some(), "host {i} still answers");
    }
    c.create(ROOT, b"still-works", 0o644, true).await.unwrap();
    assert_eq!(c.readdir(ROOT).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn t88_a_block_whose_bytes_do_not_match_its_hash_is_refused() {
    let (tc, c) = TestCluster::start(&[]).await;
    let addr = format!("http://{}", tc.c.hosts[2].addr);
    let mut blocks = pb::blocks_client::BlocksClient::connect(addr)
        .await
        .unwrap();
    let claimed = failsafe_core::block_hash(b"the real bytes").to_vec();
    let lie = pb::PutChunk {
        header: Some(header(c.cluster_id())),
        hash: claimed.clone(),
        device_id: 0,
        size: 14,
        data: b"forged  bytes!".to_vec(),
    };
    let err = blocks.put(tokio_stream::iter(vec![lie])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("hash"), "{}", err.message());
    // A stream longer than it declared, and a hash of the wrong length.
    let long = pb::PutChunk {
        header: Some(header(c.cluster_id())),
        hash: claimed.clone(),
        size: 2,
        data: b"abc".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        blocks
            .put(tokio_stream::iter(vec![long]))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let get = pb::GetRequest {
        header: Some(header(c.cluster_id())),
        hash: vec![1; 5],
        device_id: 0,
    };
    assert_eq!(
        blocks.get(get).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let asked = pb::HasRequest {
        header: Some(header(c.cluster_id())),
        hashes: vec![claimed],
        device_id: 0,
    };
    let has = blocks.has(asked).await.unwrap();
    assert_eq!(has.into_inner().device_ids, vec![0], "nothing stored");
    let mut inv = blocks
        .inventory(pb::InventoryRequest {
            header: Some(header(c.cluster_id())),
            device_id: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(chunk) = inv.message().await.unwrap() {
        n += chunk.entries.len();
    }
    assert_eq!(n, 0);
    assert!(tc.status_at(2).await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn t89_inline_data_over_64_kib_or_malformed_is_refused_and_changes_nothing() {
    let (_tc, c) = TestCluster::start(&[]).await;
    let f = c.create(ROOT, b"page", 0o644, true).await.unwrap();
    let inline = |offset: u64, data: Vec<u8>| pb::Extent {
        offset,
        length: data.len() as u64,
        data,
        ..Default::default()
    };
    let half = vec![b'x'; 32 * 1024];
    let over = vec![
        inline(0, half.clone()),
        inline(1 << 20, half.clone()),
        inline(2 << 20, b"one byte too many".to_vec()),
    ];
    let e = c.commit_extents(f.ino, over, vec![]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Invalid));
    assert!(e.to_string().contains("at most 65536"), "{e}");
    let mut wrong_length = inline(0, b"abc".to_vec());
    wrong_length.length = 10;
    let e = c
        .commit_extents(f.ino, vec![wrong_length], vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Invalid));
    assert_eq!(c.getattr(f.ino).await.unwrap().size, 0, "nothing changed");
    // Exactly 64 KiB is fine, and reads back without a block.
    let ok = vec![inline(0, half.clone()), inline(32 * 1024, half)];
    assert_eq!(
        c.commit_extents(f.ino, ok, vec![]).await.unwrap().size,
        64 * 1024
    );
    assert_eq!(
        c.read(f.ino, 0, 1 << 20).await.unwrap(),
        vec![b'x'; 64 * 1024]
    );
}
