//! Clonezilla images of LVM hosts, from the committed fixture in
//! tests/fixtures/clonezilla-lvm/: Debian 13's clonezilla 5.9.9 (ocs-sr)
//! saved, in a QEMU guest with the group activated, a GPT disk whose second
//! partition is the PV of volume group klonvg (root ext4, swap, and home
//! ext4 in two segments out of disk order); see make-clonezilla-lvm.sh and
//! PROVENANCE there.
//!
//! `klon info` shows the group and its volumes, `verify` checks every
//! image and MD5SUMS; a restore (onto the same size and onto a larger
//! disk) writes the PV's label and metadata and each volume where its
//! segments lie: LVM's own tools (pvs, vgs, lvs, vgck) read the same group
//! back, each volume read through the offsets *they* report holds the
//! sample's bytes (committed sums) and passes e2fsck. The klon image
//! `convert` makes restores the same. Groups klon cannot place (a striped
//! volume, a volume without an image, a PV larger than its partition) are
//! refused before anything is written.
//!
//! Needs root for the loop device LVM's tools read.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;
use common::loop_device::LoopDevice;
use common::lvm_tools::lvm;

const MIB: u64 = 1 << 20;
/// The sample disk: 64 MiB; p1 FAT16 ESP at sector 2048 (32768 sectors),
/// p2 the PV at 34816 (92160 sectors).
const DISK_SIZE: u64 = 64 * MIB;
const P1: (u64, u64) = (2048 * 512, 32768 * 512);
const P2: (u64, u64) = (34816 * 512, 92160 * 512);
/// The PV's UUID, as lvm_vg_dev.list records it.
fn pv_uuid() -> String {
    let text = std::fs::read_to_string(image().join("lvm_vg_dev.list")).unwrap();
    text.split_whitespace().nth(2).unwrap().to_string()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clonezilla-lvm")
}

fn image() -> PathBuf {
    fixtures().join("lvm-zst")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What LVM's tools report of the PV on `dev`: each volume's segments as
/// (first logical extent, extents, first PV extent), the extent size and
/// the PV's first extent in bytes, the PV's UUID, and each volume's UUID.
struct Report {
    segments: Vec<(String, u64, u64, u64)>,
    extent: u64,
    pe_start: u64,
    pv_uuid: String,
    lv_uuids: Vec<(String, String)>,
}

fn report(dev: &Path) -> Report {
    let d = s(dev);
    let bytes = |t: String| t.trim().trim_end_matches('B').parse::<u64>().unwrap();
    let segs = lvm(
        "lvs",
        d,
        &["--segments", "--noheadings", "-o", "lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges", "klonvg"],
    );
    let segments = segs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let first = w[3].rsplit(':').next().unwrap().split('-').next().unwrap().parse().unwrap();
            (w[0].to_string(), w[1].parse().unwrap(), w[2].parse().unwrap(), first)
        })
        .collect();
    let extent = bytes(lvm("vgs", d, &["--noheadings", "--units", "b", "-o", "vg_extent_size", "klonvg"]));
    let pe_start = bytes(lvm("pvs", d, &["--noheadings", "--units", "b", "-o", "pe_start", d]));
    let pv_uuid = lvm("pvs", d, &["--noheadings", "-o", "pv_uuid", d]).trim().to_string();
    let lv_uuids = lvm("lvs", d, &["--noheadings", "-o", "lv_name,lv_uuid", "klonvg"])
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [name, uuid] => Some((name.to_string(), uuid.to_string())),
            _ => None,
        })
        .collect();
    Report { segments, extent, pe_start, pv_uuid, lv_uuids }
}

/// The bytes of logical volume `lv` of the PV file `pv`, read where
/// `report` (LVM's tools) places its segments.
fn lv_bytes(pv: &Path, r: &Report, lv: &str) -> Vec<u8> {
    let mut segs: Vec<&(String, u64, u64, u64)> = r.segments.iter().filter(|s| s.0 == lv).collect();
    segs.sort_by_key(|s| s.1);
    assert!(!segs.is_empty(), "lvs reports no segments of {lv}");
    let mut out = Vec::new();
    for (_, _, n, first) in segs {
        out.extend(read_at(pv, r.pe_start + first * r.extent, n * r.extent));
    }
    out
}

