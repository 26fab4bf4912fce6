//! Integers at byte offsets of on-disk structures. `le16`/`le32`/`le64`:
//! the caller has checked that the bytes are there (a read of a whole
//! sector or block), so a short slice is a bug and panics. The `get_`
//! forms read structures whose length is not known to suffice (a record's
//! own length field, a probe of whatever a partition holds): `None` when
//! the bytes are not all there, for the caller to name as damage.

/// The u16 at `at`.
pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// The u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The `N` bytes at `at`, if they are all there.
pub fn get<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The little-endian u16 at `at`, if there.
pub fn get_le16(b: &[u8], at: usize) -> Option<u16> {
    get(b, at).map(u16::from_le_bytes)
}

/// The little-endian u32 at `at`, if there.
pub fn get_le32(b: &[u8], at: usize) -> Option<u32> {
    get(b, at).map(u32::from_le_bytes)
}

/// The little-endian u64 at `at`, if there.
pub fn get_le64(b: &[u8], at: usize) -> Option<u64> {
    get(b, at).map(u64::from_le_bytes)
}

/// The big-endian u16 at `at`, if there.
pub fn get_be16(b: &[u8], at: usize) -> Option<u16> {
    get(b, at).map(u16::from_be_bytes)
}

/// The big-endian u32 at `at`, if there.
pub fn get_be32(b: &[u8], at: usize) -> Option<u32> {
    get(b, at).map(u32::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_reads_stop_at_the_end() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(get_le16(&b, 3), Some(0x0504));
        assert_eq!(get_le16(&b, 4), None);
        assert_eq!(get_be32(&b, 1), Some(0x0203_0405));
        assert_eq!(get_le64(&b, 0), None);
        assert_eq!(get_le32(&b, usize::MAX - 1), None, "no overflow past the end of the address space");
        assert_eq!(le32(&b, 0), 0x0403_0201);
    }
}
