//! Delta chunks: a chunk stored as the blocks that differ from a base chunk
//! (a full chunk of the same window in an earlier snapshot), so that a
//! small change inside a window costs its changed blocks, not the window.
//!
//! A patch is a list of operations, each taking bytes either from the
//! base (a run of its blocks of [`BLOCK`] bytes, wherever in the base they
//! are, so data that moved inside the window still matches, even by a
//! fraction of a block) or from the patch's own new bytes, which follow
//! the list. docs/REPOSITORY.md ("Delta blobs") describes the bytes; keep
//! the two in step.

use std::collections::HashMap;

/// The base's blocks: the unit a delta takes from it.
pub const BLOCK: usize = 4096;

/// How far apart the new content is searched for base blocks: a sector,
/// the unit every used extent is made of.
const STEP: usize = 512;

/// A new chunk is stored as a delta only while the bytes it cannot take
/// from its base are at most this fraction (1/n) of its content.
pub const MAX_LITERAL_FRACTION: usize = 2;

/// An operation's tag with this bit set takes a run of base blocks.
const COPY: u32 = 1 << 31;

/// The patch that makes `new` from `base`, or None when too little of it
/// is in `base` for a delta to be worth it (more than 1/2 of its bytes new).
pub fn encode(base: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let mut at: HashMap<u32, Vec<u32>> = HashMap::with_capacity(base.len() / BLOCK);
    for (i, b) in base.chunks_exact(BLOCK).enumerate() {
        at.entry(crc32fast::hash(b)).or_default().push(i as u32);
    }
    let find = |block: &[u8]| {
        at.get(&crc32fast::hash(block))?
            .iter()
            .copied()
            .find(|&i| &base[i as usize * BLOCK..(i as usize + 1) * BLOCK] == block)
    };
    let mut ops: Vec<u32> = Vec::new();
    let mut literal = Vec::new();
    let flush = |ops: &mut Vec<u32>, literal: &mut Vec<u8>, bytes: &[u8]| -> bool {
        if !bytes.is_empty() {
            ops.push(bytes.len() as u32);
            literal.extend_from_slice(bytes);
        }
        literal.len() * MAX_LITERAL_FRACTION <= new.len()
    };
    let (mut pos, mut lit_from) = (0usize, 0usize);
    // The run of base blocks being built: first block, count.
    let mut run: Option<(u32, u32)> = None;
    while pos + BLOCK <= new.len() {
        let Some(i) = find(&new[pos..pos + BLOCK]) else {
            if let Some((first, n)) = run.take() {
                ops.extend([COPY | n, first]);
            }
            pos += STEP;
            continue;
        };
        if lit_from < pos && !flush(&mut ops, &mut literal, &new[lit_from..pos]) {
            return None;
        }
        run = match run {
            Some((first, n)) if first + n == i && n < COPY - 1 => Some((first, n + 1)),
            Some((first, n)) => {
                ops.extend([COPY | n, first]);
                Some((i, 1))
            }
            None => Some((i, 1)),
        };
        pos += BLOCK;
        lit_from = pos;
    }
    if let Some((first, n)) = run {
        ops.extend([COPY | n, first]);
    }
    if !flush(&mut ops, &mut literal, &new[lit_from..]) {
        return None;
    }
    let mut patch = Vec::with_capacity(8 + 4 * ops.len() + literal.len());
    patch.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    patch.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        patch.extend_from_slice(&op.to_le_bytes());
    }
    patch.extend_from_slice(&literal);
    Some(patch)
}

