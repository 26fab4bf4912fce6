//! The disks of this machine as klon offers them: each whole disk in
//! /sys/block with its size, sector sizes, identity, partitions (their
//! types read from the table), the filesystem each holds (probed), LVM
//! volume groups, and mounts and other use. Built from
//! [`crate::device::sysfs`] with the table and filesystem readers, for the
//! commands' and the wizard's disk lists and the live system's choices.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::Disk;
use crate::device::sysfs::{
    Usage, dev_path, is_partition_dir, loop_backing_file, model_of, parse_devno, read_attr, read_u64, serial_of,
    transport_from_sys_path,
};
use crate::error::{Error, Result};
use crate::fs::{FsInfo, probe};

pub mod image_drive;
pub mod share;

/// A whole disk as found in /sys/block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Device node, e.g. /dev/sda.
    pub path: PathBuf,
    /// Kernel name, e.g. "sda".
    pub name: String,
    /// Device number (makedev(major, minor)).
    pub devno: u64,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Model string, when the device reports one.
    pub model: Option<String>,
    /// Serial number, when the device reports one.
    pub serial: Option<String>,
    /// How the disk is attached: usb, nvme, sata, scsi, virtio, mmc, loop,
    /// virtual (device mapper, md) or unknown.
    pub transport: String,
    /// The kernel marks the medium removable.
    pub removable: bool,
    /// The kernel marks the device read-only.
    pub read_only: bool,
    /// For a loop device, the file behind it.
    pub loop_backing_file: Option<PathBuf>,
    /// Partitions, ordered by number.
    pub partitions: Vec<PartInfo>,
    /// A filesystem directly on the whole disk (only probed when the disk
    /// has no partitions).
    pub fs: Option<FsInfo>,
    /// Where the whole disk itself is mounted (a filesystem without a
    /// partition table).
    pub mountpoints: Vec<PathBuf>,
    /// The whole disk itself is mounted, used as swap or held (LVM, dm,
    /// md). Partitions carry their own `in_use`.
    pub in_use: bool,
}

/// One partition of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// Partition number (1-based).
    pub number: u32,
    /// Device node, e.g. /dev/sda1.
    pub path: PathBuf,
    /// Device number.
    pub devno: u64,
    /// Start on the disk in bytes.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Partition type from the table: GPT type GUID or MBR type ("0x83").
    #[serde(default)]
    pub type_id: Option<String>,
    /// What the partition holds, if recognised.
    pub fs: Option<FsInfo>,
    /// Where it is mounted.
    pub mountpoints: Vec<PathBuf>,
    /// Mounted, used as swap, or held by another device (dm, md, LVM).
    pub in_use: bool,
    /// For an LVM2 physical volume: its volume group and volumes, as
    /// `VolumeGroup::summary` puts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<String>,
}

