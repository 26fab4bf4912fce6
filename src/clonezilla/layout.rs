//! The Clonezilla image directory: which files it holds and what they say.
//!
//! `ocs-sr savedisk` writes, for a disk `sda`:
//! - `disk` (the disk name), `parts` (the partitions saved), `clonezilla-img`
//!   (its log), `Info-*.txt`, `blkdev.list`, `blkid.list`, `dev-fs.list`;
//! - `sda-pt.sf` (`sfdisk -d`), `sda-pt.parted` and `.compact` (`parted
//!   unit s print`: the only record of the disk's size), `sda-chs.sf`;
//! - `sda-mbr` (sector 0), MBR disks: `sda-hidden-data-after-mbr` (sectors
//!   1 up to the first partition, with `-j2`, at most 1 GiB), `sdaN-ebr`
//!   (the first EBR of extended partition N); GPT disks: `sda-gpt-1st`
//!   (the first 34 512-byte sectors), `sda-gpt-2nd` (the last 32: Clonezilla
//!   skips one sector too many, so the first sector of the backup entry
//!   array is not in it), `sda-gpt.gdisk`, `sda-gpt.sgdisk`;
//! - `swappt-sdaN.info` for swap partitions;
//! - a partition image per saved partition: `sdaN.<fs>-ptcl-img.<codec>`
//!   (partclone; `dd` for partitions without known filesystem), split as
//!   `.aa`, `.ab`, ... with `-i`; older images `sdaN.ntfs-img.*`
//!   (ntfsclone) and `sdaN.dd-img.*` (raw);
//! - MD5SUMS, SHA1SUMS, B2SUMS with `-gm`, `-gs`, `-gb`.
//!
//! A restore (`ocs-sr restoredisk`, default `-j`) recreates the table with
//! sfdisk from `sda-pt.sf` (MBR with its EBRs, or a GPT), writes the hidden
//! data back at sector 1 (MBR disks only, with `-j2`), the first 446 bytes of
//! `sdaN-ebr` into the first EBR and the first 446 bytes of `sda-mbr` (boot
//! code and disk signature) into sector 0. [`CzImage::boot`] holds the bytes
//! that sequence leaves outside the partitions.

use std::collections::HashMap;
use std::path::Path;

use super::{CzImage, CzPartition, checksums};
use crate::error::{Error, Result, io_ctx};
use crate::table::TableKind;
use crate::table::build;

mod boot;
mod files;
mod luks;
mod lvm;
mod sfdisk;

use boot::{check_boot, gpt_boot, hidden_data, same_lba_entries};
use files::{find_image, read_swaps, saved_tables};
use sfdisk::{Table, build_table, parse_parted, parse_sf};

/// Largest description file read whole (`disk`, `parts`, `*-pt.sf`, ...).
const MAX_TEXT: u64 = 4 << 20;
/// Largest hidden-data file taken (Clonezilla's limit is 1 GiB).
const MAX_HIDDEN: u64 = 1 << 30;
/// Most partitions accepted from a dump.
const MAX_PARTS: usize = 256;
/// Bytes Clonezilla saves in `-gpt-1st` (34 sectors of 512 bytes).
const GPT_1ST_LEN: u64 = 34 * 512;
/// Most bytes in `-gpt-2nd` (33 sectors of 512 bytes).
const GPT_2ND_MAX: u64 = 33 * 512;

/// Whether `dir` looks like a Clonezilla image (it has `disk` or `parts`
/// and a `clonezilla-img` or `*-pt.sf` file), as opposed to a klon image.
pub fn is_clonezilla_image(dir: &Path) -> bool {
    // Clonezilla's encrypted images keep the files' names (gocryptfs
    // -plaintextnames), not their contents: see engine::source::gocryptfs.
    if dir.join("klon.json").exists() || !dir.is_dir() || dir.join("gocryptfs.conf").exists() {
        return false;
    }
    let has_list = dir.join("disk").is_file() || dir.join("parts").is_file();
    if !has_list {
        return false;
    }
    if dir.join("clonezilla-img").is_file() {
        return true;
    }
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.ends_with("-pt.sf") || n.contains("-ptcl-img.") || n.contains(".ntfs-img") || n.contains(".dd-img")
        })
    })
}

