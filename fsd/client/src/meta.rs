//! Metadata operations: each is one tracker command or query.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use failsafe_proto::pb::{
    self, command::Op, command_result, query_reply::Reply, query_request::Query, Consistency,
};

use crate::stats::RpcKind;
use crate::{Client, ClientError};

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub(crate) fn refused(e: pb::CommandError) -> ClientError {
    ClientError::Refused {
        code: pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::ErrorUnspecified),
        message: e.message,
    }
}

fn unexpected(what: &str) -> ClientError {
    ClientError::Unavailable(format!("unexpected reply to {what}"))
}

/// A lock request, POSIX byte range or flock.
#[derive(Debug, Clone, Copy)]
pub struct LockRequest {
    pub ino: u64,
    /// The lock owner: a process for POSIX locks, an open file for flock.
    pub owner: u64,
    pub kind: pb::LockKind,
    pub ltype: pb::LockType,
    pub start: u64,
    pub end: u64,
}

/// What a change asks of write-behind (docs/write-behind.md): the directory
/// to be delegated to this client after it, and the directory whose
/// delegation it flushes; 0 for none.
#[derive(Debug, Default, Clone, Copy)]
pub struct Behind {
    pub delegate: u64,
    pub flush_of: u64,
}

impl Client {
    /// Proposes a command; retries keep its operation id, so it is applied once.
    pub async fn mutate(&self, op: Op) -> Result<command_result::Result, ClientError> {
        self.mutate_behind(op, Behind::default())
            .await
            .map(|(r, _)| r)
    }

    /// [`Client::mutate`] with what it asks of write-behind: also returns
    /// the lease stream epoch under which the directory asked for in
    /// `behind.delegate` is now delegated to this client (valid while that
    /// stream's leases are; see [`Client::lease_now`]).
    pub async fn mutate_behind(
        &self,
        op: Op,
        behind: Behind,
    ) -> Result<(command_result::Result, Option<u64>), ClientError> {
        let cmd = self.command(op);
        self.send_change(cmd, behind).await
    }

