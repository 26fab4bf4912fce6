//! `klon restore` onto a disk of another size with the partitions laid out
//! anew. Smaller: partitions after one that shrinks move down, ext4 and
//! NTFS are shrunk by their own tools, and every filesystem comes back
//! clean by its own checker with the same files; before anything is
//! written, a target the partitions cannot fit even shrunk is refused,
//! saying by how much, and is left untouched. Larger with `--grow-all`:
//! every partition whose filesystem klon grows takes its share of the new
//! room, the others keep their size and move.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::disks::*;
use common::loop_device::LoopDevice;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The test's files, in `dir`: a few MiB, some of it incompressible.
fn populate(dir: &Path) {
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    for (i, size) in [0usize, 1, 4097, 70_000, 3 << 20].into_iter().enumerate() {
        std::fs::write(dir.join(format!("a/file{i}")), random_bytes(i as u64 + 60, size)).unwrap();
    }
    std::fs::write(dir.join("a/b/text"), text_bytes(6, 300_000)).unwrap();
}

/// A filesystem image of `len` bytes at `path` holding `populate`'s files:
/// `ext4` (its files written last, after a filler was deleted, so they lie
/// at its end and resize2fs must move them), `ntfs` or `vfat`.
fn make_fs(t: &TempDir, kind: &str, path: &Path, len: u64) {
    make_fs_with(t, kind, path, len, 0);
}

/// [`make_fs`], with a file `keep` of `extra` incompressible bytes besides
/// (a filesystem that is nearly full cannot shrink).
fn make_fs_with(t: &TempDir, kind: &str, path: &Path, len: u64, extra: usize) {
    let src = t.join("src");
    if !src.exists() {
        populate(&src);
    }
    blank_file(path, len);
    match kind {
        "ext4" => {
            run("mke2fs", &["-q", "-t", "ext4", s(path)]);
            let dir = t.join("fill-ext4");
            let _m = Mounted::new(path, &dir, "loop");
            let filler = dir.join("filler");
            let free = len * 6 / 10;
            std::fs::write(&filler, vec![0x5Au8; free as usize]).unwrap();
            run("sync", &[]);
            run("cp", &["-a", &format!("{}/.", s(&src)), s(&dir)]);
            std::fs::remove_file(&filler).unwrap();
        }
        "ntfs" => {
            run("mkntfs", &["-q", "-F", "-Q", s(path)]);
            let dir = t.join("fill-ntfs");
            ntfs_mounted(path, &dir, false, || {
                run("cp", &["-a", &format!("{}/.", s(&src)), s(&dir)]);
                if extra > 0 {
                    std::fs::write(dir.join("keep"), random_bytes(99, extra)).unwrap();
                }
            });
        }
        "btrfs" => {
            run("mkfs.btrfs", &["-q", "--rootdir", s(&src), s(path)]);
        }
        "vfat" => {
            let bits = if len >= 64 * MIB { "32" } else { "16" };
            run("mkfs.vfat", &["-F", bits, s(path)]);
            run_env("mcopy", &["-s", "-i", s(path), &format!("{}/a", s(&src)), "::/"], &[("MTOOLS_SKIP_CHECK", "1")]);
        }
        other => panic!("no {other}"),
    }
}

/// The bytes of partition `i` (from 0) of `disk`, as sfdisk reads its
/// table, copied to a file of their own.
fn partition_file(t: &TempDir, disk: &Path, i: usize, name: &str) -> (PathBuf, SfPart) {
    let (parts, sector) = sfdisk_parts(disk);
    let p = parts[i].clone();
    let out = t.join(name);
    blank_file(&out, p.size * sector);
    run(
        "dd",
        &[
            &format!("if={}", s(disk)),
            &format!("of={}", s(&out)),
            "bs=512",
            &format!("skip={}", p.start * sector / 512),
            &format!("count={}", p.size * sector / 512),
            "conv=notrunc",
            "status=none",
        ],
    );
    (out, p)
}

