//! btrfs: which bytes of a single-device btrfs partition are in use.
//!
//! What is copied:
//! - the first 1 MiB (btrfs never writes there; bootloaders may),
//! - the superblock and its mirrors (64 KiB, 64 MiB, 256 GiB) that lie
//!   within the partition,
//! - every extent the extent tree records (EXTENT_ITEM: data or tree
//!   blocks with their length; METADATA_ITEM: one tree block), mapped from
//!   logical to physical addresses through the chunk map, every copy of a
//!   DUP/RAID1 chunk,
//! - the tree blocks read on the way (chunk, root and extent trees).
//!
//! The chunk map is bootstrapped from the superblock's sys_chunk_array,
//! then read from the chunk tree. Every tree block read is checked: its
//! checksum (all four btrfs checksum types), fsid, bytenr, level, item
//! count and key order, and that a child's first key equals its parent's
//! pointer key. Tree walks visit each block at most once and are bounded
//! by level (at most 8) and a node budget.
//!
//! Counters: each block group item's used bytes must equal the extents
//! found in it, and their sum the superblock's bytes_used; both are kept
//! in the same transactions as the extent tree (btrfs check reports a
//! disagreement), so any difference is Corrupt.
//!
//! Not supported (Corrupt, so the partition is copied raw): filesystems on
//! several devices, striped profiles (RAID0/10/5/6), extent-tree-v2,
//! raid-stripe-tree and zoned filesystems. A log tree to replay is Unclean.

use std::collections::HashSet;

use super::Extent;
use super::{Driver, FsError, UsedMap, Volume, crc32c, normalize};

/// The btrfs used-block reader.
pub const DRIVER: Driver = Driver { fstypes: &["btrfs"], used_map };

const SUPER_OFFSETS: [u64; 3] = [64 << 10, 64 << 20, 256 << 30];
const SUPER_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
/// Bytes before the first superblock left to bootloaders; copied whole.
const BOOT_AREA: u64 = 1 << 20;

const CSUM_SIZE: usize = 32;
const HEADER_SIZE: usize = 101;
const KEY_SIZE: usize = 17;
const ITEM_SIZE: usize = KEY_SIZE + 8;
const KEY_PTR_SIZE: usize = KEY_SIZE + 16;
/// Highest tree level (btrfs has at most 8 levels, 0..=7).
const MAX_LEVEL: u8 = 7;

const ROOT_ITEM_KEY: u8 = 132;
const EXTENT_ITEM_KEY: u8 = 168;
const METADATA_ITEM_KEY: u8 = 169;
const CHUNK_ITEM_KEY: u8 = 228;
const BLOCK_GROUP_ITEM_KEY: u8 = 192;
const EXTENT_TREE_OBJECTID: u64 = 2;
const BLOCK_GROUP_TREE_OBJECTID: u64 = 11;
/// compat_ro: block group items in their own tree (objectid 11).
const COMPAT_RO_BLOCK_GROUP_TREE: u64 = 1 << 3;

const CHUNK_ITEM_SIZE: usize = 48;
const STRIPE_SIZE: usize = 32;

// Block group profile bits.
const BG_RAID0: u64 = 1 << 3;
const BG_RAID1: u64 = 1 << 4;
const BG_DUP: u64 = 1 << 5;
const BG_RAID10: u64 = 1 << 6;
const BG_RAID5: u64 = 1 << 7;
const BG_RAID6: u64 = 1 << 8;
const BG_RAID1C3: u64 = 1 << 9;
const BG_RAID1C4: u64 = 1 << 10;
const BG_MIRRORED: u64 = BG_RAID1 | BG_DUP | BG_RAID1C3 | BG_RAID1C4;
const BG_STRIPED: u64 = BG_RAID0 | BG_RAID10 | BG_RAID5 | BG_RAID6;

// Incompat features.
const INCOMPAT_METADATA_UUID: u64 = 1 << 10;
const INCOMPAT_ZONED: u64 = 1 << 12;
const INCOMPAT_EXTENT_TREE_V2: u64 = 1 << 13;
const INCOMPAT_RAID_STRIPE_TREE: u64 = 1 << 14;
const INCOMPAT_SIMPLE_QUOTA: u64 = 1 << 16;
/// Features that do not change where things are or how they are found:
/// mixed backref, default subvol, mixed groups, lzo, zstd, big metadata,
/// extended iref, raid56, skinny metadata, no holes, metadata uuid,
/// raid1c34, simple quota.
const INCOMPAT_KNOWN: u64 = 0x0fff | INCOMPAT_SIMPLE_QUOTA;

// Superblock flags (a seed device, 1 << 32, is complete in itself: fine).
const SUPER_FLAG_METADUMP: u64 = 1 << 33;
const SUPER_FLAG_METADUMP_V2: u64 = 1 << 34;
/// btrfstune operations in progress (fsid, metadata uuid, csum change).
const SUPER_FLAG_CHANGING: u64 = (1 << 35) | (1 << 36) | (1 << 38) | (1 << 44) | (1 << 45);

fn corrupt(msg: impl Into<String>) -> FsError {
    FsError::Corrupt(msg.into())
}

fn bytes(b: &[u8], off: usize, len: usize) -> Result<&[u8], FsError> {
    off.checked_add(len).and_then(|end| b.get(off..end)).ok_or_else(|| past(off, len))
}

fn past(off: usize, len: usize) -> FsError {
    corrupt(format!("btrfs structure at {off}..+{len} runs past its block"))
}

fn le16(b: &[u8], off: usize) -> Result<u16, FsError> {
    crate::le::get_le16(b, off).ok_or_else(|| past(off, 2))
}

fn le32(b: &[u8], off: usize) -> Result<u32, FsError> {
    crate::le::get_le32(b, off).ok_or_else(|| past(off, 4))
}

fn le64(b: &[u8], off: usize) -> Result<u64, FsError> {
    crate::le::get_le64(b, off).ok_or_else(|| past(off, 8))
}

