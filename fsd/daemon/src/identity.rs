//! What a host remembers about itself across restarts: its host id (created
//! once, so a host that comes back at another address is the same host) and
//! the cluster it belongs to.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub(crate) struct Identity {
    dir: PathBuf,
    pub host_id: u64,
}

fn write_durably(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Identity {
    /// The host id in `dir`, or `named` (the one this host's certificate
    /// names) on a first start. A data dir of another host than the
    /// certificate's is refused: a host is its key and its data together.
    pub(crate) fn load_or_create(dir: &Path, named: Option<u64>) -> anyhow::Result<Identity> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let path = dir.join("host.id");
        let host_id = match std::fs::read_to_string(&path) {
            Ok(s) => u64::from_str_radix(s.trim(), 16)
                .ok()
                .filter(|&id| id != 0)
                .with_context(|| format!("{} does not hold a host id", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Keep ids below 2^63 so they read the same in any tool.
                let id = named.unwrap_or_else(|| (rand::random::<u64>() >> 1).max(1));
                write_durably(&path, &format!("{id:016x}\n"))?;
                id
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if let Some(named) = named.filter(|&n| n != host_id) {
            anyhow::bail!(
                "{} is host {host_id:016x}, but the credential is host {named:016x}'s \
                 (`fsctl host cert --host-id {host_id:016x}` issues this host's)",
                dir.display()
            );
        }
        Ok(Identity {
            dir: dir.to_path_buf(),
            host_id,
        })
    }

    pub(crate) fn cluster_id(&self) -> anyhow::Result<String> {
        match std::fs::read_to_string(self.dir.join("cluster.id")) {
            Ok(s) => Ok(s.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e).context("reading cluster.id"),
        }
    }

    pub(crate) fn set_cluster_id(&self, id: &str) -> anyhow::Result<()> {
        write_durably(&self.dir.join("cluster.id"), &format!("{id}\n"))
    }
}