/// The files of `fs` (a partition's bytes, of `kind`) are `populate`'s.
fn assert_files(t: &TempDir, kind: &str, fs: &Path) {
    let expected = t.join("expected");
    if !expected.exists() {
        populate(&expected);
    }
    let dir = t.join(&format!("check-{}", fs.file_name().unwrap().to_str().unwrap()));
    let diff =
        |dir: &Path| run("diff", &["-r", "--no-dereference", "-x", "lost+found", "-x", "keep", s(&expected), s(dir)]);
    match kind {
        "ext4" | "btrfs" => {
            let _m = Mounted::new(fs, &dir, "ro,loop");
            diff(&dir);
        }
        "ntfs" => ntfs_mounted(fs, &dir, true, || {
            diff(&dir);
        }),
        "vfat" => {
            std::fs::create_dir_all(&dir).unwrap();
            run_env("mcopy", &["-s", "-i", s(fs), "::/a", s(&dir)], &[("MTOOLS_SKIP_CHECK", "1")]);
            run("diff", &["-r", s(&expected.join("a")), s(&dir.join("a"))]);
        }
        other => panic!("no {other}"),
    }
}

/// The filesystem's own checker finds `fs` clean.
fn assert_clean(kind: &str, fs: &Path) {
    match kind {
        "ext4" => {
            run("e2fsck", &["-fn", s(fs)]);
        }
        "ntfs" => {
            run("ntfsfix", &["-n", s(fs)]);
            run("ntfsresize", &["--check", "--no-progress-bar", s(fs)]);
        }
        "vfat" => {
            run("fsck.fat", &["-n", s(fs)]);
        }
        "btrfs" => {
            run("btrfs", &["check", "--readonly", s(fs)]);
        }
        other => panic!("no {other}"),
    }
}

/// Restores `disk`'s image onto a new target of `size` bytes (garbage
/// before); klon's JSON report.
fn restore_smaller(t: &TempDir, disk: &Path, size: u64) -> (PathBuf, serde_json::Value) {
    let (img, target) = (t.join("image"), t.join("target.img"));
    ok(&klon(&["backup", "--quiet", s(disk), s(&img)]));
    garbage_file(&target, size);
    let o = klon(&["--json", "restore", "--yes", s(&img), s(&target)]);
    ok(&o);
    (target, serde_json::from_str(&stdout(&o)).unwrap())
}

#[test]
fn gpt_disk_with_esp_ntfs_and_ext4_restores_to_a_smaller_disk() {
    require_root!();
    let t = TempDir::new("shrink-gpt");
    let disk = t.join("disk.img");
    blank_file(&disk, 400 * MIB);
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+64M",
            "-t",
            "1:ef00",
            "-c",
            "1:esp",
            "-n",
            "2:0:+120M",
            "-t",
            "2:0700",
            "-c",
            "2:data",
            "-n",
            "3:0:0",
            "-t",
            "3:8300",
            "-c",
            "3:root",
            s(&disk),
        ],
    );
    let (parts, sector) = sfdisk_parts(&disk);
    for (p, kind) in parts.iter().zip(["vfat", "ntfs", "ext4"]) {
        let fs = t.join(&format!("{kind}.img"));
        make_fs(&t, kind, &fs, p.size * sector);
        write_at(&disk, p.start * sector, &std::fs::read(&fs).unwrap());
    }
    let before = run("sfdisk", &["-d", s(&disk)]);

    // 160 MiB: the ext4 alone cannot give the 240 MiB; the NTFS gives the rest.
    let (target, report) = restore_smaller(&t, &disk, 160 * MIB);
    assert_eq!(report["verified"], true, "{report}");
    let shrunk: Vec<String> =
        report["resized"].as_array().unwrap().iter().map(|g| g["note"].as_str().unwrap().to_string()).collect();
    assert_eq!(shrunk.len(), 2, "{report}");
    assert!(
        shrunk[0].starts_with("partition 2 shrank") && shrunk[0].contains("ntfsresize shrank its ntfs"),
        "{report}"
    );
    assert!(shrunk[1].starts_with("partition 3 shrank") && shrunk[1].contains("resize2fs shrank its ext4"), "{report}");

    // The table: sgdisk finds it sound, names and GUIDs kept, the ESP in place.
    let verified = run("sgdisk", &["-v", s(&target)]);
    assert!(verified.contains("No problems found"), "{verified}");
    let after = run("sfdisk", &["-d", s(&target)]);
    let field = |dump: &str, n: usize, key: &str| -> String {
        let line = dump.lines().filter(|l| l.contains(" : start=")).nth(n).unwrap().to_string();
        line.split(", ").find_map(|f| f.trim().strip_prefix(key)).unwrap().trim().to_string()
    };
    for n in 0..3 {
        for key in ["uuid=", "name=", "type="] {
            assert_eq!(field(&before, n, key), field(&after, n, key), "partition {} {key}", n + 1);
        }
    }
    let (new, _) = sfdisk_parts(&target);
    assert_eq!((new[0].start, new[0].size), (parts[0].start, parts[0].size), "the ESP keeps its place and size");
    assert!(new[1].size < parts[1].size && new[2].size < parts[2].size, "{after}");
    assert_eq!(new[2].start, new[1].start + new[1].size, "the ext4 moved down to follow the NTFS");

    for (i, kind) in ["vfat", "ntfs", "ext4"].into_iter().enumerate() {
        let (fs, _) = partition_file(&t, &target, i, &format!("restored-{kind}.img"));
        assert_clean(kind, &fs);
        assert_files(&t, kind, &fs);
    }
    // The shrunk filesystems fill their partitions, as their tools say.
    let (ext4, p3) = partition_file(&t, &target, 2, "p3.img");
    let sb = run("dumpe2fs", &["-h", s(&ext4)]);
    let bytes = number_after(&sb, "Block count:") * number_after(&sb, "Block size:");
    assert!(
        bytes <= p3.size * sector && bytes > p3.size * sector - MIB,
        "ext4 is {bytes} bytes in {} sectors",
        p3.size
    );
}

