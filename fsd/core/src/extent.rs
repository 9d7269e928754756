//! Extent arithmetic: what a file's extent list becomes when new bytes are
//! written over part of it.

/// Bytes `[offset, offset+length)` of a file are bytes
/// `[block_offset, block_offset+length)` of block `hash`, or, when
/// `inline` is set, the bytes of its data (then `hash` is empty and
/// `block_offset` 0, and the data is exactly `length` long).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub hash: Vec<u8>,
    pub block_offset: u64,
    pub inline: Option<Inline>,
}

/// The bytes of an inline extent, and when they were committed (the
/// leader's clock): the blockifier turns old ones into blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inline {
    pub data: Vec<u8>,
    pub written_ns: i64,
}

impl Extent {
    /// An inline extent of `data` at `offset`, committed at `written_ns`.
    pub fn inline(offset: u64, data: Vec<u8>, written_ns: i64) -> Extent {
        Extent {
            offset,
            length: data.len() as u64,
            hash: Vec::new(),
            block_offset: 0,
            inline: Some(Inline { data, written_ns }),
        }
    }

    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The parts of `old` that remain visible outside `[start, end)`.
///
/// An extent that straddles a boundary is split, and the right-hand piece's
/// `block_offset` moves with it; an inline extent's data is cut the same
/// way, so each piece holds exactly its own bytes. Zero-length pieces are
/// dropped.
pub fn overlay(old: &[Extent], start: u64, end: u64) -> Vec<Extent> {
    let mut kept = Vec::new();
    for e in old {
        if e.end() <= start || e.offset >= end {
            kept.push(e.clone());
            continue;
        }
        if e.offset < start {
            kept.push(e.piece(0, start - e.offset));
        }
        if e.end() > end {
            kept.push(e.piece(end - e.offset, e.end() - end));
        }
    }
    kept
}

impl Extent {
    /// `length` bytes of this extent from `skip` bytes into it.
    fn piece(&self, skip: u64, length: u64) -> Extent {
        let inline = self.inline.as_ref().map(|i| Inline {
            data: slice(&i.data, skip, length).to_vec(),
            written_ns: i.written_ns,
        });
        Extent {
            offset: self.offset + skip,
            length,
            hash: self.hash.clone(),
            block_offset: if inline.is_some() {
                0
            } else {
                self.block_offset + skip
            },
            inline,
        }
    }
}

/// `data[skip..skip+length]`, clamped to what `data` holds (an inline
/// extent's data is as long as the extent, so nothing is clamped).
fn slice(data: &[u8], skip: u64, length: u64) -> &[u8] {
    let from = usize::try_from(skip).unwrap_or(usize::MAX).min(data.len());
    let to = usize::try_from(skip.saturating_add(length))
        .unwrap_or(usize::MAX)
        .min(data.len());
    &data[from..to]
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
            inline: None,
        }
    }

    fn inline(offset: u64, data: &[u8]) -> Extent {
        Extent::inline(offset, data.to_vec(), 7)
    }

    #[test]
    fn an_inline_extent_is_cut_with_its_bytes() {
        let kept = overlay(&[inline(10, b"0123456789")], 13, 16);
        assert_eq!(kept, vec![inline(10, b"012"), inline(16, b"6789")]);
        assert_eq!(overlay(&[inline(10, b"0123456789")], 0, 20), vec![]);
        // A block extent beside it keeps its own rule.
        let kept = overlay(&[ext(0, 10, 0), inline(10, b"abcdef")], 5, 12);
        assert_eq!(kept, vec![ext(0, 5, 0), inline(12, b"cdef")]);
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
