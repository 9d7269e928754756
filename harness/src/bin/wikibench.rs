//! wikibench: page saves and page reads per second that wiki-cgi sustains on
//! a failsafe mount of a three-host loopback cluster — with all hosts up and
//! with one killed — beside the same wiki on a local directory, measured in
//! the same run. Needs root (FUSE).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use failsafe_harness::httpc::{form_value, request};
use failsafe_harness::local::{self, is_mounted, sibling_binary, LocalCluster, Stopped};

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark the wiki on a failsafe mount against a local directory"
)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent editors.
    #[arg(long, default_value_t = 2)]
    editors: usize,
    /// Concurrent readers.
    #[arg(long, default_value_t = 4)]
    readers: usize,
}

fn start_wiki(data: &Path) -> anyhow::Result<(Stopped, u16)> {
    local::start_wiki(Command::new(sibling_binary("wiki-cgi")?), data)
}

fn drive(port: u16, secs: u64, editors: usize, readers: usize) -> (f64, f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (saves, reads, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut threads = Vec::new();
    for who in 0..editors {
        let (stop, saves, errors) = (stop.clone(), saves.clone(), errors.clone());
        threads.push(std::thread::spawn(move || {
            let cookie = format!("wikicsrf={:032x}", 0xbe0c_0000u128 + who as u128);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let page = format!("Bench{who}_{}", n % 8);
                let ok = (|| {
                    let form = request(port, "GET", &format!("/edit/{page}"), "", &cookie).ok()?;
                    let base = form_value(&form.body, "base")?.to_string();
                    let csrf = form_value(&form.body, "csrf")?.to_string();
                    let text =
                        format!("Revision {n} of {page}, saved by editor {who}.+").repeat(20);
                    let body = format!("base={base}&csrf={csrf}&summary=bench&text={text}");
                    let r = request(port, "POST", &format!("/save/{page}"), &body, &cookie).ok()?;
                    (r.status == 303).then_some(())
                })();
                match ok {
                    Some(()) => saves.fetch_add(1, Ordering::Relaxed),
                    None => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for who in 0..readers {
        let (stop, reads, errors) = (stop.clone(), reads.clone(), errors.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let page = format!("Bench{}_{}", who % 2, n % 8);
                match request(port, "GET", &format!("/page/{page}"), "", "") {
                    Ok(r) if r.status == 200 => reads.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let s = started.elapsed().as_secs_f64();
    (
        saves.load(Ordering::Relaxed) as f64 / s,
        reads.load(Ordering::Relaxed) as f64 / s,
        errors.load(Ordering::Relaxed),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "wikibench mounts with FUSE: run it as root"
    );
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    // Baseline: the same wiki on a local directory.
    let (local_wiki, port) = start_wiki(&root.join("local"))?;
    let local = drive(port, args.seconds, args.editors, args.readers);
    drop(local_wiki);

    let mut cluster = LocalCluster::start(root, &["a", "b", "c"], &sibling_binary("fsd")?, 0, &[])?;
    rt.block_on(cluster.bootstrap()).context("bootstrap")?;
    let mnt = root.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let spec = format!("{}:/", cluster.addrs().join(","));
    let opts = format!(
        "zone=a,cache_dir={},{}",
        root.join("cache").display(),
        cluster.mount_cred_option()?
    );
    let mount = Stopped(
        Command::new(sibling_binary("mount-failsafe")?)
            .arg(&spec)
            .arg(&mnt)
            .args(["-f", "-o", &opts])
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mnt) {
        anyhow::ensure!(Instant::now() < deadline, "the mount did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (wiki, port) = start_wiki(&mnt.join("wiki"))?;
    let up = drive(port, args.seconds, args.editors, args.readers);
    cluster.kill(2);
    let down = drive(port, args.seconds, args.editors, args.readers);
    drop(wiki);
    drop(mount);
    cluster.stop_all();

    println!(
        "wikibench: wiki-cgi over HTTP, {} editors + {} readers, {} s per row\n",
        args.editors, args.readers, args.seconds
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8}  {:>13} {:>13}",
        "setup", "saves/s", "reads/s", "errors", "saves vs local", "reads vs local"
    );
    for (name, (s, r, e)) in [
        ("local directory (baseline)", local),
        ("failsafe, 3 hosts up", up),
        ("failsafe, 1 of 3 hosts down", down),
    ] {
        println!(
            "{name:<34} {s:>10.1} {r:>10.1} {e:>8}  {:>13.3} {:>13.3}",
            s / local.0.max(1e-9),
            r / local.1.max(1e-9)
        );
    }
    Ok(())
}
