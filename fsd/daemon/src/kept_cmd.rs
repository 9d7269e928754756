//! fsctl's `trash` and `snapshot` commands: what they ask the cluster and
//! how they show it. A PATH is the cluster's ("/wiki/data/pages"), or a
//! path on a failsafe mount of this machine ("/srv/wiki/data/pages"),
//! which is turned into the cluster's.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Subcommand;
use failsafe_client::{pb, Client};
use pb::{command::Op, command_result, query_reply::Reply, query_request::Query};

use crate::status_text::{bytes, duration};

#[derive(Subcommand)]
pub enum TrashCmd {
    /// What the trash holds at PATH or beneath it (everything without
    /// PATH): each deleted or replaced file with its id, when it was
    /// deleted, how long it is kept and its size; then the policy.
    List {
        path: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put back what the trash holds at PATH or beneath it (an `rm -rf`'d
    /// directory, a page replaced by a save): of each path the newest
    /// version, with the directories it needs. A file restored over an
    /// existing one replaces it, and that one goes to the trash.
    Restore {
        path: String,
        /// Put it here instead (PATH's place taken by DEST).
        #[arg(long)]
        to: Option<String>,
        /// Only this item (an older version: ids as `trash list` shows).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Forget what the trash holds at PATH or beneath it, or item --id, or
    /// everything with --all. Its blocks go at the next garbage collection.
    Purge {
        path: Option<String>,
        #[arg(long)]
        id: Option<u64>,
        /// Empty the whole trash.
        #[arg(long)]
        all: bool,
    },
    /// Show the policy, or change it: how long deleted files are kept
    /// (`0` keeps nothing), at most how many bytes (`0` no limit; the
    /// oldest go first), and paths never kept (patterns where `*` matches
    /// anything, '/' included; the default keeps a wiki's locks, cache and
    /// tmp out: `*/locks/*`, `*/cache/*`, `*/tmp/*`).
    Policy {
        /// e.g. 24h, 7d, 90m, 0.
        #[arg(long)]
        retention: Option<String>,
        /// e.g. 10G, 500M, 0.
        #[arg(long)]
        max_bytes: Option<String>,
        /// A pattern of paths never kept (repeat it; replaces the list).
        #[arg(long)]
        exclude: Vec<String>,
        /// Keep everything: no pattern at all.
        #[arg(long, conflicts_with = "exclude")]
        no_exclude: bool,
    },
    /// How long what is deleted beneath directory PATH is kept, whatever
    /// the cluster's retention (`0`: nothing of it; `inherit`: as the
    /// cluster's again).
    Retention { path: String, retention: String },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// A point-in-time copy of everything beneath PATH (default: the whole
    /// cluster), taken at once; read it on any mount under
    /// `.snapshots/NAME/`, restore a file with `cp`.
    Create {
        /// 1 to 64 of A-Z a-z 0-9 . _ -.
        name: String,
        path: Option<String>,
    },
    /// The snapshots: name, when taken, of which path, files and bytes.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot: the blocks only it kept go at the next garbage
    /// collection.
    Delete { name: String },
}

/// `s` as a number and the unit after it ("24h": 24, "h").
fn number_and_unit<'a>(s: &'a str, what: &str) -> anyhow::Result<(u64, &'a str)> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n = n.parse().with_context(|| format!("{s:?} is not {what}"))?;
    Ok((n, unit))
}

/// "24h", "7d", "90m", "30s", "1500ms", "0" as milliseconds.
pub fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (n, unit) = number_and_unit(s, "a duration (e.g. 24h, 7d, 90m, 0)")?;
    let ms = match unit {
        "" if n == 0 => 0,
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("{s:?}: a duration is a number with ms, s, m, h or d (e.g. 24h)"),
    };
    n.checked_mul(ms)
        .with_context(|| format!("{s:?} is too long"))
}

/// "10G", "500M", "64K", "1000" (bytes) as bytes; powers of 1024.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (n, unit) = number_and_unit(s, "a size (e.g. 10G, 500M, 0)")?;
    let unit = match unit.trim_end_matches(['B', 'b', 'i']) {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => bail!("{s:?}: a size is a number with K, M, G or T (e.g. 10G)"),
    };
    n.checked_mul(unit)
        .with_context(|| format!("{s:?} is too large"))
}