#[test]
fn mbr_disk_moves_its_logical_partitions_and_fixes_ntfs_hidden_sectors() {
    require_root!();
    let t = TempDir::new("shrink-mbr");
    let disk = t.join("disk.img");
    blank_file(&disk, 300 * MIB);
    // p1 ext4 (bootable, 200 MiB), p2 extended: p5 NTFS (40 MiB, nearly
    // full: it cannot give room, so it only moves), p6 ext4 (the rest).
    run_with_input(
        "sfdisk",
        &["-q", s(&disk)],
        "label: dos\nstart=2048, size=200M, type=83, bootable\ntype=5\nsize=40M, type=7\ntype=83\n",
    );
    let (parts, sector) = sfdisk_parts(&disk);
    assert_eq!(parts.len(), 4, "{parts:?}");
    // Boot code in the MBR and data in the gap after it: kept.
    let gap = random_bytes(9, 4096);
    write_at(&disk, 0, &gap[..440]);
    write_at(&disk, 512, &gap);
    for (p, kind, extra) in [(&parts[0], "ext4", 0), (&parts[2], "ntfs", 28 << 20), (&parts[3], "ext4", 0)] {
        let fs = t.join(&format!("{kind}-{}.img", p.start));
        make_fs_with(&t, kind, &fs, p.size * sector, extra);
        write_at(&disk, p.start * sector, &std::fs::read(&fs).unwrap());
    }
    // mkntfs on a file leaves hidden sectors 0: set them as on a disk, in
    // the boot sector and in its backup after the volume's last sector.
    let ntfs = parts[2].start * sector;
    let sectors = u64::from_le_bytes(read_at(&disk, ntfs + 0x28, 8).try_into().unwrap());
    for at in [ntfs, ntfs + sectors * 512] {
        write_at(&disk, at + 0x1C, &(parts[2].start as u32).to_le_bytes());
    }

    let (target, report) = restore_smaller(&t, &disk, 180 * MIB);
    let shrunk: Vec<&str> = report["resized"].as_array().unwrap().iter().map(|g| g["note"].as_str().unwrap()).collect();
    assert_eq!(shrunk.len(), 2, "{report}");
    assert!(shrunk[0].starts_with("partition 1 shrank") && shrunk[0].contains("resize2fs"), "{report}");
    assert!(shrunk[1].starts_with("partition 6 shrank") && shrunk[1].contains("resize2fs"), "{report}");
    let (new, _) = sfdisk_parts(&target);
    assert_eq!(new.len(), 4, "{new:?}");
    assert_eq!(new[0].start, parts[0].start, "p1 keeps its start");
    assert!(new[0].size < parts[0].size && new[3].size < parts[3].size, "{new:?}");
    assert_eq!(new[2].size, parts[2].size, "the NTFS keeps its size");
    assert!(new[2].start < parts[2].start, "the NTFS moved down: {new:?}");
    let dump = run("sfdisk", &["-d", s(&target)]);
    assert!(dump.lines().any(|l| l.contains("target.img1 ") && l.contains("bootable")), "{dump}");
    assert_eq!(read_at(&target, 0, 440), gap[..440].to_vec(), "the boot code");
    assert_eq!(read_at(&target, 512, 4096), gap, "the gap after the MBR");
    for (i, kind) in [(0, "ext4"), (2, "ntfs"), (3, "ext4")] {
        let (fs, p) = partition_file(&t, &target, i, &format!("restored-{i}.img"));
        assert_clean(kind, &fs);
        assert_files(&t, kind, &fs);
        if kind == "ntfs" {
            // It moved: its boot sector says where it is now.
            for at in [0, sectors * 512] {
                let hidden = u32::from_le_bytes(read_at(&fs, at + 0x1C, 4).try_into().unwrap());
                assert_eq!(u64::from(hidden), p.start, "NTFS hidden sectors at byte {at}");
            }
        }
    }
}

