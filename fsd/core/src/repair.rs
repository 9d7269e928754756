//! Repair planning: which blocks need another copy, where to fetch it, and
//! where to put it; which copies beyond the copy count to trim; and which
//! copies to add so that blocks drift toward where placement wants them
//! (rebalancing).
//!
//! The repair worker gathers a view (the blocks below or above their copy
//! count, the devices and how their hosts are doing) and carries out the
//! plan; the decisions are here, as plain functions of that view.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crate::placement::{place_more, rendezvous_score, Candidate};

/// How the tracker leader sees a device's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHealth {
    /// Answering: its copies can be read, and it can take new ones.
    Up,
    /// Not answering, but not for long: its copies still count (it is
    /// probably restarting), so nothing is rebuilt for it yet.
    Down,
    /// Not answering for longer than the dead-after period: its copies no
    /// longer count, and repair rebuilds them elsewhere.
    Dead,
    /// Up but leaving (drained): its copies can be read but do not count,
    /// so repair copies them elsewhere; it takes no new ones.
    Leaving,
}

/// A device as repair sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub candidate: Candidate,
    pub health: HostHealth,
    /// Enough free space to take another block.
    pub has_room: bool,
    /// Last reported size and free space: trimming takes copies off the
    /// fullest devices first.
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// A block and the devices its copies are recorded on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockView {
    pub hash: Vec<u8>,
    pub size: u64,
    pub holders: Vec<u64>,
}

/// Copy `hash` from one of `sources` (in order) to each of `targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairAction {
    pub hash: Vec<u8>,
    pub size: u64,
    pub sources: Vec<u64>,
    pub targets: Vec<u64>,
    /// Copies that counted when the plan was made.
    pub counted: usize,
}

/// Plans one round of repair: for every block with fewer than `copies`
/// counted copies (on hosts that are not dead), the live holders to read it
/// from and the devices (up, with room, not holding it) that placement picks
/// for the missing copies. Blocks with no live holder or no possible target
/// are left for a later round. Fewest copies first.
pub fn plan_repair(
    blocks: &[BlockView],
    devices: &[DeviceView],
    copies: usize,
) -> Vec<RepairAction> {
    let find = |id: u64| devices.iter().find(|d| d.candidate.device_id == id);
    let mut plan = Vec::new();
    for b in blocks {
        let held: Vec<&DeviceView> = b
            .holders
            .iter()
            .filter_map(|&id| find(id))
            .filter(|d| d.health != HostHealth::Dead)
            .collect();
        let counted: Vec<&DeviceView> = held
            .iter()
            .copied()
            .filter(|d| d.health != HostHealth::Leaving)
            .collect();
        if counted.len() >= copies {
            continue;
        }
        let sources: Vec<u64> = held
            .iter()
            .filter(|d| matches!(d.health, HostHealth::Up | HostHealth::Leaving))
            .map(|d| d.candidate.device_id)
            .collect();
        if sources.is_empty() {
            continue;
        }
        let candidates: Vec<Candidate> = devices
            .iter()
            .filter(|d| {
                d.health == HostHealth::Up
                    && d.has_room
                    && !b.holders.contains(&d.candidate.device_id)
            })
            .map(|d| d.candidate.clone())
            .collect();
        let existing: Vec<Candidate> = counted.iter().map(|d| d.candidate.clone()).collect();
        let targets = place_more(&b.hash, &candidates, &existing, copies - counted.len());
        if targets.is_empty() {
            continue;
        }
        plan.push(RepairAction {
            hash: b.hash.clone(),
            size: b.size,
            sources,
            targets,
            counted: counted.len(),
        });
    }
    // Stable: among equals, the order the blocks came in.
    plan.sort_by_key(|a| a.counted);
    plan
}

/// How roughly the tracker knows a device's free space, as a share of its
/// capacity: a host reports its devices' space when it moved by more than
/// this (or once a minute), so two devices whose used fractions differ by
/// less are equally full as far as anyone can tell. Judging on the
/// difference would let reports taken at different moments decide — say,
/// a new box that reported after other writes to a shared filesystem would
/// look fuller than the boxes it should take copies from.
pub const USAGE_SLACK: f64 = 0.01;

/// The fraction of a device in use (1 when its capacity is unknown).
fn used_fraction(d: &DeviceView) -> f64 {
    if d.capacity_bytes == 0 {
        return 1.0;
    }
    d.capacity_bytes.saturating_sub(d.free_bytes) as f64 / d.capacity_bytes as f64
}

