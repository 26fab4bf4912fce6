//! XFS: which blocks of the data device are in use.
//!
//! Per allocation group (AG) everything is used except the free extents
//! recorded in the free-space B+tree indexed by block number (the "bnobt",
//! rooted in the AGF) and the blocks on the AG free list (AGFL). The
//! internal log lives inside an AG as allocated space, so it is copied.
//!
//! Checked on the way: the superblock, AGF, AGFL and bnobt magics; on v5
//! (CRC) filesystems their CRC-32C, UUIDs, AG numbers and self-addresses;
//! the btree levels (bounded by what the AG size allows), record counts,
//! sibling links, that records are sorted, inside the AG and clear of the AG
//! headers and the log, and that they add up to the AGF's free-block count
//! and longest extent. The free list is circular (`flfirst..=fllast`,
//! `flcount` entries, wrapping at the AGFL size).
//!
//! Counters: the AGF's free-block count and longest free extent are
//! authoritative (the allocator keeps them in the same transactions as the
//! bnobt, and xfs_repair checks them against it), so a disagreement is
//! `Corrupt`. The superblock's free-block count (sb_fdblocks) is not
//! compared: with lazy-count (every v5 filesystem, and most v4 ones) it is
//! only written at unmount and recomputed from the AGFs at mount, so it is
//! not authoritative; without lazy-count it also counts the free-space
//! btrees' own blocks, which this reader does not walk.
//!
//! XFS has no clean flag: the log tells. Its head is found from the cycle
//! numbers stamped in every 512-byte log block (the last pass's cycle
//! minus one after the head), and the filesystem is clean only if the last
//! record written before the head is a complete unmount record.
//!
//! Out of scope, reported as `Corrupt` (copied raw): an external log, a
//! real-time subvolume, unknown incompatible features.

use std::collections::HashSet;

use super::Extent;
use super::{Driver, FsError, UsedMap, Volume, crc32c::crc32c, normalize};

/// The XFS used-block reader.
pub const DRIVER: Driver = Driver { fstypes: &["xfs"], used_map };

const SB_MAGIC: u32 = 0x5846_5342; // "XFSB"
const AGF_MAGIC: u32 = 0x5841_4746; // "XAGF"
const AGFL_MAGIC: u32 = 0x5841_464C; // "XAFL"
const BNO_MAGIC_V4: u32 = 0x4142_5442; // "ABTB"
const BNO_MAGIC_V5: u32 = 0x4142_3342; // "AB3B"
const LOG_MAGIC: u32 = 0xFEED_BABE;
const NULL_AGBLOCK: u32 = u32::MAX;

/// Offsets of the CRC fields (v5).
const SB_CRC_OFF: usize = 224;
const AGF_CRC_OFF: usize = 216;
const AGFL_CRC_OFF: usize = 32;
const BTREE_CRC_OFF: usize = 52;
/// Sizes of the v5 AGFL header and of the short btree block headers.
const AGFL_HDR_V5: usize = 36;
const BTREE_HDR_V4: usize = 16;
const BTREE_HDR_V5: usize = 56;

/// Incompatible features (v5) this reader understands: ftype, sparse
/// inodes, meta_uuid, bigtime, nrext64, exchange-range, parent pointers.
/// None of them changes the AG headers or the free-space btree.
const INCOMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
const INCOMPAT_META_UUID: u32 = 0x4;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
/// `sb_versionnum` bit: version 2 log.
const VERSION_LOGV2: u16 = 0x0400;

/// Log geometry: 512-byte basic blocks; a record header's cycle data
/// covers 32 KiB of record; at most 8 in-core logs of up to 256 KiB each
/// may be in flight, so torn writes lie within 4096 blocks of the head.
const BB: u64 = 512;
const LOG_HEADER_CYCLE_SIZE: u64 = 32 * 1024;
const LOG_INFLIGHT_BBS: u64 = 8 * (256 * 1024) / BB;
const LOG_REC_HEADER_LEN: usize = 328; // sizeof(struct xlog_rec_header)
const LOG_EXT_HEADER_LEN: usize = 260; // sizeof(struct xlog_rec_ext_header)
const LOG_OP_UNMOUNT: u8 = 0x20;

fn corrupt(msg: impl Into<String>) -> FsError {
    FsError::Corrupt(format!("XFS: {}", msg.into()))
}

fn field<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], FsError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| corrupt(format!("structure too short for a field at byte {off}")))
}
fn be16(b: &[u8], off: usize) -> Result<u16, FsError> {
    field::<2>(b, off).map(u16::from_be_bytes)
}
fn be32(b: &[u8], off: usize) -> Result<u32, FsError> {
    field::<4>(b, off).map(u32::from_be_bytes)
}
fn be64(b: &[u8], off: usize) -> Result<u64, FsError> {
    field::<8>(b, off).map(u64::from_be_bytes)
}

/// Checks the CRC-32C of a v5 metadata block whose CRC field (stored
/// little-endian) is at `crc_off`, computed with that field zeroed.
fn check_crc(b: &[u8], crc_off: usize, what: &str) -> Result<(), FsError> {
    let stored = field::<4>(b, crc_off).map(u32::from_le_bytes)?;
    let mut copy = b.to_vec();
    copy[crc_off..crc_off + 4].fill(0);
    let computed = crc32c(&copy);
    if stored != computed {
        return Err(corrupt(format!("{what}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")));
    }
    Ok(())
}

/// What the superblock says.
#[derive(Debug)]
struct Sb {
    v5: bool,
    block_size: u64,
    sect_size: u64,
    dblocks: u64,
    agblocks: u64,
    agcount: u64,
    /// UUID the metadata blocks are stamped with (v5).
    meta_uuid: [u8; 16],
    /// UUID the log records carry.
    uuid: [u8; 16],
    /// Log position: AG, block within it, length in blocks.
    log_ag: u64,
    log_agbno: u64,
    log_blocks: u64,
    log_v2: bool,
}

impl Sb {
    /// Byte offset of block `agbno` of AG `agno`.
    fn ag_byte(&self, agno: u64, agbno: u64) -> u64 {
        // Bounded: agno < agcount, agbno < agblocks, and the whole
        // filesystem fits the partition (checked in read_sb).
        (agno * self.agblocks + agbno) * self.block_size
    }

    /// Length of AG `agno` in blocks (the last one may be short).
    fn ag_len(&self, agno: u64) -> u64 {
        (self.dblocks - agno * self.agblocks).min(self.agblocks)
    }

    fn btree_hdr(&self) -> usize {
        if self.v5 { BTREE_HDR_V5 } else { BTREE_HDR_V4 }
    }

    /// Entries in the AGFL.
    fn agfl_size(&self) -> u64 {
        let hdr = if self.v5 { AGFL_HDR_V5 as u64 } else { 0 };
        (self.sect_size - hdr) / 4
    }

    /// Blocks at the start of each AG holding the four AG headers.
    fn header_blocks(&self) -> u64 {
        (4 * self.sect_size).div_ceil(self.block_size)
    }
}

