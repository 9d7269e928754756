//! The mount helper's arguments: `mount.failsafe SPEC DIR [-o OPTIONS]`, as
//! `mount -t failsafe` and `/etc/fstab` pass them.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MountSpec {
    /// Cluster members, `host:port`.
    pub hosts: Vec<String>,
    /// The directory of the cluster to mount, `/` for the root.
    pub subdir: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub zone: Option<String>,
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    pub rpc_timeout: Duration,
    pub allow_other: bool,
    pub read_only: bool,
    pub foreground: bool,
    /// `stats=PATH`: write a JSON summary of the RPCs and sequential round
    /// trips per FUSE operation to PATH every second and at unmount
    /// (replaced atomically; the format is documented in `stats.rs`).
    pub stats: Option<PathBuf>,
    /// `metrics=ADDR`: serve the same counters as Prometheus text over HTTP
    /// at ADDR (`host:port`, e.g. `127.0.0.1:9101`).
    pub metrics: Option<std::net::SocketAddr>,
    /// `inline=SIZE`: a commit of at most this much data travels inline,
    /// inside the metadata commit (at most 64K; `inline=0` sends every
    /// write as blocks).
    pub inline_bytes: u64,
    /// `leases` (the default): answer lookups, stats and opens from memory
    /// while the tracker leader leases them to this mount, with changes
    /// elsewhere pushed here before they complete. `noleases`: ask the
    /// cluster every time.
    pub leases: bool,
    /// `writebehind` (off by default; needs `leases`): a directory the
    /// tracker leader delegates to this mount is changed here alone
    /// (`mkdir`, `rmdir` of a directory made so, creating a file, `unlink`,
    /// `rename` within it), and the changes are flushed within 1 s, before
    /// anyone else reads or changes it, before any lock operation, and with
    /// a new file's bytes at its first close or fsync (which still return
    /// only once the bytes are on a majority). A mount frozen or cut off for
    /// longer than its lease loses what it had not flushed (see
    /// docs/write-behind.md).
    pub write_behind: bool,
    /// `cred=FILE`: the mount's credential (`fsctl client add`).
    pub cred: PathBuf,
    /// `insecure`: plaintext, for a cluster run with `--insecure`.
    pub insecure: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            zone: None,
            cache_dir: PathBuf::from("/var/cache/failsafe"),
            cache_bytes: 1 << 30,
            rpc_timeout: Duration::from_millis(1000),
            allow_other: false,
            read_only: false,
            foreground: false,
            stats: None,
            metrics: None,
            inline_bytes: failsafe_core::MAX_INLINE_BYTES as u64,
            leases: true,
            write_behind: false,
            cred: PathBuf::from("/etc/failsafe/client.cred"),
            insecure: false,
        }
    }
}

/// `fsd1:7000,fsd2:7000:/wiki` → hosts and subdirectory. The path part is
/// optional (`fsd1:7000,fsd2:7000` mounts the root).
pub(crate) fn parse_spec(spec: &str) -> Result<MountSpec, String> {
    let (hosts, subdir) = match spec.find(":/") {
        Some(i) => (&spec[..i], &spec[i + 1..]),
        None => (spec, "/"),
    };
    let hosts: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from)
        .collect();
    if hosts.is_empty() {
        return Err(format!(
            "{spec:?}: no cluster hosts (expected host:port[,host:port...][:/dir])"
        ));
    }
    for h in &hosts {
        let port = h.rsplit_once(':').map(|(_, p)| p);
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err(format!("{h:?} is not host:port"));
        }
    }
    if subdir.split('/').any(|c| c == "..") {
        return Err(format!(
            "{subdir:?}: '..' is not allowed in the mounted path"
        ));
    }
    Ok(MountSpec {
        hosts,
        subdir: subdir.to_string(),
    })
}

