//! Table sectors built from a description rather than read from a disk:
//! the MBR's four entries and the EBR chain of an extended partition as
//! sfdisk writes them, and GPT copies stored as plain bytes (Clonezilla's
//! `-gpt-1st` / `-gpt-2nd` files).

use super::mbr::{chs, is_extended};
use super::{DiskLayout, Partition, TableKind, gpt};
use crate::error::{Error, Result};

/// Offset of the first partition entry in an MBR or EBR.
const TABLE: usize = 446;
/// Largest start or size an MBR entry holds.
const MAX32: u64 = 0xFFFF_FFFF;
/// sfdisk's default alignment (and first LBA of a DOS label): 1 MiB.
const GRAIN_BYTES: u64 = 1 << 20;
/// Most logical partitions a chain is built for.
const MAX_LOGICAL: usize = 128;

/// One entry of the MBR's primary table, in sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrEntry {
    /// Slot 1 to 4 (the partition number).
    pub slot: u32,
    /// Boot flag (status 0x80).
    pub bootable: bool,
    /// Partition type byte.
    pub ptype: u8,
    /// First sector.
    pub start: u64,
    /// Number of sectors.
    pub sectors: u64,
}

/// A 16-byte entry: `rel_start` and `size` as stored, CHS from the absolute
/// sectors `abs_start`..`abs_start + size` (255 heads, 63 sectors, capped
/// at cylinder 1023, as sfdisk writes them).
fn entry(status: u8, ptype: u8, abs_start: u64, rel_start: u64, size: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = status;
    e[1..4].copy_from_slice(&chs(abs_start));
    e[4] = ptype;
    e[5..8].copy_from_slice(&chs(abs_start + size - 1));
    e[8..12].copy_from_slice(&(rel_start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(size as u32).to_le_bytes());
    e
}

/// The 64 bytes of the MBR's primary table (offset 446) for `entries`;
/// empty slots are zeros. Slots must be 1 to 4 and distinct, and every
/// start and size fit the 32-bit fields.
pub fn mbr_entries(entries: &[MbrEntry]) -> Result<[u8; 64]> {
    let mut out = [0u8; 64];
    let mut used = [false; 4];
    for e in entries {
        let bad = |why: &str| Error::Unsupported(format!("MBR partition {}: {why}", e.slot));
        if !(1..=4).contains(&e.slot) {
            return Err(bad("a primary partition number must be 1 to 4"));
        }
        let i = e.slot as usize - 1;
        if used[i] {
            return Err(bad("described twice"));
        }
        used[i] = true;
        if e.start == 0 || e.sectors == 0 || e.start > MAX32 || e.sectors > MAX32 {
            return Err(bad("start or size does not fit an MBR entry"));
        }
        let status = if e.bootable { 0x80 } else { 0 };
        out[16 * i..16 * i + 16].copy_from_slice(&entry(status, e.ptype, e.start, e.start, e.sectors));
    }
    Ok(out)
}

/// Parses a type_id of an MBR layout ("0x83").
fn mbr_type(p: &Partition) -> Result<u8> {
    p.type_id
        .strip_prefix("0x")
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .ok_or_else(|| Error::Unsupported(format!("partition {}: MBR type {:?} is not a byte", p.number, p.type_id)))
}

/// The EBR chain sfdisk writes for the logical partitions of `layout`: the
/// first EBR at the start of the extended partition, every further one at
/// the partition's start minus sfdisk's first LBA (1 MiB), one sector later
/// when that is the extended partition's start. Each EBR holds its logical
/// partition (start relative to the EBR) and a link (type 0x05, start
/// relative to the extended partition, spanning the next EBR to the end of
/// its partition). Returns (byte offset, sector) pairs in chain order; empty
/// without extended partition.
///
/// Logical partitions must be numbered 5, 6, ... in the order of their
/// starts and leave room for their EBR where sfdisk puts it; otherwise
/// `Error::Unsupported` (sfdisk would not reproduce the source's chain).
pub fn mbr_ebr_chain(layout: &DiskLayout) -> Result<Vec<(u64, [u8; 512])>> {
    if layout.kind != TableKind::Mbr {
        return Ok(Vec::new());
    }
    let Some((ext_start_b, ext_size_b)) = layout.extended else {
        if let Some(p) = layout.partitions.iter().find(|p| p.logical) {
            return Err(Error::Unsupported(format!("logical partition {} without extended partition", p.number)));
        }
        return Ok(Vec::new());
    };
    if layout.sector_size < 512 || !layout.sector_size.is_power_of_two() {
        return Err(Error::Unsupported(format!("sector size {} is not supported for MBR", layout.sector_size)));
    }
    let ss = u64::from(layout.sector_size);
    if !ext_start_b.is_multiple_of(ss) || !ext_size_b.is_multiple_of(ss) || ext_size_b == 0 {
        return Err(Error::Unsupported("the extended partition is not sector-aligned".into()));
    }
    let (ext_start, ext_end) = (ext_start_b / ss, (ext_start_b + ext_size_b) / ss);
    if ext_start == 0 || ext_end > MAX32 + 1 {
        return Err(Error::Unsupported("the extended partition does not fit an MBR entry".into()));
    }
    let first_lba = (GRAIN_BYTES / ss).max(1);
    let mut logical: Vec<&Partition> = layout.partitions.iter().filter(|p| p.logical).collect();
    logical.sort_by_key(|p| p.start);
    if logical.len() > MAX_LOGICAL {
        return Err(Error::Unsupported(format!("more than {MAX_LOGICAL} logical partitions")));
    }
    // (ebr, start, end) in sectors, end exclusive.
    let mut places: Vec<(u64, u64, u64)> = Vec::with_capacity(logical.len());
    for (i, p) in logical.iter().enumerate() {
        let want = 5 + i as u32;
        if p.number != want {
            return Err(Error::Unsupported(format!(
                "logical partition {} is the {}. in disk order; sfdisk would number it {want}",
                p.number,
                i + 1
            )));
        }
        if !p.start.is_multiple_of(ss) || !p.size.is_multiple_of(ss) || p.size == 0 {
            return Err(Error::Unsupported(format!("logical partition {} is not sector-aligned", p.number)));
        }
        let (start, end) = (p.start / ss, (p.start + p.size) / ss);
        if start <= ext_start || end > ext_end {
            return Err(Error::Unsupported(format!(
                "logical partition {} (sectors {start}..{end}) does not lie within the extended partition \
                 (sectors {ext_start}..{ext_end}) with room for its EBR",
                p.number
            )));
        }
        let ebr = if i == 0 {
            ext_start
        } else {
            match start.checked_sub(first_lba) {
                Some(o) if o == ext_start => o + 1,
                Some(o) => o,
                None => 0,
            }
        };
        let prev_end = places.last().map_or(ext_start, |&(_, _, e)| e);
        if ebr < prev_end || ebr >= start || (i > 0 && ebr <= ext_start) {
            return Err(Error::Unsupported(format!(
                "logical partition {} starts at sector {start}: sfdisk would put its EBR at sector {ebr}, which is \
                 not free (the previous logical partition ends at sector {prev_end}); this chain cannot be rebuilt \
                 as Clonezilla's restore would",
                p.number
            )));
        }
        places.push((ebr, start, end));
    }
    let mut out = Vec::with_capacity(places.len());
    for (i, (p, &(ebr, start, end))) in logical.iter().zip(&places).enumerate() {
        let mut sector = [0u8; 512];
        let status = if p.attributes & 0x80 != 0 { 0x80 } else { 0 };
        sector[TABLE..TABLE + 16].copy_from_slice(&entry(status, mbr_type(p)?, start, start - ebr, end - start));
        if let Some(&(next_ebr, _, next_end)) = places.get(i + 1) {
            let link = entry(0, 0x05, next_ebr, next_ebr - ext_start, next_end - next_ebr);
            sector[TABLE + 16..TABLE + 32].copy_from_slice(&link);
        }
        sector[510] = 0x55;
        sector[511] = 0xAA;
        out.push((ebr * ss, sector));
    }
    Ok(out)
}

/// Whether an MBR type byte marks an extended partition (0x05, 0x0F, 0x85).
pub fn is_extended_type(t: u8) -> bool {
    is_extended(t)
}

/// A GPT header (and its entries) parsed from bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptCopy {
    /// LBA the header says it is at.
    pub my_lba: u64,
    /// LBA of the other header.
    pub alternate_lba: u64,
    /// First usable LBA.
    pub first_usable_lba: u64,
    /// Last usable LBA.
    pub last_usable_lba: u64,
    /// Disk GUID, upper-case hyphenated.
    pub disk_guid: String,
    /// LBA of the entry array.
    pub entries_lba: u64,
    /// Number of entries.
    pub num_entries: u32,
    /// Size of one entry.
    pub entry_size: u32,
    /// CRC32 of the entry array, as the header records it.
    pub entries_crc: u32,
}

