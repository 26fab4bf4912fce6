//! Partition tables: reading GPT, MBR (with extended/logical partitions) or
//! no table at all into one `DiskLayout`, and fixing a restored table up for
//! a larger target disk.

pub mod build;
mod gpt;
mod mbr;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::device::{Disk, DiskKind};
use crate::error::{Error, Result};

/// What a partition table is read from: a disk, or a volume that holds a
/// whole disk's bytes (a virtual machine's disk in an LVM thin volume).
pub trait TableSource {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_table_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Its size in bytes.
    fn table_source_size(&self) -> u64;
    /// Its name in messages.
    fn table_source_name(&self) -> String;
    /// The logical sector sizes to try: a block device's own; for a file
    /// or a volume 512, then 4096 for a GPT.
    fn sector_sizes(&self) -> Vec<u32>;
}

impl TableSource for Disk {
    fn read_table_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn table_source_size(&self) -> u64 {
        self.size
    }

    fn table_source_name(&self) -> String {
        self.path.display().to_string()
    }

    fn sector_sizes(&self) -> Vec<u32> {
        match self.kind {
            DiskKind::BlockDevice => vec![self.logical_sector_size],
            DiskKind::File => vec![512, 4096],
        }
    }
}

/// A volume holding a disk: `name` in messages.
pub struct VolumeDisk<'a> {
    /// The volume.
    pub volume: crate::fs::Volume<'a>,
    /// What to call it.
    pub name: String,
}

impl TableSource for VolumeDisk<'_> {
    fn read_table_bytes(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.volume.read_at(buf, offset).map_err(|e| match e {
            crate::fs::FsError::Io(e) => e,
            other => Error::Corrupt(format!("{}: {other}", self.name)),
        })
    }

    fn table_source_size(&self) -> u64 {
        self.volume.len
    }

    fn table_source_name(&self) -> String {
        self.name.clone()
    }

    fn sector_sizes(&self) -> Vec<u32> {
        vec![512, 4096]
    }
}

/// Which partition table a disk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// GUID Partition Table (with protective MBR).
    Gpt,
    /// DOS/MBR table, possibly with an extended partition and logical ones.
    Mbr,
    /// No table: a filesystem (or nothing) on the whole disk.
    None,
}

impl std::fmt::Display for TableKind {
    /// As people write them: "GPT", "MBR", "none".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableKind::Gpt => "GPT",
            TableKind::Mbr => "MBR",
            TableKind::None => "none",
        })
    }
}

/// One data partition (never an MBR extended container).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Number as the kernel names it (sda1); MBR logical partitions start at 5.
    pub number: u32,
    /// Byte offset from the start of the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT type GUID (upper-case, hyphenated) or MBR type byte as "0x83".
    pub type_id: String,
    /// GPT partition name; empty on MBR.
    pub name: String,
    /// GPT unique partition GUID; None on MBR.
    pub uuid: Option<String>,
    /// GPT attribute bits; on MBR 0x80 when the boot flag is set.
    pub attributes: u64,
    /// True for an MBR logical partition (inside the extended partition).
    pub logical: bool,
}

/// Geometry of a GPT, in logical blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptGeometry {
    /// First LBA usable by partitions.
    pub first_usable_lba: u64,
    /// Last LBA usable by partitions.
    pub last_usable_lba: u64,
    /// LBA of the primary partition entry array.
    pub primary_entries_lba: u64,
    /// LBA of the backup header (normally the disk's last LBA).
    pub backup_header_lba: u64,
    /// LBA of the backup partition entry array.
    pub backup_entries_lba: u64,
    /// Number of entries in the array.
    pub num_entries: u32,
    /// Size of one entry in bytes.
    pub entry_size: u32,
    /// False when the primary header or its entry array was damaged (the
    /// layout was then read from the backup).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub primary_valid: bool,
    /// False when the backup header or its entry array was missing, damaged
    /// or disagreed with the primary.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub backup_valid: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A disk's partition layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// Table kind.
    pub kind: TableKind,
    /// Logical sector size the table was read with.
    pub sector_size: u32,
    /// Size of the disk the layout was read from, in bytes.
    pub disk_size: u64,
    /// GPT disk GUID, or MBR disk signature as "0x1234abcd".
    pub disk_id: Option<String>,
    /// Data partitions, ordered by start offset.
    pub partitions: Vec<Partition>,
    /// MBR extended partition (start, size) in bytes, when present.
    pub extended: Option<(u64, u64)>,
    /// GPT geometry, for GPT disks.
    pub gpt: Option<GptGeometry>,
    /// Problems found that did not prevent reading the table (a damaged GPT
    /// copy that the other copy replaced, a GPT without protective MBR, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl DiskLayout {
    /// A layout without partition table.
    fn no_table(sector_size: u32, disk_size: u64) -> DiskLayout {
        DiskLayout {
            kind: TableKind::None,
            sector_size,
            disk_size,
            disk_id: None,
            partitions: Vec::new(),
            extended: None,
            gpt: None,
            warnings: Vec::new(),
        }
    }
}

