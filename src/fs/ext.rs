//! ext2 / ext3 / ext4: which blocks the filesystem uses.
//!
//! Read, in order: the primary superblock (checked: magic, sizes, features,
//! CRC-32C with metadata_csum, clean state), the group descriptors (classic
//! table after the superblock, or meta_bg blocks in the first, second and
//! last group of each meta group; 32- or 64-byte descriptors; crc16 with
//! uninit_bg/gdt_csum, crc32c with metadata_csum), the MMP block when there
//! is one, then one block bitmap per group (crc32c-checked with
//! metadata_csum, its free count checked against the descriptor). A group
//! flagged BLOCK_UNINIT has no bitmap on disk: it uses only the metadata
//! placed in it, which is added for every group anyway, and its
//! descriptor's free count must say exactly that (a group that holds data
//! but claims BLOCK_UNINIT fails the check instead of losing the data).
//! Last, the descriptors' free counts must add up to the superblock's.
//! Any disagreement among these counters is `FsError::Corrupt`: the
//! partition is copied raw, with a warning.
//!
//! Always used, whatever the bitmaps say: the boot area and primary
//! superblock, every superblock backup (sparse_super / sparse_super2), the
//! group descriptor blocks and reserved GDT blocks, every block and inode
//! bitmap, and the used part of every inode table. The journal is in the
//! bitmaps (it is a file).
//!
//! Not stored: the tail of an inode table that the descriptors say holds no
//! inode yet (bg_itable_unused, or the whole table with INODE_UNINIT), when
//! the group descriptors are checksummed (uninit_bg or metadata_csum). The
//! kernel and e2fsck never read those inodes, exactly as after mke2fs with
//! lazy_itable_init on a dirty disk; the tests restore over garbage and run
//! `e2fsck -fn` to show it.

use super::Extent;
use super::{Driver, FsError, UsedMap, Volume, crc32c, normalize};
use crate::le::{le16, le32};

/// The ext2/3/4 driver.
pub const DRIVER: Driver = Driver { fstypes: &["ext2", "ext3", "ext4"], used_map };

const MAGIC: u16 = 0xEF53;

const COMPAT_SPARSE_SUPER2: u32 = 0x0200;

const INCOMPAT_COMPRESSION: u32 = 0x0001;
const INCOMPAT_FILETYPE: u32 = 0x0002;
const INCOMPAT_RECOVER: u32 = 0x0004;
const INCOMPAT_JOURNAL_DEV: u32 = 0x0008;
const INCOMPAT_META_BG: u32 = 0x0010;
const INCOMPAT_EXTENTS: u32 = 0x0040;
const INCOMPAT_64BIT: u32 = 0x0080;
const INCOMPAT_MMP: u32 = 0x0100;
const INCOMPAT_FLEX_BG: u32 = 0x0200;
const INCOMPAT_EA_INODE: u32 = 0x0400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Incompatible features whose block layout this reader understands.
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const RO_SPARSE_SUPER: u32 = 0x0001;
const RO_GDT_CSUM: u32 = 0x0010;
const RO_HAS_SNAPSHOT: u32 = 0x0080;
const RO_BIGALLOC: u32 = 0x0200;
const RO_METADATA_CSUM: u32 = 0x0400;
/// Read-only-compatible features known to keep the block bitmaps the
/// whole truth (everything defined up to orphan_present except snapshots).
const RO_KNOWN: u32 = 0x1FFFF & !RO_HAS_SNAPSHOT;

const STATE_VALID: u16 = 0x0001;
const STATE_ERROR: u16 = 0x0002;

const BG_INODE_UNINIT: u16 = 0x0001;
const BG_BLOCK_UNINIT: u16 = 0x0002;

const MMP_MAGIC: u32 = 0x004D_4D50;
const MMP_SEQ_CLEAN: u32 = 0xFF4D_4D50;
const MMP_SEQ_FSCK: u32 = 0xE24D_4D50;

fn corrupt(msg: impl Into<String>) -> FsError {
    FsError::Corrupt(format!("ext: {}", msg.into()))
}

// ---------------------------------------------------------------- crc16

const CRC16_TABLE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xA001 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-16 (polynomial 0x8005, reflected), raw update as the ext4 group
/// descriptor checksum of uninit_bg chains it (seeded with !0, no final xor).
fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = CRC16_TABLE[((crc ^ b as u16) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

// ---------------------------------------------------------------- superblock

/// The superblock fields the reader uses, validated.
#[derive(Debug, Clone)]
struct Super {
    blocks_count: u64,
    first_data_block: u64,
    block_size: u64,
    /// Blocks per cluster (1 without bigalloc).
    cluster_ratio: u64,
    /// Bits in one block bitmap (clusters per group).
    clusters_per_group: u64,
    blocks_per_group: u64,
    inodes_per_group: u64,
    inode_size: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    reserved_gdt_blocks: u64,
    desc_size: u64,
    first_meta_bg: u64,
    backup_bgs: [u64; 2],
    uuid: [u8; 16],
    csum_seed: u32,
    groups: u64,
    mmp_block: u64,
    /// The superblock's free-block count (in blocks, also with bigalloc).
    free_blocks: u64,
}

impl Super {
    fn metadata_csum(&self) -> bool {
        self.ro_compat & RO_METADATA_CSUM != 0
    }
    /// Whether descriptors are checksummed, which makes the UNINIT flags
    /// and itable_unused meaningful.
    fn gd_csum(&self) -> bool {
        self.ro_compat & (RO_METADATA_CSUM | RO_GDT_CSUM) != 0
    }
    fn meta_bg(&self) -> bool {
        self.incompat & INCOMPAT_META_BG != 0
    }
    fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }
    fn desc_blocks(&self) -> u64 {
        self.groups.div_ceil(self.descs_per_block())
    }
    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }
    fn group_blocks(&self, g: u64) -> u64 {
        (self.blocks_count - self.group_first_block(g)).min(self.blocks_per_group)
    }
    fn itable_blocks(&self) -> u64 {
        (self.inodes_per_group * self.inode_size).div_ceil(self.block_size)
    }

    /// Whether group `g` holds a superblock backup (and, without meta_bg,
    /// a copy of the descriptor table and the reserved GDT blocks).
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if g == 1 || self.ro_compat & RO_SPARSE_SUPER == 0 {
            return true;
        }
        if g.is_multiple_of(2) {
            return false;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = p;
            while x < g {
                x *= p;
            }
            x == g
        })
    }

    /// The block where group `g`'s superblock copy (if any) sits: its first
    /// block, except block 1 for group 0 of a 1 KiB-block bigalloc fs.
    fn group_base(&self, g: u64) -> u64 {
        let b = self.group_first_block(g);
        if b == 0 && self.block_size == 1024 { 1 } else { b }
    }

    /// Block ranges in group `g` taken by its superblock copy, descriptor
    /// blocks and reserved GDT blocks.
    fn base_meta(&self, g: u64, out: &mut Vec<(u64, u64)>) {
        let base = self.group_base(g);
        let has = self.has_super(g);
        if has {
            out.push((base, 1));
        }
        let dpb = self.descs_per_block();
        if !self.meta_bg() || g / dpb < self.first_meta_bg {
            if has {
                let old = if self.meta_bg() { self.first_meta_bg } else { self.desc_blocks() };
                out.push((base + 1, old + self.reserved_gdt_blocks));
            }
        } else {
            let r = g % dpb;
            if r == 0 || r == 1 || r == dpb - 1 {
                out.push((base + has as u64, 1));
            }
        }
    }

    /// The block holding descriptor block `i`.
    fn desc_block(&self, i: u64) -> u64 {
        if !self.meta_bg() || i < self.first_meta_bg {
            self.group_base(0) + 1 + i
        } else {
            let g = i * self.descs_per_block();
            self.group_base(g) + self.has_super(g) as u64
        }
    }
}