/// A btrfs key: (objectid, type, offset), ordered in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    objectid: u64,
    ty: u8,
    offset: u64,
}

fn key_at(b: &[u8], off: usize) -> Result<Key, FsError> {
    Ok(Key { objectid: le64(b, off)?, ty: bytes(b, off + 8, 1)?[0], offset: le64(b, off + 9)? })
}

// ------------------------------------------------------------- checksums

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsumType {
    Crc32c,
    Xxhash64,
    Sha256,
    Blake2b,
}

impl CsumType {
    fn from_raw(v: u16) -> Result<CsumType, FsError> {
        Ok(match v {
            0 => CsumType::Crc32c,
            1 => CsumType::Xxhash64,
            2 => CsumType::Sha256,
            3 => CsumType::Blake2b,
            _ => return Err(corrupt(format!("btrfs superblock has unknown checksum type {v}"))),
        })
    }

    /// Checks the checksum at the start of `block` (a superblock or tree
    /// block): computed over everything after the 32-byte csum field.
    fn verify(self, block: &[u8]) -> bool {
        let (stored, data) = block.split_at(CSUM_SIZE);
        match self {
            CsumType::Crc32c => stored[..4] == crc32c::crc32c(data).to_le_bytes(),
            CsumType::Xxhash64 => stored[..8] == hashes::xxh64(data, 0).to_le_bytes(),
            CsumType::Sha256 => stored[..32] == hashes::sha256(data),
            CsumType::Blake2b => stored[..32] == hashes::blake2b_256(data),
        }
    }
}

// ------------------------------------------------------------- superblock

#[derive(Debug)]
struct Super {
    csum: CsumType,
    /// The fsid tree blocks carry (metadata_uuid when that feature is on).
    meta_fsid: [u8; 16],
    root: u64,
    root_level: u8,
    chunk_root: u64,
    chunk_root_level: u8,
    sectorsize: u32,
    nodesize: u32,
    devid: u64,
    dev_total: u64,
    /// Logical bytes in extents (the sum of the block groups' used bytes).
    bytes_used: u64,
    compat_ro: u64,
    sys_chunks: Vec<u8>,
}

fn read_super(vol: &Volume) -> Result<Super, FsError> {
    let off = SUPER_OFFSETS[0];
    if vol.len < off + SUPER_SIZE as u64 {
        return Err(corrupt("partition too small to hold a btrfs superblock"));
    }
    let sb = vol.read_vec(off, SUPER_SIZE as u64)?;
    if &sb[0x40..0x48] != MAGIC {
        return Err(corrupt("btrfs superblock magic missing"));
    }
    let csum = CsumType::from_raw(le16(&sb, 0xc4)?)?;
    if !csum.verify(&sb) {
        return Err(corrupt(format!("btrfs superblock checksum ({csum:?}) mismatch")));
    }
    if le64(&sb, 0x30)? != off {
        return Err(corrupt("btrfs superblock records a wrong position"));
    }
    let flags = le64(&sb, 0x38)?;
    if flags & (SUPER_FLAG_METADUMP | SUPER_FLAG_METADUMP_V2) != 0 {
        return Err(corrupt("this is a btrfs metadata dump (btrfs-image), not a filesystem"));
    }
    let num_devices = le64(&sb, 0x88)?;
    if num_devices > 1 {
        return Err(corrupt("multi-device btrfs is not supported: copied raw"));
    }
    if num_devices == 0 {
        return Err(corrupt("btrfs superblock says the filesystem has no devices"));
    }
    if flags & SUPER_FLAG_CHANGING != 0 {
        return Err(FsError::Unclean(format!(
            "btrfs superblock flags {flags:#x}: a btrfstune change (fsid, uuid or checksum) was interrupted; finish it with btrfstune"
        )));
    }
    if le64(&sb, 0x60)? != 0 {
        return Err(FsError::Unclean(
            "btrfs has a log tree to replay: mount it once read-write and unmount cleanly".into(),
        ));
    }
    let incompat = le64(&sb, 0xbc)?;
    for (bit, name) in [
        (INCOMPAT_ZONED, "zoned"),
        (INCOMPAT_EXTENT_TREE_V2, "extent-tree-v2"),
        (INCOMPAT_RAID_STRIPE_TREE, "raid-stripe-tree"),
    ] {
        if incompat & bit != 0 {
            return Err(corrupt(format!("btrfs feature {name} is not supported: copied raw")));
        }
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(corrupt(format!(
            "btrfs has unknown incompatible features {:#x}: copied raw",
            incompat & !INCOMPAT_KNOWN
        )));
    }
    let sectorsize = le32(&sb, 0x90)?;
    let nodesize = le32(&sb, 0x94)?;
    if !sectorsize.is_power_of_two() || !(4096..=65536).contains(&sectorsize) {
        return Err(corrupt(format!("btrfs sectorsize {sectorsize} is invalid")));
    }
    if !nodesize.is_power_of_two() || nodesize < sectorsize || nodesize > 65536 {
        return Err(corrupt(format!("btrfs nodesize {nodesize} is invalid")));
    }
    let mut fsid = [0u8; 16];
    fsid.copy_from_slice(&sb[0x20..0x30]);
    let mut meta_fsid = fsid;
    if incompat & INCOMPAT_METADATA_UUID != 0 {
        meta_fsid.copy_from_slice(&sb[0x23b..0x24b]);
    }
    // dev_item at 0xc9: devid, total_bytes, ...; its fsid at +82.
    let devid = le64(&sb, 0xc9)?;
    let dev_total = le64(&sb, 0xc9 + 8)?;
    if bytes(&sb, 0xc9 + 82, 16)? != meta_fsid {
        return Err(corrupt("btrfs device item belongs to another filesystem"));
    }
    if dev_total > vol.len {
        return Err(corrupt(format!("btrfs device size {dev_total} is larger than the partition ({})", vol.len)));
    }
    if dev_total < off + SUPER_SIZE as u64 {
        return Err(corrupt(format!("btrfs device size {dev_total} is too small")));
    }
    let sys_size = le32(&sb, 0xa0)? as usize;
    if sys_size > 2048 {
        return Err(corrupt(format!("btrfs sys_chunk_array size {sys_size} exceeds 2048")));
    }
    let sys_chunks = bytes(&sb, 0x32b, sys_size)?.to_vec();
    let root_level = sb[0xc6];
    let chunk_root_level = sb[0xc7];
    if root_level > MAX_LEVEL || chunk_root_level > MAX_LEVEL {
        return Err(corrupt("btrfs superblock has a tree level above 7"));
    }
    Ok(Super {
        csum,
        meta_fsid,
        root: le64(&sb, 0x50)?,
        root_level,
        chunk_root: le64(&sb, 0x58)?,
        chunk_root_level,
        sectorsize,
        nodesize,
        devid,
        dev_total,
        bytes_used: le64(&sb, 0x78)?,
        compat_ro: le64(&sb, 0xb4)?,
        sys_chunks,
    })
}

