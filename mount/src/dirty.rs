//! Bytes written to a file but not yet stored: positioned writes, kept as
//! non-overlapping segments, and O_APPEND data, whose position the tracker
//! decides when it is committed.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub(crate) struct Dirty {
    segments: BTreeMap<u64, Vec<u8>>,
    appends: Vec<u8>,
    bytes: usize,
}

impl Dirty {
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.appends.is_empty()
    }

    /// Buffered bytes (an overwritten byte counts once).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// End of the last positioned write.
    pub(crate) fn end(&self) -> u64 {
        self.segments
            .iter()
            .next_back()
            .map_or(0, |(o, d)| o + d.len() as u64)
    }

    /// Positioned segments: each becomes one commit.
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub(crate) fn appended(&self) -> u64 {
        self.appends.len() as u64
    }

    pub(crate) fn append(&mut self, data: &[u8]) {
        self.appends.extend_from_slice(data);
        self.bytes += data.len();
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // The common case, a sequential writer: extend the segment it ends.
        let extends = self
            .segments
            .range(..=offset)
            .next_back()
            .map(|(&s, d)| (s, s + d.len() as u64));
        if let Some((start, seg_end)) = extends {
            if seg_end == offset && self.segments.range(offset..end).next().is_none() {
                if let Some(seg) = self.segments.get_mut(&start) {
                    seg.extend_from_slice(data);
                    self.bytes += data.len();
                    return;
                }
            }
        }
        // Otherwise merge every segment that overlaps or touches the write.
        let touching: Vec<u64> = self
            .segments
            .range(..=end)
            .filter(|(&s, d)| s + d.len() as u64 >= offset)
            .map(|(&s, _)| s)
            .collect();
        let mut start = offset;
        let mut stop = end;
        for s in &touching {
            start = start.min(*s);
            stop = stop.max(s + self.segments[s].len() as u64);
        }
        let mut merged = vec![0u8; (stop - start) as usize];
        for s in touching {
            if let Some(d) = self.segments.remove(&s) {
                self.bytes -= d.len();
                merged[(s - start) as usize..(s - start) as usize + d.len()].copy_from_slice(&d);
            }
        }
        merged[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
        self.bytes += merged.len();
        self.segments.insert(start, merged);
    }

    /// Copies buffered positioned bytes over `buf`, which holds the file's
    /// bytes from `offset`.
    pub(crate) fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (&s, d) in self.segments.range(..end) {
            let e = s + d.len() as u64;
            if e <= offset {
                continue;
            }
            let from = s.max(offset);
            let to = e.min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&d[(from - s) as usize..(to - s) as usize]);
        }
    }

    /// Buffered appends placed after `base` (the stored size), over `buf`.
    pub(crate) fn overlay_appends(&self, base: u64, offset: u64, buf: &mut [u8]) {
        let mut tmp = Dirty::default();
        tmp.write(base, &self.appends);
        tmp.overlay(offset, buf);
    }

    /// Cuts everything at and beyond `size` (a truncate).
    pub(crate) fn truncate(&mut self, size: u64) {
        let mut kept = Dirty {
            appends: std::mem::take(&mut self.appends),
            ..Default::default()
        };
        kept.bytes = kept.appends.len();
        for (s, mut d) in std::mem::take(&mut self.segments) {
            if s >= size {
                continue;
            }
            d.truncate((size - s).min(d.len() as u64) as usize);
            kept.write(s, &d);
        }
        *self = kept;
    }

    /// The whole content of a file that was empty before these writes,
    /// when they are one run from its start (written in order, or
    /// appended): what a file made and written through once holds.
    pub(crate) fn clone_from_start(&self) -> Option<Vec<u8>> {
        let mut data = match self.segments.len() {
            0 => Vec::new(),
            1 => match self.segments.iter().next() {
                Some((0, d)) => d.clone(),
                _ => return None,
            },
            _ => return None,
        };
        data.extend_from_slice(&self.appends);
        Some(data)
    }

    /// Only the appended bytes.
    pub(crate) fn appends_only(&self) -> Dirty {
        let mut d = Dirty::default();
        d.append(&self.appends);
        d
    }

    pub(crate) fn into_parts(self) -> (Vec<(u64, Vec<u8>)>, Vec<u8>) {
        (self.segments.into_iter().collect(), self.appends)
    }

    /// `newer` written over `self`: what to keep when an upload of `self`
    /// failed while `newer` was being buffered.
    pub(crate) fn under(mut self, newer: Dirty) -> Dirty {
        let (segs, appends) = newer.into_parts();
        for (o, d) in segs {
            self.write(o, &d);
        }
        self.append(&appends);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &Dirty, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![b'.'; len];
        d.overlay(offset, &mut buf);
        buf
    }

    #[test]
    fn a_file_written_through_once_is_one_run_from_its_start() {
        let mut d = Dirty::default();
        assert_eq!(d.clone_from_start(), Some(Vec::new()));
        d.write(0, b"hello ");
        d.write(6, b"world");
        assert_eq!(d.clone_from_start(), Some(b"hello world".to_vec()));
        d.append(b"!");
        assert_eq!(d.clone_from_start(), Some(b"hello world!".to_vec()));
        let mut gap = Dirty::default();
        gap.write(4, b"x");
        assert_eq!(gap.clone_from_start(), None);
    }

    #[test]
    fn sequential_writes_extend_one_segment() {
        let mut d = Dirty::default();
        d.write(0, b"hello ");
        d.write(6, b"world");
        assert_eq!(d.segments.len(), 1);
        assert_eq!(read(&d, 0, 11), b"hello world");
        assert_eq!(d.end(), 11);
        assert_eq!(d.bytes(), 11);
    }

    #[test]
    fn overlapping_writes_merge_newest_wins() {
        let mut d = Dirty::default();
        d.write(10, b"aaaa");
        d.write(0, b"bbbb");
        d.write(2, b"XXXXXXXXXX");
        assert_eq!(read(&d, 0, 16), b"bbXXXXXXXXXXaa..");
        assert_eq!(d.segments.len(), 1);
        assert_eq!(d.bytes(), 14);
    }

    #[test]
    fn truncate_and_under() {
        let mut d = Dirty::default();
        d.write(0, b"0123456789");
        d.truncate(4);
        assert_eq!(read(&d, 0, 6), b"0123..");
        let mut newer = Dirty::default();
        newer.write(2, b"ab");
        newer.append(b"tail");
        let both = d.under(newer);
        assert_eq!(read(&both, 0, 6), b"01ab..");
        assert_eq!(both.appended(), 4);
    }
}
