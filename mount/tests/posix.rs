//! A POSIX behaviour suite against real FUSE mounts of a real cluster.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{errno_of, Env};
use failsafe_harness::local::faketime_env;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> i32 {
    // SAFETY: valid C strings; AT_FDCWD.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(from).as_ptr(),
            libc::AT_FDCWD,
            c(to).as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_posix_behaviour() {
    posix_behaviour(&Env::start(1).await);
}

/// The same with write-behind: whatever the mount does alone in the
/// directories delegated to it (lock directories, unlinks, renames) must
/// look the same.
#[tokio::test(flavor = "multi_thread")]
async fn t10b_posix_behaviour_with_writebehind() {
    let env = Env::start_mounts_with(1, "writebehind").await;
    env.wait_for_lease_streams(1);
    posix_behaviour(&env);
}

fn posix_behaviour(env: &Env) {
    let m = &env.mounts[0];

    // create, write, read, O_EXCL, O_TRUNC, O_APPEND
    fs::write(m.p("page.txt"), b"first version\n").unwrap();
    assert_eq!(fs::read(m.p("page.txt")).unwrap(), b"first version\n");
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.p("page.txt"))
        ),
        libc::EEXIST
    );
    fs::write(m.p("page.txt"), b"short").unwrap();
    assert_eq!(fs::read(m.p("page.txt")).unwrap(), b"short");
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(m.p("changes.log"))
        .unwrap();
    log.write_all(b"one\n").unwrap();
    drop(log);
    let mut log = OpenOptions::new()
        .append(true)
        .open(m.p("changes.log"))
        .unwrap();
    log.write_all(b"two\n").unwrap();
    log.sync_all().unwrap();
    drop(log);
    assert_eq!(fs::read(m.p("changes.log")).unwrap(), b"one\ntwo\n");

    // read/write at offsets, within one open file
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("rw.bin"))
        .unwrap();
    f.write_all(b"0123456789").unwrap();
    f.seek(SeekFrom::Start(3)).unwrap();
    f.write_all(b"abc").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(
        s, "012abc6789",
        "a read sees this file's own buffered writes"
    );
    assert_eq!(f.metadata().unwrap().len(), 10);
    f.set_len(4).unwrap();
    drop(f);
    assert_eq!(fs::read(m.p("rw.bin")).unwrap(), b"012a");

    // sparse file: the hole reads as zeros
    let mut f = File::create(m.p("sparse")).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let data = fs::read(m.p("sparse")).unwrap();
    assert_eq!(data.len(), (1 << 20) + 3);
    assert!(data[..1 << 20].iter().all(|&b| b == 0));

    // chmod, chown, utimens (exactly what was asked), truncate
    fs::set_permissions(m.p("page.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.p("page.txt")).unwrap().mode() & 0o7777,
        0o600
    );
    std::os::unix::fs::chown(m.p("page.txt"), Some(33), Some(33)).unwrap();
    let md = fs::metadata(m.p("page.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (33, 33));
    let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(m.p("page.txt"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(when).set_accessed(when))
        .unwrap();
    let md = fs::metadata(m.p("page.txt")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 123_456_789));
    // mtime of a write comes from this host's clock
    let before = std::time::SystemTime::now();
    fs::write(m.p("fresh"), b"x").unwrap();
    let mt = fs::metadata(m.p("fresh")).unwrap().modified().unwrap();
    assert!(mt >= before - std::time::Duration::from_secs(1) && mt <= std::time::SystemTime::now());

    // mkdir, rmdir, readdir
    fs::create_dir(m.p("dir")).unwrap();
    assert_eq!(errno_of(fs::create_dir(m.p("dir"))), libc::EEXIST);
    fs::write(m.p("dir/inner"), b"i").unwrap();
    assert_eq!(errno_of(fs::remove_dir(m.p("dir"))), libc::ENOTEMPTY);
    let mut names: Vec<String> = fs::read_dir(m.p("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["inner"]);
    fs::remove_file(m.p("dir/inner")).unwrap();
    fs::remove_dir(m.p("dir")).unwrap();
    assert_eq!(errno_of(fs::metadata(m.p("dir"))), libc::ENOENT);

    // unlink of an open file: still readable until closed
    fs::write(m.p("doomed"), b"still here").unwrap();
    let mut open = File::open(m.p("doomed")).unwrap();
    fs::remove_file(m.p("doomed")).unwrap();
    assert_eq!(errno_of(fs::metadata(m.p("doomed"))), libc::ENOENT);
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    drop(open);

    // rename over an existing file, RENAME_NOREPLACE, RENAME_EXCHANGE
    fs::write(m.p("tmp"), b"new page").unwrap();
    fs::rename(m.p("tmp"), m.p("page.txt")).unwrap();
    assert_eq!(fs::read(m.p("page.txt")).unwrap(), b"new page");
    fs::write(m.p("other"), b"other").unwrap();
    assert_eq!(
        rename2(&m.p("other"), &m.p("page.txt"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(
        rename2(&m.p("other"), &m.p("page.txt"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(fs::read(m.p("page.txt")).unwrap(), b"other");
    assert_eq!(fs::read(m.p("other")).unwrap(), b"new page");

    // link, symlink, readlink
    fs::hard_link(m.p("other"), m.p("hard")).unwrap();
    assert_eq!(fs::metadata(m.p("hard")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.p("hard")).unwrap().ino(),
        fs::metadata(m.p("other")).unwrap().ino()
    );
    std::os::unix::fs::symlink("other", m.p("sym")).unwrap();
    assert_eq!(fs::read_link(m.p("sym")).unwrap(), Path::new("other"));
    assert_eq!(fs::read(m.p("sym")).unwrap(), b"new page");

    // access, statfs, xattrs
    let path = c(&m.p("other"));
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::access(path.as_ptr(), libc::R_OK | libc::W_OK) },
        0
    );
    // SAFETY: statvfs into a zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&m.path).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bavail > 0);
    let name = CString::new("user.test").unwrap();
    // SAFETY: valid pointers and lengths.
    let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(
        r,
        0,
        "user xattrs are kept: {}",
        std::io::Error::last_os_error()
    );

    // mmap reads
    fs::write(m.p("mapped"), b"mapped bytes").unwrap();
    let f = File::open(m.p("mapped")).unwrap();
    // SAFETY: a read-only private mapping of a 12-byte file, unmapped below.
    unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(
            std::ptr::null_mut(),
            12,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(
            std::slice::from_raw_parts(p as *const u8, 12),
            b"mapped bytes"
        );
        libc::munmap(p, 12);
    }

    // a large file in several blocks, streamed
    let big: Vec<u8> = (0..40u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut f = File::create(m.p("big.bin")).unwrap();
    for chunk in big.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(m.p("big.bin")).unwrap().len(),
        big.len() as u64
    );
    assert!(
        fs::read(m.p("big.bin")).unwrap() == big,
        "large file intact"
    );
    let mut f = File::open(m.p("big.bin")).unwrap();
    f.seek(SeekFrom::Start(13 << 20)).unwrap();
    let mut part = vec![0u8; 100];
    f.read_exact(&mut part).unwrap();
    assert_eq!(part, big[13 << 20..(13 << 20) + 100]);
}

#[tokio::test(flavor = "multi_thread")]
async fn t20_close_to_open_across_two_mounts() {
    let env = Env::start(2).await;
    env.wait_for_lease_streams(2);
    close_to_open(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn t23_close_to_open_across_two_mounts_without_leases() {
    close_to_open(&Env::start_mounts_with(2, "noleases").await);
}

/// Write-behind (`writebehind`): the two-mount tests again, with both
/// mounts changing directories delegated to them alone whenever the leader
/// lets them, and lock directories that count exactly.
#[tokio::test(flavor = "multi_thread")]
async fn t29_two_mounts_with_writebehind() {
    let env = Env::start_mounts_with(2, "writebehind").await;
    env.wait_for_lease_streams(2);
    close_to_open(&env);
    lock_idioms(&env);
    lock_directories_exclude_across_mounts(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn t29b_listings_and_renames_with_writebehind() {
    let env = Env::start_mounts_with(2, "writebehind").await;
    env.wait_for_lease_streams(2);
    replaced_by_rename(&env);
    listings_follow_changes(&env);
}

/// Many changes in one directory with write-behind: more than one flush
/// request's worth (256) of unlinks, renames and new files under names
/// just removed, flushed in several requests side by side and in order:
/// the other mount lists exactly what the first one left, with each file's
/// last bytes.
#[tokio::test(flavor = "multi_thread")]
async fn t29d_many_changes_in_one_directory_with_writebehind() {
    let env = Env::start_mounts_with(2, "writebehind").await;
    env.wait_for_lease_streams(2);
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    fs::create_dir(a.p("many")).unwrap();
    let (da, db) = (a.p("many"), b.p("many"));
    const N: usize = 700;
    for i in 0..N {
        fs::write(da.join(format!("f{i}")), format!("first {i}")).unwrap();
    }
    let mut want = std::collections::BTreeMap::new();
    for i in 0..N {
        match i % 3 {
            0 => {
                fs::remove_file(da.join(format!("f{i}"))).unwrap();
            }
            1 => {
                fs::rename(da.join(format!("f{i}")), da.join(format!("g{i}"))).unwrap();
                want.insert(format!("g{i}"), format!("first {i}"));
            }
            _ => {
                want.insert(format!("f{i}"), format!("first {i}"));
            }
        }
    }
    // Names just removed, made again: after their removal in every flush.
    for i in (0..N).step_by(3) {
        fs::write(da.join(format!("f{i}")), format!("again {i}")).unwrap();
        want.insert(format!("f{i}"), format!("again {i}"));
    }
    for i in (1..N).step_by(3).take(50) {
        fs::remove_file(da.join(format!("g{i}"))).unwrap();
        want.remove(&format!("g{i}"));
    }
    let read = |d: &std::path::Path| -> std::collections::BTreeMap<String, String> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                let text = fs::read_to_string(d.join(&name)).unwrap();
                (name, text)
            })
            .collect()
    };
    assert_eq!(read(&db), want, "the other mount");
    assert_eq!(read(&da), want, "this mount");
}

/// Four writers on one mount save their own pages the wiki way at once
/// (lock directory, temp file, fsync, rename over the page, an append to a
/// shared log, the lock dropped), with write-behind making the directory
/// changes alone: every save lands, the other mount reads each page's last
/// text and every line of the log, and no temp file or lock is left.
#[tokio::test(flavor = "multi_thread")]
async fn t29c_concurrent_saves_with_writebehind() {
    let env = Env::start_mounts_with(2, "writebehind").await;
    env.wait_for_lease_streams(2);
    let (a, b) = (env.mounts[0].path.clone(), env.mounts[1].path.clone());
    for d in ["locks", "pages"] {
        fs::create_dir(a.join(d)).unwrap();
    }
    const SAVES: usize = 30;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let root = a.clone();
            std::thread::spawn(move || {
                for n in 0..SAVES {
                    let page = format!("w{w}p{}", n % 3);
                    let lock = root.join("locks").join(format!("{page}.lock"));
                    fs::create_dir(&lock).unwrap();
                    let tmp = root.join("pages").join(format!(".{page}.tmp"));
                    let mut f = File::create(&tmp).unwrap();
                    f.write_all(format!("{page} save {n}\n").as_bytes())
                        .unwrap();
                    f.sync_all().unwrap();
                    drop(f);
                    fs::rename(&tmp, root.join("pages").join(format!("{page}.txt"))).unwrap();
                    let mut log = OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(root.join("changes.log"))
                        .unwrap();
                    log.write_all(format!("{page} {n}\n").as_bytes()).unwrap();
                    drop(log);
                    fs::remove_dir(&lock).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for w in 0..4 {
        for p in 0..3 {
            let last = (0..SAVES).filter(|n| n % 3 == p).max().unwrap();
            let text = fs::read_to_string(b.join("pages").join(format!("w{w}p{p}.txt"))).unwrap();
            assert_eq!(text, format!("w{w}p{p} save {last}\n"));
        }
    }
    let log = fs::read_to_string(b.join("changes.log")).unwrap();
    assert_eq!(log.lines().count(), 4 * SAVES);
    assert_eq!(fs::read_dir(b.join("pages")).unwrap().count(), 12);
    assert_eq!(fs::read_dir(b.join("locks")).unwrap().count(), 0);
}

/// DokuWiki's `io_lock`: a process takes a lock by making a directory
/// (spinning while it exists) and drops it by removing it. Two threads on
/// each mount add one to a counter under the lock, again and again: every
/// addition counts, so the lock excluded the others each time; and the
/// lock directories are gone at the end, on both mounts.
fn lock_directories_exclude_across_mounts(env: &Env) {
    let (a, b) = (env.mounts[0].path.clone(), env.mounts[1].path.clone());
    fs::create_dir(a.join("locks")).unwrap();
    fs::write(a.join("counter"), b"0").unwrap();
    const EACH: u64 = 25;
    let mut workers = Vec::new();
    for root in [&a, &b, &a, &b] {
        let root = root.clone();
        workers.push(std::thread::spawn(move || {
            let lock = root.join("locks").join("counter.lock");
            for _ in 0..EACH {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while let Err(e) = fs::create_dir(&lock) {
                    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the lock was never free"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                let n: u64 = fs::read_to_string(root.join("counter"))
                    .unwrap()
                    .parse()
                    .unwrap();
                fs::write(root.join("counter"), (n + 1).to_string()).unwrap();
                fs::remove_dir(&lock).unwrap();
            }
        }));
    }
    for w in workers {
        w.join().unwrap();
    }
    for root in [&a, &b] {
        assert_eq!(
            fs::read_to_string(root.join("counter")).unwrap(),
            (4 * EACH).to_string()
        );
        assert_eq!(fs::read_dir(root.join("locks")).unwrap().count(), 0);
    }
}

fn close_to_open(env: &Env) {
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    for round in 0..20 {
        let content = format!("version {round}\n").repeat(round + 1);
        // The wiki save pattern on host A...
        let mut f = File::create(a.p("page.tmp")).unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::rename(a.p("page.tmp"), a.p("page.txt")).unwrap();
        // ...and an open on host B sees it at once.
        assert_eq!(
            fs::read_to_string(b.p("page.txt")).unwrap(),
            content,
            "round {round}"
        );
        // And the other way round, for an in-place rewrite.
        fs::write(b.p("notes"), format!("b{round}")).unwrap();
        assert_eq!(
            fs::read_to_string(a.p("notes")).unwrap(),
            format!("b{round}")
        );
    }
    // Appends from both hosts interleave; none is lost.
    for i in 0..10 {
        for (m, who) in [(a, "a"), (b, "b")] {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(m.p("changes.log"))
                .unwrap();
            f.write_all(format!("{who}{i}\n").as_bytes()).unwrap();
        }
    }
    let log = fs::read_to_string(a.p("changes.log")).unwrap();
    assert_eq!(log.lines().count(), 20, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn t22_a_page_being_replaced_by_rename_never_reads_as_missing() {
    let env = Env::start(2).await;
    env.wait_for_lease_streams(2);
    replaced_by_rename(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn t25_a_page_being_replaced_by_rename_never_reads_as_missing_without_leases() {
    replaced_by_rename(&Env::start_mounts_with(2, "noleases").await);
}

/// A reader's lookup may find the old inode just before another mount's
/// rename replaces it; the open must then find the new file, not ENOENT.
fn replaced_by_rename(env: &Env) {
    let (a, b) = (env.mounts[0].path.clone(), env.mounts[1].path.clone());
    fs::write(a.join("page.txt"), "rev 0").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                fs::write(a.join("page.tmp"), format!("rev {n}")).unwrap();
                fs::rename(a.join("page.tmp"), a.join("page.txt")).unwrap();
            }
            n
        })
    };
    let (mut reads, mut missing) = (0, Vec::new());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(4);
    while std::time::Instant::now() < until {
        reads += 1;
        match fs::read_to_string(b.join("page.txt")) {
            Ok(text) => assert!(text.starts_with("rev "), "{text:?}"),
            Err(e) => missing.push(e.to_string()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let saves = writer.join().unwrap();
    eprintln!("{reads} reads during {saves} renames");
    assert!(
        missing.is_empty(),
        "{} of {reads} reads failed: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t21_lock_idioms_are_atomic_across_mounts() {
    let env = Env::start(2).await;
    env.wait_for_lease_streams(2);
    lock_idioms(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn t24_lock_idioms_are_atomic_across_mounts_without_leases() {
    lock_idioms(&Env::start_mounts_with(2, "noleases").await);
}

fn lock_idioms(env: &Env) {
    let (a, b) = (env.mounts[0].path.clone(), env.mounts[1].path.clone());
    for i in 0..15 {
        // mkdir of a lock directory
        let (pa, pb) = (a.join(format!("lock{i}")), b.join(format!("lock{i}")));
        let ta = std::thread::spawn(move || fs::create_dir(pa).is_ok());
        let tb = std::thread::spawn(move || fs::create_dir(pb).is_ok());
        let wins = [ta.join().unwrap(), tb.join().unwrap()];
        assert_eq!(wins.iter().filter(|&&w| w).count(), 1, "mkdir race {i}");
        // O_EXCL lock file
        let (pa, pb) = (
            a.join(format!("lock{i}.lck")),
            b.join(format!("lock{i}.lck")),
        );
        let ta = std::thread::spawn(move || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(pa)
                .is_ok()
        });
        let tb = std::thread::spawn(move || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(pb)
                .is_ok()
        });
        let wins = [ta.join().unwrap(), tb.join().unwrap()];
        assert_eq!(wins.iter().filter(|&&w| w).count(), 1, "O_EXCL race {i}");
    }
    // flock between two mounts
    fs::write(a.join("flocked"), b"").unwrap();
    let fa = File::open(a.join("flocked")).unwrap();
    let fb = File::open(b.join("flocked")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on open descriptors.
    unsafe {
        assert_eq!(
            libc::flock(fa.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
        assert_eq!(
            libc::flock(fb.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
    }
    // A blocking flock on B is granted when A lets go.
    let waiter = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        // SAFETY: as above.
        let r = unsafe { libc::flock(fb.as_raw_fd(), libc::LOCK_EX) };
        (r, started.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(fa); // closing releases the flock
    let (r, waited) = waiter.join().unwrap();
    assert_eq!(r, 0);
    assert!(
        waited >= std::time::Duration::from_millis(400),
        "B waited for A"
    );
    // fcntl byte-range locks across mounts
    let ga = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.join("flocked"))
        .unwrap();
    let gb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.join("flocked"))
        .unwrap();
    let lock = |f: &File, typ: i32, start: i64, len: i64| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        // SAFETY: F_SETLK with a valid flock struct.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }
    };
    assert_eq!(lock(&ga, libc::F_WRLCK, 0, 100), 0);
    assert_eq!(
        lock(&gb, libc::F_WRLCK, 100, 100),
        0,
        "disjoint ranges coexist"
    );
    assert_eq!(lock(&gb, libc::F_WRLCK, 50, 10), -1, "overlap conflicts");
    drop(ga); // close drops A's POSIX locks
    assert_eq!(lock(&gb, libc::F_WRLCK, 50, 10), 0);
    assert_eq!(lock(&gb, libc::F_UNLCK, 0, 0), 0);

    // A read lock through a descriptor opened for reading (whose close
    // sends the mount no flush) goes when it is closed; the kernel sends
    // the release right after close returns, so B may wait a moment.
    let eventually_locks = |f: &File, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lock(f, libc::F_WRLCK, 0, 10) != 0 {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(lock(f, libc::F_UNLCK, 0, 0), 0);
    };
    let ra = File::open(a.join("flocked")).unwrap();
    assert_eq!(lock(&ra, libc::F_RDLCK, 0, 10), 0);
    assert_eq!(lock(&gb, libc::F_WRLCK, 0, 10), -1, "A's read lock holds");
    drop(ra);
    eventually_locks(&gb, "closing the read-only descriptor released A's lock");
    // POSIX: closing any descriptor of the file drops the process's locks,
    // one opened for reading before the lock was taken too.
    let ra = File::open(a.join("flocked")).unwrap();
    let wa = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.join("flocked"))
        .unwrap();
    assert_eq!(lock(&wa, libc::F_WRLCK, 0, 10), 0);
    assert_eq!(lock(&gb, libc::F_WRLCK, 0, 10), -1, "A's write lock holds");
    drop(ra);
    eventually_locks(&gb, "closing another descriptor released A's lock");
    drop(wa);
}

#[tokio::test(flavor = "multi_thread")]
async fn t26_listings_follow_changes_on_the_other_mount() {
    let env = Env::start(2).await;
    env.wait_for_lease_streams(2);
    listings_follow_changes(&env);
}

#[tokio::test(flavor = "multi_thread")]
async fn t27_listings_follow_changes_on_the_other_mount_without_leases() {
    listings_follow_changes(&Env::start_mounts_with(2, "noleases").await);
}

/// `ls -l` of a directory on one mount: names with sizes and modes.
fn ls_l(dir: &Path) -> std::collections::BTreeMap<String, (u64, u32)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (m.len(), m.mode() & 0o7777),
            )
        })
        .collect()
}

/// `ls -l` twice in a row, the same both times: with leases, the second
/// is mostly the kernel's cached listing (`FOPEN_CACHE_DIR`), which the
/// next change must not outlive.
fn listed_twice(dir: &Path) -> std::collections::BTreeMap<String, (u64, u32)> {
    let first = ls_l(dir);
    assert_eq!(ls_l(dir), first, "listed again at once");
    first
}

/// A directory listed on B (its listing and every entry's attributes
/// cached there while leased, the listing by the kernel too) shows each
/// change made on A at once: new,
/// removed and renamed names, new sizes and modes; and B's own changes.
fn listings_follow_changes(env: &Env) {
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    fs::create_dir(a.p("pages")).unwrap();
    let mut want = std::collections::BTreeMap::new();
    for i in 0..30 {
        fs::write(a.p(&format!("pages/p{i}")), vec![b'x'; i]).unwrap();
        want.insert(format!("p{i}"), (i as u64, 0o644));
    }
    let (da, db) = (a.p("pages"), b.p("pages"));
    assert_eq!(listed_twice(&db), want);
    for round in 0..15 {
        // Listed on B, then changed on A: the next listing on B has it.
        fs::write(da.join(format!("new{round}")), b"fresh").unwrap();
        want.insert(format!("new{round}"), (5, 0o644));
        assert_eq!(listed_twice(&db), want, "round {round}: create");
        // A name B's listing says is absent, created on A: B finds it.
        let probe = format!("probe{round}");
        assert!(!db.join(&probe).exists());
        fs::write(da.join(&probe), b"p").unwrap();
        assert!(
            db.join(&probe).exists(),
            "round {round}: lookup after create"
        );
        want.insert(probe, (1, 0o644));
        fs::remove_file(da.join(format!("p{round}"))).unwrap();
        want.remove(&format!("p{round}"));
        assert_eq!(listed_twice(&db), want, "round {round}: unlink");
        fs::rename(
            da.join(format!("new{round}")),
            da.join(format!("moved{round}")),
        )
        .unwrap();
        let v = want.remove(&format!("new{round}")).unwrap();
        want.insert(format!("moved{round}"), v);
        assert_eq!(listed_twice(&db), want, "round {round}: rename");
        // Size and mode of a listed file, changed on A.
        fs::write(da.join("p29"), vec![b'y'; 100 + round]).unwrap();
        fs::set_permissions(
            da.join("p29"),
            fs::Permissions::from_mode(0o600 + round as u32 % 2 * 0o40),
        )
        .unwrap();
        want.insert(
            "p29".into(),
            (100 + round as u64, 0o600 + round as u32 % 2 * 0o40),
        );
        assert_eq!(listed_twice(&db), want, "round {round}: size and mode");
        // B's own change to the directory it listed.
        fs::write(db.join(format!("byb{round}")), b"bb").unwrap();
        want.insert(format!("byb{round}"), (2, 0o644));
        assert_eq!(listed_twice(&db), want, "round {round}: own create");
        assert_eq!(ls_l(&da), want, "round {round}: seen on A");
    }
}

fn run(cmd: &str, args: &[&str], cwd: &Path) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t30_tar_a_source_tree_in_and_diff_it() {
    tar_in_and_diff(&Env::start(1).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn t30b_tar_and_git_with_writebehind() {
    let env = Env::start_mounts_with(1, "writebehind").await;
    env.wait_for_lease_streams(1);
    tar_in_and_diff(&env);
    git_works(&env);
}

fn tar_in_and_diff(env: &Env) {
    let m = &env.mounts[0];
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("fsd");
    let tarball = env.dir.path().join("src.tar");
    run(
        "tar",
        &[
            "-C",
            src.parent().unwrap().to_str().unwrap(),
            "-cf",
            tarball.to_str().unwrap(),
            "--exclude=target",
            "fsd",
        ],
        env.dir.path(),
    );
    run("tar", &["-xf", tarball.to_str().unwrap()], &m.path);
    run(
        "diff",
        &["-r", src.to_str().unwrap(), m.p("fsd").to_str().unwrap()],
        &m.path,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t31_git_works_inside_the_mount() {
    git_works(&Env::start(1).await);
}

fn git_works(env: &Env) {
    let repo = env.mounts[0].p("repo");
    fs::create_dir(&repo).unwrap();
    run("git", &["init", "-q"], &repo);
    fs::write(repo.join("README"), "hello\n").unwrap();
    fs::create_dir(repo.join("pages")).unwrap();
    fs::write(repo.join("pages/start.txt"), "====== Start ======\n").unwrap();
    run("git", &["add", "-A"], &repo);
    run(
        "git",
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "commit",
            "-qm",
            "first",
        ],
        &repo,
    );
    fs::write(repo.join("README"), "hello again\n").unwrap();
    run(
        "git",
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "commit",
            "-qam",
            "second",
        ],
        &repo,
    );
    let out = std::process::Command::new("git")
        .args(["log", "--oneline"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    run("git", &["fsck", "--strict"], &repo);
}

/// A page rewritten in place (opened with O_TRUNC, then written, the way
/// PHP's `file_put_contents` and DokuWiki's `io_saveFile` do): the other
/// mount reads the old text until the writer's close and the new one after
/// it, never an empty page; on the writer's mount the file is empty from
/// the open on, as POSIX has it; and a writer killed between its open and
/// its close leaves the old text, not an empty file.
#[tokio::test(flavor = "multi_thread")]
async fn t28_a_page_rewritten_in_place_is_never_empty_elsewhere_and_a_crash_keeps_it() {
    let env = Env::start(2).await;
    env.wait_for_lease_streams(2);
    let (a, b) = (env.mounts[0].p("page.txt"), env.mounts[1].p("page.txt"));
    fs::write(&a, b"the old text of the page\n").unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"the old text of the page\n");
    for round in 0..5 {
        let old = fs::read(&a).unwrap();
        let new = format!("text {round}\n").into_bytes();
        let mut w = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&a)
            .unwrap();
        // Here: empty from the open on (another descriptor, a stat).
        assert_eq!(fs::read(&a).unwrap(), b"", "round {round}: here");
        assert_eq!(fs::metadata(&a).unwrap().len(), 0);
        // There: the old text, whole.
        assert_eq!(fs::read(&b).unwrap(), old, "round {round}: elsewhere");
        w.write_all(&new[..3]).unwrap();
        assert_eq!(
            fs::read(&a).unwrap(),
            &new[..3],
            "round {round}: partly written"
        );
        w.write_all(&new[3..]).unwrap();
        drop(w);
        assert_eq!(fs::read(&b).unwrap(), new, "round {round}: after the close");
        assert_eq!(fs::read(&a).unwrap(), new);
    }
    // Opened with O_TRUNC and closed with nothing written: empty everywhere.
    drop(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&a)
            .unwrap(),
    );
    assert_eq!(fs::read(&b).unwrap(), b"");
    fs::write(&a, b"kept\n").unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"kept\n");
    // The writer's web host dies between the open and the close.
    let mut w = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&a)
        .unwrap();
    let _ = w.write_all(b"never closed\n");
    let pid = env.mounts[0].pid().expect("the mount runs") as libc::pid_t;
    // SAFETY: kill(2) on the mount process this test started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    drop(w);
    assert_eq!(fs::read(&b).unwrap(), b"kept\n", "the old text stays");
}

/// A web host's credential confined to a subtree mounts that subtree as
/// its root and reaches nothing else; a read-only one mounts read-only.
#[tokio::test(flavor = "multi_thread")]
async fn t31_subtree_and_read_only_credentials_mount_as_such() {
    let mut env = Env::start(1).await;
    let all = env.mounts[0].path.clone();
    fs::create_dir_all(all.join("wiki/pages")).unwrap();
    fs::write(all.join("wiki/pages/start.txt"), b"inside\n").unwrap();
    fs::create_dir(all.join("secret")).unwrap();
    fs::write(all.join("secret/users.auth.php"), b"hashes\n").unwrap();
    let web = env.cluster.client_cred("web1", "/wiki", false).unwrap();
    let w = env.mount_with("a", &format!("cred={}", web.display()));
    let root = env.mounts[w].path.clone();
    let names: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["pages".to_string()], "its root is /wiki");
    assert_eq!(fs::read(root.join("pages/start.txt")).unwrap(), b"inside\n");
    fs::write(root.join("pages/new.txt"), b"written by web1\n").unwrap();
    assert_eq!(
        fs::read(all.join("wiki/pages/new.txt")).unwrap(),
        b"written by web1\n"
    );
    assert!(!root.join("secret").exists());
    let reader = env.cluster.client_cred("reader", "/", true).unwrap();
    let r = env.mount_with("a", &format!("cred={}", reader.display()));
    let ro = env.mounts[r].path.clone();
    assert_eq!(
        fs::read(ro.join("secret/users.auth.php")).unwrap(),
        b"hashes\n"
    );
    let err = fs::write(ro.join("secret/x"), b"no").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(!all.join("secret/x").exists());
}

/// `touch` without a time (UTIME_NOW) stamps the tracker leader's clock,
/// not the web host's: a mount whose clock is an hour ahead (libfaketime,
/// Debian's `faketime`) puts no file an hour into the future, while a time
/// given explicitly is kept as given.
#[tokio::test(flavor = "multi_thread")]
async fn t32_touch_stamps_the_clusters_clock_not_the_web_hosts() {
    let Some(ahead) = faketime_env(3600.0) else {
        eprintln!("skipped: libfaketime is missing (apt-get install faketime)");
        return;
    };
    let mut env = Env::start(0).await;
    let m = env.mount_with_env("a", "", &ahead);
    let f = env.mounts[m].path.join("touched.txt");
    fs::write(&f, b"x").unwrap();
    let now = std::time::SystemTime::now();
    // SAFETY: a valid C string; a null `times` means UTIME_NOW for both.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(&f).as_ptr(), std::ptr::null(), 0) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let off = |t: std::time::SystemTime| match t.duration_since(now) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    let md = fs::metadata(&f).unwrap();
    for (what, t) in [
        ("mtime", md.modified().unwrap()),
        ("atime", md.accessed().unwrap()),
    ] {
        assert!(
            off(t).abs() < 60.0,
            "{what} is {:.0} s off the cluster's clock",
            off(t)
        );
    }
    // An explicit time stays as given (cp -p, touch -d).
    let given = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(given)
        .unwrap();
    assert_eq!(fs::metadata(&f).unwrap().modified().unwrap(), given);
}

/// Special files are inodes of their own, as on a local disk: a FIFO, a
/// unix socket's inode (bind) and character and block device nodes keep
/// their type, permissions and device number, show so on the other mount,
/// rename, link and unlink like any file, and refuse a name already taken
/// (EEXIST). Each web host's kernel serves them: a FIFO carries bytes
/// between two processes on one mount.
#[tokio::test(flavor = "multi_thread")]
async fn t33_special_files_are_inodes_of_their_own_on_every_mount() {
    use std::os::unix::fs::FileTypeExt;
    let env = Env::start(2).await;
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    let mknod = |p: &Path, mode: libc::mode_t, dev: libc::dev_t| {
        // SAFETY: a valid C string.
        let r = unsafe { libc::mknod(c(p).as_ptr(), mode, dev) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let char_dev = libc::makedev(1, 3);
    let block_dev = libc::makedev(7, 9);
    mknod(&a.p("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&a.p("chr"), libc::S_IFCHR | 0o600, char_dev).unwrap();
    mknod(&a.p("blk"), libc::S_IFBLK | 0o660, block_dev).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(a.p("sock")).unwrap();

    for m in [a, b] {
        let fifo = fs::symlink_metadata(m.p("fifo")).unwrap();
        assert!(fifo.file_type().is_fifo(), "{:?}", fifo.file_type());
        assert_eq!(fifo.mode() & 0o7777, 0o640);
        let chr = fs::symlink_metadata(m.p("chr")).unwrap();
        assert!(chr.file_type().is_char_device());
        assert_eq!((chr.rdev(), chr.mode() & 0o7777), (char_dev, 0o600));
        let blk = fs::symlink_metadata(m.p("blk")).unwrap();
        assert!(blk.file_type().is_block_device());
        assert_eq!(blk.rdev(), block_dev);
        let sock = fs::symlink_metadata(m.p("sock")).unwrap();
        assert!(sock.file_type().is_socket());
        for special in [&fifo, &chr, &blk, &sock] {
            assert_eq!((special.len(), special.nlink()), (0, 1));
        }
    }

    // The socket takes connections on the web host that bound it.
    let client = std::os::unix::net::UnixStream::connect(a.p("sock")).unwrap();
    let (mut served, _) = listener.accept().unwrap();
    (&client).write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    served.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    // A FIFO made on mount a carries bytes between two processes on b.
    let fifo_b = b.p("fifo");
    let writer = std::thread::spawn(move || fs::write(fifo_b, b"through the pipe\n"));
    assert_eq!(fs::read(b.p("fifo")).unwrap(), b"through the pipe\n");
    writer.join().unwrap().unwrap();

    // Names taken, whatever the type.
    for name in ["fifo", "chr", "sock"] {
        let e = mknod(&a.p(name), libc::S_IFIFO | 0o644, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{name}");
    }
    let e = mknod(&a.p("fifo"), libc::S_IFCHR | 0o644, char_dev).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));

    // Renamed, linked and unlinked like any file, seen so on the other mount.
    fs::rename(a.p("fifo"), a.p("fifo2")).unwrap();
    fs::hard_link(a.p("chr"), a.p("chr2")).unwrap();
    fs::remove_file(a.p("blk")).unwrap();
    drop(listener);
    fs::remove_file(a.p("sock")).unwrap();
    assert!(fs::symlink_metadata(b.p("fifo2"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(b.p("fifo")).is_err());
    let linked = fs::symlink_metadata(b.p("chr2")).unwrap();
    assert_eq!((linked.nlink(), linked.rdev()), (2, char_dev));
    assert!(fs::symlink_metadata(b.p("blk")).is_err());
    assert!(fs::symlink_metadata(b.p("sock")).is_err());
    // mknod makes no directory (EPERM, as on any Linux file system).
    let e = mknod(&a.p("dir"), libc::S_IFDIR | 0o755, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
}

/// A name longer than NAME_MAX (255 bytes) is ENAMETOOLONG for every call
/// that looks it up or makes it, never ENOENT (the kernel leaves that check
/// to the file system); a name of 255 bytes is a name like any other.
#[tokio::test(flavor = "multi_thread")]
async fn t34_a_name_over_name_max_is_enametoolong() {
    let env = Env::start(1).await;
    let m = &env.mounts[0];
    let (max, over) = (m.path.join("n".repeat(255)), m.path.join("n".repeat(256)));
    fs::write(&max, b"x").unwrap();
    fs::write(m.p("short"), b"x").unwrap();
    let tries = [
        ("stat", fs::metadata(&over).map(|_| ())),
        ("unlink", fs::remove_file(&over)),
        ("create", fs::write(&over, b"x")),
        ("mkdir", fs::create_dir(&over)),
        (
            "chmod",
            fs::set_permissions(&over, fs::Permissions::from_mode(0o600)),
        ),
        ("rename from", fs::rename(&over, m.p("other"))),
        ("rename to", fs::rename(m.p("short"), &over)),
        ("link", fs::hard_link(m.p("short"), &over)),
        ("symlink", std::os::unix::fs::symlink("short", &over)),
    ];
    for (what, r) in tries {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "{what}: {e}");
    }
    fs::rename(&max, m.p("renamed")).unwrap();
    assert_eq!(fs::read(m.p("renamed")).unwrap(), b"x");
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let name = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of `value.len()` bytes.
    let r = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// getxattr with a buffer of `size` bytes (0: the value's size only).
fn getxattr(p: &Path, name: &str, size: usize) -> std::io::Result<Vec<u8>> {
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: valid C strings and a buffer of `size` bytes.
    let n = unsafe { libc::lgetxattr(c(p).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(if size == 0 { 0 } else { n as usize });
    if size == 0 {
        buf = (n as usize).to_le_bytes().to_vec();
    }
    Ok(buf)
}

fn listxattr(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: a valid C string and a buffer of 4096 bytes.
    let n = unsafe { libc::llistxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "{}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf.split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).to_string())
        .collect()
}

fn errno_is(r: std::io::Result<impl std::fmt::Debug>, want: i32, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.raw_os_error(), Some(want), "{what}: {e}");
}

/// User extended attributes are kept by the cluster: set on one mount,
/// read and listed on the other, with setxattr's create/replace rules,
/// ENODATA, ERANGE and E2BIG, kept across a rename and by `cp -a`, and
/// refused on symlinks (EPERM, as Linux does). Other namespaces (security,
/// trusted, system: POSIX ACLs) are not supported: EOPNOTSUPP to set,
/// ENODATA to get.
#[tokio::test(flavor = "multi_thread")]
async fn t35_user_extended_attributes_are_seen_on_every_mount() {
    let env = Env::start(2).await;
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    fs::write(a.p("page.txt"), b"text").unwrap();
    fs::create_dir(a.p("dir")).unwrap();
    let before = fs::metadata(a.p("page.txt")).unwrap().ctime_nsec();
    setxattr(&a.p("page.txt"), "user.color", b"blue", 0).unwrap();
    setxattr(&a.p("page.txt"), "user.empty", b"", 0).unwrap();
    setxattr(&a.p("dir"), "user.dir", b"yes", 0).unwrap();

    assert_eq!(
        getxattr(&b.p("page.txt"), "user.color", 64).unwrap(),
        b"blue"
    );
    assert_eq!(getxattr(&b.p("page.txt"), "user.empty", 64).unwrap(), b"");
    assert_eq!(
        getxattr(&b.p("page.txt"), "user.color", 0).unwrap(),
        4usize.to_le_bytes()
    );
    errno_is(
        getxattr(&b.p("page.txt"), "user.color", 2),
        libc::ERANGE,
        "small buffer",
    );
    assert_eq!(listxattr(&b.p("page.txt")), ["user.color", "user.empty"]);
    assert_eq!(getxattr(&b.p("dir"), "user.dir", 64).unwrap(), b"yes");
    assert_ne!(fs::metadata(b.p("page.txt")).unwrap().ctime_nsec(), before);

    // setxattr's flags, and a value replaced.
    errno_is(
        setxattr(&b.p("page.txt"), "user.color", b"red", libc::XATTR_CREATE),
        libc::EEXIST,
        "create over an existing attribute",
    );
    errno_is(
        setxattr(&b.p("page.txt"), "user.none", b"x", libc::XATTR_REPLACE),
        libc::ENODATA,
        "replace of a missing attribute",
    );
    setxattr(&b.p("page.txt"), "user.color", b"red", libc::XATTR_REPLACE).unwrap();
    assert_eq!(
        getxattr(&a.p("page.txt"), "user.color", 64).unwrap(),
        b"red"
    );

    // The largest value Linux allows, and one more byte.
    let big = vec![7u8; 65536];
    setxattr(&a.p("page.txt"), "user.big", &big, 0).unwrap();
    assert_eq!(getxattr(&b.p("page.txt"), "user.big", 65536).unwrap(), big);
    errno_is(
        setxattr(&a.p("page.txt"), "user.bigger", &vec![7u8; 65537], 0),
        libc::E2BIG,
        "a value over 64 KiB",
    );

    // Kept across a rename and by cp -a; removed with the name.
    fs::rename(a.p("page.txt"), a.p("renamed.txt")).unwrap();
    assert_eq!(
        getxattr(&b.p("renamed.txt"), "user.color", 64).unwrap(),
        b"red"
    );
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(a.p("renamed.txt"))
        .arg(a.p("copy.txt"))
        .status()
        .unwrap();
    assert!(cp.success());
    assert_eq!(
        getxattr(&b.p("copy.txt"), "user.color", 64).unwrap(),
        b"red"
    );
    // SAFETY: valid C strings.
    let r = unsafe { libc::lremovexattr(c(&b.p("renamed.txt")).as_ptr(), c"user.color".as_ptr()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    errno_is(
        getxattr(&a.p("renamed.txt"), "user.color", 64),
        libc::ENODATA,
        "removed",
    );
    // SAFETY: valid C strings.
    let r = unsafe { libc::lremovexattr(c(&b.p("renamed.txt")).as_ptr(), c"user.color".as_ptr()) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );

    // Where they are not kept.
    std::os::unix::fs::symlink("renamed.txt", a.p("link")).unwrap();
    errno_is(
        setxattr(&a.p("link"), "user.x", b"1", 0),
        libc::EPERM,
        "symlink",
    );
    errno_is(
        setxattr(&a.p("renamed.txt"), "trusted.x", b"1", 0),
        libc::EOPNOTSUPP,
        "trusted namespace",
    );
    errno_is(
        getxattr(&a.p("renamed.txt"), "security.capability", 64),
        libc::ENODATA,
        "security namespace",
    );
}

/// Two users who are not root, as the tests run a command as them.
const ALICE: u32 = 65534;
const BOB: u32 = 65533;

/// Lets users who are not root reach the mounts (the test's directory is
/// private by default; the mounts need `allow_other` too).
fn open_to_all(env: &Env) {
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `sh -c script` in `dir` as user and group `id` (no supplementary
/// groups): whether it succeeded, and what it said.
fn as_user(id: u32, dir: &Path, script: &str) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .uid(id)
        .gid(id)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Fails unless `script` run as `id` in `dir` is refused with `why`.
fn refused(id: u32, dir: &Path, script: &str, why: &str) {
    let (ok, err) = as_user(id, dir, script);
    assert!(
        !ok && err.contains(why),
        "{script} as {id} in {}: {err}",
        dir.display()
    );
}

fn allowed(id: u32, dir: &Path, script: &str) {
    let (ok, err) = as_user(id, dir, script);
    assert!(ok, "{script} as {id} in {}: {err}", dir.display());
}

/// A sticky directory (mode 1777, like /tmp) lets anyone make entries but
/// only an entry's owner, the directory's owner or root rename or remove
/// them, on every mount.
#[tokio::test(flavor = "multi_thread")]
async fn t36_a_sticky_directory_refuses_a_non_owners_rename_and_unlink_on_both_mounts() {
    let env = Env::start_mounts_with(2, "allow_other").await;
    open_to_all(&env);
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    fs::create_dir(a.p("shared")).unwrap();
    fs::set_permissions(a.p("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    let (sa, sb) = (a.p("shared"), b.p("shared"));
    allowed(ALICE, &sa, "echo alice > alice.txt");
    for dir in [&sa, &sb] {
        refused(
            BOB,
            dir,
            "mv alice.txt taken.txt",
            "Operation not permitted",
        );
        refused(BOB, dir, "rm -f alice.txt", "Operation not permitted");
        refused(
            BOB,
            dir,
            "echo bob > bob.txt && mv bob.txt alice.txt",
            "Operation not permitted",
        );
        allowed(BOB, dir, "rm -f bob.txt");
    }
    assert_eq!(fs::read(sb.join("alice.txt")).unwrap(), b"alice\n");
    // Its owner may; so may the directory's owner.
    allowed(ALICE, &sb, "mv alice.txt renamed.txt");
    assert!(fs::metadata(sa.join("renamed.txt")).is_ok());
    fs::set_permissions(a.p("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::chown(&sa, Some(BOB), Some(BOB)).unwrap();
    allowed(BOB, &sb, "rm renamed.txt");
    assert!(fs::metadata(sa.join("renamed.txt")).is_err());
    // Without the sticky bit, write permission on the directory is enough.
    fs::set_permissions(a.p("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    allowed(ALICE, &sa, "echo again > alice.txt");
    allowed(BOB, &sb, "mv alice.txt bobs-now.txt");
}

/// Set-user-ID and set-group-ID bits, and who may change owners, modes and
/// times, as on a local disk: a write by a caller without privilege clears
/// the set-id bits, as does a change of owner (by root too); a non-owner
/// may not chmod, chown or set times explicitly; an owner may give a file
/// only to a group it is in.
#[tokio::test(flavor = "multi_thread")]
async fn t37_set_id_bits_and_ownership_follow_the_rules_for_callers_without_privilege() {
    use std::os::unix::fs::chown;
    let env = Env::start_mounts_with(2, "allow_other").await;
    open_to_all(&env);
    let (a, b) = (&env.mounts[0], &env.mounts[1]);
    fs::create_dir(a.p("home")).unwrap();
    fs::set_permissions(a.p("home"), fs::Permissions::from_mode(0o777)).unwrap();
    let (ha, hb) = (a.p("home"), b.p("home"));
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;

    // A write by its owner (not root) clears both set-id bits.
    fs::write(ha.join("tool"), b"#!/bin/sh\n").unwrap();
    chown(ha.join("tool"), Some(ALICE), Some(ALICE)).unwrap();
    fs::set_permissions(ha.join("tool"), fs::Permissions::from_mode(0o6775)).unwrap();
    assert_eq!(mode(&hb.join("tool")), 0o6775);
    allowed(ALICE, &hb, "echo more >> tool");
    assert_eq!(mode(&ha.join("tool")), 0o775, "a write clears set-id bits");

    // A change of owner clears them, by root too.
    fs::set_permissions(ha.join("tool"), fs::Permissions::from_mode(0o6775)).unwrap();
    chown(hb.join("tool"), Some(BOB), None).unwrap();
    assert_eq!(mode(&ha.join("tool")), 0o775, "chown clears set-id bits");

    // Only the owner (or root) changes mode, owner and explicit times.
    fs::write(ha.join("bobs"), b"x").unwrap();
    chown(ha.join("bobs"), Some(BOB), Some(BOB)).unwrap();
    fs::set_permissions(ha.join("bobs"), fs::Permissions::from_mode(0o666)).unwrap();
    refused(ALICE, &hb, "chmod 600 bobs", "Operation not permitted");
    refused(ALICE, &hb, "chown 65534 bobs", "Operation not permitted");
    refused(
        ALICE,
        &hb,
        "touch -d 2001-01-01 bobs",
        "Operation not permitted",
    );
    allowed(ALICE, &hb, "touch bobs");
    allowed(BOB, &hb, "chmod 640 bobs");
    assert_eq!(mode(&ha.join("bobs")), 0o640);
    // An owner may not give a file away, nor to a group it is not in.
    refused(BOB, &hb, "chown 65534 bobs", "Operation not permitted");
    refused(BOB, &hb, "chgrp 0 bobs", "Operation not permitted");
    allowed(BOB, &hb, "chgrp 65533 bobs");
    // A group member's chmod of a file in another group drops set-gid.
    allowed(BOB, &hb, "chmod 2755 bobs");
    assert_eq!(mode(&ha.join("bobs")), 0o2755);
    chown(ha.join("bobs"), None, Some(0)).unwrap();
    allowed(BOB, &hb, "chmod 2755 bobs");
    assert_eq!(
        mode(&ha.join("bobs")),
        0o755,
        "not in the file's group: no set-gid"
    );
}

/// A name already taken is EEXIST whatever stands there and whatever would
/// be made: mkdir, symlink, link, mkfifo and an exclusive create.
#[tokio::test(flavor = "multi_thread")]
async fn t38_every_kind_of_creation_over_every_kind_of_entry_is_eexist() {
    use std::os::unix::fs::symlink;
    let env = Env::start(1).await;
    let m = &env.mounts[0];
    fs::write(m.p("file"), b"x").unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    symlink("file", m.p("link")).unwrap();
    symlink("nowhere", m.p("dangling")).unwrap();
    let fifo = c(&m.p("fifo"));
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    for name in ["file", "dir", "link", "dangling", "fifo"] {
        let p = m.p(name);
        let tries = [
            ("mkdir", fs::create_dir(&p)),
            ("symlink", symlink("x", &p)),
            ("link", fs::hard_link(m.p("file"), &p)),
            (
                "O_EXCL",
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map(drop),
            ),
        ];
        for (what, r) in tries {
            let e = r.expect_err(what);
            assert_eq!(
                e.raw_os_error(),
                Some(libc::EEXIST),
                "{what} over {name}: {e}"
            );
        }
        // SAFETY: a valid C string.
        let r = unsafe { libc::mkfifo(c(&p).as_ptr(), 0o644) };
        let e = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((r, e), (-1, Some(libc::EEXIST)), "mkfifo over {name}");
    }
}

/// With write-behind, unlinking one name of a file with two links is seen
/// at once in the other name's link count (such an unlink goes to the
/// cluster, not into the directory's pending changes).
#[tokio::test(flavor = "multi_thread")]
async fn t39_with_writebehind_an_unlinked_hard_link_leaves_the_count_right() {
    let env = Env::start_mounts_with(1, "writebehind").await;
    let m = &env.mounts[0];
    fs::write(m.p("page"), b"x").unwrap();
    fs::hard_link(m.p("page"), m.p("other")).unwrap();
    assert_eq!(fs::metadata(m.p("other")).unwrap().nlink(), 2);
    fs::remove_file(m.p("page")).unwrap();
    assert_eq!(fs::metadata(m.p("other")).unwrap().nlink(), 1);
    fs::hard_link(m.p("other"), m.p("page")).unwrap();
    fs::rename(m.p("other"), m.p("renamed")).unwrap();
    fs::remove_file(m.p("page")).unwrap();
    assert_eq!(fs::metadata(m.p("renamed")).unwrap().nlink(), 1);
}

/// One O_APPEND write() lands whole, however the kernel cuts it: a write
/// that crosses a page boundary of a page not in its cache reaches the
/// mount as two requests, and a close of another handle of the file on
/// the same mount (a flush, which stores the file's buffered bytes) may
/// come between them. Another mount appends meanwhile; its lines must never
/// land inside one of ours.
#[tokio::test(flavor = "multi_thread")]
async fn t40_an_append_lands_whole_though_the_kernel_cuts_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let env = Env::start(2).await;
    let (a, b) = (env.mounts[0].path.clone(), env.mounts[1].path.clone());
    let log = "appends.log";
    fs::write(a.join(log), "").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Lines of about 3000 bytes: nearly every one crosses a page boundary.
    let line = |who: &str, i: usize| format!("{who} {i:06} {}\n", "x".repeat(2990 + i % 7));
    let a_appender = {
        let (path, stop) = (a.join(log), stop.clone());
        std::thread::spawn(move || {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            let mut n = 0;
            // At most 60 MB: the mount buffers them faster than b syncs.
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                f.write_all(line("a", n).as_bytes()).unwrap();
                n += 1;
            }
            n
        })
    };
    let a_closer = {
        let (path, stop) = (a.join(log), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                drop(File::open(&path).unwrap());
            }
        })
    };
    let b_appender = {
        let (path, stop) = (b.join(log), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                f.write_all(line("b", n).as_bytes()).unwrap();
                f.sync_all().unwrap();
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let (na, nb) = (a_appender.join().unwrap(), b_appender.join().unwrap());
    a_closer.join().unwrap();
    eprintln!("{na} lines from a, {nb} from b");
    for root in [&a, &b] {
        let text = fs::read_to_string(root.join(log)).unwrap();
        let mut seen = 0;
        for l in text.lines() {
            let mut parts = l.splitn(3, ' ');
            let (who, i) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let whole = i
                .parse::<usize>()
                .is_ok_and(|i| format!("{l}\n") == line(who, i));
            assert!(whole, "a line cut or mixed: {:?}", &l[..l.len().min(80)]);
            seen += 1;
        }
        assert_eq!(seen, na + nb);
    }
    // Appends skip the page cache: a reader that holds the file open here
    // and has read its last page still reads what is appended after it.
    fs::write(a.join("short.log"), "one\n").unwrap();
    let mut reader = File::open(a.join("short.log")).unwrap();
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    let mut w = OpenOptions::new()
        .append(true)
        .open(a.join("short.log"))
        .unwrap();
    w.write_all(b"two\n").unwrap();
    reader.read_to_string(&mut text).unwrap();
    assert_eq!(text, "one\ntwo\n");
    drop(w);
    assert_eq!(
        fs::read_to_string(a.join("short.log")).unwrap(),
        "one\ntwo\n"
    );
}

/// A listing opened before a change in the directory and read after it
/// (readdirplus from the handle's snapshot) must not leave the kernel
/// holding a name the change moved: here the temp file renamed over the
/// page, by the inode that is now the page's. Were that name leased to the
/// kernel, the next save's `open(O_CREAT|O_TRUNC)` of the temp name would
/// open the page itself and empty it, and its rename would do nothing.
#[tokio::test(flavor = "multi_thread")]
async fn t41_a_listing_read_after_a_rename_gives_the_kernel_no_stale_name() {
    let env = Env::start(1).await;
    let m = &env.mounts[0];
    let pages = m.p("pages");
    fs::create_dir(&pages).unwrap();
    fs::write(pages.join("page.txt"), b"v0").unwrap();
    for round in 1..=3u32 {
        let text = format!("v{round}");
        let tmp = pages.join(".page.txt.tmp");
        fs::write(&tmp, text.as_bytes()).unwrap();
        // Opened with the temp file in it, read after its rename.
        let listing = fs::read_dir(&pages).unwrap();
        fs::rename(&tmp, pages.join("page.txt")).unwrap();
        let names: Vec<_> = listing.map(|e| e.unwrap().file_name()).collect();
        assert!(!names.is_empty());
        // The next save's temp file is a new file: the page keeps its text.
        let mut next = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .unwrap();
        next.write_all(b"next").unwrap();
        drop(next);
        assert_eq!(
            fs::read_to_string(pages.join("page.txt")).unwrap(),
            text,
            "round {round}: creating the temp file left the page alone"
        );
        fs::remove_file(&tmp).unwrap();
        assert_eq!(
            fs::read_to_string(pages.join("page.txt")).unwrap(),
            text,
            "round {round}: removing the temp file left the page alone"
        );
    }
}
