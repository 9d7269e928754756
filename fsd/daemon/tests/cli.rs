//! fsctl and fsd as a sysadmin uses them: init, host add, status, host
//! remove, joining with --join, and what happens when nothing answers.

mod common;

use common::PATIENCE;
use std::path::Path;
use std::process::Command;

use failsafe_harness::local::LocalCluster;

/// fsctl as the admin of the CA in `ca` (as `--ca-dir`).
fn fsctl_in(ca: &Path, cluster: &[String], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fsctl"))
        .arg("--ca-dir")
        .arg(ca)
        .arg("--cluster")
        .arg(cluster.join(","))
        .args(args)
        .output()
        .expect("run fsctl")
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "fsctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn t80_fsctl_init_add_status_remove() {
    let dir = tempfile::tempdir().unwrap();
    // As the README has it: a credential per host from fsctl (the first
    // creates the CA and the admin's credential), then fsd, init, add.
    let ca = dir.path().join("ca");
    for zone in ["a", "b"] {
        let host = dir.path().join(format!("host-{zone}"));
        std::fs::create_dir_all(&host).unwrap();
        let out = host.join("host.cred").display().to_string();
        let said = ok(fsctl_in(&ca, &[], &["host", "cert", "--out", &out]));
        assert!(said.contains("wrote "), "{said}");
    }
    // The third asks for its certificate itself, its key staying with it:
    // its first start makes the key and a signing request, and stops.
    let host = dir.path().join("host-c");
    let first = Command::new(env!("CARGO_BIN_EXE_fsd"))
        .arg("--data-dir")
        .arg(&host)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!first.status.success());
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(said.contains("fsctl host cert --csr"), "{said}");
    let key = std::fs::metadata(host.join("host.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    let csr = host.join("host.csr").display().to_string();
    let out = host.join("host.cred").display().to_string();
    ok(fsctl_in(
        &ca,
        &[],
        &["host", "cert", "--csr", &csr, "--out", &out],
    ));
    let cred = std::fs::read_to_string(&out).unwrap();
    assert!(!cred.contains("PRIVATE KEY"), "the key stayed on the host");
    let fsctl = |cluster: &[String], args: &[&str]| fsctl_in(&ca, cluster, args);
    let mut c = LocalCluster::start(
        dir.path(),
        &["a", "b", "c"],
        Path::new(env!("CARGO_BIN_EXE_fsd")),
        0,
        &[],
    )
    .unwrap();
    let addrs = c.addrs();
    let out = ok(fsctl(&addrs[..1], &["init", &addrs[0]]));
    assert!(out.starts_with("created cluster "), "{out}");
    c.cluster_id = out.split_whitespace().nth(2).unwrap().to_string();
    for a in &addrs[1..] {
        ok(fsctl(&addrs[..1], &["host", "add", a]));
    }
    c.wait_for(PATIENCE, "three voters", |s| {
        s.hosts.iter().filter(|h| h.voter).count() == 3
    })
    .await
    .unwrap();

    let table = ok(fsctl(&addrs, &["status"]));
    let needles = [
        "fail-safe: every block has 3 copies",
        "leader",
        "ZONE",
        "127.0.0.1",
        "DEVICE",
        "STATE",
        "up",
        "repair",
        "scrub",
        "gc",
    ];
    for needle in needles {
        assert!(table.contains(needle), "{needle} missing in:\n{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(fsctl(&addrs, &["status", "--json"]))).unwrap();
    assert_eq!(json["cluster_id"], c.cluster_id.as_str());
    assert_eq!(json["hosts"].as_array().unwrap().len(), 3);
    assert_eq!(json["mode"], "fail-safe");
    assert_eq!(json["under_replicated"], 0);
    assert!(
        json["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["state"] == "up"),
        "{json}"
    );
    let zones: Vec<&str> = json["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["zone"].as_str().unwrap())
        .collect();
    assert!(zones.contains(&"a") && zones.contains(&"b") && zones.contains(&"c"));

    // Remove a follower by its id.
    let leader = json["leader_id"].as_u64().unwrap();
    let victim = json["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host_id"].as_u64() != Some(leader))
        .unwrap();
    let id = format!("{:016x}", victim["host_id"].as_u64().unwrap());
    ok(fsctl(&addrs, &["host", "remove", &id]));
    let after: serde_json::Value =
        serde_json::from_str(&ok(fsctl(&addrs, &["status", "--json"]))).unwrap();
    assert_eq!(after["hosts"].as_array().unwrap().len(), 2);
    // A host already in a cluster cannot be initialised again.
    let again = fsctl(&addrs[..1], &["init", &addrs[0]]);
    assert!(!again.status.success());
    c.check_logs(&[]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn t81_a_host_started_with_join_admits_itself() {
    let (mut tc, c) = common::TestCluster::start_zones(&["a", "b"], &[]).await;
    let join = format!("--join={}", tc.c.hosts[0].addr);
    let cid = format!("--cluster-id={}", c.cluster_id());
    let dir = tc.dir.path().join("host-c");
    tc.c.add_host(&dir, "c", 0, &[join, cid]).unwrap();
    let s =
        tc.c.wait_for(PATIENCE, "the joined host a voter", |s| {
            s.hosts.iter().filter(|h| h.voter).count() == 3 && s.devices.len() == 3
        })
        .await
        .unwrap();
    assert!(s.hosts.iter().any(|h| h.zone == "c"));
    c.create(1, b"after-join", 0o644, true).await.unwrap();
    tc.wait_caught_up(2, PATIENCE).await;
}

#[test]
fn t82_unreachable_cluster_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = fsctl_in(
        dir.path(),
        &["127.0.0.1:1".to_string()],
        &["--insecure", "--timeout-ms", "500", "status"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the cluster at 127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn t83_bad_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fsd.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nlisten = '127.0.0.1:0'\nzone = 'has space'\n",
            dir.path()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fsd"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zone:"), "{err}");
}

/// GET `path` from the plain HTTP listener at `addr`: status code and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let code = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((code, body.to_string()))
}

/// The gRPC health service's answer for `service` at `addr` (plain).
async fn grpc_health(addr: &str, service: &str) -> Option<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status)
}

/// Polls `probe` until it holds, for up to PATIENCE.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut probe: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !probe().await {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Three hosts in zones a, b, c, each also serving /metrics and health in
/// plain HTTP (`--metrics-listen`) at the address returned for it.
async fn cluster_with_plain_listeners() -> (common::TestCluster, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_fsd")), &[]);
    // Port 0: each fsd binds a port of its own and writes it to
    // `metrics.addr` (a port picked here could be taken before fsd binds it).
    let extra = ["--metrics-listen".to_string(), "127.0.0.1:0".to_string()];
    for zone in ["a", "b", "c"] {
        c.add_host(&dir.path().join(format!("host-{zone}")), zone, 0, &extra)
            .unwrap();
    }
    c.bootstrap().await.unwrap();
    let mut probes = Vec::new();
    for zone in ["a", "b", "c"] {
        let file = dir.path().join(format!("host-{zone}/metrics.addr"));
        until(&format!("{} written", file.display()), || {
            std::future::ready(std::fs::read_to_string(&file).is_ok_and(|s| s.ends_with('\n')))
        })
        .await;
        probes.push(std::fs::read_to_string(&file).unwrap().trim().to_string());
    }
    let tc = common::TestCluster {
        c,
        dir,
        expected_errors: Vec::new(),
    };
    (tc, probes)
}

/// Every metric the Grafana dashboard and the Prometheus alert rules in
/// packaging/ name is one some fsd of a working cluster with a mount
/// exports (the leader-only ones from the leader).
#[tokio::test(flavor = "multi_thread")]
async fn t85_every_metric_the_dashboard_and_alert_rules_use_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging");
    let mut named = std::collections::BTreeSet::new();
    for file in [
        "grafana/failsafe-dashboard.json",
        "prometheus/failsafe-alerts.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("failsafe_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            named.insert(name);
        }
    }
    assert!(named.len() >= 10, "{named:?}");
    let (tc, probes) = cluster_with_plain_listeners().await;
    // A mount's session (the clock offset is reported per session).
    let client = tc.client_in("a").await;
    let _session = client
        .open_session(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let exported = |name: &str| {
        probes.iter().any(|p| {
            http_get(p, "/metrics").is_some_and(|(_, text)| {
                text.lines().any(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|r| r.starts_with(['{', ' ']))
                })
            })
        })
    };
    for name in &named {
        until(&format!("{name} exported"), || {
            std::future::ready(exported(name))
        })
        .await;
    }
}

