//! The checks that stop klon from losing data: a source that is being
//! written to, a target that is the source or in use, an image directory on
//! the disk being imaged or overwritten.
//!
//! The checks only read metadata (sysfs, /proc, stat); they never open or
//! touch the disks. Each returns `Error::Refused` with what is wrong and
//! what to do about it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::device::mounts::{self, Mount};
use crate::device::sysfs;
use crate::device::{Disk, DiskKind};
use crate::error::{Error, Result};

/// Refuses to image a block device while it, or a partition of it (or a
/// device built on them, such as an opened LUKS volume), is mounted
/// read-write, or while device-mapper or md holds it (an active LVM volume
/// group and its thin pool, an opened encrypted volume, a RAID array: each
/// can be written through, mounted or not), unless `allow_mounted`.
/// Read-only mounts are fine. Image files are always accepted.
pub fn check_source(source: &Disk, allow_mounted: bool) -> Result<()> {
    if source.kind != DiskKind::BlockDevice || allow_mounted {
        return Ok(());
    }
    let mounts = mounts::mounts()?;
    for (dev, via) in covered_devices(source.dev) {
        if let Some(m) = mounts.iter().find(|m| m.read_write && m.is_on(dev)) {
            return Err(Error::Refused(format!(
                "{} is mounted read-write at {}{}, so the copy of source {} would be inconsistent; \
                 unmount it (umount {}) or remount it read-only, or pass --allow-mounted to image it anyway",
                dev_name(dev),
                m.mountpoint.display(),
                via_text(via),
                source.path.display(),
                shell_quote(&m.mountpoint),
            )));
        }
    }
    for (dev, _) in covered_devices(source.dev).into_iter().filter(|(_, via)| via.is_none()) {
        if let Some(holder) = sysfs::holders(dev).into_iter().next() {
            let name = std::fs::read_to_string(Path::new("/sys/class/block").join(&holder).join("dm/name"))
                .map(|n| n.trim().to_string())
                .unwrap_or_default();
            let (what, undo) = if holder.starts_with("dm-") {
                (
                    format!(
                        "device-mapper device {name} (/dev/{holder}): an active LVM volume group or an opened encrypted volume"
                    ),
                    "deactivate it (vgchange -an VG, or cryptsetup close NAME)",
                )
            } else {
                (format!("/dev/{holder}"), "stop it (mdadm --stop)")
            };
            return Err(Error::Refused(format!(
                "{} is held by {what}, which can be written to while source {} is copied; {undo}, or pass \
                 --allow-mounted to image it anyway",
                dev_name(dev),
                source.path.display(),
            )));
        }
    }
    Ok(())
}

/// Refuses a restore target that is the source (same device, a partition
/// of it or its whole disk, the same file, or a loop device over the source
/// file or vice versa); a block device that is mounted, used as swap or held
/// by another device (itself or any partition), or a loop device whose bytes
/// another loop device over the same file shows and that one is; a block
/// device that holds `image_dir`; or a target file that lies inside
/// `image_dir`.
pub fn check_target(target: &Disk, source: Option<&Disk>, image_dir: Option<&Path>) -> Result<()> {
    if let Some(source) = source {
        check_not_same(target, source)?;
    }
    if target.kind == DiskKind::BlockDevice {
        let mounts = mounts::mounts()?;
        let swaps = mounts::swap_devices()?;
        if let Some(dir) = image_dir
            && let Some(part) = block_device_of_dir(dir, &mounts)
        {
            for base in sysfs::underlying_devices(part) {
                if overlaps(base, target.dev) {
                    return Err(Error::Refused(format!(
                        "the image directory {} is on {}, which is part of the target {}; \
                         writing the target would destroy the image: keep images on another disk",
                        dir.display(),
                        dev_name(part),
                        target.path.display(),
                    )));
                }
            }
        }
        for (dev, via) in covered_devices(target.dev) {
            check_unused(target, dev, via, &mounts, &swaps)?;
        }
        check_other_loop_devices(target, &mounts, &swaps)?;
    }
    if target.kind == DiskKind::File
        && let Some(dir) = image_dir
    {
        if file_inside_dir(&target.path, dir) {
            return Err(Error::Refused(format!(
                "the target file {} lies inside the image directory {}; choose a target outside it",
                target.path.display(),
                dir.display(),
            )));
        }
        // The image directory inside a filesystem of the target file
        // (attached to a loop device and mounted).
        let mounts = mounts::mounts()?;
        if let Some(part) = block_device_of_dir(dir, &mounts)
            && sysfs::underlying_devices(part).into_iter().any(|b| loop_file_id(b) == Some((target.dev, target.ino)))
        {
            return Err(Error::Refused(format!(
                "the image directory {} is on {}, a loop device over the target file {}; \
                 writing the target would destroy the image: keep images elsewhere",
                dir.display(),
                dev_name(part),
                target.path.display(),
            )));
        }
    }
    if target.kind == DiskKind::File {
        check_file_not_attached(target)?;
    }
    Ok(())
}