    /// A delegate's flush of `ops`, its changes of the delegated directory
    /// `flush_of`, in one request: applied in this order in one log entry,
    /// each refused alone if it cannot apply (its own operation id, so a
    /// retry applies none twice). Each change's result, in order; an error
    /// for the whole when the request failed (then some may have applied,
    /// as with one change).
    ///
    /// When the delegation lapsed before the flush reached the leader (a
    /// new leader knows none, or this client was cut off for a lease), each
    /// change is sent again alone as an ordinary one, under the same
    /// operation id (one that did apply before the reply was lost is
    /// answered from its first application): it applies if nobody changed
    /// its names meanwhile (each says what it expects to find, and a mkdir
    /// or create never replaces anything), else it is refused.
    pub async fn flush_behind(
        &self,
        ops: Vec<Op>,
        flush_of: u64,
    ) -> Result<Vec<Result<command_result::Result, ClientError>>, ClientError> {
        let n = ops.len();
        let commands: Vec<pb::Command> = ops.into_iter().map(|op| self.command(op)).collect();
        let cmd = pb::Command {
            now_ns: 0,
            op: Some(Op::Batch(pb::Batch {
                commands: commands.clone(),
            })),
            ..Default::default()
        };
        let behind = Behind {
            delegate: 0,
            flush_of,
        };
        let result = match self.send_change(cmd, behind).await {
            Err(e) if e.code() == Some(pb::ErrorCode::DelegationLost) => {
                tracing::info!(
                    dir = flush_of,
                    changes = n,
                    "write-behind: delegation lapsed; applying the flush late"
                );
                let mut late = Vec::with_capacity(n);
                for cmd in commands {
                    late.push(
                        self.send_change(cmd, Behind::default())
                            .await
                            .map(|(r, _)| r),
                    );
                }
                return Ok(late);
            }
            r => r?,
        };
        match result {
            (command_result::Result::Batch(b), _) if b.results.len() == n => Ok(b
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(command_result::Result::Error(e)) => Err(refused(e)),
                    Some(r) => Ok(r),
                    None => Err(unexpected("a flush")),
                })
                .collect()),
            _ => Err(unexpected("a flush")),
        }
    }

    /// `op` as a command of this client's, under a new operation id.
    pub(crate) fn command(&self, op: Op) -> pb::Command {
        // A change's times are the leader's clock (0 here: it stamps them),
        // not this web host's, which may be off (review B5); a session's
        // renewal carries this host's clock only for the leader to compare.
        let now = match op {
            Op::OpenSession(_) | Op::Heartbeat(_) => now_ns(),
            _ => 0,
        };
        pb::Command {
            client_id: self.inner.client_id,
            op_id: self.next_op_id(),
            now_ns: now,
            leader_ns: 0,
            op: Some(op),
        }
    }

    async fn send_change(
        &self,
        cmd: pb::Command,
        behind: Behind,
    ) -> Result<(command_result::Result, Option<u64>), ClientError> {
        let writer_zone = match &self.inner.cfg.zone {
            Some(zone) if !self.inner.cfg.background => zone.clone(),
            _ => String::new(),
        };
        let own = self.own_change_start();
        let reply = self
            .with_leader(RpcKind::MetaMutate, "metadata change", |addr| {
                // A flush is judged by whether this client still holds the
                // delegation, not by whether its stream is up just now.
                let lease_holder = match behind.flush_of {
                    0 => self.lease_holder(),
                    _ => self.inner.client_id,
                };
                let req = pb::MutateRequest {
                    lease_holder,
                    header: self.header(),
                    command: Some(cmd.clone()),
                    writer_zone: writer_zone.clone(),
                    delegate: behind.delegate,
                    flush_of: behind.flush_of,
                };
                let c = self.meta(&addr);
                async move {
                    c.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                        .mutate(req)
                        .await
                }
            })
            .await
            .map(|r| r.into_inner());
        let delegated = self.own_change(own, &cmd, reply.as_ref().ok());
        let result = reply?.result.ok_or_else(|| unexpected("mutate"))?;
        match result.result {
            Some(command_result::Result::Error(e)) => Err(refused(e)),
            Some(r) => Ok((r, delegated)),
            None => Err(unexpected("mutate")),
        }
    }

    pub(crate) async fn mutate_attr(&self, op: Op) -> Result<pb::Attr, ClientError> {
        self.mutate_attr_cmd(self.command(op)).await
    }

    /// Sends `cmd` as it is (a retry of one whose outcome is unknown keeps
    /// its operation id); its result must be attributes.
    pub(crate) async fn mutate_attr_cmd(&self, cmd: pb::Command) -> Result<pb::Attr, ClientError> {
        match self.send_change(cmd, Behind::default()).await?.0 {
            command_result::Result::Attr(a) => Ok(a),
            _ => Err(unexpected("mutate")),
        }
    }

    async fn mutate_ok(&self, op: Op) -> Result<(), ClientError> {
        self.mutate(op).await.map(|_| ())
    }

    /// A linearizable query, answered by the leader.
    pub async fn query(&self, q: Query) -> Result<Reply, ClientError> {
        self.query_with(q, Consistency::Linearizable).await
    }

    pub async fn query_with(
        &self,
        q: Query,
        consistency: Consistency,
    ) -> Result<Reply, ClientError> {
        self.query_within(q, consistency, self.inner.cfg.op_deadline)
            .await
    }

    /// A linearizable read answered by the nearest member that can (it asks
    /// the leader for the commit point and answers from its own state), so
    /// replies come from nearby and only the confirmation crosses to the
    /// leader. Without a majority for `read_fallback_after`, it settles for
    /// the freshest answer a reachable member has: reads of reachable data
    /// go on in limp mode.
    pub async fn query_available(&self, q: Query) -> Result<Reply, ClientError> {
        let deadline = std::time::Instant::now() + self.inner.cfg.read_fallback_after;
        let mut why = String::from("no members");
        let mut pause = Duration::from_millis(20);
        loop {
            for addr in self.members_by_distance() {
                match self
                    .query_at(&addr, q.clone(), Consistency::ReadIndex)
                    .await
                {
                    Ok(r) => return Ok(r),
                    Err(e @ ClientError::Refused { .. }) => return Err(e),
                    Err(ClientError::Rejected { status, .. })
                        if !crate::net::is_transient(&status) =>
                    {
                        return Err(ClientError::Rejected { addr, status })
                    }
                    Err(e) => why = e.to_string(),
                }
                if std::time::Instant::now() >= deadline {
                    break;
                }
            }
            if std::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(150));
        }
        // A lagging member may not know what others have applied: a refusal
        // from one is kept only if no member has an answer.
        let mut refusal = None;
        for addr in self.members_by_distance() {
            match self.query_at(&addr, q.clone(), Consistency::Local).await {
                Ok(r) => return Ok(r),
                Err(e @ ClientError::Refused { .. }) => refusal = Some(e),
                Err(_) => continue,
            }
        }
        Err(refusal.unwrap_or(ClientError::Unavailable(why)))
    }

    /// Members, nearest first; those that recently timed out last.
    fn members_by_distance(&self) -> Vec<String> {
        let mut members = self.members();
        members.sort_by_key(|m| {
            (
                self.is_suspect(m),
                self.rtt(m).unwrap_or(Duration::from_millis(50)),
            )
        });
        members
    }

    async fn query_within(
        &self,
        q: Query,
        consistency: Consistency,
        deadline: Duration,
    ) -> Result<Reply, ClientError> {
        match self.query_leased(q, consistency, deadline, 0).await?.0 {
            Reply::Error(e) => Err(refused(e)),
            r => Ok(r),
        }
    }

    /// A query for lease holder `holder` (0: none): the answer, and the
    /// leader's word on caching it. A refusal (`NotFound`) is an answer too.
    pub(crate) async fn query_leased(
        &self,
        q: Query,
        consistency: Consistency,
        deadline: Duration,
        holder: u64,
    ) -> Result<(Reply, Option<pb::LeaseGrant>), ClientError> {
        let rpc_timeout = self.inner.cfg.rpc_timeout;
        let reply = self
            .with_leader_timeout(
                RpcKind::MetaQuery,
                "metadata read",
                rpc_timeout,
                deadline,
                |addr| {
                    let req = pb::QueryRequest {
                        lease_holder: holder,
                        header: self.header(),
                        consistency: consistency as i32,
                        query: Some(q.clone()),
                    };
                    let c = self.meta(&addr);
                    async move {
                        c.map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
                            .query(req)
                            .await
                    }
                },
            )
            .await?
            .into_inner();
        match reply.reply {
            Some(r) => Ok((r, reply.lease)),
            None => Err(unexpected("query")),
        }
    }

    async fn query_attr(&self, q: Query) -> Result<pb::Attr, ClientError> {
        match self.query(q).await? {
            Reply::Attr(a) => Ok(a),
            _ => Err(unexpected("query")),
        }
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<pb::Attr, ClientError> {
        self.query_attr(Query::Lookup(pb::Lookup {
            parent,
            name: name.to_vec(),
            extents: false,
        }))
        .await
    }

    pub async fn getattr(&self, ino: u64) -> Result<pb::Attr, ClientError> {
        self.query_attr(Query::GetAttr(pb::GetAttr {
            ino,
            extents: false,
        }))
        .await
    }

    pub async fn setattr(&self, set: pb::SetAttr) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::SetAttr(set)).await
    }

    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::Create(pb::Create {
            parent,
            name: name.to_vec(),
            mode,
            uid: 0,
            gid: 0,
            exclusive,
            ..Default::default()
        }))
        .await
    }

    /// Makes a special file: a FIFO, a unix socket's inode, or a device
    /// node with device number `rdev` (as mknod(2); `kind` a special one).
    pub async fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: pb::FileKind,
        mode: u32,
        rdev: u32,
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::Create(pb::Create {
            parent,
            name: name.to_vec(),
            mode,
            exclusive: true,
            kind: kind as i32,
            rdev,
            ..Default::default()
        }))
        .await
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::Mkdir(pb::Mkdir {
            parent,
            name: name.to_vec(),
            mode,
            uid: 0,
            gid: 0,
        }))
        .await
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), ClientError> {
        self.mutate_ok(Op::Unlink(pb::Unlink {
            parent,
            name: name.to_vec(),
            expect: 0,
        }))
        .await
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), ClientError> {
        self.mutate_ok(Op::Rmdir(pb::Rmdir {
            parent,
            name: name.to_vec(),
        }))
        .await
    }

    pub async fn rename(&self, r: pb::Rename) -> Result<(), ClientError> {
        self.mutate_ok(Op::Rename(r)).await
    }

    pub async fn link(
        &self,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::Link(pb::Link {
            ino,
            new_parent,
            new_name: new_name.to_vec(),
        }))
        .await
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::Symlink(pb::Symlink {
            parent,
            name: name.to_vec(),
            target: target.to_vec(),
            uid: 0,
            gid: 0,
        }))
        .await
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, ClientError> {
        match self.query(Query::ReadLink(pb::ReadLink { ino })).await? {
            Reply::Target(t) => Ok(t.target),
            _ => Err(unexpected("readlink")),
        }
    }

    /// One page of a directory: entries after `after`, in name order.
    pub async fn readdir_page(
        &self,
        ino: u64,
        after: &[u8],
        limit: u32,
    ) -> Result<pb::DirPage, ClientError> {
        match self
            .query(Query::ReadDir(pb::ReadDir {
                ino,
                after: after.to_vec(),
                limit,
                plus: false,
                extents: false,
            }))
            .await?
        {
            Reply::DirPage(p) => Ok(p),
            _ => Err(unexpected("readdir")),
        }
    }

    /// A whole directory, page by page.
    pub async fn readdir(&self, ino: u64) -> Result<Vec<pb::DirEntry>, ClientError> {
        let mut all: Vec<pb::DirEntry> = Vec::new();
        loop {
            let after = all.last().map(|e| e.name.clone()).unwrap_or_default();
            let page = self.readdir_page(ino, &after, 1000).await?;
            all.extend(page.entries);
            if !page.more {
                return Ok(all);
            }
        }
    }

    pub async fn statfs(&self) -> Result<pb::FsStats, ClientError> {
        match self.query(Query::StatFs(pb::StatFs {})).await? {
            Reply::FsStats(s) => Ok(s),
            _ => Err(unexpected("statfs")),
        }
    }

    pub async fn read_extents(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
    ) -> Result<pb::FileExtents, ClientError> {
        match self
            .query(Query::ReadExtents(pb::ReadExtents {
                ino,
                offset,
                length,
            }))
            .await?
        {
            Reply::FileExtents(f) => Ok(f),
            _ => Err(unexpected("read extents")),
        }
    }

    pub async fn commit_extents(
        &self,
        ino: u64,
        extents: Vec<pb::Extent>,
        copies: Vec<pb::BlockCopies>,
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::CommitExtents(pb::CommitExtents {
            ino,
            extents,
            copies,
            append: false,
            truncate: false,
        }))
        .await
    }

    /// Appends: extent offsets are relative to the file's size at commit.
    pub async fn commit_append(
        &self,
        ino: u64,
        extents: Vec<pb::Extent>,
        copies: Vec<pb::BlockCopies>,
    ) -> Result<pb::Attr, ClientError> {
        self.mutate_attr(Op::CommitExtents(pb::CommitExtents {
            ino,
            extents,
            copies,
            append: true,
            truncate: false,
        }))
        .await
    }

    /// The extended attributes of `ino`, names and values, in name order.
    pub async fn xattrs(&self, ino: u64) -> Result<Vec<pb::Xattr>, ClientError> {
        match self
            .query(Query::ListXattrs(pb::ListXattrs { ino }))
            .await?
        {
            Reply::Xattrs(x) => Ok(x.entries),
            _ => Err(unexpected("list xattrs")),
        }
    }

    pub async fn list_locks(&self, ino: u64) -> Result<Vec<pb::LockInfo>, ClientError> {
        match self.query(Query::ListLocks(pb::ListLocks { ino })).await? {
            Reply::LockList(l) => Ok(l.locks),
            _ => Err(unexpected("list locks")),
        }
    }

    /// Opens a session with a lease of `ttl`, kept alive by a background
    /// heartbeat until the `Session` is closed or dropped.
    pub async fn open_session(&self, ttl: Duration) -> Result<Session, ClientError> {
        let session_id = rand::random::<u64>() | 1;
        self.mutate_ok(Op::OpenSession(pb::OpenSession {
            session_id,
            client_name: self.inner.cfg.name.clone(),
            ttl_ms: ttl.as_millis().max(1) as u64,
        }))
        .await?;
        let client = self.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(e) = client
                    .mutate_ok(Op::Heartbeat(pb::Heartbeat { session_id }))
                    .await
                {
                    tracing::warn!(session = session_id, error = %e, "session heartbeat failed");
                    if e.code() == Some(pb::ErrorCode::NoSession) {
                        return;
                    }
                }
            }
        });
        Ok(Session {
            client: self.clone(),
            id: session_id,
            heartbeat,
        })
    }

    /// Takes, changes or releases a lock; `WouldBlock` if another owner holds
    /// a conflicting one.
    pub async fn lock(&self, session: &Session, l: LockRequest) -> Result<(), ClientError> {
        self.mutate_ok(Op::Lock(pb::Lock {
            session_id: session.id,
            ino: l.ino,
            owner: l.owner,
            kind: l.kind as i32,
            r#type: l.ltype as i32,
            start: l.start,
            end: l.end,
        }))
        .await
    }
}

