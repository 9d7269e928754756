//! The workload: wiki-like file operations through the mounts, every one
//! recorded in the history with its start, end, outcome and content hash.
//!
//! Each editor owns its pages, so one page's saves are ordered by their
//! revision number; readers read other editors' pages (on other mounts), and
//! every editor appends to one shared change log. With `shared_pages`,
//! editors on every mount save the same pages, serialized by the page lock
//! and numbered from one counter while the lock is held.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::scenario::Workload;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// mkdir of a page's lock directory (and its rmdir).
    Lock,
    Unlock,
    /// temp file, write, fsync, rename over the page.
    Save,
    /// O_APPEND of one line to the change log, fsync.
    Append,
    Read,
    /// A new file, written and fsynced.
    Create,
    Delete,
    /// A directory listing.
    List,
    /// A save the wiki refused as an edit conflict (someone saved since the
    /// revision the editor started from): nothing written.
    Conflict,
    /// A stat of a page's file on a mount: `rev` holds the mtime it showed
    /// (nanoseconds since the epoch).
    Stat,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Op {
    pub client: usize,
    pub worker: String,
    pub kind: Kind,
    /// Relative to the mount's root.
    pub path: String,
    /// Milliseconds since the workload started.
    pub start_ms: f64,
    pub end_ms: f64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Saves: the revision written; reads: the revision read (0: no such
    /// file); appends: the writer's sequence number.
    pub rev: u64,
    /// BLAKE3 of what was written or read ("" for none).
    pub hash: String,
    /// Appends: the line; reads that found no page header: what they found.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub note: String,
}

impl Op {
    pub(crate) fn took_ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }
}

