//! The `failsafe.hosts` extended attribute: the cluster's mode and which
//! hosts hold a file's bytes, as JSON, read-only and made on demand (as
//! CephFS's `ceph.*` attributes and GlusterFS's `pathinfo` are). A wiki
//! engine can show it under a page (wiki-cgi does); a sysadmin asks
//! `getfattr -n failsafe.hosts --only-values FILE`. listxattr does not name
//! it, so copies (`cp -a`, `rsync -X`) do not carry it.
//!
//! ```json
//! {"mode":"fail-safe","copies":3,"held_in":"metadata",
//!  "hosts":[{"host":"…","zone":"a","addr":"10.0.0.1:7000","state":"up","holds":true}, …]}
//! ```
//! `held_in`: "metadata" (small bytes, kept in the tracker's state on every
//! voting member), "blocks" (on the hosts holding its blocks' copies),
//! "metadata and blocks", or "nothing" (empty, or not a file).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failsafe_client::{pb, Client, ClientError};

pub(crate) const NAME: &[u8] = b"failsafe.hosts";

/// How long one answer of the cluster's status serves every attribute read:
/// a wiki shows it on each page view.
const FRESH: Duration = Duration::from_secs(2);

/// The cluster's status as last fetched.
#[derive(Default)]
pub(crate) struct ClusterView {
    cached: tokio::sync::Mutex<Option<(Instant, Arc<pb::StatusReply>)>>,
}

impl ClusterView {
    /// The cluster's status (the leader's view), at most `FRESH` old. One
    /// fetch at a time: readers meanwhile wait for it and share it.
    pub(crate) async fn status(
        &self,
        client: &Client,
    ) -> Result<Arc<pb::StatusReply>, ClientError> {
        let mut slot = self.cached.lock().await;
        if let Some((at, s)) = slot.as_ref() {
            if at.elapsed() < FRESH {
                return Ok(s.clone());
            }
        }
        let s = Arc::new(client.status().await?);
        *slot = Some((Instant::now(), s.clone()));
        Ok(s)
    }
}

/// The attribute's value for a file whose extents are `extents` (None: not
/// a regular file), under cluster status `status` (None: no member
/// answered).
pub(crate) fn render(
    status: Option<&pb::StatusReply>,
    extents: Option<&pb::FileExtents>,
) -> Vec<u8> {
    let Some(s) = status else {
        return serde_json::json!({"mode": "unreachable", "hosts": []})
            .to_string()
            .into_bytes();
    };
    let mut in_metadata = false;
    let mut block_hosts = BTreeSet::new();
    if let Some(fe) = extents {
        for e in &fe.extents {
            if !e.data.is_empty() {
                in_metadata = true;
                continue;
            }
            let copies = fe.copies.iter().filter(|c| c.hash == e.hash);
            for device in copies.flat_map(|c| &c.device_ids) {
                if let Some(d) = fe.devices.iter().find(|d| d.device_id == *device) {
                    block_hosts.insert(d.host_id);
                }
            }
        }
    }
    let held_in = match (in_metadata, !block_hosts.is_empty()) {
        (true, true) => "metadata and blocks",
        (true, false) => "metadata",
        (false, true) => "blocks",
        (false, false) => "nothing",
    };
    let hosts: Vec<serde_json::Value> = s
        .hosts
        .iter()
        .map(|h| {
            let holds = block_hosts.contains(&h.host_id) || (in_metadata && h.voter);
            serde_json::json!({
                "host": format!("{:016x}", h.host_id),
                "zone": h.zone,
                "addr": h.addr,
                "state": h.state().label(),
                "holds": holds,
            })
        })
        .collect();
    let mode = match s.mode() {
        pb::ClusterMode::FailSafe => "fail-safe",
        pb::ClusterMode::Limp => "limp",
        pb::ClusterMode::Unknown => "unknown",
    };
    serde_json::json!({
        "mode": mode,
        "copies": s.copies,
        "held_in": held_in,
        "hosts": hosts,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: u64, zone: &str, voter: bool, up: bool) -> pb::HostStatus {
        let mut h = pb::HostStatus {
            host_id: id,
            zone: zone.into(),
            addr: format!("10.0.0.{id}:7000"),
            voter,
            ..Default::default()
        };
        h.set_state(if up {
            pb::HostLiveness::Up
        } else {
            pb::HostLiveness::Down
        });
        h
    }

    #[test]
    fn inline_bytes_are_on_every_voter_and_blocks_on_their_copies_hosts() {
        let mut s = pb::StatusReply {
            copies: 3,
            hosts: vec![
                host(1, "a", true, true),
                host(2, "b", true, false),
                host(3, "c", false, true),
            ],
            ..Default::default()
        };
        s.set_mode(pb::ClusterMode::Limp);
        let inline = pb::FileExtents {
            extents: vec![failsafe_client::pb::Extent {
                length: 3,
                data: b"abc".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_slice(&render(Some(&s), Some(&inline))).unwrap();
        assert_eq!(v["mode"], "limp");
        assert_eq!(v["held_in"], "metadata");
        let holds: Vec<bool> = (0..3).map(|i| v["hosts"][i]["holds"] == true).collect();
        assert_eq!(holds, [true, true, false]);
        assert_eq!(v["hosts"][1]["state"], "down");

        let block = pb::FileExtents {
            extents: vec![pb::Extent {
                length: 3,
                hash: vec![7; 32],
                ..Default::default()
            }],
            copies: vec![pb::BlockCopies {
                hash: vec![7; 32],
                device_ids: vec![30],
                ..Default::default()
            }],
            devices: vec![pb::DeviceLocation {
                device_id: 30,
                host_id: 3,
                ..Default::default()
            }],
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&render(Some(&s), Some(&block))).unwrap();
        assert_eq!(v["held_in"], "blocks");
        let holds: Vec<bool> = (0..3).map(|i| v["hosts"][i]["holds"] == true).collect();
        assert_eq!(holds, [false, false, true]);

        let none: serde_json::Value = serde_json::from_slice(&render(None, None)).unwrap();
        assert_eq!(none["mode"], "unreachable");
    }
}
