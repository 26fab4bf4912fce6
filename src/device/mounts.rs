//! What is mounted and what is used as swap (/proc/self/mountinfo and
//! /proc/swaps), and mounting an image drive ([`Mounted`]).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device number of the mounted filesystem as the kernel reports it,
    /// `makedev(major, minor)`. For btrfs (and other filesystems using
    /// anonymous device numbers) this is not the block device: see
    /// [`Mount::source_devno`].
    pub devno: u64,
    /// The mount source (e.g. "/dev/sda1", "tmpfs").
    pub source: String,
    /// Where it is mounted (unescaped).
    pub mountpoint: PathBuf,
    /// Whether the filesystem is writable: the superblock options say "rw"
    /// (falling back to the per-mount options when those are missing).
    pub read_write: bool,
    /// Filesystem type (e.g. "ext4").
    pub fstype: String,
    /// When the source is a block device node, its device number (st_rdev).
    /// Filled in by [`mounts`]; `None` from [`parse_mountinfo`].
    pub source_devno: Option<u64>,
}

impl Mount {
    /// Whether this mount is backed by the block device `devno`, either as
    /// the reported device number or through its source device node.
    pub fn is_on(&self, devno: u64) -> bool {
        self.devno == devno || self.source_devno == Some(devno)
    }
}

/// Builds a device number from major and minor.
pub fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// The major number of a device number.
pub fn major(devno: u64) -> u32 {
    libc::major(devno)
}

/// The minor number of a device number.
pub fn minor(devno: u64) -> u32 {
    libc::minor(devno)
}

/// Reads the mounts of this process's mount namespace, resolving block
/// device sources to their device numbers.
pub fn mounts() -> Result<Vec<Mount>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, None, e))?;
    let mut list = parse_mountinfo(&text);
    for m in &mut list {
        m.source_devno = block_devno(Path::new(&m.source));
    }
    Ok(list)
}

/// The st_rdev of `path` when it is a block device node.
fn block_devno(path: &Path) -> Option<u64> {
    if !path.is_absolute() {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}

/// Undoes the octal escapes (`\040` for space, `\011`, `\012`, `\134`)
/// the kernel uses in mountinfo and /proc/swaps.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if v <= 0xFF {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of /proc/self/mountinfo. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    // 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 {
        return None;
    }
    let (maj, min) = fields[2].split_once(':')?;
    let devno = makedev(maj.parse().ok()?, min.parse().ok()?);
    let mountpoint = PathBuf::from(unescape(fields[4]));
    let mount_rw = fields[5].split(',').any(|o| o == "rw");
    let fstype = unescape(fields.get(sep + 1)?);
    let source = unescape(fields.get(sep + 2)?);
    let read_write = match fields.get(sep + 3) {
        Some(opts) => opts.split(',').any(|o| o == "rw"),
        None => mount_rw,
    };
    Some(Mount { devno, source, mountpoint, read_write, fstype, source_devno: None })
}

/// Parses the text of /proc/swaps into the (unescaped) swap paths.
pub fn parse_swaps(text: &str) -> Vec<PathBuf> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            // Filename is the first column; the kernel escapes spaces in it.
            let name = l.split_whitespace().next()?;
            Some(PathBuf::from(unescape(name)))
        })
        .collect()
}

/// Device numbers of the block devices (partitions or disks) in use as
/// swap. Swap files are not listed: their filesystem shows as mounted.
pub fn swap_devices() -> Result<Vec<u64>> {
    let path = Path::new("/proc/swaps");
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading", path, None, e)),
    };
    Ok(parse_swaps(&text).iter().filter_map(|p| block_devno(p)).collect())
}

/// The device number of the block device holding the filesystem that
/// holds `st_dev` (a file's st_dev). For filesystems with anonymous device
/// numbers (btrfs, major 0) the mount table gives the source device; `None`
/// when no block device is behind it (tmpfs, overlay, network).
pub fn block_devno_for_st_dev(st_dev: u64, mounts: &[Mount]) -> Option<u64> {
    if major(st_dev) != 0 {
        return Some(st_dev);
    }
    mounts.iter().find(|m| m.devno == st_dev).and_then(|m| m.source_devno)
}

/// Filesystems klon can keep images on, as the probe names them.
pub const IMAGE_FS: &[&str] = &["ext2", "ext3", "ext4", "vfat", "exfat", "ntfs", "xfs", "btrfs"];

