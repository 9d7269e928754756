//! Every metadata operation, through the client library, against a real
//! three-host cluster.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{data, TestCluster, PATIENCE, ROOT};
use failsafe_client::{pb, LockRequest};
use pb::{ErrorCode, FileKind};

fn code<T: std::fmt::Debug>(r: Result<T, failsafe_client::ClientError>) -> ErrorCode {
    r.expect_err("expected a refusal")
        .code()
        .expect("a tracker error code")
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_three_hosts_bootstrap_into_one_cluster() {
    let (tc, _client) = TestCluster::start(&[]).await;
    let s = tc.status().await;
    assert_eq!(s.hosts.len(), 3);
    assert!(s.hosts.iter().all(|h| h.voter));
    let zones: BTreeSet<&str> = s.hosts.iter().map(|h| h.zone.as_str()).collect();
    assert_eq!(zones, BTreeSet::from(["a", "b", "c"]));
    assert_eq!(s.hosts.iter().filter(|h| h.role == "leader").count(), 1);
    assert!(
        s.hosts.iter().all(|h| h.state() == pb::HostLiveness::Up),
        "{s:?}"
    );
    assert_eq!(s.mode(), pb::ClusterMode::FailSafe);
    assert_eq!(s.devices.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn t20_every_metadata_operation() {
    let (_tc, c) = TestCluster::start(&[]).await;

    // create, exclusive create, lookup, getattr
    let dir = c.mkdir(ROOT, b"wiki", 0o755).await.unwrap();
    assert_eq!(dir.kind, FileKind::KindDir as i32);
    assert_eq!(code(c.mkdir(ROOT, b"wiki", 0o755).await), ErrorCode::Exists);
    let f = c.create(dir.ino, b"start.txt", 0o644, true).await.unwrap();
    assert_eq!(
        code(c.create(dir.ino, b"start.txt", 0o644, true).await),
        ErrorCode::Exists
    );
    assert_eq!(
        c.create(dir.ino, b"start.txt", 0o644, false)
            .await
            .unwrap()
            .ino,
        f.ino
    );
    assert_eq!(c.lookup(dir.ino, b"start.txt").await.unwrap().ino, f.ino);
    assert_eq!(
        code(c.lookup(dir.ino, b"missing").await),
        ErrorCode::NotFound
    );
    assert_eq!(c.getattr(dir.ino).await.unwrap().nlink, 2);

    // write and read (commit and read extents), overwrite in the middle, sparse
    let body = data(10_000, 1);
    let a = c.write(f.ino, 0, &body).await.unwrap();
    assert_eq!(a.size, 10_000);
    c.write(f.ino, 5_000, b"HELLO").await.unwrap();
    let mut expect = body.clone();
    expect[5_000..5_005].copy_from_slice(b"HELLO");
    assert_eq!(c.read(f.ino, 0, 20_000).await.unwrap(), expect);
    assert_eq!(
        c.read(f.ino, 4_998, 9).await.unwrap(),
        expect[4_998..5_007].to_vec()
    );
    c.write(f.ino, 20_000, b"tail").await.unwrap();
    let sparse = c.read(f.ino, 9_990, 10_100).await.unwrap();
    assert_eq!(sparse.len(), 10_014);
    assert!(
        sparse[10..10_010].iter().all(|&b| b == 0),
        "a hole reads as zeros"
    );
    let fe = c.read_extents(f.ino, 0, 30_000).await.unwrap();
    assert_eq!(fe.extents.len(), 4);
    assert!(
        fe.copies.iter().all(|b| b.device_ids.len() >= 2),
        "every block at least at the write quorum"
    );

    // setattr: mode, owner, size (truncate and extend), times
    let s = c
        .setattr(pb::SetAttr {
            ino: f.ino,
            mode: Some(0o600),
            uid: Some(33),
            gid: Some(33),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((s.mode, s.uid, s.gid), (0o600, 33, 33));
    let s = c
        .setattr(pb::SetAttr {
            ino: f.ino,
            size: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(s.size, 100);
    let s = c
        .setattr(pb::SetAttr {
            ino: f.ino,
            size: Some(200),
            ..Default::default()
        })
        .await
        .unwrap();
    let grown = c.read(f.ino, 0, 1000).await.unwrap();
    assert_eq!(grown.len(), 200);
    assert_eq!(&grown[..100], &expect[..100]);
    assert!(
        grown[100..].iter().all(|&b| b == 0),
        "truncate then extend reads zeros"
    );
    assert_eq!(s.size, 200);
    let t = c
        .setattr(pb::SetAttr {
            ino: f.ino,
            atime_ns: Some(1_000),
            mtime_ns: Some(2_000_000_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((t.atime_ns, t.mtime_ns), (1_000, 2_000_000_000));

    // link, symlink, readlink
    let l = c.link(f.ino, ROOT, b"hardlink").await.unwrap();
    assert_eq!(l.nlink, 2);
    assert_eq!(
        code(c.link(dir.ino, ROOT, b"dirlink").await),
        ErrorCode::IsDir
    );
    let sl = c.symlink(ROOT, b"sym", b"wiki/start.txt").await.unwrap();
    assert_eq!(sl.kind, FileKind::KindSymlink as i32);
    assert_eq!(c.readlink(sl.ino).await.unwrap(), b"wiki/start.txt");

    // rename over an existing file: the target's inode goes, the source moves
    let old = c.create(dir.ino, b"old.txt", 0o644, true).await.unwrap();
    c.write(old.ino, 0, b"old content").await.unwrap();
    let tmp = c.create(dir.ino, b"tmp.txt", 0o644, true).await.unwrap();
    c.write(tmp.ino, 0, b"new content").await.unwrap();
    c.rename(pb::Rename {
        parent: dir.ino,
        name: b"tmp.txt".to_vec(),
        new_parent: dir.ino,
        new_name: b"old.txt".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let now = c.lookup(dir.ino, b"old.txt").await.unwrap();
    assert_eq!(now.ino, tmp.ino);
    assert_eq!(c.read(now.ino, 0, 100).await.unwrap(), b"new content");
    assert_eq!(
        code(c.lookup(dir.ino, b"tmp.txt").await),
        ErrorCode::NotFound
    );
    assert_eq!(code(c.getattr(old.ino).await), ErrorCode::NotFound);
    // rename without replacing
    let other = c.create(dir.ino, b"other.txt", 0o644, true).await.unwrap();
    let noreplace = pb::Rename {
        parent: dir.ino,
        name: b"other.txt".to_vec(),
        new_parent: dir.ino,
        new_name: b"old.txt".to_vec(),
        no_replace: true,
        ..Default::default()
    };
    assert_eq!(code(c.rename(noreplace.clone()).await), ErrorCode::Exists);
    // exchange
    c.rename(pb::Rename {
        no_replace: false,
        exchange: true,
        ..noreplace
    })
    .await
    .unwrap();
    assert_eq!(c.lookup(dir.ino, b"old.txt").await.unwrap().ino, other.ino);
    assert_eq!(c.lookup(dir.ino, b"other.txt").await.unwrap().ino, tmp.ino);
    // a directory cannot move into itself
    let sub = c.mkdir(dir.ino, b"sub", 0o755).await.unwrap();
    let into_self = pb::Rename {
        parent: ROOT,
        name: b"wiki".to_vec(),
        new_parent: sub.ino,
        new_name: b"x".to_vec(),
        ..Default::default()
    };
    assert_eq!(code(c.rename(into_self).await), ErrorCode::Loop);

    // unlink, rmdir
    assert_eq!(code(c.rmdir(ROOT, b"wiki").await), ErrorCode::NotEmpty);
    assert_eq!(code(c.unlink(dir.ino, b"sub").await), ErrorCode::IsDir);
    c.rmdir(dir.ino, b"sub").await.unwrap();
    c.unlink(ROOT, b"hardlink").await.unwrap();
    assert_eq!(c.getattr(f.ino).await.unwrap().nlink, 1);
    c.unlink(dir.ino, b"start.txt").await.unwrap();
    assert_eq!(code(c.getattr(f.ino).await), ErrorCode::NotFound);

    // statfs
    let st = c.statfs().await.unwrap();
    assert!(st.total_bytes > 0 && st.free_bytes > 0 && st.files >= 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn t21_readdir_pages_stay_stable_while_the_directory_changes() {
    let (_tc, c) = TestCluster::start(&[]).await;
    let d = c.mkdir(ROOT, b"big", 0o755).await.unwrap();
    for i in 0..60 {
        c.create(d.ino, format!("page{i:03}").as_bytes(), 0o644, true)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after = Vec::new();
    let mut round = 0;
    loop {
        let page = c.readdir_page(d.ino, &after, 7).await.unwrap();
        seen.extend(
            page.entries
                .iter()
                .map(|e| String::from_utf8_lossy(&e.name).to_string()),
        );
        after = page
            .entries
            .last()
            .map(|e| e.name.clone())
            .unwrap_or_default();
        // Meanwhile others add and remove entries on both sides of the cursor.
        c.create(d.ino, format!("new{round:03}").as_bytes(), 0o644, true)
            .await
            .unwrap();
        c.unlink(d.ino, format!("page{:03}", 59 - round).as_bytes())
            .await
            .ok();
        round += 1;
        if !page.more {
            break;
        }
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no entry returned twice");
    // Every entry that existed throughout was returned.
    for i in 0..(59 - round) {
        assert!(seen.contains(&format!("page{i:03}")), "page{i:03} missing");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t22_exclusive_create_race_has_exactly_one_winner() {
    let (tc, c1) = TestCluster::start(&[]).await;
    let c2 = tc.client_in("b").await;
    let d = c1.mkdir(ROOT, b"locks", 0o755).await.unwrap();
    for i in 0..25 {
        let name = format!("lock{i}");
        let (r1, r2) = tokio::join!(
            c1.create(d.ino, name.as_bytes(), 0o644, true),
            c2.create(d.ino, name.as_bytes(), 0o644, true)
        );
        let wins = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {i}: {r1:?} {r2:?}");
        let loser = if r1.is_ok() { r2 } else { r1 };
        assert_eq!(loser.unwrap_err().code(), Some(ErrorCode::Exists));
        // mkdir, the other lock idiom, likewise.
        let dir = format!("dir{i}");
        let (m1, m2) = tokio::join!(
            c1.mkdir(d.ino, dir.as_bytes(), 0o755),
            c2.mkdir(d.ino, dir.as_bytes(), 0o755)
        );
        assert_eq!([m1.is_ok(), m2.is_ok()].iter().filter(|&&w| w).count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t23_a_retried_operation_is_applied_once() {
    let (tc, c) = TestCluster::start(&[]).await;
    let d = c.mkdir(ROOT, b"d", 0o755).await.unwrap();
    // The same command sent twice (a retry after a lost reply) keeps its op id.
    let cmd = pb::Command {
        client_id: 77,
        op_id: 1,
        now_ns: 1,
        leader_ns: 0,
        op: Some(pb::command::Op::Create(pb::Create {
            parent: d.ino,
            name: b"once".to_vec(),
            mode: 0o644,
            exclusive: true,
            ..Default::default()
        })),
    };
    let mut raw = pb::metadata_client::MetadataClient::new(tc.c.channel(&c.members()[0]).unwrap());
    let mut results = Vec::new();
    for _ in 0..2 {
        let req = pb::MutateRequest {
            header: Some(failsafe_proto::header(c.cluster_id())),
            command: Some(cmd.clone()),
            lease_holder: 0,
            writer_zone: String::new(),
            ..Default::default()
        };
        // Follow a leader hint if the first member is not the leader.
        let r = match raw.mutate(req.clone()).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let leader = s
                    .metadata()
                    .get(failsafe_proto::LEADER_ADDR_KEY)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                raw = pb::metadata_client::MetadataClient::new(tc.c.channel(&leader).unwrap());
                raw.mutate(req).await.unwrap().into_inner()
            }
        };
        results.push(r.result.unwrap());
    }
    assert!(matches!(
        results[0].result,
        Some(pb::command_result::Result::Attr(_))
    ));
    assert_eq!(
        results[0], results[1],
        "the retry got the first answer, not EEXIST"
    );
    assert_eq!(c.readdir(d.ino).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn t24_cluster_wide_locks() {
    let (tc, c1) = TestCluster::start(&[]).await;
    let c2 = tc.client_in("c").await;
    let f = c1.create(ROOT, b"locked", 0o644, true).await.unwrap();
    let s1 = c1.open_session(Duration::from_secs(10)).await.unwrap();
    let s2 = c2.open_session(Duration::from_secs(10)).await.unwrap();
    let flock = |owner, ltype| LockRequest {
        ino: f.ino,
        owner,
        kind: pb::LockKind::LockFlock,
        ltype,
        start: 0,
        end: 0,
    };
    c1.lock(&s1, flock(1, pb::LockType::LockWrite))
        .await
        .unwrap();
    assert_eq!(
        code(c2.lock(&s2, flock(2, pb::LockType::LockRead)).await),
        ErrorCode::WouldBlock
    );
    c1.lock(&s1, flock(1, pb::LockType::LockRead))
        .await
        .unwrap(); // downgrade
    c2.lock(&s2, flock(2, pb::LockType::LockRead))
        .await
        .unwrap(); // shared
    assert_eq!(
        code(c2.lock(&s2, flock(2, pb::LockType::LockWrite)).await),
        ErrorCode::WouldBlock
    );
    c1.lock(&s1, flock(1, pb::LockType::LockUnlock))
        .await
        .unwrap();
    c2.lock(&s2, flock(2, pb::LockType::LockWrite))
        .await
        .unwrap(); // upgrade now free

    // POSIX byte ranges: disjoint ranges coexist, overlapping writes conflict,
    // unlocking the middle of a range keeps its ends.
    let posix = |owner, ltype, start, end| LockRequest {
        ino: f.ino,
        owner,
        kind: pb::LockKind::LockPosix,
        ltype,
        start,
        end,
    };
    c1.lock(&s1, posix(1, pb::LockType::LockWrite, 0, 100))
        .await
        .unwrap();
    c2.lock(&s2, posix(2, pb::LockType::LockWrite, 100, 200))
        .await
        .unwrap();
    assert_eq!(
        code(
            c2.lock(&s2, posix(2, pb::LockType::LockWrite, 50, 150))
                .await
        ),
        ErrorCode::WouldBlock
    );
    c1.lock(&s1, posix(1, pb::LockType::LockUnlock, 40, 60))
        .await
        .unwrap();
    c2.lock(&s2, posix(2, pb::LockType::LockRead, 45, 55))
        .await
        .unwrap();
    assert_eq!(
        code(c2.lock(&s2, posix(2, pb::LockType::LockRead, 30, 45)).await),
        ErrorCode::WouldBlock
    );
    let locks = c1.list_locks(f.ino).await.unwrap();
    assert_eq!(
        locks
            .iter()
            .filter(|l| l.session_id == s1.id && l.kind == pb::LockKind::LockPosix as i32)
            .count(),
        2
    );

    // Closing a session releases its locks.
    s2.close().await.unwrap();
    c1.lock(&s1, flock(1, pb::LockType::LockWrite))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn t25_lock_of_a_session_that_stops_heartbeating_is_released() {
    let (tc, c1) = TestCluster::start(&[]).await;
    let c2 = tc.client_in("b").await;
    let f = c1
        .create(ROOT, b"dokuwiki.lock", 0o644, true)
        .await
        .unwrap();
    let dead = c1.open_session(Duration::from_secs(2)).await.unwrap();
    let live = c2.open_session(Duration::from_secs(10)).await.unwrap();
    let req = |owner| LockRequest {
        ino: f.ino,
        owner,
        kind: pb::LockKind::LockFlock,
        ltype: pb::LockType::LockWrite,
        start: 0,
        end: 0,
    };
    c1.lock(&dead, req(1)).await.unwrap();
    assert_eq!(code(c2.lock(&live, req(2)).await), ErrorCode::WouldBlock);
    // The client crashes: no more heartbeats, no unlock.
    dead.abandon();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match c2.lock(&live, req(2)).await {
            Ok(()) => break,
            Err(e) if e.code() == Some(ErrorCode::WouldBlock) => {
                assert!(std::time::Instant::now() < deadline, "lock never released");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The live session's heartbeats keep its lock past its own lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s3 = c1.open_session(Duration::from_secs(10)).await.unwrap();
    assert_eq!(code(c1.lock(&s3, req(3)).await), ErrorCode::WouldBlock);
}

#[tokio::test(flavor = "multi_thread")]
async fn t26_a_follower_answers_linearizable_reads_with_read_index() {
    let (tc, c) = TestCluster::start(&[]).await;
    let leader = tc.leader().await;
    for i in 0..20 {
        let name = format!("page{i}");
        c.create(ROOT, name.as_bytes(), 0o644, true).await.unwrap();
        // Right after the write commits, every follower's read-index answer
        // includes it (a Local answer might not).
        for f in (0..3).filter(|&f| f != leader) {
            let q = pb::query_request::Query::Lookup(pb::Lookup {
                parent: ROOT,
                name: name.clone().into_bytes(),
                extents: false,
            });
            let r = c
                .query_at(&tc.c.hosts[f].addr, q, pb::Consistency::ReadIndex)
                .await;
            assert!(
                matches!(r, Ok(pb::query_reply::Reply::Attr(_))),
                "follower {f}, {name}: {r:?}"
            );
        }
    }
}

/// Acknowledges change `change_id` on a raw lease stream, and waits for
/// the change to finish; returns its answer.
async fn acknowledged<T: std::fmt::Debug, E: std::fmt::Debug>(
    to_leader: &tokio::sync::mpsc::Sender<pb::WatchRequest>,
    change_id: u64,
    change: tokio::task::JoinHandle<Result<T, E>>,
    header: Option<pb::Header>,
) -> T {
    to_leader
        .send(pb::WatchRequest {
            header,
            msg: Some(pb::watch_request::Msg::Ack(pb::WatchAck { change_id })),
        })
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, change)
        .await
        .expect("done once acknowledged")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn t27_a_change_waits_until_every_lease_holder_has_dropped_what_it_changed() {
    use pb::watch_event::Event;
    use pb::watch_request::Msg;
    // Slow elections make the leases long (they must fit inside the
    // election gap), so "still waiting" below does not depend on timing.
    let (tc, c) =
        TestCluster::start(&["--election-min-ms", "3000", "--election-max-ms", "6000"]).await;
    let d = c.mkdir(ROOT, b"d", 0o755).await.unwrap();
    let status = c.status().await.unwrap();
    let mut raw =
        pb::metadata_client::MetadataClient::new(tc.c.channel(&status.leader_addr).unwrap());
    let header = Some(failsafe_proto::header(c.cluster_id()));
    let (to_leader, outbound) = tokio::sync::mpsc::channel(16);
    let say = |msg| pb::WatchRequest {
        header: header.clone(),
        msg: Some(msg),
    };
    to_leader
        .send(say(Msg::Hello(pb::WatchHello { holder: 4242 })))
        .await
        .unwrap();
    let mut events = raw
        .watch(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(PATIENCE, events.message())
            .await
            .expect("an event in time")
            .expect("the stream stays up")
            .and_then(|e| e.event)
            .expect("an event")
    };
    let Event::Welcome(welcome) = next().await else {
        panic!("no welcome")
    };
    assert!(welcome.lease_ms > 1000, "{welcome:?}");
    to_leader
        .send(say(Msg::Renew(pb::WatchRenew { seq: 1 })))
        .await
        .unwrap();
    assert!(matches!(
        next().await,
        Event::Renewed(pb::WatchRenewed { seq: 1 })
    ));

    // A lookup that may be cached: d's names and d itself.
    let leased = |query| pb::QueryRequest {
        header: header.clone(),
        consistency: pb::Consistency::Linearizable as i32,
        lease_holder: 4242,
        query: Some(query),
    };
    let reply = raw
        .query(leased(pb::query_request::Query::Lookup(pb::Lookup {
            parent: ROOT,
            name: b"d".to_vec(),
            extents: false,
        })))
        .await
        .unwrap()
        .into_inner();
    let lease = reply.lease.expect("a lease answer");
    assert!(lease.granted && lease.term == welcome.term, "{lease:?}");

    // Another client changes d: the holder hears of it, and the change is
    // not done until the holder has dropped d.
    let writer = c.clone();
    let change = tokio::spawn(async move { writer.mkdir(d.ino, b"x", 0o755).await });
    let Event::Invalidate(inv) = next().await else {
        panic!("no invalidation")
    };
    assert!(inv.inos.contains(&d.ino), "{inv:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !change.is_finished(),
        "the change returned before the holder acknowledged or its lease ran out"
    );
    acknowledged(&to_leader, inv.change_id, change, header.clone()).await;
    // ...and is then sent what the change left, leased to it again: d's new
    // attributes and its new name.
    let Event::Refresh(r) = next().await else {
        panic!("no refresh")
    };
    assert!(
        r.attrs.iter().any(|a| a.ino == d.ino)
            && r.names
                .iter()
                .any(|n| n.parent == d.ino && n.name == b"x" && n.ino != 0),
        "{r:?}"
    );

    // A file looked up with its extents: the answer is all an open needs,
    // and the file itself is leased (a change to it is told). (The holder
    // holds d again: the create waits for it too.)
    let writer = c.clone();
    let change = tokio::spawn(async move { writer.create(d.ino, b"page", 0o644, true).await });
    let Event::Invalidate(inv) = next().await else {
        panic!("no invalidation")
    };
    let page = acknowledged(&to_leader, inv.change_id, change, header.clone()).await;
    assert!(matches!(next().await, Event::Refresh(_)));
    let lookup = |name: &[u8]| {
        leased(pb::query_request::Query::Lookup(pb::Lookup {
            parent: d.ino,
            name: name.to_vec(),
            extents: true,
        }))
    };
    let reply = raw.query(lookup(b"page")).await.unwrap().into_inner();
    assert!(reply.lease.is_some_and(|l| l.granted));
    let Some(pb::query_reply::Reply::FileExtents(fe)) = reply.reply else {
        panic!("a file's lookup with extents answers FileExtents: {reply:?}")
    };
    assert_eq!(fe.attr.map(|a| a.ino), Some(page.ino));
    // A directory's answer stays its attributes.
    let reply = raw.query(lookup(b"x")).await.unwrap().into_inner();
    assert!(
        matches!(reply.reply, Some(pb::query_reply::Reply::Attr(_))),
        "{reply:?}"
    );
    let writer = c.clone();
    let change = tokio::spawn(async move {
        writer
            .setattr(pb::SetAttr {
                ino: page.ino,
                mode: Some(0o600),
                ..Default::default()
            })
            .await
    });
    let Event::Invalidate(inv) = next().await else {
        panic!("no invalidation")
    };
    assert!(inv.inos.contains(&page.ino), "{inv:?}");
    acknowledged(&to_leader, inv.change_id, change, header.clone()).await;
    assert!(matches!(next().await, Event::Refresh(_)));

    // A holder that never answers holds a change up only until its leases
    // run out.
    to_leader
        .send(say(Msg::Renew(pb::WatchRenew { seq: 2 })))
        .await
        .unwrap();
    assert!(matches!(next().await, Event::Renewed(_)));
    let reply = raw
        .query(leased(pb::query_request::Query::GetAttr(pb::GetAttr {
            ino: d.ino,
            extents: false,
        })))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.lease.is_some_and(|l| l.granted));
    let started = std::time::Instant::now();
    c.mkdir(d.ino, b"y", 0o755).await.unwrap();
    eprintln!(
        "a change waited {:?} for a silent holder (lease {} ms)",
        started.elapsed(),
        welcome.lease_ms
    );
    assert!(matches!(next().await, Event::Invalidate(_)));
}

/// Write-behind: a flush from a client that holds no delegation of the
/// directory is refused and changes nothing; a client without a lease
/// stream is never delegated anything.
#[tokio::test(flavor = "multi_thread")]
async fn t29_a_flush_without_the_delegation_is_refused() {
    let (_tc, c) = TestCluster::start(&[]).await;
    let d = c.mkdir(ROOT, b"d", 0o755).await.unwrap();
    let op = pb::command::Op::Mkdir(pb::Mkdir {
        parent: d.ino,
        name: b"x".to_vec(),
        mode: 0o755,
        ..Default::default()
    });
    let flush = failsafe_client::Behind {
        delegate: 0,
        flush_of: d.ino,
    };
    let r = c.mutate_behind(op.clone(), flush).await;
    assert_eq!(
        r.err().and_then(|e| e.code()),
        Some(ErrorCode::DelegationLost)
    );
    assert!(
        c.readdir(d.ino).await.unwrap().is_empty(),
        "nothing applied"
    );
    let ask = failsafe_client::Behind {
        delegate: d.ino,
        flush_of: 0,
    };
    let (_, delegated) = c.mutate_behind(op, ask).await.unwrap();
    assert_eq!(delegated, None);
    assert_eq!(c.readdir(d.ino).await.unwrap().len(), 1);
}

/// A delegate's flush of several changes goes in one request and one log
/// entry, in order, each applied or refused alone; a batch from anyone
/// else, or with a change outside the delegated directory, is refused
/// whole.
#[tokio::test(flavor = "multi_thread")]
async fn t29_a_flush_of_several_changes_applies_each_alone_in_order() {
    let (tc, c) = TestCluster::start(&[]).await;
    let _dropped = c.enable_leases();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while c.lease_now().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no lease stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = c.mkdir(ROOT, b"d", 0o755).await.unwrap();
    let other = c.mkdir(ROOT, b"other", 0o755).await.unwrap();
    let mkdir = |parent: u64, name: &[u8]| {
        pb::command::Op::Mkdir(pb::Mkdir {
            parent,
            name: name.to_vec(),
            mode: 0o755,
            ..Default::default()
        })
    };
    let ask = failsafe_client::Behind {
        delegate: d.ino,
        flush_of: 0,
    };
    let (_, delegated) = c.mutate_behind(mkdir(d.ino, b"first"), ask).await.unwrap();
    assert!(delegated.is_some(), "the directory is delegated");

    // Not a flush: refused, nothing applied.
    let batch = pb::command::Op::Batch(pb::Batch {
        commands: vec![pb::Command {
            op: Some(mkdir(d.ino, b"outside")),
            ..Default::default()
        }],
    });
    let r = c.mutate(batch).await;
    assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::Invalid));
    // A change of another directory in the flush: refused whole.
    let r = c
        .flush_behind(vec![mkdir(d.ino, b"a"), mkdir(other.ino, b"b")], d.ino)
        .await;
    assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::Invalid));
    assert_eq!(c.readdir(other.ino).await.unwrap().len(), 0);

    let results = c
        .flush_behind(
            vec![
                mkdir(d.ino, b"a"),
                mkdir(d.ino, b"a"),
                pb::command::Op::Rename(pb::Rename {
                    parent: d.ino,
                    name: b"a".to_vec(),
                    new_parent: d.ino,
                    new_name: b"b".to_vec(),
                    no_replace: true,
                    ..Default::default()
                }),
                mkdir(d.ino, b"a"),
            ],
            d.ino,
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(
        results[1].as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::Exists)
    );
    assert!(results[2].is_ok() && results[3].is_ok(), "{results:?}");
    let names: BTreeSet<Vec<u8>> = c
        .readdir(d.ino)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let want: BTreeSet<Vec<u8>> = [&b"a"[..], b"b", b"first"]
        .iter()
        .map(|n| n.to_vec())
        .collect();
    assert_eq!(names, want, "applied in order");

    // Another client reads the directory: the delegation is recalled. A
    // flush after that is applied late, each change alone, as an ordinary
    // one that says what it expects (the mkdir of a taken name fails).
    let reader = tc.client_in("a").await;
    assert_eq!(reader.readdir(d.ino).await.unwrap().len(), 3);
    let results = c
        .flush_behind(vec![mkdir(d.ino, b"late"), mkdir(d.ino, b"b")], d.ino)
        .await
        .unwrap();
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(
        results[1].as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::Exists)
    );
    assert_eq!(reader.readdir(d.ino).await.unwrap().len(), 4);
}
