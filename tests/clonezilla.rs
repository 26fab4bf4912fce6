//! Clonezilla images made by Debian's clonezilla package (`ocs-sr` in batch
//! mode on loop devices): `klon info`, `verify`, `restore` and `convert`
//! take them, restores compare byte for byte with the source disk and pass
//! each filesystem's own checker, and damaged or incomplete images are
//! refused naming the file.
//!
//! Needs root and loop devices (run by CI with KLON_REQUIRE_ROOT_TESTS=1).
//! The two images are made once per run of this test binary.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::clonezilla::{Fixture, build, build_parts};
use common::disks::*;
use common::loop_device::LoopDevice;

/// MBR: ext4, FAT, an extended partition with swap, NTFS and a partition
/// without filesystem; zstd, split into 1 MB pieces, with MD5SUMS.
fn mbr() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let script = "label: dos\nlabel-id: 0x5eedc0de\n\
                      start=2048, size=61440, type=83, bootable\n\
                      size=40960, type=c\n\
                      type=5\n\
                      size=16384, type=82\n\
                      size=61440, type=7\n\
                      size=20480, type=83\n";
        build(
            TempDir::for_static("cz-mbr"),
            script,
            &[(1, "ext4"), (2, "vfat"), (5, "swap"), (6, "ntfs"), (7, "raw")],
            &["-z9p", "-i", "1", "-gm"],
        )
    })
}

/// GPT: an ESP (FAT), NTFS and ext4 (last, so `--grow-last` grows ext4:
/// a grown NTFS partition would have its backup boot sector, which NTFS
/// keeps in the partition's last sector, in the wrong place); gzip (pigz),
/// one file each, with SHA1SUMS.
fn gpt() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let script = "label: gpt\n\
                      start=2048, size=40960, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\"\n\
                      size=61440, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n\
                      size=81920, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n";
        build(
            TempDir::for_static("cz-gpt"),
            script,
            &[(1, "vfat"), (2, "ntfs"), (3, "ext4")],
            &["-z1p", "-i", "0", "-gs"],
        )
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Copies an image directory (to damage the copy).
fn copy_image(from: &Path, to: &Path) {
    run("cp", &["-a", s(from), s(to)]);
}

/// The bytes of partition `n` of disk image file `disk`, as a file.
fn extract_partition(disk: &Path, n: u32, out: &Path) {
    let (parts, sector) = sfdisk_parts(disk);
    let p = parts.iter().find(|p| p.node.ends_with(&n.to_string())).unwrap();
    let data = read_at(disk, p.start * sector, p.size * sector);
    std::fs::write(out, data).unwrap();
}

/// Runs each filesystem's own checker on the partitions of `disk`, and
/// compares every file put on them with what the filesystem now holds.
fn check_filesystems(f: &Fixture, disk: &Path, fss: &[(u32, &str)], scratch: &TempDir) {
    for &(n, kind) in fss {
        let part = scratch.join(&format!("check-p{n}"));
        extract_partition(disk, n, &part);
        let p = s(&part);
        let out = scratch.join(&format!("files-p{n}"));
        std::fs::create_dir_all(&out).unwrap();
        match kind {
            "ext4" => {
                run("e2fsck", &["-fn", p]);
                run("debugfs", &["-R", &format!("rdump / {}", s(&out)), p]);
            }
            "vfat" => {
                run("fsck.fat", &["-n", p]);
                run_env("mcopy", &["-s", "-n", "-i", p, "::/*", s(&out)], &[("MTOOLS_SKIP_CHECK", "1")]);
            }
            "ntfs" => {
                let o = std::process::Command::new("ntfsfix").args(["-n", p]).output().unwrap();
                let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
                assert!(o.status.success() && !text.contains("BAD"), "ntfsfix -n on partition {n}: {text}");
                for (pn, name, _) in &f.files {
                    if *pn == n {
                        let data = std::process::Command::new("ntfscat").args([p, name]).output().unwrap();
                        assert!(data.status.success(), "ntfscat {name}");
                        std::fs::write(out.join(name), data.stdout).unwrap();
                    }
                }
            }
            _ => continue,
        }
        for (pn, name, data) in &f.files {
            if *pn == n {
                let got = std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("partition {n}: {name}: {e}"));
                assert!(got == *data, "partition {n} ({kind}): {name} differs after the restore");
            }
        }
        let _ = std::fs::remove_file(&part);
    }
}

