//! MBR (DOS) partition tables: the four primary entries in sector 0, the
//! EBR chain of an extended partition, telling a whole-disk filesystem's
//! boot sector from an MBR, and growing the last partition.

use std::collections::HashSet;

use super::{DiskLayout, Partition, TableKind, TableSource, gpt::last_by_end, sort_and_check};
use crate::device::Disk;
use crate::error::{Error, Result};
use crate::le::le32;

/// Offset of the first partition entry in an MBR or EBR.
const TABLE: usize = 446;
/// Most EBRs followed in one chain.
const MAX_EBRS: usize = 128;
/// Largest sector count (and end) an MBR entry can describe.
const MAX_SECTORS: u64 = 0xFFFF_FFFF;

fn has_signature(b: &[u8]) -> bool {
    b[510] == 0x55 && b[511] == 0xAA
}

pub(super) fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

/// One 16-byte partition entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    status: u8,
    ptype: u8,
    start: u32,
    size: u32,
}

impl Entry {
    fn read(b: &[u8], slot: usize) -> Entry {
        let e = &b[TABLE + 16 * slot..TABLE + 16 * slot + 16];
        Entry { status: e[0], ptype: e[4], start: le32(e, 8), size: le32(e, 12) }
    }

    fn is_empty(&self) -> bool {
        self.ptype == 0 && self.size == 0
    }
}

/// Whether sector 0 carries an MBR with a GPT protective (0xEE) entry.
pub(super) fn has_protective_entry(sec0: &[u8]) -> bool {
    has_signature(sec0) && (0..4).any(|i| Entry::read(sec0, i).ptype == 0xEE)
}

/// How much sector 0 looks like the boot sector of a whole-disk FAT, NTFS or
/// exFAT filesystem.
#[derive(Debug, PartialEq, Eq)]
enum FsBoot {
    /// Not at all.
    No,
    /// Jump instruction and a plausible BPB, but no filesystem name.
    Bpb,
    /// Jump instruction and the filesystem's name at its offset.
    Named,
}

fn fs_boot_sector(b: &[u8]) -> FsBoot {
    let jump = (b[0] == 0xEB && b[2] == 0x90) || b[0] == 0xE9;
    if !jump {
        return FsBoot::No;
    }
    if matches!(&b[3..11], b"NTFS    " | b"EXFAT   ")
        || matches!(&b[54..62], b"FAT12   " | b"FAT16   " | b"FAT     ")
        || &b[82..90] == b"FAT32   "
    {
        return FsBoot::Named;
    }
    let bytes_per_sector = u16::from_le_bytes([b[11], b[12]]);
    let per_cluster = b[13];
    let reserved = u16::from_le_bytes([b[14], b[15]]);
    let fats = b[16];
    let total16 = u16::from_le_bytes([b[19], b[20]]);
    let media = b[21];
    let total32 = le32(b, 32);
    if matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && per_cluster.is_power_of_two()
        && reserved > 0
        && (1..=2).contains(&fats)
        && (media == 0xF0 || media >= 0xF8)
        && (total16 != 0 || total32 != 0)
    {
        return FsBoot::Bpb;
    }
    FsBoot::No
}

/// Where a logical partition's entries live, for growing it.
#[derive(Debug, Clone)]
struct Logical {
    number: u32,
    /// LBA of the EBR holding its entry.
    ebr_lba: u64,
    /// Slot of its entry in that EBR.
    slot: usize,
    /// The previous EBR's LBA and the slot of its link to this EBR.
    link: Option<(u64, usize)>,
}

/// An MBR as parsed: the layout plus where each entry is.
#[derive(Debug)]
struct Parsed {
    layout: DiskLayout,
    /// Slot of the extended partition in the MBR and its (start, size) in sectors.
    extended: Option<(usize, u64, u64)>,
    logicals: Vec<Logical>,
}

