//! Where each chunk of a repository is: every pack's index, loaded into
//! one table sorted by chunk id (64 bytes a chunk, a delta's base named by
//! its place in the table), looked up through the top 16 bits of the id.

use super::MAX_DELTA_DEPTH;
use super::pack::{BlobEntry, ChunkId, PackIndex};
use crate::error::{Error, Result};

/// A slot's `base` when the chunk is stored whole.
const WHOLE: u32 = u32::MAX;
/// `base` values from this one on name a base no pack holds (in
/// `BlobIndex::absent`); below it, the base's slot.
const ABSENT: u32 = 1 << 31;
/// Lookups start in one of this many buckets of the table, by the first
/// 16 bits of the id (blake3 ids spread evenly over them).
const BUCKETS: usize = 1 << 16;

/// One chunk: where it is and how it is stored.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: ChunkId,
    offset: u64,
    pack: u32,
    stored_len: u32,
    raw_len: u32,
    payload_crc: u32,
    flags: u32,
    /// [`WHOLE`], the base's slot, or [`ABSENT`] + its place in `absent`
    /// (while building: its place in the builder's `bases`).
    base: u32,
}

/// How a chunk of the index is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base<'a> {
    /// Whole.
    Whole,
    /// As changes to the chunk at this place of the index.
    At(usize),
    /// As changes to this chunk, which no pack holds.
    Absent(&'a ChunkId),
}

/// A pack, as its index describes it.
#[derive(Debug, Clone)]
pub struct PackInfo {
    /// Its name (64 hex digits).
    pub name: String,
    /// The pack file's size.
    pub size: u64,
    /// How many records it holds (copies of chunks reads take from
    /// another pack included).
    pub chunks: u32,
}

/// Every chunk of a repository's packs: one entry a chunk id, sorted.
#[derive(Debug, Default)]
pub struct BlobIndex {
    /// The packs, by number.
    pub packs: Vec<PackInfo>,
    slots: Vec<Slot>,
    /// Copies of chunks that reads take from another pack.
    spare: Vec<Slot>,
    absent: Vec<ChunkId>,
    /// `buckets[b]`: the first slot whose id's first 16 bits are ≥ b.
    buckets: Vec<u32>,
}

impl BlobIndex {
    /// The blobs of these packs' indexes (see [`BlobIndexBuilder`]).
    pub fn of(indexes: &[PackIndex]) -> Result<BlobIndex> {
        let mut b = BlobIndexBuilder::with_capacity(indexes.iter().map(|i| i.entries.len()).sum());
        for idx in indexes {
            b.add(idx)?;
        }
        Ok(b.finish())
    }