// ------------------------------------------------------------- chunk map

#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    logical: u64,
    length: u64,
    /// Physical start of each copy (all on this device).
    stripes: Vec<u64>,
}

/// Parses one chunk item (at `off` in `b`, at most `avail` bytes long);
/// returns it and its size in bytes.
fn parse_chunk(sb: &Super, logical: u64, b: &[u8], off: usize, avail: usize) -> Result<(Chunk, usize), FsError> {
    if avail < CHUNK_ITEM_SIZE {
        return Err(corrupt("btrfs chunk item truncated"));
    }
    let length = le64(b, off)?;
    let ty = le64(b, off + 24)?;
    let num_stripes = le16(b, off + 44)? as usize;
    let size = CHUNK_ITEM_SIZE + num_stripes * STRIPE_SIZE;
    if num_stripes == 0 || size > avail {
        return Err(corrupt(format!("btrfs chunk at {logical} has {num_stripes} stripes (item too small)")));
    }
    let ss = sb.sectorsize as u64;
    if length == 0 || !length.is_multiple_of(ss) || !logical.is_multiple_of(ss) || logical.checked_add(length).is_none()
    {
        return Err(corrupt(format!("btrfs chunk at {logical} has invalid length {length}")));
    }
    if ty & BG_STRIPED != 0 {
        return Err(corrupt(format!(
            "btrfs chunk at {logical} uses a striped profile (RAID0/10/5/6, flags {ty:#x}): not supported, copied raw"
        )));
    }
    let profiles = ty & BG_MIRRORED;
    if profiles & profiles.wrapping_sub(1) != 0 {
        return Err(corrupt(format!("btrfs chunk at {logical} has several profiles ({ty:#x})")));
    }
    let expect = match profiles {
        0 => Some(1),
        BG_DUP | BG_RAID1 => Some(2),
        BG_RAID1C3 => Some(3),
        BG_RAID1C4 => Some(4),
        _ => None,
    };
    if expect != Some(num_stripes) {
        return Err(corrupt(format!("btrfs chunk at {logical}: {num_stripes} stripes for profile {ty:#x}")));
    }
    let mut stripes = Vec::with_capacity(num_stripes);
    for i in 0..num_stripes {
        let s = off + CHUNK_ITEM_SIZE + i * STRIPE_SIZE;
        let devid = le64(b, s)?;
        let phys = le64(b, s + 8)?;
        if devid != sb.devid {
            return Err(corrupt(format!(
                "btrfs chunk at {logical} has a stripe on device {devid}, not this one ({}): multi-device btrfs is not supported: copied raw",
                sb.devid
            )));
        }
        if phys.checked_add(length).is_none_or(|e| e > sb.dev_total) || !phys.is_multiple_of(ss) {
            return Err(corrupt(format!(
                "btrfs chunk at {logical} has a stripe at {phys}..+{length} outside the device ({})",
                sb.dev_total
            )));
        }
        stripes.push(phys);
    }
    Ok((Chunk { logical, length, stripes }, size))
}

#[derive(Debug, Default)]
struct ChunkMap {
    /// Sorted by logical address, non-overlapping.
    chunks: Vec<Chunk>,
}

impl ChunkMap {
    /// Adds a chunk; an identical duplicate is ignored, an overlap is Corrupt.
    fn insert(&mut self, c: Chunk) -> Result<(), FsError> {
        let i = self.chunks.partition_point(|x| x.logical < c.logical);
        if let Some(x) = self.chunks.get(i) {
            if *x == c {
                return Ok(());
            }
            if x.logical < c.logical + c.length {
                return Err(corrupt(format!("btrfs chunks at {} and {} overlap", c.logical, x.logical)));
            }
        }
        if i > 0 {
            let p = &self.chunks[i - 1];
            if p.logical + p.length > c.logical {
                return Err(corrupt(format!("btrfs chunks at {} and {} overlap", p.logical, c.logical)));
            }
        }
        self.chunks.insert(i, c);
        Ok(())
    }

    /// The chunk holding logical address `l`.
    fn find(&self, l: u64) -> Option<&Chunk> {
        let i = self.chunks.partition_point(|x| x.logical <= l);
        let c = self.chunks.get(i.checked_sub(1)?)?;
        (l - c.logical < c.length).then_some(c)
    }

    /// Calls `f(chunk, copy, physical, len)` for every physical copy of the
    /// logical range `[l, l+len)`, split at chunk boundaries (`chunk` is
    /// the index in `chunks`).
    fn map(&self, mut l: u64, mut len: u64, mut f: impl FnMut(usize, usize, u64, u64)) -> Result<(), FsError> {
        while len > 0 {
            let ci = self.chunks.partition_point(|x| x.logical <= l);
            let c = self.find(l).ok_or_else(|| corrupt(format!("btrfs logical address {l} is in no chunk")))?;
            let within = l - c.logical;
            let n = len.min(c.length - within);
            for (i, &s) in c.stripes.iter().enumerate() {
                f(ci - 1, i, s + within, n);
            }
            l += n;
            len -= n;
        }
        Ok(())
    }
}

