//! The failsafe cluster through its client library, without FUSE (what
//! `fsbench` measured): what one metadata commit, one linearizable read and
//! one block put or get cost, to tell the mount's share of a workload from
//! the cluster's.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use failsafe_client::pb;
use failsafe_harness::local::LocalCluster;
use serde_json::{json, Value};

pub(crate) struct ApiRow {
    pub(crate) what: &'static str,
    pub(crate) tasks: usize,
    pub(crate) unit: &'static str,
    pub(crate) value: f64,
    /// Milliseconds per operation as one task sees it.
    pub(crate) ms_per_op: f64,
}

impl ApiRow {
    pub(crate) fn to_json(&self) -> Value {
        json!({"what": self.what, "tasks": self.tasks, "unit": self.unit,
               "value": self.value, "ms_per_op": self.ms_per_op})
    }
}

/// Runs `op(task, i)` from `tasks` concurrent tasks for `secs`; ops/s.
async fn rate<F, Fut>(secs: f64, tasks: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stop = start + Duration::from_secs_f64(secs);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (op, done) = (op.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < stop {
                op(t, i).await?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn row(what: &'static str, tasks: usize, unit: &'static str, ops: f64, per_op: f64) -> ApiRow {
    ApiRow {
        what,
        tasks,
        unit,
        value: ops * per_op,
        ms_per_op: if ops > 0.0 {
            1000.0 * tasks as f64 / ops
        } else {
            f64::INFINITY
        },
    }
}

pub(crate) async fn bench(cluster: &LocalCluster, secs: f64) -> anyhow::Result<Vec<ApiRow>> {
    let client = cluster.client().await?;
    let mut rows = Vec::new();
    let dir = client.mkdir(1, b"bench-api", 0o755).await?.ino;

    for tasks in [1, 16] {
        let c = client.clone();
        let creates = rate(secs, tasks, move |t, i| {
            let c = c.clone();
            async move {
                c.create(dir, format!("f-{tasks}-{t}-{i}").as_bytes(), 0o644, true)
                    .await?;
                Ok(())
            }
        })
        .await?;
        rows.push(row(
            "create (metadata commit)",
            tasks,
            "ops/s",
            creates,
            1.0,
        ));
    }

    let c = client.clone();
    let renames = rate(secs, 1, move |t, i| {
        let c = c.clone();
        async move {
            let name = |k: u64| format!("r-{t}-{k}").into_bytes();
            if i == 0 {
                c.create(dir, &name(0), 0o644, true).await?;
            }
            let r = pb::Rename {
                parent: dir,
                name: name(i),
                new_parent: dir,
                new_name: name(i + 1),
                ..Default::default()
            };
            c.rename(r).await?;
            Ok(())
        }
    })
    .await?;
    rows.push(row("rename (metadata commit)", 1, "ops/s", renames, 1.0));

    let probe = client.create(dir, b"probe", 0o644, true).await?.ino;
    for tasks in [1, 16] {
        let c = client.clone();
        let reads = rate(secs, tasks, move |_, _| {
            let c = c.clone();
            async move {
                c.getattr(probe).await?;
                Ok(())
            }
        })
        .await?;
        rows.push(row(
            "getattr (linearizable read)",
            tasks,
            "ops/s",
            reads,
            1.0,
        ));
    }

    let block = vec![0u8; failsafe_core::MAX_BLOCK_BYTES];
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, bw) = (client.clone(), written.clone());
    let puts = rate(secs, 2, move |t, i| {
        let (c, bw) = (c.clone(), bw.clone());
        let mut data = block.clone();
        data[..16].copy_from_slice(&[(t as u64).to_le_bytes(), i.to_le_bytes()].concat());
        async move {
            let copies = c.put_blocks(&[data]).await?;
            bw.lock().unwrap_or_else(|e| e.into_inner()).extend(copies);
            Ok(())
        }
    })
    .await?;
    let mib = failsafe_core::MAX_BLOCK_BYTES as f64 / (1024.0 * 1024.0);
    rows.push(row(
        "block put, 4 MiB, to the write quorum",
        2,
        "MiB/s",
        puts,
        mib,
    ));

    let written: Vec<_> = written.lock().unwrap_or_else(|e| e.into_inner()).clone();
    anyhow::ensure!(!written.is_empty(), "no blocks written");
    let status = client.status().await?;
    let locations: Vec<pb::DeviceLocation> = status
        .devices
        .iter()
        .filter_map(|d| {
            let h = status.hosts.iter().find(|h| h.host_id == d.host_id)?;
            Some(pb::DeviceLocation {
                device_id: d.device_id,
                host_id: d.host_id,
                zone: h.zone.clone(),
                addr: h.addr.clone(),
            })
        })
        .collect();
    let (c, w, l) = (client.clone(), Arc::new(written), Arc::new(locations));
    let gets = rate(secs, 2, move |_, i| {
        let (c, w, l) = (c.clone(), w.clone(), l.clone());
        async move {
            let b = &w[i as usize % w.len()];
            c.read_block(&b.hash, &b.device_ids, &l).await?;
            Ok(())
        }
    })
    .await?;
    rows.push(row(
        "block get, 4 MiB, hash verified",
        2,
        "MiB/s",
        gets,
        mib,
    ));
    Ok(rows)
}