/// Reads the partition table of `disk`: GPT (falling back to the backup
/// header when the primary is damaged, with a warning), else MBR (following
/// the EBR chain of an extended partition), else `TableKind::None`.
///
/// Block devices are read with their logical sector size. For image files
/// the sector size is unknown: GPT is looked for with 512-byte and then
/// 4096-byte sectors; MBR and no-table layouts use 512.
///
/// A whole-disk FAT/NTFS/exFAT boot sector is not mistaken for an MBR. A
/// protective MBR without a valid GPT, overlapping partitions and partitions
/// beyond the end of the disk are `Error::Unsupported`.
pub fn read_layout(disk: &dyn TableSource) -> Result<DiskLayout> {
    let sizes = disk.sector_sizes();
    let mbr_ss = sizes[0];
    if !matches!(mbr_ss, 512 | 1024 | 2048 | 4096) {
        return Err(Error::Unsupported(format!(
            "{}: logical sector size {mbr_ss} is not supported",
            disk.table_source_name()
        )));
    }
    if disk.table_source_size() < 512 {
        return Ok(DiskLayout::no_table(mbr_ss, disk.table_source_size()));
    }
    let mut sec0 = [0u8; 512];
    disk.read_table_bytes(&mut sec0, 0)?;
    for &ss in &sizes {
        let Some(mut layout) = gpt::read(disk, ss)? else { continue };
        if mbr::has_protective_entry(&sec0) {
            return Ok(layout);
        }
        // Like Linux and libblkid: a GPT needs a protective MBR; a real MBR
        // with partitions wins over stale GPT headers.
        if let Ok(mut m) = mbr::read(disk, mbr_ss, &sec0)
            && m.kind == TableKind::Mbr
            && (!m.partitions.is_empty() || m.extended.is_some())
        {
            m.warnings.push(format!(
                "ignored GPT headers ({ss}-byte sectors): sector 0 holds an MBR without protective (0xEE) entry"
            ));
            return Ok(m);
        }
        layout.warnings.push("GPT without protective MBR (sector 0 has no 0xEE entry)".to_string());
        return Ok(layout);
    }
    mbr::read(disk, mbr_ss, &sec0)
}

