//! Byte layouts of the binary parts of an image: chunk records in the data
//! files and entries of the per-stream index. docs/FORMAT.md describes the
//! same bytes in prose; keep the two in step.
//!
//! All integers are little-endian.

use crate::error::{Error, Result};

/// Version of the image format klon writes when every source byte was read.
pub const FORMAT_VERSION: u32 = 1;
/// Format version of an image some of whose source bytes could not be read
/// (`klon backup --rescue`): streams may list `unreadable` ranges. Version
/// 1 readers refuse it rather than restore zeros without saying so.
pub const FORMAT_VERSION_RESCUED: u32 = 2;

/// Magic at the start of every chunk record.
pub const CHUNK_MAGIC: &[u8; 8] = b"KLONCHK1";
/// Magic at the start of every index file.
pub const INDEX_MAGIC: &[u8; 8] = b"KLONIDX1";

/// Fixed part of a chunk record header, before the extent table.
pub const CHUNK_HEADER_LEN: usize = 80;
/// One extent in a chunk's extent table: disk offset and length.
pub const EXTENT_LEN: usize = 16;
/// Index file header length.
pub const INDEX_HEADER_LEN: usize = 32;
/// One index entry.
pub const INDEX_ENTRY_LEN: usize = 64;

/// Raw (uncompressed) bytes per chunk at most.
pub const CHUNK_SIZE: u32 = 8 << 20;
/// Extents per chunk at most (bounds the header a reader must accept).
pub const MAX_EXTENTS: u32 = 8192;

/// Chunk flag: the payload is a zstd frame (otherwise stored as is).
pub const FLAG_ZSTD: u32 = 1;
/// Longest chunk record: a header with the most extents and a payload of
/// a whole chunk.
pub const MAX_RECORD_LEN: usize = CHUNK_HEADER_LEN + EXTENT_LEN * MAX_EXTENTS as usize + CHUNK_SIZE as usize;

/// A byte range of the disk: (offset, length), as the filesystem readers
/// give them.
pub use crate::fs::Extent;

