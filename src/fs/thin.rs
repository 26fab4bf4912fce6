//! The metadata of a device-mapper thin pool (what LVM2 keeps in a thin
//! pool's `_tmeta` volume), read without device-mapper: the superblock,
//! the device details tree and the two-level mapping tree, every block's
//! checksum checked. What it gives: for each thin device, which of its
//! virtual blocks are mapped to which data blocks of the pool.
//!
//! Layout facts (from the kernel's dm-thin-metadata and persistent-data
//! and from thin-provisioning-tools; the code is klon's own): metadata
//! blocks are 4 KiB; block 0 is the superblock; each block starts with a
//! CRC-32C of the rest of the block, inverted and XORed with a constant
//! for the block's kind. B-tree nodes have a 32-byte header (checksum,
//! flags 1 internal / 2 leaf, own block number, entries, most entries,
//! value size), then the keys (u64), then the values. The top mapping
//! tree maps a device id to the root of the device's tree, which maps a
//! virtual block to (data block << 24 | time). The details tree maps a
//! device id to (mapped blocks u64, transaction u64, creation time u32,
//! snapshot time u32).

use std::collections::BTreeMap;

use super::{FsError, Volume};
use crate::le::{le32, le64};

/// Bytes a metadata block.
const BLOCK: u64 = 4096;
/// The superblock's magic number.
const MAGIC: u64 = 27_022_010;
/// What each kind of block XORs into its checksum.
const SUPERBLOCK_XOR: u32 = 160_774;
const NODE_XOR: u32 = 121_107;
/// Node flags.
const INTERNAL: u32 = 1;
const LEAF: u32 = 2;
/// Bytes of a node's header.
const NODE_HEADER: usize = 32;
/// Deepest B-tree klon walks (a tree of 4 KiB nodes over 2^64 keys is
/// far shallower).
const MAX_DEPTH: usize = 16;
/// Superblock flag: the kernel found a problem and wants thin_check run.
const NEEDS_CHECK: u32 = 1;

/// A thin pool's metadata as its superblock and trees give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPool {
    /// Bytes of a data block (the pool's chunk size).
    pub data_block_size: u64,
    /// Data blocks the pool has.
    pub data_blocks: u64,
    /// The transaction id of the metadata.
    pub transaction_id: u64,
    /// Each thin device, by id.
    pub devices: BTreeMap<u64, ThinDevice>,
}

/// One thin device (a thin volume or a thin snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ThinDevice {
    /// Its mapped blocks as runs (first virtual block, first data block,
    /// blocks), by virtual block.
    pub runs: Vec<(u64, u64, u64)>,
    /// Blocks mapped (the runs' sum, equal to the details' count).
    pub mapped_blocks: u64,
}

