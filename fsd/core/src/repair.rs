//! Repair planning: which blocks need another copy, where to fetch it, and
//! where to put it.
//!
//! The repair worker gathers a view (the blocks below their copy count, the
//! devices and how their hosts are doing) and carries out the plan; the
//! decisions are here, as a plain function of that view.

use crate::placement::{place_more, Candidate};

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
}

/// A device as repair sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    pub candidate: Candidate,
    pub health: HostHealth,
    /// Enough free space to take another block.
    pub has_room: bool,
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
pub fn plan_repair(blocks: &[BlockView], devices: &[DeviceView], copies: usize) -> Vec<RepairAction> {
    let find = |id: u64| devices.iter().find(|d| d.candidate.device_id == id);
    let mut plan = Vec::new();
    for b in blocks {
        let counted: Vec<&DeviceView> =
            b.holders.iter().filter_map(|&id| find(id)).filter(|d| d.health != HostHealth::Dead).collect();
        if counted.len() >= copies {
            continue;
        }
        let sources: Vec<u64> = counted.iter().filter(|d| d.health == HostHealth::Up).map(|d| d.candidate.device_id).collect();
        if sources.is_empty() {
            continue;
        }
        let candidates: Vec<Candidate> = devices
            .iter()
            .filter(|d| d.health == HostHealth::Up && d.has_room && !b.holders.contains(&d.candidate.device_id))
            .map(|d| d.candidate.clone())
            .collect();
        let existing: Vec<Candidate> = counted.iter().map(|d| d.candidate.clone()).collect();
        let targets = place_more(&b.hash, &candidates, &existing, copies - counted.len());
        if targets.is_empty() {
            continue;
        }
        plan.push(RepairAction { hash: b.hash.clone(), size: b.size, sources, targets, counted: counted.len() });
    }
    // Stable: among equals, the order the blocks came in.
    plan.sort_by_key(|a| a.counted);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: u64, zone: &str, health: HostHealth) -> DeviceView {
        DeviceView { candidate: Candidate { device_id: id, host_id: id * 10, zone: zone.into() }, health, has_room: true }
    }

    fn block(hash: &[u8], holders: &[u64]) -> BlockView {
        BlockView { hash: hash.to_vec(), size: 7, holders: holders.to_vec() }
    }

    #[test]
    fn a_block_short_of_a_copy_is_copied_from_a_live_holder_to_a_free_device() {
        let devices = vec![dev(1, "a", HostHealth::Up), dev(2, "b", HostHealth::Up), dev(3, "c", HostHealth::Up)];
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
        assert!(plan_repair(&blocks, &devices, 3).is_empty(), "no storm while a host restarts");
        devices[2].health = HostHealth::Dead;
        let plan = plan_repair(&blocks, &devices, 3);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].targets, vec![4]);
        assert_eq!(plan[0].sources, vec![1, 2], "a dead host is no source");
    }

    #[test]
    fn nothing_is_planned_without_a_live_source_or_a_target() {
        let devices = vec![dev(1, "a", HostHealth::Down), dev(2, "b", HostHealth::Up), dev(3, "c", HostHealth::Down)];
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
        let devices: Vec<DeviceView> =
            ["a", "b", "c", "d"].iter().enumerate().map(|(i, z)| dev(i as u64 + 1, z, HostHealth::Up)).collect();
        let plan = plan_repair(&[block(b"two", &[1, 2]), block(b"one", &[1])], &devices, 3);
        assert_eq!(plan.iter().map(|a| a.hash.as_slice()).collect::<Vec<_>>(), vec![&b"one"[..], b"two"]);
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
}