#[test]
fn a_target_too_small_even_shrunk_is_refused_before_writing() {
    require_root!();
    let t = TempDir::new("shrink-refused");
    let disk = t.join("disk.img");
    blank_file(&disk, 240 * MIB);
    run_with_input("sfdisk", &["-q", s(&disk)], "label: gpt\nstart=2048, size=100M\nsize=128M\n");
    let (parts, sector) = sfdisk_parts(&disk);
    for (p, kind) in parts.iter().zip(["ext4", "btrfs"]) {
        let fs = t.join(&format!("{kind}.img"));
        make_fs(&t, kind, &fs, p.size * sector);
        write_at(&disk, p.start * sector, &std::fs::read(&fs).unwrap());
    }
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));

    // The btrfs (last) is not shrunk by klon, and the ext4 cannot give 100 MiB.
    let target = t.join("target.img");
    garbage_file(&target, 140 * MIB);
    let before = std::fs::read(&target).unwrap();
    let o = klon(&["restore", "--yes", s(&img), s(&target)]);
    fails_with(
        &o,
        5,
        &[
            "target too small",
            "do not fit even shrunk",
            "short",
            "partition 2 (btrfs",
            "klon does not shrink btrfs",
            "partition 1 (ext4",
        ],
    );
    assert!(std::fs::read(&target).unwrap() == before, "a refused restore wrote to the target");

    // A target the ext4 can make room on: only the ext4 shrinks; the btrfs moves.
    garbage_file(&target, 200 * MIB);
    ok(&klon(&["restore", "--yes", s(&img), s(&target)]));
    let (new, _) = sfdisk_parts(&target);
    assert_eq!(new[1].start, new[0].start + new[0].size, "{new:?}");
    assert_eq!(new[1].size, parts[1].size, "{new:?}");
    for (i, kind) in [(0, "ext4"), (1, "btrfs")] {
        let (fs, _) = partition_file(&t, &target, i, &format!("restored-{i}.img"));
        assert_clean(kind, &fs);
        assert_files(&t, kind, &fs);
    }

    // A damaged image: the restore stops, says so, and leaves no table
    // that could pass for a good disk.
    let data = img.join("p1.000");
    let len = std::fs::metadata(&data).unwrap().len();
    let byte = read_at(&data, len / 2, 1)[0];
    write_at(&data, len / 2, &[!byte]);
    let o = klon(&["restore", "--yes", s(&img), s(&target)]);
    assert!(!o.status.success(), "a damaged image restored: {}", stderr(&o));
    assert!(stderr(&o).contains("wiped"), "{}", stderr(&o));
    let table = Command::new("sfdisk").args(["-d", s(&target)]).output().unwrap();
    assert!(!table.status.success(), "a partition table is left: {}", String::from_utf8_lossy(&table.stdout));
}