/// The kernel filesystem types to try for a probed filesystem that can hold
/// images, in order; empty for anything else (swap, LUKS, LVM, …).
pub fn kernel_types(fstype: &str) -> &'static [&'static str] {
    match fstype {
        "vfat" => &["vfat"],
        "exfat" => &["exfat"],
        "ntfs" => &["ntfs3"],
        "ext2" | "ext3" | "ext4" => &["ext4", "ext3", "ext2"],
        "xfs" => &["xfs"],
        "btrfs" => &["btrfs"],
        _ => &[],
    }
}

/// A filesystem klon mounted (an image drive); flushed and unmounted by
/// [`Mounted::unmount`] or on drop.
#[derive(Debug)]
pub struct Mounted {
    /// The device mounted.
    pub device: PathBuf,
    /// Where.
    pub dir: PathBuf,
    active: bool,
}

impl Mounted {
    /// Mounts `device` (probed as `fstype`) at `dir`, created if missing;
    /// read-write unless `read_only`. Tries the kernel's drivers, then
    /// mount(8), which knows FUSE helpers (ntfs-3g, exfat-fuse) where the
    /// kernel has no driver.
    pub fn mount(device: &Path, fstype: &str, dir: &Path, read_only: bool) -> Result<Mounted> {
        use nix::mount::MsFlags;
        let types = kernel_types(fstype);
        if types.is_empty() {
            return Err(Error::Unsupported(format!("{}: klon cannot keep images on {fstype}", device.display())));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the mount point", dir, None, e))?;
        let mut flags = MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let mut last = nix::Error::ENODEV;
        for t in types {
            match nix::mount::mount(Some(device), dir, Some(*t), flags, None::<&str>) {
                Ok(()) => return Ok(Mounted { device: device.to_path_buf(), dir: dir.to_path_buf(), active: true }),
                Err(e) => last = e,
            }
        }
        let mut cmd = std::process::Command::new("mount");
        if read_only {
            cmd.arg("-r");
        }
        if let Ok(out) = cmd.arg(device).arg(dir).output()
            && out.status.success()
        {
            return Ok(Mounted { device: device.to_path_buf(), dir: dir.to_path_buf(), active: true });
        }
        let hint = match last {
            nix::Error::ENODEV => format!(" (the kernel has no {} driver)", types[0]),
            nix::Error::EROFS | nix::Error::EACCES => " (read-only medium)".to_string(),
            _ => String::new(),
        };
        Err(Error::io(format!("mounting {} ({fstype}){hint} at", device.display()), dir, None, last.into()))
    }

    /// Takes over `dir`, where `source` was just mounted by another program
    /// (sshfs): unmounted like the others.
    pub fn adopt(source: &Path, dir: &Path) -> Mounted {
        Mounted { device: source.to_path_buf(), dir: dir.to_path_buf(), active: true }
    }

    /// Mounts the network share `source` (`//HOST/SHARE`) with the kernel
    /// filesystem `fstype` (cifs) and its `options` (credentials among
    /// them: not kept, not shown) at `dir`, created if missing; the error is
    /// the kernel's, for the caller to put in words.
    pub fn mount_share(
        source: &Path,
        fstype: &str,
        dir: &Path,
        read_only: bool,
        options: &str,
    ) -> std::result::Result<Mounted, nix::Error> {
        use nix::mount::MsFlags;
        std::fs::create_dir_all(dir)
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(nix::Error::EIO as i32)))?;
        let mut flags = MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        match nix::mount::mount(Some(source), dir, Some(fstype), flags, Some(options)) {
            Ok(()) => Ok(Mounted { device: source.to_path_buf(), dir: dir.to_path_buf(), active: true }),
            Err(e) => {
                let _ = std::fs::remove_dir(dir);
                Err(e)
            }
        }
    }

    /// Mounts `device` (probed as `fstype`) at `dir` only to look: read-only,
    /// and without replaying a journal or log (ext's `noload`, XFS's
    /// `norecovery`, btrfs's `rescue=nologreplay`), so that not one byte of
    /// the device is written. Kernel drivers only.
    pub fn peek(device: &Path, fstype: &str, dir: &Path) -> Result<Mounted> {
        use nix::mount::MsFlags;
        let types = kernel_types(fstype);
        if types.is_empty() {
            return Err(Error::Unsupported(format!("{}: klon cannot keep images on {fstype}", device.display())));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the mount point", dir, None, e))?;
        let flags =
            MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        let mut last = nix::Error::ENODEV;
        for t in types {
            let data = match *t {
                "ext4" | "ext3" | "ext2" => Some("noload"),
                "xfs" => Some("norecovery"),
                "btrfs" => Some("rescue=nologreplay"),
                _ => None,
            };
            match nix::mount::mount(Some(device), dir, Some(*t), flags, data) {
                Ok(()) => return Ok(Mounted { device: device.to_path_buf(), dir: dir.to_path_buf(), active: true }),
                Err(e) => last = e,
            }
        }
        let _ = std::fs::remove_dir(dir);
        Err(Error::io(format!("mounting {} ({fstype}) read-only at", device.display()), dir, None, last.into()))
    }

    /// Flushes and unmounts; an error says the drive may not be safe to
    /// pull out.
    pub fn unmount(mut self) -> Result<()> {
        self.active = false;
        unmount_dir(&self.dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            self.active = false;
            if let Err(e) = unmount_dir(&self.dir) {
                eprintln!("klon: {e}");
            }
        }
    }
}