/// Plans rebalancing (a new box, or one that was empty): for blocks at their
/// copy count, all on up hosts, but not where placement would put them now,
/// one more copy on the device placement prefers that lacks it — only if
/// that device is no fuller than the holder placement ranks last. Trimming
/// then drops the extra copy (the fullest, or the one placement ranks last),
/// so copies drift toward placement and toward emptier devices, and stop
/// there.
pub fn plan_rebalance(
    blocks: &[BlockView],
    devices: &[DeviceView],
    copies: usize,
) -> Vec<RepairAction> {
    let find = |id: u64| devices.iter().find(|d| d.candidate.device_id == id);
    let mut plan = Vec::new();
    for b in blocks {
        let holders: Vec<&DeviceView> = b.holders.iter().filter_map(|&id| find(id)).collect();
        if holders.len() != copies || holders.iter().any(|d| d.health != HostHealth::Up) {
            continue;
        }
        let eligible: Vec<Candidate> = devices
            .iter()
            .filter(|d| {
                d.health == HostHealth::Up
                    && (d.has_room || b.holders.contains(&d.candidate.device_id))
            })
            .map(|d| d.candidate.clone())
            .collect();
        let ideal = crate::place(&b.hash, &eligible, copies);
        let Some(target) = ideal.iter().copied().find(|id| !b.holders.contains(id)) else {
            continue;
        };
        // The holder placement ranks last: the one the extra copy replaces.
        let ranked = crate::place(&b.hash, &eligible, eligible.len());
        let Some(last) = ranked
            .iter()
            .rev()
            .find_map(|id| holders.iter().find(|h| h.candidate.device_id == *id))
        else {
            continue;
        };
        let Some(t) = find(target) else { continue };
        if fuller(t, last) == Ordering::Greater {
            continue;
        }
        plan.push(RepairAction {
            hash: b.hash.clone(),
            size: b.size,
            sources: holders.iter().map(|d| d.candidate.device_id).collect(),
            targets: vec![target],
            counted: copies,
        });
    }
    plan
}

/// Drop the copies of `hash` on `drop`: they are beyond the copy count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimAction {
    pub hash: Vec<u8>,
    pub drop: Vec<u64>,
}

/// Whether device `a` is fuller (a larger fraction used) than `b`, by more
/// than the reports can tell apart (`USAGE_SLACK`). A device whose capacity
/// is unknown counts as full.
fn fuller(a: &DeviceView, b: &DeviceView) -> Ordering {
    let (ua, ub) = (used_fraction(a), used_fraction(b));
    if (ua - ub).abs() <= USAGE_SLACK {
        Ordering::Equal
    } else if ua > ub {
        Ordering::Greater
    } else {
        Ordering::Less
    }
}

