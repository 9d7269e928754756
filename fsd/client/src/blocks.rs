//! Block I/O: writes to the write quorum of the devices the tracker chose,
//! reads from the nearest intact copy.

use std::collections::HashMap;
use std::time::Duration;

use failsafe_core::{block_hash, hash_hex, MAX_BLOCK_BYTES, MAX_INLINE_BYTES};
use failsafe_proto::pb::{self, query_reply::Reply, query_request::Query};
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};

use crate::stats::{fan_out_round_trip, RpcKind};
use crate::{Client, ClientError};

/// Bytes `[from, to)` of the file from inline extent `e`; `None` when the
/// range misses it (or the extent is malformed: shorter data than length).
pub fn inline_bytes(e: &pb::Extent, from: u64, to: u64) -> Option<&[u8]> {
    if from >= to || from < e.offset {
        return None;
    }
    let skip = usize::try_from(from - e.offset).ok()?;
    let len = usize::try_from(to - from).ok()?;
    e.data.get(skip..skip.checked_add(len)?)
}

/// What a read says of an inline extent whose data is shorter than its length.
pub fn malformed_inline() -> ClientError {
    ClientError::Unavailable("the tracker sent an inline extent shorter than its length".into())
}

/// Chunk size of a block on the wire.
const CHUNK: usize = 256 * 1024;
/// After the quorum has acknowledged, how long to wait for the other copies
/// before leaving them to finish in the background.
const STRAGGLER_GRACE: Duration = Duration::from_millis(200);
/// Blocks of one write on their way to their devices at once: a large write
/// overlaps the hosts' fsyncs instead of waiting for each block's quorum in
/// turn (up to 4 × 4 MiB × 3 copies in flight).
const PUTS_IN_FLIGHT: usize = 4;

/// How [`Client::store`] commits its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commit {
    /// O_APPEND: the offset counts from the file's size when the tracker
    /// applies the commit.
    pub append: bool,
    /// The file is emptied first, in the same command (an O_TRUNC open's
    /// truncation, committed with the file's new bytes).
    pub truncate: bool,
}

/// A commit of bytes already stored, under its operation id (see
/// [`Client::prepare_store`]).
#[derive(Debug, Clone)]
pub struct PreparedCommit {
    cmd: pb::Command,
}

impl PreparedCommit {
    /// Whether it empties the file first (an O_TRUNC open's truncation).
    pub fn truncates(&self) -> bool {
        matches!(&self.cmd.op, Some(pb::command::Op::CommitExtents(c)) if c.truncate)
    }
}

impl Client {
    /// Stores one block on one device.
    pub async fn put_block(
        &self,
        addr: &str,
        device_id: u64,
        data: &[u8],
    ) -> Result<(), tonic::Status> {
        self.put_block_rpc(addr, device_id, data, true).await
    }

