//! The workloads, each a function over a directory of the target under test.
//! They time themselves by wall clock and report the operations done and the
//! seconds they took; the caller turns that into the row's unit.
//!
//! The round-trip counters are read by the `probe` argument: just before the
//! timed part starts and just after it ends (warm-up excluded).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use crate::targets::{Snapshot, Target};

/// What a workload measured: `ops` operations (or bytes, for the streams)
/// in `secs` seconds of wall clock.
pub(crate) struct Timed {
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    /// The round-trip counters before and after the timed part (failsafe
    /// with a stats file only).
    pub(crate) before: Option<Snapshot>,
    pub(crate) after: Option<Snapshot>,
    /// How the caches were made cold, or why they could not be.
    pub(crate) note: String,
}

impl Timed {
    fn new(ops: u64, secs: f64, before: Option<Snapshot>, after: Option<Snapshot>) -> Timed {
        Timed {
            ops,
            secs,
            before,
            after,
            note: String::new(),
        }
    }
}

/// Content of a page: `len` bytes that differ from page to page and from
/// save to save (content-addressed storage must not deduplicate them).
pub(crate) fn page_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Printable, like a wiki page.
        v.push(b' ' + (x % 94) as u8);
    }
    v.truncate(len);
    v
}

/// One page save, the way DokuWiki does it: take the page's lock (mkdir),
/// write the new text to a temp file and fsync it, rename it over the page,
/// append a line to the shared change log (O_APPEND) and fsync that, and
/// drop the lock (rmdir).
pub(crate) fn save_page(dir: &Path, name: &str, text: &[u8], line: &[u8]) -> anyhow::Result<()> {
    let lock = dir.join("locks").join(format!("{name}.lock"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fs::create_dir(&lock) {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::AlreadyExists && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", lock.display())),
        }
    }
    let tmp = dir.join("pages").join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join("pages").join(format!("{name}.txt")))?;
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("changes.log"))?;
    log.write_all(line)?;
    log.sync_all()?;
    drop(log);
    fs::remove_dir(&lock)?;
    Ok(())
}

/// Page saves per second by `writers` threads, each saving its own 8 pages
/// in turn, all appending to one change log, for `secs` seconds after each
/// has saved each of its pages once (the warm-up, which also creates them).
pub(crate) fn page_save(
    t: &Target,
    writers: usize,
    page_bytes_len: usize,
    secs: f64,
) -> anyhow::Result<Timed> {
    let dir = t.path.join(format!("save-{writers}"));
    fs::create_dir_all(dir.join("pages"))?;
    fs::create_dir_all(dir.join("locks"))?;
    const PAGES: usize = 8;
    let barrier = Arc::new(Barrier::new(writers + 1));
    let go = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut threads = Vec::new();
    for w in 0..writers {
        let (dir, barrier, go) = (dir.clone(), barrier.clone(), go.clone());
        threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let save = |n: u64| {
                let name = format!("w{w}-p{}", n % PAGES as u64);
                let text = page_bytes(page_bytes_len, (w as u64) << 32 | n);
                let line = format!("{n}\t127.0.0.1\tE\t{name}\tbench save {n}\n");
                save_page(&dir, &name, &text, line.as_bytes())
            };
            let mut n = 0u64;
            for _ in 0..PAGES {
                save(n)?;
                n += 1;
            }
            barrier.wait();
            let deadline = *go.wait() + Duration::from_secs_f64(secs);
            let mut done = 0;
            while Instant::now() < deadline {
                save(n)?;
                n += 1;
                done += 1;
            }
            Ok(done)
        }));
    }
    barrier.wait();
    let before = t.snapshot();
    let start = Instant::now();
    let _ = go.set(start);
    let mut ops = 0;
    let mut failed = None;
    for th in threads {
        match th.join() {
            Ok(Ok(n)) => ops += n,
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some(anyhow::anyhow!("a writer thread panicked")),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = failed {
        return Err(e);
    }
    let after = t.snapshot();
    Ok(Timed::new(ops, elapsed, before, after))
}

/// Creates `n` pages of `len` bytes under `read/` for the page reads.
pub(crate) fn make_read_pages(t: &Target, n: usize, len: usize) -> anyhow::Result<()> {
    let dir = t.path.join("read");
    fs::create_dir_all(&dir)?;
    for i in 0..n {
        let mut f = File::create(dir.join(format!("p{i:05}.txt")))?;
        f.write_all(&page_bytes(len, 0xabc0_0000 + i as u64))?;
    }
    Ok(())
}

/// open, fstat, read the whole page, close.
pub(crate) fn read_page(path: &Path, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len() as usize;
    buf.clear();
    f.read_to_end(buf)?;
    ensure!(buf.len() == len, "{}: short read", path.display());
    Ok(())
}

fn read_paths(t: &Target, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| t.path.join("read").join(format!("p{i:05}.txt")))
        .collect()
}

/// Page reads per second with the pages read once before: `secs` seconds of
/// reading them in turn.
pub(crate) fn page_read_warm(t: &Target, n: usize, secs: f64) -> anyhow::Result<Timed> {
    let paths = read_paths(t, n);
    let mut buf = Vec::new();
    for p in &paths {
        read_page(p, &mut buf)?;
    }
    let before = t.snapshot();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut ops = 0u64;
    while Instant::now() < deadline {
        read_page(&paths[ops as usize % paths.len()], &mut buf)?;
        ops += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Timed::new(ops, elapsed, before, t.snapshot()))
}

