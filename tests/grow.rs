//! `klon restore --grow-last` onto a larger disk grows the last
//! partition's filesystem with it: for ext4, XFS, btrfs and NTFS the
//! restored filesystem passes its own checker, reports (by its own tools)
//! a size that fills the grown partition, and holds the same files. A
//! partition without a filesystem klon knows keeps its content, with a
//! warning saying nothing in it was grown.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const START: u64 = MIB;

/// The test's files, in `dir`.
fn populate(dir: &Path) {
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    for (i, size) in [0usize, 1, 4097, 70_000, 3 << 20].into_iter().enumerate() {
        std::fs::write(dir.join(format!("a/file{i}")), random_bytes(i as u64 + 40, size)).unwrap();
    }
    std::fs::write(dir.join("a/b/text"), text_bytes(5, 200_000)).unwrap();
}

/// A GPT disk of `disk` bytes whose one partition (from 1 MiB, to the end)
/// holds the filesystem image `fs`.
fn disk_with(path: &Path, disk: u64, fs: &Path) {
    blank_file(path, disk);
    run("sgdisk", &["-n", "1:2048:0", "-t", "1:8300", s(path)]);
    let (parts, sector) = sfdisk_parts(path);
    assert_eq!(parts[0].start * sector, START);
    let bytes = std::fs::read(fs).unwrap();
    assert!(bytes.len() as u64 <= parts[0].size * sector);
    write_at(path, START, &bytes);
}

/// Restores `disk`'s image onto a target twice its size with --grow-last;
/// returns the grown partition as a file and klon's JSON report.
fn backup_and_grow(t: &TempDir, disk: &Path) -> (PathBuf, serde_json::Value) {
    let (img, target) = (t.join("image"), t.join("target.img"));
    ok(&klon(&["backup", "--quiet", s(disk), s(&img)]));
    let size = std::fs::metadata(disk).unwrap().len();
    garbage_file(&target, 2 * size);
    let o = klon(&["--json", "restore", "--yes", "--grow-last", s(&img), s(&target)]);
    ok(&o);
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // The partition as the restored table has it (sfdisk, not klon).
    let (parts, sector) = sfdisk_parts(&target);
    let (start, len) = (parts[0].start * sector, parts[0].size * sector);
    assert_eq!(start, START);
    assert!(len > 2 * size - 4 * MIB, "the partition was not grown: {len} bytes");
    let part = t.join("part.img");
    blank_file(&part, len);
    let f = std::fs::File::open(&target).unwrap();
    let out = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < len {
        let n = MIB.min(len - off) as usize;
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], start + off).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&out, &buf[..n], off).unwrap();
        off += n as u64;
    }
    (part, report)
}

fn assert_grown(report: &serde_json::Value, fstype: &str) {
    let g = &report["growth"];
    assert_eq!(g["grown"], true, "{report}");
    assert_eq!(g["fstype"], fstype, "{report}");
    assert_eq!(g["partition"], 1, "{report}");
}

/// The files under `mounted` are those `populate` writes.
fn assert_files(t: &TempDir, mounted: &Path) {
    let expected = t.join("expected");
    populate(&expected);
    run("diff", &["-r", "--no-dereference", "-x", "lost+found", s(&expected), s(mounted)]);
}

#[test]
fn ext4_grows_with_its_partition() {
    require_root!();
    let t = TempDir::new("grow-ext4");
    let src = t.join("src");
    populate(&src);
    let fs = t.join("fs.img");
    run("mke2fs", &["-q", "-t", "ext4", "-d", s(&src), s(&fs), "40M"]);
    let disk = t.join("disk.img");
    disk_with(&disk, 48 * MIB, &fs);
    let (part, report) = backup_and_grow(&t, &disk);
    assert_grown(&report, "ext4");
    run("e2fsck", &["-fn", s(&part)]);
    let sb = run("dumpe2fs", &["-h", s(&part)]);
    let bytes = number_after(&sb, "Block count:") * number_after(&sb, "Block size:");
    let len = std::fs::metadata(&part).unwrap().len();
    assert!(bytes > len - MIB && bytes <= len, "ext4 is {bytes} bytes in a {len}-byte partition");
    let dir = t.join("mnt");
    let _m = Mounted::new(&part, &dir, "ro,loop");
    assert_files(&t, &dir);
}

