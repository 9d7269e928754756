//! fsbench: throughput of a three-host loopback cluster, beside the local
//! disk measured in the same run.
//!
//! Reports metadata commits per second (creates, renames), linearizable
//! reads per second, and block put/get throughput, each as a ratio to what
//! this machine's disk does with the same durability on its own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use failsafe_harness::local::{sibling_binary, LocalCluster};

#[derive(Parser)]
#[command(version, about = "Benchmark a three-host loopback failsafe cluster")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent client tasks for the metadata measurements.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Where the hosts keep their data (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also print the results as JSON.
    #[arg(long)]
    json: bool,
}

struct Row {
    what: &'static str,
    unit: &'static str,
    value: f64,
    baseline: Option<(&'static str, f64)>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// Runs `op(task, i)` from `tasks` concurrent tasks for `secs`; ops/s.
async fn rate<F, Fut>(secs: u64, tasks: usize, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
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

async fn bench(args: Args) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let fsd = sibling_binary("fsd")?;
    let mut cluster = LocalCluster::start(&root, &["a", "b", "c"], &fsd, 0, &[])?;
    let client = cluster
        .bootstrap()
        .await
        .context("bootstrapping the cluster")?;
    let secs = args.seconds;
    let n = args.concurrency;
    let mut rows = Vec::new();

    // Baselines: the same durability on the local disk alone.
    let base = root.join("baseline");
    std::fs::create_dir_all(&base)?;
    let (sqlite_commits, sqlite_reads) = baseline_sqlite(&base.join("b.db"), secs)?;
    let (disk_write, disk_read) = baseline_disk(&base, secs)?;

    let dir = client.mkdir(1, b"bench", 0o755).await?.ino;
    let c = client.clone();
    let creates = rate(secs, n, move |t, i| {
        let c = c.clone();
        async move {
            c.create(dir, format!("f-{t}-{i}").as_bytes(), 0o644, true)
                .await?;
            Ok(())
        }
    })
    .await?;
    rows.push(Row {
        what: "create (metadata commit)",
        unit: "ops/s",
        value: creates,
        baseline: Some(("local fsync'd SQLite commits", sqlite_commits)),
    });

    let c = client.clone();
    let renames = rate(secs, n, move |t, i| {
        let c = c.clone();
        async move {
            let name = |k: u64| format!("r-{t}-{k}").into_bytes();
            if i == 0 {
                c.create(dir, &name(0), 0o644, true).await?;
            }
            let r = failsafe_client::pb::Rename {
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
    rows.push(Row {
        what: "rename (metadata commit)",
        unit: "ops/s",
        value: renames,
        baseline: Some(("local fsync'd SQLite commits", sqlite_commits)),
    });

    let probe = client.create(dir, b"probe", 0o644, true).await?.ino;
    let c = client.clone();
    let reads = rate(secs, n, move |_, _| {
        let c = c.clone();
        async move {
            c.getattr(probe).await?;
            Ok(())
        }
    })
    .await?;
    rows.push(Row {
        what: "getattr (linearizable read)",
        unit: "ops/s",
        value: reads,
        baseline: Some(("local SQLite point reads", sqlite_reads)),
    });

    let block = vec![0u8; failsafe_core::MAX_BLOCK_BYTES];
    let blocks_written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, bw) = (client.clone(), blocks_written.clone());
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
    let mb = failsafe_core::MAX_BLOCK_BYTES as f64 / (1024.0 * 1024.0);
    rows.push(Row {
        what: "block put, 4 MiB, to write quorum",
        unit: "MiB/s",
        value: puts * mb,
        baseline: Some(("local write+fsync", disk_write)),
    });

    let written: Vec<_> = blocks_written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    anyhow::ensure!(!written.is_empty(), "no blocks written");
    let status = client.status().await?;
    let locations: Vec<failsafe_client::pb::DeviceLocation> = status
        .devices
        .iter()
        .filter_map(|d| {
            let h = status.hosts.iter().find(|h| h.host_id == d.host_id)?;
            Some(failsafe_client::pb::DeviceLocation {
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
    rows.push(Row {
        what: "block get, 4 MiB, hash verified",
        unit: "MiB/s",
        value: gets * mb,
        baseline: Some(("local read", disk_read)),
    });

    println!("failsafe bench: 3 fsd hosts on loopback, {n} client tasks, {secs} s per row\n");
    println!(
        "{:<36} {:>12} {:<6}  {:>8}  baseline",
        "measurement", "value", "unit", "ratio"
    );
    for r in &rows {
        let (bname, bval) = r.baseline.unwrap_or(("", 0.0));
        let ratio = if bval > 0.0 {
            format!("{:.3}", r.value / bval)
        } else {
            "-".into()
        };
        println!(
            "{:<36} {:>12.1} {:<6}  {:>8}  {bname} = {bval:.1}",
            r.what, r.value, r.unit, ratio
        );
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"what": r.what, "unit": r.unit, "value": r.value,
                    "baseline": r.baseline.map(|b| b.0), "baseline_value": r.baseline.map(|b| b.1)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    cluster.stop_all();
    drop(client);
    Ok(())
}

/// Single-row SQLite transactions with synchronous=FULL, and point reads by
/// primary key, per second.
fn baseline_sqlite(path: &std::path::Path, secs: u64) -> anyhow::Result<(f64, f64)> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);")?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        conn.execute("INSERT INTO t(v) VALUES (?1)", [vec![0u8; 64]])?;
        n += 1;
    }
    let commits = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut m = 0u64;
    let mut stmt = conn.prepare("SELECT v FROM t WHERE k = ?1")?;
    while start.elapsed() < Duration::from_secs(secs) {
        let v: Vec<u8> = stmt.query_row([(m % n.max(1)) as i64 + 1], |r| r.get(0))?;
        std::hint::black_box(v);
        m += 1;
    }
    Ok((commits, m as f64 / start.elapsed().as_secs_f64()))
}

/// MiB/s writing 4 MiB files with fsync, and reading them back.
fn baseline_disk(dir: &std::path::Path, secs: u64) -> anyhow::Result<(f64, f64)> {
    use std::io::Write;
    let block = vec![1u8; failsafe_core::MAX_BLOCK_BYTES];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let mut f = std::fs::File::create(dir.join(format!("blk{}", n % 64)))?;
        f.write_all(&block)?;
        f.sync_all()?;
        n += 1;
    }
    let write = n as f64 * 4.0 / start.elapsed().as_secs_f64();
    let files = n.min(64);
    let start = Instant::now();
    let mut m = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let data = std::fs::read(dir.join(format!("blk{}", m % files)))?;
        std::hint::black_box(failsafe_core::block_hash(&data));
        m += 1;
    }
    Ok((write, m as f64 * 4.0 / start.elapsed().as_secs_f64()))
}