/// Refuses the target when `dev` (one of the devices covering it, reached
/// from `via` when it is built on another) is mounted, used as swap or held
/// by another device.
fn check_unused(target: &Disk, dev: u64, via: Option<u64>, mounts: &[Mount], swaps: &[u64]) -> Result<()> {
    let what = format!("{}{}", dev_name(dev), via_text(via));
    if let Some(m) = mounts.iter().find(|m| m.is_on(dev)) {
        return Err(Error::Refused(format!(
            "target {}: {what} is mounted at {}; unmount it (umount {}) before writing to this disk",
            target.path.display(),
            m.mountpoint.display(),
            shell_quote(&m.mountpoint),
        )));
    }
    if swaps.contains(&dev) {
        return Err(Error::Refused(format!(
            "target {}: {what} is in use as swap; turn it off (swapoff {}) before writing to this disk",
            target.path.display(),
            dev_name(dev),
        )));
    }
    let h = sysfs::holders(dev);
    if !h.is_empty() {
        return Err(Error::Refused(format!(
            "target {}: {what} is held by {} (device mapper, LVM, RAID or an open encrypted volume); \
             close or deactivate it before writing to this disk",
            target.path.display(),
            h.iter().map(|n| format!("/dev/{n}")).collect::<Vec<_>>().join(", "),
        )));
    }
    Ok(())
}

/// For a target on a loop device: refuses it when another loop device
/// over the same file shows some of the same bytes (`losetup --offset
/// --sizelimit` attaches a partition's range on its own) and that device,
/// a partition of it over those bytes, or a device built on them is
/// mounted, swap or held. The kernel's O_EXCL sees none of that: it is
/// another block device.
fn check_other_loop_devices(target: &Disk, mounts: &[Mount], swaps: &[u64]) -> Result<()> {
    let Some((file, start, len)) = file_range(target.dev) else { return Ok(()) };
    let own = sysfs::whole_disk_of(target.dev);
    for other in sysfs::loop_devnos() {
        if Some(other) == own || loop_file_id(other) != Some(file) {
            continue;
        }
        let mut bases = vec![other];
        bases.extend(sysfs::partition_devnos(other));
        for base in bases {
            let Some((_, s, l)) = file_range(base) else { continue };
            if !ranges_overlap((start, len), (s, l)) {
                continue;
            }
            let backing = sysfs::name_of(other).and_then(|n| sysfs::loop_backing_file(&n));
            let note = format!(
                "{} is a loop device over the same file{} as the target, and bytes {}..{} of that file are in both",
                dev_name(other),
                backing.map(|b| format!(" {}", b.display())).unwrap_or_default(),
                s.max(start),
                s.saturating_add(l).min(start.saturating_add(len)),
            );
            for (dev, via) in with_holders(base) {
                check_unused(target, dev, via, mounts, swaps).map_err(|e| e.with_note(&note))?;
            }
        }
    }
    Ok(())
}

