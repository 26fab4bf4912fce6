//! GPT: reading and validating both copies of the header and entry array,
//! and rewriting them for a (larger) target disk.
//!
//! On-disk format (UEFI spec, little-endian): the header at LBA 1 (primary)
//! and at the last LBA (backup), each pointing at its own entry array.

use super::{DiskLayout, GptGeometry, Partition, TableKind, TableSource, mbr, sort_and_check};
use crate::device::Disk;
use crate::error::{Error, Result};
use crate::le::{le16, le32, le64};

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Header size this module writes (the UEFI spec's 92 bytes).
const HEADER_SIZE: u32 = 92;
const REVISION_1_0: u32 = 0x0001_0000;
/// Upper bound on num_entries * entry_size read from a disk.
const MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// Bytes of one entry this module understands (larger entries carry extra
/// bytes that are preserved when the array is copied).
const ENTRY_BASE: usize = 128;

/// Formats a GUID stored in GPT's mixed-endian layout as upper-case
/// hyphenated text.
pub(super) fn guid_to_string(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// Parses hyphenated GUID text back into GPT's mixed-endian bytes.
pub(super) fn guid_from_string(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || s.len() != 36 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// Sectors taken by an entry array.
/// Checks GPT geometry recorded for a disk of `disk_size` bytes with
/// `ss`-byte sectors: an entry array of a size this module handles, the
/// primary array after the header and before the usable area, the usable
/// area and the backup copy inside the disk.
pub(super) fn check_geometry(g: &GptGeometry, ss: u64, disk_size: u64) -> std::result::Result<(), String> {
    let bad = |what: &str| Err(format!("GPT geometry: {what}"));
    if g.entry_size < ENTRY_BASE as u32
        || !g.entry_size.is_multiple_of(ENTRY_BASE as u32)
        || u64::from(g.num_entries) * u64::from(g.entry_size) > MAX_ENTRIES_BYTES
    {
        return bad(&format!("an entry array of {} x {} bytes", g.num_entries, g.entry_size));
    }
    let sectors = disk_size / ss;
    let n = entries_sectors(g.num_entries, g.entry_size, ss);
    if g.primary_entries_lba < 2 || g.primary_entries_lba + n > g.first_usable_lba {
        return bad("the primary entry array overlaps the header or the usable area");
    }
    if g.first_usable_lba > g.last_usable_lba.saturating_add(1) || g.last_usable_lba >= sectors {
        return bad(&format!(
            "usable sectors {}..={} do not lie within the disk of {sectors} sectors",
            g.first_usable_lba, g.last_usable_lba
        ));
    }
    // A backup copy found damaged or missing is rewritten by the restore:
    // where the source's header said it was does not matter then.
    if g.backup_valid
        && (g.backup_header_lba >= sectors
            || g.backup_header_lba <= g.last_usable_lba
            || g.backup_entries_lba <= g.last_usable_lba
            || g.backup_entries_lba + n > g.backup_header_lba)
    {
        return bad(&format!(
            "the backup copy (header at sector {}) does not lie at the end of the disk",
            g.backup_header_lba
        ));
    }
    Ok(())
}

pub(super) fn entries_sectors(num_entries: u32, entry_size: u32, sector_size: u64) -> u64 {
    (u64::from(num_entries) * u64::from(entry_size)).div_ceil(sector_size)
}

/// A GPT header, as far as this module reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) my_lba: u64,
    pub(super) alternate_lba: u64,
    pub(super) first_usable: u64,
    pub(super) last_usable: u64,
    pub(super) disk_guid: [u8; 16],
    pub(super) entries_lba: u64,
    pub(super) num_entries: u32,
    pub(super) entry_size: u32,
    pub(super) entries_crc: u32,
}

impl Header {
    /// Parses and validates the header in `buf` (one sector) read at `lba`
    /// of a disk of `total` sectors. The error says why it is invalid.
    pub(super) fn parse(buf: &[u8], lba: u64, total: u64, ss: u64) -> std::result::Result<Header, String> {
        if &buf[0..8] != SIGNATURE {
            return Err("no \"EFI PART\" signature".into());
        }
        let header_size = le32(buf, 12);
        if header_size < HEADER_SIZE || u64::from(header_size) > ss {
            return Err(format!("header size {header_size} is invalid"));
        }
        let mut copy = buf[..header_size as usize].to_vec();
        copy[16..20].fill(0);
        if crc32fast::hash(&copy) != le32(buf, 16) {
            return Err("header CRC32 mismatch".into());
        }
        let mut disk_guid = [0u8; 16];
        disk_guid.copy_from_slice(&buf[56..72]);
        let h = Header {
            my_lba: le64(buf, 24),
            alternate_lba: le64(buf, 32),
            first_usable: le64(buf, 40),
            last_usable: le64(buf, 48),
            disk_guid,
            entries_lba: le64(buf, 72),
            num_entries: le32(buf, 80),
            entry_size: le32(buf, 84),
            entries_crc: le32(buf, 88),
        };
        if h.my_lba != lba {
            return Err(format!("header says it is at LBA {} but was read at LBA {lba}", h.my_lba));
        }
        if h.first_usable > h.last_usable || h.first_usable == 0 || h.last_usable >= total {
            return Err(format!(
                "usable LBAs {}..={} do not fit a disk of {total} sectors",
                h.first_usable, h.last_usable
            ));
        }
        if (h.first_usable..=h.last_usable).contains(&lba) {
            return Err("header lies inside the usable area".into());
        }
        if h.entry_size < ENTRY_BASE as u32 || !h.entry_size.is_multiple_of(ENTRY_BASE as u32) {
            return Err(format!("entry size {} is invalid", h.entry_size));
        }
        if u64::from(h.num_entries) * u64::from(h.entry_size) > MAX_ENTRIES_BYTES {
            return Err(format!(
                "entry array of {} x {} bytes is larger than {MAX_ENTRIES_BYTES} bytes",
                h.num_entries, h.entry_size
            ));
        }
        let n = entries_sectors(h.num_entries, h.entry_size, ss);
        let end = h.entries_lba.saturating_add(n);
        if n > 0
            && (h.entries_lba == 0
                || end > total
                || (h.entries_lba..end).contains(&lba)
                || (h.entries_lba <= h.last_usable && h.first_usable < end))
        {
            return Err(format!(
                "entry array at LBA {} ({n} sectors) overlaps the header, the usable area or the disk's end",
                h.entries_lba
            ));
        }
        Ok(h)
    }

    /// The header as one sector (zero-padded), with its CRC computed.
    fn to_sector(&self, ss: u64) -> Vec<u8> {
        let mut b = vec![0u8; ss as usize];
        b[0..8].copy_from_slice(SIGNATURE);
        b[8..12].copy_from_slice(&REVISION_1_0.to_le_bytes());
        b[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        b[24..32].copy_from_slice(&self.my_lba.to_le_bytes());
        b[32..40].copy_from_slice(&self.alternate_lba.to_le_bytes());
        b[40..48].copy_from_slice(&self.first_usable.to_le_bytes());
        b[48..56].copy_from_slice(&self.last_usable.to_le_bytes());
        b[56..72].copy_from_slice(&self.disk_guid);
        b[72..80].copy_from_slice(&self.entries_lba.to_le_bytes());
        b[80..84].copy_from_slice(&self.num_entries.to_le_bytes());
        b[84..88].copy_from_slice(&self.entry_size.to_le_bytes());
        b[88..92].copy_from_slice(&self.entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..HEADER_SIZE as usize]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// One copy of the GPT: a valid header and its entry array (CRC checked).
struct Copy {
    header: Header,
    entries: Vec<u8>,
}

/// Reads the GPT copy whose header is at `lba`. I/O errors are errors; an
/// invalid copy is `Ok(Err(reason))`.
fn read_copy(disk: &dyn TableSource, lba: u64, ss: u64, total: u64) -> Result<std::result::Result<Copy, String>> {
    if lba >= total {
        return Ok(Err(format!("LBA {lba} lies beyond the end of the disk ({total} sectors)")));
    }
    let mut buf = vec![0u8; ss as usize];
    disk.read_table_bytes(&mut buf, lba * ss)?;
    let header = match Header::parse(&buf, lba, total, ss) {
        Ok(h) => h,
        Err(why) => return Ok(Err(why)),
    };
    // Bounded by MAX_ENTRIES_BYTES and within the disk (checked in parse).
    let mut entries = vec![0u8; header.num_entries as usize * header.entry_size as usize];
    if !entries.is_empty() {
        disk.read_table_bytes(&mut entries, header.entries_lba * ss)?;
    }
    if crc32fast::hash(&entries) != header.entries_crc {
        return Ok(Err("partition entry array CRC32 mismatch".into()));
    }
    Ok(Ok(Copy { header, entries }))
}

/// Whether a backup copy agrees with the primary.
fn consistent(p: &Header, p_entries: &[u8], b: &Copy) -> bool {
    let h = &b.header;
    h.alternate_lba == 1
        && h.first_usable == p.first_usable
        && h.last_usable == p.last_usable
        && h.disk_guid == p.disk_guid
        && h.num_entries == p.num_entries
        && h.entry_size == p.entry_size
        && b.entries == p_entries
}

/// Decodes the used entries of an array (type GUID not zero). `usable`, when
/// given, is the usable LBA range: partitions outside it get a warning.
pub(super) fn parse_entries(
    entries: &[u8],
    entry_size: u32,
    ss: u64,
    total: u64,
    usable: Option<(u64, u64)>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Partition>> {
    let mut parts = Vec::new();
    for (i, e) in entries.chunks_exact(entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last >= total {
            return Err(Error::Unsupported(format!(
                "GPT partition {number} ends at LBA {last}, beyond the end of the disk ({total} sectors of {ss} bytes)"
            )));
        }
        if first > last || first == 0 {
            return Err(Error::Unsupported(format!(
                "GPT partition {number} has an invalid extent (LBA {first} to {last})"
            )));
        }
        if let Some((lo, hi)) = usable
            && (first < lo || last > hi)
        {
            warnings.push(format!(
                "GPT partition {number} (LBA {first}..={last}) lies outside the usable LBAs {lo}..={hi}"
            ));
        }
        let units: Vec<u16> =
            e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
        parts.push(Partition {
            number,
            start: first * ss,
            size: (last - first + 1) * ss,
            type_id: guid_to_string(&e[0..16]),
            name: String::from_utf16_lossy(&units),
            uuid: Some(guid_to_string(&e[16..32])),
            attributes: le64(e, 48),
            logical: false,
        });
    }
    Ok(parts)
}

/// Reads a GPT with `sector_size`-byte sectors: the primary copy if valid,
/// else the backup at the last LBA (with a warning). `None` when neither
/// copy is valid.
pub(super) fn read(disk: &dyn TableSource, sector_size: u32) -> Result<Option<DiskLayout>> {
    let ss = u64::from(sector_size);
    let size = disk.table_source_size();
    let total = size / ss;
    if total < 3 {
        return Ok(None);
    }
    let mut warnings = Vec::new();
    let (chosen, geometry) = match read_copy(disk, 1, ss, total)? {
        Ok(p) => {
            let alt = p.header.alternate_lba;
            let n = entries_sectors(p.header.num_entries, p.header.entry_size, ss);
            let backup = if alt == 1 {
                Err("the primary header names itself as backup".to_string())
            } else {
                read_copy(disk, alt, ss, total)?
            };
            let (backup_valid, backup_entries_lba) = match backup {
                Ok(b) if consistent(&p.header, &p.entries, &b) => (true, b.header.entries_lba),
                Ok(b) => {
                    warnings.push(format!("backup GPT at LBA {alt} differs from the primary; the primary is used"));
                    (false, b.header.entries_lba)
                }
                Err(why) => {
                    warnings.push(format!("backup GPT at LBA {alt} is invalid ({why}); the primary is used"));
                    (false, alt.saturating_sub(n))
                }
            };
            let g = GptGeometry {
                first_usable_lba: p.header.first_usable,
                last_usable_lba: p.header.last_usable,
                primary_entries_lba: p.header.entries_lba,
                backup_header_lba: alt,
                backup_entries_lba,
                num_entries: p.header.num_entries,
                entry_size: p.header.entry_size,
                primary_valid: true,
                backup_valid,
            };
            (p, g)
        }
        Err(why_primary) => {
            let last = total - 1;
            let Ok(b) = read_copy(disk, last, ss, total)? else {
                return Ok(None);
            };
            warnings.push(format!(
                "primary GPT header or entry array is invalid ({why_primary}); the backup at LBA {last} is used"
            ));
            let g = GptGeometry {
                first_usable_lba: b.header.first_usable,
                last_usable_lba: b.header.last_usable,
                primary_entries_lba: 2,
                backup_header_lba: last,
                backup_entries_lba: b.header.entries_lba,
                num_entries: b.header.num_entries,
                entry_size: b.header.entry_size,
                primary_valid: false,
                backup_valid: true,
            };
            (b, g)
        }
    };
    let h = &chosen.header;
    let mut partitions =
        parse_entries(&chosen.entries, h.entry_size, ss, total, Some((h.first_usable, h.last_usable)), &mut warnings)?;
    sort_and_check(&mut partitions, size)?;
    Ok(Some(DiskLayout {
        kind: TableKind::Gpt,
        sector_size,
        disk_size: size,
        disk_id: Some(guid_to_string(&h.disk_guid)),
        partitions,
        extended: None,
        gpt: Some(geometry),
        warnings,
    }))
}

/// Whether a warning is about a damaged or inconsistent GPT copy (which a
/// rewrite repairs).
fn is_copy_warning(w: &str) -> bool {
    w.starts_with("primary GPT") || w.starts_with("backup GPT")
}

/// Whether `fix_up` rewrites the GPT.
fn needs_rewrite(g: &GptGeometry, old_size: u64, new_size: u64, grow_last: bool) -> bool {
    new_size > old_size || grow_last || !g.primary_valid || !g.backup_valid
}

/// The geometry after a rewrite on a disk of `total` sectors: backup header
/// at the last LBA, its entry array just before, usable space up to there.
fn target_geometry(g: &GptGeometry, ss: u64, total: u64) -> Option<GptGeometry> {
    let n = entries_sectors(g.num_entries, g.entry_size, ss);
    let last = total.checked_sub(1)?;
    let backup_entries_lba = last.checked_sub(n)?;
    let last_usable_lba = backup_entries_lba.checked_sub(1)?;
    Some(GptGeometry {
        last_usable_lba,
        backup_header_lba: last,
        backup_entries_lba,
        primary_valid: true,
        backup_valid: true,
        ..g.clone()
    })
}

/// The partition with the highest end (the one `grow_last` grows).
pub(super) fn last_by_end(parts: &[Partition]) -> Option<usize> {
    (0..parts.len()).max_by_key(|&i| (parts[i].start + parts[i].size, parts[i].start))
}

/// See [`super::layout_for_target`].
pub(super) fn layout_for_target(out: &mut DiskLayout, old_size: u64, grow_last: bool) {
    let Some(g) = out.gpt.clone() else { return };
    if !needs_rewrite(&g, old_size, out.disk_size, grow_last) {
        return;
    }
    let ss = u64::from(out.sector_size);
    let Some(ng) = target_geometry(&g, ss, out.disk_size / ss) else { return };
    out.warnings.retain(|w| !is_copy_warning(w));
    if grow_last && let Some(i) = last_by_end(&out.partitions) {
        let p = &mut out.partitions[i];
        let end = (ng.last_usable_lba + 1) * ss;
        if end > p.start + p.size {
            p.size = end - p.start;
        }
    }
    out.gpt = Some(ng);
}

/// Builds an entry array from the layout (used when no copy on the target
/// matches it, e.g. when the source's primary was damaged).
fn build_entries(layout: &DiskLayout, g: &GptGeometry) -> Result<Vec<u8>> {
    let ss = u64::from(layout.sector_size);
    let es = g.entry_size as usize;
    let mut buf = vec![0u8; g.num_entries as usize * es];
    for p in &layout.partitions {
        let bad = |what: &str| Error::Unsupported(format!("GPT partition {}: {what}", p.number));
        let idx = p.number.checked_sub(1).filter(|&i| i < g.num_entries).ok_or_else(|| bad("number out of range"))?;
        let type_guid = guid_from_string(&p.type_id).ok_or_else(|| bad("invalid type GUID"))?;
        let uuid = p.uuid.as_deref().and_then(guid_from_string).ok_or_else(|| bad("invalid unique GUID"))?;
        let e = &mut buf[idx as usize * es..][..ENTRY_BASE];
        e[0..16].copy_from_slice(&type_guid);
        e[16..32].copy_from_slice(&uuid);
        e[32..40].copy_from_slice(&(p.start / ss).to_le_bytes());
        e[40..48].copy_from_slice(&((p.start + p.size) / ss - 1).to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        for (j, u) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    Ok(buf)
}

/// See [`super::fix_up_for_target`] (GPT part).
pub(super) fn fix_up(target: &Disk, layout: &DiskLayout, grow_last: bool) -> Result<Vec<(u64, u64)>> {
    let g = layout.gpt.as_ref().ok_or_else(|| Error::Unsupported("GPT layout without GPT geometry".into()))?;
    if !needs_rewrite(g, layout.disk_size, target.size, grow_last) {
        return Ok(Vec::new());
    }
    let ss = u64::from(layout.sector_size);
    let total = target.size / ss;
    let n = entries_sectors(g.num_entries, g.entry_size, ss);
    let esz = g.num_entries as usize * g.entry_size as usize;
    let ng = target_geometry(g, ss, total)
        .filter(|ng| ng.last_usable_lba >= g.first_usable_lba)
        .ok_or_else(|| Error::Unsupported(format!("target of {total} sectors is too small for this GPT")))?;
    if u64::from(g.num_entries) * u64::from(g.entry_size) > MAX_ENTRIES_BYTES
        || g.entry_size < ENTRY_BASE as u32
        || !g.entry_size.is_multiple_of(ENTRY_BASE as u32)
        || g.primary_entries_lba < 2
        || g.primary_entries_lba + n > g.first_usable_lba
    {
        return Err(Error::Unsupported("GPT geometry in the layout is invalid".into()));
    }
    if let Some(p) = layout.partitions.iter().find(|p| (p.start + p.size) / ss > ng.last_usable_lba + 1) {
        return Err(Error::Unsupported(format!(
            "GPT partition {} ends beyond the target's last usable LBA {}",
            p.number, ng.last_usable_lba
        )));
    }
    let disk_guid = layout
        .disk_id
        .as_deref()
        .and_then(guid_from_string)
        .ok_or_else(|| Error::Unsupported("GPT layout without a valid disk GUID".into()))?;

    // The entry array: a copy on the target that decodes to the layout's
    // partitions (keeps every byte), else one rebuilt from the layout.
    let mut candidates = vec![g.primary_entries_lba];
    if target.size == layout.disk_size {
        candidates.push(g.backup_entries_lba);
    }
    let mut entries = None;
    for lba in candidates {
        if lba.saturating_add(n) > total {
            continue;
        }
        let mut buf = vec![0u8; esz];
        target.read_exact_at(&mut buf, lba * ss)?;
        if let Ok(mut parts) = parse_entries(&buf, g.entry_size, ss, total, None, &mut Vec::new()) {
            parts.sort_by_key(|p| (p.start, p.number));
            if parts == layout.partitions {
                entries = Some(buf);
                break;
            }
        }
    }
    let mut entries = match entries {
        Some(e) => e,
        None => build_entries(layout, g)?,
    };
    if grow_last && let Some(i) = last_by_end(&layout.partitions) {
        let p = &layout.partitions[i];
        let off = (p.number as usize - 1) * g.entry_size as usize + 40;
        if le64(&entries, off) < ng.last_usable_lba {
            entries[off..off + 8].copy_from_slice(&ng.last_usable_lba.to_le_bytes());
        }
    }

    write_copies(target, ss, &ng, disk_guid, &entries)
}

/// Writes a GPT of geometry `ng` (the backup at the end of a disk of
/// `total` sectors) with `entries` onto `target`: the backup copy first,
/// the primary header last, so an interruption leaves the old primary
/// readable; and a protective MBR sized to the disk. Returns the byte
/// ranges written.
/// `ss`-byte sectors) with `entries` onto `target`: the backup copy first,
fn write_copies(
    target: &Disk,
    ss: u64,
    ng: &GptGeometry,
    disk_guid: [u8; 16],
    entries: &[u8],
) -> Result<Vec<(u64, u64)>> {
    let total = target.size / ss;
    let n = entries_sectors(ng.num_entries, ng.entry_size, ss);
    let esz = entries.len();
    let primary = Header {
        my_lba: 1,
        alternate_lba: ng.backup_header_lba,
        first_usable: ng.first_usable_lba,
        last_usable: ng.last_usable_lba,
        disk_guid,
        entries_lba: ng.primary_entries_lba,
        num_entries: ng.num_entries,
        entry_size: ng.entry_size,
        entries_crc: crc32fast::hash(entries),
    };
    let backup = Header {
        my_lba: ng.backup_header_lba,
        alternate_lba: 1,
        entries_lba: ng.backup_entries_lba,
        ..primary.clone()
    };
    let mut written = Vec::new();
    // Backup first, primary header last: an interrupted fix-up leaves the
    // old primary readable.
    let mut padded = entries.to_vec();
    padded.resize((n * ss) as usize, 0);
    target.write_all_at(&padded, ng.backup_entries_lba * ss)?;
    written.push((ng.backup_entries_lba * ss, n * ss));
    target.write_all_at(&backup.to_sector(ss), ng.backup_header_lba * ss)?;
    written.push((ng.backup_header_lba * ss, ss));
    let mut current = vec![0u8; esz];
    target.read_exact_at(&mut current, ng.primary_entries_lba * ss)?;
    if current != entries {
        target.write_all_at(entries, ng.primary_entries_lba * ss)?;
        written.push((ng.primary_entries_lba * ss, esz as u64));
    }
    target.write_all_at(&primary.to_sector(ss), ss)?;
    written.push((ss, ss));
    if let Some(range) = mbr::fix_protective(target, total)? {
        written.push(range);
    }
    Ok(written)
}

/// The geometry of `layout`'s GPT rewritten for a disk of `target_size`
/// bytes (backup at its end); None when it cannot hold the table.
/// With `sector_size` other than the layout's, the table is laid out anew
/// for that sector size: entry array from LBA 2, first usable LBA just
/// after it.
pub(super) fn geometry_for(layout: &DiskLayout, target_size: u64, sector_size: u32) -> Option<GptGeometry> {
    let ss = u64::from(sector_size);
    let g = layout.gpt.as_ref()?;
    let g = if sector_size == layout.sector_size {
        g.clone()
    } else {
        let n = entries_sectors(g.num_entries, g.entry_size, ss);
        GptGeometry { primary_entries_lba: 2, first_usable_lba: 2 + n, ..g.clone() }
    };
    target_geometry(&g, ss, target_size / ss).filter(|ng| ng.last_usable_lba >= ng.first_usable_lba)
}

/// See [`super::write_moved`] (GPT part): both copies rebuilt from
/// `moved`, whose geometry is already the target's ([`geometry_for`]).
pub(super) fn write_moved(target: &Disk, moved: &DiskLayout) -> Result<Vec<(u64, u64)>> {
    let ng = moved.gpt.as_ref().ok_or_else(|| Error::Unsupported("GPT layout without GPT geometry".into()))?;
    let disk_guid = moved
        .disk_id
        .as_deref()
        .and_then(guid_from_string)
        .ok_or_else(|| Error::Unsupported("GPT layout without a valid disk GUID".into()))?;
    let entries = build_entries(moved, ng)?;
    write_copies(target, u64::from(moved.sector_size), ng, disk_guid, &entries)
}