#[test]
fn info_names_the_disk_partitions_and_pieces() {
    require_root!();
    let f = mbr();
    let o = klon(&["info", s(&f.image)]);
    ok(&o);
    let text = stdout(&o);
    for needle in
        ["Clonezilla", "Table:        MBR", "partition 1", "ext4", "partition 6", "ntfs", "swap", "pieces", "MD5SUMS"]
    {
        assert!(text.contains(needle), "info does not mention {needle}:\n{text}");
    }
    let o = klon(&["info", "--json", s(&f.image)]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format"], "clonezilla");
    let pieces = v["partition_images"].as_array().unwrap().iter().map(|p| p["pieces"].as_array().unwrap().len());
    assert!(pieces.max().unwrap() > 1, "the 1 MB split made no pieces: {v}");
}

#[test]
fn mbr_image_restores_byte_for_byte() {
    require_root!();
    let f = mbr();
    let o = klon(&["verify", s(&f.image)]);
    ok(&o);
    let dir = TempDir::new("cz-mbr-restore");
    let target = dir.join("restored.img");
    ok(&klon(&["restore", "--yes", s(&f.image), s(&target)]));
    let size = std::fs::metadata(&f.disk).unwrap().len();
    assert_eq!(std::fs::metadata(&target).unwrap().len(), size);
    // The source's free space was zeros, and so is a new target: every
    // byte matches, tables, EBRs, boot code, swap header, NTFS backup boot
    // sector and the partition without filesystem included.
    assert_same(&f.disk, &target, 0, size, "disk restored from the Clonezilla image");
    check_filesystems(f, &target, &[(1, "ext4"), (2, "vfat"), (6, "ntfs")], &dir);
}

#[test]
fn gpt_image_restores_to_a_larger_used_disk() {
    require_root!();
    let f = gpt();
    ok(&klon(&["verify", s(&f.image)]));
    let dir = TempDir::new("cz-gpt-restore");
    let file = dir.join("larger.img");
    garbage_file(&file, 300 * MIB);
    let dev = LoopDevice::attach(&file, None);
    let o = klon(&["restore", "--yes", "--grow-last", s(&f.image), s(&dev.path)]);
    ok(&o);
    // The last partition's ext4 grew with it (checked clean below).
    assert!(stdout(&o).contains("resize2fs grew its ext4 to fill it"), "{}{}", stdout(&o), stderr(&o));
    drop(dev);
    let v = run("sgdisk", &["-v", s(&file)]);
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    // Everything up to the end of the last partition's source copy, and
    // the partitions' used data, as the source; filesystems clean.
    let (src_parts, sector) = sfdisk_parts(&f.disk);
    let (parts, _) = sfdisk_parts(&file);
    assert_eq!(parts.len(), 3);
    for (a, b) in src_parts.iter().zip(&parts) {
        assert_eq!(a.start, b.start);
    }
    // It ends at the last usable sector: the backup GPT takes the last 33.
    assert_eq!(parts[2].start + parts[2].size, 300 * MIB / sector - 33, "--grow-last grows the last partition");
    // The boot code (Clonezilla's `-mbr`); the table itself was checked by
    // sgdisk and the partitions' places above. (Clonezilla saves no data
    // from the gap after a GPT: that is not restored.)
    assert_same(&f.disk, &file, 0, 440, "boot code");
    check_filesystems(f, &file, &[(1, "vfat"), (2, "ntfs"), (3, "ext4")], &dir);
}

#[test]
fn convert_makes_a_klon_image_that_restores_the_same_disk() {
    require_root!();
    let f = mbr();
    let dir = TempDir::new("cz-convert");
    let image = dir.join("klon-image");
    let o = klon(&["convert", s(&f.image), s(&image)]);
    ok(&o);
    assert!(image.join("klon.json").is_file());
    ok(&klon(&["verify", s(&image)]));
    let info = stdout(&klon(&["info", s(&image)]));
    assert!(info.contains("partition 6") && info.contains("ntfs"), "{info}");
    let target = dir.join("restored.img");
    ok(&klon(&["restore", "--yes", s(&image), s(&target)]));
    let size = std::fs::metadata(&f.disk).unwrap().len();
    assert_same(&f.disk, &target, 0, size, "disk restored from the converted image");
}

/// A Clonezilla image made a snapshot of a repository: it restores the
/// same disk, a second conversion of it adds no chunk, and a damaged one
/// leaves no snapshot (and no new repository) behind.
#[test]
fn convert_into_a_repository_makes_a_snapshot_that_restores_the_same_disk() {
    require_root!();
    let f = mbr();
    let dir = TempDir::new("cz-convert-repo");
    let repo = dir.join("repo");
    let o = klon(&["--json", "convert", "--repo", s(&f.image), s(&repo)]);
    ok(&o);
    let first: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(first["created_repository"], true, "{first}");
    assert!(first["added"]["chunks"].as_u64().unwrap() > 0, "{first}");
    let o = klon(&["--json", "convert", s(&f.image), s(&repo)]);
    ok(&o);
    let second: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(second["added"]["chunks"], 0, "the same image again added chunks: {second}");
    assert_eq!(second["reused_chunks"], first["added"]["chunks"], "{second}");
    ok(&klon(&["check", "--read-data", s(&repo)]));
    let target = dir.join("restored.img");
    ok(&klon(&["restore", "--yes", s(&repo), s(&target)]));
    let size = std::fs::metadata(&f.disk).unwrap().len();
    assert_same(&f.disk, &target, 0, size, "disk restored from the snapshot of the Clonezilla image");

    let damaged = dir.join("cz");
    copy_image(&f.image, &damaged);
    std::fs::remove_file(damaged.join("MD5SUMS")).unwrap();
    let piece = std::fs::read_dir(&damaged)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().contains("p1.ext4-ptcl-img"))
        .unwrap();
    let len = std::fs::metadata(&piece).unwrap().len();
    let mut b = read_at(&piece, len / 2, 1);
    b[0] ^= 0x40;
    write_at(&piece, len / 2, &b);
    let new_repo = dir.join("repo2");
    let o = klon(&["convert", "--repo", s(&damaged), s(&new_repo)]);
    fails_with(&o, 4, &["ptcl-img", "no snapshot was made"]);
    assert!(!new_repo.exists(), "the new repository was left behind");
    let o = klon(&["convert", s(&damaged), s(&repo)]);
    fails_with(&o, 4, &["ptcl-img", "no snapshot was made"]);
    let o = klon(&["--json", "snapshots", s(&repo)]);
    ok(&o);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 2, "a snapshot of the damaged image was made");
}