#[test]
fn grow_all_gives_every_growable_partition_its_share() {
    require_root!();
    let t = TempDir::new("grow-all");
    let disk = t.join("disk.img");
    blank_file(&disk, 120 * MIB);
    // p1 ext4, p2 NTFS, p3 FAT (klon does not grow it: it keeps its size
    // and moves), p4 ext4: 32, 32, 16 and 32 MiB.
    run_with_input(
        "sfdisk",
        &["-q", s(&disk)],
        "label: gpt\nstart=2048, size=32M\nsize=32M, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\nsize=16M, type=uefi\nsize=32M\n",
    );
    let (parts, sector) = sfdisk_parts(&disk);
    let kinds = ["ext4", "ntfs", "vfat", "ext4"];
    for (i, (p, kind)) in parts.iter().zip(kinds).enumerate() {
        let fs = t.join(&format!("{kind}-{i}.img"));
        make_fs(&t, kind, &fs, p.size * sector);
        write_at(&disk, p.start * sector, &std::fs::read(&fs).unwrap());
    }
    let (img, target) = (t.join("image"), t.join("target.img"));
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));
    garbage_file(&target, 240 * MIB);
    // Not with --grow-last.
    fails_with(&klon(&["restore", "--yes", "--grow-all", "--grow-last", s(&img), s(&target)]), 2, &["--grow-last"]);
    let o = klon(&["--json", "restore", "--yes", "--grow-all", s(&img), s(&target)]);
    ok(&o);
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let resized = report["resized"].as_array().unwrap();
    let grown: Vec<u64> = resized.iter().map(|g| g["partition"].as_u64().unwrap()).collect();
    assert_eq!(grown, [1, 2, 4], "{report}");
    assert!(resized.iter().all(|g| g["grown"] == true), "{report}");

    let verified = run("sgdisk", &["-v", s(&target)]);
    assert!(verified.contains("No problems found"), "{verified}");
    let (new, _) = sfdisk_parts(&target);
    // The new room (240 MiB less the backup GPT, less the 113 MiB the
    // partitions ended at; whole MiB): a third each for the three of equal size.
    for i in [0, 1, 3] {
        let added = (new[i].size - parts[i].size) * sector;
        assert_eq!(added, 42 * MIB, "partition {} grew by {added} bytes", i + 1);
    }
    assert_eq!(new[2].size, parts[2].size, "the FAT keeps its size");
    for i in 1..4 {
        assert_eq!(new[i].start, new[i - 1].start + new[i - 1].size, "partition {} follows the one before", i + 1);
    }
    for (i, kind) in kinds.into_iter().enumerate() {
        let (fs, p) = partition_file(&t, &target, i, &format!("restored-{i}.img"));
        assert_clean(kind, &fs);
        assert_files(&t, kind, &fs);
        let len = p.size * sector;
        let bytes = match kind {
            "ext4" => {
                let sb = run("dumpe2fs", &["-h", s(&fs)]);
                number_after(&sb, "Block count:") * number_after(&sb, "Block size:")
            }
            "ntfs" => number_after(
                &run("ntfsresize", &["--info", "--force", "--no-progress-bar", s(&fs)]),
                "Current volume size:",
            ),
            _ => continue,
        };
        assert!(bytes > len - MIB && bytes <= len, "partition {}: {kind} is {bytes} bytes in {len}", i + 1);
    }
}

/// The partitions of block device `dev` as sfdisk reads its table: byte
/// offset and length of each, and the sector size it used.
fn device_parts(dev: &Path) -> (Vec<(u64, u64)>, u64) {
    let (parts, sector) = sfdisk_parts(dev);
    (parts.iter().map(|p| (p.start * sector, p.size * sector)).collect(), sector)
}

