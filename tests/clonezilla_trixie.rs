//! Clonezilla images made by today's Debian Clonezilla, from the committed
//! fixtures in tests/fixtures/clonezilla-trixie/: Debian 13 (trixie)'s
//! clonezilla 5.9.9 (ocs-sr) with partclone 0.3.36 saved two small sample
//! disks (see make-clonezilla-trixie.sh and PROVENANCE there). `klon info`
//! and `verify` take each image, a restore gives the sample disk back byte
//! for byte (against the committed SHA256SUMS) with clean filesystems, and
//! `klon convert` makes a klon image that restores the same disk.
//!
//! Needs no root: the targets are files.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;

/// The gpt sample disk: p1 FAT16 ESP at sector 2048 (32768 sectors), p2
/// ext4 at 34816 (40960 sectors).
const GPT_P1: (u64, u64) = (2048 * 512, 32768 * 512);
const GPT_P2: (u64, u64) = (34816 * 512, 40960 * 512);
/// The mbr sample disk: p1 ext4 at sector 64 (24576 sectors), p5 FAT12 at
/// 28672 (16384 sectors).
const MBR_P1: (u64, u64) = (64 * 512, 24576 * 512);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clonezilla-trixie")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The disk name an image was saved from (`loop0`: the loop device the
/// script got, in the files' names).
fn disk_name(image: &str) -> String {
    std::fs::read_to_string(fixtures().join(image).join("disk")).unwrap().trim().to_string()
}

/// Writes bytes `range` of `disk` to `out` and checks their sum against
/// the committed `name` and the filesystem with its own checker.
fn check_part(disk: &Path, range: (u64, u64), out: &Path, name: &str) {
    std::fs::write(out, read_at(disk, range.0, range.1)).unwrap();
    assert_eq!(sha256(out), committed_sum(&fixtures(), name), "{}: {name} differs from the sample's", disk.display());
    if name.ends_with(".ext4") {
        run("e2fsck", &["-fn", s(out)]);
    } else {
        run("fsck.fat", &["-n", s(out)]);
    }
    std::fs::remove_file(out).unwrap();
}

/// Both savedisk images of the GPT disk (zstd; pigz with B2SUMS): info
/// names partclone 0.3.36 and its CRC32 checksums, verify checks B2SUMS
/// too, a restore is the sample disk byte for byte (tables, protective
/// MBR's boot code, backup GPT, both filesystems clean), and so is the
/// restore of the klon image `convert` makes of it.
#[test]
fn trixie_gpt_images_verify_restore_and_convert_byte_for_byte() {
    let dir = TempDir::new("cztrixie-gpt");
    for name in ["gpt-zst", "gpt-gz"] {
        let image = fixtures().join(name);
        let o = klon(&["info", s(&image)]);
        ok(&o);
        let info = stdout(&o);
        assert!(
            info.contains("Table:        GPT, disk id 5EED7A1E-0000-4000-8000-0000000000AA")
                && info.contains("partclone 0.3.36), FAT16, 512-byte blocks")
                && info.contains("partclone 0.3.36), EXTFS, 1024-byte blocks")
                && info.contains("CRC32 every 10240 blocks"),
            "{name}: info says\n{info}"
        );
        let o = klon(&["verify", s(&image)]);
        ok(&o);
        if name == "gpt-gz" {
            assert!(stderr(&o).contains("B2SUMS: 20 files match"), "{name}: verify says\n{}", stderr(&o));
        }
        let target = dir.join(&format!("{name}.img"));
        ok(&klon(&["restore", "--yes", s(&image), s(&target)]));
        assert_eq!(
            sha256(&target),
            committed_sum(&fixtures(), "gpt-disk"),
            "{name}: the restored disk differs from the sample"
        );
        check_part(&target, GPT_P1, &dir.join("p1"), "gpt-p1.vfat");
        check_part(&target, GPT_P2, &dir.join("p2"), "gpt-p2.ext4");
        std::fs::remove_file(&target).unwrap();

        let converted = dir.join(&format!("{name}.klon"));
        ok(&klon(&["convert", s(&image), s(&converted)]));
        ok(&klon(&["verify", s(&converted)]));
        ok(&klon(&["restore", "--yes", s(&converted), s(&target)]));
        assert_eq!(
            sha256(&target),
            committed_sum(&fixtures(), "gpt-disk"),
            "{name}: the disk restored from the converted image differs"
        );
        std::fs::remove_file(&target).unwrap();
    }
}

