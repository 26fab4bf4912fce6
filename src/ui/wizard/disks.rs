//! Disks as the wizard offers them: told apart by model, serial, size,
//! transport and partitions, with the rules that decide what may be chosen
//! as a source or a target.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::device::sysfs;
use crate::device::{Disk, mounts};
use crate::fs;
use crate::inventory::DiskInfo;
use crate::ui::human_bytes;

use super::screen::Item;

/// The label of the live stick's partition: that disk is never offered.
pub use crate::inventory::image_drive::LIVE_LABEL;

/// Filesystems an image drive may have.
pub use crate::device::mounts::IMAGE_FS;

/// A disk with the used space of each partition (when klon reads its
/// filesystem), in the order of `info.partitions`.
#[derive(Debug, Clone)]
pub struct Listed {
    /// What sysfs says.
    pub info: DiskInfo,
    /// Used bytes per partition.
    pub used: Vec<Option<u64>>,
}

/// Whether `d` is the live stick: a partition (or the whole disk) labelled
/// KLONLIVE, or named in `exclude`.
pub fn is_excluded(d: &DiskInfo, exclude: &[PathBuf]) -> bool {
    let labelled = |f: &Option<crate::fs::FsInfo>| f.as_ref().and_then(|f| f.label.as_deref()) == Some(LIVE_LABEL);
    if labelled(&d.fs) || d.partitions.iter().any(|p| labelled(&p.fs)) {
        return true;
    }
    exclude.iter().any(|x| {
        if x == &d.path {
            return true;
        }
        // Also by device number (a symlink such as /dev/disk/by-id/...),
        // and a partition named stands for its whole disk.
        std::fs::metadata(x)
            .ok()
            .filter(|m| m.file_type().is_block_device_like())
            .map(|m| m.rdev())
            .is_some_and(|dev| dev == d.devno || sysfs::whole_disk_of(dev) == Some(d.devno))
    })
}

trait BlockLike {
    fn is_block_device_like(&self) -> bool;
}
impl BlockLike for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_block_device()
    }
}

/// Lists the disks, leaving out the live stick and `exclude`.
pub fn list(exclude: &[PathBuf]) -> crate::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for info in crate::inventory::list_disks()? {
        if is_excluded(&info, exclude) {
            continue;
        }
        let disk = Disk::open_read_only(&info.path).ok();
        let used = info
            .partitions
            .iter()
            .map(|p| {
                let d = disk.as_ref()?;
                let f = p.fs.as_ref()?;
                fs::used_bytes(d, &f.fstype, p.start, p.size)
            })
            .collect();
        out.push(Listed { info, used });
    }
    Ok(out)
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        s.chars().take(width.saturating_sub(1)).collect::<String>() + "~"
    }
}

/// What a person reads to recognise the disk: one line for the disk, one
/// per partition (at most four, then a count).
pub fn describe(l: &Listed) -> String {
    let d = &l.info;
    let model = match (&d.model, &d.loop_backing_file) {
        (Some(m), _) => m.clone(),
        (None, Some(f)) => format!("file {}", f.display()),
        (None, None) => "unknown model".to_string(),
    };
    let serial = d.serial.as_deref().map(|s| format!("  serial {s}")).unwrap_or_default();
    let mut s = cut(&format!("{}  {}  {}  {}{serial}", d.path.display(), human_bytes(d.size), d.transport, model), 74);
    if let Some(f) = &d.fs {
        s.push_str(&format!(
            "\n      whole disk: {}{}",
            f.fstype,
            f.label.as_deref().map(|l| format!(" \"{l}\"")).unwrap_or_default()
        ));
    }
    if d.partitions.is_empty() && d.fs.is_none() {
        s.push_str("\n      no partitions");
    }
    for (i, p) in d.partitions.iter().enumerate() {
        if i == 4 {
            s.push_str(&format!("\n      ... and {} more partitions", d.partitions.len() - 4));
            break;
        }
        let (fstype, label) = match &p.fs {
            Some(f) => (f.fstype.clone(), f.label.as_deref().map(|l| format!(" \"{l}\"")).unwrap_or_default()),
            None => ("no filesystem".to_string(), String::new()),
        };
        let used = l.used.get(i).copied().flatten().map(|u| format!(", {} used", human_bytes(u))).unwrap_or_default();
        let mounted = p.mountpoints.first().map(|m| format!(", mounted at {}", m.display())).unwrap_or_default();
        s.push_str(&cut(
            &format!("\n      part {}: {} {fstype}{label}{used}{mounted}", p.number, human_bytes(p.size)),
            78,
        ));
        // An LVM2 PV: what a person knows the disk by (the Proxmox host's
        // volume group and its VM disks).
        if let Some(vg) = &p.lvm {
            s.push_str(&cut(&format!("\n        {vg}"), 78));
        }
    }
    s
}