/// The ext4 (p1), btrfs (p2) and swap (p3) of `file`, a disk of
/// `sector`-byte sectors whose partitions are `parts`: each checked by
/// its own tools through a loop device of that sector size, the files the
/// test wrote.
fn assert_linux_disk(t: &TempDir, file: &Path, parts: &[(u64, u64)], sector: u32) {
    let expected = t.join("expected");
    if !expected.exists() {
        populate(&expected);
    }
    for (i, kind) in ["ext4", "btrfs", "swap"].into_iter().enumerate() {
        let (start, len) = parts[i];
        let dev = LoopDevice::attach_range_with(file, start, len, sector);
        let node = dev.path.to_str().unwrap().to_string();
        match kind {
            "ext4" => {
                run("e2fsck", &["-fn", &node]);
            }
            "btrfs" => {
                run("btrfs", &["check", "--readonly", &node]);
            }
            _ => {
                let found = run("blkid", &["-o", "value", "-s", "TYPE", &node]);
                assert_eq!(found.trim(), "swap");
                continue;
            }
        }
        let dir = t.join(&format!("m-{sector}-{i}"));
        let _m = Mounted::new(&dev.path, &dir, "ro");
        run("diff", &["-r", "-x", "lost+found", s(&expected), s(&dir)]);
    }
}

#[test]
fn gpt_disk_moves_between_512_and_4096_byte_sectors() {
    require_root!();
    let t = TempDir::new("sectors");
    let disk = t.join("disk.img");
    blank_file(&disk, 300 * MIB);
    run_with_input("sfdisk", &["-q", s(&disk)], "label: gpt\nstart=2048, size=100M\nsize=128M\nsize=60M, type=swap\n");
    let (parts, sector) = sfdisk_parts(&disk);
    let src = t.join("src");
    populate(&src);
    let ext4 = t.join("ext4.img");
    blank_file(&ext4, parts[0].size * sector);
    run("mke2fs", &["-q", "-t", "ext4", "-b", "4096", "-d", s(&src), s(&ext4)]);
    let btrfs = t.join("btrfs.img");
    make_fs(&t, "btrfs", &btrfs, parts[1].size * sector);
    let swap = t.join("swap.img");
    blank_file(&swap, parts[2].size * sector);
    run("mkswap", &["-q", s(&swap)]);
    for (p, f) in parts.iter().zip([&ext4, &btrfs, &swap]) {
        write_at(&disk, p.start * sector, &std::fs::read(f).unwrap());
    }
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));

    // 512 -> 4Kn: the GPT is rebuilt for 4096-byte sectors, every partition
    // at the same byte offset.
    let file4k = t.join("4k.img");
    garbage_file(&file4k, 300 * MIB);
    {
        let dev = LoopDevice::attach(&file4k, Some(4096));
        let o = klon(&["restore", "--yes", s(&img), s(&dev.path)]);
        ok(&o);
        let verified = run("sgdisk", &["-v", s(&dev.path)]);
        assert!(verified.contains("No problems found"), "{verified}");
        let (parts4k, sector4k) = device_parts(&dev.path);
        assert_eq!(sector4k, 4096);
        let bytes: Vec<(u64, u64)> = parts.iter().map(|p| (p.start * sector, p.size * sector)).collect();
        assert_eq!(parts4k, bytes, "the partitions moved");
        assert_linux_disk(&t, &file4k, &parts4k, 4096);

        // And back: an image of the 4Kn disk onto a 512-byte-sector disk.
        let img4k = t.join("image-4k");
        ok(&klon(&["backup", "--quiet", s(&dev.path), s(&img4k)]));
        let file512 = t.join("512.img");
        garbage_file(&file512, 300 * MIB);
        let dev512 = LoopDevice::attach(&file512, Some(512));
        ok(&klon(&["restore", "--yes", s(&img4k), s(&dev512.path)]));
        let verified = run("sgdisk", &["-v", s(&dev512.path)]);
        assert!(verified.contains("No problems found"), "{verified}");
        let (parts512, sector512) = device_parts(&dev512.path);
        assert_eq!(sector512, 512);
        assert_eq!(parts512, bytes, "the partitions moved");
        assert_linux_disk(&t, &file512, &parts512, 512);
    }

    // A FAT made for 512-byte sectors cannot go onto a 4Kn disk: refused,
    // naming it, before anything is written.
    let fat = t.join("fat.img");
    make_fs(&t, "vfat", &fat, parts[2].size * sector);
    write_at(&disk, parts[2].start * sector, &std::fs::read(&fat).unwrap());
    let img2 = t.join("image-fat");
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img2)]));
    garbage_file(&file4k, 300 * MIB);
    let before = std::fs::read(&file4k).unwrap();
    let dev = LoopDevice::attach(&file4k, Some(4096));
    let o = klon(&["restore", "--yes", s(&img2), s(&dev.path)]);
    fails_with(&o, 5, &["4096-byte logical sectors", "partition 3", "512-byte units"]);
    drop(dev);
    assert!(std::fs::read(&file4k).unwrap() == before, "a refused restore wrote to the target");
}

