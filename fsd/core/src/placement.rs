//! Where the copies of a block go.
//!
//! Rendezvous hashing over the devices, then a greedy pass that prefers a new
//! zone, then a new host, then any device: copies land in distinct zones while
//! there are zones, and the choice for a block moves little when devices come
//! and go.

/// How many copies a block gets and how many acknowledgements make a write
/// durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationClass {
    pub copies: usize,
    pub write_quorum: usize,
}

impl Default for ReplicationClass {
    fn default() -> Self {
        ReplicationClass {
            copies: 3,
            write_quorum: 2,
        }
    }
}

impl ReplicationClass {
    /// The quorum actually required when fewer devices than `copies` exist:
    /// never more than the devices chosen, never less than one.
    pub fn quorum_for(&self, chosen: usize) -> usize {
        self.write_quorum.min(chosen).max(1)
    }
}

/// A device that may receive a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub device_id: u64,
    pub host_id: u64,
    pub zone: String,
}

/// Free space a device keeps in reserve: 1% of its capacity, at most
/// 64 MiB, and never less than two of the largest blocks (a put must fit).
pub fn reserve_bytes(capacity_bytes: u64) -> u64 {
    (capacity_bytes / 100)
        .min(64 << 20)
        .max(2 * crate::MAX_BLOCK_BYTES as u64)
}

/// A device with less free space than its reserve is *full*: placement and
/// repair put no new copies there.
pub fn is_full(capacity_bytes: u64, free_bytes: u64) -> bool {
    free_bytes < reserve_bytes(capacity_bytes)
}

/// The rendezvous score of `device_id` for `hash`: placement prefers low
/// scores, so the device with the highest is the one it would pick last.
pub fn rendezvous_score(hash: &[u8], device_id: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(hash);
    h.update(&device_id.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Devices for the copies of `hash`, best first, at most `copies` of them.
pub fn place(hash: &[u8], candidates: &[Candidate], copies: usize) -> Vec<u64> {
    place_more(hash, candidates, &[], copies)
}

/// Up to `more` further devices for `hash` when the copies on `existing`
/// are already there: the same ranking as `place`, with the zones and hosts
/// of the existing copies counted as taken. Repair uses it, so a rebuilt
/// copy lands where a fresh write would have put it.
pub fn place_more(
    hash: &[u8],
    candidates: &[Candidate],
    existing: &[Candidate],
    more: usize,
) -> Vec<u64> {
    let mut ranked: Vec<(&Candidate, [u8; 32])> = candidates
        .iter()
        .map(|c| (c, rendezvous_score(hash, c.device_id)))
        .collect();
    ranked.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.device_id.cmp(&b.0.device_id)));

    let want = existing.len() + more.min(candidates.len());
    let mut chosen: Vec<&Candidate> = existing.iter().collect();
    // Pass 1: one device per zone; pass 2: one per host; pass 3: anything left.
    for pass in 0..3 {
        for (c, _) in &ranked {
            if chosen.len() >= want {
                break;
            }
            if chosen.iter().any(|d| d.device_id == c.device_id) {
                continue;
            }
            let fresh = match pass {
                0 => chosen.iter().all(|d| d.zone != c.zone),
                1 => chosen.iter().all(|d| d.host_id != c.host_id),
                _ => true,
            };
            if fresh {
                chosen.push(c);
            }
        }
    }
    chosen
        .into_iter()
        .skip(existing.len())
        .map(|c| c.device_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(device_id: u64, host_id: u64, zone: &str) -> Candidate {
        Candidate {
            device_id,
            host_id,
            zone: zone.to_string(),
        }
    }

    #[test]
    fn copies_go_to_distinct_zones_first() {
        // Zone a has three hosts with two devices each; b and c one each.
        let mut cands = vec![dev(20, 2, "b"), dev(30, 3, "c")];
        for h in 0..3 {
            cands.push(dev(100 + 2 * h, 10 + h, "a"));
            cands.push(dev(101 + 2 * h, 10 + h, "a"));
        }
        for i in 0u32..200 {
            let chosen = place(&i.to_le_bytes(), &cands, 3);
            let zones: std::collections::BTreeSet<_> = chosen
                .iter()
                .map(|d| &cands.iter().find(|c| c.device_id == *d).unwrap().zone)
                .collect();
            assert_eq!(zones.len(), 3, "block {i}: {chosen:?}");
        }
    }

    #[test]
    fn then_distinct_hosts_then_any_device() {
        let cands = vec![dev(1, 1, "a"), dev(2, 1, "a"), dev(3, 2, "a")];
        let chosen = place(b"x", &cands, 2);
        let hosts: std::collections::BTreeSet<_> = chosen
            .iter()
            .map(|d| cands.iter().find(|c| c.device_id == *d).unwrap().host_id)
            .collect();
        assert_eq!(hosts.len(), 2);
        assert_eq!(place(b"x", &cands, 5).len(), 3);
    }

    #[test]
    fn placement_is_deterministic() {
        let cands: Vec<_> = (0..9)
            .map(|i| dev(i, i, ["a", "b", "c"][i as usize % 3]))
            .collect();
        let mut rev = cands.clone();
        rev.reverse();
        assert_eq!(place(b"block", &cands, 3), place(b"block", &rev, 3));
    }

    #[test]
    fn more_copies_avoid_the_zones_already_holding_one() {
        let cands = vec![
            dev(1, 1, "a"),
            dev(2, 2, "a"),
            dev(3, 3, "b"),
            dev(4, 4, "c"),
        ];
        for i in 0u32..100 {
            let existing = vec![dev(3, 3, "b")];
            let more = place_more(&i.to_le_bytes(), &cands, &existing, 2);
            assert_eq!(more.len(), 2);
            assert!(
                more.contains(&4),
                "zone c is the only unused zone: {more:?}"
            );
            assert!(!more.contains(&3));
        }
        // With nothing existing it is `place`.
        assert_eq!(place_more(b"x", &cands, &[], 3), place(b"x", &cands, 3));
    }

    #[test]
    fn a_device_is_full_below_a_small_reserve() {
        let gib = 1u64 << 30;
        // 1% of a small disk, but never less than two blocks.
        assert_eq!(reserve_bytes(2 * gib), (2 * gib) / 100);
        assert_eq!(reserve_bytes(100 << 20), 8 << 20);
        // 64 MiB on a large disk.
        assert_eq!(reserve_bytes(1000 * gib), 64 << 20);
        assert!(is_full(1000 * gib, 63 << 20));
        assert!(!is_full(1000 * gib, 65 << 20));
        // Unknown capacity and no free space: full.
        assert!(is_full(0, 0));
    }

    #[test]
    fn quorum_shrinks_with_a_small_cluster() {
        let class = ReplicationClass::default();
        assert_eq!(class.quorum_for(3), 2);
        assert_eq!(class.quorum_for(1), 1);
        assert_eq!(class.quorum_for(0), 1);
    }
}
