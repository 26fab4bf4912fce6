//! What /sys says about block devices (the live system has no udev):
//! device numbers, whole disks and their partitions, model, serial,
//! transport, holders, loop backing files, and whether a device is in use.
//! The inventory of disks with their tables and filesystems, built on
//! this, is [`crate::inventory`].

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::device::mounts::{self, Mount, makedev};
use crate::device::{Disk, DiskKind};
use crate::error::Result;

pub(crate) fn read_attr(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    if s.is_empty() { None } else { Some(s.to_string()) }
}

pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    read_attr(path)?.parse().ok()
}

/// Parses "MAJ:MIN" into a device number.
pub fn parse_devno(s: &str) -> Option<u64> {
    let (maj, min) = s.trim().split_once(':')?;
    Some(makedev(maj.parse().ok()?, min.parse().ok()?))
}

/// The canonical sysfs directory of a block device number.
pub fn sys_dir_of(devno: u64) -> Option<PathBuf> {
    let p = PathBuf::from(format!("/sys/dev/block/{}:{}", mounts::major(devno), mounts::minor(devno)));
    fs::canonicalize(p).ok()
}

pub(crate) fn is_partition_dir(dir: &Path) -> bool {
    dir.join("partition").exists()
}

/// For a partition's device number, the device number of its whole disk;
/// for a whole disk, its own. `None` when sysfs does not know the device.
pub fn whole_disk_of(devno: u64) -> Option<u64> {
    let dir = sys_dir_of(devno)?;
    if is_partition_dir(&dir) { parse_devno(&read_attr(&dir.parent()?.join("dev"))?) } else { Some(devno) }
}

/// Device numbers of the partitions of the whole disk `devno` (empty for a
/// partition or a disk without partitions).
pub fn partition_devnos(devno: u64) -> Vec<u64> {
    let Some(dir) = sys_dir_of(devno) else { return Vec::new() };
    if is_partition_dir(&dir) {
        return Vec::new();
    }
    let Ok(rd) = fs::read_dir(&dir) else { return Vec::new() };
    rd.flatten()
        .filter(|e| is_partition_dir(&e.path()))
        .filter_map(|e| parse_devno(&read_attr(&e.path().join("dev"))?))
        .collect()
}

/// Names of the devices holding `devno` (/sys/.../holders): device mapper,
/// md or LVM built on it.
pub fn holders(devno: u64) -> Vec<String> {
    let Some(dir) = sys_dir_of(devno) else { return Vec::new() };
    list_names(&dir.join("holders"))
}

fn list_names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The block devices under `devno`, following /sys/.../slaves down to the
/// devices that have none (for a partition or plain disk: itself).
/// Bounded in depth and count.
pub fn underlying_devices(devno: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut todo = vec![(devno, 0u32)];
    while let Some((d, depth)) = todo.pop() {
        if out.len() > 256 {
            break;
        }
        let slaves = sys_dir_of(d).map(|dir| list_names(&dir.join("slaves"))).unwrap_or_default();
        if slaves.is_empty() || depth > 8 {
            if !out.contains(&d) {
                out.push(d);
            }
            continue;
        }
        for s in slaves {
            if let Some(sd) =
                read_attr(&Path::new("/sys/class/block").join(&s).join("dev")).and_then(|t| parse_devno(&t))
            {
                todo.push((sd, depth + 1));
            }
        }
    }
    out
}

/// The file behind loop device `name` (e.g. "loop0"), if attached.
pub fn loop_backing_file(name: &str) -> Option<PathBuf> {
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    read_attr(&Path::new("/sys/block").join(name).join("loop/backing_file")).map(PathBuf::from)
}

/// Where loop device `name` (e.g. "loop0") starts in its backing file
/// (`losetup --offset`), in bytes.
pub fn loop_offset(name: &str) -> Option<u64> {
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    read_u64(&Path::new("/sys/block").join(name).join("loop/offset"))
}