fn build(sysdir: &Path, usage: &Usage) -> Option<DiskInfo> {
    let name = sysdir.file_name()?.to_string_lossy().into_owned();
    let devno = parse_devno(&read_attr(&sysdir.join("dev"))?)?;
    let size = read_u64(&sysdir.join("size"))?.checked_mul(512)?;
    let partition = is_partition_dir(sysdir);
    // Queue attributes live on the whole disk.
    let qdir = if partition { sysdir.parent()?.to_path_buf() } else { sysdir.to_path_buf() };
    let logical = read_u64(&qdir.join("queue/logical_block_size")).unwrap_or(512) as u32;
    let physical = read_u64(&qdir.join("queue/physical_block_size")).unwrap_or(logical as u64) as u32;
    let disk_name = qdir.file_name()?.to_string_lossy().into_owned();
    let resolved = qdir.to_string_lossy().into_owned();
    let opened = Disk::open_read_only(&dev_path(&name)).ok();
    let disk = opened.as_ref();
    // Partition types come from the table itself (sysfs does not have them).
    let table = if partition { None } else { disk.and_then(|d| crate::table::read_layout(d).ok()) };
    let type_of = |start: u64| table.as_ref()?.partitions.iter().find(|p| p.start == start).map(|p| p.type_id.clone());
    let mut partitions = Vec::new();
    if !partition && let Ok(rd) = fs::read_dir(sysdir) {
        for e in rd.flatten() {
            let p = e.path();
            if !is_partition_dir(&p) {
                continue;
            }
            let (Some(number), Some(pdev), Some(start), Some(psize)) = (
                read_u64(&p.join("partition")),
                read_attr(&p.join("dev")).and_then(|s| parse_devno(&s)),
                read_u64(&p.join("start")).and_then(|v| v.checked_mul(512)),
                read_u64(&p.join("size")).and_then(|v| v.checked_mul(512)),
            ) else {
                continue;
            };
            let pname = e.file_name().to_string_lossy().into_owned();
            let fs = disk.and_then(|d| probe(d, start, psize));
            let lvm = match (disk, &fs) {
                (Some(d), Some(f)) if f.fstype == "LVM2_member" => {
                    crate::fs::lvm::read(&crate::fs::Volume::new(d, start, psize)).ok().map(|vg| vg.summary())
                }
                _ => None,
            };
            partitions.push(PartInfo {
                number: number as u32,
                path: dev_path(&pname),
                devno: pdev,
                start,
                size: psize,
                type_id: type_of(start),
                fs,
                mountpoints: usage.mountpoints(pdev),
                in_use: usage.in_use(pdev),
                lvm,
            });
        }
    }
    partitions.sort_by_key(|p| p.number);
    let fs = if partitions.is_empty() { disk.and_then(|d| probe(d, 0, size.min(d.size))) } else { None };
    Some(DiskInfo {
        path: dev_path(&name),
        name: name.clone(),
        devno,
        size,
        logical_sector_size: logical,
        physical_sector_size: physical,
        model: model_of(&qdir, &disk_name),
        serial: serial_of(&qdir),
        transport: transport_from_sys_path(&resolved, &disk_name),
        removable: read_u64(&qdir.join("removable")) == Some(1),
        read_only: read_u64(&sysdir.join("ro")) == Some(1),
        loop_backing_file: loop_backing_file(&disk_name),
        partitions,
        fs,
        mountpoints: usage.mountpoints(devno),
        in_use: usage.in_use(devno),
    })
}

/// Lists the whole disks in /sys/block with their partitions. Skips RAM
/// disks (ram*, zram*) and devices of size 0 (unattached loop devices,
/// empty card readers and drives). Device-mapper and md devices are listed
/// with transport "virtual".
pub fn list_disks() -> Result<Vec<DiskInfo>> {
    let usage = Usage::load()?;
    let root = Path::new("/sys/block");
    let rd = fs::read_dir(root).map_err(|e| Error::io("listing", root, None, e))?;
    let mut names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort_by_key(|n| natural_key(n));
    let mut out = Vec::new();
    for name in names {
        if name.starts_with("ram") || name.starts_with("zram") {
            continue;
        }
        let Ok(dir) = fs::canonicalize(root.join(&name)) else { continue };
        if read_u64(&dir.join("size")).unwrap_or(0) == 0 {
            continue;
        }
        if let Some(info) = build(&dir, &usage) {
            out.push(info);
        }
    }
    Ok(out)
}

fn natural_key(s: &str) -> (String, u64, String) {
    let digits_at = s.find(|c: char| c.is_ascii_digit()).unwrap_or(s.len());
    let (head, rest) = s.split_at(digits_at);
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    (head.to_string(), rest[..end].parse().unwrap_or(0), rest[end..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sysfs::whole_disk_of;

    #[test]
    fn natural_order() {
        let mut v = vec!["sdb", "loop10", "loop2", "nvme0n1", "sda"];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v, ["loop2", "loop10", "nvme0n1", "sda", "sdb"]);
    }

    #[test]
    fn lists_live_disks() {
        let disks = list_disks().unwrap();
        for d in &disks {
            assert!(d.size > 0);
            assert!(!d.name.starts_with("zram") && !d.name.starts_with("ram"));
            assert!(d.logical_sector_size >= 512);
            assert_eq!(whole_disk_of(d.devno), Some(d.devno));
            for p in &d.partitions {
                assert_eq!(whole_disk_of(p.devno), Some(d.devno));
                assert!(p.start + p.size <= d.size);
            }
        }
    }
}