/// Checks the restored disk `disk` (at least the sample's size): the ESP,
/// LVM's tools' view of the PV, each volume's filesystem and files; and,
/// when it was zeros before (`exact`: free blocks are not written, and the
/// sample's were zeros), the ESP's and each ext4 volume's bytes.
fn check_restored(t: &TempDir, disk: &Path, exact: bool) {
    let esp = t.join("esp.vfat");
    std::fs::write(&esp, read_at(disk, P1.0, P1.1)).unwrap();
    if exact {
        assert_eq!(sha256(&esp), committed_sum(&fixtures(), "esp.vfat"), "the ESP differs");
    }
    run("fsck.fat", &["-n", s(&esp)]);

    let pv = t.join("pv.img");
    std::fs::write(&pv, read_at(disk, P2.0, P2.1)).unwrap();
    let dev = LoopDevice::attach_without_partitions(&pv);
    lvm("vgck", s(&dev.path), &["klonvg"]);
    let r = report(&dev.path);
    drop(dev);
    assert_eq!(r.pv_uuid, pv_uuid(), "the PV's UUID");
    let mut uuids = r.lv_uuids.clone();
    uuids.sort();
    assert_eq!(
        uuids,
        vec![
            ("home".to_string(), "KLONHM-0000-0000-0000-0000-0000-000003".to_string()),
            ("root".to_string(), "KLONRT-0000-0000-0000-0000-0000-000001".to_string()),
            ("swap".to_string(), "KLONSW-0000-0000-0000-0000-0000-000002".to_string()),
        ]
    );
    let mut segs = r.segments.clone();
    segs.sort();
    assert_eq!(
        segs,
        vec![
            ("home".to_string(), 0, 6, 30),
            ("home".to_string(), 6, 6, 24),
            ("root".to_string(), 0, 20, 0),
            ("swap".to_string(), 0, 4, 20),
        ],
        "the segments LVM's tools read back"
    );
    let files = [
        ("root", &["etc/readme.txt", "etc/hostname", "var/lib/random.bin"][..]),
        ("home", &["user/photo.raw", "user/notes.txt"][..]),
    ];
    for (lv, names) in files {
        let f = t.join(&format!("klonvg-{lv}.ext4"));
        std::fs::write(&f, lv_bytes(&pv, &r, lv)).unwrap();
        if exact {
            assert_eq!(sha256(&f), committed_sum(&fixtures(), &format!("klonvg-{lv}.ext4")), "volume {lv} differs");
        }
        run("e2fsck", &["-fn", s(&f)]);
        for name in names {
            let out = t.join("file");
            run("debugfs", &["-R", &format!("dump /{name} {}", s(&out)), s(&f)]);
            assert_eq!(sha256(&out), committed_sum(&fixtures(), &format!("{lv}/{name}")), "{lv}: /{name} differs");
            std::fs::remove_file(&out).unwrap();
        }
        std::fs::remove_file(&f).unwrap();
    }
    // The swap volume: a swap area with the sample's UUID and label.
    let swap = t.join("swap.img");
    std::fs::write(&swap, lv_bytes(&pv, &r, "swap")).unwrap();
    let probe = run("blkid", &["-p", "-o", "export", s(&swap)]);
    assert!(
        probe.contains("TYPE=swap")
            && probe.contains("UUID=5eed7a1e-0000-4000-8000-000000000505")
            && probe.contains("LABEL=klonswap"),
        "{probe}"
    );
    for f in [&pv, &esp, &swap] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn an_lvm_host_image_verifies_and_restores_for_lvm_s_own_tools() {
    require_root!();
    let t = TempDir::new("czlvm");
    let o = klon(&["info", s(&image())]);
    ok(&o);
    let info = stdout(&o);
    for needle in [
        "volume group klonvg",
        "LVM2 physical volume of volume group klonvg",
        "klonvg-root.ext4-ptcl-img.zst",
        "klonvg-home.ext4-ptcl-img.zst",
    ] {
        assert!(info.contains(needle), "info lacks {needle:?}:\n{info}");
    }
    let o = klon(&["verify", s(&image())]);
    ok(&o);
    assert!(stderr(&o).contains("MD5SUMS:"), "{}", stderr(&o));

    // Onto zeros of the sample's size, and onto stale data of a larger
    // disk.
    for (size, zeros) in [(DISK_SIZE, true), (DISK_SIZE + 16 * MIB, false)] {
        let target = t.join("target.img");
        if zeros {
            blank_file(&target, size);
        } else {
            garbage_file(&target, size);
        }
        ok(&klon(&["restore", "--yes", s(&image()), s(&target)]));
        check_restored(&t, &target, zeros);
        std::fs::remove_file(&target).unwrap();
    }

    // The klon image convert makes of it restores the same.
    let converted = t.join("converted");
    ok(&klon(&["convert", s(&image()), s(&converted)]));
    ok(&klon(&["verify", s(&converted)]));
    let target = t.join("target.img");
    blank_file(&target, DISK_SIZE);
    ok(&klon(&["restore", "--yes", s(&converted), s(&target)]));
    check_restored(&t, &target, true);
}

/// A copy of the fixture image in `t`, changed by `edit`.
fn edited(t: &TempDir, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = t.join(name);
    run("cp", &["-a", s(&image()), s(&dir)]);
    edit(&dir);
    dir
}

fn replace_in(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn groups_klon_cannot_place_are_refused_before_anything_is_written() {
    let t = TempDir::new("czlvm-refused");
    let conf = |d: &Path| d.join("lvm_klonvg.conf");
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            // home's second segment made a two-stripe one.
            edited(&t, "striped", |d| {
                let text = std::fs::read_to_string(conf(d)).unwrap();
                let at = text.find("home {").unwrap();
                let seg = at + text[at..].find("segment2 {").unwrap();
                let stripes = seg + text[seg..].find("stripe_count = 1").unwrap();
                let mut new = text.clone();
                new.replace_range(stripes..stripes + "stripe_count = 1".len(), "stripe_count = 2\nstripe_size = 128");
                let list = seg + new[seg..].find("\"pv0\", 24").unwrap();
                new.replace_range(list..list + "\"pv0\", 24".len(), "\"pv0\", 24, \"pv0\", 36");
                std::fs::write(conf(d), new).unwrap();
            }),
            vec!["klonvg/home", "striped", "Clonezilla"],
        ),
        (
            edited(&t, "no-image", |d| {
                let list = d.join("lvm_logv.list");
                let text = std::fs::read_to_string(&list).unwrap();
                let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("/dev/klonvg/home")).collect();
                std::fs::write(&list, kept.join("\n") + "\n").unwrap();
            }),
            vec!["klonvg/home", "has no image"],
        ),
        (
            edited(&t, "too-big", |d| {
                let text = std::fs::read_to_string(conf(d)).unwrap();
                let count = text.lines().find(|l| l.trim().starts_with("pe_count")).unwrap().to_string();
                replace_in(&conf(d), &count, "pe_count = 4000");
                let _ = std::fs::remove_file(d.join("MD5SUMS"));
            }),
            vec!["do not fit partition 2"],
        ),
        (
            edited(&t, "ghost", |d| {
                let list = d.join("lvm_logv.list");
                let text = std::fs::read_to_string(&list).unwrap();
                std::fs::write(&list, format!("{text}/dev/klonvg/ghost  Linux rev 1.0 ext4 filesystem data\n"))
                    .unwrap();
            }),
            vec!["/dev/klonvg/ghost", "does not describe"],
        ),
        (
            edited(&t, "no-group", |d| {
                let list = d.join("lvm_vg_dev.list");
                let text = std::fs::read_to_string(&list).unwrap();
                std::fs::write(&list, text.replacen("klonvg", "/NOT_FOUND", 1)).unwrap();
            }),
            vec!["/dev/vdb2", "without a volume group"],
        ),
        (
            edited(&t, "two-pvs", |d| {
                let list = d.join("lvm_vg_dev.list");
                let text = std::fs::read_to_string(&list).unwrap();
                let line = text.lines().next().unwrap().replace("vdb2", "vdb1");
                std::fs::write(&list, format!("{text}{line}\n")).unwrap();
            }),
            vec!["spans two physical volumes"],
        ),
    ];
    for (dir, needles) in cases {
        let target = t.join("target.img");
        garbage_file(&target, DISK_SIZE);
        let before = sha256(&target);
        let o = klon(&["restore", "--yes", s(&dir), s(&target)]);
        assert!(!o.status.success(), "{}: restore succeeded", dir.display());
        let said = stderr(&o);
        for n in needles {
            assert!(said.contains(n), "{}: the refusal lacks {n:?}:\n{said}", dir.display());
        }
        assert_eq!(sha256(&target), before, "{}: the target was written", dir.display());
        let o = klon(&["verify", s(&dir)]);
        assert!(!o.status.success(), "{}: verify succeeded", dir.display());
    }
}

/// A flipped byte in a logical volume's image is caught by verify (naming
/// the file) and by a restore, which fails.
#[test]
fn a_damaged_volume_image_is_named() {
    let t = TempDir::new("czlvm-damaged");
    let dir = edited(&t, "damaged", |d| {
        let f = d.join("klonvg-home.ext4-ptcl-img.zst");
        let len = std::fs::metadata(&f).unwrap().len();
        let at = len / 2;
        let b = read_at(&f, at, 1)[0];
        write_at(&f, at, &[b ^ 0x10]);
        let _ = std::fs::remove_file(d.join("MD5SUMS"));
    });
    let o = klon(&["verify", s(&dir)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("klonvg-home.ext4-ptcl-img.zst"), "{}", stderr(&o));
    let target = t.join("target.img");
    garbage_file(&target, DISK_SIZE);
    let o = klon(&["restore", "--yes", s(&dir), s(&target)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("klonvg-home.ext4-ptcl-img.zst"), "{}", stderr(&o));
}