#[derive(Clone)]
pub(crate) struct History {
    t0: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    pub(crate) fn new() -> History {
        History {
            t0: Instant::now(),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub(crate) fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }

    pub(crate) fn t0(&self) -> Instant {
        self.t0
    }

    fn push(&self, op: Op) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.push(op);
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

pub(crate) fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

pub(crate) const PAGES: &str = "pages";
pub(crate) const SCRATCH: &str = "scratch";
pub(crate) const LOG: &str = "changes.log";

/// The page names of editor `w` on client `c`.
pub(crate) fn page_name(c: usize, w: usize, p: usize) -> String {
    format!("c{c}w{w}-p{p}.txt")
}

/// A page's content: a header naming page and revision, then lines that
/// mostly stay from one revision to the next, as wiki edits do: each
/// revision rewrites a few lines and grows or shrinks the page a little, so
/// torn or mixed content shows and a returning host can get deltas.
pub(crate) fn page_content(page: &str, rev: u64, size: usize) -> Vec<u8> {
    let mut s = format!("page {page} rev {rev}\n");
    let lines = size / 48 + (rev as usize % 5);
    for i in 0..lines {
        if (i as u64 + rev).is_multiple_of(29) {
            s += &format!("line {i} of {page}, edited in revision {rev}\n");
        } else {
            s += &format!("line {i} of {page}, a wiki text that stays\n");
        }
    }
    s.into_bytes()
}

/// The revision a page's content claims, if it has a well-formed header.
pub(crate) fn parse_rev(page: &str, content: &[u8]) -> Option<u64> {
    let first = content.split(|b| *b == b'\n').next()?;
    let first = std::str::from_utf8(first).ok()?;
    first
        .strip_prefix(&format!("page {page} rev "))?
        .parse()
        .ok()
}

pub(crate) struct Ctx {
    pub history: History,
    pub stop: Arc<AtomicBool>,
    pub cfg: Workload,
    pub client: usize,
    pub root: PathBuf,
    /// The last revision given to a save of a shared page, across all
    /// editors (`shared_pages`).
    pub revs: Arc<AtomicU64>,
}

impl Ctx {
    /// Runs `f`, records it, returns its result.
    pub(crate) fn record<T>(
        &self,
        worker: &str,
        kind: Kind,
        path: &str,
        f: impl FnOnce() -> std::io::Result<T>,
        describe: impl FnOnce(Option<&T>) -> (u64, String, String),
    ) -> Option<T> {
        self.record_as(worker, path, f, |r| {
            let (rev, hash, note) = describe(r);
            (kind, rev, hash, note)
        })
    }

    /// `record`, with the kind of operation told by its outcome.
    pub(crate) fn record_as<T>(
        &self,
        worker: &str,
        path: &str,
        f: impl FnOnce() -> std::io::Result<T>,
        describe: impl FnOnce(Option<&T>) -> (Kind, u64, String, String),
    ) -> Option<T> {
        let start_ms = self.history.now_ms();
        let r = f();
        let end_ms = self.history.now_ms();
        let mut op = Op {
            client: self.client,
            worker: worker.to_string(),
            kind: Kind::Read,
            path: path.to_string(),
            start_ms,
            end_ms,
            ok: r.is_ok(),
            error: None,
            rev: 0,
            hash: String::new(),
            note: String::new(),
        };
        // A failed change is described too: it may have applied (its
        // answer lost), and the checker must know what it would have written.
        (op.kind, op.rev, op.hash, op.note) = describe(r.as_ref().ok());
        match r {
            Ok(v) => {
                self.history.push(op);
                Some(v)
            }
            Err(e) => {
                op.error = Some(e.to_string());
                self.history.push(op);
                None
            }
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn pause(&self) {
        std::thread::sleep(Duration::from_millis(self.cfg.think_ms));
    }
}

/// The name of static page `i`: written once, read ever after, like most of a wiki.
pub(crate) fn static_page(i: usize) -> String {
    format!("static-{i}.txt")
}

/// Creates the directories the workload uses and its static pages (through
/// one mount, recorded as saves); returns the static pages' hashes, which
/// are also their block names (one block each).
pub(crate) fn prepare(
    root: &Path,
    history: &History,
    cfg: &Workload,
) -> std::io::Result<Vec<String>> {
    for d in [PAGES, SCRATCH, "locks"] {
        match fs::create_dir(root.join(d)) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let ctx = Ctx {
        history: history.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        cfg: cfg.clone(),
        client: 0,
        root: root.to_path_buf(),
        revs: Arc::new(AtomicU64::new(0)),
    };
    let mut hashes = Vec::new();
    for i in 0..cfg.static_pages {
        let name = static_page(i);
        let content = page_content(&name, 1, cfg.page_bytes);
        let h = hash(&content);
        let path = format!("{PAGES}/{name}");
        ctx.record(
            "setup",
            Kind::Save,
            &path,
            || {
                let mut f = File::create(ctx.p(&path))?;
                f.write_all(&content)?;
                f.sync_all()
            },
            |_| (1, h.clone(), String::new()),
        )
        .ok_or_else(|| std::io::Error::other(format!("writing {path}")))?;
        hashes.push(h);
    }
    Ok(hashes)
}

/// The name of shared page `p` (`shared_pages`: every editor saves it).
pub(crate) fn shared_page(p: usize) -> String {
    format!("shared-p{p}.txt")
}

/// One appender: appends lines of its own to the change log, one open,
/// write, fsync and close each, as fast as they go.
pub(crate) fn appender(ctx: Ctx, a: usize) {
    let me = format!("c{}a{a}", ctx.client);
    let mut k = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        k += 1;
        append_line(&ctx, &me, k, format!("{me} {k}"));
    }
}

/// Appends `line` to the change log (open O_APPEND, write, fsync, close),
/// recorded as `me`'s append for revision `rev`.
fn append_line(ctx: &Ctx, me: &str, rev: u64, line: String) {
    ctx.record(
        me,
        Kind::Append,
        LOG,
        || {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(ctx.p(LOG))?;
            f.write_all(format!("{line}\n").as_bytes())?;
            f.sync_all()
        },
        |_| (rev, String::new(), line.clone()),
    );
}

/// One editor: saves pages in turn the way wikis do, appends each save to
/// the log, and now and then creates a scratch file and deletes the
/// previous one. Its own pages, or with `shared_pages` the pages every
/// editor saves.
pub(crate) fn editor(ctx: Ctx, w: usize) {
    let me = format!("c{}w{w}", ctx.client);
    let mut k = 0u64;
    let mut prev_scratch: Option<String> = None;
    while !ctx.stop.load(Ordering::Relaxed) {
        k += 1;
        if let Some((rev, page, saved_ok)) = save_step(&ctx, &me, w, k) {
            let line = format!(
                "{me} {rev} {page}{}",
                if saved_ok { "" } else { " (save failed)" }
            );
            append_line(&ctx, &me, rev, line);
        }
        if k.is_multiple_of(5) {
            let name = format!("{SCRATCH}/{me}-{k}");
            let content = format!("scratch {name}\n").repeat(20);
            let h = hash(content.as_bytes());
            let created = ctx.record(
                &me,
                Kind::Create,
                &name,
                || {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(ctx.p(&name))?;
                    f.write_all(content.as_bytes())?;
                    f.sync_all()
                },
                |_| (k, h.clone(), String::new()),
            );
            if let Some(old) = prev_scratch.take() {
                ctx.record(
                    &me,
                    Kind::Delete,
                    &old,
                    || fs::remove_file(ctx.p(&old)),
                    |_| (k, String::new(), String::new()),
                );
            }
            if created.is_some() {
                prev_scratch = Some(name);
            }
        }
        ctx.pause();
    }
}

/// Step `k` of editor `w`: takes the next page's lock, saves the page's
/// next revision and unlocks it. Returns the revision, the page and whether
/// the save was acknowledged, or None when the lock could not be taken.
///
/// An editor that owns its pages saves revision `k`, and takes over a lock
/// a failed unlock of its own left behind. With shared pages a page whose
/// lock another editor holds is skipped for now; the page is read under
/// the lock, as a wiki reads the revision it edits; and revisions are
/// numbered across all editors once the lock is held, so while the locks
/// exclude each other one page's revisions are in the order of its saves,
/// as the checker assumes, and the read must see the last save
/// acknowledged before. A shared lock whose mkdir or rmdir failed (outcome
/// unknown) may stay behind, held by nobody: that page is then skipped for
/// the rest of the run (breaking the lock could let two editors hold it).
fn save_step(ctx: &Ctx, me: &str, w: usize, k: u64) -> Option<(u64, String, bool)> {
    let shared = ctx.cfg.shared_pages;
    let page = if shared {
        let first = ctx.client * ctx.cfg.writers + w;
        shared_page((first + k as usize) % ctx.cfg.pages)
    } else {
        page_name(ctx.client, w, (k as usize) % ctx.cfg.pages)
    };
    let lock = format!("locks/{page}.lock");
    let held = ctx.record(
        me,
        Kind::Lock,
        &lock,
        || match fs::create_dir(ctx.p(&lock)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(!shared),
            Err(e) => Err(e),
        },
        |held| {
            let note = if held != Some(&false) {
                ""
            } else {
                "held by another editor"
            };
            (if shared { 0 } else { k }, String::new(), note.to_string())
        },
    )?;
    if !held {
        return None;
    }
    let rev = if shared {
        let rev = ctx.revs.fetch_add(1, Ordering::SeqCst) + 1;
        read_page(ctx, me, &page);
        rev
    } else {
        k
    };
    let saved_ok = save_locked(ctx, me, &page, rev);
    ctx.record(
        me,
        Kind::Unlock,
        &lock,
        || fs::remove_dir(ctx.p(&lock)),
        |_| (rev, String::new(), String::new()),
    );
    Some((rev, page, saved_ok))
}

/// Saves revision `rev` of `page` (its lock held): a temp file written and
/// fsynced, renamed over the page. Recorded even when it fails (its outcome
/// is then unknown); returns whether it was acknowledged.
fn save_locked(ctx: &Ctx, me: &str, page: &str, rev: u64) -> bool {
    let content = page_content(page, rev, ctx.cfg.page_bytes);
    let tmp = format!("{PAGES}/.{page}.{me}.tmp");
    let path = format!("{PAGES}/{page}");
    let h = hash(&content);
    ctx.record(
        me,
        Kind::Save,
        &path,
        || {
            let mut f = File::create(ctx.p(&tmp))?;
            f.write_all(&content)?;
            f.sync_all()?;
            drop(f);
            fs::rename(ctx.p(&tmp), ctx.p(&path))
        },
        |_| (rev, h.clone(), String::new()),
    )
    .is_some()
}

/// Reads `page` and records which revision it found (0: none; u64::MAX:
/// content without a page header, noted).
fn read_page(ctx: &Ctx, me: &str, page: &str) {
    let path = format!("{PAGES}/{page}");
    ctx.record(
        me,
        Kind::Read,
        &path,
        || match fs::read(ctx.p(&path)) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            r => r.map(Some),
        },
        |content| match content.and_then(Option::as_ref) {
            None => (0, String::new(), String::new()),
            Some(b) => match parse_rev(page, b) {
                Some(rev) => (rev, hash(b), String::new()),
                None => (
                    u64::MAX,
                    hash(b),
                    String::from_utf8_lossy(&b[..b.len().min(60)]).to_string(),
                ),
            },
        },
    );
}

/// One reader: reads pages of the editors on other mounts (all editors when
/// there is one mount; with `shared_pages`, the shared pages), now and then
/// the log and the page directory.
pub(crate) fn reader(ctx: Ctx, r: usize, clients: usize, seed: u64) {
    let me = format!("c{}r{r}", ctx.client);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut k = 0u64;
    while !ctx.stop.load(Ordering::Relaxed) {
        k += 1;
        let c = if clients == 1 {
            0
        } else {
            (ctx.client + 1 + rng.random_range(0..clients - 1)) % clients
        };
        let page = if ctx.cfg.static_pages > 0 && k.is_multiple_of(3) {
            static_page(rng.random_range(0..ctx.cfg.static_pages))
        } else if ctx.cfg.shared_pages {
            shared_page(rng.random_range(0..ctx.cfg.pages))
        } else {
            page_name(
                c,
                rng.random_range(0..ctx.cfg.writers),
                rng.random_range(0..ctx.cfg.pages),
            )
        };
        read_page(&ctx, &me, &page);
        if k.is_multiple_of(10) {
            ctx.record(
                &me,
                Kind::Read,
                LOG,
                || {
                    fs::read(ctx.p(LOG)).or_else(|e| {
                        if e.kind() == ErrorKind::NotFound {
                            Ok(Vec::new())
                        } else {
                            Err(e)
                        }
                    })
                },
                |b| (0, b.map(|b| hash(b)).unwrap_or_default(), String::new()),
            );
            ctx.record(
                &me,
                Kind::List,
                PAGES,
                || {
                    fs::read_dir(ctx.p(PAGES))?
                        .map(|e| e.map(|_| ()))
                        .collect::<std::io::Result<Vec<()>>>()
                },
                |v| {
                    (
                        v.map_or(0, |v| v.len() as u64),
                        String::new(),
                        String::new(),
                    )
                },
            );
        }
        std::thread::sleep(Duration::from_millis(
            rng.random_range(0..=2 * ctx.cfg.read_pause_ms),
        ));
    }
}