/// The header of one chunk record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Index of the stream in the manifest's stream list.
    pub stream: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// Position of the chunk within its stream, from 0.
    pub seq: u64,
    /// Where the content goes on the disk, in order.
    pub extents: Vec<Extent>,
    /// Content length (sum of extent lengths).
    pub raw_len: u32,
    /// Payload length as stored.
    pub stored_len: u32,
    /// crc32 of the stored payload.
    pub payload_crc: u32,
    /// blake3 of the content (uncompressed).
    pub content_hash: [u8; 32],
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl ChunkHeader {
    /// Length of the encoded header including the extent table.
    pub fn encoded_len(&self) -> usize {
        CHUNK_HEADER_LEN + self.extents.len() * EXTENT_LEN
    }

    /// Encodes header and extent table; returns the bytes and the header crc.
    pub fn encode(&self) -> (Vec<u8>, u32) {
        let mut b = Vec::with_capacity(self.encoded_len());
        b.extend_from_slice(CHUNK_MAGIC);
        b.extend_from_slice(&self.stream.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.raw_len.to_le_bytes());
        b.extend_from_slice(&self.stored_len.to_le_bytes());
        b.extend_from_slice(&self.payload_crc.to_le_bytes());
        b.extend_from_slice(&self.content_hash);
        debug_assert_eq!(b.len(), 72);
        b.extend_from_slice(&[0u8; 8]); // crc and reserved, filled below
        for &(off, len) in &self.extents {
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        let crc = header_crc(&b);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        (b, crc)
    }

    /// Reads the fixed part: returns the extent count to read next.
    /// `where_` names the place for error messages.
    pub fn extent_count(fixed: &[u8], where_: &str) -> Result<u32> {
        if fixed.len() < CHUNK_HEADER_LEN || &fixed[0..8] != CHUNK_MAGIC {
            return Err(Error::Corrupt(format!("{where_}: no chunk record here (bad magic)")));
        }
        let n = u32_at(fixed, 24);
        if n == 0 || n > MAX_EXTENTS {
            return Err(Error::Corrupt(format!("{where_}: chunk header has an impossible extent count {n}")));
        }
        Ok(n)
    }

    /// Decodes a full header (fixed part plus extent table) and checks its crc.
    /// Returns the header and its crc.
    pub fn decode(b: &[u8], where_: &str) -> Result<(ChunkHeader, u32)> {
        let n = Self::extent_count(b, where_)? as usize;
        if b.len() != CHUNK_HEADER_LEN + n * EXTENT_LEN {
            return Err(Error::Corrupt(format!("{where_}: chunk header is truncated")));
        }
        let stored_crc = u32_at(b, 72);
        if header_crc(b) != stored_crc {
            return Err(Error::Corrupt(format!("{where_}: chunk header checksum (crc32) does not match")));
        }
        let extents = (0..n)
            .map(|i| {
                let o = CHUNK_HEADER_LEN + i * EXTENT_LEN;
                (u64_at(b, o), u64_at(b, o + 8))
            })
            .collect();
        let h = ChunkHeader {
            stream: u32_at(b, 8),
            flags: u32_at(b, 12),
            seq: u64_at(b, 16),
            extents,
            raw_len: u32_at(b, 28),
            stored_len: u32_at(b, 32),
            payload_crc: u32_at(b, 36),
            content_hash: b[40..72].try_into().expect("32 bytes"),
        };
        if h.flags & !FLAG_ZSTD != 0 {
            return Err(Error::Corrupt(format!("{where_}: chunk has unknown flags {:#x}", h.flags)));
        }
        if h.raw_len > CHUNK_SIZE || h.stored_len > CHUNK_SIZE {
            return Err(Error::Corrupt(format!("{where_}: chunk lengths out of range")));
        }
        let sum = h.extents.iter().try_fold(0u64, |sum, e| sum.checked_add(e.1));
        if sum != Some(h.raw_len as u64) || h.extents.iter().any(|e| e.1 == 0) {
            return Err(Error::Corrupt(format!("{where_}: chunk extents do not add up to its length")));
        }
        if h.extents.windows(2).any(|w| w[0].0.checked_add(w[0].1).is_none_or(|end| end > w[1].0)) {
            return Err(Error::Corrupt(format!("{where_}: chunk extents overlap or are out of order")));
        }
        Ok((h, stored_crc))
    }
}

fn header_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..72]);
    h.update(&b[76..]);
    h.finalize()
}

/// One entry of a stream's index: where a chunk record is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Number of the data file (the NNN in `NAME.NNN`).
    pub file: u32,
    /// Extent count of the chunk.
    pub extent_count: u32,
    /// Offset of the chunk record within the data file.
    pub offset: u64,
    /// Content length.
    pub raw_len: u32,
    /// Stored payload length.
    pub stored_len: u32,
    /// crc32 of the chunk header (as in the record).
    pub header_crc: u32,
    /// crc32 of the payload.
    pub payload_crc: u32,
    /// blake3 of the content.
    pub content_hash: [u8; 32],
}

impl IndexEntry {
    /// Length of the whole chunk record this entry points at.
    pub fn record_len(&self) -> u64 {
        (CHUNK_HEADER_LEN + self.extent_count as usize * EXTENT_LEN) as u64 + self.stored_len as u64
    }

    /// Encodes the entry.
    pub fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..4].copy_from_slice(&self.file.to_le_bytes());
        b[4..8].copy_from_slice(&self.extent_count.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.stored_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.header_crc.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[32..64].copy_from_slice(&self.content_hash);
        b
    }

    /// Decodes an entry.
    pub fn decode(b: &[u8]) -> IndexEntry {
        IndexEntry {
            file: u32_at(b, 0),
            extent_count: u32_at(b, 4),
            offset: u64_at(b, 8),
            raw_len: u32_at(b, 16),
            stored_len: u32_at(b, 20),
            header_crc: u32_at(b, 24),
            payload_crc: u32_at(b, 28),
            content_hash: b[32..64].try_into().expect("32 bytes"),
        }
    }
}