/// Whether two byte ranges (start, length) share a byte.
fn ranges_overlap((a, al): (u64, u64), (b, bl): (u64, u64)) -> bool {
    al > 0 && bl > 0 && a < b.saturating_add(bl) && b < a.saturating_add(al)
}

/// For a loop device or a partition of one: its backing file's
/// (st_dev, st_ino) and the bytes of that file it shows (start, length).
fn file_range(devno: u64) -> Option<((u64, u64), u64, u64)> {
    let whole = sysfs::whole_disk_of(devno)?;
    let file = loop_file_id(whole)?;
    let offset = sysfs::loop_offset(&sysfs::name_of(whole)?)?;
    let (start, len) = sysfs::range_in_disk(devno)?;
    Some((file, offset.checked_add(start)?, len))
}

/// Refuses a target file that a loop device is attached to: it is in use
/// as a disk (maybe mounted), and writing under it corrupts what uses it.
fn check_file_not_attached(target: &Disk) -> Result<()> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(file) = sysfs::loop_backing_file(&name) else { continue };
        let Ok(meta) = std::fs::metadata(&file) else { continue };
        if (meta.dev(), meta.ino()) == (target.dev, target.ino) {
            return Err(Error::Refused(format!(
                "the target file {} is attached to /dev/{name} and may be in use; \
                 detach it first (umount its partitions, then losetup -d /dev/{name})",
                target.path.display()
            )));
        }
    }
    Ok(())
}

/// Refuses an image directory that lives on the source: on the source disk
/// or any of its partitions (also through LVM, dm or md built on them), or,
/// for an image-file source, inside a loop-mounted filesystem of that file.
/// The directory may not exist yet: its nearest existing ancestor is checked.
pub fn check_image_dir_not_on(source: &Disk, image_dir: &Path) -> Result<()> {
    if crate::repo::store::is_remote(image_dir) {
        // An object store is on no disk of this machine.
        return Ok(());
    }
    let mounts = mounts::mounts()?;
    let Some(part) = block_device_of_dir(image_dir, &mounts) else { return Ok(()) };
    for base in sysfs::underlying_devices(part) {
        let on_source = match source.kind {
            DiskKind::BlockDevice => overlaps(base, source.dev),
            DiskKind::File => loop_file_id(base) == Some((source.dev, source.ino)),
        };
        if on_source {
            return Err(Error::Refused(format!(
                "the image directory {} is on {}, which is part of the source {}; \
                 an image must not be written onto the disk being imaged: choose a directory on another disk",
                image_dir.display(),
                dev_name(part),
                source.path.display(),
            )));
        }
    }
    Ok(())
}

fn check_not_same(target: &Disk, source: &Disk) -> Result<()> {
    let refuse = |how: &str| {
        Err(Error::Refused(format!(
            "target {} {how} source {}; restoring onto the source would destroy it: choose another target",
            target.path.display(),
            source.path.display(),
        )))
    };
    match (target.kind, source.kind) {
        (DiskKind::BlockDevice, DiskKind::BlockDevice) => {
            if target.dev == source.dev {
                return refuse("is the");
            }
            if overlaps(target.dev, source.dev) {
                return refuse("overlaps the");
            }
            // Two different loop devices over one file are one disk (two
            // partitions of the same loop device were handled above).
            let whole_differs = sysfs::whole_disk_of(target.dev) != sysfs::whole_disk_of(source.dev);
            if whole_differs
                && let (Some(a), Some(b)) = (loop_file_id(target.dev), loop_file_id(source.dev))
                && a == b
            {
                return refuse("is a loop device over the same file as the");
            }
        }
        (DiskKind::File, DiskKind::File) => {
            if target.dev == source.dev && target.ino == source.ino {
                return refuse("is the same file as the");
            }
        }
        (DiskKind::BlockDevice, DiskKind::File) => {
            if loop_file_id(target.dev) == Some((source.dev, source.ino)) {
                return refuse("is a loop device over the");
            }
        }
        (DiskKind::File, DiskKind::BlockDevice) => {
            if loop_file_id(source.dev) == Some((target.dev, target.ino)) {
                return refuse("is the file behind the loop device used as");
            }
        }
    }
    Ok(())
}

