//! Debian's unmodified DokuWiki, with its whole writable data directory on a
//! failsafe mount, edited through its own HTTP interface (edit form and
//! `sectok`) — also while one storage host is down.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, Reply, TestCluster, PATIENCE};
use failsafe_harness::local::{is_mounted, sibling_binary};

fn sh(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Debian's dokuwiki, php-cgi and lighttpd, which scripts/test.sh installs
/// (the test does not install anything itself).
const PACKAGES: [&str; 3] = [
    "/usr/share/dokuwiki/doku.php",
    "/usr/bin/php-cgi",
    "/usr/sbin/lighttpd",
];

/// Everything this test set up outside its temp dir, undone on drop.
struct Setup {
    binds: Vec<PathBuf>,
    mount: Option<Child>,
    mnt: PathBuf,
    web: Option<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut w) = self.web.take() {
            unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
            let _ = w.wait();
        }
        for b in self.binds.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(b).status();
        }
        if let Some(mut m) = self.mount.take() {
            unsafe { libc::kill(m.id() as i32, libc::SIGTERM) };
            let _ = m.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

fn cookies_from(reply: &Reply, jar: &mut Vec<String>) {
    for line in reply.headers.lines() {
        if let Some(v) = line.strip_prefix("set-cookie: ") {
            let kv = v.split(';').next().unwrap_or("").to_string();
            let name = kv.split('=').next().unwrap_or("").to_string();
            jar.retain(|c| !c.starts_with(&format!("{name}=")));
            if !kv.ends_with("=deleted") {
                jar.push(kv);
            }
        }
    }
}

fn input<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let at = html.find(&format!("name=\"{name}\""))?;
    let tag_start = html[..at].rfind('<')?;
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>')?];
    let v = tag.find("value=\"")? + 7;
    tag[v..].split('"').next()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#039;", "'")
        .replace("&amp;", "&")
}