/// Reads the pool's metadata from `meta` (the metadata volume). Every
/// failed check is `FsError::Corrupt` saying what and where.
pub fn read(meta: &Volume) -> Result<ThinPool, FsError> {
    let sb = block(meta, 0, SUPERBLOCK_XOR, "the superblock")?;
    let bad = |why: String| Err(FsError::Corrupt(format!("thin pool metadata superblock: {why}")));
    // Offsets: 4 flags, 8 its own block number, 16 UUID, 32 magic, 40
    // version, 44 time, 48 transaction id, 56 metadata snapshot, 64 the
    // data space map's root (its first u64: the data blocks), 192 the
    // metadata space map's, 320 the mapping root, 328 the details root,
    // 336 the data block size and 340 the metadata block size (sectors),
    // 344 the metadata blocks, 352 compat, 356 compat_ro and 360
    // incompat feature flags.
    if le64(&sb, 8) != 0 {
        return bad(format!("it says it is block {}", le64(&sb, 8)));
    }
    if le64(&sb, 32) != MAGIC {
        return bad("no thin pool magic number".into());
    }
    if le32(&sb, 4) & NEEDS_CHECK != 0 {
        return bad("it is marked as needing a check (run thin_check, then thin_repair if it fails)".into());
    }
    let version = le32(&sb, 40);
    if !(1..=2).contains(&version) {
        return bad(format!("version {version} is not one klon reads"));
    }
    if le32(&sb, 360) != 0 {
        return bad(format!("incompatible features {:#x} that klon does not know", le32(&sb, 360)));
    }
    let transaction_id = le64(&sb, 48);
    let data_blocks = le64(&sb, 64);
    let (mapping_root, details_root) = (le64(&sb, 320), le64(&sb, 328));
    let data_block_sectors = le32(&sb, 336);
    if le32(&sb, 340) as u64 * 512 != BLOCK {
        return bad(format!("metadata blocks of {} sectors, not 8", le32(&sb, 340)));
    }
    // dm-thin takes data blocks of 64 KiB to 1 GiB, a multiple of 64 KiB.
    if !(128..=2_097_152).contains(&data_block_sectors) || !data_block_sectors.is_multiple_of(128) {
        return bad(format!("a data block of {data_block_sectors} sectors is not one dm-thin makes"));
    }
    let data_block_size = data_block_sectors as u64 * 512;
    let metadata_blocks = le64(&sb, 344).min(meta.len / BLOCK);
    let tree = Tree { meta, blocks: metadata_blocks };

    let mut details = BTreeMap::new();
    tree.walk(details_root, 24, "the device details tree", &mut |dev, v| {
        details.insert(dev, le64(v, 0));
        Ok(())
    })?;
    let mut roots = BTreeMap::new();
    tree.walk(mapping_root, 8, "the mapping tree", &mut |dev, v| {
        roots.insert(dev, le64(v, 0));
        Ok(())
    })?;
    if details.keys().ne(roots.keys()) {
        return Err(FsError::Corrupt(format!(
            "thin pool metadata: the devices with details ({:?}) are not those with mappings ({:?})",
            details.keys().collect::<Vec<_>>(),
            roots.keys().collect::<Vec<_>>()
        )));
    }
    let mut devices = BTreeMap::new();
    for (&dev, &root) in &roots {
        let expected = details[&dev];
        let mut d = ThinDevice::default();
        let what = format!("the mappings of thin device {dev}");
        tree.walk(root, 8, &what, &mut |virt, v| {
            let data = le64(v, 0) >> 24;
            if data >= data_blocks {
                return Err(format!("virtual block {virt} maps to data block {data}, past the pool's {data_blocks}"));
            }
            d.mapped_blocks += 1;
            if d.mapped_blocks > expected {
                return Err(format!("more mappings than the {expected} its details count"));
            }
            match d.runs.last_mut() {
                Some((v0, d0, n)) if *v0 + *n == virt && *d0 + *n == data => *n += 1,
                _ => d.runs.push((virt, data, 1)),
            }
            Ok(())
        })?;
        if d.mapped_blocks != expected {
            return Err(FsError::Corrupt(format!(
                "thin pool metadata: thin device {dev} has {} mappings where its details count {expected}",
                d.mapped_blocks
            )));
        }
        devices.insert(dev, d);
    }
    Ok(ThinPool { data_block_size, data_blocks, transaction_id, devices })
}

/// Reads metadata block `n` and checks its checksum.
fn block(meta: &Volume, n: u64, xor: u32, what: &str) -> Result<Vec<u8>, FsError> {
    let b = meta.read_vec(n * BLOCK, BLOCK)?;
    let sum = !super::crc32c::crc32c(&b[4..]) ^ xor;
    if le32(&b, 0) != sum {
        return Err(FsError::Corrupt(format!("thin pool metadata: {what} (block {n}) fails its checksum")));
    }
    Ok(b)
}

/// What a walk calls with each leaf entry (key, value); its error is
/// what is wrong with the entry.
type LeafFn<'f> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'f;

/// The metadata's B-trees.
struct Tree<'a, 'b> {
    meta: &'a Volume<'b>,
    /// Metadata blocks: a node number at or past this is corrupt.
    blocks: u64,
}

impl Tree<'_, '_> {
    /// Calls `leaf` with each (key, value) of the tree at `root`, in key
    /// order, checking each node on the way: its checksum, number, kind,
    /// counts, value size, and keys rising within what its parent allows.
    /// `leaf`'s error is reported with `what`.
    fn walk(&self, root: u64, value_size: usize, what: &str, leaf: &mut LeafFn) -> Result<(), FsError> {
        self.node(root, value_size, what, 0, (0, u64::MAX), leaf)
    }

