//! mount.failsafe: mounts a failsafe cluster as an ordinary directory.
//!
//! `mount.failsafe fsd1:7000,fsd2:7000,fsd3:7000:/[dir] /srv/wiki [-o options]`
//! follows the mount helper convention, so `mount -t failsafe …` and an
//! `/etc/fstab` line work. It returns once the directory is mounted and keeps
//! serving it in the background (`-f` stays in the foreground); `umount` or
//! SIGTERM unmounts it cleanly.

mod behind;
mod cache;
mod core;
mod dirty;
mod errno;
mod fs;
mod hosts_attr;
mod options;
mod snapview;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use failsafe_client::{Client, ClientConfig};

const USAGE: &str =
    "usage: mount.failsafe HOST:PORT[,HOST:PORT...][:/DIR] MOUNTPOINT [-f] [-o OPTIONS]
options: cred=FILE (the mount's credential from `fsctl client add`; default
         /etc/failsafe/client.cred), insecure (plaintext, for a cluster run --insecure),
         zone=Z, cache_dir=PATH, cache_size=SIZE, timeout=MS, allow_other, ro, rw, log=PATH,
         stats=PATH (a JSON summary of RPCs and round trips per FUSE operation,
         rewritten every second and at unmount), metrics=HOST:PORT (the same as
         Prometheus text over HTTP), inline=SIZE (commits of at most SIZE,
         64K at most and by default, travel inside the metadata commit; 0: never)
         (generic options such as defaults, _netdev, noauto are accepted and ignored)";

struct Args {
    spec: options::MountSpec,
    mountpoint: PathBuf,
    opts: options::Options,
    log: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut opts = options::Options::default();
    let mut log = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "-f" => opts.foreground = true,
            // -s (sloppy), -n (no mtab), -v (verbose) come from mount(8).
            "-s" | "-n" | "-v" => {}
            "-o" => {
                let list = it.next().ok_or("-o needs a list of options")?;
                let mut rest = Vec::new();
                for item in list.split(',') {
                    match item.strip_prefix("log=") {
                        Some(p) => log = Some(PathBuf::from(p)),
                        None => rest.push(item),
                    }
                }
                options::parse_options(&rest.join(","), &mut opts)?;
            }
            s if s.starts_with('-') => return Err(format!("unknown flag {s}")),
            _ => positional.push(a),
        }
    }
    let [spec, mountpoint] = <[String; 2]>::try_from(positional).map_err(|_| USAGE.to_string())?;
    Ok(Args {
        spec: options::parse_spec(&spec)?,
        mountpoint: PathBuf::from(mountpoint),
        opts,
        log,
    })
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,failsafe_mount=info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mount.failsafe: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = preflight(&args) {
        eprintln!("mount.failsafe: {e}");
        std::process::exit(1);
    }
    if !args.opts.foreground {
        std::process::exit(background(&args));
    }
    if let Err(e) = serve(args) {
        eprintln!("mount.failsafe: {e}");
        std::process::exit(1);
    }
}

/// Clear messages for what a sysadmin can fix before anything starts.
fn preflight(args: &Args) -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist: load the fuse module (modprobe fuse) or, in a container, pass the device in".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(format!(
            "cannot open /dev/fuse ({e}): run as root, or install fuse3 and give the user access"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0
        && which("fusermount3").is_none()
        && which("fusermount").is_none()
    {
        return Err(
            "not root and no fusermount3 found: run as root, or install the fuse3 package".into(),
        );
    }
    clear_stale_mount(&args.mountpoint);
    match std::fs::metadata(&args.mountpoint) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", args.mountpoint.display())),
        Err(e) => Err(format!("{}: {e}", args.mountpoint.display())),
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// A mount left by a crashed mount.failsafe answers ENOTCONN; detach it.
fn clear_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(mountpoint = %mountpoint.display(), "detaching a stale mount");
            detach(mountpoint);
        }
    }
}

fn detach(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(canon) = mountpoint.canonicalize() else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target.map(|t| t.replace("\\040", " ")) == Some(canon.display().to_string())
            && fstype.is_some_and(|t| t.starts_with("fuse"))
    })
}