/// The saveparts image of both GPT partitions: info and verify take it; a
/// restore into a disk whose table has the partitions (here the sample's
/// table, partitions zeroed) gives the sample disk back byte for byte, and
/// `--partition 2` restores the ext4 alone onto a file of its size; the
/// klon image `convert` makes of it restores the whole disk.
#[test]
fn trixie_saveparts_image_restores_into_a_disk_with_its_table() {
    let dir = TempDir::new("cztrixie-parts");
    let image = fixtures().join("gpt-parts");
    assert!(!image.join("disk").exists());
    let o = klon(&["info", s(&image)]);
    ok(&o);
    assert!(stdout(&o).contains("saveparts"), "{}", stdout(&o));
    ok(&klon(&["verify", s(&image)]));

    // A disk with the sample's table and nothing in its partitions: the
    // whole-disk restore of the savedisk image, partitions zeroed.
    let target = dir.join("target.img");
    ok(&klon(&["restore", "--yes", s(&fixtures().join("gpt-zst")), s(&target)]));
    for (off, len) in [GPT_P1, GPT_P2] {
        write_at(&target, off, &vec![0u8; len as usize]);
    }
    assert_ne!(sha256(&target), committed_sum(&fixtures(), "gpt-disk"));
    ok(&klon(&["restore", "--yes", s(&image), s(&target)]));
    assert_eq!(
        sha256(&target),
        committed_sum(&fixtures(), "gpt-disk"),
        "the partitions restored from saveparts differ"
    );

    let p2 = dir.join("p2.img");
    ok(&klon(&["restore", "--yes", "--partition", "2", s(&image), s(&p2)]));
    assert_eq!(std::fs::metadata(&p2).unwrap().len(), GPT_P2.1);
    assert_eq!(sha256(&p2), committed_sum(&fixtures(), "gpt-p2.ext4"), "partition 2 restored alone differs");
    run("e2fsck", &["-fn", s(&p2)]);

    // Both partitions were saved, so the klon image `convert` makes of it
    // (table files included) restores the whole sample disk.
    let converted = dir.join("converted");
    ok(&klon(&["convert", s(&image), s(&converted)]));
    let whole = dir.join("whole.img");
    ok(&klon(&["restore", "--yes", s(&converted), s(&whole)]));
    assert_eq!(
        sha256(&whole),
        committed_sum(&fixtures(), "gpt-disk"),
        "the disk restored from the converted saveparts image differs"
    );
}

/// The MBR image: partclone 0.3.36 (as 0.3.23) reads a FAT12 table 16 bits
/// per entry (partclone's issue #268), so its bitmap of the logical FAT12
/// partition leaves out clusters the FAT marks in use: those files are
/// not in the image (partclone.restore and Clonezilla's restore give the
/// same damaged filesystem). klon compares partclone's bitmap with the FAT
/// the image holds: verify fails naming the file, what is missing and why,
/// a restore refuses before writing the partition, and the image's other
/// partition still restores alone, byte for byte.
#[test]
fn trixie_fat12_image_missing_clusters_is_refused() {
    let dir = TempDir::new("cztrixie-mbr");
    let image = fixtures().join("mbr-zst");
    let o = klon(&["info", s(&image)]);
    ok(&o);
    assert!(stdout(&o).contains("FAT12, 512-byte blocks"), "{}", stdout(&o));
    let file = format!("{}p5.fat12-ptcl-img.zst", disk_name("mbr-zst"));
    let why = [
        file.as_str(),
        "the FAT marks 38 clusters in use, partclone's bitmap leaves out 10 of them (clusters 30..39;",
        "partclone issue #268",
        "partclone 0.3.36",
        "klon restore --partition",
    ];
    fails_with(&klon(&["verify", s(&image)]), 4, &why);
    let target = dir.join("mbr.img");
    fails_with(&klon(&["restore", "--yes", s(&image), s(&target)]), 4, &why);
    assert!(
        !target.exists() || read_at(&target, 0, 1 << 20).iter().all(|&b| b == 0),
        "a refused restore left a partition table behind"
    );
    fails_with(&klon(&["convert", s(&image), s(&dir.join("converted"))]), 4, &why);

    let p1 = dir.join("p1.img");
    ok(&klon(&["restore", "--yes", "--partition", "1", s(&image), s(&p1)]));
    assert_eq!(std::fs::metadata(&p1).unwrap().len(), MBR_P1.1);
    assert_eq!(sha256(&p1), committed_sum(&fixtures(), "mbr-p1.ext4"), "partition 1 restored alone differs");
    run("e2fsck", &["-fn", s(&p1)]);
}