fn parse_super(sb: &[u8], vol_len: u64) -> Result<Super, FsError> {
    if le16(sb, 0x38) != MAGIC {
        return Err(corrupt("no superblock magic"));
    }
    let rev = le32(sb, 0x4C);
    let compat = le32(sb, 0x5C);
    let incompat = le32(sb, 0x60);
    let ro_compat = le32(sb, 0x64);
    if ro_compat & RO_METADATA_CSUM != 0 {
        if sb[0x175] != 1 {
            return Err(corrupt(format!("unknown metadata checksum type {}", sb[0x175])));
        }
        let want = le32(sb, 0x3FC);
        let got = crc32c::update(!0, &sb[..0x3FC]);
        if got != want {
            return Err(corrupt(format!("superblock checksum mismatch (stored {want:#010x}, computed {got:#010x})")));
        }
    }
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Err(corrupt("this is an external journal device, not a filesystem"));
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        let what = if incompat & INCOMPAT_COMPRESSION != 0 { " (compression)" } else { "" };
        return Err(corrupt(format!("unsupported incompatible features {:#x}{what}", incompat & !INCOMPAT_KNOWN)));
    }
    if ro_compat & !RO_KNOWN != 0 {
        return Err(corrupt(format!("unsupported read-only features {:#x}", ro_compat & !RO_KNOWN)));
    }
    let log_bs = le32(sb, 0x18);
    if log_bs > 6 {
        return Err(corrupt(format!("block size 1024 << {log_bs} is out of range")));
    }
    let block_size = 1024u64 << log_bs;
    let bigalloc = ro_compat & RO_BIGALLOC != 0;
    let cluster_ratio = if bigalloc {
        let log_cs = le32(sb, 0x1C);
        if log_cs < log_bs || log_cs - log_bs > 16 || log_cs > 24 {
            return Err(corrupt(format!("cluster size 1024 << {log_cs} is out of range")));
        }
        1u64 << (log_cs - log_bs)
    } else {
        1
    };
    let blocks_per_group = le32(sb, 0x20) as u64;
    let clusters_per_group = if bigalloc { le32(sb, 0x24) as u64 } else { blocks_per_group };
    if clusters_per_group == 0 || clusters_per_group > 8 * block_size || clusters_per_group % 8 != 0 {
        return Err(corrupt(format!("{clusters_per_group} clusters per group does not fit a bitmap block")));
    }
    if blocks_per_group != clusters_per_group * cluster_ratio {
        return Err(corrupt(format!(
            "{blocks_per_group} blocks per group is not {clusters_per_group} clusters of {cluster_ratio} blocks"
        )));
    }
    let inodes_per_group = le32(sb, 0x28) as u64;
    if inodes_per_group == 0 || inodes_per_group > 8 * block_size {
        return Err(corrupt(format!("{inodes_per_group} inodes per group is out of range")));
    }
    let inode_size = if rev == 0 { 128 } else { le16(sb, 0x58) as u64 };
    if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
        return Err(corrupt(format!("inode size {inode_size} is invalid")));
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let blocks_count = le32(sb, 0x04) as u64 | if is64 { (le32(sb, 0x150) as u64) << 32 } else { 0 };
    let first_data_block = le32(sb, 0x14) as u64;
    let fdb_ok = match (block_size, bigalloc) {
        (1024, false) => first_data_block <= 1,
        _ => first_data_block == 0,
    };
    if !fdb_ok {
        return Err(corrupt(format!("first data block {first_data_block} is invalid for {block_size}-byte blocks")));
    }
    if blocks_count <= first_data_block + 1 {
        return Err(corrupt(format!("block count {blocks_count} is too small")));
    }
    let fs_bytes =
        blocks_count.checked_mul(block_size).ok_or_else(|| corrupt(format!("block count {blocks_count} overflows")))?;
    if fs_bytes > vol_len {
        return Err(corrupt(format!(
            "the filesystem ({fs_bytes} bytes) is larger than its partition ({vol_len} bytes)"
        )));
    }
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    if groups > u32::MAX as u64 {
        return Err(corrupt(format!("{groups} block groups is too many")));
    }
    let inodes_count = le32(sb, 0x00) as u64;
    if inodes_count != groups * inodes_per_group {
        return Err(corrupt(format!("inode count {inodes_count} is not {groups} groups of {inodes_per_group} inodes")));
    }
    let desc_size = if is64 {
        let d = le16(sb, 0xFE) as u64;
        if !(64..=1024).contains(&d) || !d.is_power_of_two() {
            return Err(corrupt(format!("descriptor size {d} is invalid")));
        }
        d
    } else {
        32
    };
    if desc_size > block_size {
        return Err(corrupt("descriptor larger than a block"));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x68..0x78]);
    let csum_seed = if incompat & INCOMPAT_CSUM_SEED != 0 { le32(sb, 0x270) } else { crc32c::update(!0, &uuid) };
    let s = Super {
        blocks_count,
        first_data_block,
        block_size,
        cluster_ratio,
        clusters_per_group,
        blocks_per_group,
        inodes_per_group,
        inode_size,
        compat,
        incompat,
        ro_compat,
        reserved_gdt_blocks: le16(sb, 0xCE) as u64,
        desc_size,
        first_meta_bg: le32(sb, 0x104) as u64,
        backup_bgs: [le32(sb, 0x24C) as u64, le32(sb, 0x250) as u64],
        uuid,
        csum_seed,
        groups,
        mmp_block: u64::from_le_bytes(sb[0x168..0x170].try_into().unwrap()),
        free_blocks: le32(sb, 0x0C) as u64 | if is64 { (le32(sb, 0x158) as u64) << 32 } else { 0 },
    };
    if s.meta_bg() && s.first_meta_bg > s.desc_blocks() {
        return Err(corrupt(format!(
            "first meta group {} is past the {} descriptor blocks",
            s.first_meta_bg,
            s.desc_blocks()
        )));
    }
    let old = if s.meta_bg() { s.first_meta_bg } else { s.desc_blocks() };
    if old + s.reserved_gdt_blocks + 2 > blocks_per_group {
        return Err(corrupt("descriptor and reserved GDT blocks do not fit in a group"));
    }
    Ok(s)
}