/// Health as a supervisor, a load balancer and a monitoring check see it:
/// `/healthz` (live), `/readyz` (a member of a working quorum, caught up)
/// and the gRPC health service on the plain `--metrics-listen` address,
/// and `fsctl status`'s exit status: 0 fail-safe, 1 limping, 2 unreachable.
#[tokio::test(flavor = "multi_thread")]
async fn t84_health_probes_and_status_exit_codes_follow_the_cluster() {
    use tonic_health::ServingStatus;
    let (mut tc, probes) = cluster_with_plain_listeners().await;
    let code =
        |tc: &common::TestCluster| tc.fsctl(&["--timeout-ms", "1000", "status"]).status.code();
    let status = |p: &str, path: &str| http_get(p, path).map(|(c, _)| c);

    // Fail-safe: every host live and ready, status exits 0.
    for p in &probes {
        until(&format!("{p} ready"), || {
            std::future::ready(status(p, "/readyz") == Some(200))
        })
        .await;
        let (live, body) = http_get(p, "/healthz").unwrap();
        assert_eq!((live, body.as_str()), (200, "live\n"));
        assert_eq!(
            grpc_health(p, "").await,
            Some(ServingStatus::Serving as i32)
        );
        until(&format!("{p} ready over gRPC"), || async move {
            grpc_health(p, "failsafe.v1.Metadata").await == Some(ServingStatus::Serving as i32)
        })
        .await;
    }
    let metrics = http_get(&probes[0], "/metrics").unwrap().1;
    assert!(
        metrics.contains("failsafe_build_info{version=\""),
        "{metrics}"
    );
    until("fsctl status exits 0", || {
        std::future::ready(code(&tc) == Some(0))
    })
    .await;

    // A block with a copy on each host, then a host down: the cluster
    // limps (nowhere to make a third copy), the other two stay ready.
    let client = tc.client_in("a").await;
    let file = client
        .create(1, b"three copies", 0o644, true)
        .await
        .unwrap();
    client.write(file.ino, 0, &[7u8; 70_000]).await.unwrap();
    tc.c.kill(2);
    until("fsctl status exits 1 (limping)", || {
        std::future::ready(code(&tc) == Some(1))
    })
    .await;
    let out = tc.fsctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("LIMP"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for p in &probes[..2] {
        assert_eq!(status(p, "/readyz"), Some(200), "{p}");
    }

    // No quorum: the last host is live but not ready.
    tc.c.kill(1);
    until("the host without a quorum not ready", || {
        std::future::ready(status(&probes[0], "/readyz") == Some(503))
    })
    .await;
    assert_eq!(status(&probes[0], "/healthz"), Some(200));
    let first = &probes[0];
    until("not ready over gRPC", || async move {
        grpc_health(first, "failsafe.v1.Metadata").await == Some(ServingStatus::NotServing as i32)
    })
    .await;
    // A host answers, but no majority: limping, not unreachable.
    assert_eq!(code(&tc), Some(1));
    let out = String::from_utf8_lossy(&tc.fsctl(&["status"]).stdout).to_string();
    assert!(out.contains("LIMP"), "{out}");

    // Nothing answers: status exits 2.
    tc.c.kill(0);
    assert_eq!(code(&tc), Some(2));
    assert_eq!(status(&probes[0], "/healthz"), None);
}

/// The Debian package (scripts/package.sh, of the debug build the test
/// run has built): what it holds, its maintainer scripts, and `man fsctl`,
/// `man fsd` and `man mount.failsafe` in a root it is unpacked into.
#[test]
fn t86_the_debian_package_holds_the_programs_units_config_and_man_pages() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let built = Command::new("bash")
        .arg(repo.join("scripts/package.sh"))
        .args(["--debug", "--no-build", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "package.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = String::from_utf8(built.stdout).unwrap().trim().to_string();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "{deb}");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fields = run(Command::new("dpkg-deb").args(["-f", &deb, "Package", "Depends"]));
    assert!(
        fields.contains("Package: failsafe") && fields.contains("adduser"),
        "{fields}"
    );
    let contents = run(Command::new("dpkg-deb").args(["--contents", &deb]));
    for path in [
        "./usr/sbin/fsd",
        "./usr/bin/fsctl",
        "./usr/sbin/mount.failsafe",
        "./usr/bin/wiki-cgi",
        "./usr/bin/failsafe-chaos",
        "./etc/failsafe/fsd.toml",
        "./usr/lib/systemd/system/fsd.service",
        "./usr/share/doc/failsafe/examples/systemd-srv-wiki.mount",
        "./usr/share/man/man8/fsctl.8.gz",
        "./usr/share/man/man8/fsd.8.gz",
        "./usr/share/man/man8/mount.failsafe.8.gz",
        "./usr/share/man/man1/wiki-cgi.1.gz",
        "./usr/share/man/man1/failsafe-chaos.1.gz",
        "./usr/share/bash-completion/completions/fsctl",
        "./usr/share/zsh/vendor-completions/_fsctl",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} missing from the package:\n{contents}"
        );
    }
    // Maintainer scripts: valid shell; the user made, fsd not started.
    let control = tmp.path().join("control");
    run(Command::new("dpkg-deb").args(["-e", &deb]).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/failsafe/fsd.toml");
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    assert!(!postinst.contains("systemctl start") && !postinst.contains("enable"));
    let unit = tmp.path().join("root/usr/lib/systemd/system/fsd.service");
    let root = tmp.path().join("root");
    run(Command::new("dpkg-deb").args(["-x", &deb]).arg(&root));
    assert!(std::fs::read_to_string(unit)
        .unwrap()
        .contains("ExecStart=/usr/sbin/fsd --config /etc/failsafe/fsd.toml"));
    let version = run(Command::new(root.join("usr/bin/fsctl")).arg("--version"));
    assert!(version.starts_with("fsctl "), "{version}");
    // `man` finds the pages in the unpacked root.
    for (page, says) in [
        ("fsctl", "--cluster"),
        ("fsd", "--metrics-listen"),
        ("mount.failsafe", "failsafe.hosts"),
        ("wiki-cgi", "--unless-edited"),
    ] {
        let text = run(Command::new("man")
            .args(["-P", "cat", page])
            .env("MANPATH", root.join("usr/share/man"))
            .env("MANWIDTH", "100"));
        let flat = text.replace(['\u{2010}', '\u{2212}'], "-");
        assert!(flat.contains(says), "man {page} lacks {says}:\n{text}");
    }
}
