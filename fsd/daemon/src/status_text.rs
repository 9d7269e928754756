//! The words for a cluster's status, shared by `fsctl status` and the
//! status page each fsd serves (`status_page`), so both say the same.

use failsafe_proto::pb;

/// `n` bytes in binary units: "512 B", "1.5 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A span of `ms` to the unit that reads best: "45s", "12m", "3h".
pub fn duration(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// What the trash and snapshots keep, in a line.
pub fn kept_line(s: &pb::StatusReply) -> String {
    format!(
        "trash {} item(s), {}   snapshots {}",
        s.trash_items,
        bytes(s.trash_bytes),
        s.snapshots
    )
}

/// The one line that says whether the cluster is fail-safe.
pub fn mode_line(s: &pb::StatusReply) -> String {
    let copies = s.copies;
    match s.mode() {
        pb::ClusterMode::FailSafe => format!("fail-safe: every block has {copies} copies"),
        pb::ClusterMode::Limp if s.leader_id == 0 => {
            "LIMP: no tracker leader (no majority of hosts reachable)".to_string()
        }
        pb::ClusterMode::Limp => {
            let down: Vec<&str> = s
                .hosts
                .iter()
                .filter(|h| h.voter && h.state() != pb::HostLiveness::Up)
                .map(|h| h.zone.as_str())
                .collect();
            let hosts = match down.len() {
                0 => String::new(),
                1 => format!("a host down (zone {}); ", down[0]),
                n => format!("{n} hosts down (zones {}); ", down.join(", ")),
            };
            format!(
                "LIMP: {hosts}{} blocks below {copies} copies, {} unavailable",
                s.under_replicated, s.unavailable
            )
        }
        pb::ClusterMode::Unknown => {
            "mode unknown: the member answering is not the leader".to_string()
        }
    }
}

/// A host's state as the leader sees it: "up", "DOWN 12s", "DEAD 3h",
/// "SHIPPED 2h", "returning", "draining".
pub fn host_state(h: &pb::HostStatus) -> String {
    let away = h.admin() == pb::HostAdminState::Away;
    match h.state() {
        pb::HostLiveness::Down if away => format!("SHIPPED {}", duration(h.down_ms)),
        _ if away => "returning".to_string(),
        pb::HostLiveness::Down if h.dead => format!("DEAD {}", duration(h.down_ms)),
        pb::HostLiveness::Down => format!("DOWN {}", duration(h.down_ms)),
        pb::HostLiveness::Up if h.admin() == pb::HostAdminState::Draining => {
            pb::HostAdminState::Draining.label().to_string()
        }
        other => other.label().to_string(),
    }
}

/// A device's state: "ok", or what is wrong with it in capitals.
pub fn device_state(d: &pb::DeviceStatus) -> String {
    match d.state() {
        pb::DeviceState::Unspecified => "?".to_string(),
        pb::DeviceState::Ok => "ok".to_string(),
        other => other.label().to_uppercase(),
    }
}

/// What each of the answering member's workers is doing and has done:
/// (worker, state, counts), in the order status shows them.
pub fn work(s: &pb::StatusReply) -> Vec<(&'static str, String, String)> {
    let mut rows = Vec::new();
    if let Some(r) = &s.repair {
        let did = format!(
            "copies made {} ({})   failed {}   trimmed {}",
            r.blocks,
            bytes(r.bytes),
            r.failures,
            r.trimmed
        );
        rows.push(("repair", r.state.clone(), did));
    }
    if let Some(r) = &s.scrub {
        let did = format!(
            "passes {}   checked {}   corrupt {}",
            r.passes,
            bytes(r.bytes),
            r.corrupt
        );
        rows.push(("scrub", r.state.clone(), did));
    }
    if let Some(g) = &s.gc {
        let did = format!(
            "blocks forgotten {}   files deleted {} ({})",
            g.forgotten,
            g.files_deleted,
            bytes(g.bytes_deleted)
        );
        rows.push(("gc", g.state.clone(), did));
    }
    if let Some(b) = &s.blockify {
        let did = format!(
            "inline extents made blocks {} ({})   written again {}",
            b.extents,
            bytes(b.bytes),
            b.changed
        );
        rows.push(("blockify", b.state.clone(), did));
    }
    rows
}