/// Reads an MBR layout from sector 0 (`sec0`, its first 512 bytes). Gives a
/// `TableKind::None` layout when sector 0 is no MBR (no 0x55AA signature,
/// invalid status bytes, or a filesystem boot sector).
pub(super) fn read(disk: &dyn TableSource, sector_size: u32, sec0: &[u8]) -> Result<DiskLayout> {
    let none = DiskLayout::no_table(sector_size, disk.table_source_size());
    if !has_signature(sec0) {
        return Ok(none);
    }
    let fs = fs_boot_sector(sec0);
    if fs == FsBoot::Named || (0..4).any(|i| !matches!(Entry::read(sec0, i).status, 0x00 | 0x80)) {
        return Ok(none);
    }
    if (0..4).any(|i| Entry::read(sec0, i).ptype == 0xEE) {
        return Err(Error::Unsupported(format!(
            "{} has a GPT protective MBR but neither its primary nor its backup GPT header is valid \
             (read with {sector_size}-byte logical sectors{}); repair the GPT (e.g. with gdisk) first",
            disk.table_source_name(),
            if disk.sector_sizes().len() > 1 { ", and 4096 for GPT" } else { "" }
        )));
    }
    match parse(disk, sector_size, sec0) {
        Ok(p) => Ok(p.layout),
        // A plausible BPB (a FAT without name strings) whose tail does not
        // make a valid table is a filesystem, not a damaged MBR.
        Err(_) if fs == FsBoot::Bpb => Ok(none),
        Err(e) => Err(e),
    }
}

fn parse(disk: &dyn TableSource, sector_size: u32, sec0: &[u8]) -> Result<Parsed> {
    let ss = u64::from(sector_size);
    let size = disk.table_source_size();
    let total = size / ss;
    let mut warnings = Vec::new();
    let mut partitions = Vec::new();
    let mut extended = None;
    for slot in 0..4 {
        let e = Entry::read(sec0, slot);
        let number = slot as u32 + 1;
        if e.is_empty() || e.size == 0 {
            continue;
        }
        if e.ptype == 0 {
            warnings.push(format!("MBR entry {number} has a size but type 0; ignored"));
            continue;
        }
        let (start, size) = (u64::from(e.start), u64::from(e.size));
        if start == 0 || start + size > total {
            return Err(Error::Unsupported(format!(
                "MBR partition {number} (sectors {start}..{}) does not lie within the disk of {total} sectors",
                start + size
            )));
        }
        if is_extended(e.ptype) {
            if extended.is_some() {
                return Err(Error::Unsupported("MBR has more than one extended partition".into()));
            }
            extended = Some((slot, start, size));
            continue;
        }
        partitions.push(Partition {
            number,
            start: start * ss,
            size: size * ss,
            type_id: format!("0x{:02x}", e.ptype),
            name: String::new(),
            uuid: None,
            attributes: u64::from(e.status & 0x80),
            logical: false,
        });
    }
    if let Some((slot, ext_start, ext_size)) = extended {
        let ext_end = ext_start + ext_size;
        for p in &partitions {
            let (s, e) = (p.start / ss, (p.start + p.size) / ss);
            if s < ext_end && ext_start < e {
                return Err(Error::Unsupported(format!(
                    "MBR partition {} overlaps the extended partition {}",
                    p.number,
                    slot + 1
                )));
            }
        }
    }
    let logicals = match extended {
        Some((_, start, size)) => read_chain(disk, ss, start, size, &mut partitions, &mut warnings)?,
        None => Vec::new(),
    };
    sort_and_check(&mut partitions, size)?;
    Ok(Parsed {
        layout: DiskLayout {
            kind: TableKind::Mbr,
            sector_size,
            disk_size: size,
            disk_id: Some(format!("0x{:08x}", le32(sec0, 440))),
            partitions,
            extended: extended.map(|(_, s, n)| (s * ss, n * ss)),
            gpt: None,
            warnings,
        },
        extended,
        logicals,
    })
}

