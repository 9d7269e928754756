//! The block store of one host: immutable blocks named by their BLAKE3 hash,
//! kept as files on one or more devices (directories, usually one per disk).
//!
//! A put is verified against its hash and written temp → fsync → rename →
//! fsync dir, so an acknowledged block survives a power cut. A get verifies the
//! hash again; a block whose bytes no longer match is moved to the device's
//! `quarantine/` and reported as corrupt, never served.
//!
//! A block's file modification time says when it was last stored: a put of a
//! block already there refreshes it, and a delete can be told to keep a block
//! stored more recently than some age (a client may have just put it for a
//! write it has not committed yet).
//!
//! This crate never touches the network and is synchronous: the daemon calls
//! it from blocking threads.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use failsafe_core::{block_hash, hash_hex, HASH_LEN, MAX_BLOCK_BYTES};

pub type Hash = [u8; HASH_LEN];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no device {0:#x} on this host")]
    NoSuchDevice(u64),
    #[error("block {0} not found")]
    NotFound(String),
    #[error("block bytes hash to {actual}, not {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("block {hash} is corrupt on device {device:#x} and was quarantined")]
    Corrupt { device: u64, hash: String },
    #[error("block of {0} bytes is over the {MAX_BLOCK_BYTES} byte limit")]
    TooLarge(usize),
    #[error("device {0:#x} is full")]
    Full(u64),
    #[error("device {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Usage of one device, as reported to the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device_id: u64,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub blocks: u64,
}

/// A block file as a listing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    pub hash: Hash,
    pub size: u64,
    /// When it was last stored (written, or put again).
    pub stored_at: SystemTime,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Absent,
    /// Stored more recently than the minimum age asked for: kept.
    TooRecent,
    Removed {
        bytes: u64,
    },
}

struct Device {
    id: u64,
    root: PathBuf,
    used_bytes: AtomicU64,
    blocks: AtomicU64,
    /// Free space no block may take (the tracker's on a shared filesystem).
    keep_free: AtomicU64,
}

