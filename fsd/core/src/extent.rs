//! Extent arithmetic: what a file's extent list becomes when new bytes are
//! written over part of it.

/// Bytes `[offset, offset+length)` of a file are bytes
/// `[block_offset, block_offset+length)` of block `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub hash: Vec<u8>,
    pub block_offset: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The parts of `old` that remain visible outside `[start, end)`.
///
/// An extent that straddles a boundary is split, and the right-hand piece's
/// `block_offset` moves with it. Zero-length pieces are dropped.
pub fn overlay(old: &[Extent], start: u64, end: u64) -> Vec<Extent> {
    let mut kept = Vec::new();
    for e in old {
        if e.end() <= start || e.offset >= end {
            kept.push(e.clone());
            continue;
        }
        if e.offset < start {
            kept.push(Extent {
                length: start - e.offset,
                ..e.clone()
            });
        }
        if e.end() > end {
            let cut = end - e.offset;
            kept.push(Extent {
                offset: end,
                length: e.end() - end,
                hash: e.hash.clone(),
                block_offset: e.block_offset + cut,
            });
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, block_offset: u64) -> Extent {
        Extent {
            offset,
            length,
            hash: vec![1],
            block_offset,
        }
    }

    #[test]
    fn a_write_in_the_middle_splits_an_extent() {
        let kept = overlay(&[ext(0, 100, 0)], 40, 60);
        assert_eq!(kept, vec![ext(0, 40, 0), ext(60, 40, 60)]);
    }

    #[test]
    fn untouched_extents_stay_and_covered_ones_go() {
        let old = [ext(0, 10, 0), ext(10, 10, 0), ext(20, 10, 5)];
        assert_eq!(overlay(&old, 10, 20), vec![ext(0, 10, 0), ext(20, 10, 5)]);
        assert_eq!(overlay(&old, 0, 30), vec![]);
        assert_eq!(
            overlay(&old, 25, 100),
            vec![ext(0, 10, 0), ext(10, 10, 0), ext(20, 5, 5)]
        );
    }
}
