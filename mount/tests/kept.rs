//! Nothing a web host wrote is lost when the cluster is away: a write that
//! waited for a failed upload reports EIO, and files whose close failed
//! are kept and stored later.
//!
//! Apart from the other failover tests, and one at a time: these hold files
//! open on a mount whose cluster has no majority, and every process another
//! test spawns meanwhile (fsd, a mount) inherits those descriptors; its
//! exec closes them, and each close is a FUSE flush that waits for the
//! cluster, so that spawn stalls (a restarted fsd "did not start listening"
//! in 30 s).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::time::{Duration, Instant};

use common::Env;

/// Held by each test for its whole run: they must not overlap either.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits up to 90 s for `path` to read `want`.
async fn wait_for_content(path: &std::path::Path, want: &[u8], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match fs::read(path) {
            Ok(got) if got == want => return,
            r => assert!(
                Instant::now() < deadline,
                "{what}: {} never read the expected {} bytes (last: {:?})",
                path.display(),
                want.len(),
                r.map(|g| g.len())
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A write that must wait for an upload (its file already buffers as much
/// as a mount holds for one file) reports that upload's failure: EIO, not
/// success, and its bytes are not taken. What the writes before it took is
/// kept, and stored once the cluster is back.
#[tokio::test(flavor = "multi_thread")]
async fn t44_a_write_that_waited_for_a_failed_upload_reports_eio() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut env = Env::start(2).await;
    env.wait_for_lease_streams(2);
    let (a, b) = (env.mounts[0].p("big.bin"), env.mounts[1].p("big.bin"));
    let mut f = File::create(&a).unwrap();
    env.cluster.kill(1);
    env.cluster.kill(2);
    let chunk = vec![7u8; 1 << 20];
    let mut taken = 0usize;
    let failed = loop {
        match f.write(&chunk) {
            Ok(n) => {
                taken += n;
                assert!(taken <= 512 << 20, "no write failed in 512 MiB");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(failed.raw_os_error(), Some(libc::EIO), "{failed}");
    eprintln!(
        "a write failed with EIO after {} MiB were taken",
        taken >> 20
    );
    env.cluster.restart(1, true).unwrap();
    env.cluster.restart(2, true).unwrap();
    // The earlier background failure is reported once more (by an fsync);
    // then the buffered bytes are stored.
    let deadline = Instant::now() + Duration::from_secs(90);
    while let Err(e) = f.sync_all() {
        assert!(Instant::now() < deadline, "fsync never succeeded: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(f);
    let len = fs::metadata(&b).unwrap().len();
    assert_eq!(len, taken as u64, "exactly the bytes the writes took");
    assert!(fs::read(&b).unwrap().iter().all(|x| *x == 7));
}

/// An application that ignores close()'s error (PHP does) loses nothing: a
/// page and an append-only log closed while the cluster has no majority
/// (the close fails with EIO) stay on the web host, and reach the cluster
/// by themselves once it is back; the log's line lands exactly once,
/// although its first attempt's answer never came.
#[tokio::test(flavor = "multi_thread")]
async fn t45_files_closed_after_a_failed_flush_reach_the_cluster_once_it_is_back() {
    use std::os::fd::IntoRawFd;
    let _one = ONE_AT_A_TIME.lock().await;
    let mut env = Env::start(0).await;
    let stats = env.dir.path().join("stats0.json");
    env.mount_with("a", &format!("stats={}", stats.display()));
    env.mount("b");
    env.wait_for_lease_streams(2);
    env.expected_errors
        .push("data of a closed file could not be stored; kept here");
    let m = &env.mounts[0];
    let (page, log) = (m.p("page.txt"), m.p("changes.log"));
    fs::write(&page, b"old text\n").unwrap();
    fs::write(&log, b"first line\n").unwrap();
    let mut p = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&page)
        .unwrap();
    p.write_all(b"new text, saved while the cluster was away\n")
        .unwrap();
    let mut l = OpenOptions::new().append(true).open(&log).unwrap();
    l.write_all(b"second line\n").unwrap();
    env.cluster.kill(1);
    env.cluster.kill(2);
    for (f, what) in [(p, "page"), (l, "log")] {
        let fd = f.into_raw_fd();
        // SAFETY: closing a descriptor this test owns, once.
        let r = unsafe { libc::close(fd) };
        let e = std::io::Error::last_os_error();
        assert_eq!(
            r, -1,
            "the {what}'s close cannot succeed without a majority"
        );
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
    }
    // Both kept before the cluster comes back: the release after a failed
    // close tries once more, and if the cluster were back by then it would
    // store the file itself and nothing would be left to store late.
    let kept = |json: &str| {
        serde_json::from_str::<serde_json::Value>(json).ok()?["kept"]["files"].as_u64()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let json = fs::read_to_string(&stats).unwrap_or_default();
        if kept(&json) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two files were not kept: {json}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.cluster.restart(1, true).unwrap();
    env.cluster.restart(2, true).unwrap();
    let other = &env.mounts[1];
    wait_for_content(
        &other.p("page.txt"),
        b"new text, saved while the cluster was away\n",
        "page",
    )
    .await;
    wait_for_content(&other.p("changes.log"), b"first line\nsecond line\n", "log").await;
    // Counted (the stats file is rewritten every second): none kept now,
    // both stored late.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let json = fs::read_to_string(&stats).unwrap_or_default();
        if json.contains("\"kept\": {\"files\": 0, ") && json.contains("\"stored_late\": 2}") {
            break;
        }
        assert!(Instant::now() < deadline, "kept files not counted: {json}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