/// Page reads per second with cold caches: every page read once.
pub(crate) fn page_read_cold(t: &mut Target, n: usize) -> anyhow::Result<Timed> {
    let note = t.make_cold()?;
    let paths = read_paths(t, n);
    let mut buf = Vec::new();
    let before = t.snapshot();
    let start = Instant::now();
    for p in &paths {
        read_page(p, &mut buf)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut r = Timed::new(n as u64, elapsed, before, t.snapshot());
    r.note = note;
    Ok(r)
}

fn many_dir(t: &Target) -> PathBuf {
    t.path.join("many")
}

/// Seconds to create `n` files of `len` bytes each in one directory (open
/// O_CREAT|O_EXCL, write, close; no fsync, like unpacking an archive).
pub(crate) fn create_files(t: &Target, n: usize, len: usize) -> anyhow::Result<Timed> {
    let dir = many_dir(t);
    fs::create_dir_all(&dir)?;
    let data = page_bytes(len, 0x5eed);
    let before = t.snapshot();
    let start = Instant::now();
    for i in 0..n {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(format!("f{i:06}")))?;
        // Each file different, as real small files are.
        let mut d = data.clone();
        let stamp = (i as u64).to_le_bytes();
        let k = stamp.len().min(d.len());
        d[..k].copy_from_slice(&stamp[..k]);
        f.write_all(&d)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Timed::new(n as u64, elapsed, before, t.snapshot()))
}

/// `ls -l`: read the directory and lstat every entry.
fn ls_l(dir: &Path) -> anyhow::Result<u64> {
    let mut n = 0u64;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = fs::symlink_metadata(e.path())?;
        std::hint::black_box(m.len());
        n += 1;
    }
    Ok(n)
}

/// Timed listings of a warm `ls -l`, of which the median counts: one
/// listing of 10,000 names takes 10-20 ms, and a single one moves by a
/// third between runs (a timer tick, another process woken).
pub(crate) const WARM_LISTINGS: usize = 5;

/// Seconds for `ls -l` of the directory of `create_files`: cold (caches
/// dropped, or a fresh mount: one listing) or warm (right after a
/// listing: the median of [`WARM_LISTINGS`] in a row). The round-trip
/// counters are read before the warm-up listing: reading them waits for
/// the mount's next stats write (up to a second), which must not come
/// between the listings; the round trips of a warm listing are then those
/// of all of them, per file listed.
pub(crate) fn ls_dir(t: &mut Target, n: usize, cold: bool) -> anyhow::Result<Timed> {
    let note = if cold { t.make_cold()? } else { String::new() };
    let before = t.snapshot();
    let timed = if cold { 1 } else { WARM_LISTINGS };
    let mut listed = 0;
    if !cold {
        listed += ls_l(&many_dir(t))? as usize;
    }
    let mut times = Vec::with_capacity(timed);
    for _ in 0..timed {
        let start = Instant::now();
        let seen = ls_l(&many_dir(t))?;
        times.push(start.elapsed().as_secs_f64());
        ensure!(seen == n as u64, "ls -l saw {seen} files, expected {n}");
        listed += n;
    }
    let each: Vec<String> = times.iter().map(|s| format!("{:.2}", s * 1e3)).collect();
    times.sort_by(f64::total_cmp);
    let mut r = Timed::new(1, times[times.len() / 2], before, t.snapshot());
    r.ops = listed as u64;
    r.note = if cold {
        note
    } else {
        format!("listings in turn (ms): {}", each.join(", "))
    };
    Ok(r)
}

/// Seconds to delete the `n` files of `create_files` (unlink each, then
/// rmdir).
pub(crate) fn delete_files(t: &Target, n: usize) -> anyhow::Result<Timed> {
    let dir = many_dir(t);
    let before = t.snapshot();
    let start = Instant::now();
    for i in 0..n {
        fs::remove_file(dir.join(format!("f{i:06}")))?;
    }
    fs::remove_dir(&dir)?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Timed::new(n as u64, elapsed, before, t.snapshot()))
}

const CHUNK: usize = 1 << 20;

/// Bytes per second writing one file of `bytes` in 1 MiB writes, then
/// fsync; the time includes the fsync. Every 4 KiB differs from every other
/// (no deduplication helps).
pub(crate) fn stream_write(t: &Target, bytes: u64) -> anyhow::Result<Timed> {
    let path = t.path.join("stream.bin");
    let mut buf = page_bytes(CHUNK, 0x57ea_0000);
    let mut f = File::create(&path)?;
    let before = t.snapshot();
    let start = Instant::now();
    let mut written = 0u64;
    let mut chunk = 0u64;
    while written < bytes {
        for (k, page) in buf.chunks_mut(4096).enumerate() {
            page[..16].copy_from_slice(&[chunk.to_le_bytes(), (k as u64).to_le_bytes()].concat());
        }
        let len = (bytes - written).min(CHUNK as u64) as usize;
        f.write_all(&buf[..len])?;
        written += len as u64;
        chunk += 1;
    }
    f.sync_all()?;
    drop(f);
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Timed::new(written, elapsed, before, t.snapshot()))
}

/// Bytes per second reading the file of `stream_write` with cold caches,
/// in 1 MiB reads; then deletes it.
pub(crate) fn stream_read_cold(t: &mut Target, bytes: u64) -> anyhow::Result<Timed> {
    let note = t.make_cold()?;
    let path = t.path.join("stream.bin");
    let mut buf = vec![0u8; CHUNK];
    let mut f = File::open(&path)?;
    let before = t.snapshot();
    let start = Instant::now();
    let mut read = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = t.snapshot();
    drop(f);
    ensure!(read == bytes, "read {read} bytes back, wrote {bytes}");
    fs::remove_file(&path)?;
    let mut r = Timed::new(read, elapsed, before, after);
    r.note = note;
    Ok(r)
}
