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
    let addr = tc.c.hosts[0].addr.clone();
    let mut meta = pb::metadata_client::MetadataClient::new(tc.c.channel(&addr).unwrap());
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

    // Raft is for members: a forged message needs a member's credential.
    let member = tc.c.tls_for(&failsafe_tls::Grant::member(0x7e57)).unwrap();
    let mut raft = pb::raft_transport_client::RaftTransportClient::new(
        tc.c.channel_as(&addr, &member).unwrap(),
    );
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
        raft.append_entries(garbage.clone())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // The same on the leader's AppendEntries stream: the bad message's
    // error ends the stream, and the member goes on.
    for (bad, code) in [
        (garbage, Code::InvalidArgument),
        (
            pb::RaftMessage {
                header: Some(header("another-cluster")),
                payload: b"{}".to_vec(),
            },
            Code::PermissionDenied,
        ),
    ] {
        let mut replies = raft
            .append_entries_stream(futures::stream::iter([bad]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(replies.message().await.unwrap_err().code(), code);
    }
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
        let mut at = pb::raft_transport_client::RaftTransportClient::new(
            tc.c.channel_as(&tc.c.hosts[i].addr, &member).unwrap(),
        );
        let stale = at
            .take_leadership(take(header(c.cluster_id()), term + 5))
            .await
            .unwrap_err();
        assert_eq!(stale.code(), Code::FailedPrecondition, "{stale}");
    }
    assert_eq!(tc.status().await.term, term, "no election");

    let mut blocks = pb::blocks_client::BlocksClient::new(tc.c.channel(&addr).unwrap());
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
    let addr = tc.c.hosts[1].addr.clone();
    let mut meta = pb::metadata_client::MetadataClient::new(tc.c.channel(&addr).unwrap())
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
    let addr = tc.c.hosts[2].addr.clone();
    let mut blocks = pb::blocks_client::BlocksClient::new(tc.c.channel(&addr).unwrap());
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
    // A host's whole listing is for members.
    let member = tc.c.tls_for(&failsafe_tls::Grant::member(0x7e57)).unwrap();
    let mut as_member =
        pb::blocks_client::BlocksClient::new(tc.c.channel_as(&addr, &member).unwrap());
    let mut inv = as_member
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

/// A mutate request proposing `op`, for raw calls.
fn propose(cluster_id: &str, op: pb::command::Op) -> pb::MutateRequest {
    pb::MutateRequest {
        header: Some(header(cluster_id)),
        command: Some(pb::Command {
            client_id: 99,
            op_id: 1,
            op: Some(op),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What an intruder would try first: change the namespace.
fn intrude(cluster_id: &str) -> pb::MutateRequest {
    propose(
        cluster_id,
        pb::command::Op::Mkdir(pb::Mkdir {
            parent: ROOT,
            name: b"intruder".to_vec(),
            mode: 0o755,
            ..Default::default()
        }),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn t90_callers_without_a_valid_certificate_are_refused_and_change_nothing() {
    use failsafe_tls::{Authority, Grant, Tls, DEFAULT_DAYS};
    let (tc, c) = TestCluster::start(&[]).await;
    let addr = tc.c.hosts[0].addr.clone();
    let elsewhere = tempfile::tempdir().unwrap();
    let other_ca = Authority::create(elsewhere.path()).unwrap();
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    let expired =
        tc.c.authority()
            .unwrap()
            .issue_between(&Grant::admin("late").unwrap(), now - 2 * hour, now - hour)
            .unwrap();
    let callers = [
        ("no certificate (plaintext)", Tls::Insecure),
        (
            "another cluster's CA",
            Tls::new(
                other_ca
                    .issue(&Grant::admin("admin").unwrap(), DEFAULT_DAYS)
                    .unwrap(),
            )
            .unwrap(),
        ),
        ("an expired certificate", Tls::new(expired).unwrap()),
    ];
    for (who, tls) in callers {
        let ch = tc.c.channel_as(&addr, &tls).unwrap();
        let refused = pb::metadata_client::MetadataClient::new(ch.clone())
            .mutate(intrude(c.cluster_id()))
            .await;
        assert!(refused.is_err(), "{who}: allowed");
        let hello = pb::admin_client::AdminClient::new(ch)
            .hello(pb::HelloRequest {
                header: Some(header("")),
            })
            .await;
        assert!(hello.is_err(), "{who}: said hello");
        // The same caller through the client library: one clear error.
        let err = failsafe_client::Client::connect(failsafe_client::ClientConfig {
            addrs: vec![addr.clone()],
            rpc_timeout: std::time::Duration::from_secs(1),
            op_deadline: std::time::Duration::from_secs(3),
            tls,
            ..Default::default()
        })
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        let said = ["plaintext", "does not check out", "expired on"];
        assert!(said.iter().any(|s| err.contains(s)), "{who}: {err}");
    }
    assert!(c.readdir(ROOT).await.unwrap().is_empty(), "nothing changed");
    // The refusals are logged at WARN, not ERROR.
}

#[tokio::test(flavor = "multi_thread")]
async fn t91_a_mount_credential_calls_no_member_or_admin_operation() {
    use failsafe_tls::Grant;
    use pb::command::Op;
    let (tc, c) = TestCluster::start(&[]).await;
    let leader = tc.leader().await;
    let addr = tc.c.hosts[leader].addr.clone();
    let mount =
        tc.c.tls_for(&Grant::client("web1", "/", false).unwrap())
            .unwrap();
    let ch = tc.c.channel_as(&addr, &mount).unwrap();
    let cid = c.cluster_id().to_string();
    let h = || Some(header(&cid));
    let denied = |what: &str, r: Result<tonic::Status, String>| match r {
        Ok(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s}");
            assert!(s.message().contains("client web1"), "{what}: {s}");
        }
        Err(ok) => panic!("{what} was allowed: {ok}"),
    };
    fn refused<T: std::fmt::Debug>(
        r: Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<tonic::Status, String> {
        match r {
            Ok(ok) => Err(format!("{ok:?}")),
            Err(s) => Ok(s),
        }
    }
    let some_host = tc.status().await.hosts[0].host_id;

    let mut admin = pb::admin_client::AdminClient::new(ch.clone());
    denied(
        "Init",
        refused(admin.init(pb::InitRequest { header: h() }).await),
    );
    denied(
        "Adopt",
        refused(
            admin
                .adopt(pb::AdoptRequest {
                    header: h(),
                    cluster_id: "x".into(),
                })
                .await,
        ),
    );
    denied(
        "AddHost",
        refused(
            admin
                .add_host(pb::AddHostRequest {
                    header: h(),
                    addr: addr.clone(),
                })
                .await,
        ),
    );
    denied(
        "RemoveHost",
        refused(
            admin
                .remove_host(pb::RemoveHostRequest {
                    header: h(),
                    host_id: some_host,
                    force: true,
                })
                .await,
        ),
    );
    denied(
        "UpdateAddress",
        refused(
            admin
                .update_address(pb::UpdateAddressRequest {
                    header: h(),
                    host_id: some_host,
                    addr: "127.0.0.1:1".into(),
                })
                .await,
        ),
    );
    denied(
        "Ship",
        refused(
            admin
                .ship(pb::ShipRequest {
                    header: h(),
                    host_id: some_host,
                    force: true,
                    ..Default::default()
                })
                .await,
        ),
    );
    denied(
        "Drain",
        refused(
            admin
                .drain(pb::DrainRequest {
                    header: h(),
                    host_id: some_host,
                })
                .await,
        ),
    );

    let mut raft = pb::raft_transport_client::RaftTransportClient::new(ch.clone());
    let msg = || pb::RaftMessage {
        header: h(),
        payload: b"{}".to_vec(),
    };
    denied("AppendEntries", refused(raft.append_entries(msg()).await));
    denied(
        "AppendEntriesStream",
        refused(
            raft.append_entries_stream(futures::stream::iter([msg()]))
                .await,
        ),
    );
    denied("Vote", refused(raft.vote(msg()).await));
    denied(
        "InstallSnapshot",
        refused(raft.install_snapshot(msg()).await),
    );
    denied(
        "TakeLeadership",
        refused(
            raft.take_leadership(pb::TakeLeadershipRequest {
                header: h(),
                ..Default::default()
            })
            .await,
        ),
    );

    let mut blocks = pb::blocks_client::BlocksClient::new(ch.clone());
    denied(
        "Delete",
        refused(
            blocks
                .delete(pb::DeleteRequest {
                    header: h(),
                    ..Default::default()
                })
                .await,
        ),
    );
    denied(
        "Inventory",
        refused(
            blocks
                .inventory(pb::InventoryRequest {
                    header: h(),
                    device_id: 0,
                })
                .await,
        ),
    );

    let mut meta = pb::metadata_client::MetadataClient::new(ch.clone());
    let bookkeeping = [
        Op::ReportDevices(pb::ReportDevices {
            host_id: some_host,
            devices: vec![],
        }),
        Op::DropCopies(pb::DropCopies::default()),
        Op::ForgetBlocks(pb::ForgetBlocks::default()),
        Op::SetHostState(pb::SetHostState {
            host_id: some_host,
            state: pb::HostAdminState::Away as i32,
            until_ns: 0,
        }),
        Op::ExpireSessions(pb::ExpireSessions {}),
        Op::ReplaceInline(pb::ReplaceInline::default()),
        Op::RegisterHost(pb::RegisterHost {
            host_id: 1,
            ..Default::default()
        }),
        Op::RemoveHost(pb::RemoveHost { host_id: some_host }),
        // An operator's, not a web host's: the trash and snapshots.
        Op::ExpireTrash(pb::ExpireTrash {}),
        Op::PurgeTrash(pb::PurgeTrash::default()),
        Op::RestoreTrash(pb::RestoreTrash::default()),
        Op::SetTrashPolicy(pb::SetTrashPolicy::default()),
        Op::CreateSnapshot(pb::CreateSnapshot {
            name: "s".into(),
            path: b"/".to_vec(),
        }),
        Op::DeleteSnapshot(pb::DeleteSnapshot { name: "s".into() }),
    ];
    for op in bookkeeping {
        let what = format!("{op:?}");
        let r = meta.mutate(propose(&cid, op)).await;
        let s = refused(r).unwrap_or_else(|ok| panic!("{what} was allowed: {ok}"));
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s}");
    }
    // Hidden in a batch, too.
    let batch = Op::Batch(pb::Batch {
        commands: vec![pb::Command {
            op: Some(Op::ExpireSessions(pb::ExpireSessions {})),
            ..Default::default()
        }],
    });
    denied("a batch", refused(meta.mutate(propose(&cid, batch)).await));
    // The trash names deleted files: not for a web host.
    let list = pb::QueryRequest {
        header: h(),
        query: Some(pb::query_request::Query::ListTrash(pb::ListTrash::default())),
        ..Default::default()
    };
    denied("ListTrash", refused(meta.query(list).await));

    // What a mount does is allowed: a file operation and the status.
    meta.mutate(intrude(&cid))
        .await
        .expect("a client makes a directory");
    admin
        .status(pb::StatusRequest { header: h() })
        .await
        .expect("a client reads the status");
    let s = tc.status().await;
    assert_eq!(s.hosts.len(), 3);
    assert!(s
        .hosts
        .iter()
        .all(|h| h.voter && h.state() == pb::HostLiveness::Up));
    assert!(s
        .hosts
        .iter()
        .all(|h| h.admin() == pb::HostAdminState::Active));
}

#[tokio::test(flavor = "multi_thread")]
async fn t92_a_member_reports_only_its_own_devices_and_a_read_only_client_only_reads() {
    use failsafe_tls::Grant;
    let (tc, c) = TestCluster::start(&[]).await;
    let leader = tc.leader().await;
    let addr = tc.c.hosts[leader].addr.clone();
    let cid = c.cluster_id().to_string();
    let before = tc.status().await;
    let victim = before.hosts[0].host_id;
    let impostor = tc.c.tls_for(&Grant::member(0x7e57)).unwrap();
    let mut meta =
        pb::metadata_client::MetadataClient::new(tc.c.channel_as(&addr, &impostor).unwrap());
    let wipe = pb::command::Op::ReportDevices(pb::ReportDevices {
        host_id: victim,
        devices: vec![],
    });
    let s = meta.mutate(propose(&cid, wipe)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s}");
    assert!(s.message().contains(&format!("{victim:016x}")), "{s}");
    let after = tc.status().await;
    assert_eq!(
        after.devices.len(),
        before.devices.len(),
        "no device dropped"
    );

    c.mkdir(ROOT, b"pages", 0o755).await.unwrap();
    let reader =
        tc.c.tls_for(&Grant::client("reader", "/", true).unwrap())
            .unwrap();
    let ro = failsafe_client::Client::connect(failsafe_client::ClientConfig {
        tls: reader,
        ..tc.c.client_config()
    })
    .await
    .unwrap();
    let pages = ro.lookup(ROOT, b"pages").await.expect("a reader looks up");
    for (what, err) in [
        ("mkdir", ro.mkdir(ROOT, b"x", 0o755).await.err()),
        (
            "create",
            ro.create(pages.ino, b"p", 0o644, true).await.err(),
        ),
        ("rmdir", ro.rmdir(ROOT, b"pages").await.err()),
    ] {
        let err = err.unwrap_or_else(|| panic!("a read-only client could {what}"));
        assert!(err.to_string().contains("may only read"), "{what}: {err}");
    }
    assert_eq!(c.readdir(ROOT).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn t93_a_forged_snapshot_chunk_is_refused_and_the_host_keeps_serving() {
    use failsafe_tracker::TypeConfig;
    use openraft::raft::InstallSnapshotRequest;
    use prost::Message;
    let (tc, c) = TestCluster::start(&["--max-snapshot-mb", "1"]).await;
    let kept = c.create(ROOT, b"kept", 0o644, true).await.unwrap();
    let leader = tc.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let status = tc.status().await;
    // A member's credential (a compromised host), and the vote of the
    // leader the follower follows, so the chunks get past openraft's check.
    let member = tc.c.tls_for(&failsafe_tls::Grant::member(0x7e57)).unwrap();
    let mut raft = pb::raft_transport_client::RaftTransportClient::new(
        tc.c.channel_as(&tc.c.hosts[follower].addr, &member)
            .unwrap(),
    );
    let vote = openraft::Vote::new_committed(status.term, status.leader_id);
    let chunk = |id: &str, offset: u64, data: Vec<u8>, done: bool| {
        let rpc = InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: openraft::SnapshotMeta {
                last_log_id: Some(openraft::LogId::new(
                    openraft::CommittedLeaderId::new(status.term, status.leader_id),
                    1_000_000,
                )),
                last_membership: Default::default(),
                snapshot_id: id.to_string(),
            },
            offset,
            data: Vec::new(),
            done,
        };
        pb::RaftMessage {
            header: Some(header(c.cluster_id())),
            payload: pb::RaftPayload {
                control: serde_json::to_vec(&rpc).unwrap(),
                entries: Vec::new(),
                snapshot_data: data,
            }
            .encode_to_vec(),
        }
    };
    let refused = |r: Result<tonic::Response<pb::RaftMessage>, tonic::Status>, want: &str| {
        let s = r.expect_err("a forged chunk was taken");
        assert!(s.message().contains(want), "wanted {want:?}: {s}");
    };
    // A chunk far into a snapshot that never began (openraft would
    // allocate up to that offset).
    refused(
        raft.install_snapshot(chunk("forged-1", 1 << 40, vec![0; 16], false))
            .await,
        "before its first chunk",
    );
    // A gap.
    raft.install_snapshot(chunk("forged-2", 0, vec![0; 1024], false))
        .await
        .expect("a first chunk");
    refused(
        raft.install_snapshot(chunk("forged-2", 4096, vec![0; 16], false))
            .await,
        "expected 1024",
    );
    // Past the size cap (1 MiB here).
    raft.install_snapshot(chunk("forged-3", 0, vec![0; 700 << 10], false))
        .await
        .expect("a first chunk");
    refused(
        raft.install_snapshot(chunk("forged-3", 700 << 10, vec![0; 700 << 10], false))
            .await,
        "larger than",
    );
    // Complete, but not a database.
    refused(
        raft.install_snapshot(chunk(
            "forged-4",
            0,
            b"SQLite format 3\0garbage".repeat(64),
            true,
        ))
        .await,
        "refused",
    );
    // The follower kept its state and serves.
    let at = failsafe_client::Client::connect(failsafe_client::ClientConfig {
        addrs: vec![tc.c.hosts[follower].addr.clone()],
        ..tc.c.client_config()
    })
    .await
    .unwrap();
    assert_eq!(at.lookup(ROOT, b"kept").await.unwrap().ino, kept.ino);
    c.create(ROOT, b"after", 0o644, true).await.unwrap();
    tc.wait_caught_up(follower, common::PATIENCE).await;
    let s = tc.status().await;
    assert_eq!(s.hosts.len(), 3);
    assert!(s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up));
}

#[tokio::test(flavor = "multi_thread")]
async fn t94_another_key_claiming_a_hosts_id_is_refused() {
    use failsafe_tls::{Grant, DEFAULT_DAYS};
    let (mut tc, c) = TestCluster::start(&[]).await;
    let before = tc.status().await;
    let leader = tc.leader().await;
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let id = u64::from_str_radix(
        std::fs::read_to_string(tc.c.hosts[victim].dir.join("host.id"))
            .unwrap()
            .trim(),
        16,
    )
    .unwrap();
    let old_addr = tc.c.hosts[victim].addr.clone();
    // A certificate for the same host id with another key (a re-issued or
    // stolen credential), on a fresh box that asks to join as that host.
    let dir = tc.dir.path().join("impostor");
    std::fs::create_dir_all(&dir).unwrap();
    tc.c.authority()
        .unwrap()
        .issue(&Grant::member(id), DEFAULT_DAYS)
        .unwrap()
        .save(&dir.join("host.cred"))
        .unwrap();
    let join = format!("--join={}", tc.c.hosts[leader].addr);
    let cid = format!("--cluster-id={}", c.cluster_id());
    let i = tc.c.add_host(&dir, "d", 0, &[join, cid]).unwrap();
    let log = tc.c.hosts[i].log_path();
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("known by another key") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the impostor was never refused:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let after = tc.status().await;
    assert_eq!(after.hosts.len(), before.hosts.len());
    let row = after.hosts.iter().find(|h| h.host_id == id).unwrap();
    assert_eq!(row.addr, old_addr, "the membership did not move");
    c.create(ROOT, b"still-writes", 0o644, true).await.unwrap();
    tc.c.stop(i);
}

#[tokio::test(flavor = "multi_thread")]
async fn t95_a_revoked_client_credential_is_refused_by_every_member() {
    let (tc, c) = TestCluster::start(&[]).await;
    let cred = tc.c.client_cred("web9", "/", false).unwrap();
    let web9 = failsafe_client::Client::connect(failsafe_client::ClientConfig {
        tls: failsafe_tls::Tls::new(failsafe_tls::Credential::load(&cred).unwrap()).unwrap(),
        ..tc.c.client_config()
    })
    .await
    .unwrap();
    web9.mkdir(ROOT, b"before", 0o755)
        .await
        .expect("allowed before");
    tc.fsctl_ok(&["client", "revoke", "web9"]);
    // Every member reads the revocation within a second.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    let mut refused = 0;
    while refused < 3 {
        assert!(std::time::Instant::now() < deadline, "still allowed");
        refused = 0;
        for h in &tc.c.hosts {
            let tls =
                failsafe_tls::Tls::new(failsafe_tls::Credential::load(&cred).unwrap()).unwrap();
            let mut admin =
                pb::admin_client::AdminClient::new(tc.c.channel_as(&h.addr, &tls).unwrap());
            let said = admin
                .status(pb::StatusRequest {
                    header: Some(header(c.cluster_id())),
                })
                .await;
            if let Err(s) = said {
                if s.code() == Code::PermissionDenied && s.message().contains("revoked") {
                    refused += 1;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(web9.mkdir(ROOT, b"after", 0o755).await.is_err());
    assert_eq!(c.readdir(ROOT).await.unwrap().len(), 1, "only `before`");
}

#[tokio::test(flavor = "multi_thread")]
async fn t96_a_subtree_credential_neither_sees_nor_touches_anything_outside() {
    use failsafe_tls::Grant;
    let (tc, c) = TestCluster::start(&[]).await;
    let wiki = c.mkdir(ROOT, b"wiki", 0o755).await.unwrap();
    let pages = c.mkdir(wiki.ino, b"pages", 0o755).await.unwrap();
    let page = c
        .create(pages.ino, b"start.txt", 0o644, true)
        .await
        .unwrap();
    c.write(page.ino, 0, b"inside").await.unwrap();
    let secret = c.mkdir(ROOT, b"secret", 0o700).await.unwrap();
    let file = c
        .create(secret.ino, b"users.auth.php", 0o600, true)
        .await
        .unwrap();
    c.write(file.ino, 0, b"password hashes").await.unwrap();
    let web = failsafe_client::Client::connect(failsafe_client::ClientConfig {
        tls: tc
            .c
            .tls_for(&Grant::client("web1", "/wiki", false).unwrap())
            .unwrap(),
        ..tc.c.client_config()
    })
    .await
    .unwrap();
    // Its root, found the way a mount finds it, and everything below.
    let root = web
        .lookup(ROOT, b"wiki")
        .await
        .expect("the path to its root");
    assert_eq!(root.ino, wiki.ino);
    let p = web.lookup(root.ino, b"pages").await.unwrap();
    let f = web.lookup(p.ino, b"start.txt").await.unwrap();
    assert_eq!(web.read(f.ino, 0, 100).await.unwrap(), b"inside");
    let mine = web.create(p.ino, b"new.txt", 0o644, true).await.unwrap();
    web.write(mine.ino, 0, b"written inside").await.unwrap();
    assert_eq!(web.readdir(p.ino).await.unwrap().len(), 2);
    // Outside: every way in is refused.
    let outside = |what: &str, r: Result<(), failsafe_client::ClientError>| {
        let e = r.err().unwrap_or_else(|| panic!("{what} was allowed"));
        assert!(e.to_string().contains("sees only /wiki"), "{what}: {e}");
    };
    outside("readdir /", web.readdir(ROOT).await.map(drop));
    outside(
        "lookup /secret",
        web.lookup(ROOT, b"secret").await.map(drop),
    );
    outside("getattr /secret", web.getattr(secret.ino).await.map(drop));
    outside("readdir /secret", web.readdir(secret.ino).await.map(drop));
    outside(
        "read a file outside",
        web.read(file.ino, 0, 100).await.map(drop),
    );
    outside(
        "write a file outside",
        web.write(file.ino, 0, b"owned").await.map(drop),
    );
    outside(
        "create outside",
        web.create(secret.ino, b"x", 0o644, true).await.map(drop),
    );
    outside(
        "unlink outside",
        web.unlink(secret.ino, b"users.auth.php").await.map(drop),
    );
    outside(
        "link a page outside",
        web.link(f.ino, secret.ino, b"copy").await.map(drop),
    );
    outside(
        "link an outside file in",
        web.link(file.ino, p.ino, b"stolen").await.map(drop),
    );
    outside(
        "rename a page out",
        web.rename(pb::Rename {
            parent: p.ino,
            name: b"start.txt".to_vec(),
            new_parent: secret.ino,
            new_name: b"moved".to_vec(),
            ..Default::default()
        })
        .await,
    );
    outside(
        "mkdir at the top",
        web.mkdir(ROOT, b"x", 0o755).await.map(drop),
    );
    let revalidate = |inos: Vec<u64>| {
        web.query(pb::query_request::Query::Revalidate(pb::Revalidate {
            inos,
        }))
    };
    outside(
        "revalidate a page and a file outside",
        revalidate(vec![f.ino, file.ino]).await.map(drop),
    );
    match revalidate(vec![f.ino, mine.ino]).await {
        Ok(pb::query_reply::Reply::AttrList(l)) => assert_eq!(l.attrs.len(), 2),
        other => panic!("revalidating inside: {other:?}"),
    }
    // At most MAX_REVALIDATE inodes, at least one.
    for n in [0, failsafe_proto::MAX_REVALIDATE + 1] {
        let e = revalidate(vec![f.ino; n]).await.expect_err("refused");
        assert!(e.to_string().contains("1 to 1024 inodes"), "{n}: {e}");
    }
    // Nothing outside changed.
    assert_eq!(c.read(file.ino, 0, 100).await.unwrap(), b"password hashes");
    assert_eq!(c.readdir(secret.ino).await.unwrap().len(), 1);
    assert_eq!(c.readdir(ROOT).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn t97_a_hosts_certificate_is_renewed_in_place_and_survives_a_restart() {
    let (mut tc, c) = TestCluster::start(&[]).await;
    let leader = tc.leader().await;
    let i = (0..3).find(|i| *i != leader).unwrap();
    let path = tc.c.hosts[i].dir.join("host.cred");
    let before = failsafe_tls::Credential::load(&path).unwrap();
    let id = before.grant.host_id;
    tc.fsctl_ok(&["host", "renew", &format!("{id:016x}"), "--days", "1000"]);
    let after = failsafe_tls::Credential::load(&path).unwrap();
    assert_eq!(after.key_id(), before.key_id(), "the key stayed");
    assert!(after.expires() > before.expires());
    // New connections use it at once; a restart reads it from disk, and
    // the host's pinned key still matches.
    c.create(ROOT, b"renewed", 0o644, true).await.unwrap();
    tc.c.restart_graceful(i).unwrap();
    tc.wait_caught_up(i, common::PATIENCE).await;
    c.create(ROOT, b"restarted", 0o644, true).await.unwrap();
    let s = tc.status().await;
    assert!(s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up));
}