impl GptCopy {
    /// Bytes of the entry array.
    pub fn entries_len(&self) -> u64 {
        u64::from(self.num_entries) * u64::from(self.entry_size)
    }
}

/// Parses and validates the GPT header in `sector` (one logical sector)
/// as read at `lba` of a disk of `disk_size` bytes with `sector_size`-byte
/// sectors. The error says why it is invalid.
pub fn parse_gpt_header(
    sector: &[u8],
    lba: u64,
    disk_size: u64,
    sector_size: u32,
) -> std::result::Result<GptCopy, String> {
    let ss = u64::from(sector_size);
    if sector.len() as u64 != ss {
        return Err(format!("header sector holds {} bytes, not {ss}", sector.len()));
    }
    let h = gpt::Header::parse(sector, lba, disk_size / ss, ss)?;
    Ok(GptCopy {
        my_lba: h.my_lba,
        alternate_lba: h.alternate_lba,
        first_usable_lba: h.first_usable,
        last_usable_lba: h.last_usable,
        disk_guid: gpt::guid_to_string(&h.disk_guid),
        entries_lba: h.entries_lba,
        num_entries: h.num_entries,
        entry_size: h.entry_size,
        entries_crc: h.entries_crc,
    })
}

/// Decodes the used entries of a GPT entry array (whose CRC32 must be
/// `copy.entries_crc`) into partitions sorted by start, as
/// [`super::read_layout`] would.
pub fn parse_gpt_entries(copy: &GptCopy, entries: &[u8], disk_size: u64, sector_size: u32) -> Result<Vec<Partition>> {
    if entries.len() as u64 != copy.entries_len() {
        return Err(Error::Corrupt(format!(
            "GPT entry array holds {} bytes, the header says {}",
            entries.len(),
            copy.entries_len()
        )));
    }
    if crc32fast::hash(entries) != copy.entries_crc {
        return Err(Error::Corrupt("GPT partition entry array CRC32 mismatch".into()));
    }
    let ss = u64::from(sector_size);
    let mut warnings = Vec::new();
    let mut parts = gpt::parse_entries(
        entries,
        copy.entry_size,
        ss,
        disk_size / ss,
        Some((copy.first_usable_lba, copy.last_usable_lba)),
        &mut warnings,
    )?;
    super::sort_and_check(&mut parts, disk_size)?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logical(number: u32, start: u64, sectors: u64) -> Partition {
        Partition {
            number,
            start: start * 512,
            size: sectors * 512,
            type_id: "0x83".into(),
            name: String::new(),
            uuid: None,
            attributes: 0,
            logical: true,
        }
    }

    fn layout(parts: Vec<Partition>, ext: (u64, u64)) -> DiskLayout {
        DiskLayout {
            kind: TableKind::Mbr,
            sector_size: 512,
            disk_size: 1 << 30,
            disk_id: Some("0x12345678".into()),
            partitions: parts,
            extended: Some((ext.0 * 512, ext.1 * 512)),
            gpt: None,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn ebr_chain_where_sfdisk_puts_it() {
        let l = layout(vec![logical(5, 4096, 1000), logical(6, 8192, 2048)], (2048, 100_000));
        let chain = mbr_ebr_chain(&l).unwrap();
        let at: Vec<u64> = chain.iter().map(|(o, _)| o / 512).collect();
        assert_eq!(at, [2048, 8192 - 2048]);
        let first = &chain[0].1;
        assert_eq!(u32::from_le_bytes(first[454..458].try_into().unwrap()), 4096 - 2048);
        assert_eq!(first[446 + 16 + 4], 0x05);
        // Link: relative to the extended partition, from the EBR to the partition's end.
        assert_eq!(u32::from_le_bytes(first[470..474].try_into().unwrap()), 6144 - 2048);
        assert_eq!(u32::from_le_bytes(first[474..478].try_into().unwrap()), 8192 + 2048 - 6144);
        assert_eq!(&chain[1].1[462..478], &[0u8; 16]);
        assert_eq!(&first[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn ebr_chain_refuses_what_sfdisk_cannot_rebuild() {
        // Logical partitions 63 sectors apart (old DOS-style): the EBR of
        // partition 6 would land inside partition 5.
        let l = layout(vec![logical(5, 2111, 1000), logical(6, 3174, 1000)], (2048, 100_000));
        let e = mbr_ebr_chain(&l).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("partition 6"), "{e}");
        // Numbers out of disk order.
        let l = layout(vec![logical(6, 4096, 1000), logical(5, 8192, 1000)], (2048, 100_000));
        assert!(mbr_ebr_chain(&l).is_err());
    }
}