    /// `alone`: awaited on its own (a round trip), not one of a fan-out.
    async fn put_block_rpc(
        &self,
        addr: &str,
        device_id: u64,
        data: &[u8],
        alone: bool,
    ) -> Result<(), tonic::Status> {
        let hash = block_hash(data).to_vec();
        let header = self.header();
        let size = data.len() as u64;
        let mut chunks: Vec<pb::PutChunk> = data
            .chunks(CHUNK)
            .map(|c| pb::PutChunk {
                header: None,
                hash: Vec::new(),
                device_id: 0,
                size: 0,
                data: c.to_vec(),
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(pb::PutChunk::default());
        }
        chunks[0].header = header;
        chunks[0].hash = hash;
        chunks[0].device_id = device_id;
        chunks[0].size = size;
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut req = tonic::Request::new(tokio_stream::iter(chunks));
        req.set_timeout(self.inner.cfg.block_timeout);
        let started = std::time::Instant::now();
        let rpc = self.inner.rpcs.start(RpcKind::BlockPut, alone);
        let answer = tokio::time::timeout(self.inner.cfg.block_timeout, blocks.put(req)).await;
        rpc.end_timed(&answer);
        match answer {
            Ok(r) => {
                if r.is_ok() {
                    self.record_ok(addr, started.elapsed());
                }
                r.map(|_| ())
            }
            Err(_) => {
                self.record_timeout(addr, started, self.inner.cfg.block_timeout);
                Err(tonic::Status::cancelled(format!(
                    "block put to {addr} timed out"
                )))
            }
        }
    }

    /// Reads one block from one device and checks it against its name.
    pub async fn get_block(
        &self,
        addr: &str,
        device_id: u64,
        hash: &[u8],
    ) -> Result<Vec<u8>, tonic::Status> {
        self.get_block_rpc(addr, device_id, hash, true).await
    }

    /// `alone`: awaited on its own (a round trip), not one of a fan-out.
    async fn get_block_rpc(
        &self,
        addr: &str,
        device_id: u64,
        hash: &[u8],
        alone: bool,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut req = tonic::Request::new(pb::GetRequest {
            header: self.header(),
            hash: hash.to_vec(),
            device_id,
        });
        req.set_timeout(self.inner.cfg.block_timeout);
        let fetch = async {
            let mut stream = blocks.get(req).await?.into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await? {
                if data.len() + chunk.data.len() > MAX_BLOCK_BYTES {
                    return Err(tonic::Status::out_of_range(
                        "block larger than the block limit",
                    ));
                }
                data.extend_from_slice(&chunk.data);
            }
            Ok(data)
        };
        let started = std::time::Instant::now();
        let rpc = self.inner.rpcs.start(RpcKind::BlockGet, alone);
        let answer = tokio::time::timeout(self.inner.cfg.block_timeout, fetch).await;
        rpc.end_timed(&answer);
        let data = match answer {
            Ok(r) => r?,
            Err(_) => {
                self.record_timeout(addr, started, self.inner.cfg.block_timeout);
                return Err(tonic::Status::cancelled(format!(
                    "block get from {addr} timed out"
                )));
            }
        };
        self.record_ok(addr, started.elapsed());
        if block_hash(&data)[..] != hash[..] {
            return Err(tonic::Status::data_loss(format!(
                "block {} from {addr} does not match its hash",
                hash_hex(hash)
            )));
        }
        Ok(data)
    }

    /// Which of `hashes` device `device_id` at `addr` holds (by presence).
    pub async fn has_blocks(
        &self,
        addr: &str,
        device_id: u64,
        hashes: &[Vec<u8>],
    ) -> Result<Vec<bool>, tonic::Status> {
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut req = tonic::Request::new(pb::HasRequest {
            header: self.header(),
            hashes: hashes.to_vec(),
            device_id,
        });
        let timeout = self.inner.cfg.rpc_timeout;
        req.set_timeout(timeout);
        let started = std::time::Instant::now();
        let rpc = self.inner.rpcs.start(RpcKind::BlockHas, true);
        let answer = tokio::time::timeout(timeout, blocks.has(req)).await;
        rpc.end_timed(&answer);
        let reply = match answer {
            Ok(r) => r?.into_inner(),
            Err(_) => {
                self.record_timeout(addr, started, timeout);
                return Err(tonic::Status::cancelled(format!(
                    "block lookup at {addr} timed out"
                )));
            }
        };
        if reply.device_ids.len() != hashes.len() {
            let (got, asked) = (reply.device_ids.len(), hashes.len());
            return Err(tonic::Status::internal(format!(
                "{addr} answered for {got} of {asked} blocks"
            )));
        }
        Ok(reply
            .device_ids
            .into_iter()
            .map(|d| d == device_id)
            .collect())
    }

    /// Deletes one block from one device, unless it was stored there less
    /// than `min_age` ago. Only repair and garbage collection call this, and
    /// only once the tracker no longer records the copy.
    pub async fn delete_block(
        &self,
        addr: &str,
        device_id: u64,
        hash: &[u8],
        min_age: Duration,
    ) -> Result<pb::DeleteReply, tonic::Status> {
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let min_age_ms = min_age.as_millis().min(u128::from(u64::MAX)) as u64;
        let mut req = tonic::Request::new(pb::DeleteRequest {
            header: self.header(),
            hash: hash.to_vec(),
            device_id,
            min_age_ms,
        });
        let timeout = self.inner.cfg.rpc_timeout;
        req.set_timeout(timeout);
        let started = std::time::Instant::now();
        let rpc = self.inner.rpcs.start(RpcKind::BlockDelete, true);
        let answer = tokio::time::timeout(timeout, blocks.delete(req)).await;
        rpc.end_timed(&answer);
        match answer {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => {
                self.record_timeout(addr, started, timeout);
                Err(tonic::Status::cancelled(format!(
                    "block delete at {addr} timed out"
                )))
            }
        }
    }

    /// The rsync signature of a block on `device_id` at `addr`.
    pub async fn block_signature(
        &self,
        addr: &str,
        device_id: u64,
        hash: &[u8],
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let req = self.block_request(pb::SignatureRequest {
            header: self.header(),
            hash: hash.to_vec(),
            device_id,
        });
        Ok(self
            .within(addr, "signature", blocks.signature(req))
            .await?
            .signature)
    }

    /// The delta from the block behind `signature` to block `hash` at `addr`.
    pub async fn block_delta(
        &self,
        addr: &str,
        device_id: u64,
        hash: &[u8],
        signature: Vec<u8>,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let req = self.block_request(pb::DeltaRequest {
            header: self.header(),
            hash: hash.to_vec(),
            device_id,
            signature,
        });
        Ok(self.within(addr, "delta", blocks.delta(req)).await?.delta)
    }

    /// Stores block `hash` on `device_id` at `addr` by applying `delta` to
    /// the block `base` it holds there (refused unless the result has the hash).
    pub async fn put_delta(
        &self,
        addr: &str,
        device_id: u64,
        hash: &[u8],
        base: &[u8],
        delta: Vec<u8>,
    ) -> Result<(), tonic::Status> {
        let mut blocks = self
            .blocks(addr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let req = self.block_request(pb::PutDeltaRequest {
            header: self.header(),
            hash: hash.to_vec(),
            device_id,
            base: base.to_vec(),
            delta,
        });
        self.within(addr, "delta put", blocks.put_delta(req))
            .await?;
        Ok(())
    }

    fn block_request<Q>(&self, msg: Q) -> tonic::Request<Q> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.inner.cfg.block_timeout);
        req
    }