#[test]
fn a_fat_at_the_end_is_cut_after_its_last_used_cluster() {
    require_root!();
    let t = TempDir::new("shrink-fat");
    let disk = t.join("disk.img");
    blank_file(&disk, 140 * MIB);
    run_with_input("sfdisk", &["-q", s(&disk)], "label: gpt\nstart=2048, size=32M\nsize=100M, type=uefi\n");
    let (parts, sector) = sfdisk_parts(&disk);
    for (i, (p, kind)) in parts.iter().zip(["ext4", "vfat"]).enumerate() {
        let fs = t.join(&format!("{kind}-{i}.img"));
        make_fs(&t, kind, &fs, p.size * sector);
        write_at(&disk, p.start * sector, &std::fs::read(&fs).unwrap());
    }
    let (target, report) = restore_smaller(&t, &disk, 100 * MIB);
    let resized = report["resized"].as_array().unwrap();
    assert_eq!(resized.len(), 1, "{report}");
    assert!(resized[0]["note"].as_str().unwrap().contains("klon cut its FAT after its last used cluster"), "{report}");
    let (fs, p) = partition_file(&t, &target, 1, "fat.img");
    assert!(p.size < parts[1].size, "{p:?}");
    assert_clean("vfat", &fs);
    assert_files(&t, "vfat", &fs);
    // The FAT's own size is the partition's now.
    let b = read_at(&fs, 0, 512);
    let total = u64::from(u32::from_le_bytes(b[32..36].try_into().unwrap())) * 512;
    assert_eq!(total, p.size * sector);

    // The same from a repository's snapshot (REPO:latest), read back the same way.
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&disk), s(&repo)]));
    let target2 = t.join("target2.img");
    garbage_file(&target2, 100 * MIB);
    let spec = format!("{}:latest", s(&repo));
    let o = klon(&["--json", "restore", "--yes", &spec, s(&target2)]);
    ok(&o);
    // Laid out as the image's restore was, its FAT clean with the same files.
    let same_as_image = |restored: &Path, name: &str| {
        let file = restored.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            run("sfdisk", &["-d", s(restored)]).replace(file, "X"),
            run("sfdisk", &["-d", s(&target)]).replace("target.img", "X")
        );
        let (fs, _) = partition_file(&t, restored, 1, name);
        assert_clean("vfat", &fs);
        assert_files(&t, "vfat", &fs);
    };
    same_as_image(&target2, "fat2.img");

    // Planned and written from the one snapshot opened, under one lock:
    // while the person reads the confirmation, the repository holds one
    // lock (the restore's), and a backup of another disk made meanwhile
    // (now the latest, with no partition table to move) changes nothing.
    use common::terminal::{Terminal, command_line, exit_status};
    let target3 = t.join("target3.img");
    garbage_file(&target3, 100 * MIB);
    let out = t.join("out.txt");
    let cmd = command_line(&[env!("CARGO_BIN_EXE_klon"), "restore", "--quiet", &spec, s(&target3)], &out);
    let term = Terminal::start("shrink-fat", &cmd);
    term.wait_for("Type target3.img to overwrite it");
    let locks = std::fs::read_dir(repo.join("locks")).unwrap().count();
    assert_eq!(locks, 1, "a restore waiting for its confirmation holds {locks} locks");
    let other = t.join("other.img");
    garbage_file(&other, 8 * MIB);
    ok(&klon(&["backup", "--quiet", s(&other), s(&repo)]));
    term.type_line("target3.img");
    let (said, code) = exit_status(&term, &out);
    assert_eq!(code, 0, "{said}\n{}", term.screen());
    same_as_image(&target3, "fat3.img");
    assert_eq!(std::fs::read_dir(repo.join("locks")).unwrap().count(), 0);
}
