//! A repository's binary files (src/repo/): pack indexes (their blake3 is
//! recomputed over the fuzzed bytes, as a fuzzer cannot guess it) and
//! delta patches, applied to a base; what decodes encodes back to the same
//! bytes, and a patch made from two contents makes the second again.
#![no_main]
use klon::repo::delta;
use klon::repo::pack::PackIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            let mut bytes = rest.to_vec();
            let sum = *blake3::hash(&bytes).as_bytes();
            bytes.extend_from_slice(&sum);
            let name = match rest.get(32..64) {
                Some(n) => n.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                None => "00".repeat(32),
            };
            if let Ok(idx) = PackIndex::decode(&bytes, &name, "fuzz") {
                assert_eq!(idx.encode(), bytes, "a decoded index encodes back to its bytes");
            }
        }
        1 => {
            // A base of 16 blocks made from the first bytes; the rest a patch.
            let (len, patch) = rest.split_at(rest.len().min(3));
            let raw_len = len.iter().fold(0usize, |a, &b| a << 8 | b as usize) % (1 << 20);
            let base: Vec<u8> = (0..16 * delta::BLOCK).map(|i| (i / delta::BLOCK) as u8).collect();
            if let Ok(out) = delta::apply(&base, patch, raw_len) {
                assert_eq!(out.len(), raw_len);
            }
        }
        _ => {
            // Two contents: the first half a base, the second new content
            // made of pieces of it and new bytes.
            let (a, b) = rest.split_at(rest.len() / 2);
            let base: Vec<u8> = a.iter().cycle().take((a.len() * 64).min(1 << 18)).copied().collect();
            let new: Vec<u8> = b.iter().cycle().take((b.len() * 64).min(1 << 18)).copied().collect();
            if let Some(p) = delta::encode(&base, &new) {
                assert_eq!(delta::apply(&base, &p, new.len()).expect("a patch klon made applies"), new);
            }
        }
    }
});