/// Plans trimming: for every block with more than `copies` copies on up
/// hosts (a dead host came back, or repair raced a late write), which of
/// those to drop so that `copies` remain. Only copies on up hosts are
/// considered, counted and dropped: a copy on a host that is not answering
/// can be neither deleted nor relied on. One at a time, it drops the copy
/// whose loss leaves the most zones, then the most hosts; among equals the
/// one on the fullest device, then the one placement would pick last.
pub fn plan_trim(blocks: &[BlockView], devices: &[DeviceView], copies: usize) -> Vec<TrimAction> {
    let find = |id: u64| devices.iter().find(|d| d.candidate.device_id == id);
    let mut plan = Vec::new();
    for b in blocks {
        let mut keep: Vec<&DeviceView> = b
            .holders
            .iter()
            .filter_map(|&id| find(id))
            .filter(|d| d.health == HostHealth::Up)
            .collect();
        if copies == 0 || keep.len() <= copies {
            continue;
        }
        let spread = |rest: &[&DeviceView], skip: usize| -> (usize, usize) {
            let others = rest
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, d)| &d.candidate);
            let zones: BTreeSet<&str> = others.clone().map(|c| c.zone.as_str()).collect();
            let hosts: BTreeSet<u64> = others.map(|c| c.host_id).collect();
            (zones.len(), hosts.len())
        };
        let mut drop = Vec::new();
        while keep.len() > copies {
            let better_to_drop = |i: usize, j: usize| -> Ordering {
                spread(&keep, i)
                    .cmp(&spread(&keep, j))
                    .then_with(|| fuller(keep[i], keep[j]))
                    .then_with(|| {
                        rendezvous_score(&b.hash, keep[i].candidate.device_id)
                            .cmp(&rendezvous_score(&b.hash, keep[j].candidate.device_id))
                    })
            };
            let Some(victim) = (0..keep.len()).max_by(|&i, &j| better_to_drop(i, j)) else {
                break;
            };
            drop.push(keep.remove(victim).candidate.device_id);
        }
        plan.push(TrimAction {
            hash: b.hash.clone(),
            drop,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: u64, zone: &str, health: HostHealth) -> DeviceView {
        DeviceView {
            candidate: Candidate {
                device_id: id,
                host_id: id * 10,
                zone: zone.into(),
            },
            health,
            has_room: true,
            capacity_bytes: 1000,
            free_bytes: 500,
        }
    }

    fn block(hash: &[u8], holders: &[u64]) -> BlockView {
        BlockView {
            hash: hash.to_vec(),
            size: 7,
            holders: holders.to_vec(),
        }
    }

    #[test]
    fn a_block_short_of_a_copy_is_copied_from_a_live_holder_to_a_free_device() {
        let devices = vec![
            dev(1, "a", HostHealth::Up),
            dev(2, "b", HostHealth::Up),
            dev(3, "c", HostHealth::Up),
        ];
        let plan = plan_repair(&[block(b"x", &[1, 2])], &devices, 3);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].sources, vec![1, 2]);
        assert_eq!(plan[0].targets, vec![3]);
        assert!(plan_repair(&[block(b"x", &[1, 2, 3])], &devices, 3).is_empty());
    }

    #[test]
    fn copies_on_a_down_host_still_count_but_a_dead_hosts_do_not() {
        let mut devices = vec![
            dev(1, "a", HostHealth::Up),
            dev(2, "b", HostHealth::Up),
            dev(3, "c", HostHealth::Down),
            dev(4, "d", HostHealth::Up),
        ];
        let blocks = [block(b"x", &[1, 2, 3])];
        assert!(
            plan_repair(&blocks, &devices, 3).is_empty(),
            "no storm while a host restarts"
        );
        devices[2].health = HostHealth::Dead;
        let plan = plan_repair(&blocks, &devices, 3);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].targets, vec![4]);
        assert_eq!(plan[0].sources, vec![1, 2], "a dead host is no source");
    }

    #[test]
    fn a_leaving_hosts_copies_are_read_but_not_counted_and_it_takes_none() {
        let devices = vec![
            dev(1, "a", HostHealth::Leaving),
            dev(2, "b", HostHealth::Up),
            dev(3, "c", HostHealth::Up),
            dev(4, "d", HostHealth::Up),
            dev(5, "e", HostHealth::Leaving),
        ];
        let plan = plan_repair(&[block(b"x", &[1, 5, 2])], &devices, 3);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].counted, 1);
        assert_eq!(
            plan[0].sources,
            vec![1, 5, 2],
            "leaving hosts are still sources"
        );
        let mut targets = plan[0].targets.clone();
        targets.sort();
        assert_eq!(targets, vec![3, 4], "and never targets");
    }

    #[test]
    fn a_new_device_gets_the_copies_placement_gives_it_and_no_more() {
        let mut devices = vec![
            dev(1, "a", HostHealth::Up),
            dev(2, "b", HostHealth::Up),
            dev(3, "c", HostHealth::Up),
        ];
        let blocks: Vec<BlockView> = (0..200u32)
            .map(|i| block(&i.to_le_bytes(), &[1, 2, 3]))
            .collect();
        assert!(
            plan_rebalance(&blocks, &devices, 3).is_empty(),
            "balanced as it is"
        );
        devices.push(dev(4, "d", HostHealth::Up));
        let plan = plan_rebalance(&blocks, &devices, 3);
        assert!(plan
            .iter()
            .all(|a| a.targets == vec![4] && a.sources.len() == 3));
        // Rendezvous: about three quarters of the blocks rank the new device in their top three.
        assert!((100..190).contains(&plan.len()), "{}", plan.len());
        // Not onto a fuller device.
        devices[3].free_bytes = 0;
        assert!(plan_rebalance(&blocks, &devices, 3).is_empty());
    }

    #[test]
    fn devices_within_the_reports_slack_count_as_equally_full() {
        // Four devices on one filesystem, the new one reported last, after
        // a little more was written: 0.5% fuller by its report.
        let mut devices: Vec<DeviceView> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, z)| dev(i as u64 + 1, z, HostHealth::Up))
            .collect();
        devices[3].free_bytes = 495;
        let blocks: Vec<BlockView> = (0..200u32)
            .map(|i| block(&i.to_le_bytes(), &[1, 2, 3]))
            .collect();
        let plan = plan_rebalance(&blocks, &devices, 3);
        assert!((100..190).contains(&plan.len()), "{}", plan.len());
        // Trimming the copy beyond the count then drops the holder
        // placement ranks last, not the new copy.
        for a in &plan {
            let held = block(&a.hash, &[1, 2, 3, 4]);
            let trim = plan_trim(&[held], &devices, 3);
            assert_eq!(trim.len(), 1);
            assert_ne!(trim[0].drop, vec![4], "the new copy stays");
            // And there it stays: nothing more to move for that block.
            let kept: Vec<u64> = [1, 2, 3, 4]
                .into_iter()
                .filter(|d| !trim[0].drop.contains(d))
                .collect();
            assert!(plan_rebalance(&[block(&a.hash, &kept)], &devices, 3).is_empty());
        }
        // Fuller beyond the slack: not onto it.
        devices[3].free_bytes = 480;
        assert!(plan_rebalance(&blocks, &devices, 3).is_empty());
    }

    #[test]
    fn nothing_is_planned_without_a_live_source_or_a_target() {
        let devices = vec![
            dev(1, "a", HostHealth::Down),
            dev(2, "b", HostHealth::Up),
            dev(3, "c", HostHealth::Down),
        ];
        // Only holder is down: unavailable for now, not repairable.
        assert!(plan_repair(&[block(b"x", &[1])], &devices, 3).is_empty());
        // The only up device already holds it.
        assert!(plan_repair(&[block(b"y", &[2])], &devices, 3).is_empty());
        // A full device is no target.
        let mut full = vec![dev(1, "a", HostHealth::Up), dev(2, "b", HostHealth::Up)];
        full[1].has_room = false;
        assert!(plan_repair(&[block(b"z", &[1])], &full, 3).is_empty());
    }

    #[test]
    fn fewest_copies_first_and_all_missing_copies_at_once() {
        let devices: Vec<DeviceView> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, z)| dev(i as u64 + 1, z, HostHealth::Up))
            .collect();
        let plan = plan_repair(&[block(b"two", &[1, 2]), block(b"one", &[1])], &devices, 3);
        assert_eq!(
            plan.iter().map(|a| a.hash.as_slice()).collect::<Vec<_>>(),
            vec![&b"one"[..], b"two"]
        );
        assert_eq!(plan[0].targets.len(), 2);
        assert_eq!(plan[1].targets.len(), 1);
        assert!(plan.iter().all(|a| a.targets.iter().all(|t| *t != 1)));
    }

    #[test]
    fn a_copy_recorded_on_an_unknown_device_does_not_count() {
        let devices = vec![dev(1, "a", HostHealth::Up), dev(2, "b", HostHealth::Up)];
        let plan = plan_repair(&[block(b"x", &[1, 99])], &devices, 2);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].targets, vec![2]);
    }

    #[test]
    fn trimming_keeps_the_copy_count_on_up_hosts_in_the_most_zones() {
        // Zone a holds two copies, b and c one each: one of zone a's goes.
        let devices = vec![
            dev(1, "a", HostHealth::Up),
            dev(2, "a", HostHealth::Up),
            dev(3, "b", HostHealth::Up),
            dev(4, "c", HostHealth::Up),
        ];
        let plan = plan_trim(&[block(b"x", &[1, 2, 3, 4])], &devices, 3);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].drop.len(), 1);
        assert!(plan[0].drop[0] == 1 || plan[0].drop[0] == 2, "{plan:?}");
        // At the copy count, or below it, nothing is trimmed.
        assert!(plan_trim(&[block(b"y", &[1, 3, 4]), block(b"z", &[1])], &devices, 3).is_empty());
    }

    #[test]
    fn trimming_prefers_the_fullest_device_among_equals() {
        let mut devices: Vec<DeviceView> = ["a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, z)| dev(i as u64 + 1, z, HostHealth::Up))
            .collect();
        devices[3].free_bytes = 100; // device 4: 90% used
        devices[1].free_bytes = 200; // device 2: 80% used
        let plan = plan_trim(&[block(b"x", &[1, 2, 3, 4, 5])], &devices, 3);
        assert_eq!(plan[0].drop, vec![4, 2]);
    }

    #[test]
    fn copies_on_hosts_not_up_are_neither_counted_nor_trimmed() {
        let devices = vec![
            dev(1, "a", HostHealth::Up),
            dev(2, "b", HostHealth::Up),
            dev(3, "c", HostHealth::Up),
            dev(4, "d", HostHealth::Down),
            dev(5, "e", HostHealth::Dead),
        ];
        // Three up copies: nothing to trim while 4 and 5 are away.
        assert!(plan_trim(&[block(b"x", &[1, 2, 3, 4, 5])], &devices, 3).is_empty());
        // Device 5's host is back: one up copy too many, and only an up one goes.
        let mut back = devices.clone();
        back[4].health = HostHealth::Up;
        let plan = plan_trim(&[block(b"x", &[1, 2, 3, 4, 5])], &back, 3);
        assert_eq!(plan[0].drop.len(), 1);
        assert_ne!(plan[0].drop[0], 4);
    }

    #[test]
    fn trimming_is_deterministic() {
        let devices: Vec<DeviceView> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, z)| dev(i as u64 + 1, z, HostHealth::Up))
            .collect();
        let mut rev = devices.clone();
        rev.reverse();
        for i in 0u32..50 {
            let b = block(&i.to_le_bytes(), &[1, 2, 3, 4]);
            let b_rev = block(&i.to_le_bytes(), &[4, 3, 2, 1]);
            assert_eq!(plan_trim(&[b], &devices, 3), plan_trim(&[b_rev], &rev, 3));
        }
    }
}