    fn node(
        &self,
        n: u64,
        value_size: usize,
        what: &str,
        depth: usize,
        (low, high): (u64, u64),
        leaf: &mut LeafFn,
    ) -> Result<(), FsError> {
        let bad = |why: String| Err(FsError::Corrupt(format!("thin pool metadata: {what}, node at block {n}: {why}")));
        if depth >= MAX_DEPTH {
            return bad(format!("deeper than {MAX_DEPTH} levels"));
        }
        if n == 0 || n >= self.blocks {
            return bad(format!("outside the metadata's {} blocks", self.blocks));
        }
        let b = block(self.meta, n, NODE_XOR, what)?;
        let (flags, number) = (le32(&b, 4), le64(&b, 8));
        let (entries, max, size) = (le32(&b, 16) as usize, le32(&b, 20) as usize, le32(&b, 24) as usize);
        if number != n {
            return bad(format!("it says it is block {number}"));
        }
        let want_size = match flags {
            LEAF => value_size,
            INTERNAL => 8,
            _ => return bad(format!("flags {flags:#x} are neither internal nor leaf")),
        };
        if size != want_size {
            return bad(format!("values of {size} bytes where {want_size} belong"));
        }
        if entries > max || NODE_HEADER + max * (8 + size) > BLOCK as usize {
            return bad(format!("{entries} of at most {max} entries do not fit a node"));
        }
        // Only a root may be empty. (A child's keys must lie in its slot's
        // range, and the ranges of a node's slots do not overlap: so no
        // node is reached through two slots, and a forged tree costs at
        // most its blocks to walk; a node that names itself ends at the
        // depth limit.)
        if entries == 0 && depth > 0 {
            return bad("an empty node below the root".into());
        }
        if entries == 0 && flags == INTERNAL {
            return bad("an empty internal node".into());
        }
        let key = |i: usize| le64(&b, NODE_HEADER + i * 8);
        let value = |i: usize| &b[NODE_HEADER + max * 8 + i * size..NODE_HEADER + max * 8 + (i + 1) * size];
        for i in 0..entries {
            let k = key(i);
            if k < low || k > high || (i > 0 && k <= key(i - 1)) {
                return bad(format!("key {k} is out of order (or outside {low}..={high})"));
            }
        }
        for i in 0..entries {
            if flags == LEAF {
                leaf(key(i), value(i))
                    .map_err(|why| FsError::Corrupt(format!("thin pool metadata: {what}, key {}: {why}", key(i))))?;
            } else {
                // A child holds keys from its own key up to the next's.
                let upper = if i + 1 < entries { key(i + 1) - 1 } else { high };
                self.node(le64(value(i), 0), value_size, what, depth + 1, (key(i), upper), leaf)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Disk;

    /// Puts `b`'s checksum in place for its kind.
    fn seal(b: &mut [u8], xor: u32) {
        let sum = !crate::fs::crc32c::crc32c(&b[4..]) ^ xor;
        b[..4].copy_from_slice(&sum.to_le_bytes());
    }

    /// A leaf node at block `n` with `entries` (key, value bytes).
    fn leaf(n: u64, value_size: usize, entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        let max = (BLOCK as usize - NODE_HEADER) / (8 + value_size) / 3 * 3;
        b[4..8].copy_from_slice(&LEAF.to_le_bytes());
        b[8..16].copy_from_slice(&n.to_le_bytes());
        b[16..20].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
        b[24..28].copy_from_slice(&(value_size as u32).to_le_bytes());
        for (i, (k, v)) in entries.iter().enumerate() {
            b[NODE_HEADER + i * 8..NODE_HEADER + i * 8 + 8].copy_from_slice(&k.to_le_bytes());
            let at = NODE_HEADER + max * 8 + i * value_size;
            b[at..at + value_size].copy_from_slice(v);
        }
        seal(&mut b, NODE_XOR);
        b
    }

    /// Metadata of one device (id 7) mapping virtual blocks 0, 1, 5 to
    /// data blocks 3, 4, 9, as blocks: superblock, details, top mapping
    /// tree, the device's tree.
    fn metadata(mapped_in_details: u64, data_blocks: u64) -> Vec<Vec<u8>> {
        let mut sb = vec![0u8; BLOCK as usize];
        sb[32..40].copy_from_slice(&MAGIC.to_le_bytes());
        sb[40..44].copy_from_slice(&2u32.to_le_bytes());
        sb[48..56].copy_from_slice(&5u64.to_le_bytes());
        sb[64..72].copy_from_slice(&data_blocks.to_le_bytes());
        sb[320..328].copy_from_slice(&2u64.to_le_bytes());
        sb[328..336].copy_from_slice(&1u64.to_le_bytes());
        sb[336..340].copy_from_slice(&128u32.to_le_bytes());
        sb[340..344].copy_from_slice(&8u32.to_le_bytes());
        sb[344..352].copy_from_slice(&4u64.to_le_bytes());
        seal(&mut sb, SUPERBLOCK_XOR);
        let mut detail = vec![0u8; 24];
        detail[..8].copy_from_slice(&mapped_in_details.to_le_bytes());
        let bt = |d: u64| (d << 24 | 1).to_le_bytes().to_vec();
        vec![
            sb,
            leaf(1, 24, &[(7, detail)]),
            leaf(2, 8, &[(7, 3u64.to_le_bytes().to_vec())]),
            leaf(3, 8, &[(0, bt(3)), (1, bt(4)), (5, bt(9))]),
        ]
    }

    fn read_blocks(blocks: &[Vec<u8>]) -> Result<ThinPool, String> {
        let t = crate::testutil::TempDir::new("thin-meta");
        let path = t.join("meta");
        std::fs::write(&path, blocks.concat()).unwrap();
        let disk = Disk::open_read_only(&path).unwrap();
        read(&Volume::new(&disk, 0, disk.size)).map_err(|e| e.to_string())
    }

    #[test]
    fn mappings_are_read_as_runs_and_every_inconsistency_is_named() {
        let pool = read_blocks(&metadata(3, 16)).unwrap();
        assert_eq!((pool.data_block_size, pool.data_blocks, pool.transaction_id), (65536, 16, 5));
        assert_eq!(pool.devices[&7], ThinDevice { runs: vec![(0, 3, 2), (5, 9, 1)], mapped_blocks: 3 });

        let mut flipped = metadata(3, 16);
        flipped[3][100] ^= 1;
        assert!(read_blocks(&flipped).unwrap_err().contains("block 3) fails its checksum"));
        let e = read_blocks(&metadata(4, 16)).unwrap_err();
        assert!(e.contains("thin device 7 has 3 mappings where its details count 4"), "{e}");
        let e = read_blocks(&metadata(2, 16)).unwrap_err();
        assert!(e.contains("more mappings than the 2"), "{e}");
        let e = read_blocks(&metadata(3, 9)).unwrap_err();
        assert!(e.contains("maps to data block 9, past the pool's 9"), "{e}");
        // A needs_check flag, keys out of order, a node naming another
        // block, a loop of internal nodes.
        let mut m = metadata(3, 16);
        m[0][4] = 1;
        seal(&mut m[0], SUPERBLOCK_XOR);
        assert!(read_blocks(&m).unwrap_err().contains("needing a check"));
        let mut m = metadata(3, 16);
        let bt = |d: u64| (d << 24).to_le_bytes().to_vec();
        m[3] = leaf(3, 8, &[(1, bt(3)), (0, bt(4))]);
        assert!(read_blocks(&m).unwrap_err().contains("out of order"));
        let mut m = metadata(3, 16);
        m[3] = leaf(2, 8, &[(0, bt(3))]);
        assert!(read_blocks(&m).unwrap_err().contains("it says it is block 2"));
        let mut m = metadata(3, 16);
        let mut looped = leaf(3, 8, &[(0, 3u64.to_le_bytes().to_vec())]);
        looped[4..8].copy_from_slice(&INTERNAL.to_le_bytes());
        seal(&mut looped, NODE_XOR);
        m[3] = looped;
        assert!(read_blocks(&m).unwrap_err().contains("deeper than 16 levels"));
        // An internal root over an empty leaf.
        let mut m = metadata(0, 16);
        let mut root = leaf(3, 8, &[(0, 4u64.to_le_bytes().to_vec())]);
        root[4..8].copy_from_slice(&INTERNAL.to_le_bytes());
        seal(&mut root, NODE_XOR);
        m[3] = root;
        m.push(leaf(4, 8, &[]));
        m[0][344..352].copy_from_slice(&5u64.to_le_bytes());
        seal(&mut m[0], SUPERBLOCK_XOR);
        assert!(read_blocks(&m).unwrap_err().contains("an empty node below the root"));
    }
}
