//! A repository's binary files (src/repo/): pack indexes (their blake3 is
//! recomputed over the fuzzed bytes, as a fuzzer cannot guess it) and
//! delta patches, applied to a base; what decodes encodes back to the same
//! bytes, and a patch made from two contents makes the second again; and
//! chains of bases (loops, missing links, too deep) across packs: every
//! lookup ends, and a chunk is readable exactly when its chain reaches a
//! whole chunk within the limit.
#![no_main]
use klon::repo::delta;
use klon::repo::pack::{BlobEntry, FLAG_DELTA, PackIndex};
use klon::repo::{BlobIndex, MAX_DELTA_DEPTH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
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
        3 => {
            // Packs of blobs: each pair of bytes a chunk (ids 0..32) and its
            // base (none when the byte is 255); a byte 254 starts a pack.
            let mut packs: Vec<Vec<BlobEntry>> = vec![Vec::new()];
            for pair in rest.chunks_exact(2) {
                if pair[0] == 254 {
                    packs.push(Vec::new());
                    continue;
                }
                let base = (pair[1] != 255).then_some([pair[1] % 32; 32]);
                let flags = if base.is_some() { FLAG_DELTA } else { 0 };
                let e = BlobEntry { id: [pair[0] % 32; 32], offset: 0, stored_len: 40, raw_len: 1, payload_crc: 0, flags, base };
                packs.last_mut().expect("one at least").push(e);
            }
            let indexes: Vec<PackIndex> = packs
                .into_iter()
                .enumerate()
                .map(|(n, entries)| PackIndex { name: format!("{n:064}"), pack_size: 0, entries })
                .collect();
            let index = BlobIndex::of(&indexes).expect("few chunks");
            for pos in 0..index.len() {
                let id = index.id_at(pos);
                let chain = index.chain(id);
                assert!(chain.len() <= MAX_DELTA_DEPTH + 1);
                match index.depth(id) {
                    Some(d) => {
                        assert_eq!(chain.len(), d + 1, "a readable chunk's chain");
                        let (_, last) = index.get(chain.last().expect("not empty")).expect("a readable chain");
                        assert!(last.base.is_none());
                        assert!(index.usable(id));
                    }
                    None => assert!(!index.usable(id)),
                }
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