    /// Awaits one unary block call under the block deadline.
    async fn within<R>(
        &self,
        addr: &str,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    ) -> Result<R, tonic::Status> {
        let started = std::time::Instant::now();
        let rpc = self.inner.rpcs.start(RpcKind::BlockDelta, true);
        let answer = tokio::time::timeout(self.inner.cfg.block_timeout, call).await;
        rpc.end_timed(&answer);
        match answer {
            Ok(r) => {
                let r = r?.into_inner();
                self.record_ok(addr, started.elapsed());
                Ok(r)
            }
            Err(_) => {
                self.record_timeout(addr, started, self.inner.cfg.block_timeout);
                Err(tonic::Status::cancelled(format!(
                    "block {what} at {addr} timed out"
                )))
            }
        }
    }

    /// Writes blocks to the devices the tracker places them on. Returns, per
    /// block, the devices that hold it once at least the write quorum has it.
    pub async fn put_blocks(
        &self,
        blocks: &[Vec<u8>],
    ) -> Result<Vec<pb::BlockCopies>, ClientError> {
        for b in blocks {
            if b.len() > MAX_BLOCK_BYTES {
                return Err(ClientError::Invalid(format!(
                    "block of {} bytes over the limit",
                    b.len()
                )));
            }
        }
        let hashes: Vec<Vec<u8>> = blocks.iter().map(|b| block_hash(b).to_vec()).collect();
        let copies_wanted = 3u32;
        // Ask for spares: if a chosen device fails, the next one takes its copy.
        // Placement is a pure function of the layout: any member's view will
        // do, so a leader election does not hold up block writes.
        let place = Query::Place(pb::Place {
            hashes: hashes.clone(),
            copies: copies_wanted + 2,
        });
        let placement = match self.query_available(place).await? {
            Reply::Placement(p) => p,
            _ => {
                return Err(ClientError::Unavailable(
                    "unexpected reply to placement".into(),
                ))
            }
        };
        let addrs: HashMap<u64, String> = placement
            .devices
            .iter()
            .map(|d| (d.device_id, d.addr.clone()))
            .collect();
        let quorum = placement.write_quorum.max(1) as usize;
        // Up to PUTS_IN_FLIGHT blocks travel together: a round trip per
        // group of them (the copies of one block travel in parallel too).
        for _ in 0..blocks.len().div_ceil(PUTS_IN_FLIGHT) {
            fan_out_round_trip();
        }
        let mut puts = Vec::with_capacity(blocks.len());
        for ((data, hash), choice) in blocks.iter().zip(&hashes).zip(&placement.choices) {
            let targets: Vec<(u64, String)> = choice
                .device_ids
                .iter()
                .filter_map(|d| addrs.get(d).map(|a| (*d, a.clone())))
                .collect();
            let want = (copies_wanted as usize).min(targets.len());
            puts.push(async move {
                let devices = self.put_to_quorum(data, &targets, want, quorum).await?;
                Ok::<_, ClientError>(pb::BlockCopies {
                    hash: hash.clone(),
                    size: data.len() as u64,
                    device_ids: devices,
                })
            });
        }
        // In order, and the first failure ends the write (the blocks already
        // stored are garbage that gc collects).
        futures::stream::iter(puts)
            .buffered(PUTS_IN_FLIGHT)
            .try_collect()
            .await
    }