#[test]
fn damaged_data_is_caught_by_verify_and_restore() {
    require_root!();
    let f = mbr();
    let dir = TempDir::new("cz-damaged");
    let image = dir.join("cz");
    copy_image(&f.image, &image);
    // The middle piece of the ext4 image: flip one byte in the middle.
    let mut pieces: Vec<PathBuf> = std::fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("p1.ext4-ptcl-img"))
        .collect();
    pieces.sort();
    assert!(pieces.len() >= 3, "expected split pieces: {pieces:?}");
    let victim = &pieces[1];
    let len = std::fs::metadata(victim).unwrap().len();
    let mut b = read_at(victim, len / 2, 1);
    b[0] ^= 0x40;
    write_at(victim, len / 2, &b);
    let victim_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    // MD5SUMS names the damaged piece before any data is decoded.
    let o = klon(&["verify", s(&image)]);
    fails_with(&o, 4, &["MD5SUMS"]);
    assert!(stderr(&o).contains(&victim_name[..victim_name.find(".ext4").unwrap()]), "{}", stderr(&o));
    // Without the checksum file, partclone's own checks catch it.
    std::fs::remove_file(image.join("MD5SUMS")).unwrap();
    let o = klon(&["verify", s(&image)]);
    fails_with(&o, 4, &["ptcl-img"]);
    // A restore stops, and the target's table is wiped so the half-written
    // disk is not mistaken for a good one.
    let target = dir.join("target.img");
    garbage_file(&target, 200 * MIB);
    let o = klon(&["restore", "--yes", "--no-verify-after", s(&image), s(&target)]);
    fails_with(&o, 4, &["wiped"]);
    assert!(read_at(&target, 0, 1 << 20).iter().all(|&x| x == 0), "table area not wiped");
}