/// The bytes of its whole disk that block device `devno` covers: (0, size)
/// for a whole disk, (start, size) for a partition.
pub fn range_in_disk(devno: u64) -> Option<(u64, u64)> {
    let dir = sys_dir_of(devno)?;
    let size = read_u64(&dir.join("size"))?.checked_mul(512)?;
    let start = if is_partition_dir(&dir) { read_u64(&dir.join("start"))?.checked_mul(512)? } else { 0 };
    Some((start, size))
}

/// The device numbers of the loop devices that are attached.
pub fn loop_devnos() -> Vec<u64> {
    let Ok(rd) = fs::read_dir("/sys/block") else { return Vec::new() };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop") && e.path().join("loop").is_dir())
        .filter_map(|e| parse_devno(&read_attr(&e.path().join("dev"))?))
        .collect()
}

/// The kernel name of a device number (e.g. "sda1").
pub fn name_of(devno: u64) -> Option<String> {
    Some(sys_dir_of(devno)?.file_name()?.to_string_lossy().into_owned())
}

/// The transport of a disk from its resolved sysfs path.
pub fn transport_from_sys_path(resolved: &str, name: &str) -> String {
    let t = if name.starts_with("loop") {
        "loop"
    } else if resolved.contains("/usb") {
        "usb"
    } else if resolved.contains("/nvme") || name.starts_with("nvme") {
        "nvme"
    } else if resolved.contains("/virtio") {
        "virtio"
    } else if resolved.contains("/ata") {
        "sata"
    } else if resolved.contains("/mmc") || name.starts_with("mmcblk") {
        "mmc"
    } else if name.starts_with("dm-") || name.starts_with("md") {
        "virtual"
    } else if resolved.contains("/host") && resolved.contains("/target") {
        "scsi"
    } else {
        "unknown"
    };
    t.to_string()
}

/// The serial number from a SCSI VPD page 0x80 (4-byte header, then ASCII).
pub fn serial_from_vpd80(page: &[u8]) -> Option<String> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let n = u16::from_be_bytes([page[2], page[3]]) as usize;
    let raw = page.get(4..4 + n.min(page.len() - 4))?;
    let s: String = String::from_utf8_lossy(raw).trim_matches(|c: char| c.is_whitespace() || c == '\0').to_string();
    if s.is_empty() { None } else { Some(s) }
}

pub(crate) fn serial_of(sysdir: &Path) -> Option<String> {
    let dev = sysdir.join("device");
    for p in [sysdir.join("serial"), dev.join("serial")] {
        if let Some(s) = read_attr(&p) {
            return Some(s);
        }
    }
    if let Some(s) = fs::read(dev.join("vpd_pg80")).ok().and_then(|b| serial_from_vpd80(&b)) {
        return Some(s);
    }
    // USB storage: the serial is an attribute of the USB device upstream.
    if let Ok(real) = fs::canonicalize(&dev) {
        for anc in real.ancestors().take(12) {
            if anc.join("idVendor").exists() {
                if let Some(s) = read_attr(&anc.join("serial")) {
                    return Some(s);
                }
                break;
            }
        }
    }
    read_attr(&dev.join("wwid"))
}

pub(crate) fn model_of(sysdir: &Path, name: &str) -> Option<String> {
    if name.starts_with("dm-") {
        return read_attr(&sysdir.join("dm/name"));
    }
    if name.starts_with("md") {
        return read_attr(&sysdir.join("md/level"));
    }
    let dev = sysdir.join("device");
    read_attr(&dev.join("model")).or_else(|| read_attr(&dev.join("name")))
}

pub(crate) fn dev_path(name: &str) -> PathBuf {
    PathBuf::from("/dev").join(name.replace('!', "/"))
}

/// What the safety and listing code needs to know about the system state:
/// the mounts and swap devices, read once.
pub(crate) struct Usage {
    mounts: Vec<Mount>,
    swaps: Vec<u64>,
}

impl Usage {
    pub(crate) fn load() -> Result<Usage> {
        Ok(Usage { mounts: mounts::mounts()?, swaps: mounts::swap_devices()? })
    }
    pub(crate) fn mountpoints(&self, devno: u64) -> Vec<PathBuf> {
        self.mounts.iter().filter(|m| m.is_on(devno)).map(|m| m.mountpoint.clone()).collect()
    }
    pub(crate) fn in_use(&self, devno: u64) -> bool {
        self.mounts.iter().any(|m| m.is_on(devno)) || self.swaps.contains(&devno) || !holders(devno).is_empty()
    }
}