/// Encodes an index file header.
pub fn encode_index_header(stream: u32, entries: u64) -> [u8; INDEX_HEADER_LEN] {
    let mut b = [0u8; INDEX_HEADER_LEN];
    b[0..8].copy_from_slice(INDEX_MAGIC);
    b[8..12].copy_from_slice(&stream.to_le_bytes());
    b[12..16].copy_from_slice(&(INDEX_ENTRY_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&entries.to_le_bytes());
    b
}

/// Decodes an index header: (stream number, entry count).
pub fn decode_index_header(b: &[u8], where_: &str) -> Result<(u32, u64)> {
    if b.len() < INDEX_HEADER_LEN || &b[0..8] != INDEX_MAGIC {
        return Err(Error::Corrupt(format!("{where_}: not a klon index file (bad magic)")));
    }
    if u32_at(b, 12) as usize != INDEX_ENTRY_LEN {
        return Err(Error::Corrupt(format!("{where_}: unexpected index entry size")));
    }
    Ok((u32_at(b, 8), u64_at(b, 16)))
}

/// Name of data file number `n` of stream `name`.
pub fn data_file_name(stream: &str, n: u32) -> String {
    format!("{stream}.{n:03}")
}

/// Name of the index file of stream `name`.
pub fn index_file_name(stream: &str) -> String {
    format!("{stream}.idx")
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChunkHeader {
        ChunkHeader {
            stream: 2,
            flags: FLAG_ZSTD,
            seq: 7,
            extents: vec![(4096, 8192), (65536, 4096)],
            raw_len: 12288,
            stored_len: 100,
            payload_crc: 0xdead_beef,
            content_hash: [7; 32],
        }
    }

    #[test]
    fn chunk_header_round_trip() {
        let h = sample();
        let (b, crc) = h.encode();
        assert_eq!(b.len(), h.encoded_len());
        let (back, crc2) = ChunkHeader::decode(&b, "test").unwrap();
        assert_eq!(back, h);
        assert_eq!(crc, crc2);
    }

    #[test]
    fn every_flipped_header_byte_is_caught() {
        let (b, _) = sample().encode();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(ChunkHeader::decode(&c, "t").is_err(), "flip at byte {i} not detected");
        }
    }

    #[test]
    fn bad_extents_rejected() {
        let mut h = sample();
        h.extents = vec![(65536, 4096), (4096, 8192)];
        let (b, _) = h.encode();
        assert!(ChunkHeader::decode(&b, "t").is_err());
        let mut h = sample();
        h.raw_len = 1;
        let (b, _) = h.encode();
        assert!(ChunkHeader::decode(&b, "t").is_err());
        // Lengths whose sum wraps around to the content length.
        let mut h = sample();
        h.raw_len = 4096;
        h.extents = vec![(0, 4096 + (1 << 63)), (1 << 62, 1 << 63)];
        let (b, _) = h.encode();
        let e = ChunkHeader::decode(&b, "t").unwrap_err().to_string();
        assert!(e.contains("do not add up"), "{e}");
    }

    #[test]
    fn index_entry_round_trip() {
        let e = IndexEntry {
            file: 3,
            extent_count: 2,
            offset: 1 << 33,
            raw_len: 5,
            stored_len: 6,
            header_crc: 7,
            payload_crc: 8,
            content_hash: [9; 32],
        };
        assert_eq!(IndexEntry::decode(&e.encode()), e);
        assert_eq!(e.record_len(), (CHUNK_HEADER_LEN + 32 + 6) as u64);
    }
}