/// A partition type as people know it (as fdisk names it), for a GPT
/// type GUID (by the `gpt` crate's constants) or an MBR type byte
/// ("0x83"); None for types klon has no name for.
pub fn type_name(type_id: &str) -> Option<&'static str> {
    use ::gpt::partition_types as t;
    let gpt = [
        (t::EFI, "EFI System"),
        (t::BIOS, "BIOS boot"),
        (t::MICROSOFT_RESERVED, "Microsoft reserved"),
        (t::BASIC, "Microsoft basic data"),
        (t::WINDOWS_RECOVERY, "Windows recovery environment"),
        (t::WINDOWS_STORAGESPACES, "Windows Storage Spaces"),
        (t::LINUX_FS, "Linux filesystem"),
        (t::LINUX_SWAP, "Linux swap"),
        (t::LINUX_LVM, "Linux LVM"),
        (t::LINUX_RAID, "Linux RAID"),
        (t::LINUX_ROOT_X64, "Linux root (x86-64)"),
        (t::LINUX_ROOT_X86, "Linux root (x86)"),
        (t::LINUX_HOME, "Linux home"),
        (t::LINUX_SRV, "Linux server data"),
        (t::LINUX_LUKS, "Linux LUKS"),
        (t::LINUX_DMCRYPT, "Linux dm-crypt"),
        (t::LINUX_RESERVED, "Linux reserved"),
        (t::FREEBSD_DATA, "FreeBSD data"),
        (t::FREEBSD_BOOT, "FreeBSD boot"),
        (t::FREEBSD_SWAP, "FreeBSD swap"),
        (t::FREEBSD_UFS, "FreeBSD UFS"),
        (t::FREEBSD_ZFS, "FreeBSD ZFS"),
    ];
    if let Some(byte) = type_id.strip_prefix("0x").and_then(|h| u8::from_str_radix(h, 16).ok()) {
        return Some(match byte {
            0x01 => "FAT12",
            0x04 | 0x06 | 0x0e => "FAT16",
            0x05 | 0x0f | 0x85 => "Extended",
            0x07 => "HPFS/NTFS/exFAT",
            0x0b | 0x0c => "W95 FAT32",
            0x27 => "Hidden NTFS WinRE",
            0x82 => "Linux swap",
            0x83 => "Linux",
            0x8e => "Linux LVM",
            0xa5 => "FreeBSD",
            0xee => "GPT protective",
            0xef => "EFI (FAT-12/16/32)",
            0xfd => "Linux raid autodetect",
            _ => return None,
        });
    }
    // (The crate's parser also takes its constants' names: a GUID only.)
    if type_id.len() != 36 || type_id.matches('-').count() != 4 {
        return None;
    }
    let guid = type_id.parse::<t::Type>().ok()?.guid;
    gpt.iter().find(|(ty, _)| ty.guid == guid).map(|(_, name)| *name)
}

/// Most partitions one disk can have: Linux's limit (DISK_MAX_PARTS).
pub const MAX_PARTITIONS: usize = 256;