/// Whether two block devices share sectors: the same device, or one is
/// the whole disk of the other. Two partitions of one disk do not overlap.
fn overlaps(a: u64, b: u64) -> bool {
    let wa = sysfs::whole_disk_of(a).unwrap_or(a);
    let wb = sysfs::whole_disk_of(b).unwrap_or(b);
    overlap_rule(a, wa, b, wb)
}

/// The pure part of [`overlaps`].
fn overlap_rule(a: u64, whole_a: u64, b: u64, whole_b: u64) -> bool {
    a == b || whole_a == b || whole_b == a
}

/// For a loop device (or a partition of one), the (st_dev, st_ino) of its
/// backing file.
fn loop_file_id(devno: u64) -> Option<(u64, u64)> {
    let whole = sysfs::whole_disk_of(devno)?;
    let file = sysfs::loop_backing_file(&sysfs::name_of(whole)?)?;
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The devices whose being mounted or held affects `devno`: itself, for a
/// whole disk its partitions, and everything built on top of those
/// (holders, recursively). Each comes with the device it was reached from
/// when it is a holder.
fn covered_devices(devno: u64) -> Vec<(u64, Option<u64>)> {
    let mut base = vec![devno];
    if sysfs::whole_disk_of(devno) == Some(devno) {
        base.extend(sysfs::partition_devnos(devno));
    }
    let mut out: Vec<(u64, Option<u64>)> = Vec::new();
    for b in base {
        add_with_holders(b, &mut out);
    }
    out
}

/// `devno` and everything built on it (holders, recursively), as
/// [`covered_devices`] gives them, without a whole disk's partitions.
fn with_holders(devno: u64) -> Vec<(u64, Option<u64>)> {
    let mut out = Vec::new();
    add_with_holders(devno, &mut out);
    out
}

fn add_with_holders(b: u64, out: &mut Vec<(u64, Option<u64>)>) {
    out.push((b, None));
    let mut todo = vec![(b, 0u32)];
    while let Some((d, depth)) = todo.pop() {
        if depth > 8 || out.len() > 256 {
            break;
        }
        for h in sysfs::holders(d) {
            let dev = std::fs::read_to_string(Path::new("/sys/class/block").join(&h).join("dev"))
                .ok()
                .and_then(|t| sysfs::parse_devno(&t));
            if let Some(hd) = dev
                && !out.iter().any(|(x, _)| *x == hd)
            {
                out.push((hd, Some(b)));
                todo.push((hd, depth + 1));
            }
        }
    }
}

fn via_text(via: Option<u64>) -> String {
    match via {
        Some(d) => format!(" (built on {})", dev_name(d)),
        None => String::new(),
    }
}

fn dev_name(devno: u64) -> String {
    match sysfs::name_of(devno) {
        Some(n) => format!("/dev/{}", n.replace('!', "/")),
        None => format!("device {}:{}", mounts::major(devno), mounts::minor(devno)),
    }
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The block device holding the filesystem of `dir` (or its nearest
/// existing ancestor); `None` when no block device is behind it.
fn block_device_of_dir(dir: &Path, mounts: &[Mount]) -> Option<u64> {
    let (_, st_dev) = sysfs::nearest_existing_st_dev(dir)?;
    mounts::block_devno_for_st_dev(st_dev, mounts)
}

/// Canonicalizes a path that may not exist: the nearest existing ancestor
/// canonicalized, with the missing rest appended.
fn canonical_lenient(path: &Path) -> Option<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().ok()?.join(path) };
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            let mut out = c;
            // The missing parts are not symlinks: resolve them lexically.
            for part in rest.iter().rev() {
                match part.to_str() {
                    Some(".") => {}
                    Some("..") => {
                        out.pop();
                    }
                    _ => out.push(part),
                }
            }
            return Some(out);
        }
        rest.push(cur.components().next_back()?.as_os_str().to_os_string());
        cur = cur.parent()?;
    }
}