    async fn put_to_quorum(
        &self,
        data: &[u8],
        targets: &[(u64, String)],
        want: usize,
        quorum: usize,
    ) -> Result<Vec<u64>, ClientError> {
        let data = std::sync::Arc::new(data.to_vec());
        let mut spares = targets.iter().skip(want).cloned();
        let start = |(dev, addr): (u64, String)| {
            let client = self.clone();
            let data = data.clone();
            async move {
                let r = client.put_block_rpc(&addr, dev, &data, false).await;
                (dev, addr, r)
            }
        };
        // The copies travel in parallel: one round trip, counted by the
        // caller; a spare sent after a failure waits for that failure first,
        // so it adds one.
        let mut running: FuturesUnordered<_> =
            targets.iter().take(want).cloned().map(start).collect();
        let mut acked = Vec::new();
        let mut last_error = String::from("no devices to write to");
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace {
                Some(until) => match tokio::time::timeout_at(until, running.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
                None => running.next().await,
            };
            let Some((dev, addr, r)) = next else { break };
            match r {
                Ok(()) => acked.push(dev),
                Err(s) => {
                    tracing::debug!(device = dev, %addr, error = %s.message(), "block put failed");
                    last_error = format!("{addr}: {}", s.message());
                    if let Some(spare) = spares.next() {
                        fan_out_round_trip();
                        running.push(start(spare));
                    }
                }
            }
            if acked.len() >= want {
                break;
            }
            if acked.len() >= quorum && grace.is_none() {
                grace = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
            }
        }
        if acked.len() < quorum {
            return Err(ClientError::Quorum {
                acked: acked.len(),
                needed: quorum,
                last_error,
            });
        }
        if !running.is_empty() {
            // Copies still in flight finish in the background and are recorded
            // then; repair restores any that never arrive.
            let client = self.clone();
            let hash = block_hash(&data).to_vec();
            let size = data.len() as u64;
            tokio::spawn(async move {
                let late: Vec<u64> = running
                    .filter_map(|(dev, _, r)| async move { r.ok().map(|()| dev) })
                    .collect()
                    .await;
                if !late.is_empty() {
                    let copies = vec![pb::BlockCopies {
                        hash,
                        size,
                        device_ids: late,
                    }];
                    let op = pb::command::Op::RecordCopies(pb::RecordCopies { copies });
                    if let Err(e) = client.mutate(op).await {
                        tracing::warn!(error = %e, "recording late block copies failed");
                    }
                }
            });
        }
        Ok(acked)
    }

    /// Writes `data` at `offset` of file `ino` and commits it (see `store`).
    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<pb::Attr, ClientError> {
        self.store(ino, offset, data, Commit::default()).await
    }

    /// Stores `data` at `offset` of file `ino` (see [`Commit`] for `how`) in
    /// one commit; with `how.truncate`, also no data (the truncation alone).
    /// Up to `MAX_INLINE_BYTES` the bytes travel inline, in the
    /// `CommitExtents` itself: its Raft entry, on a quorum of trackers, is
    /// their durable copy, so there is no placement, no block put and no
    /// copy record on the way (the leader's blockifier makes blocks of them
    /// later). Larger data, or a file that already holds as many inline
    /// bytes as it may, goes as blocks: to the write quorum first, then the
    /// extents that point at them.
    pub async fn store(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        how: Commit,
    ) -> Result<pb::Attr, ClientError> {
        if data.is_empty() && !how.truncate {
            return self.getattr(ino).await;
        }
        let mut prepared = self.prepare_store(ino, offset, data, how).await?;
        self.commit_prepared(&mut prepared).await
    }

