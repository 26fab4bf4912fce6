//! Chunk record headers and index files (src/image/format.rs). The header's
//! crc32 is recomputed over the fuzzed bytes before decoding: a fuzzer
//! cannot guess a checksum, and what lies behind it is what needs fuzzing
//! (a damaged record whose crc fails is refused before anything else).
#![no_main]
use klon::image::format::{
    CHUNK_HEADER_LEN, ChunkHeader, EXTENT_LEN, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, IndexEntry, decode_index_header,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ChunkHeader::decode(data, "fuzz");
    if let Ok(n) = ChunkHeader::extent_count(data, "fuzz") {
        let mut b = data.to_vec();
        b.resize(CHUNK_HEADER_LEN + n as usize * EXTENT_LEN, 0);
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..72]);
        h.update(&b[76..]);
        let crc = h.finalize();
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        if let Ok((hdr, _)) = ChunkHeader::decode(&b, "fuzz") {
            // What decodes encodes back to a header that decodes the same.
            let (bytes, _) = hdr.encode();
            let (again, _) = ChunkHeader::decode(&bytes, "fuzz").expect("re-encoded header decodes");
            assert_eq!(again.encode().0, bytes);
        }
    }
    if data.len() >= INDEX_HEADER_LEN {
        let _ = decode_index_header(&data[..INDEX_HEADER_LEN], "fuzz");
        for e in data[INDEX_HEADER_LEN..].chunks_exact(INDEX_ENTRY_LEN) {
            let _ = IndexEntry::decode(e).record_len();
        }
    }
});
