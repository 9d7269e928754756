//! Hosts and their devices: registration, device reports, administrative
//! states (away, draining), what shipping a host would put at risk, and the
//! lineage that lets a returning host receive deltas.

use crate::db::CachedSql;
use std::collections::{BTreeMap, BTreeSet};

use failsafe_core::{is_full, AdminState};
use failsafe_proto::pb::{self, ErrorCode};
use rusqlite::{params, OptionalExtension, Transaction};

use super::schema::LIVE_DEVICE;
use super::{err, i, OpResult};

pub(super) fn register_host(
    tx: &Transaction<'_>,
    c: &pb::RegisterHost,
    leader_now: i64,
) -> OpResult<()> {
    if c.host_id == 0 || c.addr.is_empty() {
        return err(ErrorCode::Invalid, "a host needs an id and an address");
    }
    if !c.key_id.is_empty() {
        pin_key(tx, c.host_id, &c.key_id)?;
    }
    tx.exec(
        "INSERT INTO hosts VALUES (?1, ?2, ?3) ON CONFLICT(host_id) DO UPDATE SET zone = ?2, addr = ?3",
        params![i(c.host_id), c.zone, c.addr],
    )?;
    report_devices(tx, c.host_id, &c.devices, leader_now)
}

/// Pins `key` as host `host_id`'s, unless it was revoked or the host is
/// known by another key.
fn pin_key(tx: &Transaction<'_>, host_id: u64, key: &[u8]) -> OpResult<()> {
    if key.len() != 32 {
        return err(ErrorCode::Invalid, "a key id is 32 bytes");
    }
    let revoked: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM revoked WHERE key_id = ?1)",
        [key],
        |r| r.get(0),
    )?;
    if revoked {
        return err(
            ErrorCode::Invalid,
            format!("host {host_id:016x}'s credential was revoked: issue it a new one"),
        );
    }
    match pinned_key(tx, host_id)? {
        Some(p) if p != key => err(
            ErrorCode::Invalid,
            format!(
                "host {host_id:016x} is known by another key; revoke that one first \
                 (fsctl host revoke {host_id:016x})"
            ),
        ),
        Some(_) => Ok(()),
        None => {
            tx.exec(
                "INSERT INTO host_keys VALUES (?1, ?2)",
                params![i(host_id), key],
            )?;
            Ok(())
        }
    }
}

/// The key host `host_id` registered with, if any.
fn pinned_key(tx: &Transaction<'_>, host_id: u64) -> rusqlite::Result<Option<Vec<u8>>> {
    tx.query_row(
        "SELECT key_id FROM host_keys WHERE host_id = ?1",
        [i(host_id)],
        |r| r.get(0),
    )
    .optional()
}

/// Revokes a credential's key (or the key pinned for a host), so every
/// member refuses it; a host's pin goes with it.
pub(super) fn revoke(tx: &Transaction<'_>, c: &pb::Revoke, leader_now: i64) -> OpResult<()> {
    let key = if c.key_id.is_empty() {
        match pinned_key(tx, c.host_id)? {
            Some(k) => k,
            None => {
                return err(
                    ErrorCode::NotFound,
                    format!("host {:016x} has no key on record", c.host_id),
                )
            }
        }
    } else if c.key_id.len() == 32 {
        c.key_id.clone()
    } else {
        return err(ErrorCode::Invalid, "a key id is 32 bytes");
    };
    tx.exec(
        "INSERT OR IGNORE INTO revoked VALUES (?1, ?2, ?3)",
        params![key, c.who, leader_now],
    )?;
    tx.exec("DELETE FROM host_keys WHERE key_id = ?1", [&key])?;
    Ok(())
}

/// Each host's pinned key, and the revoked keys.
pub(crate) type Keys = (Vec<(u64, Vec<u8>)>, Vec<Vec<u8>>);