/// Makes the content of `raw_len` bytes that `patch` describes from
/// `base`. Every field is checked against the lengths: a damaged patch is
/// an error (the caller names where), never a panic or a large allocation.
pub fn apply(base: &[u8], patch: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    let u32_at = |o: usize| patch.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let (Some(block), Some(n)) = (u32_at(0), u32_at(4)) else {
        return Err("the delta is shorter than its header".into());
    };
    if block as usize != BLOCK {
        return Err(format!("the delta's block size is {block}, not {BLOCK}"));
    }
    let n = n as usize;
    if patch.len() < 8 + 4 * n {
        return Err("the delta is shorter than its operation list".into());
    }
    let base_blocks = base.len() / BLOCK;
    let mut literal = &patch[8 + 4 * n..];
    let mut out = Vec::with_capacity(raw_len);
    let mut i = 0;
    while i < n {
        let tag = u32_at(8 + 4 * i).expect("inside the list");
        if tag & COPY != 0 {
            let count = (tag & !COPY) as usize;
            let Some(first) = u32_at(8 + 4 * (i + 1)).filter(|_| i + 1 < n).map(|f| f as usize) else {
                return Err(format!("operation {i} of the delta has no base block"));
            };
            if count == 0 || first + count > base_blocks || out.len() + count * BLOCK > raw_len {
                return Err(format!(
                    "operation {i} of the delta takes {count} blocks from block {first} of a base of {base_blocks}"
                ));
            }
            out.extend_from_slice(&base[first * BLOCK..(first + count) * BLOCK]);
            i += 2;
        } else {
            let len = tag as usize;
            if len == 0 || len > literal.len() || out.len() + len > raw_len {
                return Err(format!("operation {i} of the delta takes {len} new bytes that are not there"));
            }
            out.extend_from_slice(&literal[..len]);
            literal = &literal[len..];
            i += 1;
        }
    }
    if out.len() != raw_len {
        return Err(format!("the delta makes {} bytes, not {raw_len}", out.len()));
    }
    if !literal.is_empty() {
        return Err(format!("{} bytes follow the delta's last operation", literal.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_bytes(seed: u64, n: usize) -> Vec<u8> {
        crate::testutil::Rng::seeded(seed).bytes(n)
    }

    #[test]
    fn round_trips_changed_moved_and_partial_blocks() {
        let base = rng_bytes(1, 64 * BLOCK);
        let mut new = base.clone();
        // One block changed, two swapped (moved inside the window), a
        // partial tail, and a block of the base's end dropped.
        new[5 * BLOCK + 7] ^= 1;
        new.copy_within(10 * BLOCK..11 * BLOCK, 20 * BLOCK);
        new.truncate(60 * BLOCK + 100);
        let patch = encode(&base, &new).expect("mostly the same");
        assert!(patch.len() < 2 * BLOCK + 200, "patch of {} bytes", patch.len());
        assert_eq!(apply(&base, &patch, new.len()).unwrap(), new);
        // Content moved by a sector (a used block freed before it).
        let shifted = [&base[..3 * BLOCK], &base[3 * BLOCK + 512..]].concat();
        let patch = encode(&base, &shifted).expect("the same blocks, moved");
        assert!(patch.len() < BLOCK + 200, "patch of {} bytes", patch.len());
        assert_eq!(apply(&base, &patch, shifted.len()).unwrap(), shifted);
        // Identical and empty contents.
        assert_eq!(apply(&base, &encode(&base, &base).unwrap(), base.len()).unwrap(), base);
        assert_eq!(apply(&base, &encode(&base, &[]).unwrap(), 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn mostly_new_content_is_not_a_delta() {
        let base = rng_bytes(2, 16 * BLOCK);
        let mut new = rng_bytes(3, 16 * BLOCK);
        assert!(encode(&base, &new).is_none());
        new[..8 * BLOCK].copy_from_slice(&base[..8 * BLOCK]);
        assert!(encode(&base, &new).is_some(), "half from the base is still a delta");
    }

    #[test]
    fn every_damage_to_a_patch_is_an_error_or_other_bytes() {
        let base = rng_bytes(4, 8 * BLOCK);
        let mut new = base.clone();
        new[3 * BLOCK] ^= 0xff;
        let patch = encode(&base, &new).unwrap();
        for at in 0..patch.len().min(8 + 4 * 8 + 64) {
            for bit in [1u8, 0x80] {
                let mut p = patch.clone();
                p[at] ^= bit;
                if let Ok(out) = apply(&base, &p, new.len()) {
                    assert_ne!(out, new, "flip at {at} gave the same content");
                }
            }
        }
        for cut in [0, 3, 8, 20, patch.len() - 1] {
            assert!(apply(&base, &patch[..cut], new.len()).is_err(), "cut at {cut}");
        }
        let mut longer = patch.clone();
        longer.push(0);
        assert!(apply(&base, &longer, new.len()).is_err());
        assert!(apply(&base, &patch, new.len() + BLOCK).is_err());
        assert!(apply(&base[..BLOCK], &patch, new.len()).is_err(), "refs beyond a shorter base");
    }
}