/// Follows the EBR chain of the extended partition at `ext_start` (sectors),
/// adding logical partitions numbered from 5.
fn read_chain(
    disk: &dyn TableSource,
    ss: u64,
    ext_start: u64,
    ext_size: u64,
    partitions: &mut Vec<Partition>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Logical>> {
    let ext_end = ext_start + ext_size;
    let mut logicals: Vec<Logical> = Vec::new();
    let mut seen = HashSet::new();
    let mut ebr = ext_start;
    let mut link = None;
    let mut number = 5;
    loop {
        if seen.len() >= MAX_EBRS {
            return Err(Error::Unsupported(format!(
                "the extended partition's EBR chain is longer than {MAX_EBRS} entries"
            )));
        }
        if !seen.insert(ebr) {
            return Err(Error::Unsupported(format!("the EBR chain loops back to LBA {ebr}")));
        }
        let mut buf = [0u8; 512];
        disk.read_table_bytes(&mut buf, ebr * ss)?;
        if !has_signature(&buf) {
            if ebr != ext_start {
                warnings.push(format!("EBR at LBA {ebr} has no 0x55AA signature; the chain ends there"));
            }
            break;
        }
        let mut next = None;
        let mut data_seen = false;
        for slot in 0..2 {
            let e = Entry::read(&buf, slot);
            if e.size == 0 {
                continue;
            }
            let (start, size) = (u64::from(e.start), u64::from(e.size));
            if is_extended(e.ptype) {
                if next.is_some() {
                    return Err(Error::Unsupported(format!("EBR at LBA {ebr} has two links")));
                }
                let at = ext_start + start;
                if start == 0 || at >= ext_end {
                    return Err(Error::Unsupported(format!(
                        "EBR at LBA {ebr} links to LBA {at}, outside the extended partition (LBA {ext_start}..{ext_end})"
                    )));
                }
                next = Some((at, slot));
                continue;
            }
            if e.ptype == 0 {
                warnings.push(format!("EBR at LBA {ebr}: entry with a size but type 0; ignored"));
                continue;
            }
            if data_seen {
                return Err(Error::Unsupported(format!("EBR at LBA {ebr} describes more than one logical partition")));
            }
            data_seen = true;
            if !matches!(e.status, 0x00 | 0x80) {
                return Err(Error::Unsupported(format!("EBR at LBA {ebr}: invalid status byte 0x{:02x}", e.status)));
            }
            let abs = ebr + start;
            if start == 0 || abs + size > ext_end {
                return Err(Error::Unsupported(format!(
                    "logical partition {number} (sectors {abs}..{}) does not lie within the extended partition \
                     (sectors {ext_start}..{ext_end})",
                    abs + size
                )));
            }
            partitions.push(Partition {
                number,
                start: abs * ss,
                size: size * ss,
                type_id: format!("0x{:02x}", e.ptype),
                name: String::new(),
                uuid: None,
                attributes: u64::from(e.status & 0x80),
                logical: true,
            });
            logicals.push(Logical { number, ebr_lba: ebr, slot, link });
            number += 1;
        }
        match next {
            Some((at, slot)) => {
                link = Some((ebr, slot));
                ebr = at;
            }
            None => break,
        }
    }
    Ok(logicals)
}

/// CHS address of `lba` in the usual 255-head, 63-sector geometry, capped
/// at cylinder 1023 as fdisk does.
pub(super) fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let lba = if lba / (HEADS * SECTORS) > 1023 { HEADS * SECTORS * 1024 - 1 } else { lba };
    let c = lba / (HEADS * SECTORS);
    let h = (lba % (HEADS * SECTORS)) / SECTORS;
    let s = lba % SECTORS + 1;
    [h as u8, (s as u8) | ((c >> 2) & 0xC0) as u8, (c & 0xFF) as u8]
}

