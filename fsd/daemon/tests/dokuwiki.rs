//! Debian's unmodified DokuWiki, with its whole writable data directory on a
//! failsafe mount, edited through its own HTTP interface (edit form and
//! `sectok`) — also while one storage host is down. The web server and the
//! browser are `failsafe_harness::dokuwiki`'s, which `failsafe-bench` uses too.

mod common;

use std::process::Command;

use common::{TestCluster, PATIENCE};
use failsafe_harness::dokuwiki::{self, Browser, Server, ServerConfig};
use failsafe_harness::local::{sibling_binary, LocalMount};

/// Edits `id` through DokuWiki's edit form; returns the raw text it serves after.
fn edit(b: &mut Browser, id: &str, text: &str, summary: &str) -> String {
    let saved = b.edit(id, text, summary).expect("edit");
    assert!(
        matches!(saved.status, 302 | 303),
        "save: HTTP {}: {:?}",
        saved.status,
        dokuwiki::error_messages(&saved.body)
    );
    let raw = b
        .get(&format!("/doku.php?id={id}&do=export_raw"))
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
    if let Some(missing) = dokuwiki::missing() {
        eprintln!(
            "skipped: {missing} is missing (scripts/test.sh installs dokuwiki, php-cgi and lighttpd)"
        );
        return;
    }
    let (mut tc, _client) = TestCluster::start(&[]).await;
    let dir = tc.dir.path().to_path_buf();
    // The web server (www-data) keeps its socket under it.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mnt = dir.join("mnt");
    let mount_bin =
        sibling_binary("mount-failsafe").expect("the mount binary (cargo build --bins)");
    let spec = format!("{}:/", tc.c.addrs().join(","));
    let opts = format!(
        "zone=a,allow_other,cache_dir={},{}",
        dir.join("cache").display(),
        tc.c.mount_cred_option().expect("a mount credential")
    );
    let log = dir.join("mount.log");
    let mount = LocalMount::start(Command::new(mount_bin), &spec, &mnt, &opts, &log)
        .expect("mount-failsafe");

    // DokuWiki's writable data (pages, attic, meta, locks, cache, index…)
    // and its ACL directory move onto the mount, where anyone may edit; the
    // package stays as is.
    dokuwiki::install_state(&mnt).expect("DokuWiki's state on the mount");
    let web = Server::start(&mnt, &dir.join("run"), &ServerConfig::default()).expect("lighttpd");
    let mut b = Browser::new(web.port);
    let start = b.get("/doku.php?id=start").unwrap();
    assert_eq!(start.status, 200, "{}", web.logs());

    for i in 1..=3 {
        let text = format!(
            "====== Failsafe ======\n\nRevision {i} of a page whose files live on three hosts.\n"
        );
        let raw = edit(&mut b, "failsafe:test", &text, &format!("edit {i}"));
        assert_eq!(raw.trim_end(), text.trim_end(), "edit {i} served back");
        // DokuWiki stores a revision's timestamp to the second.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // With one storage host down, editing goes on.
    tc.c.kill(2);
    let text = "====== Failsafe ======\n\nSaved while a storage host was down.\n";
    assert_eq!(
        edit(&mut b, "failsafe:test", text, "host down").trim_end(),
        text.trim_end()
    );
    let other = "A second page, also written with a host down.\n";
    assert_eq!(
        edit(&mut b, "failsafe:other", other, "new page").trim_end(),
        other.trim_end()
    );
    let revs = b.get("/doku.php?id=failsafe:test&do=revisions").unwrap();
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
    // The web server lets go of the mount before the mount goes.
    drop(web);
    drop(mount);
    failsafe_harness::logs::check([log.as_path()], &tc.expected_errors).unwrap();
}