    /// How many chunks.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no pack holds a chunk.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The place of chunk `id` in the index (0 to `len() - 1`).
    pub fn position(&self, id: &ChunkId) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let b = usize::from(u16::from_be_bytes([id[0], id[1]]));
        let (from, to) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        self.slots[from..to].binary_search_by(|s| s.id.cmp(id)).ok().map(|i| from + i)
    }

    /// Whether a pack holds chunk `id`.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.position(id).is_some()
    }

    /// Where chunk `id` is: its pack's name and its entry.
    pub fn get(&self, id: &ChunkId) -> Option<(&str, BlobEntry)> {
        self.position(id).map(|p| (self.packs[self.slots[p].pack as usize].name.as_str(), self.entry_at(p)))
    }

    /// The number of the pack chunk `id` is read from.
    pub fn pack_of(&self, id: &ChunkId) -> Option<u32> {
        self.position(id).map(|p| self.slots[p].pack)
    }

    /// The id of the chunk at place `pos`.
    pub fn id_at(&self, pos: usize) -> &ChunkId {
        &self.slots[pos].id
    }

    /// The number of the pack the chunk at place `pos` is read from.
    pub fn pack_at(&self, pos: usize) -> u32 {
        self.slots[pos].pack
    }

    /// The entry of the chunk at place `pos`, as its pack's index has it.
    pub fn entry_at(&self, pos: usize) -> BlobEntry {
        self.entry_of(&self.slots[pos])
    }

    /// The copies of chunks that reads take from another pack (a prune
    /// cut short, or a chunk stored again because its delta's base was
    /// gone): each one's pack number and entry.
    pub fn spares(&self) -> impl Iterator<Item = (u32, BlobEntry)> + '_ {
        self.spare.iter().map(|s| (s.pack, self.entry_of(s)))
    }

    fn entry_of(&self, s: &Slot) -> BlobEntry {
        BlobEntry {
            id: s.id,
            offset: s.offset,
            stored_len: s.stored_len,
            raw_len: s.raw_len,
            payload_crc: s.payload_crc,
            flags: s.flags,
            base: match self.base_of(s) {
                Base::Whole => None,
                Base::At(b) => Some(self.slots[b].id),
                Base::Absent(b) => Some(*b),
            },
        }
    }

    /// How the chunk at place `pos` is stored.
    pub fn base_at(&self, pos: usize) -> Base<'_> {
        self.base_of(&self.slots[pos])
    }

    fn base_of(&self, s: &Slot) -> Base<'_> {
        match s.base {
            WHOLE => Base::Whole,
            b if b < ABSENT => Base::At(b as usize),
            b => Base::Absent(&self.absent[(b - ABSENT) as usize]),
        }
    }

    /// Whether chunk `id` can be read: it is in a pack, and when it is a
    /// delta its chain of bases is there, ending in a whole chunk within
    /// [`MAX_DELTA_DEPTH`] deltas. A prune removes a base no snapshot
    /// needs while an unused delta of it may stay in a pack it keeps: a
    /// backup must not reuse that delta.
    pub fn usable(&self, id: &ChunkId) -> bool {
        self.depth(id).is_some()
    }

    /// How many deltas lead from chunk `id` to the whole chunk its chain of
    /// bases ends in (0 for a whole chunk); None when a link is missing or
    /// the chain is longer than [`MAX_DELTA_DEPTH`] (a loop included).
    pub fn depth(&self, id: &ChunkId) -> Option<usize> {
        self.depth_at(self.position(id)?)
    }

    /// [`BlobIndex::depth`] of the chunk at place `pos`.
    pub fn depth_at(&self, pos: usize) -> Option<usize> {
        let mut at = pos;
        for depth in 0..=MAX_DELTA_DEPTH {
            match self.base_at(at) {
                Base::Whole => return Some(depth),
                Base::At(b) => at = b,
                Base::Absent(_) => return None,
            }
        }
        None
    }

    /// Chunk `id`, then its base, its base's base…: the chain reads follow
    /// (at most [`MAX_DELTA_DEPTH`] + 1 chunks; it stops at a missing one).
    pub fn chain(&self, id: &ChunkId) -> Vec<ChunkId> {
        let mut chain = vec![*id];
        let mut at = self.position(id);
        while let Some(pos) = at.filter(|_| chain.len() <= MAX_DELTA_DEPTH) {
            at = match self.base_at(pos) {
                Base::Whole => None,
                Base::At(b) => {
                    chain.push(self.slots[b].id);
                    Some(b)
                }
                Base::Absent(b) => {
                    chain.push(*b);
                    None
                }
            };
        }
        chain
    }

    /// The places of the chunks down the chain of bases of the chunk at
    /// place `pos`, not counting it (at most [`MAX_DELTA_DEPTH`] + 1; it
    /// stops at a missing one).
    pub fn bases_at(&self, pos: usize) -> impl Iterator<Item = usize> + '_ {
        let mut at = pos;
        let mut left = MAX_DELTA_DEPTH + 1;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            match self.base_at(at) {
                Base::At(b) => {
                    at = b;
                    Some(b)
                }
                _ => None,
            }
        })
    }

    /// Whether reads take chunk `e` from pack number `pack` (and not
    /// another copy of it).
    pub fn reads_from(&self, pack: usize, e: &BlobEntry) -> bool {
        self.position(&e.id).is_some_and(|p| self.slots[p].pack as usize == pack && self.slots[p].offset == e.offset)
    }
}

/// Builds a [`BlobIndex`] one pack index at a time, so that a caller need
/// not hold every pack index with it. A chunk in more than one pack (a
/// prune cut short, or a chunk stored again because its delta's base was
/// gone) is taken from the first pack that has it readable: whole, or a
/// delta whose chain of bases is.
pub struct BlobIndexBuilder {
    packs: Vec<PackInfo>,
    slots: Vec<Slot>,
    /// The bases of the deltas added so far, named by slots' `base`.
    bases: Vec<ChunkId>,
}

impl BlobIndexBuilder {
    /// A builder with room for `chunks` entries (no regrowing as it fills).
    pub fn with_capacity(chunks: usize) -> BlobIndexBuilder {
        BlobIndexBuilder { packs: Vec::new(), slots: Vec::with_capacity(chunks), bases: Vec::new() }
    }