impl DiskLayout {
    /// Checks that the layout is one [`read_layout`] could have produced:
    /// a sector size Linux supports, partitions on sector boundaries inside
    /// the disk, numbered once each, not overlapping, and fitting their
    /// table (GPT geometry inside the disk and entries inside its usable
    /// area; MBR numbers and 32-bit sector fields). A layout read from an
    /// image (its manifest) is checked before anything is written from it.
    /// The error says what is wrong.
    pub fn check(&self) -> std::result::Result<(), String> {
        let ss = u64::from(self.sector_size);
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(format!(
                "sector size {} is not one Linux supports (512, 1024, 2048 or 4096)",
                self.sector_size
            ));
        }
        if self.partitions.len() > MAX_PARTITIONS {
            return Err(format!("{} partitions: a disk holds at most {MAX_PARTITIONS}", self.partitions.len()));
        }
        let mut numbers: Vec<u32> = self.partitions.iter().map(|p| p.number).collect();
        numbers.sort_unstable();
        if let Some(w) = numbers.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("partition number {} is used twice", w[0]));
        }
        for p in &self.partitions {
            if p.number == 0 {
                return Err("a partition has number 0".into());
            }
            if p.start % ss != 0 || p.size % ss != 0 {
                return Err(format!("partition {} does not lie on {ss}-byte sector boundaries", p.number));
            }
        }
        let mut sorted = self.partitions.clone();
        sort_and_check(&mut sorted, self.disk_size).map_err(|e| match e {
            Error::Unsupported(m) if m.contains("does not lie within") => {
                let p = sorted.iter().find(|p| p.start.checked_add(p.size).is_none_or(|e| e > self.disk_size));
                match p {
                    Some(p) => format!("partition {} reaches past the end of the disk ({m})", p.number),
                    None => m,
                }
            }
            other => other.to_string(),
        })?;
        match self.kind {
            TableKind::None => {
                if !self.partitions.is_empty() || self.gpt.is_some() || self.extended.is_some() {
                    return Err("a disk without a partition table has partitions or table geometry".into());
                }
            }
            TableKind::Gpt => {
                let g = self.gpt.as_ref().ok_or("GPT layout without its geometry")?;
                gpt::check_geometry(g, ss, self.disk_size)?;
                for p in &self.partitions {
                    if p.number > g.num_entries || p.logical {
                        return Err(format!("GPT partition {} does not fit the entry array", p.number));
                    }
                    if p.start / ss < g.first_usable_lba || (p.start + p.size) / ss > g.last_usable_lba + 1 {
                        return Err(format!("GPT partition {} lies outside the usable area", p.number));
                    }
                }
            }
            TableKind::Mbr => {
                if self.gpt.is_some() {
                    return Err("MBR layout with GPT geometry".into());
                }
                let ext = self.extended;
                if let Some((a, l)) = ext
                    && (a % ss != 0 || l % ss != 0 || a.checked_add(l).is_none_or(|e| e > self.disk_size))
                {
                    return Err("the extended partition does not lie within the disk".into());
                }
                for p in &self.partitions {
                    let fits32 = p.start / ss <= u64::from(u32::MAX) && p.size / ss <= u64::from(u32::MAX);
                    let inside_ext = ext.is_some_and(|(a, l)| p.start > a && p.start + p.size <= a + l);
                    if !fits32
                        || (p.logical && (p.number < 5 || !inside_ext))
                        || (!p.logical && !(1..=4).contains(&p.number))
                    {
                        return Err(format!("MBR partition {} cannot be in an MBR where the layout puts it", p.number));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sorts partitions by start and checks that each lies within the disk and
/// that none overlap (`Error::Unsupported` naming both partitions).
fn sort_and_check(parts: &mut [Partition], disk_size: u64) -> Result<()> {
    parts.sort_by_key(|p| (p.start, p.number));
    let mut prev: Option<&Partition> = None;
    for p in parts.iter() {
        let end = p.start.checked_add(p.size);
        if p.size == 0 || end.is_none_or(|e| e > disk_size) {
            return Err(Error::Unsupported(format!(
                "partition {} (start byte {}, {} bytes) does not lie within the disk of {} bytes",
                p.number, p.start, p.size, disk_size
            )));
        }
        if let Some(q) = prev {
            if q.start + q.size > p.start {
                return Err(Error::Unsupported(format!(
                    "partitions {} and {} overlap (partition {} spans bytes {}..{}, partition {} starts at byte {})",
                    q.number,
                    p.number,
                    q.number,
                    q.start,
                    q.start + q.size,
                    p.number,
                    p.start
                )));
            }
            if p.start + p.size <= q.start + q.size {
                continue; // q still reaches furthest
            }
        }
        prev = Some(p);
    }
    Ok(())
}

/// Byte ranges `(start, len)` of the source disk that must not be written
/// verbatim to a target of `target_size` bytes: for a GPT on a larger target,
/// the old backup entry array and backup header (which belong at the end of
/// the disk and are rewritten there by [`fix_up_for_target`]). Sorted,
/// adjacent ranges merged, clipped to the source disk.
pub fn stale_ranges(layout: &DiskLayout, target_size: u64) -> Vec<(u64, u64)> {
    if layout.kind != TableKind::Gpt || target_size <= layout.disk_size {
        return Vec::new();
    }
    let Some(g) = &layout.gpt else { return Vec::new() };
    let ss = u64::from(layout.sector_size);
    let entries_len = gpt::entries_sectors(g.num_entries, g.entry_size, ss) * ss;
    let mut ranges =
        vec![(g.backup_entries_lba.saturating_mul(ss), entries_len), (g.backup_header_lba.saturating_mul(ss), ss)];
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ranges {
        if start >= layout.disk_size {
            continue;
        }
        let len = len.min(layout.disk_size - start);
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= start => {
                let end = (last.0 + last.1).max(start + len);
                last.1 = end - last.0;
            }
            _ => out.push((start, len)),
        }
    }
    out
}

/// The layout `read_layout(target)` should give after [`fix_up_for_target`]
/// on a target of `target_size` bytes: for GPT the backup moved to the new
/// end and the last usable LBA raised (when the target is larger, the last
/// partition is grown, or a damaged copy was repaired); with `grow_last` the
/// last partition (and on MBR its extended container) ends at the end of the
/// usable space.
pub fn layout_for_target(layout: &DiskLayout, target_size: u64, grow_last: bool) -> DiskLayout {
    let mut out = layout.clone();
    out.disk_size = target_size;
    match layout.kind {
        TableKind::Gpt => gpt::layout_for_target(&mut out, layout.disk_size, grow_last),
        TableKind::Mbr => mbr::layout_for_target(&mut out, grow_last),
        TableKind::None => {}
    }
    out
}

/// Fixes up a table that was copied verbatim (except [`stale_ranges`]) from
/// a disk with `layout` onto `target` (at least as large, same sector size),
/// and returns the byte ranges written, sorted.
///
/// GPT: on a larger target (or with `grow_last`, or when a GPT copy was
/// damaged) both headers and entry arrays are rewritten, the backup at the
/// end of the target, with the last usable LBA, the protective MBR's size and
/// all CRCs updated. With `grow_last` the last partition ends at the last
/// usable LBA. MBR with `grow_last`: the last partition (and, for a logical
/// one, its extended container and EBR link) grows to the end of the disk,
/// at most 2^32-1 sectors. Otherwise nothing is written.
pub fn fix_up_for_target(target: &Disk, layout: &DiskLayout, grow_last: bool) -> Result<Vec<(u64, u64)>> {
    if target.size < layout.disk_size {
        return Err(Error::Refused(format!(
            "target {} ({} bytes) is smaller than the source disk ({} bytes)",
            target.path.display(),
            target.size,
            layout.disk_size
        )));
    }
    if target.kind == DiskKind::BlockDevice
        && layout.kind != TableKind::None
        && target.logical_sector_size != layout.sector_size
    {
        return Err(Error::Unsupported(format!(
            "target {} has {}-byte sectors but the partition table was made for {}-byte sectors",
            target.path.display(),
            target.logical_sector_size,
            layout.sector_size
        )));
    }
    let mut written = match layout.kind {
        TableKind::Gpt => gpt::fix_up(target, layout, grow_last)?,
        TableKind::Mbr if grow_last => mbr::fix_up_grow(target, layout)?,
        _ => Vec::new(),
    };
    written.sort();
    Ok(written)
}

/// Where partitions must end on a disk of `target_size` bytes (of
/// `sector_size`-byte sectors) with a table of `layout`'s kind: before the
/// backup GPT, within what an MBR entry can describe, or at the disk's
/// end. None when a GPT cannot fit.
pub fn usable_end(layout: &DiskLayout, target_size: u64, sector_size: u32) -> Option<u64> {
    let ss = u64::from(sector_size);
    match layout.kind {
        TableKind::Gpt => gpt::geometry_for(layout, target_size, sector_size).map(|g| (g.last_usable_lba + 1) * ss),
        TableKind::Mbr => Some(target_size.min(0xFFFF_FFFF * ss)),
        TableKind::None => Some(target_size),
    }
}

/// `layout` on a disk of `target_size` bytes and `sector_size`-byte
/// sectors, its partitions (and extended container) at the places given:
/// the layout [`write_moved`] writes. None when its GPT cannot fit.
pub fn moved_layout(
    layout: &DiskLayout,
    target_size: u64,
    sector_size: u32,
    partitions: Vec<Partition>,
    extended: Option<(u64, u64)>,
) -> Option<DiskLayout> {
    let mut out = layout.clone();
    out.disk_size = target_size;
    out.sector_size = sector_size;
    out.partitions = partitions;
    out.partitions.sort_by_key(|p| p.start);
    out.extended = extended;
    out.warnings.clear();
    if layout.kind == TableKind::Gpt {
        out.gpt = Some(gpt::geometry_for(layout, target_size, sector_size)?);
        let first = out.gpt.as_ref().map_or(0, |g| g.first_usable_lba * u64::from(sector_size));
        if out.partitions.iter().any(|p| p.start < first) {
            return None;
        }
    }
    Some(out)
}

/// Writes the table of `moved` (a [`moved_layout`]) onto `target`, over the
/// source's table area restored there: GPT both copies rebuilt (names,
/// GUIDs, attributes kept) and the protective MBR sized; MBR the entries
/// of sector 0 moved (boot code and disk id kept) and the EBR chain
/// rebuilt. Returns the byte ranges written, sorted.
pub fn write_moved(target: &Disk, moved: &DiskLayout) -> Result<Vec<(u64, u64)>> {
    let mut written = match moved.kind {
        TableKind::Gpt => gpt::write_moved(target, moved)?,
        TableKind::Mbr => mbr::write_moved(target, moved)?,
        TableKind::None => Vec::new(),
    };
    written.sort();
    Ok(written)
}
