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
        if entries > max || NODE_HEADER + max * (8 + size) > BLOCK as usize || (entries == 0 && flags == INTERNAL) {
            return bad(format!("{entries} of at most {max} entries do not fit a node"));
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

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