#[test]
fn incomplete_images_are_refused_before_writing() {
    require_root!();
    let f = mbr();
    let dir = TempDir::new("cz-incomplete");
    // A missing middle piece.
    let image = dir.join("missing-piece");
    copy_image(&f.image, &image);
    let mut pieces: Vec<PathBuf> = std::fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("ptcl-img.zst.a"))
        .collect();
    pieces.sort();
    std::fs::remove_file(&pieces[1]).unwrap();
    let target = dir.join("target.img");
    garbage_file(&target, 200 * MIB);
    let before = read_at(&target, 0, MIB);
    let o = klon(&["restore", "--yes", s(&image), s(&target)]);
    let gone = pieces[1].file_name().unwrap().to_string_lossy().into_owned();
    let (base, suffix) = gone.rsplit_once('.').unwrap();
    fails_with(&o, 4, &[&format!("piece .{suffix} of {base} is missing")]);
    assert_eq!(read_at(&target, 0, MIB), before, "a refused restore wrote to the target");
    // A partition image missing altogether.
    let image2 = dir.join("missing-partition");
    copy_image(&f.image, &image2);
    for e in std::fs::read_dir(&image2).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().contains("p2.vfat-ptcl-img") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let o = klon(&["info", s(&image2)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("p2"), "{}", stderr(&o));
    // A damaged partition table dump.
    let image3 = dir.join("bad-table");
    copy_image(&f.image, &image3);
    let sf = std::fs::read_dir(&image3)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-pt.sf"))
        .unwrap();
    std::fs::write(&sf, "label: dos\n/dev/x1 : start= banana\n").unwrap();
    let o = klon(&["verify", s(&image3)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pt.sf"), "{}", stderr(&o));
    // A target smaller than the source disk.
    let small = dir.join("small.img");
    garbage_file(&small, 100 * MIB);
    let o = klon(&["restore", "--yes", s(&f.image), s(&small)]);
    fails_with(&o, 5, &["too small"]);
}

#[test]
fn gpt_checksum_file_mismatch_is_refused() {
    require_root!();
    let f = gpt();
    let dir = TempDir::new("cz-sha1");
    let image = dir.join("cz");
    copy_image(&f.image, &image);
    assert!(image.join("SHA1SUMS").is_file(), "ocs-sr -gs wrote no SHA1SUMS");
    // A byte of the GPT copy (not read by partclone) damaged: only the
    // checksum file can tell.
    let gpt2 = std::fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-gpt-2nd"))
        .unwrap();
    let mut b = read_at(&gpt2, 100, 1);
    b[0] ^= 1;
    write_at(&gpt2, 100, &b);
    let o = klon(&["verify", s(&image)]);
    fails_with(&o, 4, &["SHA1SUMS"]);
}

/// A partition image (`ocs-sr saveparts`, no `disk` file): `klon info`
/// shows it and `klon verify` checks it (a flipped byte is caught); a
/// restore writes its partitions into the same partitions of a disk whose
/// table has them (nothing else changes), and `--partition` restores one
/// onto a place of its own (e2fsck clean, files equal). Before, info,
/// verify and restore all refused it.
#[test]
fn saveparts_image_is_shown_verified_and_restored_partition_by_partition() {
    require_root!();
    let f = build_parts(
        TempDir::new("cz-parts"),
        "label: dos\nstart=2048, size=81920, type=83\nstart=83968, size=81920, type=c\n",
        &[(1, "ext4"), (2, "vfat")],
        &["-z9p", "-i", "0"],
        &[1],
    );
    assert!(!f.image.join("disk").exists() && f.image.join("parts").is_file());
    let info = klon(&["info", s(&f.image)]);
    ok(&info);
    let text = stdout(&info);
    assert!(text.contains("saveparts") && text.contains("partition 1"), "{text}");
    ok(&klon(&["verify", s(&f.image)]));

    // Restored as a whole into a disk whose table has the partitions: the
    // saved partition is written into its place, nothing else changes.
    let dst = f.image.parent().unwrap().join("dst.img");
    let (parts, sector) = sfdisk_parts(&f.disk);
    let pattern: Vec<u8> = (0..std::fs::metadata(&f.disk).unwrap().len()).map(|i| (i % 251) as u8).collect();
    std::fs::write(&dst, &pattern).unwrap();
    let table = read_at(&f.disk, 0, 512);
    write_at(&dst, 0, &table);
    let before = std::fs::read(&dst).unwrap();
    ok(&klon(&["restore", "--yes", s(&f.image), s(&dst)]));
    let after = std::fs::read(&dst).unwrap();
    let (a, b) = ((parts[0].start * sector) as usize, ((parts[0].start + parts[0].size) * sector) as usize);
    assert!(after[..a] == before[..a] && after[b..] == before[b..], "bytes outside partition 1 changed");
    std::fs::write(f.image.parent().unwrap().join("dst-p1.img"), &after[a..b]).unwrap();
    run("e2fsck", &["-fn", s(&f.image.parent().unwrap().join("dst-p1.img"))]);
    // Onto a disk without those partitions: refused, nothing written.
    let blank = f.image.parent().unwrap().join("blank.img");
    blank_file(&blank, 64 * MIB);
    fails_with(&klon(&["restore", "--yes", s(&f.image), s(&blank)]), 5, &["no partition 1", "nothing was written"]);
    assert!(read_at(&blank, 0, MIB).iter().all(|&x| x == 0));
    // Its partition, restored onto a file of its own (the partition's size),
    // is a clean ext4 holding the files that were put on it.
    let p1 = f.image.parent().unwrap().join("p1.img");
    ok(&klon(&["restore", "--yes", "--partition", "1", s(&f.image), s(&p1)]));
    assert_eq!(std::fs::metadata(&p1).unwrap().len(), parts[0].size * sector);
    run("e2fsck", &["-fn", s(&p1)]);
    for (n, name, data) in &f.files {
        if *n == 1 {
            let out =
                std::process::Command::new("debugfs").args(["-R", &format!("cat /{name}"), s(&p1)]).output().unwrap();
            assert!(&out.stdout == data, "{name} differs after restoring partition 1");
        }
    }
    // Partition 2 was not saved: asking for it is refused.
    fails_with(&klon(&["restore", "--yes", "--partition", "2", s(&f.image), s(&p1)]), 2, &["partition 2"]);

    // A flipped byte in the partition image is caught by verify.
    let img = std::fs::read_dir(&f.image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("ext4-ptcl-img"))
        .expect("the ext4 partition image");
    let len = std::fs::metadata(&img).unwrap().len();
    let mut b = read_at(&img, len / 2, 1);
    b[0] ^= 0x40;
    write_at(&img, len / 2, &b);
    fails_with(&klon(&["verify", s(&f.image)]), 4, &[img.file_name().unwrap().to_str().unwrap()]);
}
