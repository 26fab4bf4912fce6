//! The bytes outside the partitions a Clonezilla restore leaves: the MBR's
//! boot code, hidden data after it, EBRs, and a GPT's two copies.

use std::path::Path;

use super::sfdisk::{SfDump, guid};
use super::{GPT_1ST_LEN, GPT_2ND_MAX, MAX_HIDDEN, read_bytes};
use crate::error::{Error, Result};
use crate::table::build::{self, GptCopy};
use crate::table::{DiskLayout, GptGeometry};

/// Sorts and merges-checks boot ranges: no two may overlap.
pub(super) fn check_boot(boot: &mut [(u64, Vec<u8>)], layout: &DiskLayout) -> Result<()> {
    boot.sort_by_key(|(o, _)| *o);
    for w in boot.windows(2) {
        if w[0].0 + w[0].1.len() as u64 > w[1].0 {
            return Err(Error::Corrupt(format!(
                "boot areas at bytes {} and {} overlap (a damaged table file?)",
                w[0].0, w[1].0
            )));
        }
    }
    for (o, b) in boot.iter() {
        let end = o + b.len() as u64;
        if end > layout.disk_size {
            return Err(Error::Corrupt(format!("a boot area at byte {o} reaches past the end of the disk")));
        }
        if let Some(p) = layout.partitions.iter().find(|p| *o < p.start + p.size && p.start < end) {
            return Err(Error::Corrupt(format!("the boot area at bytes {o}..{end} overlaps partition {}", p.number)));
        }
    }
    Ok(())
}

/// Whether two 64-byte primary tables describe the same partitions (start,
/// size, type, status), whatever their CHS fields say.
pub(super) fn same_lba_entries(a: &[u8], b: &[u8]) -> bool {
    (0..4).all(|i| {
        let (x, y) = (&a[16 * i..16 * i + 16], &b[16 * i..16 * i + 16]);
        x[0] == y[0] && x[4] == y[4] && x[8..16] == y[8..16]
    })
}

/// Adds the hidden data after the MBR (sector 1 up to the first partition)
/// as Clonezilla's restore writes it: whole 512-byte sectors, only when it
/// fits before the first partition (and the first EBR).
pub(super) fn hidden_data(
    dir: &Path,
    disk: &str,
    layout: &DiskLayout,
    boot: &mut Vec<(u64, Vec<u8>)>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let name = format!("{disk}-hidden-data-after-mbr");
    let first = layout.partitions.iter().map(|p| p.start).chain(layout.extended.map(|e| e.0)).min();
    let gap = first.map_or(0, |f| f.saturating_sub(512));
    match read_bytes(dir, &name, MAX_HIDDEN)? {
        Some(mut data) => {
            data.truncate(data.len() / 512 * 512);
            if data.len() as u64 > gap {
                warnings.push(format!(
                    "{name} ({} bytes) does not fit between the MBR and the first partition ({gap} bytes); \
                     it is not restored (Clonezilla skips it too)",
                    data.len()
                ));
            } else if !data.is_empty() {
                boot.push((512, data));
            }
        }
        None if gap > 0 => {
            let why = if dir.join(format!("{name}.notes.txt")).exists() {
                "it was larger than Clonezilla's limit"
            } else {
                "the image was saved without -j2"
            };
            warnings.push(format!(
                "the {gap} bytes between the MBR and the first partition were not saved ({why}); a restore \
                 leaves them as they are on the target (boot loaders such as GRUB keep code there)"
            ));
        }
        None => {}
    }
    Ok(())
}

