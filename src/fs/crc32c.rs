//! CRC-32C (Castagnoli), the checksum ext4 (metadata_csum), XFS (v5) and
//! btrfs put on their metadata. Table-driven, no dependencies.

const POLY: u32 = 0x82F6_3B78; // reflected 0x1EDC6F41

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Raw update: no inversion before or after. `crc32c(d) == !update(!0, d)`.
/// ext4 chains raw updates from a seed; XFS and btrfs use `crc32c`.
pub fn update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// The standard CRC-32C of `data` (initial value !0, final inversion).
pub fn crc32c(data: &[u8]) -> u32 {
    !update(!0, data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_value() {
        // The catalogued check value of CRC-32C.
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(super::crc32c(b""), 0);
        let split = !super::update(super::update(!0, b"1234"), b"56789");
        assert_eq!(split, 0xE306_9283);
    }
}