    /// [`Client::store`]'s first half: the bytes stored (inline in the
    /// command, or as blocks on the write quorum) and the commit that places
    /// them, under its operation id. Sent with [`Client::commit_prepared`];
    /// sent again verbatim after an answer that never came, it applies once
    /// (an append must not land twice).
    pub async fn prepare_store(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        how: Commit,
    ) -> Result<PreparedCommit, ClientError> {
        let (extents, copies) = if data.is_empty() {
            (Vec::new(), Vec::new())
        } else if data.len() <= self.inline_max_bytes() {
            (
                vec![failsafe_proto::inline_extent(offset, data)],
                Vec::new(),
            )
        } else {
            self.as_blocks(offset, data).await?
        };
        Ok(PreparedCommit {
            cmd: self.command(pb::command::Op::CommitExtents(pb::CommitExtents {
                ino,
                extents,
                copies,
                append: how.append,
                truncate: how.truncate,
            })),
        })
    }

    /// Sends a prepared commit. A file that already holds as many inline
    /// bytes as it may refuses inline ones: they are stored as blocks and
    /// `prepared` becomes that commit, under a new operation id (the
    /// refused one applied nothing). On an error whose outcome is unknown
    /// ([`ClientError::outcome_unknown`]) send the same `prepared` again.
    pub async fn commit_prepared(
        &self,
        prepared: &mut PreparedCommit,
    ) -> Result<pb::Attr, ClientError> {
        match self.mutate_attr_cmd(prepared.cmd.clone()).await {
            Err(e) if e.code() == Some(pb::ErrorCode::InlineFull) => {
                tracing::debug!("file full of inline bytes: storing as blocks");
                let Some(pb::command::Op::CommitExtents(c)) = &prepared.cmd.op else {
                    return Err(e);
                };
                let mut extents = Vec::with_capacity(c.extents.len());
                let mut copies = Vec::new();
                for x in &c.extents {
                    if x.data.is_empty() {
                        extents.push(x.clone());
                        continue;
                    }
                    let (more, more_copies) = self.as_blocks(x.offset, &x.data).await?;
                    extents.extend(more);
                    copies.extend(more_copies);
                }
                *prepared = PreparedCommit {
                    cmd: self.command(pb::command::Op::CommitExtents(pb::CommitExtents {
                        extents,
                        copies,
                        ..c.clone()
                    })),
                };
                self.mutate_attr_cmd(prepared.cmd.clone()).await
            }
            r => r,
        }
    }

    /// Stores `data` as blocks on the write quorum: the extents that place
    /// them at `offset`, and their copies.
    async fn as_blocks(
        &self,
        offset: u64,
        data: &[u8],
    ) -> Result<(Vec<pb::Extent>, Vec<pb::BlockCopies>), ClientError> {
        let blocks: Vec<Vec<u8>> = data.chunks(MAX_BLOCK_BYTES).map(<[u8]>::to_vec).collect();
        let copies = self.put_blocks(&blocks).await?;
        let mut extents = Vec::with_capacity(blocks.len());
        let mut at = offset;
        for (b, c) in blocks.iter().zip(&copies) {
            extents.push(pb::Extent {
                offset: at,
                length: b.len() as u64,
                hash: c.hash.clone(),
                ..Default::default()
            });
            at += b.len() as u64;
        }
        Ok((extents, copies))
    }

    /// A new file's first bytes, `data`, as an exclusive create carries
    /// them (`Create.content`): inline when small, else stored as blocks
    /// first. `None` for no bytes.
    pub async fn content_of(&self, data: &[u8]) -> Result<Option<pb::CommitExtents>, ClientError> {
        if data.is_empty() {
            return Ok(None);
        }
        if data.len() <= self.inline_max_bytes() {
            return Ok(Some(pb::CommitExtents {
                extents: vec![failsafe_proto::inline_extent(0, data)],
                ..Default::default()
            }));
        }
        let (extents, copies) = self.as_blocks(0, data).await?;
        Ok(Some(pb::CommitExtents {
            extents,
            copies,
            ..Default::default()
        }))
    }

    /// The largest write this client sends inline.
    fn inline_max_bytes(&self) -> usize {
        self.inner.cfg.inline_max_bytes.min(MAX_INLINE_BYTES)
    }