/// Who made a disk and how it is attached: what an image records of its
/// source, and what a confirmation names of its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Model string, when the device reports one.
    pub model: Option<String>,
    /// Serial number, when the device reports one.
    pub serial: Option<String>,
    /// usb, nvme, sata, … (see [`transport_from_sys_path`]).
    pub transport: String,
}

/// The identity of an open block device's whole disk, from sysfs alone
/// (no table read, nothing probed). `None` for image files or when sysfs
/// does not know the device.
pub fn identity(disk: &Disk) -> Option<Identity> {
    if disk.kind != DiskKind::BlockDevice {
        return None;
    }
    let dir = whole_disk_of(disk.dev).and_then(sys_dir_of)?;
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(Identity {
        model: model_of(&dir, &name),
        serial: serial_of(&dir),
        transport: transport_from_sys_path(&dir.to_string_lossy(), &name),
    })
}

/// Whether `disk` is a block device whose whole disk says it spins
/// (/sys/.../queue/rotational). False for image files and when sysfs does
/// not say.
pub fn is_rotational(disk: &Disk) -> bool {
    if disk.kind != DiskKind::BlockDevice {
        return false;
    }
    let Some(dir) = whole_disk_of(disk.dev).and_then(sys_dir_of) else { return false };
    read_attr(&dir.join("queue/rotational")).is_some_and(|v| v == "1")
}

/// Whether the block device `devno` is mounted, used as swap or held.
pub fn device_in_use(devno: u64) -> Result<bool> {
    Ok(Usage::load()?.in_use(devno))
}

/// Convenience used by safety checks: the st_dev of the nearest existing
/// ancestor of `path` (the path itself when it exists).
pub fn nearest_existing_st_dev(path: &Path) -> Option<(PathBuf, u64)> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().ok()?.join(path) };
    for anc in abs.ancestors() {
        if let Ok(meta) = fs::metadata(anc) {
            return Some((anc.to_path_buf(), meta.dev()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        let t = |p: &str, n: &str| transport_from_sys_path(p, n);
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb", "sdb"),
            "usb"
        );
        assert_eq!(t("/sys/devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0/nvme0n1", "nvme0n1"), "nvme");
        assert_eq!(t("/sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda", "vda"), "virtio");
        assert_eq!(t("/sys/devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block/sda", "sda"), "sata");
        assert_eq!(t("/sys/devices/platform/soc/mmc_host/mmc0/mmc0:aaaa/block/mmcblk0", "mmcblk0"), "mmc");
        assert_eq!(t("/sys/devices/virtual/block/loop0", "loop0"), "loop");
        assert_eq!(t("/sys/devices/virtual/block/dm-0", "dm-0"), "virtual");
        assert_eq!(t("/sys/devices/pci0000:00/0000:00:10.0/host2/target2:0:1/2:0:1:0/block/sdc", "sdc"), "scsi");
        assert_eq!(t("/sys/devices/foo/block/xyz", "xyz"), "unknown");
    }

    #[test]
    fn vpd80() {
        let mut page = vec![0x00, 0x80, 0x00, 0x0C];
        page.extend_from_slice(b"  WD-12345  ");
        assert_eq!(serial_from_vpd80(&page).as_deref(), Some("WD-12345"));
        assert_eq!(serial_from_vpd80(&[0, 0x80, 0, 50, b'A']).as_deref(), Some("A"));
        assert_eq!(serial_from_vpd80(&[0, 0x83, 0, 1, b'A']), None);
        assert_eq!(serial_from_vpd80(&[0, 0x80]), None);
    }

    #[test]
    fn devnos() {
        assert_eq!(parse_devno("8:17\n"), Some(makedev(8, 17)));
        assert_eq!(parse_devno("8"), None);
        assert_eq!(parse_devno("a:b"), None);
    }
}