/// Why `d` cannot be backed up now, if it cannot: a partition mounted
/// read-write (the copy would be inconsistent).
pub fn source_block(d: &DiskInfo) -> Option<String> {
    let mounts = mounts::mounts().ok()?;
    let devs: Vec<u64> = std::iter::once(d.devno).chain(d.partitions.iter().map(|p| p.devno)).collect();
    for dev in devs {
        if let Some(m) = mounts.iter().find(|m| m.read_write && m.is_on(dev)) {
            return Some(format!(
                "it is mounted read-write at {} (the copy would be inconsistent); unmount it first",
                m.mountpoint.display()
            ));
        }
    }
    None
}

/// What a target must offer.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// Bytes at least.
    pub size: u64,
    /// Logical sector size.
    pub sector_size: u32,
}

/// Why `d` cannot be a target, if it cannot: too small, another sector
/// size, read-only, or in use.
pub fn target_block(d: &DiskInfo, need: Need) -> Option<String> {
    if d.size < need.size {
        return Some(format!("too small: needs {}, has {}", human_bytes(need.size), human_bytes(d.size)));
    }
    if d.logical_sector_size != need.sector_size {
        return Some(format!(
            "it has {}-byte sectors, the copy needs a disk with {}-byte sectors",
            d.logical_sector_size, need.sector_size
        ));
    }
    if d.read_only {
        return Some("it is read-only".into());
    }
    if let Some(m) = d.mountpoints.first() {
        return Some(format!("it is mounted at {}; unmount it first", m.display()));
    }
    for p in &d.partitions {
        if let Some(m) = p.mountpoints.first() {
            return Some(format!("{} is mounted at {}; unmount it first", p.path.display(), m.display()));
        }
        if p.in_use {
            return Some(format!("{} is in use (swap, LVM, RAID or encryption); stop that first", p.path.display()));
        }
    }
    if d.in_use {
        return Some("it is in use (swap, LVM, RAID or encryption); stop that first".into());
    }
    None
}

/// The whole disks holding the directory `dir` (none for a directory on a
/// filesystem without a block device).
pub fn disks_holding(dir: &Path) -> Vec<u64> {
    let Ok(mounts) = mounts::mounts() else { return Vec::new() };
    let mut p = dir.to_path_buf();
    let meta = loop {
        if let Ok(m) = std::fs::metadata(&p) {
            break m;
        }
        if !p.pop() {
            return Vec::new();
        }
    };
    let Some(part) = mounts::block_devno_for_st_dev(meta.dev(), &mounts) else { return Vec::new() };
    sysfs::underlying_devices(part).into_iter().filter_map(sysfs::whole_disk_of).collect()
}

/// Menu items for target disks: the source and the disks in `never` are
/// left out; the others are listed, blocked with the reason when they do
/// not fit.
pub fn target_items(disks: &[Listed], source: Option<u64>, never: &[u64], need: Need) -> (Vec<Item>, Vec<usize>) {
    let mut items = Vec::new();
    let mut index = Vec::new();
    for (i, l) in disks.iter().enumerate() {
        if Some(l.info.devno) == source || never.contains(&l.info.devno) {
            continue;
        }
        let text = describe(l);
        items.push(match target_block(&l.info, need) {
            None => Item::new(text),
            Some(why) => Item::blocked(text, why),
        });
        index.push(i);
    }
    (items, index)
}