fn read_sb(vol: &Volume) -> Result<Sb, FsError> {
    let first = vol.read_vec(0, 512)?;
    if be32(&first, 0)? != SB_MAGIC {
        return Err(corrupt("no superblock magic \"XFSB\""));
    }
    let sect_size = be16(&first, 102)? as u64;
    if !(512..=32768).contains(&sect_size)
        || !sect_size.is_power_of_two()
        || 1u64.checked_shl(first[121].into()) != Some(sect_size)
    {
        return Err(corrupt(format!("implausible sector size {sect_size}")));
    }
    let b = vol.read_vec(0, sect_size)?;
    let block_size = be32(&b, 4)? as u64;
    if !(512..=65536).contains(&block_size)
        || !block_size.is_power_of_two()
        || 1u64.checked_shl(b[120].into()) != Some(block_size)
    {
        return Err(corrupt(format!("implausible block size {block_size}")));
    }
    if block_size < sect_size {
        return Err(corrupt(format!("block size {block_size} smaller than the sector size {sect_size}")));
    }
    let version = be16(&b, 100)?;
    let v5 = match version & 0xf {
        4 => false,
        5 => true,
        v => return Err(corrupt(format!("superblock version {v} is not supported (only 4 and 5)"))),
    };
    if v5 {
        check_crc(&b, SB_CRC_OFF, "superblock")?;
    }
    let dblocks = be64(&b, 8)?;
    let rblocks = be64(&b, 16)?;
    let uuid: [u8; 16] = field(&b, 32)?;
    let logstart = be64(&b, 48)?;
    let agblocks = be32(&b, 84)? as u64;
    let agcount = be32(&b, 88)? as u64;
    let log_blocks = be32(&b, 96)? as u64;
    let agblklog = b[124] as u32;
    if b[126] != 0 {
        return Err(corrupt("the superblock says mkfs did not finish (sb_inprogress)"));
    }
    if !(16..=(1 << 31)).contains(&agblocks)
        || agblklog > 31
        || (1u64 << agblklog) < agblocks
        || (1u64 << agblklog) >= 2 * agblocks
    {
        return Err(corrupt(format!("implausible AG size {agblocks} blocks (agblklog {agblklog})")));
    }
    if agcount == 0 {
        return Err(corrupt("zero allocation groups"));
    }
    let full = (agcount - 1) * agblocks; // < 2^32 * 2^31: no overflow
    if dblocks <= full || dblocks > full + agblocks {
        return Err(corrupt(format!("{dblocks} blocks do not make {agcount} AGs of {agblocks} blocks")));
    }
    let total = dblocks.checked_mul(block_size).filter(|&t| t <= vol.len).ok_or_else(|| {
        corrupt(format!(
            "the filesystem ({dblocks} blocks of {block_size} bytes) is larger than its partition ({} bytes)",
            vol.len
        ))
    })?;
    let _ = total;
    if rblocks != 0 {
        return Err(corrupt("a real-time subvolume is not supported"));
    }
    if logstart == 0 {
        return Err(corrupt("an external log is not supported"));
    }
    let mut meta_uuid = uuid;
    if v5 {
        let incompat = be32(&b, 216)?;
        if incompat & INCOMPAT_NEEDSREPAIR != 0 {
            return Err(FsError::Unclean("the XFS filesystem is flagged as needing repair: run xfs_repair".into()));
        }
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(corrupt(format!("unknown incompatible features {:#x}", incompat & !INCOMPAT_KNOWN)));
        }
        if incompat & INCOMPAT_META_UUID != 0 {
            meta_uuid = field(&b, 248)?;
        }
    }
    let log_ag = logstart >> agblklog;
    let log_agbno = logstart & ((1u64 << agblklog) - 1);
    let sb = Sb {
        v5,
        block_size,
        sect_size,
        dblocks,
        agblocks,
        agcount,
        meta_uuid,
        uuid,
        log_ag,
        log_agbno,
        log_blocks,
        log_v2: v5 || version & VERSION_LOGV2 != 0,
    };
    if log_ag >= agcount
        || log_blocks == 0
        || log_agbno < sb.header_blocks()
        || log_agbno + log_blocks > sb.ag_len(log_ag)
    {
        return Err(corrupt(format!(
            "the internal log (block {log_agbno} of AG {log_ag}, {log_blocks} blocks) lies outside its AG"
        )));
    }
    Ok(sb)
}

/// The most levels a free-space btree of an AG can have (each block at
/// least half full, at most one free extent per two blocks).
fn max_levels(sb: &Sb) -> u32 {
    let room = sb.block_size as usize - sb.btree_hdr();
    let min_leaf = (room / 8 / 2).max(1) as u64;
    let min_node = (room / 12 / 2).max(2) as u64;
    let mut blocks = sb.agblocks.div_ceil(2).div_ceil(min_leaf);
    let mut levels = 1;
    while blocks > 1 {
        blocks = blocks.div_ceil(min_node);
        levels += 1;
    }
    levels
}

/// Builds the used ranges of one AG from its free extents, met in order.
struct AgUsed<'a> {
    sb: &'a Sb,
    agno: u64,
    len: u64,
    /// Blocks on the free list, sorted.
    agfl: Vec<u64>,
    agfl_i: usize,
    /// Next block not yet accounted for.
    cursor: u64,
    /// Blocks the AG headers occupy, and the log's range within this AG.
    headers: u64,
    log: Option<(u64, u64)>,
    free_blocks: u64,
    longest: u64,
    out: &'a mut Vec<Extent>,
}

impl AgUsed<'_> {
    /// A free extent from the bnobt.
    fn free(&mut self, start: u64, count: u64) -> Result<(), FsError> {
        let end = start.checked_add(count).filter(|&e| count > 0 && e <= self.len).ok_or_else(|| {
            corrupt(format!(
                "AG {}: free extent {start}+{count} is empty or outside the AG ({} blocks)",
                self.agno, self.len
            ))
        })?;
        if start < self.cursor {
            return Err(corrupt(format!(
                "AG {}: free extents out of order or overlapping at block {start}",
                self.agno
            )));
        }
        if start < self.headers {
            return Err(corrupt(format!("AG {}: free extent {start}+{count} covers the AG headers", self.agno)));
        }
        if let Some((ls, le)) = self.log
            && start < le
            && ls < end
        {
            return Err(corrupt(format!("AG {}: free extent {start}+{count} overlaps the log", self.agno)));
        }
        self.used(self.cursor, start)?;
        self.cursor = end;
        self.free_blocks += count;
        self.longest = self.longest.max(count);
        Ok(())
    }

    /// Blocks `a..b` are not in the bnobt: used, unless on the free list.
    fn used(&mut self, a: u64, b: u64) -> Result<(), FsError> {
        let mut pos = a;
        while let Some(&f) = self.agfl.get(self.agfl_i) {
            if f >= b {
                break;
            }
            if f < pos {
                return Err(corrupt(format!(
                    "AG {}: block {f} is both on the free list and free in the bnobt, or listed twice",
                    self.agno
                )));
            }
            self.push(pos, f);
            pos = f + 1;
            self.agfl_i += 1;
        }
        self.push(pos, b);
        Ok(())
    }

    fn push(&mut self, a: u64, b: u64) {
        if b > a {
            self.out.push((self.sb.ag_byte(self.agno, a), (b - a) * self.sb.block_size));
        }
    }

    fn finish(mut self) -> Result<(u64, u64), FsError> {
        self.used(self.cursor, self.len)?;
        if self.agfl_i != self.agfl.len() {
            return Err(corrupt(format!("AG {}: free list entries outside the AG", self.agno)));
        }
        Ok((self.free_blocks, self.longest))
    }
}