/// Why `dir` is not a klon image's nor a Clonezilla image's directory, for
/// the message of a directory without `klon.json` that
/// [`is_clonezilla_image`] did not take.
pub fn not_clonezilla_because(dir: &Path) -> String {
    let state = |name: &str| match std::fs::metadata(dir.join(name)) {
        Ok(m) if m.is_file() && m.len() == 0 => "empty",
        Ok(m) if m.is_file() => "there",
        _ => "missing",
    };
    match (state("disk"), state("parts")) {
        ("missing", "missing") => "nor a Clonezilla image: no `disk` or `parts` file".to_string(),
        (disk, parts) => format!(
            "nor a whole Clonezilla image: `disk` is {disk} and `parts` is {parts}, but there is no partition \
             table dump (<disk>-pt.sf) or partition image"
        ),
    }
}

/// Reads a small text file whole; `None` when it does not exist.
fn read_text(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, None, e)),
    };
    if !meta.is_file() || meta.len() > MAX_TEXT {
        return Err(Error::Corrupt(format!(
            "{name} in {} is not a text file of at most {MAX_TEXT} bytes",
            dir.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(io_ctx("reading", &path, None))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::Corrupt(format!("{name} in {} is not UTF-8 text", dir.display())))
}

/// Reads a small binary file whole (at most `max` bytes); `None` when it
/// does not exist.
fn read_bytes(dir: &Path, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, None, e)),
    };
    if !meta.is_file() || meta.len() > max {
        return Err(Error::Corrupt(format!("{name} in {} is not a file of at most {max} bytes", dir.display())));
    }
    std::fs::read(&path).map(Some).map_err(io_ctx("reading", &path, None))
}

/// Whether a device name as Clonezilla writes it is plain (no path, no
/// odd characters).
fn plain_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Partition number of `dev` on disk `disk`: sda5 -> 5, nvme0n1p2 -> 2,
/// loop0p1 -> 1.
fn part_number(disk: &str, dev: &str) -> Option<u32> {
    let rest = dev.strip_prefix(disk)?;
    let digits = if disk.ends_with(|c: char| c.is_ascii_digit()) { rest.strip_prefix('p')? } else { rest };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok().filter(|&n| (1..=MAX_PARTS as u32).contains(&n))
}