/// Edits `id` through DokuWiki's edit form; returns the raw text it serves after.
fn edit(port: u16, jar: &mut Vec<String>, id: &str, text: &str, summary: &str) -> String {
    let form = http(
        port,
        "GET",
        &format!("/doku.php?id={id}&do=edit"),
        "",
        &jar.join("; "),
    )
    .expect("edit form");
    assert_eq!(
        form.status,
        200,
        "edit form: {}",
        &form.body[..form.body.len().min(500)]
    );
    cookies_from(&form, jar);
    let sectok = input(&form.body, "sectok")
        .expect("sectok in the edit form")
        .to_string();
    let mut fields = vec![
        ("sectok".to_string(), sectok),
        ("id".to_string(), id.to_string()),
        ("do[save]".to_string(), "1".to_string()),
        ("wikitext".to_string(), text.to_string()),
        ("summary".to_string(), summary.to_string()),
    ];
    for name in ["changecheck", "date", "prefix", "suffix", "target", "rev"] {
        if let Some(v) = input(&form.body, name) {
            fields.push((name.to_string(), html_unescape(v)));
        }
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    let saved = http(port, "POST", "/doku.php", &body.join("&"), &jar.join("; ")).expect("save");
    cookies_from(&saved, jar);
    assert!(
        saved.status == 302 || saved.status == 303 || saved.status == 200,
        "save: HTTP {}",
        saved.status
    );
    let raw = http(
        port,
        "GET",
        &format!("/doku.php?id={id}&do=export_raw"),
        "",
        &jar.join("; "),
    )
    .expect("raw");
    assert_eq!(raw.status, 200);
    raw.body
}

#[tokio::test(flavor = "multi_thread")]
async fn t95_dokuwiki_runs_unmodified_on_a_failsafe_mount() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (FUSE mount, bind mounts, web server)");
        return;
    }
    if let Some(missing) = PACKAGES.iter().find(|p| !Path::new(p).exists()) {
        eprintln!(
            "skipped: {missing} is missing (scripts/test.sh installs dokuwiki, php-cgi and lighttpd)"
        );
        return;
    }
    let (mut tc, _client) = TestCluster::start(&[]).await;
    let dir = tc.dir.path().to_path_buf();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount_bin =
        sibling_binary("mount-failsafe").expect("the mount binary (cargo build --bins)");
    let spec = format!("{}:/", tc.c.addrs().join(","));
    let opts = format!(
        "zone=a,allow_other,cache_dir={}",
        dir.join("cache").display()
    );
    let mut setup = Setup {
        binds: Vec::new(),
        mount: None,
        mnt: mnt.clone(),
        web: None,
    };
    setup.mount = Some(
        Command::new(mount_bin)
            .arg(&spec)
            .arg(&mnt)
            .args(["-f", "-o", &opts])
            .stderr(std::fs::File::create(dir.join("mount.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + PATIENCE;
    while !is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "mount did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }

    // DokuWiki's writable data (pages, attic, meta, locks, cache, index…)
    // and its ACL directory move onto the mount; the package stays as is.
    assert!(sh(
        "cp",
        &[
            "-a",
            "/var/lib/dokuwiki/data",
            mnt.join("data").to_str().unwrap()
        ]
    ));
    assert!(sh(
        "cp",
        &[
            "-a",
            "/var/lib/dokuwiki/acl",
            mnt.join("acl").to_str().unwrap()
        ]
    ));
    // The sysadmin's choice for this wiki: anyone may edit.
    std::fs::write(
        mnt.join("acl/acl.auth.php"),
        "# acl\n*               @ALL          8\n",
    )
    .unwrap();
    assert!(sh(
        "chown",
        &[
            "-R",
            "www-data:www-data",
            mnt.join("data").to_str().unwrap(),
            mnt.join("acl").to_str().unwrap()
        ]
    ));
    for (from, to) in [
        ("data", "/var/lib/dokuwiki/data"),
        ("acl", "/var/lib/dokuwiki/acl"),
    ] {
        assert!(
            sh("mount", &["--bind", mnt.join(from).to_str().unwrap(), to]),
            "bind {to}"
        );
        setup.binds.push(PathBuf::from(to));
    }

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The web server drops to www-data: its socket and log live where it may write.
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    assert!(sh("chown", &["www-data:www-data", run.to_str().unwrap()]));
    let conf = dir.join("lighttpd.conf");
    std::fs::write(
        &conf,
        format!(
            r#"server.document-root = "/usr/share/dokuwiki"
server.bind = "127.0.0.1"
server.port = {port}
server.username = "www-data"
server.groupname = "www-data"
server.errorlog = "{dir}/run/lighttpd-error.log"
server.modules = ("mod_access", "mod_fastcgi")
index-file.names = ("doku.php")
url.access-deny = ("~", ".inc")
fastcgi.server = (".php" => ((
    "bin-path" => "/usr/bin/php-cgi",
    "socket" => "{dir}/run/php.socket",
    "max-procs" => 1,
    "bin-environment" => ("PHP_FCGI_CHILDREN" => "2", "PHP_FCGI_MAX_REQUESTS" => "500"),
)))
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    setup.web = Some(
        Command::new("/usr/sbin/lighttpd")
            .args(["-D", "-f"])
            .arg(&conf)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "lighttpd did not start: {}",
            std::fs::read_to_string(dir.join("run/lighttpd-error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut jar = Vec::new();
    let start = http(port, "GET", "/doku.php?id=start", "", "").unwrap();
    assert_eq!(
        start.status,
        200,
        "{}",
        std::fs::read_to_string(dir.join("run/lighttpd-error.log")).unwrap_or_default()
    );
    cookies_from(&start, &mut jar);

    for i in 1..=3 {
        let text = format!(
            "====== Failsafe ======\n\nRevision {i} of a page whose files live on three hosts.\n"
        );
        let raw = edit(port, &mut jar, "failsafe:test", &text, &format!("edit {i}"));
        assert_eq!(raw.trim_end(), text.trim_end(), "edit {i} served back");
        // DokuWiki stores a revision's timestamp to the second.
        std::thread::sleep(Duration::from_millis(1100));
    }
    // With one storage host down, editing goes on.
    tc.c.kill(2);
    let text = "====== Failsafe ======\n\nSaved while a storage host was down.\n";
    assert_eq!(
        edit(port, &mut jar, "failsafe:test", text, "host down").trim_end(),
        text.trim_end()
    );
    let other = "A second page, also written with a host down.\n";
    assert_eq!(
        edit(port, &mut jar, "failsafe:other", other, "new page").trim_end(),
        other.trim_end()
    );
    let revs = http(
        port,
        "GET",
        "/doku.php?id=failsafe:test&do=revisions",
        "",
        &jar.join("; "),
    )
    .unwrap();
    for s in ["edit 1", "edit 2", "edit 3", "host down"] {
        assert!(revs.body.contains(s), "revision {s:?} in the history");
    }
    tc.c.restart(2, true).unwrap();
    tc.wait_caught_up(2, PATIENCE).await;

    // The files are DokuWiki's own, on the mount.
    let page = std::fs::read_to_string(mnt.join("data/pages/failsafe/test.txt")).unwrap();
    assert_eq!(page.trim_end(), text.trim_end());
    assert!(
        std::fs::read_dir(mnt.join("data/attic/failsafe"))
            .unwrap()
            .count()
            >= 4,
        "old revisions in the attic"
    );
    let changes = std::fs::read_to_string(mnt.join("data/meta/failsafe/test.changes")).unwrap();
    assert_eq!(changes.lines().count(), 4, "{changes}");
    drop(setup);
    failsafe_harness::logs::check([dir.join("mount.log").as_path()], &tc.expected_errors).unwrap();
}
