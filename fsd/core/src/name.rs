//! File names as the tracker accepts them.

/// POSIX NAME_MAX.
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty file name")]
    Empty,
    #[error("file name is {0} bytes, the limit is {MAX_NAME_BYTES}")]
    TooLong(usize),
    #[error("file name contains '/'")]
    Slash,
    #[error("file name contains a NUL byte")]
    Nul,
    #[error("'.' and '..' are not names of entries")]
    Dot,
}

/// One path component: not empty, not `.` or `..`, no `/` or NUL, at most 255
/// bytes. Any other bytes are allowed, as on a local disk.
pub fn validate_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if name == b"." || name == b".." {
        return Err(NameError::Dot);
    }
    if name.contains(&b'/') {
        return Err(NameError::Slash);
    }
    if name.contains(&0) {
        return Err(NameError::Nul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_unusual_names() {
        for n in [
            &b"page.txt"[..],
            b"...",
            b".hidden",
            "sé ñ".as_bytes(),
            &[0xff, 0xfe],
        ] {
            assert_eq!(validate_name(n), Ok(()), "{n:?}");
        }
        assert_eq!(validate_name(&[b'a'; 255]), Ok(()));
    }

    #[test]
    fn refuses_hostile_names() {
        assert_eq!(validate_name(b""), Err(NameError::Empty));
        assert_eq!(validate_name(b"."), Err(NameError::Dot));
        assert_eq!(validate_name(b".."), Err(NameError::Dot));
        assert_eq!(validate_name(b"a/b"), Err(NameError::Slash));
        assert_eq!(validate_name(b"../etc"), Err(NameError::Slash));
        assert_eq!(validate_name(b"a\0b"), Err(NameError::Nul));
        assert_eq!(validate_name(&[b'a'; 256]), Err(NameError::TooLong(256)));
    }
}
