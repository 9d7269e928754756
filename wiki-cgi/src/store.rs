//! Pages as plain files, written the way a careful engine does: every
//! revision kept, each file written to a temp name, fsynced and renamed into
//! place; the change logs only appended to. A page lock (an atomic `mkdir`)
//! serializes saves of one page across processes and web hosts sharing the
//! directory; a lock older than `STALE_LOCK` is taken to be a crashed
//! saver's and broken.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest page text accepted.
pub(crate) const MAX_PAGE_BYTES: usize = 512 * 1024;
const STALE_LOCK: Duration = Duration::from_secs(30);
const LOCK_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub(crate) enum StoreError {
    /// The storage refuses writes now (EROFS, EIO, ENOSPC…).
    Unavailable(io::Error),
    Io(io::Error),
    TooLarge,
    /// Another save holds the page lock for too long.
    Busy,
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(code) if [30, 5, 28, 122, 107, 116].contains(&code) => StoreError::Unavailable(e), // EROFS EIO ENOSPC EDQUOT ENOTCONN ESTALE
            _ => StoreError::Io(e),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(e) => write!(f, "storage unavailable: {e}"),
            StoreError::Io(e) => write!(f, "storage error: {e}"),
            StoreError::TooLarge => write!(f, "page larger than {MAX_PAGE_BYTES} bytes"),
            StoreError::Busy => write!(f, "the page is being saved by someone else"),
        }
    }
}

/// A valid page name: 1–100 characters, letters, digits, `_`, `-`, `.`,
/// not starting with `.`. Everything else — `/`, `..`, NUL, spaces — is
/// refused, so a name can never leave the pages directory.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Revision {
    pub rev: u64,
    pub time: u64,
    pub author: String,
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    pub time: u64,
    pub page: String,
    pub rev: u64,
    pub author: String,
    pub summary: String,
}

pub(crate) enum SaveOutcome {
    Saved(u64),
    /// Someone saved revision `current` since the editor started from `base`.
    Conflict {
        current: u64,
    },
}

pub(crate) struct Store {
    root: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One line of a tab-separated log, with tabs and newlines made harmless.
fn field(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        rand::random::<u32>()
    ));
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()
}

struct PageLock {
    path: PathBuf,
}

impl Drop for PageLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.path);
    }
}