/// Walks the bnobt depth first, in key order, checking each block.
struct BnoWalk<'a, 'b> {
    vol: &'a Volume<'a>,
    sb: &'a Sb,
    agno: u64,
    len: u64,
    seen: HashSet<u64>,
    /// Per level: the last block met and its right sibling pointer.
    last: Vec<Option<(u64, u32)>>,
    acc: AgUsed<'b>,
}

impl BnoWalk<'_, '_> {
    /// Visits block `agbno`, expected at `level`, whose records must have
    /// start blocks in `lo..hi`.
    fn visit(&mut self, agbno: u64, level: u32, lo: u64, hi: u64) -> Result<(), FsError> {
        let (agno, sb) = (self.agno, self.sb);
        let here = format!("AG {agno} bnobt block {agbno}");
        if agbno < sb.header_blocks() || agbno >= self.len {
            return Err(corrupt(format!("{here}: pointer outside the AG")));
        }
        if !self.seen.insert(agbno) {
            return Err(corrupt(format!("{here}: reached twice")));
        }
        let b = self.vol.read_vec(sb.ag_byte(agno, agbno), sb.block_size)?;
        let magic = be32(&b, 0)?;
        let want = if sb.v5 { BNO_MAGIC_V5 } else { BNO_MAGIC_V4 };
        if magic != want {
            return Err(corrupt(format!("{here}: bad magic {magic:#010x}")));
        }
        if sb.v5 {
            check_crc(&b, BTREE_CRC_OFF, &here)?;
            let daddr = sb.ag_byte(agno, agbno) / BB;
            if be64(&b, 16)? != daddr {
                return Err(corrupt(format!("{here}: records another address")));
            }
            if field::<16>(&b, 32)? != sb.meta_uuid {
                return Err(corrupt(format!("{here}: belongs to another filesystem (UUID)")));
            }
            if be32(&b, 48)? as u64 != agno {
                return Err(corrupt(format!("{here}: belongs to another AG")));
            }
        }
        let blevel = be16(&b, 4)? as u32;
        let numrecs = be16(&b, 6)? as usize;
        let (left, right) = (be32(&b, 8)?, be32(&b, 12)?);
        if blevel != level {
            return Err(corrupt(format!("{here}: level {blevel}, expected {level}")));
        }
        // Sibling links: each level is a list in key order.
        let slot = &mut self.last[level as usize];
        match *slot {
            None if left != NULL_AGBLOCK => return Err(corrupt(format!("{here}: leftmost block has a left sibling"))),
            Some((prev, prev_right)) if left as u64 != prev || prev_right as u64 != agbno => {
                return Err(corrupt(format!("{here}: sibling pointers disagree with the tree")));
            }
            _ => {}
        }
        *slot = Some((agbno, right));

        let hdr = sb.btree_hdr();
        let room = sb.block_size as usize - hdr;
        if level == 0 {
            let maxrecs = room / 8;
            if numrecs > maxrecs {
                return Err(corrupt(format!("{here}: {numrecs} records, at most {maxrecs} fit")));
            }
            for i in 0..numrecs {
                let start = be32(&b, hdr + 8 * i)? as u64;
                let count = be32(&b, hdr + 8 * i + 4)? as u64;
                if start < lo || start >= hi {
                    return Err(corrupt(format!("{here}: record {i} lies outside its parent key range")));
                }
                self.acc.free(start, count)?;
            }
        } else {
            let maxrecs = room / 12;
            if numrecs == 0 || numrecs > maxrecs {
                return Err(corrupt(format!("{here}: {numrecs} keys, expected 1..={maxrecs}")));
            }
            let ptrs = hdr + 8 * maxrecs;
            let mut keys = Vec::with_capacity(numrecs);
            for i in 0..numrecs {
                keys.push((be32(&b, hdr + 8 * i)? as u64, be32(&b, ptrs + 4 * i)? as u64));
            }
            drop(b);
            for i in 0..numrecs {
                let (key, ptr) = keys[i];
                let next = keys.get(i + 1).map_or(hi, |k| k.0);
                if key < lo || key >= next || next > hi {
                    return Err(corrupt(format!("{here}: keys out of order or outside the parent's range")));
                }
                self.visit(ptr, level - 1, key, next)?;
            }
        }
        Ok(())
    }
}