fn parse_bytes(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last() {
        Some((i, 'k' | 'K')) => (&v[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&v[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&v[..i], 1 << 30),
        Some((i, 't' | 'T')) => (&v[..i], 1 << 40),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .map_err(|_| format!("{v:?} is not a size (like 512M or 2G)"))
}

/// `-o` options, comma-separated. Generic mount options that mean nothing to
/// a FUSE filesystem are accepted and ignored, so fstab lines work as written.
pub(crate) fn parse_options(list: &str, opts: &mut Options) -> Result<(), String> {
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let need = |v: Option<&str>| {
            v.map(str::to_string)
                .ok_or_else(|| format!("option {key} needs a value"))
        };
        match key {
            "zone" => {
                let zone = need(value)?;
                failsafe_core::validate_zone(&zone).map_err(|e| format!("zone: {e}"))?;
                opts.zone = Some(zone);
            }
            "cache_dir" => opts.cache_dir = PathBuf::from(need(value)?),
            "cred" => opts.cred = PathBuf::from(need(value)?),
            "insecure" => opts.insecure = true,
            "cache_size" => opts.cache_bytes = parse_bytes(&need(value)?)?,
            "timeout" => {
                let ms: u64 = need(value)?
                    .parse()
                    .map_err(|_| "timeout is in milliseconds".to_string())?;
                opts.rpc_timeout = Duration::from_millis(ms.max(50));
            }
            "stats" => opts.stats = Some(PathBuf::from(need(value)?)),
            "inline" => {
                let n = parse_bytes(&need(value)?)?;
                if n > failsafe_core::MAX_INLINE_BYTES as u64 {
                    return Err(format!("inline={n}: at most 64K"));
                }
                opts.inline_bytes = n;
            }
            "metrics" => {
                let v = need(value)?;
                opts.metrics = Some(v.parse().map_err(|_| {
                    format!("metrics={v}: expected an address like 127.0.0.1:9101")
                })?);
            }
            "leases" => opts.leases = true,
            "noleases" => opts.leases = false,
            "writebehind" => opts.write_behind = true,
            "nowritebehind" => opts.write_behind = false,
            "allow_other" => opts.allow_other = true,
            "ro" => opts.read_only = true,
            "rw" => opts.read_only = false,
            "foreground" => opts.foreground = true,
            "defaults"
            | "auto"
            | "noauto"
            | "_netdev"
            | "nofail"
            | "user"
            | "users"
            | "nouser"
            | "exec"
            | "noexec"
            | "suid"
            | "nosuid"
            | "dev"
            | "nodev"
            | "async"
            | "sync"
            | "atime"
            | "noatime"
            | "relatime"
            | "default_permissions" => {}
            k if k.starts_with("x-") || k == "comment" => {}
            _ => return Err(format!("unknown mount option {item:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse_spec("fsd1:7000,fsd2:7000,fsd3:7000:/wiki/data").unwrap();
        assert_eq!(s.hosts, vec!["fsd1:7000", "fsd2:7000", "fsd3:7000"]);
        assert_eq!(s.subdir, "/wiki/data");
        assert_eq!(parse_spec("127.0.0.1:7101:/").unwrap().subdir, "/");
        assert_eq!(parse_spec("127.0.0.1:7101").unwrap().subdir, "/");
        assert!(parse_spec(":/x").is_err());
        assert!(parse_spec("fsd1:/x").is_err());
        assert!(parse_spec("fsd1:7000:/../etc").is_err());
    }

    #[test]
    fn options() {
        let mut o = Options::default();
        parse_options("defaults,_netdev,zone=berlin,cache_size=512M,timeout=800,allow_other,ro,x-systemd.automount", &mut o)
            .unwrap();
        assert_eq!(o.zone.as_deref(), Some("berlin"));
        assert_eq!(o.cache_bytes, 512 << 20);
        assert_eq!(o.rpc_timeout, Duration::from_millis(800));
        assert!(o.allow_other && o.read_only);
        assert_eq!(o.stats, None);
        parse_options(
            "stats=/run/failsafe/stats.json,metrics=127.0.0.1:9101",
            &mut o,
        )
        .unwrap();
        assert_eq!(o.stats, Some(PathBuf::from("/run/failsafe/stats.json")));
        assert_eq!(o.metrics, Some("127.0.0.1:9101".parse().unwrap()));
        assert!(parse_options("metrics=localhost", &mut o).is_err());
        assert_eq!(o.inline_bytes, 64 << 10);
        parse_options("inline=0", &mut o).unwrap();
        assert_eq!(o.inline_bytes, 0);
        assert!(parse_options("inline=65K", &mut o).is_err());
        assert!(parse_options("stats", &mut o).is_err());
        assert!(parse_options("bogus", &mut o).is_err());
        assert!(parse_options("zone", &mut o).is_err());
        assert!(parse_options("zone=", &mut o).is_err());
    }
}
