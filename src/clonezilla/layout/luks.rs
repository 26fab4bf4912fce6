//! The LUKS volumes of a Clonezilla image.
//!
//! When `ocs-sr` finds a LUKS partition and is told to open it (`-luks
//! yes`, or the person says yes), it opens it (`cryptsetup open`) and saves,
//! instead of a partition image:
//! - `luks-dev.list`: a comment line, then `/dev/PART UUID MAPPER` per
//!   volume (MAPPER is the name it was opened as: `ocs_luks_XXX`, or the
//!   name the system's crypttab gives);
//! - `PART-luksHeader.bin`: `cryptsetup luksHeaderBackup` of the partition
//!   (the header and its keyslots, up to where the data starts);
//! - the opened volume's filesystem, decrypted, as a partition image named
//!   after MAPPER (`ocs_luks_XXX.ext4-ptcl-img.zst`); a swap area as
//!   `swappt-MAPPER.info`; an LVM PV inside it in the `lvm_*` files;
//! - `luks-crypttab-from-OS.info` when the system's initramfs had a
//!   crypttab (informational).
//!
//! Its restore writes the header back (`luksHeaderRestore`), opens the
//! volume with the passphrase, and writes the filesystem into it. klon does
//! the same without device-mapper: the header's bytes, then the filesystem's
//! blocks encrypted with the volume key the passphrase unlocks. Swap and
//! LVM inside a LUKS volume are refused.

use std::collections::HashMap;
use std::path::Path;

use super::files::find_image;
use super::{part_number, plain_name, read_bytes, read_text};
use crate::clonezilla::CzLuks;
use crate::error::{Error, Result};
use crate::table::DiskLayout;

/// Most volumes taken from `luks-dev.list`.
const MAX_VOLUMES: usize = 128;
/// Largest header backup taken (LUKS2's default is 16 MiB).
const MAX_HEADER: u64 = 64 << 20;

/// Reads `luks-dev.list` and, for each volume, its header and its
/// filesystem's image. No list: no volumes.
pub(super) fn read_volumes(
    dir: &Path,
    disk: &str,
    layout: &DiskLayout,
    files: &HashMap<String, Vec<String>>,
) -> Result<Vec<CzLuks>> {
    let Some(list) = read_text(dir, "luks-dev.list")? else { return Ok(Vec::new()) };
    let unsupported = |why: String| {
        Error::Unsupported(format!(
            "the Clonezilla image {} holds a LUKS volume klon cannot restore: {why}; restore it with Clonezilla \
             (ocs-sr restoredisk)",
            dir.display()
        ))
    };
    let lvm_pvs = read_text(dir, "lvm_vg_dev.list")?.unwrap_or_default();
    let mut out: Vec<CzLuks> = Vec::new();
    for (i, line) in list.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if out.len() == MAX_VOLUMES {
            return Err(Error::Corrupt(format!("luks-dev.list: more than {MAX_VOLUMES} volumes")));
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [dev, _uuid, mapper] = f[..] else {
            return Err(Error::Corrupt(format!("luks-dev.list line {i}: not `/dev/PARTITION UUID NAME`: {line:?}")));
        };
        let part = dev.strip_prefix("/dev/").unwrap_or(dev);
        let mapper = mapper.strip_prefix("/dev/mapper/").unwrap_or(mapper);
        if !plain_name(part) || !plain_name(mapper) {
            return Err(Error::Corrupt(format!("luks-dev.list line {i}: {line:?} names no device")));
        }
        let number =
            part_number(disk, part).ok_or_else(|| unsupported(format!("{dev} is not a partition of {disk}")))?;
        let p = layout.partitions.iter().find(|p| p.number == number).ok_or_else(|| {
            Error::Corrupt(format!("luks-dev.list names {dev}, which the partition table does not hold"))
        })?;
        if out.iter().any(|v| v.number == number || v.mapper == mapper) {
            return Err(Error::Corrupt(format!("luks-dev.list names {dev} or {mapper} twice")));
        }
        if lvm_pvs.split_whitespace().any(|w| w == format!("/dev/mapper/{mapper}")) {
            return Err(unsupported(format!(
                "{dev} holds an LVM physical volume inside LUKS (klon restores LVM groups on plain partitions)"
            )));
        }
        if dir.join(format!("swappt-{mapper}.info")).exists() {
            return Err(unsupported(format!(
                "{dev} holds a swap area inside LUKS, of which Clonezilla kept only the UUID and label"
            )));
        }
        let header_name = format!("{part}-luksHeader.bin");
        let header_bytes = read_bytes(dir, &header_name, MAX_HEADER)?.ok_or_else(|| {
            Error::Corrupt(format!("{}: {header_name} (the LUKS header of {dev}) is missing", dir.display()))
        })?;
        let header = crate::fs::luks::parse(&header_bytes)
            .map_err(|why| Error::Corrupt(format!("{}: {why}", dir.join(&header_name).display())))?;
        if (header_bytes.len() as u64) < header.keyslots_end() || header_bytes.len() as u64 > header.data_offset {
            return Err(Error::Corrupt(format!(
                "{header_name} holds {} bytes; a LUKS header backup ends after its keyslots (byte {}) and \
                 before its data (byte {})",
                header_bytes.len(),
                header.keyslots_end(),
                header.data_offset
            )));
        }
        let ss = u64::from(header.sector_size);
        let data_size = match header.data_size {
            Some(s) => Some(s).filter(|s| header.data_offset + s <= p.size),
            // dm-crypt maps whole sectors only.
            None => p.size.checked_sub(header.data_offset).map(|s| s / ss * ss).filter(|&s| s > 0),
        }
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "{header_name}: the LUKS volume's data (from byte {}) does not fit partition {number} ({} bytes)",
                header.data_offset, p.size
            ))
        })?;
        let found = find_image(dir, mapper, files.get(mapper).map(Vec::as_slice).unwrap_or(&[]))?.ok_or_else(|| {
            Error::Corrupt(format!(
                "{}: the image of LUKS volume {mapper} (the opened {dev}) is missing: no {mapper}.*-ptcl-img.* file",
                dir.display()
            ))
        })?;
        let inner = found.into_partition(number, mapper, data_size)?;
        out.push(CzLuks {
            number,
            device: part.to_string(),
            mapper: mapper.to_string(),
            header_file: dir.join(&header_name),
            header_bytes,
            header,
            inner,
        });
    }
    Ok(out)
}
