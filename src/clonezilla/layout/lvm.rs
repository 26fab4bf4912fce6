//! The LVM2 volume groups of a Clonezilla image.
//!
//! For a partition that is an LVM2 physical volume, `ocs-sr` saves no
//! partition image but, with the group activated:
//! - `lvm_vg_dev.list`: a line `VG /dev/PART PV-UUID` per PV;
//! - `lvm_<VG>.conf`: the group's metadata (`vgcfgbackup`);
//! - `lvm_logv.list`: a line `/dev/VG/LV <file -Ls's description>` per
//!   logical volume it saved (thin pools are left out);
//! - an image per logical volume, named as a partition's with `VG-LV` for
//!   the device (`VG-LV.ext4-ptcl-img.zst`), and `swappt-VG-LV.info` for a
//!   swap volume.
//!
//! Its restore runs `pvcreate --uuid --restorefile`, `vgcfgrestore`, then
//! writes each volume's image into the activated volume. klon writes the
//! same: the PV's label and metadata area made from the saved text, then
//! each volume's blocks where its segments put them on the partition.
//! Groups klon cannot place that way are refused: several PVs, volumes
//! that are not linear (striped, mirrored, thin), volumes without an image.

use std::collections::HashMap;
use std::path::Path;

use super::files::{find_image, parse_swap_info};
use super::{part_number, plain_name, read_text};
use crate::clonezilla::{CzVolume, CzVolumeContent, CzVolumeGroup};
use crate::error::{Error, Result};
use crate::fs::lvm::parse_metadata;
use crate::table::DiskLayout;

/// Most volume groups and volumes accepted from the lists.
const MAX_LINES: usize = 1024;