/// The pinned host keys and the revoked keys: what every member checks
/// callers against.
pub(crate) fn key_book(conn: &rusqlite::Connection) -> rusqlite::Result<Keys> {
    let pinned = conn
        .prepare("SELECT host_id, key_id FROM host_keys")?
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let revoked = conn
        .prepare("SELECT key_id FROM revoked")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok((pinned, revoked))
}

/// Active hosts have no row; away and draining ones have one, with since
/// when (the leader's clock) and until when.
pub(super) fn set_host_state(
    tx: &Transaction<'_>,
    c: &pb::SetHostState,
    leader_now: i64,
) -> OpResult<()> {
    if c.state() == pb::HostAdminState::Active {
        tx.exec("DELETE FROM host_states WHERE host_id = ?1", [i(c.host_id)])?;
    } else {
        tx.exec(
            "INSERT OR REPLACE INTO host_states VALUES (?1, ?2, ?3, ?4)",
            params![i(c.host_id), c.state, c.until_ns, leader_now],
        )?;
    }
    Ok(())
}

/// Forgets a host, its devices and the copies recorded on them.
pub(super) fn remove_host(tx: &Transaction<'_>, c: &pb::RemoveHost) -> OpResult<()> {
    tx.exec("DELETE FROM host_states WHERE host_id = ?1", [i(c.host_id)])?;
    let devices: Vec<i64> = tx
        .prepare("SELECT device_id FROM devices WHERE host_id = ?1")?
        .query_map([i(c.host_id)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for d in devices {
        tx.exec("DELETE FROM copies WHERE device_id = ?1", [d])?;
        tx.exec("DELETE FROM gone_devices WHERE device_id = ?1", [d])?;
    }
    tx.exec("DELETE FROM devices WHERE host_id = ?1", [i(c.host_id)])?;
    tx.exec("DELETE FROM host_keys WHERE host_id = ?1", [i(c.host_id)])?;
    tx.exec("DELETE FROM hosts WHERE host_id = ?1", [i(c.host_id)])?;
    Ok(())
}

/// A host's report of its devices, which is the whole list: a device the
/// tracker knows on this host that is not in it is *gone* (its directory
/// was wiped or the disk replaced; a fresh directory gets a new device id).
/// Its copies are dropped at once, so repair rebuilds them without waiting
/// for anything: the data is not coming back. A gone device that is
/// reported again is a device again, without copies.
pub(super) fn report_devices(
    tx: &Transaction<'_>,
    host_id: u64,
    devices: &[pb::DeviceInfo],
    leader_now: i64,
) -> OpResult<()> {
    let known: Vec<i64> = tx
        .prepare_cached(
            "SELECT device_id FROM devices WHERE host_id = ?1
             AND device_id NOT IN (SELECT device_id FROM gone_devices) ORDER BY device_id",
        )?
        .query_map([i(host_id)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in known {
        if devices.iter().any(|d| i(d.device_id) == id) {
            continue;
        }
        let dropped = tx.exec("DELETE FROM copies WHERE device_id = ?1", [id])?;
        tx.exec(
            "INSERT OR REPLACE INTO gone_devices VALUES (?1, ?2)",
            params![id, leader_now],
        )?;
        tracing::warn!(
            host = format!("{host_id:016x}"),
            device = format!("{:016x}", id as u64),
            copies = dropped,
            "device no longer reported by its host: marked gone, its copies dropped for repair to rebuild"
        );
    }
    for d in devices {
        tx.exec(
            "DELETE FROM gone_devices WHERE device_id = ?1",
            [i(d.device_id)],
        )?;
        tx.exec(
            "INSERT INTO devices (device_id, host_id, path, capacity, free, used, blocks) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(device_id) DO UPDATE SET host_id = ?2, path = ?3, capacity = ?4, free = ?5, used = ?6, blocks = ?7",
            params![
                i(d.device_id),
                i(host_id),
                d.path,
                i(d.capacity_bytes),
                i(d.free_bytes),
                i(d.used_bytes),
                i(d.blocks)
            ],
        )?;
    }
    Ok(())
}

/// A host an administrator put in a state other than active, since when
/// (the leader's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldState {
    pub(crate) admin: AdminState,
    pub(crate) since: i64,
}

/// Hosts in an administrative state other than active.
pub(crate) type HostStates = BTreeMap<u64, HeldState>;

/// What an administrator has said about `host_id`.
pub(crate) fn admin_state(states: &HostStates, host_id: u64) -> AdminState {
    states.get(&host_id).map_or(AdminState::Active, |s| s.admin)
}

pub(crate) fn host_states(conn: &rusqlite::Connection) -> rusqlite::Result<HostStates> {
    conn.prepare_cached("SELECT host_id, state, until, since FROM host_states")?
        .query_map([], |r| {
            let until_ns = r.get(2)?;
            let admin = match pb::HostAdminState::try_from(r.get::<_, i32>(1)?) {
                Ok(pb::HostAdminState::Away) => AdminState::Away { until_ns },
                Ok(pb::HostAdminState::Draining) => AdminState::Draining,
                _ => AdminState::Active,
            };
            let since = r.get(3)?;
            Ok((r.get::<_, i64>(0)? as u64, HeldState { admin, since }))
        })?
        .collect()
}

/// Devices of hosts that are away or draining.
pub(super) fn held_back_devices(conn: &rusqlite::Connection) -> rusqlite::Result<BTreeSet<u64>> {
    conn.prepare_cached(
        "SELECT d.device_id FROM devices d JOIN host_states s ON s.host_id = d.host_id",
    )?
    .query_map([], |r| r.get::<_, i64>(0).map(|d| d as u64))?
    .collect()
}

/// Devices of hosts that are away (shipped).
pub(super) fn away_devices(conn: &rusqlite::Connection) -> rusqlite::Result<BTreeSet<u64>> {
    conn.prepare_cached(
        "SELECT d.device_id FROM devices d JOIN host_states s ON s.host_id = d.host_id WHERE s.state = ?1",
    )?
    .query_map([pb::HostAdminState::Away as i32], |r| r.get::<_, i64>(0).map(|d| d as u64))?
    .collect()
}

/// What shipping (or removing) `host_id` would put at risk: the blocks it
/// holds, how many are at risk, and (`with_names`) the names of files with a
/// block that has fewer than `needed` copies on
/// devices in `live` (other hosts that are up and not away), or — when
/// `other_zones` — none outside the host's own zone.
pub(crate) fn ship_risk(
    conn: &rusqlite::Connection,
    host_id: u64,
    live: &[u64],
    needed: usize,
    other_zones: bool,
    with_names: bool,
) -> rusqlite::Result<(u64, u64, Vec<String>)> {
    let zone: String = conn
        .row(
            "SELECT zone FROM hosts WHERE host_id = ?1",
            [i(host_id)],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or_default();
    let live: BTreeSet<u64> = live.iter().copied().collect();
    let held: Vec<Vec<u8>> = conn
        .prepare(&format!(
            "SELECT DISTINCT c.hash FROM copies c JOIN devices d ON d.device_id = c.device_id
             WHERE d.host_id = ?1 AND {}",
            super::schema::referenced("c.hash")
        ))?
        .query_map([i(host_id)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut risky = Vec::new();
    for h in &held {
        let elsewhere: Vec<(u64, String)> = conn
            .prepare_cached(
                "SELECT c.device_id, h.zone FROM copies c JOIN devices d ON d.device_id = c.device_id
                 JOIN hosts h ON h.host_id = d.host_id WHERE c.hash = ?1 AND d.host_id != ?2",
            )?
            .query_map(params![h, i(host_id)], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|(d, _)| live.contains(d))
            .collect();
        if elsewhere.len() < needed || (other_zones && elsewhere.iter().all(|(_, z)| *z == zone)) {
            risky.push(h.clone());
        }
    }
    let mut names = BTreeSet::new();
    for h in risky.iter().take(if with_names { 1000 } else { 0 }) {
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT d.name FROM extents e JOIN dentries d ON d.ino = e.ino WHERE e.hash = ?1 LIMIT 5",
        )?;
        for n in stmt.query_map([h], |r| r.get::<_, Vec<u8>>(0))? {
            names.insert(String::from_utf8_lossy(&n?).to_string());
        }
        if names.len() >= 50 {
            break;
        }
    }
    Ok((
        held.len() as u64,
        risky.len() as u64,
        names.into_iter().collect(),
    ))
}

/// An older version of block `hash` that `device_id` holds (by the records),
/// following the lineage back up to 64 versions (a page saved many times
/// while a host was away): the base for a delta.
pub(crate) fn delta_base(
    conn: &rusqlite::Connection,
    hash: &[u8],
    device_id: u64,
) -> rusqlite::Result<Option<Vec<u8>>> {
    let mut at = hash.to_vec();
    for _ in 0..64 {
        let prev: Option<Vec<u8>> = conn
            .row("SELECT prev FROM lineage WHERE hash = ?1", [&at], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(prev) = prev else { return Ok(None) };
        let held: bool = conn.row(
            "SELECT EXISTS (SELECT 1 FROM copies WHERE hash = ?1 AND device_id = ?2)",
            params![prev, i(device_id)],
            |r| r.get(0),
        )?;
        if held {
            return Ok(Some(prev));
        }
        at = prev;
    }
    Ok(None)
}

/// Every device that is not gone, with its host's zone and address.
pub(super) fn device_locations(conn: &rusqlite::Connection) -> OpResult<Vec<pb::DeviceLocation>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT d.device_id, d.host_id, h.zone, h.addr FROM devices d JOIN hosts h ON h.host_id = d.host_id
             WHERE d.{LIVE_DEVICE} ORDER BY d.device_id"
        ))?
        .query_map([], |r| {
            Ok(pb::DeviceLocation {
                device_id: r.get::<_, i64>(0)? as u64,
                host_id: r.get::<_, i64>(1)? as u64,
                zone: r.get(2)?,
                addr: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

pub(crate) fn hosts(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(u64, String, String)>> {
    conn.prepare_cached("SELECT host_id, zone, addr FROM hosts ORDER BY zone, host_id")?
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })?
        .collect()
}

/// Every device with its state: gone (no longer reported by its host), full
/// (less free space than its reserve) or ok.
pub(crate) fn devices(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<pb::DeviceStatus>> {
    conn.prepare_cached(
        "SELECT device_id, host_id, path, capacity, used, blocks, free,
                device_id IN (SELECT device_id FROM gone_devices)
         FROM devices ORDER BY host_id, device_id",
    )?
    .query_map([], |r| {
        let (capacity_bytes, free_bytes) = (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(6)? as u64);
        let state = if r.get::<_, bool>(7)? {
            pb::DeviceState::Gone
        } else if is_full(capacity_bytes, free_bytes) {
            pb::DeviceState::Full
        } else {
            pb::DeviceState::Ok
        };
        Ok(pb::DeviceStatus {
            device_id: r.get::<_, i64>(0)? as u64,
            host_id: r.get::<_, i64>(1)? as u64,
            path: r.get(2)?,
            capacity_bytes,
            used_bytes: r.get::<_, i64>(4)? as u64,
            blocks: r.get::<_, i64>(5)? as u64,
            free_bytes,
            state: state as i32,
        })
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use failsafe_core::ReplicationClass;
    use failsafe_proto::pb::{self, command::Op, query_reply::Reply, query_request::Query};

    use super::devices;
    use crate::state::blocks::block_copies;
    use crate::state::health::{device_space, replication_counts};
    use crate::state::query::query;
    use crate::state::testing::*;

    #[test]
    fn a_host_keeps_the_key_it_first_registered_with_until_it_is_revoked() {
        let mut conn = db();
        let register = |key: u8| {
            Op::RegisterHost(pb::RegisterHost {
                host_id: 7,
                zone: "a".into(),
                addr: "h:1".into(),
                devices: vec![],
                key_id: vec![key; 32],
            })
        };
        let refused = |r: pb::CommandResult, want: &str| match r.result {
            Some(pb::command_result::Result::Error(e)) => {
                assert!(e.message.contains(want), "{}", e.message)
            }
            other => panic!("not refused: {other:?}"),
        };
        ok(run(&mut conn, register(1)));
        ok(run(&mut conn, register(1)));
        refused(run(&mut conn, register(2)), "known by another key");
        let (pinned, revoked) = super::key_book(&conn).expect("keys");
        assert_eq!(pinned, vec![(7, vec![1; 32])]);
        assert!(revoked.is_empty());
        // Revoking the host's key drops the pin; the old key stays refused,
        // a new one is pinned.
        let revoke = Op::Revoke(pb::Revoke {
            key_id: vec![],
            host_id: 7,
            who: "member 7".into(),
        });
        ok(run(&mut conn, revoke));
        refused(run(&mut conn, register(1)), "revoked");
        ok(run(&mut conn, register(2)));
        let (pinned, revoked) = super::key_book(&conn).expect("keys");
        assert_eq!(pinned, vec![(7, vec![2; 32])]);
        assert_eq!(revoked, vec![vec![1; 32]]);
        // A client's key, by itself.
        ok(run(
            &mut conn,
            Op::Revoke(pb::Revoke {
                key_id: vec![9; 32],
                host_id: 0,
                who: "client web1".into(),
            }),
        ));
        assert_eq!(super::key_book(&conn).expect("keys").1.len(), 2);
    }

    #[test]
    fn a_device_its_host_no_longer_reports_is_gone_and_its_copies_are_dropped() {
        let mut conn = db();
        let host = Op::RegisterHost(pb::RegisterHost {
            host_id: 7,
            key_id: Vec::new(),
            zone: "a".into(),
            addr: "h:1".into(),
            devices: vec![device(1, ROOMY), device(2, ROOMY)],
        });
        ok(run(&mut conn, host));
        file_with_block(&mut conn, b"f", &[1u8; 32], &[1, 2]);
        // The disk behind device 1 was replaced: a fresh directory, device 3.
        let report = |devices| {
            Op::ReportDevices(pb::ReportDevices {
                host_id: 7,
                devices,
            })
        };
        ok(run_at(
            &mut conn,
            report(vec![device(2, ROOMY), device(3, ROOMY)]),
            50,
        ));
        assert_eq!(
            block_copies(&conn, &[1u8; 32]).expect("copies").device_ids,
            vec![2]
        );
        let states: Vec<(u64, pb::DeviceState)> = devices(&conn)
            .expect("devices")
            .into_iter()
            .map(|d| (d.device_id, d.state()))
            .collect();
        use pb::DeviceState::{Gone, Ok as Fine};
        assert_eq!(states, vec![(1, Gone), (2, Fine), (3, Fine)]);
        // Short of copies at once: no waiting for the host to be declared dead.
        assert_eq!(
            replication_counts(&conn, &[1, 2, 3], 2)
                .expect("counts")
                .under_replicated,
            1
        );
        // Neither placement nor repair sees it.
        let place = Query::Place(pb::Place {
            hashes: vec![vec![9; 32]],
            copies: 0,
        });
        let Reply::Placement(p) = query(&conn, &place, ReplicationClass::default()).expect("place")
        else {
            panic!()
        };
        assert!(p.choices[0].device_ids.iter().all(|&d| d != 1), "{p:?}");
        assert!(device_space(&conn)
            .expect("space")
            .iter()
            .all(|d| d.location.device_id != 1));
        // Reported again (it was only left out of the configuration): a device again.
        ok(run(
            &mut conn,
            report(vec![device(1, ROOMY), device(2, ROOMY), device(3, ROOMY)]),
        ));
        assert!(devices(&conn)
            .expect("devices")
            .iter()
            .all(|d| d.state() == pb::DeviceState::Ok));
    }
}