/// A safe file or directory name from a disk model: letters, digits, '-',
/// '_' and '.'; anything else becomes '-'.
pub fn safe_name(s: &str) -> String {
    let mut out = String::new();
    for c in s.trim().chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() { "disk".into() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::FsInfo;
    use crate::inventory::PartInfo;

    fn disk(size: u64) -> DiskInfo {
        DiskInfo {
            path: "/dev/sdb".into(),
            name: "sdb".into(),
            devno: 8 << 8 | 16,
            size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            model: Some("SanDisk Ultra".into()),
            serial: Some("4C530001".into()),
            transport: "usb".into(),
            removable: true,
            read_only: false,
            loop_backing_file: None,
            partitions: vec![PartInfo {
                number: 1,
                path: "/dev/sdb1".into(),
                devno: 8 << 8 | 17,
                start: 1 << 20,
                size: size - (2 << 20),
                type_id: None,
                fs: Some(FsInfo { fstype: "ext4".into(), label: Some("data".into()), uuid: None }),
                mountpoints: vec![],
                in_use: false,
                lvm: None,
            }],
            fs: None,
            mountpoints: vec![],
            in_use: false,
        }
    }

    #[test]
    fn an_lvm_physical_volume_shows_its_volume_group() {
        let mut d = disk(100 << 30);
        d.partitions[0].fs = Some(FsInfo { fstype: "LVM2_member".into(), label: None, uuid: None });
        d.partitions[0].lvm = Some("volume group pve: root, swap, data (thin pool: vm-100-disk-0)".into());
        let text = describe(&Listed { info: d, used: vec![None] });
        assert!(
            text.contains(
                "part 1: 100.0 GiB LVM2_member\n        volume group pve: root, swap, data (thin pool: vm-100-disk-0)"
            ),
            "{text}"
        );
    }

    #[test]
    fn too_small_target_says_both_sizes() {
        let d = disk(480_000_000_000);
        let why = target_block(&d, Need { size: 500_107_862_016, sector_size: 512 }).unwrap();
        assert_eq!(why, "too small: needs 465.8 GiB, has 447.0 GiB");
        assert!(target_block(&d, Need { size: 1000, sector_size: 512 }).is_none());
        assert!(target_block(&d, Need { size: 1000, sector_size: 4096 }).unwrap().contains("4096-byte"));
        let mut m = d.clone();
        m.partitions[0].mountpoints.push("/mnt".into());
        assert!(target_block(&m, Need { size: 1000, sector_size: 512 }).unwrap().contains("mounted at /mnt"));
    }

    #[test]
    fn source_and_image_disk_never_offered_small_ones_blocked() {
        let mut a = disk(100 << 30);
        a.devno = 1;
        let mut b = disk(200 << 30);
        b.devno = 2;
        let mut c = disk(10 << 30);
        c.devno = 3;
        let mut e = disk(300 << 30);
        e.devno = 4;
        let listed: Vec<Listed> =
            [a, b, c, e].into_iter().map(|info| Listed { used: vec![Some(5 << 30)], info }).collect();
        let (items, idx) = target_items(&listed, Some(1), &[4], Need { size: 50 << 30, sector_size: 512 });
        assert_eq!(idx, vec![1, 2]);
        assert!(items[0].blocked.is_none());
        assert!(items[1].blocked.as_deref().unwrap().starts_with("too small"));
        let text = &items[0].text;
        for needle in ["/dev/sdb", "SanDisk Ultra", "serial 4C530001", "usb", "ext4 \"data\"", "5.0 GiB used"] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
        assert!(text.lines().all(|l| l.chars().count() <= 78));
    }

    #[test]
    fn live_stick_is_excluded_by_label_or_path() {
        let mut d = disk(8 << 30);
        assert!(!is_excluded(&d, &[]));
        assert!(is_excluded(&d, &["/dev/sdb".into()]));
        d.partitions[0].fs.as_mut().unwrap().label = Some(LIVE_LABEL.into());
        assert!(is_excluded(&d, &[]));
    }

    #[test]
    fn names() {
        assert_eq!(safe_name("Samsung SSD 860 EVO 500GB"), "Samsung-SSD-860-EVO-500GB");
        assert_eq!(safe_name("  /// "), "disk");
    }
}