    /// Adds the next pack's index.
    pub fn add(&mut self, idx: &PackIndex) -> Result<()> {
        if self.slots.len() + idx.entries.len() >= ABSENT as usize || self.packs.len() >= u32::MAX as usize {
            return Err(Error::Corrupt(format!(
                "pack index {}: with it the repository would hold more than {ABSENT} chunks, more than klon \
                 reads: the pack indexes are damaged (run klon check)",
                idx.name
            )));
        }
        let pack = self.packs.len() as u32;
        for e in &idx.entries {
            let base = match e.base {
                None => WHOLE,
                Some(b) => {
                    self.bases.push(b);
                    (self.bases.len() - 1) as u32
                }
            };
            self.slots.push(Slot {
                id: e.id,
                offset: e.offset,
                pack,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                payload_crc: e.payload_crc,
                flags: e.flags,
                base,
            });
        }
        self.packs.push(PackInfo { name: idx.name.clone(), size: idx.pack_size, chunks: idx.entries.len() as u32 });
        Ok(())
    }

    /// The index, each chunk in more than one pack taken from the first
    /// that has it readable.
    pub fn finish(self) -> BlobIndex {
        let BlobIndexBuilder { packs, mut slots, bases } = self;
        slots.sort_unstable_by(|a, b| a.id.cmp(&b.id).then(a.pack.cmp(&b.pack)).then(a.offset.cmp(&b.offset)));
        // The first copy of each chunk stays in the table; later ones wait.
        let mut others = Vec::new();
        let mut kept = 0;
        for i in 0..slots.len() {
            if kept > 0 && slots[kept - 1].id == slots[i].id {
                others.push(slots[i]);
            } else {
                slots[kept] = slots[i];
                kept += 1;
            }
        }
        slots.truncate(kept);
        let mut buckets = vec![0u32; BUCKETS + 1];
        let mut at = 0;
        for (b, start) in buckets.iter_mut().enumerate() {
            while at < slots.len() && usize::from(u16::from_be_bytes([slots[at].id[0], slots[at].id[1]])) < b {
                at += 1;
            }
            *start = at as u32;
        }
        let mut index = BlobIndex { packs, slots, spare: Vec::new(), absent: Vec::new(), buckets };
        // Each delta's base by its place in the table.
        let resolve = |base: u32, index: &mut BlobIndex| -> u32 {
            if base == WHOLE {
                return WHOLE;
            }
            let id = &bases[base as usize];
            match index.position(id) {
                Some(p) => p as u32,
                None => {
                    index.absent.push(*id);
                    ABSENT + (index.absent.len() - 1) as u32
                }
            }
        };
        for i in 0..index.slots.len() {
            index.slots[i].base = resolve(index.slots[i].base, &mut index);
        }
        for o in &mut others {
            o.base = resolve(o.base, &mut index);
        }
        drop(bases);
        // Whole copies first (they make bases usable), then deltas, as
        // long as one more becomes readable.
        others.sort_by_key(|o| o.base != WHOLE);
        loop {
            let before = others.len();
            others.retain(|o| {
                let pos = index.position(&o.id).expect("a later copy of a chunk in the table");
                let readable = match o.base {
                    WHOLE => true,
                    b if b < ABSENT => index.depth_at(b as usize).is_some_and(|d| d < MAX_DELTA_DEPTH),
                    _ => false,
                };
                if index.depth_at(pos).is_none() && readable {
                    let replaced = std::mem::replace(&mut index.slots[pos], *o);
                    index.spare.push(replaced);
                    return false;
                }
                true
            });
            if others.len() == before {
                break;
            }
        }
        index.spare.extend(others);
        index
    }
}

/// One bit for each chunk of a [`BlobIndex`].
pub struct Bits(Vec<u64>);

impl Bits {
    /// `n` bits, all clear.
    pub fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// Bit `i`.
    pub fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(id: u8, base: Option<u8>) -> BlobEntry {
        BlobEntry {
            id: [id; 32],
            offset: 0,
            stored_len: 40,
            raw_len: 4096,
            payload_crc: 0,
            flags: if base.is_some() { super::super::pack::FLAG_DELTA } else { 0 },
            base: base.map(|b| [b; 32]),
        }
    }

    fn index(packs: &[&[BlobEntry]]) -> BlobIndex {
        let indexes: Vec<PackIndex> = packs
            .iter()
            .enumerate()
            .map(|(n, e)| PackIndex { name: format!("{n:064}"), pack_size: 0, entries: e.to_vec() })
            .collect();
        BlobIndex::of(&indexes).unwrap()
    }