#[test]
fn xfs_grows_with_its_partition() {
    require_root!();
    let t = TempDir::new("grow-xfs");
    let fs = t.join("fs.img");
    blank_file(&fs, 300 * MIB);
    run("mkfs.xfs", &["-q", "-f", s(&fs)]);
    {
        let dir = t.join("fill");
        let _m = Mounted::new(&fs, &dir, "loop");
        populate(&dir);
    }
    let disk = t.join("disk.img");
    disk_with(&disk, 302 * MIB, &fs);
    let (part, report) = backup_and_grow(&t, &disk);
    assert_grown(&report, "xfs");
    run("xfs_repair", &["-n", "-f", s(&part)]);
    let sb = run("xfs_db", &["-r", "-c", "sb 0", "-c", "print dblocks blocksize", s(&part)]);
    let bytes = number_after(&sb, "dblocks =") * number_after(&sb, "blocksize =");
    let len = std::fs::metadata(&part).unwrap().len();
    assert!(bytes > len - 4 * MIB && bytes <= len, "XFS is {bytes} bytes in a {len}-byte partition");
    let dir = t.join("mnt");
    let _m = Mounted::new(&part, &dir, "ro,loop,norecovery");
    assert_files(&t, &dir);
}

#[test]
fn btrfs_grows_with_its_partition() {
    require_root!();
    let t = TempDir::new("grow-btrfs");
    let src = t.join("src");
    populate(&src);
    let fs = t.join("fs.img");
    blank_file(&fs, 128 * MIB);
    run("mkfs.btrfs", &["-q", "--rootdir", s(&src), s(&fs)]);
    let disk = t.join("disk.img");
    disk_with(&disk, 130 * MIB, &fs);
    let (part, report) = backup_and_grow(&t, &disk);
    assert_grown(&report, "btrfs");
    run("btrfs", &["check", "--readonly", s(&part)]);
    let sb = run("btrfs", &["inspect-internal", "dump-super", s(&part)]);
    let bytes = number_after(&sb, "dev_item.total_bytes");
    let len = std::fs::metadata(&part).unwrap().len();
    assert!(bytes > len - MIB && bytes <= len, "btrfs is {bytes} bytes in a {len}-byte partition");
    let dir = t.join("mnt");
    let _m = Mounted::new(&part, &dir, "ro,loop");
    assert_files(&t, &dir);
}

#[test]
fn ntfs_grows_with_its_partition() {
    require_root!();
    let t = TempDir::new("grow-ntfs");
    let fs = t.join("fs.img");
    blank_file(&fs, 40 * MIB);
    run("mkntfs", &["-q", "-F", "-Q", s(&fs)]);
    let dir = t.join("fill");
    ntfs_mounted(&fs, &dir, false, || populate(&dir));
    let disk = t.join("disk.img");
    disk_with(&disk, 48 * MIB, &fs);
    let (part, report) = backup_and_grow(&t, &disk);
    assert_grown(&report, "ntfs");
    run("ntfsfix", &["-n", s(&part)]);
    let info = run("ntfsresize", &["--info", "--force", "--no-progress-bar", s(&part)]);
    let bytes = number_after(&info, "Current volume size:");
    let len = std::fs::metadata(&part).unwrap().len();
    assert!(bytes > len - MIB && bytes <= len, "NTFS is {bytes} bytes in a {len}-byte partition");
    let mnt = t.join("mnt");
    ntfs_mounted(&part, &mnt, true, || assert_files(&t, &mnt));
}

#[test]
fn a_partition_without_a_filesystem_keeps_its_content_and_says_so() {
    let t = TempDir::new("grow-raw");
    let fs = t.join("raw.img");
    std::fs::write(&fs, random_bytes(77, 8 * MIB as usize)).unwrap();
    let disk = t.join("disk.img");
    disk_with(&disk, 16 * MIB, &fs);
    let (img, target) = (t.join("image"), t.join("target.img"));
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));
    garbage_file(&target, 32 * MIB);
    let o = klon(&["restore", "--yes", "--grow-last", s(&img), s(&target)]);
    ok(&o);
    let said = stderr(&o);
    assert!(said.contains("warning: partition 1 grew from") && said.contains("no filesystem klon knows"), "{said}");
    assert_same(&disk, &target, START, 8 * MIB, "the partition's content");
}