/// The mount helper returns once the directory is mounted; a copy of
/// itself in the foreground keeps serving it.
fn background(args: &Args) -> i32 {
    let Ok(exe) = std::env::current_exe() else {
        return 1;
    };
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    argv.push("-f".into());
    let mut child = match std::process::Command::new(exe)
        .args(&argv)
        .env("FAILSAFE_MOUNT_DETACH", "1")
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mount.failsafe: cannot start: {e}");
            return 1;
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code().unwrap_or(1);
        }
        if is_mounted(&args.mountpoint) {
            return 0;
        }
        if std::time::Instant::now() > deadline {
            eprintln!("mount.failsafe: the cluster did not answer within 60 s");
            let _ = child.kill();
            return 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After mounting in the background, logs go to a file, not the terminal
/// that ran `mount`.
fn redirect_logs(log: Option<&Path>) {
    use std::os::fd::AsRawFd;
    let path = log
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/dev/null"));
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        // SAFETY: duplicating a valid descriptor onto stdout and stderr.
        unsafe {
            libc::dup2(f.as_raw_fd(), 1);
            libc::dup2(f.as_raw_fd(), 2);
        }
    }
}

fn serve(mut args: Args) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let tls = if args.opts.insecure {
        tracing::warn!("mounted insecure: plaintext, no credential");
        failsafe_tls::Tls::Insecure
    } else {
        let cred = failsafe_tls::Credential::load(&args.opts.cred).map_err(|e| {
            format!("{e:#} (a mount needs a credential from `fsctl client add`: -o cred=FILE)")
        })?;
        // A credential confined to a subtree mounts that subtree (and
        // the spec's path within it).
        if cred.grant.subdir != "/" {
            let within = args.spec.subdir.trim_start_matches('/');
            args.spec.subdir = format!("{}/{within}", cred.grant.subdir);
            tracing::info!(subdir = %args.spec.subdir, "a credential confined to a subtree");
        }
        if cred.grant.read_only && !args.opts.read_only {
            tracing::info!("a read-only credential: mounting read-only");
            args.opts.read_only = true;
        }
        cred.check_current()
            .and_then(|()| failsafe_tls::Tls::new(cred))
            .map_err(|e| format!("cred={}: {e:#}", args.opts.cred.display()))?
    };
    let cfg = ClientConfig {
        addrs: args.spec.hosts.clone(),
        rpc_timeout: args.opts.rpc_timeout,
        block_timeout: (args.opts.rpc_timeout * 8).max(Duration::from_secs(5)),
        op_deadline: Duration::from_secs(15),
        read_fallback_after: args.opts.rpc_timeout.max(Duration::from_millis(500)),
        zone: args.opts.zone.clone(),
        inline_max_bytes: args.opts.inline_bytes as usize,
        name: format!("mount:{}", args.mountpoint.display()),
        tls,
        ..ClientConfig::default()
    };
    let (client, root) = rt.block_on(async {
        let client = Client::connect(cfg)
            .await
            .map_err(|e| format!("cannot reach the cluster: {e}"))?;
        if let Ok(s) = client.status().await {
            client.learn_members(s.hosts.into_iter().map(|h| h.addr));
        }
        let mut ino = failsafe_core::ROOT_INO;
        for part in args.spec.subdir.split('/').filter(|p| !p.is_empty()) {
            let a = client
                .lookup(ino, part.as_bytes())
                .await
                .map_err(|e| format!("{}: {e}", args.spec.subdir))?;
            if a.kind != failsafe_client::pb::FileKind::KindDir as i32 {
                return Err(format!("{} is not a directory", args.spec.subdir));
            }
            ino = a.ino;
        }
        Ok::<_, String>((client, ino))
    })?;
    let cache_dir =
        args.opts
            .cache_dir
            .join(format!("{}-{}", client.cluster_id(), std::process::id()));
    let cache = cache::BlockCache::open(&cache_dir, args.opts.cache_bytes)
        .map_err(|e| format!("cache_dir {}: {e}", cache_dir.display()))?;
    // Hosts come and go (added, moved, migrated): keep learning them, so the
    // mount still reaches the cluster when every host it was given is gone.
    let learner = client.clone();
    rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if let Ok(s) = learner.status().await {
                learner.learn_members(s.hosts.into_iter().map(|h| h.addr));
            }
        }
    });
    let kept = Arc::new(core::Kept::default());
    let stats = Arc::new(stats::MountStats::new(client.clone(), kept.clone()));
    if let Some(path) = &args.opts.stats {
        stats::write_every_second(stats.clone(), path.clone());
    }
    if let Some(addr) = args.opts.metrics {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| format!("metrics={addr}: {e}"))?;
        if let Ok(bound) = listener.local_addr() {
            stats.set_metrics_addr(bound);
        }
        rt.spawn(stats::serve_metrics(stats.clone(), listener));
    }
    if args.opts.write_behind && !args.opts.leases {
        return Err("writebehind needs leases (it cannot be used with noleases)".into());
    }
    let dropped = args.opts.leases.then(|| {
        let _in_runtime = rt.enter();
        client.enable_leases()
    });
    if args.opts.leases && !rt.block_on(client.leases_up(Duration::from_secs(2))) {
        tracing::info!("no lease stream yet; serving without leases until it is up");
    }
    let mut core = core::Core::new(client, root, args.opts.read_only, cache).with_kept(kept);
    if args.opts.write_behind {
        core = core.with_write_behind();
    }
    let core = Arc::new(core);
    rt.spawn(core.clone().store_kept());
    rt.spawn(core.clone().open_session());
    if let Some(b) = &core.behind {
        b.set_core(Arc::downgrade(&core));
    }
    let fs = fs::Fs {
        core: core.clone(),
        rt: rt.handle().clone(),
        stats: stats.clone(),
        leases: args.opts.leases,
    };

    let mut config = fuser::Config::default();
    let source = format!("{}:{}", args.spec.hosts.join(","), args.spec.subdir);
    config.mount_options = vec![
        fuser::MountOption::FSName(source),
        fuser::MountOption::CUSTOM("subtype=failsafe".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    if args.opts.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    if args.opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(1);
    let mut session = fuser::Session::new(fs, &args.mountpoint, &config)
        .map_err(|e| format!("mounting {}: {e}", args.mountpoint.display()))?;
    if let Some(dropped) = dropped {
        notify_kernel(
            dropped,
            session.notifier(),
            core.clone(),
            rt.handle().clone(),
        )?;
    }
    tracing::info!(
        mountpoint = %args.mountpoint.display(),
        leases = args.opts.leases,
        writebehind = args.opts.write_behind,
        "mounted"
    );
    if std::env::var_os("FAILSAFE_MOUNT_DETACH").is_some() {
        redirect_logs(args.log.as_deref());
    }

    let mut unmounter = session.unmount_callable();
    let mountpoint = args.mountpoint.clone();
    rt.spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("unmounting");
        if unmounter.unmount().is_err() {
            // Busy (a process still has files open): detach lazily.
            detach(&mountpoint);
        }
    });
    let served = session.run();
    // Stored before exit: anything a close() already acknowledged is durable.
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), core.close_session()).await })
        .ok();
    if let Some(path) = &args.opts.stats {
        if let Err(e) = stats.write_json(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the stats file");
        }
    }
    tracing::info!("unmounted");
    served.map_err(|e| format!("serving the mount: {e}"))
}