    #[test]
    fn every_chunk_is_found_at_its_place_and_none_other() {
        let mut ids: Vec<ChunkId> = (0..5000u32).map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes()).collect();
        // Ids at the edges of the buckets too.
        ids.push([0; 32]);
        ids.push([0xff; 32]);
        let entries: Vec<BlobEntry> =
            ids.iter().enumerate().map(|(i, id)| BlobEntry { id: *id, offset: i as u64, ..blob(0, None) }).collect();
        let idx = PackIndex { name: "p".into(), pack_size: 1, entries };
        let index = BlobIndex::of(&[idx]).unwrap();
        assert_eq!(index.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            let (pack, e) = index.get(id).unwrap();
            assert_eq!((pack, e.offset), ("p", i as u64));
        }
        for i in 5000..6000u32 {
            assert!(!index.contains(blake3::hash(&i.to_le_bytes()).as_bytes()));
        }
        assert!(!BlobIndex::default().contains(&[0; 32]));
    }

    #[test]
    fn an_entry_reads_back_as_its_pack_index_has_it() {
        let whole = BlobEntry { payload_crc: 7, flags: 1, stored_len: 3, raw_len: 9, ..blob(1, None) };
        let delta = blob(2, Some(1));
        let orphan = blob(3, Some(4));
        let idx = PackIndex { name: "p".into(), pack_size: 1, entries: vec![whole, delta, orphan] };
        let index = BlobIndex::of(&[idx]).unwrap();
        for e in [whole, delta, orphan] {
            assert_eq!(index.get(&e.id).unwrap().1, e);
        }
        assert_eq!(index.base_at(index.position(&[3; 32]).unwrap()), Base::Absent(&[4; 32]));
        let two = index.position(&[2; 32]).unwrap();
        assert_eq!(index.bases_at(two).collect::<Vec<_>>(), vec![index.position(&[1; 32]).unwrap()]);
    }

    #[test]
    fn a_chain_is_readable_up_to_the_deepest_allowed_and_no_further() {
        // 1 is whole; 2 is a delta of 1, 3 of 2, … 12 of 11.
        let chain: Vec<BlobEntry> =
            std::iter::once(blob(1, None)).chain((2..=12).map(|i| blob(i, Some(i - 1)))).collect();
        let idx = index(&[&chain]);
        assert_eq!(idx.depth(&[1; 32]), Some(0));
        assert_eq!(idx.depth(&[9; 32]), Some(MAX_DELTA_DEPTH));
        assert_eq!(idx.depth(&[10; 32]), None, "9 deltas deep");
        assert!(idx.usable(&[9; 32]) && !idx.usable(&[10; 32]));
        assert_eq!(idx.chain(&[3; 32]), vec![[3; 32], [2; 32], [1; 32]]);
        assert_eq!(idx.chain(&[12; 32]).len(), MAX_DELTA_DEPTH + 1, "a chain read stops");
    }

    #[test]
    fn bases_that_loop_or_are_missing_make_no_chunk_readable() {
        let idx = index(&[&[blob(1, Some(2)), blob(2, Some(1)), blob(3, Some(3)), blob(4, Some(5)), blob(6, Some(4))]]);
        for id in [1, 2, 3, 4, 6] {
            assert_eq!(idx.depth(&[id; 32]), None, "chunk {id}");
        }
        assert_eq!(idx.chain(&[6; 32]), vec![[6; 32], [4; 32], [5; 32]], "up to the missing one");
        assert_eq!(idx.chain(&[1; 32]).len(), MAX_DELTA_DEPTH + 1);
    }

    #[test]
    fn a_chunk_in_two_packs_is_read_from_the_copy_whose_chain_is_whole() {
        // Pack 0: 3 as a delta of 2, whose base 1 is gone; 4 a delta of 3.
        // Pack 1: 3 again, whole. Pack 2: 2 whole (after 3's copy is seen).
        let idx = index(&[&[blob(3, Some(2)), blob(4, Some(3))], &[blob(3, None)], &[blob(2, Some(1))]]);
        assert_eq!(idx.pack_of(&[3; 32]), Some(1), "the whole copy");
        let spares: Vec<(u32, BlobEntry)> = idx.spares().collect();
        assert_eq!(spares, vec![(0, blob(3, Some(2)))], "the copy reads do not take");
        assert_eq!(idx.depth(&[4; 32]), Some(1));
        assert!(!idx.usable(&[2; 32]));
    }
}