/// The volume groups `dir` holds on partitions of `disk` (none when it has
/// no `lvm_vg_dev.list`). `names` are the directory's file names.
pub(super) fn read_groups(dir: &Path, disk: &str, layout: &DiskLayout, names: &[String]) -> Result<Vec<CzVolumeGroup>> {
    let Some(pv_list) = read_text(dir, "lvm_vg_dev.list")? else { return Ok(Vec::new()) };
    let corrupt = |file: &str, line: usize, why: String| Error::Corrupt(format!("{file} line {line}: {why}"));
    let unsupported = |why: String| {
        Error::Unsupported(format!(
            "the Clonezilla image {} holds LVM volumes klon cannot restore: {why}; restore it with Clonezilla \
             (ocs-sr restoredisk)",
            dir.display()
        ))
    };
    // VG -> (partition, PV UUID).
    let mut pvs: Vec<(String, u32, String)> = Vec::new();
    for (i, line) in lines(&pv_list).take(MAX_LINES + 1) {
        if pvs.len() == MAX_LINES {
            return Err(corrupt("lvm_vg_dev.list", i, format!("more than {MAX_LINES} lines")));
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [vg, dev, uuid] = f[..] else {
            return Err(corrupt("lvm_vg_dev.list", i, format!("not `VG /dev/PARTITION PV-UUID`: {line:?}")));
        };
        if vg == "/NOT_FOUND" {
            return Err(unsupported(format!("{dev} is an LVM physical volume without a volume group")));
        }
        if !plain_name(vg) {
            return Err(corrupt("lvm_vg_dev.list", i, format!("{vg:?} is not a volume group name")));
        }
        let part = dev.strip_prefix("/dev/").unwrap_or(dev);
        let number =
            part_number(disk, part).filter(|n| layout.partitions.iter().any(|p| p.number == *n)).ok_or_else(|| {
                unsupported(format!("the physical volume {dev} of group {vg} is not a partition of {disk}"))
            })?;
        if let Some((_, other, _)) = pvs.iter().find(|(v, ..)| v == vg) {
            return Err(unsupported(format!(
                "volume group {vg} spans two physical volumes (partitions {other} and {number}); klon restores \
                 groups on one"
            )));
        }
        pvs.push((vg.to_string(), number, uuid.to_string()));
    }
    let logv = read_text(dir, "lvm_logv.list")?.unwrap_or_default();
    // VG -> [(LV, described as swap)].
    let mut listed: HashMap<&str, Vec<(&str, bool)>> = HashMap::new();
    for (i, line) in lines(&logv).take(MAX_LINES) {
        let (path, what) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let Some((vg, lv)) = path.strip_prefix("/dev/").and_then(|p| p.split_once('/')) else {
            return Err(corrupt("lvm_logv.list", i, format!("{path:?} is not /dev/VG/LV")));
        };
        if !plain_name(vg) || !plain_name(lv) {
            return Err(corrupt("lvm_logv.list", i, format!("{path:?} is not /dev/VG/LV")));
        }
        listed.entry(vg).or_default().push((lv, what.to_ascii_lowercase().contains("swap")));
    }
    let mut groups = Vec::new();
    for (vg_name, number, uuid) in pvs {
        let conf_name = format!("lvm_{vg_name}.conf");
        let conf = read_text(dir, &conf_name)?.ok_or_else(|| {
            Error::Corrupt(format!("{}: {conf_name} (volume group {vg_name}'s metadata) is missing", dir.display()))
        })?;
        let vg = parse_metadata(&conf, &uuid).map_err(|e| Error::Corrupt(format!("{conf_name}: {e}")))?;
        if vg.name != vg_name {
            return Err(Error::Corrupt(format!("{conf_name} describes volume group {}, not {vg_name}", vg.name)));
        }
        let [pv] = &vg.pvs[..] else {
            return Err(unsupported(format!(
                "volume group {vg_name} has {} physical volumes; klon restores groups on one",
                vg.pvs.len()
            )));
        };
        if pv.uuid != uuid {
            return Err(Error::Corrupt(format!(
                "{conf_name}: its physical volume is {}, lvm_vg_dev.list says {uuid}",
                pv.uuid
            )));
        }
        let part = layout.partitions.iter().find(|p| p.number == number).expect("checked above");
        let end = pv.pe_count.checked_mul(vg.extent_size).and_then(|b| b.checked_add(pv.pe_start));
        if end.is_none_or(|e| e > part.size) {
            return Err(Error::Corrupt(format!(
                "{conf_name}: the physical volume's {} extents of {} bytes do not fit partition {number} ({} bytes)",
                pv.pe_count, vg.extent_size, part.size
            )));
        }
        let saved = listed.remove(vg_name.as_str()).unwrap_or_default();
        let mut volumes = Vec::new();
        for lv in &vg.lvs {
            let Some(&(_, swap)) = saved.iter().find(|(n, _)| *n == lv.name) else {
                if lv.hidden {
                    continue;
                }
                return Err(unsupported(format!(
                    "logical volume {vg_name}/{} ({}) has no image in it (Clonezilla leaves thin pools out)",
                    lv.name,
                    kinds(lv)
                )));
            };
            let ranges = vg.linear_ranges(lv, part.size).ok_or_else(|| {
                unsupported(format!(
                    "logical volume {vg_name}/{} is {}, not linear on the one physical volume",
                    lv.name,
                    kinds(lv)
                ))
            })?;
            let size = ranges.iter().map(|r| r.1).sum();
            let dev = format!("{vg_name}-{}", lv.name);
            let content = if swap {
                let info = format!("swappt-{dev}.info");
                let text = read_text(dir, &info)?.unwrap_or_default();
                CzVolumeContent::Swap(parse_swap_info(&text, &info, number)?)
            } else {
                let found = find_image(dir, &dev, names)?.ok_or_else(|| {
                    Error::Corrupt(format!(
                        "{}: lvm_logv.list lists /dev/{vg_name}/{}, but its image ({dev}.*-ptcl-img.*) is missing",
                        dir.display(),
                        lv.name
                    ))
                })?;
                CzVolumeContent::Image(found.into_partition(number, &dev, size)?)
            };
            volumes.push(CzVolume { name: lv.name.clone(), size, ranges, content });
        }
        if let Some((lv, _)) = saved.iter().find(|(n, _)| vg.lv(n).is_none()) {
            return Err(Error::Corrupt(format!(
                "lvm_logv.list lists /dev/{vg_name}/{lv}, which {conf_name} does not describe"
            )));
        }
        groups.push(CzVolumeGroup { vg, conf, partition: number, pv_size: part.size, volumes });
    }
    if let Some(vg) = listed.keys().next() {
        return Err(Error::Corrupt(format!(
            "lvm_logv.list lists volumes of group {vg}, which lvm_vg_dev.list does not name"
        )));
    }
    Ok(groups)
}

/// The non-empty lines of a list, numbered from 1.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty())
}

/// The segment types of a volume ("thin-pool", "striped, linear").
fn kinds(lv: &crate::fs::lvm::LogicalVolume) -> String {
    let mut k: Vec<&str> = lv.segments.iter().map(|s| s.kind.as_str()).collect();
    k.dedup();
    if k.is_empty() { "without segments".into() } else { k.join(", ") }
}