impl Device {
    /// Opens a device directory, giving it a persistent id on first use.
    fn open(root: &Path) -> Result<Device, StoreError> {
        for sub in ["blocks", "tmp", "quarantine"] {
            fs::create_dir_all(root.join(sub)).map_err(io_err(root))?;
        }
        let id_path = root.join("device.id");
        let id = match fs::read_to_string(&id_path) {
            Ok(s) => u64::from_str_radix(s.trim(), 16).map_err(|e| StoreError::Io {
                path: id_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = rand::random::<u64>() | 1;
                write_durably(&id_path, format!("{id:016x}\n").as_bytes())?;
                id
            }
            Err(e) => return Err(io_err(&id_path)(e)),
        };
        // Leftovers of puts interrupted by a crash were never acknowledged.
        if let Ok(entries) = fs::read_dir(root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let dev = Device {
            id,
            root: root.to_path_buf(),
            used_bytes: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            keep_free: AtomicU64::new(0),
        };
        let (mut used, mut count) = (0, 0);
        dev.walk(|_, size| {
            used += size;
            count += 1;
        })?;
        dev.used_bytes.store(used, Ordering::Relaxed);
        dev.blocks.store(count, Ordering::Relaxed);
        Ok(dev)
    }

    /// `blocks/ab/cd/abcd…`: two fan-out levels keep directories small.
    fn block_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash_hex(hash);
        self.root
            .join("blocks")
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(hex)
    }

    fn walk(&self, mut f: impl FnMut(Hash, u64)) -> Result<(), StoreError> {
        let top = self.root.join("blocks");
        for l1 in fs::read_dir(&top).map_err(io_err(&top))?.flatten() {
            for l2 in fs::read_dir(l1.path()).map_err(io_err(&top))?.flatten() {
                for file in fs::read_dir(l2.path()).map_err(io_err(&top))?.flatten() {
                    let name = file.file_name();
                    let Some(hash) = name.to_str().and_then(parse_hex_hash) else {
                        continue;
                    };
                    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                    f(hash, size);
                }
            }
        }
        Ok(())
    }
}

fn parse_hex_hash(s: &str) -> Option<Hash> {
    if s.len() != HASH_LEN * 2 {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes `path` so that it is complete or absent after a crash.
fn write_durably(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", rand::random::<u64>()));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

pub struct BlockStore {
    devices: Vec<Device>,
    by_id: HashMap<u64, usize>,
    /// Serializes a put that finds its block already there (and refreshes
    /// its time) with a delete that checks that time, so a delete never
    /// removes a block a put has just answered for. A std Mutex: held for a
    /// stat and a rename or an unlink, on a blocking thread.
    refresh: Mutex<()>,
}

/// Sorted names in `dir`; a directory that is not there is empty.
fn sorted_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

impl BlockStore {
    pub fn open(paths: &[PathBuf]) -> Result<BlockStore, StoreError> {
        let mut devices = Vec::new();
        let mut by_id = HashMap::new();
        for p in paths {
            let dev = Device::open(p)?;
            by_id.insert(dev.id, devices.len());
            devices.push(dev);
        }
        Ok(BlockStore {
            devices,
            by_id,
            refresh: Mutex::new(()),
        })
    }

    /// Keeps `bytes` free on every device that shares a filesystem with
    /// `dir` (the tracker's databases): puts that would take them fail as
    /// full, and the device reports that much less free space, so placement
    /// skips it first.
    pub fn keep_free_for(&self, dir: &Path, bytes: u64) {
        use std::os::unix::fs::MetadataExt;
        let Ok(of_dir) = fs::metadata(dir).map(|m| m.dev()) else {
            return;
        };
        for d in &self.devices {
            if fs::metadata(&d.root).is_ok_and(|m| m.dev() == of_dir) {
                d.keep_free.store(bytes, Ordering::Relaxed);
                tracing::info!(device = format!("{:016x}", d.id), keep_free_bytes = bytes, "device shares a filesystem with the tracker: its reserve is kept free of blocks");
            }
        }
    }

    fn device(&self, id: u64) -> Result<&Device, StoreError> {
        self.by_id
            .get(&id)
            .map(|&i| &self.devices[i])
            .ok_or(StoreError::NoSuchDevice(id))
    }

    pub fn device_ids(&self) -> Vec<u64> {
        self.devices.iter().map(|d| d.id).collect()
    }

    pub fn usage(&self) -> Vec<DeviceUsage> {
        self.devices
            .iter()
            .map(|d| {
                let (capacity_bytes, free_bytes) = fs_space(&d.root).unwrap_or((0, 0));
                DeviceUsage {
                    device_id: d.id,
                    path: d.root.clone(),
                    capacity_bytes,
                    free_bytes: free_bytes.saturating_sub(d.keep_free.load(Ordering::Relaxed)),
                    used_bytes: d.used_bytes.load(Ordering::Relaxed),
                    blocks: d.blocks.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Stores `data` as block `hash` on `device_id`, durably, after checking
    /// that the bytes hash to the name. Storing a block that is already there
    /// succeeds without rewriting it if a sample of it matches `data` (its
    /// size, three 4 KiB ranges); else the rotten copy is replaced.
    pub fn put(&self, device_id: u64, hash: &Hash, data: &[u8]) -> Result<(), StoreError> {
        if data.len() > MAX_BLOCK_BYTES {
            return Err(StoreError::TooLarge(data.len()));
        }
        let actual = block_hash(data);
        if &actual != hash {
            return Err(StoreError::HashMismatch {
                expected: hash_hex(hash),
                actual: hash_hex(&actual),
            });
        }
        let dev = self.device(device_id)?;
        let path = dev.block_path(hash);
        let mut replaced = 0;
        {
            let _held = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
            match File::options().read(true).write(true).open(&path) {
                // Already there and intact as far as a sample shows: it
                // counts as stored now (a rotten copy must not count toward
                // the quorum: it is rewritten below).
                Ok(f) if same_as(&f, data) => {
                    f.set_modified(SystemTime::now()).map_err(io_err(&path))?;
                    return f.sync_all().map_err(io_err(&path));
                }
                Ok(f) => {
                    replaced = f.metadata().map_or(0, |m| m.len());
                    tracing::warn!(path = %path.display(), "a block put again differs from the copy here: rewriting it");
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let keep_free = dev.keep_free.load(Ordering::Relaxed);
        if keep_free > 0
            && fs_space(&dev.root)
                .is_some_and(|(_, free)| free < keep_free.saturating_add(data.len() as u64))
        {
            return Err(StoreError::Full(device_id));
        }
        let dir = path.parent().unwrap_or(&dev.root);
        create_dirs_durably(&dev.root, dir)?;
        let tmp =
            dev.root
                .join("tmp")
                .join(format!("{}.{}", hash_hex(hash), rand::random::<u32>()));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            if e.raw_os_error() == Some(libc::ENOSPC) {
                return Err(StoreError::Full(device_id));
            }
            return Err(StoreError::Io { path, source: e });
        }
        if replaced > 0 {
            dev.used_bytes.fetch_sub(replaced, Ordering::Relaxed);
        } else {
            dev.blocks.fetch_add(1, Ordering::Relaxed);
        }
        dev.used_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads block `hash`, from `device_id` or from any device that has it.
    /// Returns the device it came from and the verified bytes.
    pub fn get(&self, hash: &Hash, device_id: Option<u64>) -> Result<(u64, Vec<u8>), StoreError> {
        let dev = match device_id {
            Some(id) => self.device(id)?,
            None => {
                let id = self
                    .has(hash)
                    .ok_or_else(|| StoreError::NotFound(hash_hex(hash)))?;
                self.device(id)?
            }
        };
        let path = dev.block_path(hash);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut data).map_err(io_err(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(hash_hex(hash)))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if &block_hash(&data) != hash {
            let hex = hash_hex(hash);
            // A reader and the scrub may find it at once: whoever moves it
            // out of the way reports it and counts it gone.
            if fs::rename(&path, dev.root.join("quarantine").join(&hex)).is_ok() {
                tracing::error!(device = format!("{:#x}", dev.id), block = %hex, "corrupt block quarantined");
                dev.used_bytes.fetch_sub(
                    (data.len() as u64).min(dev.used_bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                dev.blocks.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(StoreError::Corrupt {
                device: dev.id,
                hash: hex,
            });
        }
        Ok((dev.id, data))
    }

    /// The device holding `hash`, if any (by presence, not verified).
    pub fn has(&self, hash: &Hash) -> Option<u64> {
        self.devices
            .iter()
            .find(|d| d.block_path(hash).exists())
            .map(|d| d.id)
    }

    /// Whether `device_id` holds `hash` (by presence, not verified).
    pub fn has_on(&self, device_id: u64, hash: &Hash) -> Result<bool, StoreError> {
        Ok(self.device(device_id)?.block_path(hash).exists())
    }

    /// Every block on `device_id` (or on every device): hash, size, device.
    pub fn inventory(&self, device_id: Option<u64>) -> Result<Vec<(Hash, u64, u64)>, StoreError> {
        let devs: Vec<&Device> = match device_id {
            Some(id) => vec![self.device(id)?],
            None => self.devices.iter().collect(),
        };
        let mut out = Vec::new();
        for d in devs {
            d.walk(|h, size| out.push((h, size, d.id)))?;
        }
        Ok(out)
    }

    /// Deletes block `hash` from `device_id`, unless it was stored less than
    /// `min_age` ago (a zero age deletes whatever its time).
    pub fn delete(
        &self,
        device_id: u64,
        hash: &Hash,
        min_age: Duration,
    ) -> Result<Removal, StoreError> {
        let dev = self.device(device_id)?;
        let path = dev.block_path(hash);
        let _held = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Absent),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if !min_age.is_zero() {
            // A time in the future (the clock stepped back) counts as new.
            let age = meta
                .modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            if age < min_age {
                return Ok(Removal::TooRecent);
            }
        }
        fs::remove_file(&path).map_err(io_err(&path))?;
        let size = meta.len();
        dev.used_bytes.fetch_sub(
            size.min(dev.used_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        dev.blocks.fetch_sub(1, Ordering::Relaxed);
        Ok(Removal::Removed { bytes: size })
    }

    /// Up to `limit` blocks on `device_id` in hash order, starting after
    /// `after`: a walk (scrub, garbage collection) that resumes where it
    /// stopped and holds only one batch in memory.
    pub fn list(
        &self,
        device_id: u64,
        after: Option<&Hash>,
        limit: usize,
    ) -> Result<Vec<StoredBlock>, StoreError> {
        let dev = self.device(device_id)?;
        let after = after.map(|h| hash_hex(h));
        let (a1, a2) = after.as_deref().map_or(("", ""), |a| (&a[0..2], &a[2..4]));
        let top = dev.root.join("blocks");
        let mut out = Vec::new();
        for l1 in sorted_names(&top)?.into_iter().filter(|n| n.as_str() >= a1) {
            let d1 = top.join(&l1);
            for l2 in sorted_names(&d1)?
                .into_iter()
                .filter(|n| l1.as_str() > a1 || n.as_str() >= a2)
            {
                let d2 = d1.join(&l2);
                for name in sorted_names(&d2)? {
                    if after.as_deref().is_some_and(|a| name.as_str() <= a) {
                        continue;
                    }
                    let Some(hash) = parse_hex_hash(&name) else {
                        continue;
                    };
                    // Gone since the directory was read: deleted meanwhile.
                    let Ok(meta) = fs::metadata(d2.join(&name)) else {
                        continue;
                    };
                    let stored_at = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push(StoredBlock {
                        hash,
                        size: meta.len(),
                        stored_at,
                    });
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Where block `hash` lives on `device_id` (tests corrupt it there).
    pub fn block_path(&self, device_id: u64, hash: &Hash) -> Result<PathBuf, StoreError> {
        Ok(self.device(device_id)?.block_path(hash))
    }
}

/// Whether the block file `f` holds `data` (already checked against its
/// hash), judged by its size and three sampled 4 KiB ranges (start,
/// middle, end): cheap enough for every put again, and a rotten copy
/// rarely hides from all three; the scrubber reads every byte.
fn same_as(f: &File, data: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    const SAMPLE: usize = 4096;
    if f.metadata().map_or(true, |m| m.len() != data.len() as u64) {
        return false;
    }
    let len = data.len();
    let starts = [
        0,
        (len / 2).saturating_sub(SAMPLE / 2),
        len.saturating_sub(SAMPLE),
    ];
    let mut buf = vec![0u8; SAMPLE.min(len)];
    starts.iter().all(|&at| {
        let want = &data[at..(at + buf.len()).min(len)];
        let got = &mut buf[..want.len()];
        f.read_exact_at(got, at as u64).is_ok() && got == want
    })
}

/// Creates `dir` and any missing parents up to `root`, each made durable in
/// its parent (a crash must not lose the fan-out directory of a block whose
/// put was acknowledged).
fn create_dirs_durably(root: &Path, dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() && at != root {
        missing.push(at);
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(d)(e)),
        }
        let parent = d.parent().unwrap_or(root);
        File::open(parent)
            .and_then(|p| p.sync_all())
            .map_err(io_err(parent))?;
    }
    Ok(())
}

/// (capacity, free) bytes of the filesystem holding `path`.
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, n: usize) -> BlockStore {
        let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("dev{i}"))).collect();
        BlockStore::open(&paths).unwrap()
    }

    #[test]
    fn a_rotten_copy_put_again_is_rewritten_and_a_device_keeps_the_trackers_room() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1);
        let d = s.device_ids()[0];
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let h = block_hash(&data);
        s.put(d, &h, &data).unwrap();
        let path = s.device(d).unwrap().block_path(&h);
        let mut rotten = data.clone();
        rotten[10_000] ^= 0xff;
        fs::write(&path, &rotten).unwrap();
        s.put(d, &h, &data).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data, "rewritten");
        assert_eq!(s.usage()[0].blocks, 1);
        assert_eq!(s.usage()[0].used_bytes, data.len() as u64);
        // A device on the tracker's filesystem keeps its reserve free (one
        // larger than any disk: the test does not race other writers).
        s.keep_free_for(dir.path(), u64::MAX / 4);
        let other = vec![1u8; 100];
        assert!(matches!(
            s.put(d, &block_hash(&other), &other),
            Err(StoreError::Full(_))
        ));
        assert_eq!(s.usage()[0].free_bytes, 0);
    }

    #[test]
    fn put_get_has_inventory_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 2);
        let [d0, d1] = s.device_ids()[..] else {
            panic!()
        };
        let data = b"hello block".to_vec();
        let h = block_hash(&data);
        s.put(d1, &h, &data).unwrap();
        s.put(d1, &h, &data).unwrap(); // idempotent
        assert_eq!(s.has(&h), Some(d1));
        assert!(s.has_on(d1, &h).unwrap() && !s.has_on(d0, &h).unwrap());
        assert_eq!(s.get(&h, None).unwrap(), (d1, data.clone()));
        assert!(matches!(s.get(&h, Some(d0)), Err(StoreError::NotFound(_))));
        assert_eq!(s.inventory(None).unwrap(), vec![(h, data.len() as u64, d1)]);
        assert_eq!(s.usage().iter().map(|u| u.blocks).sum::<u64>(), 1);
        assert_eq!(
            s.delete(d1, &h, Duration::ZERO).unwrap(),
            Removal::Removed {
                bytes: data.len() as u64
            }
        );
        assert_eq!(s.delete(d1, &h, Duration::ZERO).unwrap(), Removal::Absent);
        assert_eq!(s.has(&h), None);
    }

    #[test]
    fn a_recently_stored_block_survives_a_delete_with_a_minimum_age() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1);
        let d = s.device_ids()[0];
        let data = b"young block".to_vec();
        let h = block_hash(&data);
        s.put(d, &h, &data).unwrap();
        let path = s.block_path(d, &h).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // A put of a block already there makes it young again.
        s.put(d, &h, &data).unwrap();
        assert_eq!(
            s.delete(d, &h, Duration::from_secs(60)).unwrap(),
            Removal::TooRecent
        );
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(s.list(d, None, 10).unwrap()[0].stored_at, old);
        assert!(matches!(
            s.delete(d, &h, Duration::from_secs(60)).unwrap(),
            Removal::Removed { .. }
        ));
        assert_eq!(
            s.get(&h, Some(d)).unwrap_err().to_string(),
            StoreError::NotFound(hash_hex(&h)).to_string()
        );
    }

    #[test]
    fn listing_walks_a_device_in_hash_order_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1);
        let d = s.device_ids()[0];
        let mut hashes: Vec<Hash> = (0u32..40)
            .map(|i| {
                let data = i.to_le_bytes().repeat(10);
                let h = block_hash(&data);
                s.put(d, &h, &data).unwrap();
                h
            })
            .collect();
        hashes.sort();
        let mut seen = Vec::new();
        let mut after: Option<Hash> = None;
        loop {
            let batch = s.list(d, after.as_ref(), 7).unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 7);
            after = batch.last().map(|b| b.hash);
            seen.extend(batch.into_iter().map(|b| b.hash));
        }
        assert_eq!(seen, hashes);
        assert!(s.list(d, Some(&[0xff; 32]), 10).unwrap().is_empty());
    }

    #[test]
    fn device_ids_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = store(dir.path(), 2).device_ids();
        assert_eq!(store(dir.path(), 2).device_ids(), ids);
    }

    #[test]
    fn refuses_bytes_that_do_not_match_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1);
        let d = s.device_ids()[0];
        let err = s.put(d, &block_hash(b"one"), b"two").unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }));
        assert_eq!(s.inventory(None).unwrap(), vec![]);
    }

    #[test]
    fn corrupt_block_is_detected_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1);
        let d = s.device_ids()[0];
        let data = vec![7u8; 1000];
        let h = block_hash(&data);
        s.put(d, &h, &data).unwrap();
        let path = s.block_path(d, &h).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[500] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(s.get(&h, None), Err(StoreError::Corrupt { device, .. }) if device == d));
        assert_eq!(s.has(&h), None);
        assert!(dir
            .path()
            .join("dev0/quarantine")
            .join(hash_hex(&h))
            .exists());
    }
}