/// Sets the size of entry `slot` in `sector` (512 bytes) so that it ends
/// (exclusive) at absolute sector `new_end`; `base` is the absolute sector
/// its start is relative to. The end CHS is updated when it held the
/// 255/63 CHS of the old end (left alone otherwise: some other geometry).
fn set_end(sector: &mut [u8], slot: usize, base: u64, new_end: u64) {
    let e = &mut sector[TABLE + 16 * slot..TABLE + 16 * slot + 16];
    let abs_start = base + u64::from(le32(e, 8));
    let old_end = abs_start + u64::from(le32(e, 12));
    let size = (new_end - abs_start) as u32;
    if e[5..8] == chs(old_end - 1) {
        e[5..8].copy_from_slice(&chs(new_end - 1));
    }
    e[12..16].copy_from_slice(&size.to_le_bytes());
}

/// New end (exclusive, in sectors) of the last partition on a disk of
/// `total` sectors.
fn grown_end(total: u64) -> u64 {
    total.min(MAX_SECTORS)
}

/// See [`super::layout_for_target`] (MBR part).
pub(super) fn layout_for_target(out: &mut DiskLayout, grow_last: bool) {
    let Some(i) = last_by_end(&out.partitions).filter(|_| grow_last) else { return };
    let ss = u64::from(out.sector_size);
    let new_end = grown_end(out.disk_size / ss) * ss;
    let p = &mut out.partitions[i];
    let old_end = p.start + p.size;
    if new_end <= old_end {
        return;
    }
    if p.logical {
        p.size = new_end - p.start;
        if let Some(ext) = &mut out.extended
            && ext.0 + ext.1 < new_end
        {
            ext.1 = new_end - ext.0;
        }
    } else if out.extended.is_none_or(|(s, _)| s < old_end) {
        p.size = new_end - p.start;
    }
}

/// Reads a 512-byte table sector.
fn read_sector(disk: &Disk, lba: u64, ss: u64) -> Result<[u8; 512]> {
    let mut b = [0u8; 512];
    disk.read_exact_at(&mut b, lba * ss)?;
    Ok(b)
}

/// Grows the last partition of the MBR copied onto `target` (see
/// [`super::fix_up_for_target`]); returns the byte ranges written.
pub(super) fn fix_up_grow(target: &Disk, layout: &DiskLayout) -> Result<Vec<(u64, u64)>> {
    let ss = u64::from(layout.sector_size);
    let total = target.size / ss;
    let mut sec0 = read_sector(target, 0, ss)?;
    let parsed = parse(target, layout.sector_size, &sec0)?;
    if parsed.layout.partitions != layout.partitions || parsed.layout.extended != layout.extended {
        return Err(Error::VerifyAfter(format!(
            "the MBR written to {} does not describe the source's partitions",
            target.path.display()
        )));
    }
    let Some(i) = last_by_end(&layout.partitions) else { return Ok(Vec::new()) };
    let p = &layout.partitions[i];
    let old_end = (p.start + p.size) / ss;
    let new_end = grown_end(total);
    if new_end <= old_end {
        return Ok(Vec::new());
    }
    let mut written = Vec::new();
    if !p.logical {
        if let Some((_, ext_start, _)) = parsed.extended
            && ext_start >= old_end
        {
            return Err(Error::Unsupported(format!(
                "cannot grow partition {}: the extended partition lies after it",
                p.number
            )));
        }
        set_end(&mut sec0, p.number as usize - 1, 0, new_end);
        target.write_all_at(&sec0, 0)?;
        written.push((0, 512));
        return Ok(written);
    }
    let (ext_slot, ext_start, ext_size) =
        parsed.extended.ok_or_else(|| Error::Unsupported("logical partition without extended partition".into()))?;
    let l = parsed
        .logicals
        .iter()
        .find(|l| l.number == p.number)
        .ok_or_else(|| Error::Unsupported(format!("no EBR found for logical partition {}", p.number)))?;
    let mut ebr = read_sector(target, l.ebr_lba, ss)?;
    set_end(&mut ebr, l.slot, l.ebr_lba, new_end);
    target.write_all_at(&ebr, l.ebr_lba * ss)?;
    written.push((l.ebr_lba * ss, 512));
    // The previous EBR's link conventionally spans this EBR up to the end of
    // its logical partition (fdisk, sfdisk): keep it so.
    if let Some((prev_lba, slot)) = l.link {
        let mut prev = read_sector(target, prev_lba, ss)?;
        let e = Entry::read(&prev, slot);
        if ext_start + u64::from(e.start) + u64::from(e.size) == old_end {
            set_end(&mut prev, slot, ext_start, new_end);
            target.write_all_at(&prev, prev_lba * ss)?;
            written.push((prev_lba * ss, 512));
        }
    }
    if ext_start + ext_size < new_end {
        set_end(&mut sec0, ext_slot, 0, new_end);
        target.write_all_at(&sec0, 0)?;
        written.push((0, 512));
    }
    Ok(written)
}