/// The failsafe mounts of this machine: (mount point, the cluster path
/// mounted there), from /proc/self/mountinfo.
fn failsafe_mounts() -> Vec<(String, String)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            if r.next()? != "fuse.failsafe" {
                return None;
            }
            let source = r.next()?;
            let subdir = source.rsplit_once(':').map_or("/", |(_, s)| s);
            Some((unescape(point), subdir.to_string()))
        })
        .collect()
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut k = 0;
    while k < b.len() {
        let code = (b[k] == b'\\')
            .then(|| b.get(k + 1..k + 4))
            .flatten()
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                k += 4;
            }
            None => {
                out.push(b[k]);
                k += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `arg` as a path of the cluster: a path beneath a failsafe mount point
/// of this machine becomes the mounted subtree's, anything else is taken
/// as the cluster's own.
pub fn cluster_path(arg: &str) -> String {
    let mounts = failsafe_mounts();
    let best = mounts
        .iter()
        .filter(|(point, _)| {
            arg == point
                || arg
                    .strip_prefix(point.as_str())
                    .is_some_and(|rest| rest.starts_with('/') || point == "/")
        })
        .max_by_key(|(point, _)| point.len());
    match best {
        Some((point, subdir)) => {
            let rest = arg[point.len()..].trim_start_matches('/');
            format!("{}/{rest}", subdir.trim_end_matches('/'))
        }
        None => arg.to_string(),
    }
}

/// Milliseconds from `from_ns` to `to_ns` (wall clock), 0 if negative.
fn ms_between(from_ns: i64, to_ns: i64) -> u64 {
    (to_ns.saturating_sub(from_ns) / 1_000_000).max(0) as u64
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as i64
}

fn ns_ago(ns: i64) -> String {
    format!("{} ago", duration(ms_between(ns, now_ns())))
}

fn ns_from_now(ns: i64) -> String {
    duration(ms_between(now_ns(), ns))
}

fn outcome(r: command_result::Result) -> anyhow::Result<pb::AdminOutcome> {
    match r {
        command_result::Result::Outcome(o) => Ok(o),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn kind_name(kind: i32) -> &'static str {
    match pb::FileKind::try_from(kind) {
        Ok(pb::FileKind::KindDir) => "directory",
        Ok(pb::FileKind::KindSymlink) => "symlink",
        Ok(pb::FileKind::KindFile) => "file",
        _ => "special",
    }
}

fn kind_mark(kind: i32) -> &'static str {
    match pb::FileKind::try_from(kind) {
        Ok(pb::FileKind::KindDir) => "/",
        Ok(pb::FileKind::KindSymlink) => "@",
        _ => "",
    }
}

async fn trash_page(client: &Client, l: pb::ListTrash) -> anyhow::Result<pb::TrashPage> {
    match client.query(Query::ListTrash(l)).await? {
        Reply::TrashPage(p) => Ok(p),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn policy_lines(p: &pb::TrashPage) -> String {
    let policy = p.policy.clone().unwrap_or_default();
    let mut out = format!(
        "trash: {} item(s), {} of files; kept {}{}\n",
        p.total_items,
        bytes(p.total_bytes),
        match policy.retention_ms() {
            0 => "for no time (the trash is off)".to_string(),
            ms => format!("for {}", duration(ms)),
        },
        match policy.max_bytes() {
            0 => String::new(),
            b => format!(", at most {}", bytes(b)),
        }
    );
    if policy.exclude.is_empty() {
        out.push_str("never kept: nothing excluded\n");
    } else {
        out.push_str(&format!("never kept: {}\n", policy.exclude.join("  ")));
    }
    for d in &p.retention {
        out.push_str(&format!(
            "beneath {}: kept {}\n",
            show(&d.path),
            match d.retention_ms {
                0 => "for no time".to_string(),
                ms => format!("for {}", duration(ms)),
            }
        ));
    }
    out
}

pub async fn trash(client: &Client, cmd: &TrashCmd) -> anyhow::Result<()> {
    match cmd {
        TrashCmd::List { path, json } => {
            let path = path.as_deref().map(cluster_path).unwrap_or_default();
            let mut items = Vec::new();
            let mut last = (Vec::new(), 0);
            let page = loop {
                let page = trash_page(
                    client,
                    pb::ListTrash {
                        path: path.clone().into_bytes(),
                        after_path: last.0.clone(),
                        after_id: last.1,
                        limit: 1000,
                    },
                )
                .await?;
                if let Some(i) = page.items.last() {
                    last = (i.path.clone(), i.id);
                }
                let more = page.more;
                items.extend(page.items.iter().cloned());
                if !more {
                    break page;
                }
            };
            if *json {
                let policy = page.policy.clone().unwrap_or_default();
                let v = serde_json::json!({
                    "items": items.iter().map(|i| serde_json::json!({
                        "id": i.id,
                        "path": show(&i.path),
                        "kind": kind_name(i.kind),
                        "size": i.size,
                        "deleted_ns": i.deleted_ns,
                        "expires_ns": i.expires_ns,
                    })).collect::<Vec<_>>(),
                    "total_items": page.total_items,
                    "total_bytes": page.total_bytes,
                    "retention_ms": policy.retention_ms(),
                    "max_bytes": policy.max_bytes(),
                    "exclude": policy.exclude,
                    "directories": page.retention.iter().map(|d| serde_json::json!({
                        "path": show(&d.path),
                        "retention_ms": d.retention_ms,
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if !items.is_empty() {
                println!(
                    "{:>12}  {:>10}  {:>10}  {:>10}  PATH",
                    "ID", "DELETED", "KEPT FOR", "SIZE"
                );
            }
            for i in &items {
                println!(
                    "{:>12}  {:>10}  {:>10}  {:>10}  {}{}",
                    i.id,
                    ns_ago(i.deleted_ns),
                    ns_from_now(i.expires_ns),
                    bytes(i.size),
                    show(&i.path),
                    kind_mark(i.kind)
                );
            }
            print!("{}", policy_lines(&page));
        }
        TrashCmd::Restore { path, to, id } => {
            let path = cluster_path(path);
            let to = to.as_deref().map(cluster_path).unwrap_or_default();
            let (mut count, mut after) = (0, Vec::new());
            loop {
                let o = outcome(
                    client
                        .mutate(Op::RestoreTrash(pb::RestoreTrash {
                            path: path.clone().into_bytes(),
                            to: to.clone().into_bytes(),
                            id: id.unwrap_or(0),
                            after: after.clone(),
                            limit: 1024,
                        }))
                        .await?,
                )?;
                count += o.count;
                for s in &o.skipped {
                    eprintln!("fsctl: left alone: {s}");
                }
                if !o.more {
                    break;
                }
                after = o.last;
            }
            if count == 0 {
                bail!("the trash holds nothing at {path}");
            }
            println!(
                "restored {count} item(s) from the trash to {}",
                if to.is_empty() { &path } else { &to }
            );
        }
        TrashCmd::Purge { path, id, all } => {
            if path.is_none() && id.is_none() && !all {
                bail!("purge what? a PATH, --id ID, or --all for the whole trash");
            }
            let path = path.as_deref().map(cluster_path).unwrap_or_default();
            let mut count = 0;
            loop {
                let o = outcome(
                    client
                        .mutate(Op::PurgeTrash(pb::PurgeTrash {
                            path: path.clone().into_bytes(),
                            id: id.unwrap_or(0),
                        }))
                        .await?,
                )?;
                count += o.count;
                if !o.more {
                    break;
                }
            }
            println!("purged {count} item(s) from the trash");
        }
        TrashCmd::Policy {
            retention,
            max_bytes,
            exclude,
            no_exclude,
        } => {
            let set_exclude = *no_exclude || !exclude.is_empty();
            if retention.is_some() || max_bytes.is_some() || set_exclude {
                client
                    .mutate(Op::SetTrashPolicy(pb::SetTrashPolicy {
                        policy: Some(pb::TrashPolicy {
                            retention_ms: retention
                                .as_deref()
                                .map(parse_duration_ms)
                                .transpose()?,
                            max_bytes: max_bytes.as_deref().map(parse_bytes).transpose()?,
                            exclude: exclude.clone(),
                            set_exclude,
                        }),
                        path: Vec::new(),
                    }))
                    .await?;
            }
            let page = trash_page(
                client,
                pb::ListTrash {
                    limit: 1,
                    ..Default::default()
                },
            )
            .await?;
            print!("{}", policy_lines(&page));
        }
        TrashCmd::Retention { path, retention } => {
            let path = cluster_path(path);
            let ms = match retention.as_str() {
                "inherit" => None,
                r => Some(parse_duration_ms(r)?),
            };
            client
                .mutate(Op::SetTrashPolicy(pb::SetTrashPolicy {
                    policy: Some(pb::TrashPolicy {
                        retention_ms: ms,
                        ..Default::default()
                    }),
                    path: path.clone().into_bytes(),
                }))
                .await?;
            match ms {
                None => println!("beneath {path}: kept as the cluster's policy says"),
                Some(0) => println!("beneath {path}: deleted files are not kept"),
                Some(ms) => println!(
                    "beneath {path}: deleted files are kept for {}",
                    duration(ms)
                ),
            }
        }
    }
    Ok(())
}

pub async fn snapshot(client: &Client, cmd: &SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { name, path } => {
            let path = path
                .as_deref()
                .map(cluster_path)
                .unwrap_or_else(|| "/".into());
            let o = outcome(
                client
                    .mutate(Op::CreateSnapshot(pb::CreateSnapshot {
                        name: name.clone(),
                        path: path.clone().into_bytes(),
                    }))
                    .await?,
            )?;
            println!(
                "snapshot {name} of {path}: {} inode(s); read it at .snapshots/{name}/ on a mount",
                o.count
            );
        }
        SnapshotCmd::List { json } => {
            let list = match client
                .query(Query::ListSnapshots(pb::ListSnapshots {}))
                .await?
            {
                Reply::SnapshotList(l) => l,
                other => bail!("unexpected answer: {other:?}"),
            };
            if *json {
                let v: Vec<_> = list
                    .snapshots
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "id": s.id,
                            "name": s.name,
                            "path": show(&s.path),
                            "created_ns": s.created_ns,
                            "files": s.files,
                            "bytes": s.bytes,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if list.snapshots.is_empty() {
                println!("no snapshots");
                return Ok(());
            }
            println!(
                "{:<24}  {:>10}  {:>8}  {:>10}  PATH",
                "NAME", "TAKEN", "FILES", "SIZE"
            );
            for s in &list.snapshots {
                println!(
                    "{:<24}  {:>10}  {:>8}  {:>10}  {}",
                    s.name,
                    ns_ago(s.created_ns),
                    s.files,
                    bytes(s.bytes),
                    show(&s.path)
                );
            }
        }
        SnapshotCmd::Delete { name } => {
            client
                .mutate(Op::DeleteSnapshot(pb::DeleteSnapshot {
                    name: name.clone(),
                }))
                .await?;
            println!("deleted snapshot {name}; its blocks go at the next garbage collection");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, parse_duration_ms, unescape};

    #[test]
    fn durations_and_sizes_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration_ms("24h").expect("24h"), 86_400_000);
        assert_eq!(parse_duration_ms("7d").expect("7d"), 7 * 86_400_000);
        assert_eq!(parse_duration_ms("0").expect("0"), 0);
        assert_eq!(parse_duration_ms("1500ms").expect("ms"), 1500);
        assert!(parse_duration_ms("24").is_err());
        assert!(parse_duration_ms("h").is_err());
        assert_eq!(parse_bytes("10G").expect("10G"), 10 << 30);
        assert_eq!(parse_bytes("500MiB").expect("MiB"), 500 << 20);
        assert_eq!(parse_bytes("0").expect("0"), 0);
        assert!(parse_bytes("5X").is_err());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/srv/my\\040wiki"), "/srv/my wiki");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