impl CzImage {
    /// Reads the directory's description files and finds every partition's
    /// image file (and pieces). Checks structure only, not data.
    pub fn open(dir: &Path) -> Result<CzImage> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!("{} is not a directory", dir.display())));
        }
        if dir.join("klon.json").exists() {
            return Err(Error::Usage(format!("{} is a klon image, not a Clonezilla image", dir.display())));
        }
        if dir.join("ecryptfs.info").exists() {
            return Err(Error::Unsupported(format!(
                "the Clonezilla image {} is encrypted with eCryptfs (ocs-sr -enc); decrypt it first",
                dir.display()
            )));
        }
        let mut saveparts = false;
        let disk_text = match read_text(dir, "disk")? {
            Some(t) => t,
            None if dir.join("parts").is_file() => {
                // saveparts writes no `disk` file, but the table files of
                // the disk the partitions are on.
                saveparts = true;
                match saved_tables(dir)?.as_slice() {
                    [one] => one.clone(),
                    _ => {
                        return Err(Error::Unsupported(format!(
                            "{} is a Clonezilla partition image (saveparts) without the partition table of one \
                             disk (no single <disk>-pt.sf), so klon cannot tell where its partitions belong; \
                             restore it with Clonezilla's restoreparts",
                            dir.display()
                        )));
                    }
                }
            }
            None => return Err(Error::Corrupt(format!("{}: the file `disk` is missing", dir.display()))),
        };
        let disks: Vec<&str> = disk_text.split_whitespace().collect();
        let disk = match disks.as_slice() {
            [] => return Err(Error::Corrupt(format!("{}: the file `disk` names no disk", dir.display()))),
            [d] if plain_name(d) => d.to_string(),
            [d] => return Err(Error::Corrupt(format!("{}: `disk` names {d:?}, not a disk name", dir.display()))),
            many => {
                return Err(Error::Unsupported(format!(
                    "{} holds {} disks ({}); klon restores one disk at a time",
                    dir.display(),
                    many.len(),
                    many.join(", ")
                )));
            }
        };
        let mut warnings = Vec::new();

        // The table and the disk's size.
        let sf_name = format!("{disk}-pt.sf");
        let sf_text = read_text(dir, &sf_name)?
            .ok_or_else(|| Error::Corrupt(format!("{}: {sf_name} (the partition table) is missing", dir.display())))?;
        let sf = parse_sf(&sf_text, &sf_name)?;
        let parted_name = format!("{disk}-pt.parted");
        let parted = match read_text(dir, &parted_name)? {
            Some(t) => parse_parted(&t, &parted_name)?,
            None => None,
        };
        let gpt_1st_name = format!("{disk}-gpt-1st");
        let gpt_1st = if sf.label == "gpt" { read_bytes(dir, &gpt_1st_name, 1 << 20)? } else { None };
        let (sectors, ss) = match parted {
            Some((n, s)) => (n, s),
            None => {
                // Without parted's record the size of a GPT disk still shows in
                // its primary header (backup header at the last LBA).
                let from_gpt = gpt_1st.as_ref().filter(|b| b.len() as u64 >= 1024 && &b[512..520] == b"EFI PART");
                match from_gpt {
                    Some(b) if sf.sector_size.unwrap_or(512) == 512 => {
                        let alt = u64::from_le_bytes(b[512 + 32..512 + 40].try_into().expect("8 bytes"));
                        warnings.push(format!(
                            "{parted_name} is empty or missing (parted was not installed when the image was \
                             saved): the disk size is taken from the primary GPT header ({} sectors)",
                            alt.saturating_add(1)
                        ));
                        (alt.saturating_add(1), 512)
                    }
                    _ => {
                        return Err(Error::Unsupported(format!(
                            "{}: the size of the source disk is unknown: {parted_name} is empty or missing \
                             (parted was not installed when Clonezilla saved the image), and klon needs the \
                             disk size to restore an MBR disk faithfully",
                            dir.display()
                        )));
                    }
                }
            }
        };
        if let Some(s) = sf.sector_size
            && s != ss
        {
            return Err(Error::Corrupt(format!(
                "{sf_name} says {s}-byte sectors, {parted_name} says {ss}-byte sectors"
            )));
        }
        let disk_size = sectors
            .checked_mul(u64::from(ss))
            .filter(|&s| s < 1 << 60)
            .ok_or_else(|| Error::Corrupt(format!("{parted_name}: disk size of {sectors} sectors is not plausible")))?;
        let Table { mut layout, extended, primaries } = build_table(&sf, &disk, disk_size, ss, &sf_name)?;

        // Bytes outside the partitions.
        let mbr_name = format!("{disk}-mbr");
        let mbr = read_bytes(dir, &mbr_name, 512)?;
        if let Some(m) = &mbr
            && m.len() != 512
        {
            return Err(Error::Corrupt(format!("{mbr_name} holds {} bytes, not 512", m.len())));
        }
        let mut boot: Vec<(u64, Vec<u8>)> = Vec::new();
        match layout.kind {
            TableKind::Mbr => {
                let id = match &sf.label_id {
                    Some(v) => {
                        let hex = v.strip_prefix("0x").unwrap_or(v);
                        let n = u32::from_str_radix(hex, 16)
                            .map_err(|_| Error::Corrupt(format!("{sf_name}: label-id {v:?} is not a DOS disk id")))?;
                        Some(n)
                    }
                    None => None,
                };
                let mut entries = primaries.clone();
                entries.sort_by_key(|e| e.slot);
                let table = build::mbr_entries(&entries)?;
                let sector0 = match &mbr {
                    Some(m) => {
                        let mut s = m.clone();
                        if s[446..510] != table[..] || s[510..512] != [0x55, 0xAA] {
                            if !same_lba_entries(&s[446..510], &table) {
                                warnings.push(format!(
                                    "the partition entries in {mbr_name} differ from {sf_name}; the MBR's \
                                     entries are rebuilt from {sf_name}, as Clonezilla's restore (sfdisk) does"
                                ));
                                s[446..510].copy_from_slice(&table);
                            }
                            s[510] = 0x55;
                            s[511] = 0xAA;
                        }
                        s
                    }
                    None => {
                        warnings.push(format!("{mbr_name} is missing: the MBR gets no boot code"));
                        let mut s = vec![0u8; 512];
                        s[446..510].copy_from_slice(&table);
                        s[510] = 0x55;
                        s[511] = 0xAA;
                        s
                    }
                };
                let sig = u32::from_le_bytes(sector0[440..444].try_into().expect("4 bytes"));
                if let Some(id) = id
                    && id != sig
                {
                    return Err(Error::Corrupt(format!(
                        "{mbr_name} has disk id 0x{sig:08x}, {sf_name} says 0x{id:08x}"
                    )));
                }
                layout.disk_id = Some(format!("0x{:08x}", id.unwrap_or(sig)));
                boot.push((0, sector0));
                hidden_data(dir, &disk, &layout, &mut boot, &mut warnings)?;
                let mut chain = build::mbr_ebr_chain(&layout)?;
                if let (Some((slot, ..)), Some(first)) = (extended, chain.first_mut()) {
                    let ext_dev = if disk.ends_with(|c: char| c.is_ascii_digit()) {
                        format!("{disk}p{slot}")
                    } else {
                        format!("{disk}{slot}")
                    };
                    let ebr_name = format!("{ext_dev}-ebr");
                    match read_bytes(dir, &ebr_name, 512)? {
                        Some(e) if e.len() == 512 => {
                            if e[446..] != first.1[446..] {
                                warnings.push(format!(
                                    "{ebr_name} (the source's first EBR) differs from the EBR sfdisk builds from \
                                     {sf_name}; the rebuilt one is used, as Clonezilla's restore does"
                                ));
                            }
                            first.1[..446].copy_from_slice(&e[..446]);
                        }
                        Some(_) => return Err(Error::Corrupt(format!("{ebr_name} does not hold 512 bytes"))),
                        None => {}
                    }
                }
                boot.extend(chain.into_iter().map(|(o, s)| (o, s.to_vec())));
            }
            TableKind::Gpt => {
                let bytes = gpt_1st.ok_or_else(|| {
                    Error::Corrupt(format!("{}: {gpt_1st_name} (the primary GPT) is missing", dir.display()))
                })?;
                gpt_boot(dir, &disk, &sf, &sf_name, &bytes, mbr.as_deref(), &mut layout, &mut boot, &mut warnings)?;
            }
            TableKind::None => {}
        }
        check_boot(&mut boot, &layout)?;

        // Partition images.
        let parts_text = read_text(dir, "parts")?
            .ok_or_else(|| Error::Corrupt(format!("{}: the file `parts` is missing", dir.display())))?;
        let listed: Vec<String> = parts_text.split_whitespace().map(str::to_string).collect();
        if listed.is_empty() && !layout.partitions.is_empty() {
            return Err(Error::Corrupt(format!(
                "{}: the file `parts` is empty, but {sf_name} describes {} partitions: the image holds \
                 none of their contents (was the save interrupted?)",
                dir.display(),
                layout.partitions.len()
            )));
        }
        if listed.len() > MAX_PARTS {
            return Err(Error::Corrupt(format!("`parts` lists more than {MAX_PARTS} partitions")));
        }
        let mut files: HashMap<String, Vec<String>> = HashMap::new();
        for e in std::fs::read_dir(dir).map_err(io_ctx("listing", dir, None))? {
            let e = e.map_err(io_ctx("listing", dir, None))?;
            if let Some(name) = e.file_name().to_str()
                && let Some((dev, _)) = name.split_once('.')
            {
                files.entry(dev.to_string()).or_default().push(name.to_string());
            }
        }
        let names: Vec<String> = files.values().flatten().cloned().collect();
        let luks = luks::read_volumes(dir, &disk, &layout, &files)?;
        let lvm = lvm::read_groups(dir, &disk, &layout, &names)?;
        let lvm_devs: Vec<String> =
            lvm.iter().flat_map(|g| g.volumes.iter().map(move |v| format!("{}-{}", g.vg.name, v.name))).collect();
        // Partitions whose contents are saved as volumes (an LVM PV, a LUKS volume).
        let in_volumes = |n: u32| lvm.iter().any(|g| g.partition == n) || luks.iter().any(|v| v.number == n);
        let swap = read_swaps(dir, &disk, &layout, &files, &lvm_devs)?;
        let mut partitions = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for dev in &listed {
            if !plain_name(dev) {
                return Err(Error::Corrupt(format!("`parts` lists {dev:?}, not a device name")));
            }
            let number = part_number(&disk, dev).ok_or_else(|| {
                Error::Unsupported(format!(
                    "`parts` lists {dev}, which is not a partition of {disk} (LVM or another disk?); \
                     klon restores one disk's partitions"
                ))
            })?;
            if !seen.insert(number) {
                return Err(Error::Corrupt(format!("`parts` lists {dev} twice")));
            }
            let is_ext = extended.is_some_and(|(slot, ..)| slot == number);
            let part = layout.partitions.iter().find(|p| p.number == number);
            let found = find_image(dir, dev, files.get(dev.as_str()).map(Vec::as_slice).unwrap_or(&[]))?;
            let Some(found) = found else {
                if is_ext || in_volumes(number) || swap.iter().any(|s| s.number == number) {
                    continue;
                }
                return Err(Error::Corrupt(format!("image file for {dev} is missing from {}", dir.display())));
            };
            if is_ext {
                // Its image holds the first EBR, which `boot` carries.
                continue;
            }
            let part =
                part.ok_or_else(|| Error::Corrupt(format!("`parts` lists {dev}, which {sf_name} does not describe")))?;
            partitions.push(found.into_partition(number, dev, part.size)?);
        }
        partitions.sort_by_key(|p: &CzPartition| {
            layout.partitions.iter().position(|q| q.number == p.number).unwrap_or(usize::MAX)
        });
        if saveparts {
            warnings.push(format!(
                "a Clonezilla partition image (saveparts) of {} of {disk}, not of a whole disk: a restore writes \
                 them into the same partitions of a disk whose table has them, and leaves the rest of it alone \
                 (klon restore --partition N puts one elsewhere)",
                listed.join(", ")
            ));
        }
        for p in &layout.partitions {
            if !saveparts
                && !seen.contains(&p.number)
                && !in_volumes(p.number)
                && !swap.iter().any(|s| s.number == p.number)
            {
                warnings.push(format!(
                    "partition {} has no image in this Clonezilla image (not listed in `parts`): a restore \
                     creates it but leaves its contents as they are on the target",
                    p.number
                ));
            }
        }
        let checksum_files =
            checksums::FILE_NAMES.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect::<Vec<_>>();
        if checksum_files.is_empty() {
            warnings.push(
                "no checksum files (MD5SUMS, SHA1SUMS, B2SUMS): only partclone's own checksums protect the data"
                    .to_string(),
            );
        }
        Ok(CzImage {
            dir: dir.to_path_buf(),
            disk,
            layout,
            boot,
            partitions,
            swap,
            checksum_files,
            warnings,
            saveparts,
            lvm,
            luks,
        })
    }
}

#[cfg(test)]
mod tests;
