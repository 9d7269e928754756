//! failsafe-demo: the whole story on one machine. Three hosts (zones a, b,
//! c) on loopback, the cluster mounted at DIR/mnt, and a wiki on the mount.
//! It shows the cluster's status by running `fsctl status`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use failsafe_harness::local::{is_mounted, sibling_binary, LocalCluster, LocalMount, Stopped};

/// The whole story on one machine: three hosts (zones a, b, c) on
/// loopback, the cluster mounted at DIR/mnt, and a wiki on the mount at
/// http://127.0.0.1:PORT. Stays in the foreground; Ctrl-C tears it all
/// down. Run again on the same DIR and the same pages come back. Needs
/// root (for the FUSE mount).
#[derive(Parser)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "failsafe-demo")]
    dir: PathBuf,
    /// The wiki listens on PORT; the hosts on PORT+1, PORT+2, PORT+3.
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failsafe-demo: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(demo(&args.dir, args.port)) {
        eprintln!("failsafe-demo: {e:#}");
        std::process::exit(1);
    }
}

async fn demo(dir: &Path, port: u16) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the demo mounts the cluster with FUSE and needs root: run it with sudo");
    }
    if !Path::new("/dev/fuse").exists() {
        anyhow::bail!("/dev/fuse is missing: load the fuse module (modprobe fuse), or pass the device into the container");
    }
    let fsd = sibling_binary("fsd")?;
    let fsctl = sibling_binary("fsctl")?;
    let mount_bin = sibling_binary("mount-failsafe")?;
    let wiki_bin = sibling_binary("wiki-cgi")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    let mut cluster = start_cluster(&dir, &fsd, port + 1).await?;
    show_status(&fsctl, &cluster);
    let mount = start_mount(&dir, &mount_bin, &cluster)?;
    let wiki = start_wiki(&dir, &wiki_bin, &mount.path.join("wiki"), port).await?;
    write_welcome(&wiki_bin, &mount.path.join("wiki"), &cluster, port);
    print_instructions(&dir, &fsctl, &cluster, &mount, port);
    run_until_stopped(&mut cluster).await?;

    println!("stopping: wiki, mount, hosts");
    drop(wiki);
    drop(mount);
    cluster.stop_all();
    Ok(())
}

/// Starts hosts a, b, c on `base_port`.. with their data under `dir`:
/// a new cluster, or the one already there.
async fn start_cluster(dir: &Path, fsd: &Path, base_port: u16) -> anyhow::Result<LocalCluster> {
    let existing = std::fs::read_to_string(dir.join("host-a/cluster.id"))
        .ok()
        .map(|s| s.trim().to_string());
    // Each host also serves /metrics in plain HTTP, 1000 ports above its own.
    let mut cluster = LocalCluster::new(fsd, &[]);
    for (i, zone) in ["a", "b", "c"].into_iter().enumerate() {
        let port = base_port + i as u16;
        let metrics = format!("--metrics-listen=127.0.0.1:{}", port.saturating_add(1000));
        cluster.add_host(&dir.join(format!("host-{zone}")), zone, port, &[metrics])?;
    }
    match existing.filter(|s| !s.is_empty()) {
        Some(id) => {
            cluster.cluster_id = id;
            cluster
                .wait_for(Duration::from_secs(30), "a leader", |s| s.leader_id != 0)
                .await
                .context("the cluster in this directory did not come back")?;
        }
        None => {
            cluster.bootstrap().await?;
        }
    }
    Ok(cluster)
}

/// `fsctl status`, printed as it prints it.
fn show_status(fsctl: &Path, cluster: &LocalCluster) {
    let shown = Command::new(fsctl)
        .args(cluster.fsctl_flags())
        .arg("--cluster")
        .arg(cluster.addrs().join(","))
        .arg("status")
        .stdin(Stdio::null())
        .status();
    // 0 fail-safe, 1 limping: both are answers.
    if !matches!(shown, Ok(s) if matches!(s.code(), Some(0 | 1))) {
        eprintln!("(fsctl status failed: {shown:?})");
    }
}