/// Syncs and unmounts `dir`, retrying while files are still closing, and
/// removes the mount point.
fn unmount_dir(dir: &Path) -> Result<()> {
    use nix::mount::{MntFlags, umount2};
    nix::unistd::sync();
    let mut last = nix::Error::EIO;
    for _ in 0..10 {
        match umount2(dir, MntFlags::empty()) {
            Ok(()) => {
                let _ = std::fs::remove_dir(dir);
                return Ok(());
            }
            Err(nix::Error::EBUSY) => {
                last = nix::Error::EBUSY;
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            Err(e) => {
                last = e;
                break;
            }
        }
    }
    Err(Error::io("unmounting the image drive at", dir, None, last.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 8:1 / /boot/efi rw,relatime shared:2 - vfat /dev/sda1 rw,fmask=0077
25 22 7:1 / /mnt/my\\040disk ro,relatime - ext4 /dev/loop0p1 ro
26 22 0:45 / /mnt/btr rw,relatime shared:5 - btrfs /dev/loop1p2 rw,space_cache=v2,subvolid=5
27 22 8:17 / /mnt/bindro ro,relatime - ext4 /dev/sdb1 rw
garbage line
28 22 x:y / /bad rw - ext4 /dev/sdc rw
";

    #[test]
    fn parses_sample() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].devno, makedev(8, 2));
        assert_eq!(m[0].mountpoint, PathBuf::from("/"));
        assert_eq!(m[0].source, "/dev/sda2");
        assert_eq!(m[0].fstype, "ext4");
        assert!(m[0].read_write);
        assert_eq!(m[1].fstype, "proc");
        assert_eq!(m[3].mountpoint, PathBuf::from("/mnt/my disk"));
        assert!(!m[3].read_write);
        assert_eq!(m[4].fstype, "btrfs");
        assert_eq!(major(m[4].devno), 0);
        // A read-only bind of a filesystem that is writable elsewhere.
        assert!(m[5].read_write);
    }

    #[test]
    fn optional_fields_vary() {
        let m = parse_mountinfo("30 22 8:3 / /x rw shared:1 master:2 propagate_from:3 - xfs /dev/sda3 rw\n");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].fstype, "xfs");
        assert_eq!(m[0].source, "/dev/sda3");
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\999"), "\\999");
        assert_eq!(unescape(""), "");
    }

    #[test]
    fn parses_swaps() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sda3                               partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file                           file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), vec![PathBuf::from("/dev/sda3"), PathBuf::from("/swap file")]);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn reads_live_tables() {
        let m = mounts().unwrap();
        assert!(m.iter().any(|m| m.mountpoint == Path::new("/")));
        swap_devices().unwrap();
    }

    #[test]
    fn anonymous_devno_maps_through_mounts() {
        let mut m = parse_mountinfo(SAMPLE);
        m[4].source_devno = Some(makedev(259, 2));
        assert_eq!(block_devno_for_st_dev(makedev(8, 1), &m), Some(makedev(8, 1)));
        assert_eq!(block_devno_for_st_dev(makedev(0, 45), &m), Some(makedev(259, 2)));
        assert_eq!(block_devno_for_st_dev(makedev(0, 21), &m), None);
    }
}