/// Makes a pure protective MBR (a single 0xEE entry from LBA 1, other
/// entries empty) cover a disk of `total` sectors (capped at 2^32-1).
/// Hybrid MBRs are left alone. Returns the range written, if any.
pub(super) fn fix_protective(target: &Disk, total: u64) -> Result<Option<(u64, u64)>> {
    let mut sec0 = [0u8; 512];
    target.read_exact_at(&mut sec0, 0)?;
    if !has_signature(&sec0) {
        return Ok(None);
    }
    let entries: Vec<Entry> = (0..4).map(|i| Entry::read(&sec0, i)).collect();
    let Some(slot) = entries.iter().position(|e| e.ptype == 0xEE) else { return Ok(None) };
    if entries.iter().enumerate().any(|(i, e)| i != slot && !e.is_empty()) || entries[slot].start != 1 {
        return Ok(None);
    }
    let new_end = total.min(MAX_SECTORS + 1);
    let old_end = 1 + u64::from(entries[slot].size);
    if old_end == new_end || entries[slot].size == 0 {
        return Ok(None);
    }
    set_end(&mut sec0, slot, 0, new_end);
    target.write_all_at(&sec0, 0)?;
    Ok(Some((0, 512)))
}

/// See [`super::write_moved`] (MBR part): each entry of sector 0 (as the
/// source had it, copied onto `target`) points at its partition's new
/// place (the extended container's at its new place), boot code and disk
/// id kept; the EBR chain is rebuilt for the new places as sfdisk lays
/// one out.
pub(super) fn write_moved(target: &Disk, moved: &DiskLayout) -> Result<Vec<(u64, u64)>> {
    let ss = u64::from(moved.sector_size);
    let mut sec0 = read_sector(target, 0, ss)?;
    if !has_signature(&sec0) {
        return Err(Error::Unsupported("the restored sector 0 holds no MBR".into()));
    }
    for slot in 0..4 {
        let e = Entry::read(&sec0, slot);
        if e.is_empty() {
            continue;
        }
        let (start, size) = if is_extended(e.ptype) {
            moved.extended.ok_or_else(|| Error::Unsupported("an extended entry without extended partition".into()))?
        } else {
            let p =
                moved.partitions.iter().find(|p| !p.logical && p.number == slot as u32 + 1).ok_or_else(|| {
                    Error::Unsupported(format!("MBR slot {} holds no partition of the layout", slot + 1))
                })?;
            (p.start, p.size)
        };
        let (start, size) = (start / ss, size / ss);
        if start + size > MAX_SECTORS {
            return Err(Error::Unsupported(format!("MBR slot {}: the partition does not fit an entry", slot + 1)));
        }
        let at = TABLE + 16 * slot;
        sec0[at + 1..at + 4].copy_from_slice(&chs(start));
        sec0[at + 5..at + 8].copy_from_slice(&chs(start + size - 1));
        sec0[at + 8..at + 12].copy_from_slice(&(start as u32).to_le_bytes());
        sec0[at + 12..at + 16].copy_from_slice(&(size as u32).to_le_bytes());
    }
    let mut written = Vec::new();
    for (at, ebr) in super::build::mbr_ebr_chain(moved)? {
        target.write_all_at(&ebr, at)?;
        written.push((at, 512));
    }
    target.write_all_at(&sec0, 0)?;
    written.push((0, 512));
    Ok(written)
}