/// Mounts the cluster at DIR/mnt, as zone a, logging to DIR/mount.log.
fn start_mount(dir: &Path, mount_bin: &Path, cluster: &LocalCluster) -> anyhow::Result<LocalMount> {
    let mnt = dir.join("mnt");
    if is_mounted(&mnt) {
        // Left behind by a demo that was killed.
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    let spec = format!("{}:/", cluster.addrs().join(","));
    let opts = format!(
        "zone=a,cache_dir={},allow_other,{}",
        dir.join("cache").display(),
        cluster.mount_cred_option()?
    );
    LocalMount::start(
        Command::new(mount_bin),
        &spec,
        &mnt,
        &opts,
        &dir.join("mount.log"),
    )
}

/// Starts `wiki-cgi serve` on `data` at 127.0.0.1:`port`, logging to
/// DIR/wiki.log; returns once it accepts connections.
async fn start_wiki(
    dir: &Path,
    wiki_bin: &Path,
    data: &Path,
    port: u16,
) -> anyhow::Result<Stopped> {
    std::fs::create_dir_all(data)?;
    let log_path = dir.join("wiki.log");
    let log = std::fs::File::create(&log_path)?;
    let mut wiki = Stopped(
        Command::new(wiki_bin)
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting wiki-cgi")?,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(s)) = wiki.0.try_wait() {
            anyhow::bail!("wiki-cgi exited with {s}; see {}", log_path.display());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the wiki did not start; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(wiki)
}

/// Where host `i`'s status page is: its plain HTTP address (`--metrics-listen`).
fn status_url(cluster: &LocalCluster, i: usize) -> String {
    let port = cluster.hosts[i]
        .addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(0);
    format!("http://127.0.0.1:{}/", port.saturating_add(1000))
}

/// The wiki's Start page tells the demo's story: what failsafe is, the
/// status page, and which host to kill (with this run's PIDs). Written as
/// the demo's own edit, and rewritten at each start only while nobody else
/// has edited it.
fn write_welcome(wiki_bin: &Path, data: &Path, cluster: &LocalCluster, port: u16) {
    use std::io::Write;
    let hosts: Vec<String> = cluster
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                "- host {z} (zone {z}): {addr}, pid {pid}, [status page]({url})",
                z = h.zone,
                addr = h.addr,
                pid = h.pid().unwrap_or(0),
                url = status_url(cluster, i)
            )
        })
        .collect();
    let b_pid = cluster.hosts.get(1).and_then(|h| h.pid()).unwrap_or(0);
    let status = status_url(cluster, 0);
    let text = format!(
        "# Welcome to failsafe\n\n\
This wiki is an ordinary file-based wiki engine. The directory it keeps its \
pages in is a **failsafe** mount: every page is stored on three hosts in three \
zones, and any one host can die, be unplugged or be shipped to another city \
without the wiki noticing. The line at the bottom of each page says which \
hosts hold it and whether the cluster is *fail-safe* (every page on every \
zone) or *limping* (a copy missing, being repaired).\n\n\
## Try it\n\n\
1. Edit this page, or make a new one: [[Sandbox]].\n\
2. Kill a host, from another terminal: `kill -9 {b_pid}` (host b). Keep editing: \
nothing is lost and nothing waits.\n\
3. Open the [status page]({status}): host b is down and the cluster limps. The \
footer of a page shows it too.\n\
4. Press Enter in the demo's terminal: host b starts again, catches up, and the \
cluster is fail-safe again.\n\n\
## The hosts\n\n{}\n\n\
The wiki runs at http://127.0.0.1:{port}/.\n",
        hosts.join("\n")
    );
    let child = Command::new(wiki_bin)
        .args(["put", "--data"])
        .arg(data)
        .args([
            "Start",
            "--author",
            "failsafe-demo",
            "--summary",
            "the demo's welcome",
            "--unless-edited",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn();
    let written = child.and_then(|mut c| {
        if let Some(mut stdin) = c.stdin.take() {
            stdin.write_all(text.as_bytes())?;
        }
        c.wait()
    });
    if !matches!(&written, Ok(s) if s.success()) {
        eprintln!("(writing the welcome page failed: {written:?})");
    }
}

/// The `ready:` line (scripts and the demo's test read it) and what to try.
fn print_instructions(
    dir: &Path,
    fsctl: &Path,
    cluster: &LocalCluster,
    mount: &LocalMount,
    port: u16,
) {
    let url = format!("http://127.0.0.1:{port}");
    let pids: Vec<String> = cluster
        .hosts
        .iter()
        .map(|h| format!("{}={}", h.zone, h.pid().unwrap_or(0)))
        .collect();
    println!(
        "\nready: mount {} url {url} hosts {} pids {}",
        mount.path.display(),
        cluster.addrs().join(","),
        pids.join(",")
    );
    let b = &cluster.hosts[1];
    println!("\nOpen {url} and edit pages. The pages live on all three hosts. To see a host fail:");
    println!(
        "  {}      # the cluster at a glance (each host serves one)",
        status_url(cluster, 0)
    );
    println!(
        "  kill -9 {}      # from another terminal: host b dies; keep editing, nothing is lost",
        b.pid().unwrap_or(0)
    );
    println!("  then press Enter here to restart every host that is down; it catches up");
    println!(
        "  {} {} --cluster {} status",
        fsctl.display(),
        cluster.fsctl_flags().join(" "),
        cluster.addrs().join(",")
    );
    println!(
        "Ctrl-C stops the wiki, unmounts and stops the hosts; logs are in {}.",
        dir.display()
    );
}

/// Reports hosts that went down and restarts them on Enter, until Ctrl-C
/// or SIGTERM.
async fn run_until_stopped(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (enter_tx, mut enter_rx) = tokio::sync::mpsc::channel::<()>(4);
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
            if enter_tx.blocking_send(()).is_err() {
                return;
            }
        }
    });
    let mut reported = vec![false; cluster.hosts.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            Some(()) = enter_rx.recv() => {
                for (i, seen) in reported.iter_mut().enumerate() {
                    if cluster.exited(i) {
                        cluster.restart(i, true)?;
                        *seen = false;
                        println!("host {} restarted, pid {}", cluster.hosts[i].zone, cluster.hosts[i].pid().unwrap_or(0));
                    }
                }
            }
            _ = tick.tick() => {
                for (i, seen) in reported.iter_mut().enumerate() {
                    if cluster.exited(i) && !*seen {
                        *seen = true;
                        println!("host {} is down; the wiki keeps working. Press Enter to restart it.", cluster.hosts[i].zone);
                    }
                }
            }
        }
    }
}