    /// Reads up to `length` bytes at `offset`; holes read as zeros.
    pub async fn read(&self, ino: u64, offset: u64, length: u64) -> Result<Vec<u8>, ClientError> {
        let fe = self.read_extents(ino, offset, length).await?;
        let size = fe.attr.as_ref().map_or(0, |a| a.size);
        let end = offset.saturating_add(length).min(size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let copies: HashMap<&[u8], &pb::BlockCopies> =
            fe.copies.iter().map(|c| (c.hash.as_slice(), c)).collect();
        let mut cache: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for e in &fe.extents {
            if !e.data.is_empty() {
                // Inline: the bytes came with the extent.
                let from = e.offset.max(offset);
                let to = e.offset.saturating_add(e.length).min(end);
                if from < to {
                    let src = inline_bytes(e, from, to).ok_or_else(malformed_inline)?;
                    out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
                }
                continue;
            }
            if !cache.contains_key(&e.hash) {
                let devices = copies
                    .get(e.hash.as_slice())
                    .map_or(&[][..], |c| c.device_ids.as_slice());
                let data = self.read_block(&e.hash, devices, &fe.devices).await?;
                cache.insert(e.hash.clone(), data);
            }
            let block = &cache[&e.hash];
            let from = e.offset.max(offset);
            let to = e.offset.saturating_add(e.length).min(end);
            if from >= to {
                continue;
            }
            let b0 = (e.block_offset + (from - e.offset)) as usize;
            let b1 = b0 + (to - from) as usize;
            let src = block
                .get(b0..b1)
                .ok_or_else(|| ClientError::BlockUnreadable {
                    hash: hash_hex(&e.hash),
                    last_error: "extent reaches past the end of its block".into(),
                })?;
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        Ok(out)
    }

    /// Reads a block from the first copy that answers intact: copies in this
    /// client's zone first, then by measured round trip; hosts that recently
    /// timed out last. A copy that is slow to answer (a frozen host) does not
    /// stall the read: after `hedge_after` the next copy is asked as well,
    /// and the first intact answer wins.
    pub async fn read_block(
        &self,
        hash: &[u8],
        device_ids: &[u64],
        locations: &[pb::DeviceLocation],
    ) -> Result<Vec<u8>, ClientError> {
        let mut candidates: Vec<&pb::DeviceLocation> = locations
            .iter()
            .filter(|l| device_ids.contains(&l.device_id))
            .collect();
        let zone = self.inner.cfg.zone.as_deref();
        candidates.sort_by_key(|l| {
            (
                self.is_suspect(&l.addr),
                Some(l.zone.as_str()) != zone,
                self.rtt(&l.addr).unwrap_or(Duration::from_millis(50)),
            )
        });
        let mut pending = candidates.into_iter();
        let mut running = FuturesUnordered::new();
        let fetch = |l: &pb::DeviceLocation| {
            let (client, addr, dev, hash) =
                (self.clone(), l.addr.clone(), l.device_id, hash.to_vec());
            async move {
                let r = client.get_block_rpc(&addr, dev, &hash, false).await;
                (addr, r)
            }
        };
        let mut last_error = String::from("no copies recorded");
        // Asked and not answered yet.
        let mut outstanding: Vec<String> = Vec::new();
        loop {
            if running.is_empty() {
                match pending.next() {
                    Some(l) => {
                        // Nothing else in flight: a round trip of its own
                        // (a hedge sent alongside a slow copy is not).
                        fan_out_round_trip();
                        outstanding.push(l.addr.clone());
                        running.push(fetch(l));
                    }
                    None => break,
                }
            }
            let hedge = self.hedge_after();
            let next = tokio::time::timeout(hedge, running.next()).await;
            match next {
                Err(_) => {
                    // The copy asked last is slow: ask the next one too.
                    match pending.next() {
                        Some(l) => {
                            outstanding.push(l.addr.clone());
                            running.push(fetch(l));
                        }
                        None => {
                            if let Some((addr, r)) = running.next().await {
                                outstanding.retain(|a| *a != addr);
                                match r {
                                    Ok(data) => return Ok(data),
                                    Err(s) => last_error = format!("{addr}: {}", s.message()),
                                }
                            }
                        }
                    }
                }
                Ok(None) => break,
                Ok(Some((_, Ok(data)))) => return Ok(data),
                Ok(Some((addr, Err(s)))) => {
                    outstanding.retain(|a| *a != addr);
                    tracing::debug!(%addr, error = %s.message(), "block read failed, trying next copy");
                    last_error = format!("{addr}: {}", s.message());
                }
            }
        }
        Err(ClientError::BlockUnreadable {
            hash: hash_hex(hash),
            last_error,
        })
    }

    /// How long a block read waits for one copy before also asking the next.
    fn hedge_after(&self) -> Duration {
        (self.inner.cfg.rpc_timeout / 2).max(Duration::from_millis(100))
    }
}