/// 5.9.9 makes its checksum files in one pass that now covers the
/// `Info-*.txt` files written before it (5.3's did not), but not
/// `Info-img-id.txt`, written after: verify checks what B2SUMS lists, so a
/// changed Info-dmi.txt fails naming it, a changed Info-img-id.txt does not.
#[test]
fn trixie_b2sums_cover_the_info_files_written_before_them() {
    let dir = TempDir::new("cztrixie-b2");
    let b2 = std::fs::read_to_string(fixtures().join("gpt-gz/B2SUMS")).unwrap();
    assert!(b2.contains("  Info-dmi.txt\n") && !b2.contains("Info-img-id.txt") && !b2.contains("SUMS\n"), "{b2}");
    for (file, fails) in [("Info-dmi.txt", true), ("Info-img-id.txt", false)] {
        let image = dir.join(file);
        run("cp", &["-a", s(&fixtures().join("gpt-gz")), s(&image)]);
        let mut text = std::fs::read(image.join(file)).unwrap();
        text.extend_from_slice(b"changed\n");
        std::fs::write(image.join(file), text).unwrap();
        let o = klon(&["verify", s(&image)]);
        if fails {
            fails_with(&o, 4, &["Info-dmi.txt does not match its checksum in B2SUMS"]);
        } else {
            ok(&o);
        }
    }
}

/// Files 5.9.9 writes only on some machines, informational for a restore:
/// `efi-nvram.dat` (`efibootmgr -v`, booted with UEFI), `<part>.info`
/// (`PARTITION_TYPE=Win_boot_reserved`), `Info-lshw.txt`, `Info-OS-prober.txt`
/// (contents as ocs-functions writes them). An image with them verifies and
/// restores the same disk.
#[test]
fn trixie_informational_files_are_ignored() {
    let dir = TempDir::new("cztrixie-info");
    let image = dir.join("extra");
    run("cp", &["-a", s(&fixtures().join("gpt-zst")), s(&image)]);
    let disk = disk_name("gpt-zst");
    for (file, text) in [
        (
            "efi-nvram.dat".to_string(),
            "BootCurrent: 0001\nBoot0001* debian\tHD(1,GPT,5eed7a1e-0001-4000-8000-000000000001)\n".to_string(),
        ),
        (format!("{disk}p1.info"), "PARTITION_TYPE=Win_boot_reserved\n".to_string()),
        ("Info-lshw.txt".to_string(), "klon-test\n    description: Computer\n".to_string()),
        ("Info-OS-prober.txt".to_string(), format!("/dev/{disk}p2:Debian GNU/Linux 13 (trixie):Debian:linux\n")),
    ] {
        std::fs::write(image.join(file), text).unwrap();
    }
    ok(&klon(&["info", s(&image)]));
    ok(&klon(&["verify", s(&image)]));
    let target = dir.join("target.img");
    ok(&klon(&["restore", "--yes", s(&image), s(&target)]));
    assert_eq!(sha256(&target), committed_sum(&fixtures(), "gpt-disk"));
}