/// Reads AG `agno` and appends its used byte ranges to `out`.
fn read_ag(vol: &Volume, sb: &Sb, agno: u64, out: &mut Vec<Extent>) -> Result<(), FsError> {
    let len = sb.ag_len(agno);
    let base = sb.ag_byte(agno, 0);
    let agf = vol.read_vec(base + sb.sect_size, sb.sect_size)?;
    let here = format!("AGF {agno}");
    if be32(&agf, 0)? != AGF_MAGIC {
        return Err(corrupt(format!("{here}: no magic \"XAGF\"")));
    }
    if sb.v5 {
        check_crc(&agf, AGF_CRC_OFF, &here)?;
        if field::<16>(&agf, 64)? != sb.meta_uuid {
            return Err(corrupt(format!("{here}: belongs to another filesystem (UUID)")));
        }
    }
    if be32(&agf, 4)? != 1 {
        return Err(corrupt(format!("{here}: unknown version {}", be32(&agf, 4)?)));
    }
    if be32(&agf, 8)? as u64 != agno {
        return Err(corrupt(format!("{here}: records AG number {}", be32(&agf, 8)?)));
    }
    if be32(&agf, 12)? as u64 != len {
        return Err(corrupt(format!("{here}: length {} blocks, the superblock implies {len}", be32(&agf, 12)?)));
    }
    let bno_root = be32(&agf, 16)? as u64;
    let bno_levels = be32(&agf, 28)?;
    let (flfirst, fllast, flcount) = (be32(&agf, 40)? as u64, be32(&agf, 44)? as u64, be32(&agf, 48)? as u64);
    let freeblks = be32(&agf, 52)? as u64;
    let longest = be32(&agf, 56)? as u64;
    let maxl = max_levels(sb);
    if bno_levels == 0 || bno_levels > maxl {
        return Err(corrupt(format!("{here}: bnobt has {bno_levels} levels, at most {maxl} possible")));
    }

    // The free list: a circular array of flcount entries from flfirst.
    let size = sb.agfl_size();
    if flfirst >= size || fllast >= size || flcount > size {
        return Err(corrupt(format!(
            "{here}: free list bounds {flfirst}..{fllast} ({flcount}) beyond its {size} slots"
        )));
    }
    let active = if flcount == 0 { 0 } else { (fllast + size - flfirst) % size + 1 };
    if active != flcount {
        return Err(corrupt(format!("{here}: free list {flfirst}..={fllast} does not hold {flcount} entries")));
    }
    let agfl_buf = vol.read_vec(base + 3 * sb.sect_size, sb.sect_size)?;
    let hdr = if sb.v5 {
        let h = format!("AGFL {agno}");
        if be32(&agfl_buf, 0)? != AGFL_MAGIC {
            return Err(corrupt(format!("{h}: no magic \"XAFL\"")));
        }
        check_crc(&agfl_buf, AGFL_CRC_OFF, &h)?;
        if be32(&agfl_buf, 4)? as u64 != agno {
            return Err(corrupt(format!("{h}: records another AG number")));
        }
        if field::<16>(&agfl_buf, 8)? != sb.meta_uuid {
            return Err(corrupt(format!("{h}: belongs to another filesystem (UUID)")));
        }
        AGFL_HDR_V5
    } else {
        0
    };
    let mut agfl = Vec::with_capacity(flcount as usize);
    for k in 0..flcount {
        let slot = ((flfirst + k) % size) as usize;
        let bno = be32(&agfl_buf, hdr + 4 * slot)? as u64;
        if bno < sb.header_blocks() || bno >= len {
            return Err(corrupt(format!("AGFL {agno}: entry {slot} ({bno}) outside the AG's free space")));
        }
        agfl.push(bno);
    }
    agfl.sort_unstable();

    let log = (agno == sb.log_ag).then(|| (sb.log_agbno, sb.log_agbno + sb.log_blocks));
    if let Some((ls, le)) = log
        && agfl.iter().any(|&f| f >= ls && f < le)
    {
        return Err(corrupt(format!("AGFL {agno}: a free-list block lies in the log")));
    }
    let acc = AgUsed {
        sb,
        agno,
        len,
        agfl,
        agfl_i: 0,
        cursor: 0,
        headers: sb.header_blocks(),
        log,
        free_blocks: 0,
        longest: 0,
        out,
    };
    let mut walk = BnoWalk { vol, sb, agno, len, seen: HashSet::new(), last: vec![None; bno_levels as usize], acc };
    walk.visit(bno_root, bno_levels - 1, 0, len)?;
    if walk.last.iter().any(|l| l.is_some_and(|(_, right)| right != NULL_AGBLOCK)) {
        return Err(corrupt(format!("AG {agno}: the bnobt's rightmost block has a right sibling")));
    }
    let (free, long) = walk.acc.finish()?;
    if free != freeblks || long != longest {
        return Err(corrupt(format!(
            "AG {agno}: the bnobt holds {free} free blocks (longest {long}), the AGF says {freeblks} (longest {longest})"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- the log

/// The internal log as a circular array of 512-byte blocks.
struct Log<'a> {
    vol: &'a Volume<'a>,
    /// Byte offset of the log in the partition, and its length in blocks.
    start: u64,
    bbs: u64,
}

impl Log<'_> {
    /// Reads `n` blocks from block `first` on, wrapping at the end.
    fn read(&self, first: u64, n: u64) -> Result<Vec<u8>, FsError> {
        if n > self.bbs {
            return Err(corrupt("a log record is longer than the log"));
        }
        let first = first % self.bbs;
        let head = n.min(self.bbs - first);
        let mut buf = self.vol.read_vec(self.start + first * BB, head * BB)?;
        if head < n {
            buf.extend(self.vol.read_vec(self.start, (n - head) * BB)?);
        }
        Ok(buf)
    }

    /// The cycle number stamped in block `bb`.
    fn cycle(&self, bb: u64) -> Result<u32, FsError> {
        let mut w = [0u8; 8];
        self.vol.read_at(&mut w, self.start + (bb % self.bbs) * BB)?;
        Ok(cycle_of(&w))
    }

    /// The first block in `from..from+n` stamped with `cycle`.
    fn find_cycle(&self, from: u64, n: u64, cycle: u32) -> Result<Option<u64>, FsError> {
        const CHUNK: u64 = 256;
        let mut done = 0;
        while done < n {
            let k = CHUNK.min(n - done);
            let buf = self.read(from + done, k)?;
            for (i, bb) in buf.chunks_exact(BB as usize).enumerate() {
                if cycle_of(bb) == cycle {
                    return Ok(Some(from + done + i as u64));
                }
            }
            done += k;
        }
        Ok(None)
    }

    /// The head: the block after the last one written. Cycle numbers are
    /// `c` before it and `c - 1` after (from the previous pass); holes left
    /// by writes in flight lie within LOG_INFLIGHT_BBS before it.
    fn head(&self) -> Result<u64, FsError> {
        let l = self.bbs;
        let first = self.cycle(0)?;
        let last = self.cycle(l - 1)?;
        let (mut head, stop) = if first == last {
            (l, last.wrapping_sub(1))
        } else {
            if first != last.wrapping_add(1) {
                return Err(corrupt(format!("log cycle numbers {first} (start) and {last} (end) are inconsistent")));
            }
            // The first block of cycle `last`.
            let (mut lo, mut hi) = (0, l - 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if self.cycle(mid)? == last {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            (hi, last)
        };
        let scan = LOG_INFLIGHT_BBS.min(l);
        if head >= scan {
            if let Some(b) = self.find_cycle(head - scan, scan, stop)? {
                head = b;
            }
        } else if let Some(b) = self.find_cycle(l - (scan - head), scan - head, stop.wrapping_sub(1))? {
            head = b;
        } else if let Some(b) = self.find_cycle(0, head, stop)? {
            head = b;
        }
        Ok(head % l)
    }
}

/// A log block's cycle: the second word of a record header, else the first.
fn cycle_of(bb: &[u8]) -> u32 {
    let w = |i: usize| u32::from_be_bytes([bb[i], bb[i + 1], bb[i + 2], bb[i + 3]]);
    if w(0) == LOG_MAGIC { w(4) } else { w(0) }
}

const DIRTY: &str = "the XFS log is dirty (mounted, or not cleanly unmounted): mount and unmount it, or run xfs_repair";

/// Checks that the last record before the log head is a complete unmount
/// record: otherwise the log needs recovery.
fn check_log(vol: &Volume, sb: &Sb) -> Result<(), FsError> {
    let log = Log { vol, start: sb.ag_byte(sb.log_ag, sb.log_agbno), bbs: sb.log_blocks * sb.block_size / BB };
    let l = log.bbs;
    let head = log.head()?;
    // The last record header before the head (records are at most
    // 256 KiB, plus header blocks).
    let scan = LOG_INFLIGHT_BBS.min(l);
    let window = log.read(head + l - scan, scan)?;
    let pos = window
        .chunks_exact(BB as usize)
        .rposition(|bb| bb[..4] == LOG_MAGIC.to_be_bytes())
        .ok_or_else(|| FsError::Unclean(format!("{DIRTY} (no log record before the head)")))?;
    let rec_bb = (head + l - scan + pos as u64) % l;
    let h = &window[pos * BB as usize..(pos + 1) * BB as usize];
    let cycle = be32(h, 4)?;
    let version = be32(h, 8)?;
    let len = be32(h, 12)? as u64;
    let lsn = be64(h, 16)?;
    let num_ops = be32(h, 40)?;
    let rec_size = be32(h, 320)? as u64;
    if lsn != (u64::from(cycle) << 32 | rec_bb) || !(version == 1 || (version == 2 && sb.log_v2)) {
        return Err(corrupt(format!("log record header at block {rec_bb} is inconsistent")));
    }
    if field::<16>(h, 304)? != sb.uuid {
        return Err(corrupt("the log belongs to another filesystem (UUID)"));
    }
    let hblks =
        if version == 2 && rec_size > LOG_HEADER_CYCLE_SIZE { rec_size.div_ceil(LOG_HEADER_CYCLE_SIZE) } else { 1 };
    let data_bbs = len.div_ceil(BB);
    if hblks > 8 || len == 0 || len > 256 * 1024 {
        return Err(corrupt(format!("log record at block {rec_bb} has an implausible size")));
    }
    if (rec_bb + hblks + data_bbs) % l != head || num_ops != 1 {
        return Err(FsError::Unclean(DIRTY.into()));
    }
    let rec = log.read(rec_bb, hblks + data_bbs)?;
    if rec.chunks_exact(BB as usize).any(|bb| cycle_of(bb) != cycle) {
        return Err(FsError::Unclean(format!("{DIRTY} (the last record is torn)")));
    }
    let data = &rec[(hblks * BB) as usize..][..len as usize];
    if sb.v5 {
        // CRC-32C over the header (CRC field zeroed), the extended headers
        // the record's length needs, and the data as stamped.
        let stored = field::<4>(h, 32).map(u32::from_le_bytes)?;
        let mut buf = h[..LOG_REC_HEADER_LEN].to_vec();
        buf[32..36].fill(0);
        for i in 1..len.div_ceil(LOG_HEADER_CYCLE_SIZE).min(hblks) {
            let off = (i * BB) as usize;
            buf.extend_from_slice(&rec[off..off + LOG_EXT_HEADER_LEN]);
        }
        buf.extend_from_slice(data);
        // mkfs writes its records with no CRC (zero), which is accepted.
        if stored != 0 && crc32c(&buf) != stored {
            return Err(FsError::Unclean(format!("{DIRTY} (the last record fails its CRC)")));
        }
    }
    // One operation whose header flags it as the unmount record.
    if data.len() < 12 || data[9] & LOG_OP_UNMOUNT == 0 {
        return Err(FsError::Unclean(DIRTY.into()));
    }
    Ok(())
}

/// The used-block reader: everything but the bnobt's free extents and the
/// free lists, after checking that the log is clean.
pub fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let sb = read_sb(vol)?;
    check_log(vol, &sb)?;
    let mut out = Vec::new();
    for agno in 0..sb.agcount {
        read_ag(vol, &sb, agno, &mut out)?;
    }
    let total_bytes = sb.dblocks * sb.block_size;
    let (extents, used_bytes) = normalize(out, total_bytes)?;
    Ok(UsedMap { block_size: sb.block_size as u32, total_bytes, used_bytes, extents })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Disk;
    use crate::testutil::{Mounted, Rng, TempDir, have_root, root_for, run, sh};
    use std::path::Path;
    use std::process::Command;

    fn mkfs(img: &Path, size: u64, opts: &[&str]) {
        std::fs::File::create(img).unwrap().set_len(size).unwrap();
        let mut args = vec!["-f", "-q"];
        args.extend_from_slice(opts);
        args.push(img.to_str().unwrap());
        // mkfs.xfs refuses filesystems under 300 MB unless it runs for fstests.
        run(Command::new("mkfs.xfs")
            .args(&args)
            .env("TEST_DIR", "/tmp")
            .env("TEST_DEV", "/dev/null")
            .env("QA_CHECK_FS", "1"));
    }

    fn map_of(img: &Path) -> Result<UsedMap, FsError> {
        let d = Disk::open_source(img).unwrap();
        let len = d.size;
        used_map(&Volume::new(&d, 0, len))
    }

    /// Files of many sizes, directories, a symlink; then every other small
    /// file deleted, leaving the free space fragmented.
    fn populate(dir: &Path, small: usize) {
        std::fs::create_dir_all(dir.join("d/e/f")).unwrap();
        for (i, size) in [0usize, 1, 511, 4096, 5000, 100_000, 3 << 20].into_iter().enumerate() {
            std::fs::write(dir.join(format!("d/file{i}")), Rng::seeded(i as u64).low_bytes(size)).unwrap();
        }
        std::os::unix::fs::symlink("d/file1", dir.join("link")).unwrap();
        for i in 0..small {
            std::fs::write(
                dir.join(format!("d/e/f/s{i}")),
                Rng::seeded(1000 + i as u64).low_bytes(700 + (i * 37) % 3000),
            )
            .unwrap();
        }
        // Allocate before deleting (delayed allocation would pack the rest).
        sh("sync", &["-f", dir.to_str().unwrap()]);
        for i in (0..small).step_by(2) {
            std::fs::remove_file(dir.join(format!("d/e/f/s{i}"))).unwrap();
        }
    }

    /// Fills the filesystem until it has no room, then frees a little.
    fn fill(dir: &Path) {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.join("fill")).unwrap();
        let chunk = Rng::seeded(77).low_bytes(1 << 20);
        while f.write_all(&chunk).is_ok() {}
        drop(f);
        for i in 0..20 {
            let _ = std::fs::write(dir.join(format!("tail{i}")), Rng::seeded(i).low_bytes(3000));
        }
        for i in (0..20).step_by(3) {
            let _ = std::fs::remove_file(dir.join(format!("tail{i}")));
        }
    }

    /// The used byte ranges according to xfs_db: every block of the data
    /// device except the free extents `freesp -d` lists (bnobt + AGFL).
    fn reference(img: &Path) -> (u64, u64, Vec<Extent>) {
        let sbp = sh("xfs_db", &["-r", "-c", "sb 0", "-c", "p dblocks agblocks blocksize", img.to_str().unwrap()]);
        let get = |k: &str| -> u64 {
            sbp.lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = ")))
                .unwrap_or_else(|| panic!("no {k} in {sbp}"))
                .trim()
                .parse()
                .unwrap()
        };
        let (dblocks, agblocks, bs) = (get("dblocks"), get("agblocks"), get("blocksize"));
        let out = sh("xfs_db", &["-r", "-c", "freesp -d", img.to_str().unwrap()]);
        let mut free: Vec<(u64, u64)> = Vec::new();
        for line in out.lines() {
            let nums: Vec<u64> = line.split_whitespace().map_while(|w| w.parse().ok()).collect();
            if line.split_whitespace().count() == 3 && nums.len() == 3 {
                free.push((nums[0] * agblocks + nums[1], nums[2]));
            }
        }
        assert!(out.contains("agno"), "unexpected freesp output:\n{out}");
        free.sort_unstable();
        let mut used = Vec::new();
        let mut pos = 0;
        for (s, l) in free {
            assert!(s >= pos, "xfs_db free extents overlap at {s}");
            if s > pos {
                used.push((pos * bs, (s - pos) * bs));
            }
            pos = s + l;
        }
        if dblocks > pos {
            used.push((pos * bs, (dblocks - pos) * bs));
        }
        let (used, n) = normalize(used, dblocks * bs).unwrap();
        (dblocks * bs, n, used)
    }

    fn assert_matches_reference(img: &Path, what: &str) -> UsedMap {
        let m = map_of(img).unwrap_or_else(|e| panic!("{what}: used_map failed: {e}"));
        let (total, used, extents) = reference(img);
        assert_eq!(m.total_bytes, total, "{what}: total bytes");
        assert_eq!(m.used_bytes, used, "{what}: used bytes");
        assert!(m.extents == extents, "{what}: used extents differ from xfs_db freesp");
        // The filesystem's own checker agrees the image is sound.
        sh("xfs_repair", &["-n", "-f", img.to_str().unwrap()]);
        m
    }

    /// An AGF whose free-block count disagrees with its bnobt (the CRC
    /// recomputed by xfs_db, so only the count is wrong): xfs_repair -n
    /// reports it, and the metadata fails the reader's check.
    #[test]
    fn agf_free_count_mismatch_is_corrupt() {
        let t = TempDir::new("xfs-agf-count");
        let img = t.join("fs.img");
        mkfs(&img, 320 << 20, &[]);
        map_of(&img).unwrap();
        let p = img.to_str().unwrap();
        let field = |name: &str| -> u64 {
            let out = sh("xfs_db", &["-r", "-c", "agf 1", "-c", &format!("print {name}"), p]);
            out.trim().strip_prefix(&format!("{name} = ")).unwrap().parse().unwrap()
        };
        let free = field("freeblks");
        // One more (one less would fall below agf_longest, which xfs_db's
        // write verifier refuses).
        sh("xfs_db", &["-x", "-c", "agf 1", "-c", &format!("write freeblks {}", free + 1), p]);
        let (_, said) = crate::testutil::try_sh("xfs_repair", &["-n", p]);
        assert!(said.contains(&format!("agf_freeblks {}, counted {free} in ag 1", free + 1)), "xfs_repair -n: {said}");
        match map_of(&img) {
            Err(FsError::Corrupt(m)) => {
                assert!(m.contains(&format!("AG 1: the bnobt holds {free} free blocks")), "{m}");
                assert!(m.contains(&format!("the AGF says {}", free + 1)), "{m}")
            }
            other => panic!("an AGF free count off by one must fail a check, got {other:?}"),
        }
    }

    #[test]
    fn fresh_filesystems_match_xfs_db() {
        let s = TempDir::new("fresh");
        let img = s.join("fs.img");
        let layouts: &[(u64, &[&str])] = &[
            (64 << 20, &["-b", "size=4096", "-d", "agcount=4", "-m", "crc=1"]),
            (48 << 20, &["-b", "size=1024", "-d", "agcount=3", "-m", "crc=0"]),
            (40 << 20, &["-b", "size=512", "-m", "crc=0"]),
            (80 << 20, &["-b", "size=4096", "-s", "size=4096", "-m", "crc=1"]),
            // The last AG short (a size that is not a multiple of the AG).
            ((70 << 20) + 12 * 4096, &["-b", "size=4096", "-d", "agsize=16m", "-m", "crc=1"]),
            (53 << 20, &["-b", "size=2048", "-d", "agsize=16m", "-m", "crc=1,finobt=1,rmapbt=1,reflink=1"]),
        ];
        for (size, opts) in layouts {
            mkfs(&img, *size, opts);
            let m = assert_matches_reference(&img, &format!("{opts:?}"));
            assert!(m.used_bytes < m.total_bytes / 4, "{opts:?}: {} of {} used", m.used_bytes, m.total_bytes);
        }
    }

    /// Makes a v4 or v5 filesystem holding a copy of `src` without a
    /// mount (the kernel here mounts only v5): mkfs.xfs -p with a
    /// prototype file.
    fn mkfs_from(img: &Path, size: u64, opts: &[&str], src: &Path, proto: &Path) {
        fn walk(dir: &Path, out: &mut String) {
            let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
            entries.sort();
            for p in entries {
                let name = p.file_name().unwrap().to_str().unwrap().to_string();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    out.push_str(&format!("{name} d--755 0 0\n"));
                    walk(&p, out);
                    out.push_str("$\n");
                } else if meta.file_type().is_symlink() {
                    out.push_str(&format!("{name} l--777 0 0 {}\n", std::fs::read_link(&p).unwrap().display()));
                } else {
                    out.push_str(&format!("{name} ---644 0 0 {}\n", p.display()));
                }
            }
        }
        let mut text = String::from("/dev/null\n0 0\nd--755 0 0\n");
        walk(src, &mut text);
        text.push_str("$\n");
        std::fs::write(proto, text).unwrap();
        let mut args: Vec<&str> = opts.to_vec();
        let proto_s = proto.to_str().unwrap();
        args.extend(["-p", proto_s]);
        mkfs(img, size, &args);
    }

    /// Which populated layouts to test: (size, mkfs options, small files,
    /// fill to the brim, populate by mounting (else mkfs -p)).
    type Layout = (u64, &'static [&'static str], usize, bool, bool);
    const POPULATED: &[Layout] = &[
        (64 << 20, &["-b", "size=4096", "-d", "agcount=4", "-m", "crc=1"], 300, false, true),
        // Small blocks and many holes: a bnobt of two levels or more.
        (48 << 20, &["-b", "size=1024", "-d", "agcount=2", "-m", "crc=1"], 3000, false, true),
        ((66 << 20) + 7 * 4096, &["-b", "size=4096", "-s", "size=4096", "-d", "agsize=16m"], 200, false, true),
        (
            53 << 20,
            &["-b", "size=2048", "-d", "agsize=16m", "-m", "crc=1,finobt=1,rmapbt=1,reflink=1"],
            300,
            false,
            true,
        ),
        // Nearly full.
        (40 << 20, &["-b", "size=4096", "-d", "agcount=2", "-m", "crc=1"], 100, true, true),
        (40 << 20, &["-b", "size=1024", "-m", "crc=1"], 100, true, true),
        // v4 (no CRCs), populated by mkfs.
        (48 << 20, &["-b", "size=1024", "-d", "agcount=3", "-m", "crc=0"], 400, false, false),
        ((40 << 20) + 5 * 512, &["-b", "size=512", "-m", "crc=0"], 200, false, false),
        (56 << 20, &["-b", "size=4096", "-s", "size=4096", "-m", "crc=0"], 100, false, false),
    ];

    #[test]
    fn populated_filesystems_match_xfs_db() {
        let s = TempDir::new("pop");
        let img = s.join("fs.img");
        let mut multi_level = false;
        for &(size, opts, small, full, mount) in POPULATED {
            if mount {
                if !have_root() {
                    eprintln!("skipping {opts:?}: needs root to mount");
                    continue;
                }
                mkfs(&img, size, opts);
                let mnt = Mounted::new(&img, &s.join("mnt"), "loop");
                populate(&mnt.0, small);
                if full {
                    fill(&mnt.0);
                }
            } else {
                let src = s.join("src");
                let _ = std::fs::remove_dir_all(&src);
                populate(&src, small);
                mkfs_from(&img, size, opts, &src, &s.join("proto"));
            }
            let m = assert_matches_reference(&img, &format!("{opts:?}"));
            if full {
                assert!(
                    m.used_bytes > m.total_bytes / 10 * 9,
                    "{opts:?}: only {} of {} used",
                    m.used_bytes,
                    m.total_bytes
                );
            }
            let d = Disk::open_source(&img).unwrap();
            let vol = Volume::new(&d, 0, d.size);
            let sb = read_sb(&vol).unwrap();
            for agno in 0..sb.agcount {
                let agf = vol.read_vec(sb.ag_byte(agno, 0) + sb.sect_size, sb.sect_size).unwrap();
                multi_level |= be32(&agf, 28).unwrap() >= 2;
            }
        }
        assert!(multi_level || !have_root(), "no layout had a bnobt of two levels");
    }

    /// Reads the log head's cycle for a test.
    fn log_cycle(img: &Path) -> u32 {
        let d = Disk::open_source(img).unwrap();
        let vol = Volume::new(&d, 0, d.size);
        let sb = read_sb(&vol).unwrap();
        let log =
            Log { vol: &vol, start: sb.ag_byte(sb.log_ag, sb.log_agbno), bbs: sb.log_blocks * sb.block_size / BB };
        let head = log.head().unwrap();
        log.cycle(head + log.bbs - 1).unwrap()
    }

    #[test]
    fn wrapped_log_is_clean_after_unmount() {
        if !root_for("to mount") {
            return;
        }
        let s = TempDir::new("wrap");
        let img = s.join("fs.img");
        for bs in ["size=4096", "size=1024"] {
            mkfs(&img, 48 << 20, &["-b", bs, "-m", "crc=1"]);
            {
                let mnt = Mounted::new(&img, &s.join("mnt"), "loop");
                // Creating and removing files fills the log with inode
                // transactions. The files stay empty: with data, each round
                // needed 14 MB of the 44 free, and XFS frees a removed
                // file's blocks in the background, so a slow machine ran
                // out of space (twice in CI, even with a syncfs per round).
                // Four rounds of empty files wrap this log; ten leave room.
                for _round in 0..10 {
                    for i in 0..3000 {
                        std::fs::File::create(mnt.0.join(format!("f{i}"))).unwrap();
                    }
                    sh("sync", &[]);
                    for i in 0..3000 {
                        std::fs::remove_file(mnt.0.join(format!("f{i}"))).unwrap();
                    }
                    sh("sync", &["-f", mnt.0.to_str().unwrap()]);
                }
                populate(&mnt.0, 50);
            }
            assert!(log_cycle(&img) > 1, "{bs}: the log did not wrap");
            assert_matches_reference(&img, bs);
        }
    }

    /// With a 256 KiB log stripe unit every record, the unmount record
    /// too, is padded past 32 KiB: extended headers, checked by the CRC.
    #[test]
    fn padded_log_records_are_read() {
        if !root_for("to mount") {
            return;
        }
        let s = TempDir::new("logsu");
        let img = s.join("fs.img");
        mkfs(&img, 300 << 20, &["-l", "su=256k"]);
        drop(Mounted::new(&img, &s.join("mnt"), "loop,logbsize=256k"));
        {
            let mnt = Mounted::new(&img, &s.join("mnt"), "loop,logbsize=256k");
            populate(&mnt.0, 100);
        }
        let d = Disk::open_source(&img).unwrap();
        let vol = Volume::new(&d, 0, d.size);
        let sb = read_sb(&vol).unwrap();
        let log =
            Log { vol: &vol, start: sb.ag_byte(sb.log_ag, sb.log_agbno), bbs: sb.log_blocks * sb.block_size / BB };
        let head = log.head().unwrap();
        // The unmount record: 8 header blocks and 504 of data before the head.
        let rec = log.read(head + log.bbs - 512, 1).unwrap();
        assert_eq!(be32(&rec, 0).unwrap(), LOG_MAGIC);
        assert!(be32(&rec, 12).unwrap() > 32768, "the unmount record is not padded");
        assert_matches_reference(&img, "log stripe unit 256k");
        {
            let mnt = Mounted::new(&img, &s.join("mnt"), "loop,logbsize=256k");
            std::fs::write(mnt.0.join("late"), b"x").unwrap();
            sh("sync", &[]);
            sh("xfs_io", &["-x", "-c", "shutdown -f", mnt.0.to_str().unwrap()]);
        }
        assert!(matches!(map_of(&img), Err(FsError::Unclean(_))));
    }

    #[test]
    fn dirty_log_is_unclean() {
        if !root_for("to mount") {
            return;
        }
        let s = TempDir::new("dirty");
        let img = s.join("fs.img");
        // The kernel here mounts only v5 filesystems.
        for bs in ["size=4096", "size=1024"] {
            mkfs(&img, 48 << 20, &["-b", bs, "-m", "crc=1"]);
            {
                let mnt = Mounted::new(&img, &s.join("mnt"), "loop");
                populate(&mnt.0, 40);
                sh("sync", &[]);
                std::fs::write(mnt.0.join("late"), b"after the sync").unwrap();
                sh("xfs_io", &["-x", "-c", "shutdown -f", mnt.0.to_str().unwrap()]);
            }
            match map_of(&img) {
                Err(FsError::Unclean(m)) => assert!(m.contains("log is dirty"), "{m}"),
                other => panic!("{bs}: a shut down filesystem gave {other:?}"),
            }
            // Replaying the log (mount, unmount) makes it clean again.
            drop(Mounted::new(&img, &s.join("mnt"), "loop"));
            assert_matches_reference(&img, bs);
        }
    }

    #[test]
    fn out_of_scope_and_garbage_are_corrupt() {
        let s = TempDir::new("scope");
        let img = s.join("fs.img");
        let log = s.join("log.img");
        std::fs::File::create(&log).unwrap().set_len(16 << 20).unwrap();
        mkfs(&img, 48 << 20, &["-l", &format!("logdev={}", log.display()), "-m", "crc=1"]);
        assert!(matches!(map_of(&img), Err(FsError::Corrupt(m)) if m.contains("external log")));
        let rt = s.join("rt.img");
        std::fs::File::create(&rt).unwrap().set_len(16 << 20).unwrap();
        mkfs(&img, 48 << 20, &["-r", &format!("rtdev={}", rt.display())]);
        assert!(matches!(map_of(&img), Err(FsError::Corrupt(m)) if m.contains("real-time")));
        // Truncated: the filesystem is larger than its partition.
        mkfs(&img, 48 << 20, &[]);
        let d = Disk::open_source(&img).unwrap();
        let r = used_map(&Volume::new(&d, 0, 40 << 20));
        assert!(matches!(r, Err(FsError::Corrupt(m)) if m.contains("larger than its partition")));
        std::fs::write(&img, Rng::seeded(5).low_bytes(1 << 20)).unwrap();
        assert!(matches!(map_of(&img), Err(FsError::Corrupt(_))));
    }

    /// A metadata region to mutate: offset and length, and for v5 the
    /// block whose CRC may be recomputed afterwards (offset, length, CRC
    /// field offset) so that the damage reaches the deeper checks.
    type Region = (u64, u64, Option<(u64, u64, usize)>);

    /// The superblock, AGFs, AGFLs, every bnobt block and the log around
    /// its head, found with the reader's own helpers on a sound image.
    fn metadata_regions(img: &Path) -> Vec<Region> {
        let d = Disk::open_source(img).unwrap();
        let vol = Volume::new(&d, 0, d.size);
        let sb = read_sb(&vol).unwrap();
        let crc = |off: u64, len: u64, at: usize| sb.v5.then_some((off, len, at));
        let mut out: Vec<Region> = vec![(0, sb.sect_size, crc(0, sb.sect_size, SB_CRC_OFF))];
        for agno in 0..sb.agcount {
            let base = sb.ag_byte(agno, 0);
            let agf_off = base + sb.sect_size;
            out.push((agf_off, sb.sect_size, crc(agf_off, sb.sect_size, AGF_CRC_OFF)));
            let agfl_off = base + 3 * sb.sect_size;
            out.push((agfl_off, sb.sect_size, crc(agfl_off, sb.sect_size, AGFL_CRC_OFF)));
            let agf = vol.read_vec(agf_off, sb.sect_size).unwrap();
            let mut level = vec![be32(&agf, 16).unwrap() as u64];
            while let Some(&first) = level.first() {
                let mut next = Vec::new();
                for &bno in &level {
                    let off = sb.ag_byte(agno, bno);
                    out.push((off, sb.block_size, crc(off, sb.block_size, BTREE_CRC_OFF)));
                    let b = vol.read_vec(off, sb.block_size).unwrap();
                    if be16(&b, 4).unwrap() > 0 {
                        let room = sb.block_size as usize - sb.btree_hdr();
                        let ptrs = sb.btree_hdr() + 8 * (room / 12);
                        for i in 0..be16(&b, 6).unwrap() as usize {
                            next.push(be32(&b, ptrs + 4 * i).unwrap() as u64);
                        }
                    }
                }
                let _ = first;
                level = next;
            }
        }
        let log =
            Log { vol: &vol, start: sb.ag_byte(sb.log_ag, sb.log_agbno), bbs: sb.log_blocks * sb.block_size / BB };
        let head = log.head().unwrap();
        for bb in [0, log.bbs - 1, head, head + log.bbs - 1, head + log.bbs - 2, head + log.bbs - 3, log.bbs / 2] {
            out.push((log.start + (bb % log.bbs) * BB, BB, None));
        }
        out
    }

    /// Flips bytes in metadata hundreds of times: the reader must return
    /// Ok or an error, never panic.
    fn mutate(img: &Path, rounds: u32, seed: u64) -> [u32; 3] {
        use std::os::unix::fs::FileExt;
        let regions = metadata_regions(img);
        let d = Disk::open_source(img).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        let read = |off: u64, len: u64| {
            let mut b = vec![0u8; len as usize];
            d.read_exact_at(&mut b, off).unwrap();
            b
        };
        let mut x = seed | 1;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut counts = [0u32; 3];
        for round in 0..rounds {
            let (off, len, crc) = regions[(rnd() % regions.len() as u64) as usize];
            let (save_off, save_len) = crc.map_or((off, len), |(o, l, _)| (o, l));
            let saved = read(save_off, save_len);
            let mut block = saved.clone();
            for _ in 0..1 + rnd() % 4 {
                // Half the time a header field, else anywhere in the region.
                let span = if rnd() % 2 == 0 { len.min(64) } else { len };
                let at = (off - save_off + rnd() % span) as usize;
                block[at] ^= (rnd() % 255 + 1) as u8;
            }
            if let Some((_, _, at)) = crc
                && rnd() % 3 != 0
            {
                block[at..at + 4].fill(0);
                let c = crc32c(&block);
                block[at..at + 4].copy_from_slice(&c.to_le_bytes());
            }
            w.write_all_at(&block, save_off).unwrap();
            let vol = Volume::new(&d, 0, d.size);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| used_map(&vol)));
            w.write_all_at(&saved, save_off).unwrap();
            match r {
                Ok(Ok(m)) => {
                    assert!(m.used_bytes <= m.total_bytes && m.total_bytes <= d.size, "round {round}");
                    counts[0] += 1;
                }
                Ok(Err(FsError::Corrupt(_))) => counts[1] += 1,
                Ok(Err(FsError::Unclean(_))) => counts[2] += 1,
                Ok(Err(e)) => panic!("round {round}: unexpected error {e}"),
                Err(_) => panic!("round {round}: used_map panicked on mutated metadata at {off}+{len}"),
            }
        }
        assert!(map_of(img).is_ok(), "the image was not restored after mutating");
        counts
    }

    /// Sets every byte of the superblock's and AG 0's headers (AGF, AGFL)
    /// to a few values, the CRC recomputed: never a panic.
    #[test]
    fn every_header_byte_swept() {
        use std::os::unix::fs::FileExt;
        let s = TempDir::new("sweep");
        let img = s.join("fs.img");
        mkfs(&img, 48 << 20, &["-b", "size=1024", "-d", "agcount=2", "-m", "crc=1"]);
        let regions = metadata_regions(&img);
        let d = Disk::open_source(&img).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut counts = [0u32; 3];
        for &(off, len, crc) in &regions[..3] {
            let (_, _, at) = crc.unwrap();
            let mut saved = vec![0u8; len as usize];
            d.read_exact_at(&mut saved, off).unwrap();
            for i in 0..(len as usize).min(264) {
                for v in [0x00u8, 0xff, saved[i] ^ 0x80, saved[i].wrapping_add(1)] {
                    let mut block = saved.clone();
                    block[i] = v;
                    block[at..at + 4].fill(0);
                    let c = crc32c(&block);
                    block[at..at + 4].copy_from_slice(&c.to_le_bytes());
                    w.write_all_at(&block, off).unwrap();
                    let vol = Volume::new(&d, 0, d.size);
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| used_map(&vol))) {
                        Ok(Ok(_)) => counts[0] += 1,
                        Ok(Err(FsError::Corrupt(_))) => counts[1] += 1,
                        Ok(Err(_)) => counts[2] += 1,
                        Err(_) => panic!("used_map panicked with byte {i} at {off} set to {v:#x}"),
                    }
                }
            }
            w.write_all_at(&saved, off).unwrap();
        }
        eprintln!("sweep: {counts:?}");
        assert!(map_of(&img).is_ok());
    }

    #[test]
    fn mutated_metadata_never_panics() {
        let s = TempDir::new("mutate");
        let img = s.join("fs.img");
        // v5 with a multi-level bnobt (needs a mount), else a fresh one.
        if have_root() {
            mkfs(&img, 48 << 20, &["-b", "size=1024", "-d", "agcount=2", "-m", "crc=1"]);
            let mnt = Mounted::new(&img, &s.join("mnt"), "loop");
            populate(&mnt.0, 3000);
        } else {
            mkfs(&img, 48 << 20, &["-b", "size=1024", "-d", "agcount=2", "-m", "crc=1"]);
        }
        let v5 = mutate(&img, 600, 0x5eed);
        eprintln!("v5: {} ok, {} corrupt, {} unclean", v5[0], v5[1], v5[2]);
        assert!(v5[1] > 100, "{v5:?}");

        let src = s.join("src");
        populate(&src, 300);
        mkfs_from(&img, 50 << 20, &["-b", "size=512", "-d", "agcount=3", "-m", "crc=0"], &src, &s.join("proto"));
        let v4 = mutate(&img, 600, 0xfeed);
        eprintln!("v4: {} ok, {} corrupt, {} unclean", v4[0], v4[1], v4[2]);
        assert!(v4[1] > 100, "{v4:?}");
    }
}
