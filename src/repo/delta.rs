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
    let parsed = parse(patch, raw_len, base.len())?;
    let mut out = vec![0; raw_len];
    emit(base, std::slice::from_ref(&parsed), 0, &mut out);
    Ok(out)
}

/// One operation of a parsed patch: where its bytes come from, as byte
/// ranges (of the patch's new bytes, or of the content it is made from).
#[derive(Clone, Copy)]
enum Source {
    New { at: usize },
    Base { at: usize },
}

/// A patch checked against the lengths it works between, each operation
/// with the offset in the content it makes where its bytes go.
struct Parsed<'a> {
    /// (offset in the content made, length, source), in order.
    ops: Vec<(usize, usize, Source)>,
    literal: &'a [u8],
}

/// Parses `patch`, which makes `raw_len` bytes from content of `base_len`
/// bytes: every field checked against the lengths, so that a damaged patch
/// is an error (the caller names where), never a panic or a large
/// allocation.
fn parse(patch: &[u8], raw_len: usize, base_len: usize) -> Result<Parsed<'_>, String> {
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
    let base_blocks = base_len / BLOCK;
    let literal = &patch[8 + 4 * n..];
    let (mut ops, mut made, mut new_at) = (Vec::with_capacity(n), 0usize, 0usize);
    let mut i = 0;
    while i < n {
        let tag = u32_at(8 + 4 * i).expect("inside the list");
        if tag & COPY != 0 {
            let count = (tag & !COPY) as usize;
            let Some(first) = u32_at(8 + 4 * (i + 1)).filter(|_| i + 1 < n).map(|f| f as usize) else {
                return Err(format!("operation {i} of the delta has no base block"));
            };
            if count == 0 || first + count > base_blocks || made + count * BLOCK > raw_len {
                return Err(format!(
                    "operation {i} of the delta takes {count} blocks from block {first} of a base of {base_blocks}"
                ));
            }
            ops.push((made, count * BLOCK, Source::Base { at: first * BLOCK }));
            made += count * BLOCK;
            i += 2;
        } else {
            let len = tag as usize;
            if len == 0 || len > literal.len() - new_at || made + len > raw_len {
                return Err(format!("operation {i} of the delta takes {len} new bytes that are not there"));
            }
            ops.push((made, len, Source::New { at: new_at }));
            made += len;
            new_at += len;
            i += 1;
        }
    }
    if made != raw_len {
        return Err(format!("the delta makes {made} bytes, not {raw_len}"));
    }
    if new_at != literal.len() {
        return Err(format!("{} bytes follow the delta's last operation", literal.len() - new_at));
    }
    Ok(Parsed { ops, literal })
}

/// Makes the content a chain of deltas describes from the whole chunk
/// `base` at its foot: `links` are the patches and the lengths they make,
/// from the one on `base` up to the chunk asked for. The same bytes as
/// [`apply`] link after link, made in one pass: each range of the chunk is
/// taken from where it finally comes from (a patch's new bytes or the
/// base), so no link's content is made on the way.
pub fn apply_chain(base: &[u8], links: &[(&[u8], usize)]) -> Result<Vec<u8>, String> {
    let mut out = vec![0; links.last().map_or(base.len(), |l| l.1)];
    apply_chain_into(base, links, &mut out)?;
    Ok(out)
}

/// [`apply_chain`] into `out`, which must be as long as the content the
/// chain makes.
pub fn apply_chain_into(base: &[u8], links: &[(&[u8], usize)], out: &mut [u8]) -> Result<(), String> {
    let mut parsed = Vec::with_capacity(links.len());
    let mut below = base.len();
    for (i, &(patch, raw_len)) in links.iter().enumerate() {
        parsed.push(parse(patch, raw_len, below).map_err(|why| format!("link {} of the chain: {why}", i + 1))?);
        below = raw_len;
    }
    if out.len() != below {
        return Err(format!("the chain makes {below} bytes, not {}", out.len()));
    }
    emit(base, &parsed, 0, out);
    Ok(())
}

/// Fills `out` with bytes `start..start + out.len()` of the content the
/// first `parsed.len()` links make (the base itself for none). Ranges were
/// checked when parsed.
fn emit(base: &[u8], parsed: &[Parsed], start: usize, out: &mut [u8]) {
    let Some((top, lower)) = parsed.split_last() else {
        out.copy_from_slice(&base[start..start + out.len()]);
        return;
    };
    let end = start + out.len();
    let first = top.ops.partition_point(|&(at, n, _)| at + n <= start);
    for &(at, n, src) in top.ops[first..].iter().take_while(|(at, ..)| *at < end) {
        let (from, to) = (start.max(at), end.min(at + n));
        let piece = &mut out[from - start..to - start];
        match src {
            Source::New { at: lit } => piece.copy_from_slice(&top.literal[lit + from - at..lit + to - at]),
            Source::Base { at: b } => emit(base, lower, b + from - at, piece),
        }
    }
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
    fn a_chain_made_in_one_pass_is_the_chain_applied_link_by_link() {
        let mut rng = crate::testutil::Rng::seeded(9);
        for round in 0..40 {
            let tail = rng.below(3) as usize * 700;
            let base = rng.bytes(64 * BLOCK + tail);
            let (mut contents, mut patches) = (vec![base.clone()], Vec::new());
            for _ in 0..1 + rng.below(8) {
                let mut next = contents.last().unwrap().clone();
                for _ in 0..1 + rng.below(6) {
                    let (at, n) = (rng.below(next.len() as u64) as usize, 1 + rng.below(9000) as usize);
                    let end = (at + n).min(next.len());
                    let new = rng.bytes(end - at);
                    next[at..end].copy_from_slice(&new);
                }
                if rng.below(3) == 0 {
                    // Moved by a sector, or cut shorter.
                    next = if rng.below(2) == 0 { next[512..].to_vec() } else { next[..next.len() - 3000].to_vec() };
                }
                let Some(p) = encode(contents.last().unwrap(), &next) else { break };
                patches.push(p);
                contents.push(next);
            }
            let link_by_link = |links: &[(&[u8], usize)]| {
                links.iter().try_fold(base.clone(), |content, &(patch, len)| apply(&content, patch, len))
            };
            let links: Vec<(&[u8], usize)> =
                patches.iter().zip(&contents[1..]).map(|(p, c)| (p.as_slice(), c.len())).collect();
            assert_eq!(apply_chain(&base, &links).unwrap(), *contents.last().unwrap(), "round {round}");
            // Damage anywhere in any link: what applying link by link
            // makes, or an error where it errs too; never a panic. (Bytes
            // of a lower link that a later one replaces do not show.)
            for _ in 0..20 {
                let mut broken: Vec<Vec<u8>> = patches.clone();
                let l = rng.below(broken.len() as u64) as usize;
                let at = rng.below(broken[l].len().min(200) as u64) as usize;
                broken[l][at] ^= 1 << rng.below(8);
                let links: Vec<(&[u8], usize)> =
                    broken.iter().zip(&contents[1..]).map(|(p, c)| (p.as_slice(), c.len())).collect();
                let (one_pass, stepwise) = (apply_chain(&base, &links), link_by_link(&links));
                assert_eq!(one_pass.is_ok(), stepwise.is_ok(), "round {round}: a flip in link {l} at {at}");
                assert!(one_pass.ok() == stepwise.ok(), "round {round}: a flip in link {l} at {at}");
            }
        }
        assert_eq!(apply_chain(b"abc", &[]).unwrap(), b"abc");
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
