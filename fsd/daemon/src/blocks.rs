//! The `Blocks` gRPC service over this host's block store. File I/O runs on
//! blocking threads; the store itself never sees the network. A copy found
//! corrupt on read is quarantined by the store and queued here for the
//! `copy-dropper` worker, which drops its record off the request path.

use std::pin::Pin;
use std::sync::Arc;

use failsafe_blockstore::{BlockStore, Removal, StoreError};
use failsafe_core::{delta, parse_hash, MAX_BLOCK_BYTES};
use failsafe_proto::check_header;
use failsafe_proto::pb::{self, blocks_server::Blocks};
use failsafe_tracker::ClusterId;
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::{inc, Metrics};
use crate::repair::BadCopies;

const CHUNK: usize = 256 * 1024;

pub(crate) struct BlocksService {
    pub store: Arc<BlockStore>,
    pub cluster: ClusterId,
    pub metrics: Arc<Metrics>,
    pub bad: Arc<BadCopies>,
}

fn to_status(e: StoreError) -> Status {
    match e {
        // NOT_FOUND means "this device lacks the block" (repair drops the
        // record then); a device that is not here is another matter.
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::NoSuchDevice(_) => Status::failed_precondition(e.to_string()),
        StoreError::HashMismatch { .. } | StoreError::TooLarge(_) => {
            Status::invalid_argument(e.to_string())
        }
        StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        StoreError::Full(_) => Status::resource_exhausted(e.to_string()),
        StoreError::Io { .. } => Status::internal(e.to_string()),
    }
}

fn hash_arg(bytes: &[u8]) -> Result<[u8; 32], Status> {
    parse_hash(bytes).ok_or_else(|| {
        Status::invalid_argument(format!("a block hash is 32 bytes, not {}", bytes.len()))
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("block I/O task: {e}")))?
        .map_err(to_status)
}

type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl BlocksService {
    fn check(&self, h: Option<&pb::Header>) -> Result<(), Status> {
        check_header(h, &self.cluster.get())
    }

    fn count_error<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if let Err(s) = &r {
            inc(&self.metrics.block_errors, 1);
            if s.code() == tonic::Code::DataLoss {
                inc(&self.metrics.block_corrupt, 1);
            }
        }
        r
    }
}