impl Store {
    pub(crate) fn open(root: &Path) -> Result<Store, StoreError> {
        for d in ["pages", "attic", "history", "locks"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    fn page_path(&self, name: &str) -> PathBuf {
        self.root.join("pages").join(format!("{name}.md"))
    }

    fn lock(&self, name: &str) -> Result<PageLock, StoreError> {
        let path = self.root.join("locks").join(name);
        let started = std::time::Instant::now();
        loop {
            match fs::create_dir(&path) {
                Ok(()) => return Ok(PageLock { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Aged by the storage's clock, not this web host's: on
                    // shared storage the lock's mtime is the storage's time,
                    // and a web host whose clock is off would break a live
                    // lock (or keep a dead one).
                    let age = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| self.storage_now().ok()?.duration_since(t).ok());
                    if age.is_some_and(|a| a > STALE_LOCK) {
                        // A saver that crashed holding the lock: break it.
                        let _ = fs::remove_dir(&path);
                        continue;
                    }
                    if started.elapsed() > LOCK_WAIT {
                        return Err(StoreError::Busy);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The storage's clock now: the mtime of a file written just now (on
    /// a local disk, this host's clock; on failsafe, the tracker leader's).
    fn storage_now(&self) -> io::Result<SystemTime> {
        let probe = self
            .root
            .join("locks")
            .join(format!(".now.{}", std::process::id()));
        fs::write(&probe, b"")?;
        let t = fs::metadata(&probe).and_then(|m| m.modified());
        let _ = fs::remove_file(&probe);
        t
    }

    /// Where the storage keeps page `name`: its `failsafe.hosts` extended
    /// attribute (JSON, see the mount's `hosts_attr`), when the pages are
    /// on a failsafe mount; None on any other storage.
    pub(crate) fn where_kept(&self, name: &str) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.page_path(name).as_os_str().as_bytes()).ok()?;
        let attr = c"failsafe.hosts";
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: valid C strings, and a buffer of the length given.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                attr.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        String::from_utf8(buf).ok()
    }

    pub(crate) fn read(&self, name: &str) -> Result<Option<String>, StoreError> {
        match fs::read(self.page_path(name)) {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn history(&self, name: &str) -> Result<Vec<Revision>, StoreError> {
        let text = match fs::read_to_string(self.root.join("history").join(format!("{name}.log"))) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, '\t');
                Some(Revision {
                    rev: f.next()?.parse().ok()?,
                    time: f.next()?.parse().ok()?,
                    author: f.next()?.to_string(),
                    summary: f.next().unwrap_or("").to_string(),
                })
            })
            .collect())
    }

    pub(crate) fn current_rev(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.history(name)?.last().map_or(0, |r| r.rev))
    }

    pub(crate) fn revision(&self, name: &str, rev: u64) -> Result<Option<String>, StoreError> {
        match fs::read(self.root.join("attic").join(name).join(format!("{rev}.md"))) {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Saves `text` as the next revision of `name`, if the page is still at
    /// revision `base` (the one the editor started from).
    pub(crate) fn save(
        &self,
        name: &str,
        text: &str,
        base: u64,
        author: &str,
        summary: &str,
    ) -> Result<SaveOutcome, StoreError> {
        if text.len() > MAX_PAGE_BYTES {
            return Err(StoreError::TooLarge);
        }
        let _lock = self.lock(name)?;
        let current = self.current_rev(name)?;
        if current != base {
            return Ok(SaveOutcome::Conflict { current });
        }
        let rev = current + 1;
        let time = now_secs();
        let attic = self.root.join("attic").join(name);
        fs::create_dir_all(&attic)?;
        write_durably(&attic.join(format!("{rev}.md")), text.as_bytes())?;
        write_durably(&self.page_path(name), text.as_bytes())?;
        let (author, summary) = (field(author), field(summary));
        append_line(
            &self.root.join("history").join(format!("{name}.log")),
            &format!("{rev}\t{time}\t{author}\t{summary}\n"),
        )?;
        append_line(
            &self.root.join("changes.log"),
            &format!("{time}\t{name}\t{rev}\t{author}\t{summary}\n"),
        )?;
        Ok(SaveOutcome::Saved(rev))
    }

    /// The most recent changes, newest first.
    pub(crate) fn recent(&self, limit: usize) -> Result<Vec<Change>, StoreError> {
        let text = match fs::read_to_string(self.root.join("changes.log")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(text
            .lines()
            .rev()
            .filter_map(|l| {
                let mut f = l.splitn(5, '\t');
                Some(Change {
                    time: f.next()?.parse().ok()?,
                    page: f.next()?.to_string(),
                    rev: f.next()?.parse().ok()?,
                    author: f.next()?.to_string(),
                    summary: f.next().unwrap_or("").to_string(),
                })
            })
            .take(limit)
            .collect())
    }

    pub(crate) fn pages(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = fs::read_dir(self.root.join("pages"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".md").map(str::to_string))
            .filter(|n| valid_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    pub(crate) fn exists(&self, name: &str) -> bool {
        self.page_path(name).exists()
    }

    /// Pages whose name or text contains every word of `query`
    /// (case-insensitive), with a snippet.
    pub(crate) fn search(&self, query: &str) -> Result<Vec<(String, String)>, StoreError> {
        let words: Vec<String> = query
            .split_whitespace()
            .map(str::to_lowercase)
            .take(10)
            .collect();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let mut hits = Vec::new();
        for name in self.pages()? {
            let Some(text) = self.read(&name)? else {
                continue;
            };
            let hay = format!("{}\n{}", name.to_lowercase(), text.to_lowercase());
            if words.iter().all(|w| hay.contains(w.as_str())) {
                let line = text
                    .lines()
                    .find(|l| l.to_lowercase().contains(words[0].as_str()))
                    .unwrap_or("");
                hits.push((name, line.chars().take(160).collect()));
            }
        }
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "a\0b",
            "a b",
            "x\\y",
            &"n".repeat(101),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["Start", "wiki-links_2", "Ünïcode", "v1.2"] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn saves_keep_every_revision_and_detect_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(matches!(
            s.save("P", "one", 0, "alice", "first").unwrap(),
            SaveOutcome::Saved(1)
        ));
        assert!(matches!(
            s.save("P", "two", 1, "bob", "second").unwrap(),
            SaveOutcome::Saved(2)
        ));
        // An editor who started from revision 1 conflicts.
        assert!(matches!(
            s.save("P", "stale", 1, "carol", "late").unwrap(),
            SaveOutcome::Conflict { current: 2 }
        ));
        assert_eq!(s.read("P").unwrap().as_deref(), Some("two"));
        let h = s.history("P").unwrap();
        assert_eq!(h.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.revision("P", 1).unwrap().as_deref(), Some("one"));
        assert_eq!(s.recent(10).unwrap()[0].page, "P");
        assert_eq!(s.recent(10).unwrap()[0].rev, 2);
        assert_eq!(s.search("TWO").unwrap().len(), 1);
    }

    #[test]
    fn a_stale_lock_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let lock = dir.path().join("locks/P");
        fs::create_dir(&lock).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        File::open(&lock).unwrap().set_modified(old).unwrap();
        assert!(matches!(
            s.save("P", "x", 0, "a", "").unwrap(),
            SaveOutcome::Saved(1)
        ));
        assert!(!lock.exists());
    }
}
