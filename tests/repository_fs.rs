//! A repository on the drives people carry: FAT32 and exFAT, on loop
//! devices, mounted through FUSE (this kernel mounts neither itself; the
//! live system's kernel does, with the same files). Two snapshots, restore
//! byte for byte, check of every byte, forget and prune; the filesystem's
//! own checker finds it clean afterwards.

mod common;

use std::path::Path;
use std::process::Command;

use common::disks::*;
use common::loop_device::LoopDevice;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A FUSE mount, unmounted on drop.
struct Fuse(std::path::PathBuf);

impl Drop for Fuse {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("umount").arg(&self.0).status().is_ok_and(|st| st.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        eprintln!("warning: could not unmount {}", self.0.display());
    }
}

fn source(t: &TempDir) -> std::path::PathBuf {
    let (disk, files) = (t.join("src.img"), t.join("files"));
    std::fs::create_dir(&files).unwrap();
    for i in 0..8u64 {
        std::fs::write(files.join(format!("r{i}")), random_bytes(60 + i, 1 << 20)).unwrap();
        std::fs::write(files.join(format!("t{i}")), text_bytes(70 + i, 400_000)).unwrap();
    }
    blank_file(&disk, 64 * MIB);
    run_with_input("sfdisk", &["-q", s(&disk)], "label: gpt\nstart=2048, size=98304, type=L\n");
    run("mke2fs", &["-q", "-t", "ext4", "-d", s(&files), "-E", "offset=1048576", s(&disk), "48M"]);
    disk
}

fn round_trip_on(fs: &str) {
    require_root!();
    let t = TempDir::new(&format!("repo-{fs}"));
    let src = source(&t);
    let drive = t.join("drive.img");
    blank_file(&drive, 256 * MIB);
    let lo = LoopDevice::attach_without_partitions(&drive);
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    match fs {
        "exfat" => {
            run("mkfs.exfat", &[s(&lo.path)]);
            run("mount.exfat-fuse", &[s(&lo.path), s(&mnt)]);
        }
        _ => {
            run("mkfs.vfat", &["-F", "32", s(&lo.path)]);
            run("fusefat", &["-o", "rw+", s(&lo.path), s(&mnt)]);
        }
    }
    let mounted = Fuse(mnt.clone());
    let repo = mnt.join("laptop");
    ok(&klon(&["backup", "--quiet", "--repo", s(&src), s(&repo)]));
    // Bytes outside the partition (read raw, as boot code would be) change.
    write_at(&src, 52 * MIB, &random_bytes(99, (1 << 20) as usize));
    ok(&klon(&["backup", "--quiet", s(&src), s(&repo)]));
    let out = t.join("out.img");
    let o = klon(&["restore", "--yes", s(&repo), s(&out)]);
    ok(&o);
    assert_same(&src, &out, 0, 64 * MIB, &format!("restore from a repository on {fs}"));
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", "--prune", s(&repo)]));
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    drop(mounted);
    match fs {
        "exfat" => run("fsck.exfat", &["-n", s(&lo.path)]),
        _ => run("fsck.fat", &["-n", s(&lo.path)]),
    };
    drop(lo);
}

#[test]
fn repository_on_exfat() {
    round_trip_on("exfat");
}

#[test]
fn repository_on_fat32() {
    round_trip_on("fat32");
}

/// A repository on a read-only filesystem (a write-protected drive; the
/// live system mounts the image drive read-only to restore): restore,
/// verify and check read it without a lock file, and what would change it
/// fails with exit 3 naming the read-only drive. Before, the lock file's
/// write failed every one of them (the live system's unattended restore
/// from a repository never worked).
#[test]
fn a_repository_on_a_read_only_drive_restores_verifies_and_checks() {
    require_root!();
    let t = TempDir::new("repo-ro");
    let src = source(&t);
    let drive = t.join("drive.img");
    blank_file(&drive, 128 * MIB);
    run("mkfs.ext4", &["-q", s(&drive)]);
    let lo = LoopDevice::attach_without_partitions(&drive);
    let mnt = t.join("mnt");
    let mounted = common::disks::Mounted::new(&lo.path, &mnt, "rw");
    let repo = mnt.join("laptop");
    ok(&klon(&["backup", "--quiet", "--repo", s(&src), s(&repo)]));
    write_at(&src, 52 * MIB, &random_bytes(98, (1 << 20) as usize));
    ok(&klon(&["backup", "--quiet", s(&src), s(&repo)]));
    run("mount", &["-o", "remount,ro", s(&mnt)]);
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_same(&src, &out, 0, 64 * MIB, "restore from a read-only drive");
    ok(&klon(&["verify", "--quiet", s(&repo)]));
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    let o = klon(&["forget", "--keep-last", "1", "--prune", s(&repo)]);
    fails_with(&o, 3, &["read-only"]);
    let o = klon(&["backup", "--quiet", s(&src), s(&repo)]);
    fails_with(&o, 3, &["read-only"]);
    drop(mounted);
    drop(lo);
}