/// A client session: holds locks while its heartbeat keeps the lease alive.
pub struct Session {
    client: Client,
    pub id: u64,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Stops heartbeating without telling the tracker, as a crashed client
    /// would: the lease then expires and the locks are released.
    pub fn abandon(self) {
        self.heartbeat.abort();
    }

    /// Ends the session and releases its locks now.
    pub async fn close(self) -> Result<(), ClientError> {
        self.heartbeat.abort();
        self.client
            .mutate_ok(Op::CloseSession(pb::CloseSession {
                session_id: self.id,
            }))
            .await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Client {
    /// A query answered by the member at `addr` alone, from what it has
    /// applied (`Local`), or after it confirms it leads (`Linearizable`).
    pub async fn query_at(
        &self,
        addr: &str,
        q: Query,
        consistency: Consistency,
    ) -> Result<Reply, ClientError> {
        let req = pb::QueryRequest {
            lease_holder: 0,
            header: self.header(),
            consistency: consistency as i32,
            query: Some(q),
        };
        let mut meta = self.meta(addr)?;
        let started = std::time::Instant::now();
        let rpc = self.inner.rpcs.start(RpcKind::MetaQuery, true);
        let answer = tokio::time::timeout(self.inner.cfg.rpc_timeout, meta.query(req)).await;
        rpc.end_timed(&answer);
        let reply = match answer {
            Ok(Ok(r)) => {
                self.record_ok(addr, started.elapsed());
                r.into_inner()
            }
            Ok(Err(status)) => {
                return Err(ClientError::Rejected {
                    addr: addr.to_string(),
                    status,
                })
            }
            Err(_) => {
                self.record_timeout(addr, started, self.inner.cfg.rpc_timeout);
                return Err(ClientError::Unavailable(format!("{addr} did not answer")));
            }
        };
        match reply.reply {
            Some(Reply::Error(e)) => Err(refused(e)),
            Some(r) => Ok(r),
            None => Err(unexpected("query")),
        }
    }
}
