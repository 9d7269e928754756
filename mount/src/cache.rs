//! The block cache on local disk. Blocks are immutable and named by their
//! hash, so a cached block can never be stale; each read is verified anyway,
//! so a damaged cache file is dropped, never served. Only the mount's own
//! user may read it (the directory 0700, each file 0600): it holds the
//! bytes of files other local users may not read (DokuWiki's password
//! file among them).

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use failsafe_core::{block_hash, hash_hex};

pub(crate) struct BlockCache {
    dir: PathBuf,
    limit: u64,
    /// Insertion order and sizes, for eviction. A std Mutex: short sections,
    /// no await inside.
    state: Mutex<(VecDeque<(String, u64)>, u64)>,
}

impl BlockCache {
    /// Opens (and empties) a cache directory holding at most `limit` bytes.
    pub(crate) fn open(dir: &Path, limit: u64) -> std::io::Result<BlockCache> {
        std::fs::create_dir_all(dir)?;
        // Before anything is put there; an existing directory (a cache_dir
        // made by hand, or by an older version) is closed too.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        // Starting empty keeps the size accounting exact; the blocks are one
        // fetch away.
        for entry in std::fs::read_dir(dir)?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(BlockCache {
            dir: dir.to_path_buf(),
            limit,
            state: Mutex::new((VecDeque::new(), 0)),
        })
    }

    pub(crate) fn get(&self, hash: &[u8]) -> Option<Vec<u8>> {
        let path = self.dir.join(hash_hex(hash));
        let data = std::fs::read(&path).ok()?;
        if block_hash(&data)[..] != hash[..] {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(data)
    }

    pub(crate) fn put(&self, hash: &[u8], data: &[u8]) {
        if self.limit == 0 || data.len() as u64 > self.limit {
            return;
        }
        let name = hash_hex(hash);
        let path = self.dir.join(&name);
        if path.exists() {
            return;
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(data));
        if written.and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0.push_back((name, data.len() as u64));
        st.1 += data.len() as u64;
        while st.1 > self.limit {
            let Some((old, size)) = st.0.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(self.dir.join(old));
            st.1 -= size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_verifies_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 25).unwrap();
        let (a, b) = (vec![1u8; 10], vec![2u8; 20]);
        let (ha, hb) = (block_hash(&a), block_hash(&b));
        c.put(&ha, &a);
        assert_eq!(c.get(&ha), Some(a.clone()));
        std::fs::write(dir.path().join(hash_hex(&ha)), b"tampered!!").unwrap();
        assert_eq!(c.get(&ha), None, "a damaged cache file is not served");
        c.put(&hb, &b); // over the limit: the oldest goes
        assert_eq!(c.get(&hb), Some(b));
        assert!(!dir.path().join(hash_hex(&ha)).exists());
    }

    /// Another local user can neither list the cache nor read a block in
    /// it, even one cached from a world-readable file, and even when the
    /// directory existed before with looser permissions.
    #[test]
    fn only_the_mounts_user_reads_the_cache() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = base.path().join("cache");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let c = BlockCache::open(&dir, 1 << 20).unwrap();
        let data = b"$1$secret:password hash".to_vec();
        let hash = block_hash(&data);
        c.put(&hash, &data);
        let file = dir.join(hash_hex(&hash));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&file), 0o600);
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: the read as another user is not tried");
            return;
        }
        // As nobody (uid and gid 65534): refused.
        use std::os::unix::process::CommandExt;
        for args in [
            vec!["cat".to_string(), file.display().to_string()],
            vec!["ls".to_string(), dir.display().to_string()],
        ] {
            let out = std::process::Command::new(&args[0])
                .args(&args[1..])
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{args:?} as nobody must fail");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