fn file_inside_dir(file: &Path, dir: &Path) -> bool {
    match (canonical_lenient(file), canonical_lenient(dir)) {
        (Some(f), Some(d)) => f.starts_with(d),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("klon-safety-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn file_disk(p: &Path) -> Disk {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
        Disk::open_read_only(p).unwrap()
    }

    fn refused(r: Result<()>) -> String {
        match r {
            Err(Error::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn overlap_rules() {
        // sda = 1, sda1 = 2, sda2 = 3, sdb = 4
        assert!(overlap_rule(1, 1, 1, 1));
        assert!(overlap_rule(2, 1, 1, 1));
        assert!(overlap_rule(1, 1, 2, 1));
        assert!(!overlap_rule(2, 1, 3, 1));
        assert!(!overlap_rule(1, 1, 4, 4));
        assert!(!overlap_rule(2, 1, 4, 4));
    }

    #[test]
    fn byte_ranges_overlap_where_they_share_a_byte() {
        assert!(ranges_overlap((0, 64), (1, 24)));
        assert!(ranges_overlap((1, 24), (0, 64)));
        assert!(ranges_overlap((10, 10), (19, 1)));
        assert!(!ranges_overlap((10, 10), (20, 5)));
        assert!(!ranges_overlap((20, 5), (10, 10)));
        assert!(!ranges_overlap((0, 0), (0, 10)));
        assert!(ranges_overlap((u64::MAX - 1, 10), (u64::MAX - 2, 2)));
    }

    #[test]
    fn files_as_source_are_fine() {
        let t = TempDir::new("src");
        let d = file_disk(&t.0.join("a.img"));
        check_source(&d, false).unwrap();
        check_image_dir_not_on(&d, &t.0.join("images/not/yet")).unwrap();
    }

    #[test]
    fn same_file_is_refused() {
        let t = TempDir::new("same");
        let a = file_disk(&t.0.join("a.img"));
        let a2 = Disk::open_read_only(&t.0.join("a.img")).unwrap();
        let msg = refused(check_target(&a2, Some(&a), None));
        assert!(msg.contains("same file"), "{msg}");
        // A hard link is the same file too.
        std::fs::hard_link(t.0.join("a.img"), t.0.join("link.img")).unwrap();
        let l = Disk::open_read_only(&t.0.join("link.img")).unwrap();
        refused(check_target(&l, Some(&a), None));
        let b = file_disk(&t.0.join("b.img"));
        check_target(&b, Some(&a), None).unwrap();
    }

    #[test]
    fn target_file_inside_image_dir_is_refused() {
        let t = TempDir::new("inside");
        std::fs::create_dir_all(t.0.join("images/x")).unwrap();
        let inside = file_disk(&t.0.join("images/x/disk.img"));
        let msg = refused(check_target(&inside, None, Some(&t.0.join("images"))));
        assert!(msg.contains("inside the image directory"), "{msg}");
        // Through a relative-looking, not-normalized path too.
        refused(check_target(&inside, None, Some(&t.0.join("images/x/../x"))));
        let outside = file_disk(&t.0.join("out.img"));
        check_target(&outside, None, Some(&t.0.join("images"))).unwrap();
        check_target(&outside, None, Some(&t.0.join("does/not/exist"))).unwrap();
    }

    #[test]
    fn lenient_canonical() {
        let t = TempDir::new("canon");
        let base = std::fs::canonicalize(&t.0).unwrap();
        assert_eq!(canonical_lenient(&t.0.join("a/b/../c")).unwrap(), base.join("a/c"));
        assert_eq!(canonical_lenient(&t.0.join("a/../../x")).unwrap(), base.parent().unwrap().join("x"));
        assert_eq!(canonical_lenient(&t.0).unwrap(), base);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(Path::new("/mnt/x")), "/mnt/x");
        assert_eq!(shell_quote(Path::new("/mnt/my disk")), "'/mnt/my disk'");
    }
}
