//! rsync-style deltas between two versions of a block (fast_rsync): a host
//! that holds an older block of the same file sends its signature; the
//! holder of the new block answers with a delta; the host applies it to its
//! old block and keeps the result only if its BLAKE3 hash is the new block's.

use crate::{block_hash, MAX_BLOCK_BYTES};

/// Bytes of the strong (MD4) hash kept per signature entry. Short is safe:
/// the result is checked against the block's BLAKE3 hash anyway.
const STRONG_BYTES: u32 = 8;

/// Bytes of the base one signature entry covers: about the square root of
/// its size (as rsync does), so the signature and the literal bytes around
/// a changed line stay balanced — a few hundred bytes per changed line in a
/// wiki page, a few KiB in a 4 MiB block.
pub fn delta_block(len: usize) -> u32 {
    ((len as f64).sqrt() as u32)
        .next_power_of_two()
        .clamp(128, 8192)
}

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("signature is not valid: {0}")]
    BadSignature(String),
    #[error("delta is not valid: {0}")]
    BadDelta(String),
    #[error("delta applied to the base does not give the expected block")]
    Mismatch,
}

/// The signature of `base`.
pub fn signature(base: &[u8]) -> Vec<u8> {
    let opts = fast_rsync::SignatureOptions {
        block_size: delta_block(base.len()),
        crypto_hash_size: STRONG_BYTES,
    };
    fast_rsync::Signature::calculate(base, opts).into_serialized()
}

/// The delta that turns the block behind `signature` into `data`.
pub fn diff(signature: &[u8], data: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let sig = fast_rsync::Signature::deserialize(signature.to_vec())
        .map_err(|e| DeltaError::BadSignature(e.to_string()))?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), data, &mut out)
        .map_err(|e| DeltaError::BadSignature(e.to_string()))?;
    Ok(out)
}

/// Applies `delta` to `base`; the result must hash to `expected`.
pub fn apply(base: &[u8], delta: &[u8], expected: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    fast_rsync::apply_limited(base, delta, &mut out, MAX_BLOCK_BYTES)
        .map_err(|e| DeltaError::BadDelta(e.to_string()))?;
    if block_hash(&out).as_slice() != expected {
        return Err(DeltaError::Mismatch);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(rev: usize) -> Vec<u8> {
        let mut s = String::new();
        for line in 0..2000 {
            if line % 500 == 0 {
                s += &format!("line {line} changed in revision {rev}\n");
            } else {
                s += &format!("line {line} of a wiki page that mostly stays the same\n");
            }
        }
        s.into_bytes()
    }

    #[test]
    fn a_small_change_is_a_small_delta_and_round_trips() {
        let (old, new) = (page(1), page(2));
        let sig = signature(&old);
        let delta = diff(&sig, &new).unwrap();
        assert!(
            sig.len() < old.len() / 16,
            "signature {} of {}",
            sig.len(),
            old.len()
        );
        assert!(
            delta.len() < new.len() / 20,
            "delta {} of {}",
            delta.len(),
            new.len()
        );
        assert_eq!(apply(&old, &delta, &block_hash(&new)).unwrap(), new);
        // The wrong base, or the wrong expected hash, is refused.
        assert!(apply(&page(7)[..1000], &delta, &block_hash(&new)).is_err());
        assert!(matches!(
            apply(&old, &delta, &block_hash(&old)),
            Err(DeltaError::Mismatch)
        ));
        assert!(apply(&old, b"garbage", &block_hash(&new)).is_err());
        assert!(diff(b"not a signature", &new).is_err());
    }
}