fn parse_sys_chunks(sb: &Super) -> Result<ChunkMap, FsError> {
    let mut map = ChunkMap::default();
    let a = &sb.sys_chunks;
    let mut off = 0;
    while off < a.len() {
        let key = key_at(a, off)?;
        if key.ty != CHUNK_ITEM_KEY {
            return Err(corrupt(format!("btrfs sys_chunk_array holds a key of type {}", key.ty)));
        }
        off += KEY_SIZE;
        let (c, size) = parse_chunk(sb, key.offset, a, off, a.len() - off)?;
        map.insert(c)?;
        off += size;
    }
    if map.chunks.is_empty() {
        return Err(corrupt("btrfs sys_chunk_array is empty"));
    }
    Ok(map)
}

// ------------------------------------------------------------- tree walks

/// Called for every leaf item: its key and data.
type LeafFn<'f> = dyn FnMut(Key, &[u8]) -> Result<(), FsError> + 'f;

struct Reader<'a, 'v> {
    vol: &'a Volume<'v>,
    sb: &'a Super,
    /// Tree blocks read so far (each at most once: a repeat means a cycle
    /// or a shared block where none may be).
    visited: HashSet<u64>,
    budget: u64,
    /// Logical addresses of the tree blocks read.
    blocks: Vec<u64>,
}