/// Tells the kernel what leases no longer cover: every name it may hold
/// under a directory that changed, and the attributes and pages of every
/// inode that changed; then lets the lease stream acknowledge. A thread of
/// its own, holding no lock a request handler takes: the kernel may make a
/// notification wait for a request in the same directory to finish.
///
/// A recall of a directory delegated here (write-behind) is acknowledged
/// only once what was done in it here alone is flushed; when the stream
/// ended, that is flushed too, without holding up the next stream.
fn notify_kernel(
    mut dropped: tokio::sync::mpsc::UnboundedReceiver<failsafe_client::Dropped>,
    notifier: fuser::Notifier,
    core: Arc<core::Core>,
    rt: tokio::runtime::Handle,
) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    std::thread::Builder::new()
        .name("kernel-notify".into())
        .spawn(move || {
            while let Some(d) = dropped.blocking_recv() {
                for (ino, cached) in &d.inodes {
                    let kino = fuser::INodeNo(core.f(*ino));
                    for name in cached.names.keys() {
                        // ENOENT: the kernel held nothing under that name.
                        let _ = notifier.inval_entry(kino, std::ffi::OsStr::from_bytes(name));
                    }
                    let _ = notifier.inval_inode(kino, 0, 0);
                }
                let flush = match &core.behind {
                    Some(b) if d.stream_lost => b.stream_lost(),
                    Some(b) => b.recalled(&d.named),
                    None => Vec::new(),
                };
                let mut done = d.done;
                if d.stream_lost {
                    if let Some(done) = done.take() {
                        let _ = done.send(());
                    }
                }
                if flush.is_empty() {
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    continue;
                }
                let core = core.clone();
                rt.spawn(async move {
                    for dir in flush {
                        core.settle(dir).await;
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                });
            }
        })
        .map(|_| ())
        .map_err(|e| format!("starting the kernel notifier: {e}"))
}