/// The GPT's bytes outside the partitions: `-gpt-1st` up to the end of the
/// primary entry array (sector 0's boot code from `-mbr`, which Clonezilla
/// writes last), and the backup entry array and header at the disk's end
/// (from `-gpt-2nd`, its missing first sector from the primary array).
/// Checks both copies against the dump and fills in `layout.gpt`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gpt_boot(
    dir: &Path,
    disk: &str,
    sf: &SfDump,
    sf_name: &str,
    first: &[u8],
    mbr: Option<&[u8]>,
    layout: &mut DiskLayout,
    boot: &mut Vec<(u64, Vec<u8>)>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let name1 = format!("{disk}-gpt-1st");
    if layout.sector_size != 512 {
        return Err(Error::Unsupported(format!(
            "the disk has {}-byte sectors: Clonezilla saves GPT copies in 512-byte units, which do not hold \
             such a table whole",
            layout.sector_size
        )));
    }
    if (first.len() as u64) < GPT_1ST_LEN {
        return Err(Error::Corrupt(format!("{name1} holds {} bytes, not {GPT_1ST_LEN}", first.len())));
    }
    let ss = 512u64;
    let p = build::parse_gpt_header(&first[512..1024], 1, layout.disk_size, 512)
        .map_err(|why| Error::Corrupt(format!("{name1}: the primary GPT header is invalid: {why}")))?;
    let entries_end = p.entries_lba * ss + p.entries_len();
    if p.entries_lba < 2 || entries_end > first.len() as u64 {
        return Err(Error::Unsupported(format!(
            "{name1}: the entry array (LBA {}, {} bytes) is not within the 34 sectors Clonezilla saves",
            p.entries_lba,
            p.entries_len()
        )));
    }
    let entries = &first[(p.entries_lba * ss) as usize..entries_end as usize];
    let parts = build::parse_gpt_entries(&p, entries, layout.disk_size, 512)
        .map_err(|e| Error::Corrupt(format!("{name1}: {e}")))?;
    if parts != layout.partitions {
        return Err(Error::Corrupt(format!(
            "{name1} and {sf_name} describe different partitions (one of them is damaged or stale)"
        )));
    }
    let checks = [
        ("label-id", sf.label_id.as_deref().and_then(guid), Some(p.disk_guid.clone())),
        ("first-lba", sf.first_lba.map(|v| v.to_string()), Some(p.first_usable_lba.to_string())),
        ("last-lba", sf.last_lba.map(|v| v.to_string()), Some(p.last_usable_lba.to_string())),
        ("table-length", sf.table_length.map(|v| v.to_string()), Some(p.num_entries.to_string())),
    ];
    for (what, from_sf, from_gpt) in checks {
        if let Some(v) = from_sf
            && Some(&v) != from_gpt.as_ref()
        {
            return Err(Error::Corrupt(format!(
                "{sf_name} says {what} {v}, {name1} says {}",
                from_gpt.unwrap_or_default()
            )));
        }
    }
    // Sector 0: the protective MBR; its boot code as -mbr has it.
    let mut head = first[..entries_end.div_ceil(ss) as usize * ss as usize].to_vec();
    if let Some(m) = mbr {
        if m[446..] != head[446..512] {
            warnings.push(format!(
                "{disk}-mbr and {name1} disagree on the protective MBR's table; the one in {name1} is used"
            ));
        }
        head[..446].copy_from_slice(&m[..446]);
    }
    boot.push((0, head));

    // The backup copy.
    let total = layout.disk_size / ss;
    let name2 = format!("{disk}-gpt-2nd");
    let second = read_bytes(dir, &name2, 1 << 20)?;
    let n_entries_sectors = p.entries_len().div_ceil(ss);
    let mut backup_valid = false;
    let mut backup_entries_lba = p.alternate_lba.saturating_sub(n_entries_sectors);
    let why_not = match &second {
        None => Some(format!("{name2} is missing")),
        Some(b)
            if b.is_empty()
                || !(b.len() as u64).is_multiple_of(ss)
                || b.len() as u64 > GPT_2ND_MAX.min(layout.disk_size / 2) =>
        {
            Some(format!("{name2} holds {} bytes, not whole sectors of the disk's end", b.len()))
        }
        Some(b) => {
            let off = layout.disk_size - b.len() as u64;
            let last = &b[b.len() - 512..];
            match build::parse_gpt_header(last, total - 1, layout.disk_size, 512) {
                Err(why) => Some(format!("the backup header in {name2} is invalid: {why}")),
                Ok(h) => {
                    let same = GptCopy {
                        my_lba: h.my_lba,
                        alternate_lba: 1,
                        entries_lba: h.entries_lba,
                        entries_crc: h.entries_crc,
                        ..p.clone()
                    };
                    let arr_off = h.entries_lba * ss;
                    let arr_end = arr_off + n_entries_sectors * ss;
                    if h != same || h.entries_crc != p.entries_crc || p.alternate_lba != total - 1 {
                        Some(format!("the backup header in {name2} does not match the primary"))
                    } else if arr_end > (total - 1) * ss {
                        Some(format!("the backup entry array named in {name2} overlaps its header"))
                    } else {
                        let mut array = entries.to_vec();
                        array.resize((n_entries_sectors * ss) as usize, 0);
                        // The part of the array the file holds must be the primary's.
                        let covered = arr_off.max(off).min(arr_end);
                        let in_file = &b
                            [(covered.max(off) - off).min(b.len() as u64) as usize..(arr_end.max(off) - off) as usize];
                        if in_file != &array[(covered - arr_off) as usize..] {
                            Some(format!("the backup entry array in {name2} differs from the primary"))
                        } else {
                            backup_valid = true;
                            backup_entries_lba = h.entries_lba;
                            let rest_at = arr_end.max(off);
                            boot.push((arr_off, array));
                            boot.push((rest_at, b[(rest_at - off) as usize..].to_vec()));
                            None
                        }
                    }
                }
            }
        }
    };
    if let Some(why) = why_not {
        let w = format!("backup GPT not usable from the image ({why}); the restore rewrites it from the primary");
        warnings.push(w.clone());
        layout.warnings.push(w);
    }
    layout.disk_id = Some(p.disk_guid.clone());
    layout.gpt = Some(GptGeometry {
        first_usable_lba: p.first_usable_lba,
        last_usable_lba: p.last_usable_lba,
        primary_entries_lba: p.entries_lba,
        backup_header_lba: p.alternate_lba,
        backup_entries_lba,
        num_entries: p.num_entries,
        entry_size: p.entry_size,
        primary_valid: true,
        backup_valid,
    });
    if dir.join(format!("{disk}-hidden-data-after-mbr")).exists() {
        warnings
            .push(format!("{disk}-hidden-data-after-mbr is not restored: Clonezilla restores it on MBR disks only"));
    }
    Ok(())
}