#[tonic::async_trait]
impl Blocks for BlocksService {
    async fn put(
        &self,
        req: Request<Streaming<pb::PutChunk>>,
    ) -> Result<Response<pb::PutReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty block stream"))?;
        self.check(first.header.as_ref())?;
        let hash = hash_arg(&first.hash)?;
        let size = first.size as usize;
        if size > MAX_BLOCK_BYTES {
            return self.count_error(Err(to_status(StoreError::TooLarge(size))));
        }
        let device = if first.device_id == 0 {
            self.store
                .device_ids()
                .first()
                .copied()
                .ok_or_else(|| Status::failed_precondition("no devices"))?
        } else {
            first.device_id
        };
        let mut data = Vec::with_capacity(size);
        data.extend_from_slice(&first.data);
        while let Some(chunk) = stream.message().await? {
            if data.len() + chunk.data.len() > size {
                return self.count_error(Err(Status::invalid_argument(
                    "block longer than its declared size",
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        if data.len() != size {
            return self.count_error(Err(Status::invalid_argument(
                "block shorter than its declared size",
            )));
        }
        let store = self.store.clone();
        self.count_error(blocking(move || store.put(device, &hash, &data)).await)?;
        inc(&self.metrics.block_puts, 1);
        inc(&self.metrics.block_put_bytes, size as u64);
        Ok(Response::new(pb::PutReply {
            device_id: device,
            size: size as u64,
        }))
    }

    type GetStream = ChunkStream<pb::GetChunk>;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let data = self.read_block(&req.hash, req.device_id).await?;
        inc(&self.metrics.block_gets, 1);
        inc(&self.metrics.block_get_bytes, data.len() as u64);
        let chunks: Vec<Result<pb::GetChunk, Status>> = if data.is_empty() {
            vec![Ok(pb::GetChunk { data: Vec::new() })]
        } else {
            data.chunks(CHUNK)
                .map(|c| Ok(pb::GetChunk { data: c.to_vec() }))
                .collect()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn has(&self, req: Request<pb::HasRequest>) -> Result<Response<pb::HasReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        if req.hashes.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 hashes per request"));
        }
        let hashes = req
            .hashes
            .iter()
            .map(|h| hash_arg(h))
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.store.clone();
        let device = req.device_id;
        let device_ids = blocking(move || {
            hashes
                .iter()
                .map(|h| {
                    if device == 0 {
                        Ok(store.has(h).unwrap_or(0))
                    } else {
                        store
                            .has_on(device, h)
                            .map(|on| if on { device } else { 0 })
                    }
                })
                .collect()
        })
        .await?;
        Ok(Response::new(pb::HasReply { device_ids }))
    }

    type InventoryStream = ChunkStream<pb::InventoryChunk>;

    async fn inventory(
        &self,
        req: Request<pb::InventoryRequest>,
    ) -> Result<Response<Self::InventoryStream>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let store = self.store.clone();
        let device = (req.device_id != 0).then_some(req.device_id);
        let all = blocking(move || store.inventory(device)).await?;
        let chunks: Vec<Result<pb::InventoryChunk, Status>> = all
            .chunks(4096)
            .map(|c| {
                Ok(pb::InventoryChunk {
                    entries: c
                        .iter()
                        .map(|(h, size, d)| pb::InventoryEntry {
                            hash: h.to_vec(),
                            size: *size,
                            device_id: *d,
                        })
                        .collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let hash = hash_arg(&req.hash)?;
        let store = self.store.clone();
        let min_age = std::time::Duration::from_millis(req.min_age_ms);
        let removal = blocking(move || store.delete(req.device_id, &hash, min_age)).await?;
        if let Removal::Removed { bytes } = removal {
            inc(&self.metrics.gc_files_deleted, 1);
            inc(&self.metrics.gc_bytes_deleted, bytes);
        }
        Ok(Response::new(pb::DeleteReply {
            existed: removal != Removal::Absent,
            kept: removal == Removal::TooRecent,
        }))
    }

    async fn signature(
        &self,
        req: Request<pb::SignatureRequest>,
    ) -> Result<Response<pb::SignatureReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let base = self.read_block(&req.hash, req.device_id).await?;
        let signature = tokio::task::spawn_blocking(move || delta::signature(&base))
            .await
            .map_err(|e| Status::internal(format!("signature task: {e}")))?;
        Ok(Response::new(pb::SignatureReply { signature }))
    }

    async fn delta(
        &self,
        req: Request<pb::DeltaRequest>,
    ) -> Result<Response<pb::DeltaReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let data = self.read_block(&req.hash, req.device_id).await?;
        let size = data.len() as u64;
        let d = tokio::task::spawn_blocking(move || delta::diff(&req.signature, &data))
            .await
            .map_err(|e| Status::internal(format!("delta task: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::DeltaReply { delta: d, size }))
    }

    async fn put_delta(
        &self,
        req: Request<pb::PutDeltaRequest>,
    ) -> Result<Response<pb::PutReply>, Status> {
        let req = req.into_inner();
        self.check(req.header.as_ref())?;
        let hash = hash_arg(&req.hash)?;
        if req.delta.len() > MAX_BLOCK_BYTES * 2 {
            return self.count_error(Err(Status::invalid_argument("delta larger than any block")));
        }
        let base = self.read_block(&req.base, req.device_id).await?;
        let received = req.delta.len() as u64;
        let store = self.store.clone();
        let device = req.device_id;
        let size = self.count_error(
            tokio::task::spawn_blocking(move || -> Result<u64, Status> {
                let data = delta::apply(&base, &req.delta, &hash)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                store.put(device, &hash, &data).map_err(to_status)?;
                Ok(data.len() as u64)
            })
            .await
            .map_err(|e| Status::internal(format!("delta task: {e}")))?,
        )?;
        inc(&self.metrics.delta_puts, 1);
        inc(&self.metrics.delta_put_bytes, received);
        Ok(Response::new(pb::PutReply {
            device_id: device,
            size,
        }))
    }
}

impl BlocksService {
    /// One verified block from this host (a given device, or any when 0);
    /// a corrupt copy is quarantined and queued like on a `get`.
    async fn read_block(&self, hash: &[u8], device_id: u64) -> Result<Vec<u8>, Status> {
        let hash = hash_arg(hash)?;
        let store = self.store.clone();
        let device = (device_id != 0).then_some(device_id);
        let got = tokio::task::spawn_blocking(move || store.get(&hash, device))
            .await
            .map_err(|e| Status::internal(format!("block I/O task: {e}")))?;
        if let Err(StoreError::Corrupt { device, .. }) = &got {
            self.bad.push(hash.to_vec(), *device);
        }
        Ok(self.count_error(got.map_err(to_status))?.1)
    }
}