impl Reader<'_, '_> {
    /// Reads and checks the tree block at logical `bytenr`, trying each
    /// copy until one passes.
    fn read_block(&mut self, map: &ChunkMap, bytenr: u64, level: u8) -> Result<Vec<u8>, FsError> {
        let ns = self.sb.nodesize as u64;
        if !bytenr.is_multiple_of(self.sb.sectorsize as u64) {
            return Err(corrupt(format!("btrfs tree block {bytenr} is not sector aligned")));
        }
        let c = map.find(bytenr).ok_or_else(|| corrupt(format!("btrfs tree block {bytenr} is in no chunk")))?;
        let within = bytenr - c.logical;
        if c.length - within < ns {
            return Err(corrupt(format!("btrfs tree block {bytenr} crosses the end of its chunk")));
        }
        if !self.visited.insert(bytenr) {
            return Err(corrupt(format!("btrfs tree block {bytenr} is referenced twice (cycle?)")));
        }
        if self.visited.len() as u64 > self.budget {
            return Err(corrupt("btrfs trees have more blocks than the device can hold"));
        }
        let mut first_err = None;
        for &s in &c.stripes {
            let b = self.vol.read_vec(s + within, ns)?;
            match self.check_block(&b, bytenr, level) {
                Ok(()) => {
                    self.blocks.push(bytenr);
                    return Ok(b);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| corrupt("btrfs chunk without stripes")))
    }

    fn check_block(&self, b: &[u8], bytenr: u64, level: u8) -> Result<(), FsError> {
        if !self.sb.csum.verify(b) {
            return Err(corrupt(format!("btrfs tree block {bytenr}: checksum mismatch")));
        }
        if b[0x20..0x30] != self.sb.meta_fsid {
            return Err(corrupt(format!("btrfs tree block {bytenr}: fsid does not match")));
        }
        if le64(b, 0x30)? != bytenr {
            return Err(corrupt(format!("btrfs tree block {bytenr}: header records another address")));
        }
        if b[0x64] != level {
            return Err(corrupt(format!("btrfs tree block {bytenr}: level {} where {level} is expected", b[0x64])));
        }
        let nritems = le32(b, 0x60)? as usize;
        let per = if level == 0 { ITEM_SIZE } else { KEY_PTR_SIZE };
        if nritems > (b.len() - HEADER_SIZE) / per {
            return Err(corrupt(format!("btrfs tree block {bytenr}: {nritems} items do not fit")));
        }
        Ok(())
    }

    /// Walks the tree rooted at `root` (of `level`), calling
    /// `leaf_item(key, data)` for every leaf item in key order.
    fn walk(&mut self, map: &ChunkMap, root: u64, level: u8, leaf_item: &mut LeafFn) -> Result<(), FsError> {
        if level > MAX_LEVEL {
            return Err(corrupt(format!("btrfs tree root {root} has level {level}")));
        }
        self.walk_node(map, root, level, None, leaf_item)
    }

    fn walk_node(
        &mut self,
        map: &ChunkMap,
        bytenr: u64,
        level: u8,
        first_key: Option<Key>,
        leaf_item: &mut LeafFn,
    ) -> Result<(), FsError> {
        let b = self.read_block(map, bytenr, level)?;
        let nritems = le32(&b, 0x60)? as usize;
        if let Some(fk) = first_key
            && (nritems == 0 || key_at(&b, HEADER_SIZE)? != fk)
        {
            return Err(corrupt(format!("btrfs tree block {bytenr}: first key does not match its parent")));
        }
        let mut prev: Option<Key> = None;
        let data_len = b.len() - HEADER_SIZE;
        for i in 0..nritems {
            if level == 0 {
                let p = HEADER_SIZE + i * ITEM_SIZE;
                let key = key_at(&b, p)?;
                if prev.is_some_and(|k| k >= key) {
                    return Err(corrupt(format!("btrfs leaf {bytenr}: keys out of order")));
                }
                prev = Some(key);
                let off = le32(&b, p + KEY_SIZE)? as usize;
                let size = le32(&b, p + KEY_SIZE + 4)? as usize;
                if off.checked_add(size).is_none_or(|e| e > data_len) || off < nritems * ITEM_SIZE {
                    return Err(corrupt(format!("btrfs leaf {bytenr}: item {i} data outside the leaf")));
                }
                leaf_item(key, &b[HEADER_SIZE + off..HEADER_SIZE + off + size])?;
            } else {
                let p = HEADER_SIZE + i * KEY_PTR_SIZE;
                let key = key_at(&b, p)?;
                if prev.is_some_and(|k| k >= key) {
                    return Err(corrupt(format!("btrfs node {bytenr}: keys out of order")));
                }
                prev = Some(key);
                let child = le64(&b, p + KEY_SIZE)?;
                self.walk_node(map, child, level - 1, Some(key), leaf_item)?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------- collecting

/// Physical ranges, merged on the fly per copy index (the extent tree is
/// walked in logical order, so each copy's ranges come in physical order
/// within a chunk).
#[derive(Default)]
struct Ranges {
    pending: [Option<Extent>; 4],
    out: Vec<Extent>,
}

impl Ranges {
    fn push(&mut self, copy: usize, start: u64, len: u64) {
        let slot = &mut self.pending[copy.min(3)];
        match slot {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => {
                if let Some(e) = slot.replace((start, len)) {
                    self.out.push(e);
                }
            }
        }
    }

    fn finish(mut self) -> Vec<Extent> {
        self.out.extend(self.pending.iter().flatten());
        self.out
    }
}

fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let sb = read_super(vol)?;
    let mut rd = Reader {
        vol,
        sb: &sb,
        visited: HashSet::new(),
        budget: sb.dev_total / sb.nodesize as u64 + 1,
        blocks: Vec::new(),
    };

    // Chunk tree, read through the bootstrap map.
    let sys = parse_sys_chunks(&sb)?;
    let mut map = ChunkMap::default();
    for c in &sys.chunks {
        map.insert(c.clone())?;
    }
    rd.walk(&sys, sb.chunk_root, sb.chunk_root_level, &mut |key, data| {
        if key.ty == CHUNK_ITEM_KEY {
            let (c, _) = parse_chunk(&sb, key.offset, data, 0, data.len())?;
            map.insert(c)?;
        }
        Ok(())
    })?;

    // Root tree: where the extent tree (and block group tree) are.
    let (mut extent_root, mut bg_root) = (None, None);
    rd.walk(&map, sb.root, sb.root_level, &mut |key, data| {
        if key.ty == ROOT_ITEM_KEY && [EXTENT_TREE_OBJECTID, BLOCK_GROUP_TREE_OBJECTID].contains(&key.objectid) {
            if data.len() < 239 {
                return Err(corrupt(format!("btrfs root item of tree {} is truncated", key.objectid)));
            }
            let root = Some((le64(data, 176)?, data[238]));
            if key.objectid == EXTENT_TREE_OBJECTID {
                extent_root = root;
            } else {
                bg_root = root;
            }
        }
        Ok(())
    })?;
    let (extent_root, extent_level) = extent_root.ok_or_else(|| corrupt("btrfs root tree has no extent tree"))?;

    // Block group items (start, length, used bytes), from the extent tree
    // or, with the block-group-tree feature, from their own tree.
    let mut groups: Vec<(u64, u64, u64)> = Vec::new();
    let mut group_item = |key: Key, data: &[u8]| -> Result<(), FsError> {
        if key.ty == BLOCK_GROUP_ITEM_KEY {
            groups.push((key.objectid, key.offset, le64(data, 0)?));
        }
        Ok(())
    };
    if sb.compat_ro & COMPAT_RO_BLOCK_GROUP_TREE != 0 {
        let (r, l) = bg_root.ok_or_else(|| corrupt("btrfs root tree has no block group tree"))?;
        rd.walk(&map, r, l, &mut group_item)?;
    }

    // Extent tree: every allocated extent.
    let ss = sb.sectorsize as u64;
    let ns = sb.nodesize as u64;
    let mut ranges = Ranges::default();
    let mut chunk_used = vec![0u64; map.chunks.len()];
    rd.walk(&map, extent_root, extent_level, &mut |key, data| {
        let len = match key.ty {
            EXTENT_ITEM_KEY => key.offset,
            METADATA_ITEM_KEY => {
                if key.offset > MAX_LEVEL as u64 {
                    return Err(corrupt(format!("btrfs metadata item {} has level {}", key.objectid, key.offset)));
                }
                ns
            }
            _ => return group_item(key, data),
        };
        if len == 0 || !len.is_multiple_of(ss) || !key.objectid.is_multiple_of(ss) {
            return Err(corrupt(format!("btrfs extent {}..+{len} is not sector aligned", key.objectid)));
        }
        map.map(key.objectid, len, |ci, copy, p, n| {
            if copy == 0 {
                chunk_used[ci] += n;
            }
            ranges.push(copy, p, n)
        })
    })?;
    let mut extents = ranges.finish();
    check_accounting(&sb, &map, &groups, &chunk_used)?;

    extents.push((0, BOOT_AREA.min(vol.len)));
    for off in SUPER_OFFSETS {
        if off + SUPER_SIZE as u64 <= vol.len {
            extents.push((off, SUPER_SIZE as u64));
        }
    }
    let (extents, used_bytes) = normalize(extents, vol.len)?;

    // The tree blocks read must be among the extents (every copy).
    for &b in &rd.blocks {
        let mut missing = false;
        map.map(b, ns, |_, _, p, n| {
            let i = extents.partition_point(|e| e.0 <= p);
            missing |= i == 0 || extents[i - 1].0 + extents[i - 1].1 < p + n;
        })?;
        if missing {
            return Err(corrupt(format!("btrfs tree block {b} is in use but not in the extent tree")));
        }
    }
    Ok(UsedMap { block_size: sb.sectorsize, total_bytes: sb.dev_total, used_bytes, extents })
}

/// Cross-checks the extent tree against btrfs's own counters: each chunk
/// has one block group whose used bytes equal the extents found in it, and
/// their sum is the superblock's bytes_used. An extent tree that lost
/// items (which would make a smaller map) fails here.
fn check_accounting(sb: &Super, map: &ChunkMap, groups: &[(u64, u64, u64)], chunk_used: &[u64]) -> Result<(), FsError> {
    let mut seen = vec![false; map.chunks.len()];
    for &(start, len, used) in groups {
        let i = map.chunks.partition_point(|c| c.logical < start);
        let c = map
            .chunks
            .get(i)
            .filter(|c| c.logical == start && c.length == len)
            .ok_or_else(|| corrupt(format!("btrfs block group {start}..+{len} matches no chunk")))?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(corrupt(format!("btrfs block group {start} is listed twice")));
        }
        if chunk_used[i] != used {
            return Err(corrupt(format!(
                "btrfs block group {} records {used} bytes used, its extents add up to {}",
                c.logical, chunk_used[i]
            )));
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(corrupt(format!("btrfs chunk {} has no block group item", map.chunks[i].logical)));
    }
    let total: u64 = chunk_used.iter().sum();
    if total != sb.bytes_used {
        return Err(corrupt(format!(
            "btrfs superblock records {} bytes used, the extent tree adds up to {total}",
            sb.bytes_used
        )));
    }
    Ok(())
}

// ------------------------------------------------------------- hashes

/// The hashes btrfs may use besides CRC-32C, from the crates klon already
/// depends on.
mod hashes {
    use sha2::Digest as _;

    /// XXH64.
    pub fn xxh64(data: &[u8], seed: u64) -> u64 {
        xxhash_rust::xxh64::xxh64(data, seed)
    }

    /// SHA-256.
    pub fn sha256(data: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(data).into()
    }

    /// BLAKE2b with a 256-bit digest.
    pub fn blake2b_256(data: &[u8]) -> [u8; 32] {
        blake2::Blake2b256::digest(data).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Disk;
    use crate::testutil::{Mounted, Rng, TempDir, root_for, sh};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    /// Files of many sizes (inline, small, large, empty) in `dir`.
    fn populate(dir: &Path, seed: u64, scale: usize) {
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        for i in 0..40u64 {
            let len = [0, 100, 2000, 4096, 5000, 70_000, 300_000][i as usize % 7] * scale / 4;
            let d = if i % 3 == 0 {
                dir.join("sub")
            } else if i % 3 == 1 {
                dir.join("sub/deeper")
            } else {
                dir.to_path_buf()
            };
            std::fs::write(d.join(format!("f{i}")), Rng::seeded(seed + i).bytes(len)).unwrap();
        }
        std::fs::write(dir.join("big"), Rng::seeded(seed ^ 0xb16).bytes(3 << 20)).unwrap();
        std::fs::write(dir.join("zeros"), vec![0u8; 1 << 20]).unwrap();
    }

    fn mkfs(img: &Path, size: u64, args: &[&str], rootdir: Option<&Path>) {
        File::create(img).unwrap().set_len(size).unwrap();
        let mut a = vec!["-q", "-f"];
        a.extend_from_slice(args);
        if let Some(r) = rootdir {
            a.extend(["--rootdir", r.to_str().unwrap()]);
        }
        a.push(img.to_str().unwrap());
        sh("mkfs.btrfs", &a);
    }

    fn map_of(img: &Path) -> Result<UsedMap, FsError> {
        let d = Disk::open_source(img).unwrap();
        let vol = Volume::new(&d, 0, d.size);
        used_map(&vol)
    }

    /// The number after `word` in `line`.
    fn after(line: &str, word: &str) -> Option<u64> {
        let mut it = line.split_whitespace();
        it.find(|w| *w == word)?;
        it.next()?.trim_end_matches(')').parse().ok()
    }

    /// What btrfs-progs says must be copied: the first MiB, the superblocks
    /// within the file, and every extent of the extent tree (from
    /// `dump-tree -t extent`) at every physical copy of its chunk (from
    /// `dump-tree -t chunk`).
    fn expected(img: &Path) -> (Vec<Extent>, u64) {
        let p = img.to_str().unwrap();
        let len = std::fs::metadata(img).unwrap().len();
        let nodesize: u64 =
            sh("btrfs", &["inspect-internal", "dump-super", p]).lines().find_map(|l| after(l, "nodesize")).unwrap();
        let mut chunks: Vec<(u64, u64, Vec<u64>)> = Vec::new();
        for l in sh("btrfs", &["inspect-internal", "dump-tree", "-t", "chunk", p]).lines() {
            if l.contains("CHUNK_ITEM") && l.contains("itemoff") {
                chunks.push((after(l, "CHUNK_ITEM").unwrap(), 0, Vec::new()));
            } else if let (Some(c), Some(n), true) = (chunks.last_mut(), after(l, "length"), l.contains("stripe_len")) {
                c.1 = n;
            }
            if l.trim_start().starts_with("stripe ") && l.contains("devid") {
                chunks.last_mut().unwrap().2.push(after(l, "offset").unwrap());
            }
        }
        let mut out = vec![(0, (1u64 << 20).min(len))];
        for off in [64u64 << 10, 64 << 20, 256 << 30] {
            if off + 4096 <= len {
                out.push((off, 4096));
            }
        }
        for l in sh("btrfs", &["inspect-internal", "dump-tree", "-t", "extent", p]).lines() {
            if !l.contains("itemoff") {
                continue;
            }
            let Some(key) = l.split("key (").nth(1) else { continue };
            let logical: u64 = match key.split_whitespace().next().unwrap().parse() {
                Ok(v) => v,
                Err(_) => continue,
            };
            let n = if let Some(n) = after(l, "EXTENT_ITEM") {
                n
            } else if l.contains("METADATA_ITEM") {
                nodesize
            } else {
                continue;
            };
            let c = chunks.iter().find(|c| c.0 <= logical && logical < c.0 + c.1).expect("extent in a chunk");
            assert!(logical + n <= c.0 + c.1);
            for s in &c.2 {
                out.push((s + logical - c.0, n));
            }
        }
        normalize(out, len).unwrap()
    }

    fn check_against_tools(img: &Path) -> UsedMap {
        let m = map_of(img).unwrap_or_else(|e| panic!("used_map failed: {e}"));
        let (ext, used) = expected(img);
        assert_eq!(m.extents, ext, "extents differ from btrfs-progs' view");
        assert_eq!(m.used_bytes, used);
        let total: u64 = sh("btrfs", &["inspect-internal", "dump-super", img.to_str().unwrap()])
            .lines()
            .find_map(|l| if l.contains("dev_item.total_bytes") { after(l, "dev_item.total_bytes") } else { None })
            .unwrap();
        assert_eq!(m.total_bytes, total);
        m
    }

    fn layout(size: u64, args: &[&str]) -> UsedMap {
        let t = TempDir::new("layout");
        let root = t.join("root");
        populate(&root, size ^ args.len() as u64, 4);
        let img = t.join("fs.img");
        mkfs(&img, size, args, Some(&root));
        check_against_tools(&img)
    }

    #[test]
    fn default_dup_metadata() {
        let m = layout(300 << 20, &[]);
        assert_eq!(m.block_size, 4096);
        assert!(m.used_bytes < 40 << 20, "used {}", m.used_bytes);
    }

    #[test]
    fn single_small_nodes_at_mirror_boundary() {
        // Exactly 64 MiB + 4 KiB: the second superblock is the last block.
        layout((64 << 20) + 4096, &["--mixed", "-n", "4096"]);
        layout(256 << 20, &["-m", "single", "-d", "single", "-n", "4096"]);
    }

    #[test]
    fn dup_data_big_nodes() {
        layout(200 << 20, &["-m", "dup", "-d", "dup", "-n", "65536"]);
    }

    #[test]
    fn mixed_small_below_second_mirror() {
        let m = layout(40 << 20, &["--mixed"]);
        assert!(m.extents.iter().all(|e| e.0 + e.1 <= 40 << 20));
    }

    #[test]
    fn big_sectors_and_old_extent_items() {
        layout(200 << 20, &["-s", "16384", "-n", "16384"]);
        layout(200 << 20, &["-O", "^skinny-metadata,^no-holes", "-R", "^free-space-tree"]);
    }

    #[test]
    fn other_checksums() {
        for c in ["xxhash", "sha256", "blake2"] {
            layout(128 << 20, &["--csum", c]);
        }
    }

    #[test]
    fn hashes_match_known_values() {
        assert_eq!(hashes::xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(hashes::xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        let s = hashes::sha256(b"abc");
        assert_eq!(s[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(s[28..], [0xf2, 0x00, 0x15, 0xad]);
        let b = hashes::blake2b_256(b"abc");
        assert_eq!(b[..4], [0xbd, 0xdd, 0x81, 0x3c]);
    }

    #[test]
    fn filesystem_smaller_than_partition() {
        let t = TempDir::new("small");
        let root = t.join("root");
        populate(&root, 7, 2);
        let img = t.join("fs.img");
        mkfs(&img, 300 << 20, &["-b", "150m"], Some(&root));
        let m = check_against_tools(&img);
        assert_eq!(m.total_bytes, 150 << 20);
    }

    #[test]
    fn metadata_uuid() {
        let t = TempDir::new("muuid");
        let root = t.join("root");
        populate(&root, 9, 1);
        let img = t.join("fs.img");
        mkfs(&img, 128 << 20, &[], Some(&root));
        sh("btrfstune", &["-f", "-m", img.to_str().unwrap()]);
        let sb = sh("btrfs", &["inspect-internal", "dump-super", img.to_str().unwrap()]);
        assert!(sb.contains("METADATA_UUID"), "{sb}");
        check_against_tools(&img);
    }

    /// Filled through a kernel mount until the disk is full, then every
    /// other file deleted: fragmented free space, a multi-level extent tree.
    #[test]
    fn nearly_full_and_fragmented() {
        if !root_for("for a loop mount") {
            return;
        }
        let t = TempDir::new("full");
        let img = t.join("fs.img");
        mkfs(&img, 160 << 20, &["-n", "4096"], None);
        let mnt = t.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        {
            let _g = Mounted::new(&img, &mnt, "loop");
            let mut i = 0u64;
            loop {
                let len = [3000usize, 20_000, 200_000, 1 << 20][i as usize % 4];
                if std::fs::write(mnt.join(format!("f{i}")), Rng::seeded(i).bytes(len)).is_err() || i > 5000 {
                    break;
                }
                i += 1;
            }
            for j in (0..i).step_by(2) {
                std::fs::remove_file(mnt.join(format!("f{j}"))).unwrap();
            }
        }
        let m = check_against_tools(&img);
        assert!(m.used_bytes > 40 << 20, "used {}", m.used_bytes);
    }

    #[test]
    fn log_tree_is_unclean() {
        let t = TempDir::new("log");
        let img = t.join("fs.img");
        mkfs(&img, 128 << 20, &[], None);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, 65536).unwrap();
        sb[0x60..0x68].copy_from_slice(&30_000_000u64.to_le_bytes());
        let c = crc32c::crc32c(&sb[32..]);
        sb[..4].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&sb, 65536).unwrap();
        match map_of(&img) {
            Err(FsError::Unclean(m)) => assert!(m.contains("log tree"), "{m}"),
            other => panic!("expected Unclean, got {other:?}"),
        }
    }

    #[test]
    fn refusals() {
        let t = TempDir::new("refuse");
        let img = t.join("fs.img");
        mkfs(&img, 128 << 20, &[], None);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, 65536).unwrap();
        let good = sb.clone();
        let put = |sb: &mut Vec<u8>| {
            let c = crc32c::crc32c(&sb[32..]);
            sb[..4].copy_from_slice(&c.to_le_bytes());
            f.write_all_at(sb, 65536).unwrap();
        };
        // Two devices.
        sb[0x88..0x90].copy_from_slice(&2u64.to_le_bytes());
        put(&mut sb);
        match map_of(&img) {
            Err(FsError::Corrupt(m)) => assert!(m.contains("multi-device btrfs is not supported: copied raw"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // A bad superblock checksum.
        sb.copy_from_slice(&good);
        sb[0x300] ^= 1;
        f.write_all_at(&sb, 65536).unwrap();
        assert!(matches!(map_of(&img), Err(FsError::Corrupt(m)) if m.contains("checksum")));
        // A device larger than the partition.
        sb.copy_from_slice(&good);
        sb[0xd1..0xd9].copy_from_slice(&(1u64 << 40).to_le_bytes());
        put(&mut sb);
        assert!(matches!(map_of(&img), Err(FsError::Corrupt(_))));
        // Good again.
        sb.copy_from_slice(&good);
        put(&mut sb);
        check_against_tools(&img);
    }

    /// The superblock's bytes_used one sector more than the extents add up
    /// to (checksum fixed): btrfs check reports it, and the metadata fails
    /// the reader's check.
    #[test]
    fn superblock_bytes_used_mismatch_is_corrupt() {
        let t = TempDir::new("bytes-used");
        let root = t.join("root");
        populate(&root, 21, 4);
        let img = t.join("fs.img");
        mkfs(&img, 128 << 20, &[], Some(&root));
        let used = map_of(&img).unwrap();
        assert!(used.used_bytes > 0);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, 65536).unwrap();
        let bytes_used = le64(&sb, 0x78).unwrap();
        let forged = bytes_used + 4096;
        sb[0x78..0x80].copy_from_slice(&forged.to_le_bytes());
        let c = crc32c::crc32c(&sb[32..]);
        sb[..4].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&sb, 65536).unwrap();
        let (clean, said) = crate::testutil::try_sh("btrfs", &["check", img.to_str().unwrap()]);
        assert!(
            !clean && said.contains(&format!("super bytes used {forged} mismatches actual used {bytes_used}")),
            "btrfs check: {said}"
        );
        match map_of(&img) {
            Err(FsError::Corrupt(m)) => assert!(
                m.contains(&format!("superblock records {forged} bytes used, the extent tree adds up to {bytes_used}")),
                "{m}"
            ),
            other => panic!("a superblock bytes_used off by a sector must fail a check, got {other:?}"),
        }
    }

    /// Flips bytes in the superblock and tree blocks (half the time fixing
    /// the checksum so the parsers see the damage): Ok or Err, never a panic.
    #[test]
    fn mutations_never_panic() {
        let t = TempDir::new("mut");
        let root = t.join("root");
        populate(&root, 11, 2);
        // Enough extents for an extent tree of several levels.
        std::fs::create_dir(root.join("many")).unwrap();
        for i in 0..1500u64 {
            std::fs::write(root.join(format!("many/{i}")), Rng::seeded(i).bytes(5000)).unwrap();
        }
        let img = t.join("fs.img");
        mkfs(&img, 128 << 20, &["-m", "single", "-n", "4096"], Some(&root));
        let base = map_of(&img).unwrap();
        // Tree blocks: the METADATA_ITEMs of the extent tree, at their
        // physical place (single profile: from the used map's own reader).
        let d = Disk::open_source(&img).unwrap();
        let vol = Volume::new(&d, 0, d.size);
        let sb = read_super(&vol).unwrap();
        let mut rd = Reader { vol: &vol, sb: &sb, visited: HashSet::new(), budget: u64::MAX, blocks: Vec::new() };
        let sys = parse_sys_chunks(&sb).unwrap();
        let mut map = ChunkMap::default();
        rd.walk(&sys, sb.chunk_root, sb.chunk_root_level, &mut |k, data| {
            if k.ty == CHUNK_ITEM_KEY {
                map.insert(parse_chunk(&sb, k.offset, data, 0, data.len())?.0)?;
            }
            Ok(())
        })
        .unwrap();
        let mut rd2 = Reader { vol: &vol, sb: &sb, visited: HashSet::new(), budget: u64::MAX, blocks: Vec::new() };
        let mut er = None;
        rd2.walk(&map, sb.root, sb.root_level, &mut |k, data| {
            if k.objectid == EXTENT_TREE_OBJECTID && k.ty == ROOT_ITEM_KEY {
                er = Some((le64(data, 176)?, data[238]));
            }
            Ok(())
        })
        .unwrap();
        let (er, el) = er.unwrap();
        rd2.walk(&map, er, el, &mut |_, _| Ok(())).unwrap();
        // The blocks used_map reads: superblock, chunk, root, extent trees.
        let mut blocks = vec![(65536u64, 4096usize)];
        for l in rd.blocks.iter().chain(&rd2.blocks) {
            map.map(*l, sb.nodesize as u64, |_, _, p, _| blocks.push((p, sb.nodesize as usize))).unwrap();
        }
        drop(d);
        assert!(blocks.len() > 20, "{blocks:?}");

        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut oks, mut errs, mut changed) = (0, 0, 0);
        for round in 0..400 {
            let (off, len) = blocks[next() as usize % blocks.len()];
            let mut orig = vec![0u8; len];
            f.read_exact_at(&mut orig, off).unwrap();
            let mut b = orig.clone();
            let flips = 1 + next() % 4;
            for _ in 0..flips {
                // Mostly the headers and item tables, where the pointers are.
                let span = if next() % 2 == 0 { 400.min(len as u64) } else { len as u64 };
                let i = 32 + (next() % (span - 32)) as usize;
                b[i] = if next() % 3 == 0 { 0xff } else { b[i] ^ (1 << (next() % 8)) };
            }
            if round % 2 == 0 {
                let c = crc32c::crc32c(&b[32..]);
                b[..4].copy_from_slice(&c.to_le_bytes());
            }
            f.write_all_at(&b, off).unwrap();
            let r = std::panic::catch_unwind(|| map_of(&img));
            f.write_all_at(&orig, off).unwrap();
            match r {
                Ok(Ok(m)) => {
                    oks += 1;
                    if m != base {
                        changed += 1;
                    }
                }
                Ok(Err(FsError::Io(e))) => panic!("I/O error on a file: {e}"),
                Ok(Err(_)) => errs += 1,
                Err(_) => panic!("used_map panicked on round {round} (block at {off})"),
            }
        }
        eprintln!("mutations: {oks} ok ({changed} with a different map), {errs} refused");
        assert!(errs > 100);
        assert_eq!(map_of(&img).unwrap(), base);
    }
}