/// Refuses a filesystem that is not clean (after the superblock passed its
/// checks, so a garbage superblock reads as corrupt, not unclean).
fn check_clean(sb: &[u8]) -> Result<(), FsError> {
    if le32(sb, 0x60) & INCOMPAT_RECOVER != 0 {
        return Err(FsError::Unclean(
            "the ext journal needs recovery (needs_recovery is set: the filesystem is mounted or was not cleanly \
             unmounted); mount it once or run e2fsck"
                .into(),
        ));
    }
    let state = le16(sb, 0x3A);
    if state & STATE_VALID == 0 {
        return Err(FsError::Unclean(
            "the ext filesystem is not marked clean (state lacks VALID: mounted, or not cleanly unmounted); run e2fsck"
                .into(),
        ));
    }
    if state & STATE_ERROR != 0 {
        return Err(FsError::Unclean(
            "the ext filesystem is marked as having errors (state has ERROR); run e2fsck".into(),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- descriptors

#[derive(Debug, Clone, Copy)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free_clusters: u64,
    flags: u16,
    itable_unused: u64,
    bitmap_csum: u32,
}

fn parse_desc(s: &Super, g: u64, d: &[u8]) -> Result<Desc, FsError> {
    let wide = s.desc_size >= 64;
    let hi32 = |off: usize| if wide { (le32(d, off) as u64) << 32 } else { 0 };
    let hi16 = |off: usize| if wide { (le16(d, off) as u64) << 16 } else { 0 };
    if s.gd_csum() {
        let stored = le16(d, 0x1E);
        let computed = if s.metadata_csum() {
            let mut c = crc32c::update(s.csum_seed, &(g as u32).to_le_bytes());
            c = crc32c::update(c, &d[..0x1E]);
            c = crc32c::update(c, &[0, 0]);
            c = crc32c::update(c, &d[0x20..]);
            c as u16
        } else {
            let mut c = crc16(!0, &s.uuid);
            c = crc16(c, &(g as u32).to_le_bytes());
            c = crc16(c, &d[..0x1E]);
            crc16(c, &d[0x20..])
        };
        if stored != computed {
            return Err(corrupt(format!(
                "group {g} descriptor checksum mismatch (stored {stored:#06x}, computed {computed:#06x})"
            )));
        }
    }
    let mut bitmap_csum = le16(d, 0x18) as u32;
    if s.desc_size >= 0x3A {
        bitmap_csum |= (le16(d, 0x38) as u32) << 16;
    }
    Ok(Desc {
        block_bitmap: le32(d, 0x00) as u64 | hi32(0x20),
        inode_bitmap: le32(d, 0x04) as u64 | hi32(0x24),
        inode_table: le32(d, 0x08) as u64 | hi32(0x28),
        free_clusters: le16(d, 0x0C) as u64 | hi16(0x2C),
        flags: le16(d, 0x12),
        itable_unused: le16(d, 0x1C) as u64 | hi16(0x32),
        bitmap_csum,
    })
}

fn read_descs(vol: &Volume, s: &Super) -> Result<Vec<Desc>, FsError> {
    let bs = s.block_size;
    let dsz = s.desc_size as usize;
    let dpb = s.descs_per_block();
    let nblocks = s.desc_blocks();
    // The classic table is contiguous: read it in one go (bounded by
    // read_vec); meta_bg blocks one by one.
    let classic = if s.meta_bg() { s.first_meta_bg } else { nblocks };
    let table = vol.read_vec(s.desc_block(0) * bs, classic * bs)?;
    let mut out = Vec::with_capacity(s.groups.min(1 << 24) as usize);
    for i in 0..nblocks {
        let owned;
        let block: &[u8] = if i < classic {
            &table[(i * bs) as usize..((i + 1) * bs) as usize]
        } else {
            let at = s.desc_block(i);
            if at >= s.blocks_count {
                return Err(corrupt(format!("descriptor block {i} at {at} is outside the filesystem")));
            }
            owned = vol.read_vec(at * bs, bs)?;
            &owned
        };
        for j in 0..dpb {
            let g = i * dpb + j;
            if g >= s.groups {
                break;
            }
            out.push(parse_desc(s, g, &block[j as usize * dsz..(j as usize + 1) * dsz])?);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- used map

/// Adds bytes of blocks `[start, start+n)` rounded out to whole clusters.
fn push_blocks(s: &Super, ext: &mut Vec<Extent>, start: u64, n: u64) {
    let r = s.cluster_ratio;
    let a = start / r * r;
    let b = (start + n).div_ceil(r) * r;
    let b = b.min(s.blocks_count);
    if b > a {
        ext.push((a * s.block_size, (b - a) * s.block_size));
    }
}

/// Removes `holes` (sorted, non-overlapping) from `ext` (normalized).
fn subtract(ext: Vec<Extent>, holes: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(ext.len() + holes.len());
    let mut h = 0;
    for (mut s, l) in ext {
        let e = s + l;
        while h < holes.len() && holes[h].0 + holes[h].1 <= s {
            h += 1;
        }
        let mut k = h;
        while k < holes.len() && holes[k].0 < e {
            let (hs, he) = (holes[k].0, holes[k].0 + holes[k].1);
            if hs > s {
                out.push((s, hs - s));
            }
            s = s.max(he);
            if he > e {
                break;
            }
            k += 1;
        }
        if s < e {
            out.push((s, e - s));
        }
    }
    out
}

fn check_mmp(vol: &Volume, s: &Super) -> Result<(), FsError> {
    if s.incompat & INCOMPAT_MMP == 0 {
        return Ok(());
    }
    if s.mmp_block < s.first_data_block || s.mmp_block >= s.blocks_count {
        return Err(corrupt(format!("MMP block {} is outside the filesystem", s.mmp_block)));
    }
    let b = vol.read_vec(s.mmp_block * s.block_size, 8)?;
    if le32(&b, 0) != MMP_MAGIC {
        return Err(corrupt("MMP block has no magic"));
    }
    match le32(&b, 4) {
        MMP_SEQ_CLEAN => Ok(()),
        MMP_SEQ_FSCK => Err(FsError::Unclean("the ext filesystem is being checked by e2fsck (MMP)".into())),
        _ => Err(FsError::Unclean(
            "the ext filesystem is in use (multiple-mount protection sequence is not clean)".into(),
        )),
    }
}

/// Calls `f(first, count)` for each run of set bits among the first
/// `nbits` of `bm`; returns the number of clear bits.
fn bitmap_runs(bm: &[u8], nbits: u64, mut f: impl FnMut(u64, u64)) -> u64 {
    let mut free = 0;
    let mut run: Option<u64> = None;
    let mut i = 0;
    while i < nbits {
        let byte = bm[(i / 8) as usize];
        let (used, step) = if i % 8 == 0 && i + 8 <= nbits && (byte == 0 || byte == 0xFF) {
            (byte == 0xFF, 8)
        } else {
            ((byte >> (i % 8)) & 1 != 0, 1)
        };
        if used {
            run.get_or_insert(i);
        } else {
            free += step;
            if let Some(r) = run.take() {
                f(r, i - r);
            }
        }
        i += step;
    }
    if let Some(r) = run {
        f(r, nbits - r);
    }
    free
}

/// Every piece of fixed metadata, as block ranges (superblock copies,
/// descriptor and reserved GDT blocks, bitmaps, whole inode tables),
/// sorted: checked to lie in the filesystem (in its own group without
/// flex_bg) and not to overlap.
fn fixed_meta(s: &Super, descs: &[Desc]) -> Result<Vec<(u64, u64)>, FsError> {
    let flex = s.incompat & INCOMPAT_FLEX_BG != 0;
    let itb = s.itable_blocks();
    let mut meta: Vec<(u64, u64)> = Vec::new();
    let mut scratch = Vec::new();
    for g in 0..s.groups {
        scratch.clear();
        s.base_meta(g, &mut scratch);
        meta.extend_from_slice(&scratch);
        let d = &descs[g as usize];
        let (lo, hi) = if flex {
            (s.first_data_block, s.blocks_count)
        } else {
            let f = s.group_first_block(g);
            (f, f + s.group_blocks(g))
        };
        for (what, at, n) in [
            ("block bitmap", d.block_bitmap, 1),
            ("inode bitmap", d.inode_bitmap, 1),
            ("inode table", d.inode_table, itb),
        ] {
            if at < lo || at.checked_add(n).is_none_or(|e| e > hi) || at == 0 {
                return Err(corrupt(format!(
                    "group {g}: {what} at block {at} (+{n}) is outside its allowed range {lo}..{hi}"
                )));
            }
            meta.push((at, n));
        }
    }
    meta.sort_unstable();
    for w in meta.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(corrupt(format!("metadata at blocks {}+{} overlaps metadata at {}", w[0].0, w[0].1, w[1].0)));
        }
    }
    if let Some(&(s0, n)) = meta.last()
        && s0 + n > s.blocks_count
    {
        return Err(corrupt("metadata reaches past the end of the filesystem"));
    }
    Ok(meta)
}

/// Clusters of group `g` that hold fixed metadata: `meta` (sorted,
/// non-overlapping block ranges of every group's superblock copy,
/// descriptors, reserved GDT, bitmaps and whole inode tables) counted in
/// whole clusters, each once. This is what e2fsck (libext2fs) takes as
/// used in a BLOCK_UNINIT group.
fn meta_clusters_in_group(s: &Super, meta: &[(u64, u64)], g: u64) -> u64 {
    let r = s.cluster_ratio;
    let lo = s.group_first_block(g);
    let hi = lo + s.group_blocks(g);
    let mut count = 0;
    // The last cluster counted, to count a cluster shared by two ranges once.
    let mut last: Option<u64> = None;
    let first = meta.partition_point(|&(a, n)| a + n <= lo);
    for &(a, n) in meta[first..].iter().take_while(|&&(a, _)| a < hi) {
        let (a, b) = (a.max(lo), (a + n).min(hi));
        let (mut c0, c1) = (a / r, (b - 1) / r);
        if let Some(l) = last
            && l >= c0
        {
            c0 = l + 1;
        }
        if c1 >= c0 {
            count += c1 - c0 + 1;
            last = Some(c1);
        }
    }
    count
}

/// The descriptors' free clusters must add up to the superblock's free
/// block count (kept in blocks, also with bigalloc).
///
/// The descriptors are authoritative: the kernel counts free space from
/// them at mount and writes the superblock's count from that whenever it
/// writes the superblock (on a clean unmount and on a freeze), and mke2fs
/// and e2fsck write both. e2fsck -n prints a disagreement ("Free blocks
/// count wrong") but does not call it an error, because the superblock's
/// count may lag where the kernel did not get to write the superblock (a
/// crash, which klon refuses as unclean anyway). A disagreement is a failed
/// check here all the same: a group whose descriptor lies (a BLOCK_UNINIT
/// group that holds data, with its free count made to match) shows up
/// only here, and the price of a stale count is a raw copy, not lost data.
/// `e2fsck -f` recounts it.
fn check_free_total(s: &Super, descs: &[Desc]) -> Result<(), FsError> {
    let clusters: u64 = descs.iter().map(|d| d.free_clusters).sum();
    let blocks = clusters.saturating_mul(s.cluster_ratio);
    if blocks != s.free_blocks {
        return Err(corrupt(format!(
            "the group descriptors add up to {blocks} free blocks, the superblock says {} (if the filesystem \
             is otherwise sound, `e2fsck -f` recounts them)",
            s.free_blocks
        )));
    }
    Ok(())
}

/// The used-block map of an ext2/3/4 filesystem.
pub fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let sb = vol.read_vec(1024, 1024)?;
    let s = parse_super(&sb, vol.len)?;
    check_clean(&sb)?;
    drop(sb);
    check_mmp(vol, &s)?;
    let descs = read_descs(vol, &s)?;
    let bs = s.block_size;
    let itb = s.itable_blocks();
    let meta = fixed_meta(&s, &descs)?;

    let mut ext: Vec<Extent> = Vec::new();
    // Boot area and primary superblock (block 0 is in no group with 1 KiB blocks).
    push_blocks(&s, &mut ext, 0, 2048u64.div_ceil(bs));
    for &(a, n) in &meta {
        push_blocks(&s, &mut ext, a, n);
    }

    // The unused tails of the inode tables (not stored).
    let mut holes: Vec<Extent> = Vec::new();
    let ratio = s.cluster_ratio;
    let cbytes = bs * ratio;
    for (g, d) in descs.iter().enumerate() {
        let g = g as u64;
        if s.gd_csum() {
            if d.itable_unused > s.inodes_per_group {
                return Err(corrupt(format!("group {g}: {} unused inodes of {}", d.itable_unused, s.inodes_per_group)));
            }
            let unused = if d.flags & BG_INODE_UNINIT != 0 { s.inodes_per_group } else { d.itable_unused };
            let used_blocks = ((s.inodes_per_group - unused) * s.inode_size).div_ceil(bs);
            if used_blocks < itb {
                holes.push(((d.inode_table + used_blocks) * bs, (itb - used_blocks) * bs));
            }
            if d.flags & BG_BLOCK_UNINIT != 0 {
                // No bitmap on disk: the group holds only the metadata
                // placed in it, already added above. Its free count must
                // say so too, as e2fsck computes it: a group that holds
                // data but claims BLOCK_UNINIT would otherwise lose it.
                let free = s.group_blocks(g).div_ceil(ratio) - meta_clusters_in_group(&s, &meta, g);
                if free != d.free_clusters {
                    return Err(corrupt(format!(
                        "group {g} is flagged BLOCK_UNINIT (only its metadata in use: {free} free clusters), but \
                         its descriptor says {} free clusters",
                        d.free_clusters
                    )));
                }
                continue;
            }
        }
        let nbits = s.group_blocks(g).div_ceil(ratio);
        let bitmap = vol.read_vec(d.block_bitmap * bs, bs)?;
        let bytes = (s.clusters_per_group / 8) as usize;
        if s.metadata_csum() {
            let c = crc32c::update(s.csum_seed, &bitmap[..bytes]);
            let c = if s.desc_size >= 0x3A { c } else { c & 0xFFFF };
            if c != d.bitmap_csum {
                return Err(corrupt(format!(
                    "group {g} block bitmap checksum mismatch (stored {:#x}, computed {c:#x})",
                    d.bitmap_csum
                )));
            }
        }
        let first = s.group_first_block(g) * bs;
        let limit = s.blocks_count * bs;
        let free = bitmap_runs(&bitmap, nbits, |r, n| {
            let start = first + r * cbytes;
            let end = (start + n * cbytes).min(limit);
            ext.push((start, end - start));
        });
        if free != d.free_clusters {
            return Err(corrupt(format!(
                "group {g}: the block bitmap has {free} free clusters, the descriptor says {}",
                d.free_clusters
            )));
        }
    }
    check_free_total(&s, &descs)?;
    drop(descs);
    drop(meta);

    let total = s.blocks_count * bs;
    let (ext, _) = normalize(ext, total)?;
    holes.sort_unstable();
    let ext = subtract(ext, &holes);
    let used_bytes = ext.iter().map(|e| e.1).sum();
    let block_size = u32::try_from(cbytes).map_err(|_| corrupt("cluster size too large"))?;
    Ok(UsedMap { block_size, total_bytes: total, used_bytes, extents: ext })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Disk;
    use crate::testutil::{Rng, TempDir, output, sh};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const MB: u64 = 1 << 20;

    /// A tree of files: small and large, nested, empty, a symlink; `big`
    /// adds one file of that many bytes (to fill the filesystem).
    fn populate(dir: &Path, seed: u64, files: usize, big: u64) {
        let mut r = Rng(seed | 1);
        std::fs::create_dir_all(dir.join("d1/d2/d3")).unwrap();
        std::fs::create_dir_all(dir.join("many")).unwrap();
        for i in 0..files {
            let sub = ["", "d1", "d1/d2", "d1/d2/d3", "many"][i % 5];
            let len = match r.below(10) {
                0 => 0,
                1..=5 => r.below(4096),
                6..=8 => r.below(200_000),
                _ => r.below(3 * MB),
            } as usize;
            std::fs::write(dir.join(sub).join(format!("f{i}")), r.bytes(len)).unwrap();
        }
        std::os::unix::fs::symlink("d1/d2/d3/f3", dir.join("link")).unwrap();
        if big > 0 {
            std::fs::write(dir.join("big"), r.bytes(big as usize)).unwrap();
        }
    }

    struct Fs {
        _dir: TempDir,
        img: PathBuf,
        src: PathBuf,
        size: u64,
    }

    fn make_fs(tag: &str, size: u64, mkfs: &[&str], files: usize, big: u64) -> Fs {
        let dir = TempDir::new(tag);
        let img = dir.join("fs.img");
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        populate(&src, tag.len() as u64 * 7919 + files as u64, files, big);
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let mut args = vec!["-q", "-F"];
        args.extend_from_slice(mkfs);
        args.extend(["-d", src.to_str().unwrap(), img.to_str().unwrap()]);
        sh("mke2fs", &args);
        Fs { _dir: dir, img, src, size }
    }

    fn map_of(img: &Path) -> Result<UsedMap, FsError> {
        let d = Disk::open_source(img).unwrap();
        let len = d.size;
        used_map(&Volume::new(&d, 0, len))
    }

    fn field(text: &str, name: &str) -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap()))
    }

    fn range(s: &str) -> (u64, u64) {
        let s = s.trim();
        match s.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => (s.parse().unwrap(), s.parse().unwrap()),
        }
    }

    /// Used blocks per dumpe2fs: every block not listed free, less the
    /// unused tails of the inode tables (which klon does not store).
    fn expected(img: &Path) -> (Vec<bool>, u64) {
        let text = sh("dumpe2fs", &[img.to_str().unwrap()]);
        let count = field(&text, "Block count:").unwrap();
        let bs = field(&text, "Block size:").unwrap();
        let ratio = field(&text, "Cluster size:").map_or(1, |c| c / bs);
        let ipg = field(&text, "Inodes per group:").unwrap();
        let isz = field(&text, "Inode size:").unwrap_or(128);
        let csum = text
            .lines()
            .any(|l| l.starts_with("Filesystem features:") && (l.contains("metadata_csum") || l.contains("uninit_bg")));
        let mut used = vec![true; count as usize];
        let mut itable = (0, 0);
        let mut inode_uninit = false;
        let mut in_groups = false;
        for l in text.lines() {
            let t = l.trim();
            in_groups |= l.starts_with("Group ");
            if !in_groups {
                continue;
            }
            if t.starts_with("Group ") {
                inode_uninit = t.contains("INODE_UNINIT");
            } else if let Some(r) = t.strip_prefix("Inode table at ") {
                itable = range(r.split(' ').next().unwrap());
            } else if let Some(r) = t.strip_prefix("Free blocks:") {
                for part in r.split(',').filter(|p| !p.trim().is_empty()) {
                    let (a, b) = range(part);
                    // With bigalloc a range runs from its first cluster's to its last cluster's first block.
                    for blk in a..(b / ratio + 1) * ratio {
                        used[blk as usize] = false;
                    }
                }
            } else if csum && t.ends_with("unused inodes") {
                let unused: u64 = t.rsplit(", ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
                let unused = if inode_uninit { ipg } else { unused };
                let used_blocks = ((ipg - unused) * isz).div_ceil(bs);
                for blk in itable.0 + used_blocks..=itable.1 {
                    used[blk as usize] = false;
                }
            }
        }
        // The boot block / primary superblock.
        for b in used.iter_mut().take(2048usize.div_ceil(bs as usize)) {
            *b = true;
        }
        (used, bs)
    }

    fn blocks_of(m: &UsedMap, bs: u64, count: usize) -> Vec<bool> {
        let mut v = vec![false; count];
        for &(s, l) in &m.extents {
            assert!(s % bs == 0 && l % bs == 0, "extent {s}+{l} not block aligned");
            for b in s / bs..(s + l) / bs {
                v[b as usize] = true;
            }
        }
        v
    }

    /// Writes garbage over every byte the map leaves out (as a restore onto
    /// a used disk leaves them), then: e2fsck -fn is clean and every file
    /// reads back identical.
    fn restore_over_garbage(fs: &Fs, m: &UsedMap) {
        let copy = fs.img.with_extension("restored");
        std::fs::copy(&fs.img, &copy).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let junk = r.bytes(MB as usize);
        let mut pos = 0;
        let fill = |a: u64, b: u64| {
            let mut o = a;
            while o < b {
                let n = (b - o).min(MB);
                f.write_all_at(&junk[..n as usize], o).unwrap();
                o += n;
            }
        };
        for &(s, l) in &m.extents {
            fill(pos, s);
            pos = s + l;
        }
        fill(pos, fs.size);
        drop(f);
        let o = output(Command::new("e2fsck").args(["-fn", copy.to_str().unwrap()]));
        assert!(
            o.status.success(),
            "e2fsck -fn on the fs restored over garbage is not clean:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let out = fs.img.with_extension("out");
        std::fs::create_dir_all(&out).unwrap();
        sh("debugfs", &["-R", &format!("rdump / {}", out.display()), copy.to_str().unwrap()]);
        let d = output(Command::new("diff").args([
            "-r",
            "--no-dereference",
            "-x",
            "lost+found",
            fs.src.to_str().unwrap(),
            out.to_str().unwrap(),
        ]));
        assert!(d.status.success(), "files differ after restore over garbage:\n{}", String::from_utf8_lossy(&d.stdout));
        let _ = std::fs::remove_file(&copy);
        let _ = std::fs::remove_dir_all(&out);
    }

    fn check(tag: &str, size: u64, mkfs: &[&str], files: usize, big: u64) -> UsedMap {
        let fs = make_fs(tag, size, mkfs, files, big);
        let m = map_of(&fs.img).unwrap_or_else(|e| panic!("{tag}: used_map failed: {e}"));
        let (want, bs) = expected(&fs.img);
        assert_eq!(m.total_bytes, want.len() as u64 * bs, "{tag}: size");
        let got = blocks_of(&m, bs, want.len());
        let diff: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
        assert!(
            diff.is_empty(),
            "{tag}: {} blocks differ from dumpe2fs, first: {:?} (klon says used: {:?})",
            diff.len(),
            &diff[..diff.len().min(10)],
            diff.iter().take(10).map(|&i| got[i]).collect::<Vec<_>>()
        );
        assert_eq!(m.used_bytes, m.extents.iter().map(|e| e.1).sum::<u64>());
        restore_over_garbage(&fs, &m);
        eprintln!("{tag}: {} of {} bytes used, {} extents", m.used_bytes, m.total_bytes, m.extents.len());
        m
    }

    #[test]
    fn crc16_check_value() {
        // CRC-16/MODBUS (init 0xFFFF, reflected 0x8005, no xorout) and CRC-16/ARC (init 0).
        assert_eq!(crc16(0xFFFF, b"123456789"), 0x4B37);
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }

    #[test]
    fn subtract_holes() {
        let e = vec![(0, 10), (20, 10), (40, 10)];
        assert_eq!(subtract(e.clone(), &[]), e);
        assert_eq!(subtract(e.clone(), &[(5, 20)]), vec![(0, 5), (25, 5), (40, 10)]);
        assert_eq!(subtract(e.clone(), &[(0, 10), (42, 2), (48, 100)]), vec![(20, 10), (40, 2), (44, 4)]);
    }

    #[test]
    fn ext4_default_4k() {
        check("ext4-4k", 600 * MB, &["-t", "ext4", "-b", "4096"], 60, 0);
    }

    #[test]
    fn ext4_1k_blocks() {
        check("ext4-1k", 48 * MB, &["-t", "ext4", "-b", "1024"], 40, 0);
    }

    #[test]
    fn ext4_2k_blocks() {
        check("ext4-2k", 100 * MB, &["-t", "ext4", "-b", "2048"], 40, 0);
    }

    #[test]
    fn ext4_64k_blocks() {
        check("ext4-64k", 300 * MB, &["-t", "ext4", "-b", "65536"], 20, 0);
    }

    #[test]
    fn ext4_bigalloc() {
        check("ext4-bigalloc", 300 * MB, &["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"], 40, 0);
        check("ext4-bigalloc-1k", 256 * MB, &["-t", "ext4", "-b", "1024", "-O", "bigalloc", "-C", "16384"], 30, 0);
    }

    #[test]
    fn ext4_meta_bg() {
        // 1 KiB blocks and 1024-block groups: 40 groups, 16 descriptors a block.
        check(
            "ext4-metabg",
            40 * MB,
            &["-t", "ext4", "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode"],
            30,
            0,
        );
        check(
            "ext4-metabg-32",
            40 * MB,
            &["-t", "ext4", "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode,^64bit"],
            30,
            0,
        );
    }

    #[test]
    fn ext4_no_flex_bg() {
        check("ext4-noflex", 64 * MB, &["-t", "ext4", "-b", "1024", "-O", "^flex_bg"], 40, 0);
    }

    #[test]
    fn ext4_gdt_csum_crc16() {
        check("ext4-crc16", 64 * MB, &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum,^64bit,uninit_bg"], 40, 0);
    }

    #[test]
    fn ext3_and_ext2() {
        check("ext3", 64 * MB, &["-t", "ext3", "-b", "1024"], 40, 0);
        check("ext2", 64 * MB, &["-t", "ext2", "-b", "4096"], 40, 0);
        check("ext2-nosparse", 40 * MB, &["-t", "ext2", "-b", "1024", "-O", "^sparse_super,^resize_inode"], 20, 0);
    }

    #[test]
    fn ext4_sparse_super2_small_many_inodes_lazy() {
        check("ext4-sparse2", 64 * MB, &["-t", "ext4", "-b", "1024", "-O", "sparse_super2"], 20, 0);
        check("ext4-small-N", 64 * MB, &["-t", "ext4", "-T", "small", "-N", "6000"], 100, 0);
        check(
            "ext4-lazy",
            200 * MB,
            &["-t", "ext4", "-b", "4096", "-E", "lazy_itable_init=1", "-O", "^has_journal"],
            20,
            0,
        );
        check("ext4-mmp", 64 * MB, &["-t", "ext4", "-b", "4096", "-O", "mmp"], 10, 0);
    }

    #[test]
    fn ext4_empty_full_and_group_boundaries() {
        let m = check("ext4-empty", 64 * MB, &["-t", "ext4", "-b", "1024"], 0, 0);
        assert!(m.used_bytes < 8 * MB, "an empty fs uses {} bytes", m.used_bytes);
        check("ext4-full", 64 * MB, &["-t", "ext4", "-b", "1024", "-O", "^has_journal"], 10, 52 * MB);
        // Exactly 3 groups of 8 MiB, and 3 groups plus a short last one.
        check("ext4-3groups", 24 * MB, &["-t", "ext4", "-b", "1024"], 10, 0);
        check("ext4-3groups+", 24 * MB + 512 * 1024, &["-t", "ext4", "-b", "1024"], 10, 0);
    }

    fn set_and_expect_unclean(tag: &str, mkfs: &[&str], debugfs: &str, needle: &str) {
        let fs = make_fs(tag, 32 * MB, mkfs, 2, 0);
        sh("debugfs", &["-w", "-R", debugfs, fs.img.to_str().unwrap()]);
        match map_of(&fs.img) {
            Err(FsError::Unclean(m)) => assert!(m.contains(needle), "{tag}: {m}"),
            other => panic!("{tag}: expected Unclean, got {other:?}"),
        }
    }

    #[test]
    fn unclean_is_refused() {
        set_and_expect_unclean("needs-recovery", &["-t", "ext4"], "feature needs_recovery", "recovery");
        set_and_expect_unclean("state0", &["-t", "ext4"], "ssv state 0", "VALID");
        set_and_expect_unclean("state-error", &["-t", "ext2"], "ssv state 3", "ERROR");
    }

    #[test]
    fn checksum_mismatches_are_corrupt() {
        let fs = make_fs("csum", 32 * MB, &["-t", "ext4", "-b", "1024"], 5, 0);
        map_of(&fs.img).unwrap();
        let p = fs.img.to_str().unwrap();
        // A volume name change without fixing the checksum.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&fs.img).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 1024 + 0x78).unwrap();
        f.write_all_at(&[b[0] ^ 1], 1024 + 0x78).unwrap();
        assert!(matches!(map_of(&fs.img), Err(FsError::Corrupt(m)) if m.contains("superblock checksum")));
        f.write_all_at(&b, 1024 + 0x78).unwrap();
        // A descriptor's free count (group 0 descriptor at block 2 with 1 KiB blocks).
        f.read_exact_at(&mut b, 2048 + 0x0C).unwrap();
        f.write_all_at(&[b[0] ^ 1], 2048 + 0x0C).unwrap();
        assert!(matches!(map_of(&fs.img), Err(FsError::Corrupt(m)) if m.contains("descriptor checksum")));
        f.write_all_at(&b, 2048 + 0x0C).unwrap();
        // A block bitmap bit.
        let text = sh("dumpe2fs", &[p]);
        let bb: u64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Block bitmap at "))
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        f.read_exact_at(&mut b, bb * 1024 + 100).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], bb * 1024 + 100).unwrap();
        assert!(matches!(map_of(&fs.img), Err(FsError::Corrupt(m)) if m.contains("bitmap checksum")));
        f.write_all_at(&b, bb * 1024 + 100).unwrap();
        map_of(&fs.img).unwrap();
    }

    /// The superblock and descriptors of an image, as the reader parses them.
    fn super_and_descs(img: &Path) -> (Super, Vec<Desc>) {
        let d = Disk::open_source(img).unwrap();
        let vol = Volume::new(&d, 0, d.size);
        let s = parse_super(&vol.read_vec(1024, 1024).unwrap(), vol.len).unwrap();
        let descs = read_descs(&vol, &s).unwrap();
        (s, descs)
    }

    /// Runs debugfs -w commands on `img` in one session.
    fn debugfs_w(img: &Path, cmds: &[String]) {
        let file = img.with_extension("debugfs");
        std::fs::write(&file, cmds.join("\n") + "\n").unwrap();
        sh("debugfs", &["-w", "-f", file.to_str().unwrap(), img.to_str().unwrap()]);
        std::fs::remove_file(&file).unwrap();
    }

    /// e2fsck -fn: whether it found errors, and what it said.
    fn e2fsck_n(img: &Path) -> (bool, String) {
        let o = output(Command::new("e2fsck").args(["-fn", img.to_str().unwrap()]));
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    }

    /// The group (not 0) holding the most file data that has a bitmap.
    fn group_with_data(img: &Path) -> (u64, Desc) {
        let (s, descs) = super_and_descs(img);
        let (g, d) = descs
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, d)| d.flags & BG_BLOCK_UNINIT == 0)
            .min_by_key(|(g, d)| (d.free_clusters, *g))
            .unwrap();
        let g = g as u64;
        assert!(
            d.free_clusters + 100 < s.group_blocks(g) / s.cluster_ratio,
            "group {g} ({} free) holds too little data for the test",
            d.free_clusters
        );
        (g, *d)
    }

    /// Flags a group that holds file data BLOCK_UNINIT with a valid
    /// descriptor checksum (recomputed by debugfs): e2fsck sees it, and so
    /// must the reader (it used to skip the group's blocks: silent loss).
    fn forged_block_uninit(tag: &str, size: u64, mkfs: &[&str], big: u64) {
        let fs = make_fs(tag, size, mkfs, 40, big);
        map_of(&fs.img).unwrap();
        let (g, d) = group_with_data(&fs.img);
        debugfs_w(
            &fs.img,
            &[format!("set_bg {g} flags {}", d.flags | BG_BLOCK_UNINIT), format!("set_bg {g} checksum calc")],
        );
        let (clean, said) = e2fsck_n(&fs.img);
        assert!(
            !clean && said.contains("in use but group is marked BLOCK_UNINIT"),
            "{tag}: e2fsck -fn says:\n{}",
            &said[..said.len().min(2000)]
        );
        assert!(
            !said.contains("checksum"),
            "{tag}: the forged descriptor's checksum is not valid:\n{}",
            &said[..said.len().min(2000)]
        );
        match map_of(&fs.img) {
            Err(FsError::Corrupt(m)) => {
                assert!(
                    m.contains(&format!("group {g} is flagged BLOCK_UNINIT"))
                        && m.contains(&format!("says {} free", d.free_clusters)),
                    "{tag}: {m}"
                )
            }
            other => panic!("{tag}: a BLOCK_UNINIT group holding data must fail a check, got {other:?}"),
        }

        // Its free count made to match too: the descriptors now add up to
        // more free blocks than the superblock says.
        let (s, descs) = super_and_descs(&fs.img);
        let meta = fixed_meta(&s, &descs).unwrap();
        let uninit_free = s.group_blocks(g).div_ceil(s.cluster_ratio) - meta_clusters_in_group(&s, &meta, g);
        debugfs_w(
            &fs.img,
            &[format!("set_bg {g} free_blocks_count {uninit_free}"), format!("set_bg {g} checksum calc")],
        );
        let (clean, said) = e2fsck_n(&fs.img);
        assert!(
            !clean && said.contains("marked BLOCK_UNINIT"),
            "{tag}: e2fsck -fn says:\n{}",
            &said[..said.len().min(2000)]
        );
        let sum: u64 = super_and_descs(&fs.img).1.iter().map(|d| d.free_clusters).sum::<u64>() * s.cluster_ratio;
        match map_of(&fs.img) {
            Err(FsError::Corrupt(m)) => assert!(
                m.contains(&format!("add up to {sum} free blocks, the superblock says {}", s.free_blocks)),
                "{tag}: {m}"
            ),
            other => panic!("{tag}: descriptors that disagree with the superblock must fail a check, got {other:?}"),
        }
    }

    #[test]
    fn block_uninit_group_holding_data_is_corrupt() {
        forged_block_uninit("uninit-crc32c", 64 * MB, &["-t", "ext4", "-b", "1024"], 24 * MB);
        forged_block_uninit(
            "uninit-crc16",
            64 * MB,
            &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum,^64bit,uninit_bg"],
            24 * MB,
        );
        // Groups of 8192 clusters of 4 KiB: 32 MiB.
        forged_block_uninit(
            "uninit-bigalloc",
            128 * MB,
            &["-t", "ext4", "-b", "1024", "-O", "bigalloc", "-C", "4096"],
            48 * MB,
        );
    }

    /// The superblock's free count off by one: e2fsck reports it, the
    /// reader fails the check (the partition goes raw, with a warning).
    #[test]
    fn superblock_free_count_mismatch_is_corrupt() {
        for (tag, mkfs) in [
            ("sb-free-4k", &["-t", "ext4", "-b", "4096"][..]),
            ("sb-free-ext2", &["-t", "ext2", "-b", "1024"][..]),
            ("sb-free-bigalloc", &["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"][..]),
        ] {
            let fs = make_fs(tag, 64 * MB, mkfs, 20, 0);
            map_of(&fs.img).unwrap();
            let (s, _) = super_and_descs(&fs.img);
            debugfs_w(&fs.img, &[format!("ssv free_blocks_count {}", s.free_blocks + 1)]);
            let (_, said) = e2fsck_n(&fs.img);
            let want = format!("Free blocks count wrong ({}, counted={})", s.free_blocks + 1, s.free_blocks);
            assert!(said.contains(&want), "{tag}: e2fsck -fn says:\n{said}");
            match map_of(&fs.img) {
                Err(FsError::Corrupt(m)) => assert!(
                    m.contains(&format!(
                        "add up to {} free blocks, the superblock says {}",
                        s.free_blocks,
                        s.free_blocks + 1
                    )),
                    "{tag}: {m}"
                ),
                other => panic!("{tag}: a superblock free count off by one must fail a check, got {other:?}"),
            }
        }
    }

    /// Flips bytes in the superblock, the descriptors and the bitmaps
    /// hundreds of times: used_map must answer Ok or Err, never panic.
    fn mutate(tag: &str, mkfs: &[&str], rounds: usize) {
        let fs = make_fs(tag, 24 * MB, mkfs, 10, 0);
        let base = map_of(&fs.img).unwrap();
        let text = sh("dumpe2fs", &[fs.img.to_str().unwrap()]);
        let bs = field(&text, "Block size:").unwrap();
        // Regions: superblock, the first 8 blocks after it (descriptors,
        // reserved GDT, bitmaps with flex_bg), and each group's bitmaps.
        let mut regions: Vec<(u64, u64)> = vec![(1024, 1024), (1024 + 1024, 8 * bs)];
        for l in text.lines() {
            let t = l.trim();
            for pre in ["Block bitmap at ", "Inode bitmap at ", "Group descriptors at "] {
                if let Some(r) = t.strip_prefix(pre) {
                    let b: u64 = r.split(['-', ' ', ',']).next().unwrap().parse().unwrap();
                    regions.push((b * bs, bs));
                }
            }
        }
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&fs.img).unwrap();
        let mut r = Rng(0x1234_5678_9abc_def1 ^ tag.len() as u64);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..rounds {
            let (start, len) = regions[r.below(regions.len() as u64) as usize];
            let n = 1 + r.below(4) as usize;
            let mut saved = Vec::new();
            for _ in 0..n {
                let off = start + r.below(len);
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, off).unwrap();
                saved.push((off, b[0]));
                let v = match r.below(4) {
                    0 => 0,
                    1 => 0xFF,
                    2 => b[0] ^ (1 << r.below(8)),
                    _ => r.next() as u8,
                };
                f.write_all_at(&[v], off).unwrap();
            }
            let res = std::panic::catch_unwind(|| map_of(&fs.img));
            match res {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(_)) => err += 1,
                Err(_) => panic!("{tag}: used_map panicked after mutating {saved:?}"),
            }
            for (off, b) in saved.into_iter().rev() {
                f.write_all_at(&[b], off).unwrap();
            }
        }
        assert_eq!(map_of(&fs.img).unwrap(), base);
        eprintln!("{tag}: {rounds} mutations: {ok} ok, {err} errors");
    }

    #[test]
    fn mutations_never_panic() {
        // Without checksums most flips reach the parser; with them most are caught.
        mutate("mut-ext2", &["-t", "ext2", "-b", "1024"], 400);
        mutate(
            "mut-ext4-nocsum",
            &["-t", "ext4", "-b", "1024", "-O", "^metadata_csum,meta_bg,^resize_inode", "-g", "1024"],
            400,
        );
        mutate("mut-ext4", &["-t", "ext4", "-b", "4096"], 200);
    }
}
