//! After a restore or clone with `--grow-last`: the filesystem of the
//! grown last partition grown to fill it, offline, with the filesystem's
//! own tool — ext2/3/4 with resize2fs (once `e2fsck -fn` finds it clean),
//! NTFS with ntfsresize, XFS and btrfs mounted on a directory of their own
//! (xfs_growfs, `btrfs filesystem resize max`), an LVM2 physical volume
//! with pvresize (its volume group gains the room as free extents; LVM's
//! backups and archives are not written). Any other content keeps its
//! size, and the report says so and what to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

use crate::device::{Disk, DiskKind, loopdev};
use crate::error::Error;
use crate::table::{self, DiskLayout};
use crate::units::human_bytes;

/// What became of the filesystem of the partition `--grow-last` grew.
#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    /// The partition's number.
    pub partition: u32,
    /// Its filesystem, as blkid names it (none: not one klon knows).
    pub fstype: Option<String>,
    /// Its size before and after (the partition's).
    pub from: u64,
    /// The partition's new size.
    pub to: u64,
    /// Whether the filesystem now fills the partition.
    pub grown: bool,
    /// What was done, or why not and what to do.
    pub note: String,
}

/// Grows the filesystem of the last partition of `layout` (the source's)
/// on `target`, when `--grow-last` made that partition larger there: the
/// filesystem found there now (whatever the image recorded).
/// None when it did not grow (or there is no table).
pub fn grow_last(target: &Disk, layout: &DiskLayout) -> Option<Growth> {
    let grown = table::layout_for_target(layout, target.size, true);
    let (old, new) = (layout.partitions.last()?, grown.partitions.last()?);
    if new.size <= old.size || new.number != old.number {
        return None;
    }
    let growth = grow_partition(target, old.number, new.start, old.size, new.size);
    if target.kind == DiskKind::BlockDevice {
        // What the kernel cached of the partition (udev's probe after the
        // table was re-read) predates the growth: have it read again.
        let _ = target.reread_table();
    }
    Some(growth)
}

/// Whether klon grows a filesystem of type `fstype` (see [`grow`]).
pub fn grows(fstype: &str) -> bool {
    matches!(fstype, "ext2" | "ext3" | "ext4" | "ntfs" | "xfs" | "btrfs" | "LVM2_member")
}

/// Grows the filesystem found in partition `number` of `target`, which
/// was `from` bytes and is now `to` bytes from byte `start`, to fill it.
pub fn grow_partition(target: &Disk, number: u32, start: u64, from: u64, to: u64) -> Growth {
    let fstype = crate::fs::probe::probe(target, start, to).map(|f| f.fstype);
    let what = format!("partition {number} grew from {} to {}", human_bytes(from), human_bytes(to));
    let (grown, note) = match grow(&target.path, start, to, fstype.as_deref()) {
        Ok(done) => (true, format!("{what}; {done}")),
        Err(why) => (false, format!("{what}, but its filesystem keeps its size: {why}")),
    };
    Growth { partition: number, fstype, from, to, grown, note }
}

/// Grows the filesystem `fstype` that starts at byte `start` of `target`
/// to `len` bytes; says what was done, or why not and what to do.
fn grow(target: &Path, start: u64, len: u64, fstype: Option<&str>) -> std::result::Result<String, String> {
    let fs = fstype.unwrap_or("");
    let tool = match fs {
        "ext2" | "ext3" | "ext4" => "resize2fs",
        "ntfs" => "ntfsresize",
        "xfs" => "xfs_growfs",
        "btrfs" => "btrfs",
        "LVM2_member" => "pvresize",
        "" => return Err("it holds no filesystem klon knows".into()),
        other => return Err(format!("klon does not grow {other} filesystems (grow it with its own tools)")),
    };
    let dev = loopdev::attach(target, start, len, false).map_err(|e| e.to_string())?;
    let node = dev.path.to_string_lossy().into_owned();
    let by_hand = |why: String| format!("{why}; to grow it by hand, run {tool} on the restored partition");
    match fs {
        "LVM2_member" => {
            // Only this device is looked at (not the source disk, which holds
            // a PV with the same UUID), and the host's /etc/lvm is left alone.
            let config = "backup { backup = 0 archive = 0 } activation { udev_sync = 0 udev_rules = 0 } \
                          devices { obtain_device_list_from_udev = 0 external_device_info_source = \"none\" }";
            let out = Command::new("pvresize")
                .args(["--config", config, "--devices", &node, &node])
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| by_hand(format!("cannot run pvresize ({e}): install lvm2")))?;
            if !out.status.success() {
                let said = String::from_utf8_lossy(&out.stderr);
                return Err(by_hand(format!("pvresize failed: {}", said.trim().lines().last().unwrap_or(""))));
            }
            Ok("pvresize grew the LVM2 physical volume to fill it: its volume group has the new room as free extents"
                .into())
        }
        "ntfs" => {
            run("ntfsresize", &["--no-progress-bar", "--force", &node]).map_err(by_hand)?;
            Ok("ntfsresize grew its NTFS to fill it (Windows checks the volume at its next boot)".into())
        }
        "xfs" | "btrfs" => {
            let dir = Mounted::new(&node, fs).map_err(by_hand)?;
            let mnt = dir.0.to_string_lossy().into_owned();
            if fs == "xfs" {
                run("xfs_growfs", &[&mnt]).map_err(by_hand)?;
            } else {
                run("btrfs", &["filesystem", "resize", "max", &mnt]).map_err(by_hand)?;
            }
            dir.unmount().map_err(by_hand)?;
            Ok(format!("{tool} grew its {fs} to fill it (mounted on a directory of klon's own meanwhile)"))
        }
        _ => {
            run("e2fsck", &["-fn", &node])
                .map_err(|why| by_hand(format!("e2fsck -fn finds it needs checking first ({why})")))?;
            run("resize2fs", &["-f", &node]).map_err(by_hand)?;
            run("e2fsck", &["-fn", &node]).map_err(|why| format!("after resize2fs, e2fsck -fn says: {why}"))?;
            Ok(format!("resize2fs grew its {fs} to fill it (e2fsck -fn clean before and after)"))
        }
    }
}

/// Runs `program` with `args`; its output when it fails.
fn run(program: &str, args: &[&str]) -> std::result::Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e} (is it installed?)"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let said = if said.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_string() } else { said };
    let tail: String = said.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" / ");
    Err(format!("{program} {} failed ({}): {tail}", args.join(" "), out.status))
}

/// A filesystem mounted on a directory of its own, unmounted (and the
/// directory removed) when dropped.
struct Mounted(PathBuf, bool);

impl Mounted {
    fn new(node: &str, fs: &str) -> std::result::Result<Mounted, String> {
        let dir = std::env::temp_dir().join(format!("klon-grow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, None, e).to_string())?;
        let mnt = dir.to_string_lossy().into_owned();
        if let Err(why) = run("mount", &["-t", fs, node, &mnt]) {
            let _ = std::fs::remove_dir(&dir);
            return Err(why);
        }
        Ok(Mounted(dir, true))
    }

    fn unmount(mut self) -> std::result::Result<(), String> {
        self.1 = false;
        run("umount", &[&self.0.to_string_lossy()])?;
        let _ = std::fs::remove_dir(&self.0);
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.1 {
            let _ = run("umount", &[&self.0.to_string_lossy()]);
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}
