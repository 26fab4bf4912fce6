//! Tests on temporary image files, checked against sgdisk and sfdisk.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::device::Disk;

const MIB: u64 = 1 << 20;

/// A temporary file, removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    /// A new sparse file of `size` bytes.
    fn new(tag: &str, size: u64) -> Tmp {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "klon-table-{}-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            tag
        ));
        let _ = std::fs::remove_file(&path);
        let f = std::fs::File::create(&path).expect("create temp file");
        f.set_len(size).expect("size temp file");
        Tmp(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn s(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }

    fn open(&self) -> Disk {
        Disk::open_source(&self.0).expect("open temp image")
    }

    fn write_at(&self, buf: &[u8], off: u64) {
        let d = Disk::open_target(&self.0, None).expect("open temp image rw");
        d.write_all_at(buf, off).expect("write temp image");
    }

    fn read_at(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.open().read_exact_at(&mut b, off).expect("read temp image");
        b
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a tool, feeding `stdin`; returns (success, stdout + stderr).
fn run_status(prog: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog} (install gdisk, fdisk, dosfstools): {e}"));
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    let out = child.wait_with_output().expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs a tool that must succeed; returns its stdout + stderr.
fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, text) = run_status(prog, args, stdin);
    assert!(ok, "{prog} {args:?} failed:\n{text}");
    text
}

fn sfdisk_json(img: &Tmp) -> serde_json::Value {
    let (ok, text) = run_status("sfdisk", &["--json", img.s()], None);
    assert!(ok, "sfdisk --json failed: {text}");
    serde_json::from_str(&text).expect("sfdisk json")
}

/// `sgdisk -i N` as key -> value.
fn sgdisk_info(img: &Tmp, n: u32) -> HashMap<String, String> {
    let text = run("sgdisk", &["-i", &n.to_string(), img.s()], None);
    text.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

/// First number in `s`.
fn first_num(s: &str) -> u64 {
    s.split(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number in {s:?}"))
}

fn sgdisk_verify_ok(img: &Tmp) {
    let (_, text) = run_status("sgdisk", &["-v", img.s()], None);
    assert!(text.contains("No problems found"), "sgdisk -v:\n{text}");
}

fn sfdisk_verify_ok(img: &Tmp) {
    let (ok, text) = run_status("sfdisk", &["-V", img.s()], None);
    assert!(ok && text.contains("No errors detected"), "sfdisk -V:\n{text}");
    assert!(!text.to_lowercase().contains("warn"), "sfdisk -V:\n{text}");
}

/// Compares a GPT layout with sgdisk's view (512-byte sectors).
fn check_against_sgdisk(img: &Tmp, layout: &DiskLayout) {
    layout.check().expect("a layout read from a disk passes DiskLayout::check");
    let p = run("sgdisk", &["-p", img.s()], None);
    let guid = p.lines().find_map(|l| l.strip_prefix("Disk identifier (GUID): ")).expect("disk GUID in sgdisk -p");
    assert_eq!(layout.disk_id.as_deref(), Some(guid.trim()));
    let usable = p.lines().find(|l| l.starts_with("First usable sector is")).expect("usable line");
    let g = layout.gpt.as_ref().expect("geometry");
    assert_eq!(g.first_usable_lba, first_num(usable));
    assert_eq!(g.last_usable_lba, first_num(usable.split_once("last usable sector is").expect("last").1));
    for part in &layout.partitions {
        let info = sgdisk_info(img, part.number);
        let ty = info["Partition GUID code"].split_whitespace().next().expect("type");
        assert_eq!(part.type_id, ty);
        assert_eq!(part.uuid.as_deref(), Some(info["Partition unique GUID"].as_str()));
        let first = first_num(&info["First sector"]);
        let last = first_num(&info["Last sector"]);
        assert_eq!(part.start, first * 512, "partition {}", part.number);
        assert_eq!(part.size, (last - first + 1) * 512, "partition {}", part.number);
        assert_eq!(part.attributes, u64::from_str_radix(&info["Attribute flags"], 16).expect("attrs"));
        let name = info["Partition name"].trim_matches('\'');
        assert_eq!(part.name, name);
        assert!(!part.logical);
    }
}

/// Compares a layout with `sfdisk --json` (GPT or dos).
fn check_against_sfdisk(img: &Tmp, layout: &DiskLayout) {
    layout.check().expect("a layout read from a disk passes DiskLayout::check");
    let ss = u64::from(layout.sector_size);
    let v = sfdisk_json(img);
    let t = &v["partitiontable"];
    assert_eq!(t["sectorsize"].as_u64(), Some(ss));
    let id = t["id"].as_str().expect("id");
    assert_eq!(layout.disk_id.as_deref(), Some(id));
    let mut numbers = Vec::new();
    for jp in t["partitions"].as_array().expect("partitions") {
        let node = jp["node"].as_str().expect("node");
        let number: u32 = node.rsplit(|c: char| !c.is_ascii_digit()).next().expect("num").parse().expect("num");
        let start = jp["start"].as_u64().expect("start") * ss;
        let size = jp["size"].as_u64().expect("size") * ss;
        let ty = jp["type"].as_str().expect("type");
        if layout.kind == TableKind::Mbr {
            let ty = u8::from_str_radix(ty, 16).expect("hex type");
            if matches!(ty, 0x05 | 0x0f | 0x85) {
                assert_eq!(layout.extended, Some((start, size)), "extended container");
                continue;
            }
            let p = layout.partitions.iter().find(|p| p.number == number).expect("partition in layout");
            assert_eq!(p.type_id, format!("0x{ty:02x}"));
            assert_eq!(p.attributes != 0, jp["bootable"].as_bool().unwrap_or(false));
            assert_eq!(p.logical, number >= 5);
            assert_eq!((p.start, p.size), (start, size), "partition {number}");
        } else {
            let p = layout.partitions.iter().find(|p| p.number == number).expect("partition in layout");
            assert_eq!(p.type_id, ty);
            assert_eq!(p.uuid.as_deref(), jp["uuid"].as_str());
            assert_eq!(p.name, jp["name"].as_str().unwrap_or(""));
            assert_eq!((p.start, p.size), (start, size), "partition {number}");
        }
        numbers.push(number);
    }
    let mut ours: Vec<u32> = layout.partitions.iter().map(|p| p.number).collect();
    ours.sort();
    numbers.sort();
    assert_eq!(ours, numbers);
    if layout.kind == TableKind::Gpt {
        let g = layout.gpt.as_ref().expect("geometry");
        assert_eq!(t["firstlba"].as_u64(), Some(g.first_usable_lba));
        assert_eq!(t["lastlba"].as_u64(), Some(g.last_usable_lba));
    }
}

/// What the engine does: copies the source into a new target file of
/// `target_size` bytes except the stale ranges.
fn copy_to_target(src: &Tmp, layout: &DiskLayout, target_size: u64) -> Tmp {
    let dst = Tmp::new("target", 0);
    std::fs::remove_file(dst.path()).expect("rm");
    let target = Disk::open_target(dst.path(), Some(target_size)).expect("create target");
    target.keep_created();
    let data = std::fs::read(src.path()).expect("read source");
    let stale = stale_ranges(layout, target_size);
    let mut pos = 0u64;
    for &(start, len) in stale.iter().chain([(data.len() as u64, 0)].iter()) {
        target.write_all_at(&data[pos as usize..start as usize], pos).expect("copy");
        pos = start + len;
    }
    dst
}

fn make_gpt_512(size: u64) -> Tmp {
    let img = Tmp::new("gpt512", size);
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+1M",
            "-t",
            "1:ef00",
            "-c",
            "1:ESP",
            "-n",
            "2:0:+2M",
            "-c",
            "2:data ä",
            "-A",
            "2:set:2",
            "-A",
            "2:set:60",
            "-n",
            "3:0:0",
            "-t",
            "3:8300",
            img.s(),
        ],
        None,
    );
    img
}

fn make_gpt_4096(size: u64) -> Tmp {
    // sfdisk 2.38 has no --sector-size; fdisk -b does, driven by its prompts.
    let img = Tmp::new("gpt4k", size);
    let script = "g\nn\n1\n256\n+1M\nn\n2\n\n+4M\nn\n3\n\n\nt\n1\nuefi\n\
                  x\nn\n1\nEFI-sys\nn\n2\nroot\nr\nw\n";
    run("fdisk", &["-b", "4096", img.s()], Some(script));
    img
}

/// Compares a 4096-byte-sector GPT layout with `fdisk -b 4096 -l`.
fn check_against_fdisk_4k(img: &Tmp, layout: &DiskLayout) {
    layout.check().expect("a layout read from a disk passes DiskLayout::check");
    let text = run("fdisk", &["-l", "-b", "4096", "-o", "Device,Start,End,Type-UUID,UUID,Name", img.s()], None);
    let id = text.lines().find_map(|l| l.strip_prefix("Disk identifier: ")).expect("disk id");
    assert_eq!(layout.disk_id.as_deref(), Some(id.trim()));
    let rows: Vec<Vec<&str>> =
        text.lines().filter(|l| l.starts_with(img.s())).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), layout.partitions.len());
    for (row, p) in rows.iter().zip(&layout.partitions) {
        let number: u32 = row[0][img.s().len()..].parse().expect("number");
        let (start, end): (u64, u64) = (row[1].parse().expect("start"), row[2].parse().expect("end"));
        assert_eq!(p.number, number);
        assert_eq!((p.start, p.size), (start * 4096, (end - start + 1) * 4096), "partition {number}");
        assert_eq!(p.type_id, row[3]);
        assert_eq!(p.uuid.as_deref(), Some(row[4]));
        assert_eq!(p.name, row.get(5).copied().unwrap_or(""));
    }
}

/// `fdisk -b 4096` verify ('v') reports no problems.
fn fdisk_verify_4k_ok(img: &Tmp) {
    let text = run("fdisk", &["-b", "4096", img.s()], Some("v\nq\n"));
    assert!(text.contains("No errors detected"), "fdisk v:\n{text}");
    assert!(!text.contains("corrupt") && !text.contains("not on the end"), "fdisk v:\n{text}");
}

fn make_mbr_logical(size: u64) -> Tmp {
    let img = Tmp::new("mbr", size);
    let script = "label: dos\n\
                  label-id: 0x1a2b3c4d\n\
                  start=2048, size=4096, type=83, bootable\n\
                  start=6144, size=2048, type=7\n\
                  start=8192, size=16384, type=5\n\
                  start=10240, size=2048, type=83\n\
                  start=14336, size=4096, type=82\n";
    run("sfdisk", &["-q", img.s()], Some(script));
    img
}

#[test]
fn gpt_512_matches_sgdisk_and_sfdisk() {
    let img = make_gpt_512(16 * MIB);
    let layout = read_layout(&img.open()).expect("read");
    assert_eq!(layout.kind, TableKind::Gpt);
    assert_eq!(layout.sector_size, 512);
    assert_eq!(layout.disk_size, 16 * MIB);
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    assert_eq!(layout.partitions.len(), 3);
    assert_eq!(layout.partitions[0].type_id, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!(layout.partitions[1].name, "data ä");
    assert_eq!(layout.partitions[1].attributes, (1 << 2) | (1 << 60));
    let g = layout.gpt.as_ref().expect("geometry");
    assert_eq!((g.primary_entries_lba, g.num_entries, g.entry_size), (2, 128, 128));
    assert_eq!((g.backup_header_lba, g.backup_entries_lba), (32767, 32767 - 32));
    check_against_sgdisk(&img, &layout);
    check_against_sfdisk(&img, &layout);
    assert_eq!(stale_ranges(&layout, 16 * MIB), vec![]);
    assert_eq!(stale_ranges(&layout, 32 * MIB), vec![((32767 - 32) * 512, 33 * 512)]);
    // serde round trip
    let json = serde_json::to_string(&layout).expect("json");
    assert!(!json.contains("warnings") && !json.contains("primary_valid"));
    assert_eq!(serde_json::from_str::<DiskLayout>(&json).expect("parse"), layout);
}

#[test]
fn gpt_4096_matches_sfdisk() {
    let img = make_gpt_4096(64 * MIB);
    let layout = read_layout(&img.open()).expect("read");
    assert_eq!(layout.kind, TableKind::Gpt);
    assert_eq!(layout.sector_size, 4096);
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    assert_eq!(layout.partitions.len(), 3);
    assert_eq!(layout.partitions[0].name, "EFI-sys");
    assert_eq!(layout.partitions[0].start, 256 * 4096);
    let g = layout.gpt.as_ref().expect("geometry");
    let last = 64 * MIB / 4096 - 1;
    assert_eq!((g.backup_header_lba, g.backup_entries_lba), (last, last - 4));
    check_against_fdisk_4k(&img, &layout);
    assert_eq!(stale_ranges(&layout, 128 * MIB), vec![((last - 4) * 4096, 5 * 4096)]);

    // Damaged primary: the backup at the last 4096-byte LBA is found.
    damage(&img, 1, 4096);
    let fallback = read_layout(&img.open()).expect("read");
    assert_eq!((fallback.kind, fallback.sector_size), (TableKind::Gpt, 4096));
    assert_eq!(fallback.partitions, layout.partitions);
    assert!(fallback.warnings[0].starts_with("primary GPT"), "{:?}", fallback.warnings);
    fallback.check().expect("a layout read from the backup GPT passes DiskLayout::check");
    let dst = copy_to_target(&img, &fallback, 80 * MIB);
    fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &fallback, false).expect("fix");
    fdisk_verify_4k_ok(&dst);
    assert_eq!(read_layout(&dst.open()).expect("read"), layout_for_target(&fallback, 80 * MIB, false));
}

#[test]
fn gpt_needs_protective_mbr_unless_sector0_is_empty() {
    let img = make_gpt_512(16 * MIB);
    let good = read_layout(&img.open()).expect("read");
    // Sector 0 wiped: still GPT, with a warning.
    img.write_at(&[0u8; 512], 0);
    let l = read_layout(&img.open()).expect("read");
    assert_eq!((l.kind, &l.partitions), (TableKind::Gpt, &good.partitions));
    assert!(l.warnings[0].contains("protective"), "{:?}", l.warnings);
    // A real MBR in sector 0 wins over GPT headers (as in Linux and libblkid).
    let mut s = vec![0u8; 512];
    put_entry(&mut s, 0, 0x80, 0x0c, 2048, 4096);
    img.write_at(&with_sig(s), 0);
    let l = read_layout(&img.open()).expect("read");
    assert_eq!((l.kind, l.partitions.len()), (TableKind::Mbr, 1));
    assert!(l.warnings[0].contains("ignored GPT"), "{:?}", l.warnings);
}

#[test]
fn mbr_with_logical_partitions_matches_sfdisk() {
    let img = make_mbr_logical(16 * MIB);
    let layout = read_layout(&img.open()).expect("read");
    assert_eq!(layout.kind, TableKind::Mbr);
    assert_eq!(layout.disk_id.as_deref(), Some("0x1a2b3c4d"));
    let numbers: Vec<u32> = layout.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 2, 5, 6]);
    assert_eq!(layout.extended, Some((8192 * 512, 16384 * 512)));
    assert_eq!(layout.partitions[2].start, 10240 * 512);
    assert_eq!(layout.partitions[0].attributes, 0x80);
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    check_against_sfdisk(&img, &layout);
    assert_eq!(stale_ranges(&layout, 64 * MIB), vec![]);
}

#[test]
fn whole_disk_filesystems_and_blank_are_no_table() {
    for (tag, args) in [("fat12", vec![]), ("fat16", vec!["-F", "16"]), ("fat32", vec!["-F", "32"])] {
        let img = Tmp::new(tag, 40 * MIB);
        let mut a: Vec<&str> = args.clone();
        a.push(img.s());
        run("mkfs.vfat", &a, None);
        let layout = read_layout(&img.open()).expect("read");
        assert_eq!(layout.kind, TableKind::None, "{tag}");
        assert!(layout.partitions.is_empty());
    }
    let blank = Tmp::new("blank", 4 * MIB);
    let layout = read_layout(&blank.open()).expect("read");
    assert_eq!(layout, DiskLayout::no_table(512, 4 * MIB));
    let tiny = Tmp::new("tiny", 100);
    assert_eq!(read_layout(&tiny.open()).expect("read").kind, TableKind::None);

    // NTFS and exFAT boot sectors (synthetic: name, jump, signature).
    for (oem, jump) in [(b"NTFS    ", [0xEB, 0x52, 0x90]), (b"EXFAT   ", [0xEB, 0x76, 0x90])] {
        let img = Tmp::new("fsboot", 4 * MIB);
        let mut s = vec![0u8; 512];
        s[0..3].copy_from_slice(&jump);
        s[3..11].copy_from_slice(oem);
        // boot code bytes where MBR entries would be
        s[446..510].iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        s[510] = 0x55;
        s[511] = 0xAA;
        img.write_at(&s, 0);
        assert_eq!(read_layout(&img.open()).expect("read").kind, TableKind::None);
    }
}

#[test]
fn gpt_to_larger_target_passes_sgdisk_verify() {
    let src = make_gpt_512(16 * MIB);
    let layout = read_layout(&src.open()).expect("read");
    let dst = copy_to_target(&src, &layout, 40 * MIB);
    let written = fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &layout, false).expect("fix");
    sgdisk_verify_ok(&dst);
    let after = read_layout(&dst.open()).expect("read target");
    assert_eq!(after, layout_for_target(&layout, 40 * MIB, false));
    let last = 40 * MIB / 512 - 1;
    assert_eq!(after.gpt.as_ref().expect("geometry").last_usable_lba, last - 33);
    assert_eq!(after.partitions, layout.partitions);
    check_against_sgdisk(&dst, &after);
    // Written: MBR, primary header, backup entries + header.
    assert_eq!(written, vec![(0, 512), (512, 512), ((last - 32) * 512, 32 * 512), (last * 512, 512)]);
    // Everything outside the written ranges equals the source.
    let s = std::fs::read(src.path()).expect("read");
    let d = std::fs::read(dst.path()).expect("read");
    let stale = (16 * MIB / 512 - 1 - 32) as usize * 512;
    assert_eq!(stale_ranges(&layout, 40 * MIB), vec![(stale as u64, 33 * 512)]);
    assert!(s[1024..stale] == d[1024..stale], "target differs from source outside the written ranges");
    // The protective MBR covers the new disk.
    let mbr = dst.read_at(446, 16);
    assert_eq!(mbr[4], 0xEE);
    assert_eq!(u32::from_le_bytes(mbr[12..16].try_into().expect("4")) as u64, last);
}

#[test]
fn gpt_grow_last_ends_at_last_usable() {
    let src = make_gpt_512(16 * MIB);
    let layout = read_layout(&src.open()).expect("read");
    let dst = copy_to_target(&src, &layout, 40 * MIB);
    fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &layout, true).expect("fix");
    sgdisk_verify_ok(&dst);
    let after = read_layout(&dst.open()).expect("read target");
    assert_eq!(after, layout_for_target(&layout, 40 * MIB, true));
    check_against_sgdisk(&dst, &after);
    let info = sgdisk_info(&dst, 3);
    assert_eq!(first_num(&info["Last sector"]), 40 * MIB / 512 - 34);
    assert_eq!(after.partitions[..2], layout.partitions[..2]);

    // Same size: nothing without grow_last; grow_last grows to the end.
    let same = copy_to_target(&src, &layout, 16 * MIB);
    let d = Disk::open_target(same.path(), None).expect("open");
    assert_eq!(fix_up_for_target(&d, &layout, false).expect("fix"), vec![]);
    assert_eq!(layout_for_target(&layout, 16 * MIB, false), layout);
    fix_up_for_target(&d, &layout, true).expect("fix");
    sgdisk_verify_ok(&same);
    assert_eq!(read_layout(&same.open()).expect("read"), layout_for_target(&layout, 16 * MIB, true));
}

#[test]
fn gpt_4096_to_larger_target_passes_sfdisk_verify() {
    let src = make_gpt_4096(64 * MIB);
    let layout = read_layout(&src.open()).expect("read");
    for grow in [false, true] {
        let dst = copy_to_target(&src, &layout, 100 * MIB);
        fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &layout, grow).expect("fix");
        fdisk_verify_4k_ok(&dst);
        let after = read_layout(&dst.open()).expect("read target");
        assert_eq!(after, layout_for_target(&layout, 100 * MIB, grow));
        assert!(after.warnings.is_empty(), "{:?}", after.warnings);
        check_against_fdisk_4k(&dst, &after);
        let last = after.partitions.last().expect("last");
        let g = after.gpt.as_ref().expect("geometry");
        assert_eq!(g.backup_header_lba, 100 * MIB / 4096 - 1);
        if grow {
            assert_eq!(last.start + last.size, (g.last_usable_lba + 1) * 4096);
        } else {
            assert_eq!(last, layout.partitions.last().expect("last"));
        }
    }
}

/// Sector `lba` of a 512-byte-sector image, 16-byte entry `slot`.
fn mbr_entry(img: &Tmp, lba: u64, slot: u64) -> Vec<u8> {
    img.read_at(lba * 512 + 446 + 16 * slot, 16)
}

#[test]
fn mbr_grow_last_logical_matches_sfdisk() {
    let src = make_mbr_logical(16 * MIB);
    let layout = read_layout(&src.open()).expect("read");
    let target_size = 64 * MIB;
    let dst = copy_to_target(&src, &layout, target_size);
    let d = Disk::open_target(dst.path(), None).expect("open");
    assert_eq!(fix_up_for_target(&d, &layout, false).expect("fix"), vec![]);
    let written = fix_up_for_target(&d, &layout, true).expect("fix");
    // MBR, the EBR of partition 6 (at 12288) and its link in the first EBR.
    assert_eq!(written, vec![(0, 512), (8192 * 512, 512), (12288 * 512, 512)]);
    sfdisk_verify_ok(&dst);
    let after = read_layout(&dst.open()).expect("read target");
    let expected = layout_for_target(&layout, target_size, true);
    assert_eq!(after, expected);
    check_against_sfdisk(&dst, &after);
    let total = target_size / 512;
    assert_eq!(after.extended, Some((8192 * 512, (total - 8192) * 512)));
    let p6 = after.partitions.iter().find(|p| p.number == 6).expect("p6");
    assert_eq!(p6.start + p6.size, target_size);

    // The same layout made by sfdisk directly on the larger disk has the
    // same table sectors, byte for byte (sizes, links and CHS).
    let direct = Tmp::new("direct", target_size);
    let script = format!(
        "label: dos\nlabel-id: 0x1a2b3c4d\n\
         start=2048, size=4096, type=83, bootable\n\
         start=6144, size=2048, type=7\n\
         start=8192, size={}, type=5\n\
         start=10240, size=2048, type=83\n\
         start=14336, size={}, type=82\n",
        total - 8192,
        total - 14336
    );
    run("sfdisk", &["-q", direct.s()], Some(&script));
    for (lba, slot) in [(0, 0), (0, 1), (0, 2), (0, 3), (8192, 0), (8192, 1), (12288, 0), (12288, 1)] {
        assert_eq!(mbr_entry(&dst, lba, slot), mbr_entry(&direct, lba, slot), "entry {slot} of sector {lba}");
    }
}

#[test]
fn mbr_grow_last_primary() {
    let src = Tmp::new("mbrp", 16 * MIB);
    run(
        "sfdisk",
        &["-q", src.s()],
        Some("label: dos\nstart=2048, size=4096, type=c\nstart=6144, size=8192, type=83\n"),
    );
    let layout = read_layout(&src.open()).expect("read");
    let dst = copy_to_target(&src, &layout, 48 * MIB);
    let written = fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &layout, true).expect("fix");
    assert_eq!(written, vec![(0, 512)]);
    sfdisk_verify_ok(&dst);
    let after = read_layout(&dst.open()).expect("read target");
    assert_eq!(after, layout_for_target(&layout, 48 * MIB, true));
    assert_eq!(after.partitions[1].start + after.partitions[1].size, 48 * MIB);
    check_against_sfdisk(&dst, &after);
}

/// Breaks the header CRC of the GPT header at `lba`.
fn damage(img: &Tmp, lba: u64, ss: u64) {
    img.write_at(b"XX", lba * ss + 16);
}

#[test]
fn damaged_primary_gpt_falls_back_to_backup() {
    let img = make_gpt_512(16 * MIB);
    let good = read_layout(&img.open()).expect("read");
    damage(&img, 1, 512);
    let layout = read_layout(&img.open()).expect("read");
    assert_eq!(layout.kind, TableKind::Gpt);
    assert_eq!(layout.partitions, good.partitions);
    assert_eq!(layout.disk_id, good.disk_id);
    assert_eq!(layout.warnings.len(), 1, "{:?}", layout.warnings);
    assert!(layout.warnings[0].contains("primary GPT"), "{:?}", layout.warnings);
    assert!(!layout.gpt.as_ref().expect("geometry").primary_valid);

    // Restored to a larger disk: the GPT is rebuilt from the layout and whole again.
    let dst = copy_to_target(&img, &layout, 32 * MIB);
    fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &layout, false).expect("fix");
    sgdisk_verify_ok(&dst);
    let after = read_layout(&dst.open()).expect("read");
    assert_eq!(after, layout_for_target(&layout, 32 * MIB, false));
    assert!(after.warnings.is_empty());
    // Same size: repaired in place.
    let same = copy_to_target(&img, &layout, 16 * MIB);
    fix_up_for_target(&Disk::open_target(same.path(), None).expect("open"), &layout, false).expect("fix");
    sgdisk_verify_ok(&same);
    assert_eq!(read_layout(&same.open()).expect("read"), good);

    // Damaged entry array (header fine) counts as damaged too.
    let img2 = make_gpt_512(16 * MIB);
    let good2 = read_layout(&img2.open()).expect("read");
    img2.write_at(b"garbage", 2 * 512 + 200);
    let l2 = read_layout(&img2.open()).expect("read");
    assert_eq!(l2.partitions, good2.partitions);
    assert!(l2.warnings[0].contains("CRC"), "{:?}", l2.warnings);

    // Both copies damaged: the protective MBR makes it an error.
    damage(&img, 16 * MIB / 512 - 1, 512);
    match read_layout(&img.open()) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("protective"), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // ... and without it there is no table.
    img.write_at(&[0u8; 512], 0);
    assert_eq!(read_layout(&img.open()).expect("read").kind, TableKind::None);
}

#[test]
fn damaged_backup_gpt_warns_and_is_repaired() {
    let img = make_gpt_512(16 * MIB);
    let good = read_layout(&img.open()).expect("read");
    damage(&img, 16 * MIB / 512 - 1, 512);
    let layout = read_layout(&img.open()).expect("read");
    assert_eq!(layout.partitions, good.partitions);
    assert!(layout.warnings[0].starts_with("backup GPT"), "{:?}", layout.warnings);
    let same = copy_to_target(&img, &layout, 16 * MIB);
    fix_up_for_target(&Disk::open_target(same.path(), None).expect("open"), &layout, false).expect("fix");
    sgdisk_verify_ok(&same);
    assert_eq!(read_layout(&same.open()).expect("read"), good);
}

/// Writes a valid MBR entry.
fn put_entry(sector: &mut [u8], slot: usize, status: u8, ptype: u8, start: u32, size: u32) {
    let e = &mut sector[446 + 16 * slot..462 + 16 * slot];
    e[0] = status;
    e[4] = ptype;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&size.to_le_bytes());
}

fn with_sig(mut s: Vec<u8>) -> Vec<u8> {
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

#[test]
fn bad_mbrs_are_refused() {
    let img = Tmp::new("badmbr", 8 * MIB);
    // Overlap: names both partitions.
    let mut s = vec![0u8; 512];
    put_entry(&mut s, 0, 0, 0x83, 2048, 4096);
    put_entry(&mut s, 1, 0, 0x83, 4000, 100);
    img.write_at(&with_sig(s), 0);
    match read_layout(&img.open()) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("partitions 1 and 2 overlap"), "{msg}"),
        other => panic!("expected overlap error, got {other:?}"),
    }
    // Beyond the end of the disk.
    let mut s = vec![0u8; 512];
    put_entry(&mut s, 0, 0x80, 0x83, 2048, 100_000);
    img.write_at(&with_sig(s), 0);
    assert!(matches!(read_layout(&img.open()), Err(Error::Unsupported(_))));
    // Invalid status byte: not an MBR.
    let mut s = vec![0u8; 512];
    put_entry(&mut s, 0, 0x12, 0x83, 2048, 100);
    img.write_at(&with_sig(s), 0);
    assert_eq!(read_layout(&img.open()).expect("read").kind, TableKind::None);
    // EBR chain looping back on itself.
    let mut s = vec![0u8; 512];
    put_entry(&mut s, 0, 0, 0x05, 2048, 8192);
    img.write_at(&with_sig(s), 0);
    let mut ebr = vec![0u8; 512];
    put_entry(&mut ebr, 0, 0, 0x83, 63, 100);
    put_entry(&mut ebr, 1, 0, 0x05, 1024, 200);
    img.write_at(&with_sig(ebr.clone()), 2048 * 512);
    let mut ebr2 = vec![0u8; 512];
    put_entry(&mut ebr2, 0, 0, 0x83, 63, 100);
    put_entry(&mut ebr2, 1, 0, 0x05, 0, 200); // relative 0: back to the first EBR
    img.write_at(&with_sig(ebr2), 3072 * 512);
    assert!(matches!(read_layout(&img.open()), Err(Error::Unsupported(_))));
    put_entry(&mut ebr, 1, 0, 0x05, 9000, 200); // outside the container
    img.write_at(&with_sig(ebr), 2048 * 512);
    assert!(matches!(read_layout(&img.open()), Err(Error::Unsupported(_))));
    // An empty MBR is an MBR without partitions.
    img.write_at(&with_sig(vec![0u8; 512]), 0);
    let l = read_layout(&img.open()).expect("read");
    assert_eq!((l.kind, l.partitions.len()), (TableKind::Mbr, 0));
}

/// xorshift64*: deterministic pseudo-random bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A GPT header sector with the given fields and a correct CRC.
fn gpt_header(fields: &[(usize, u64, usize)], rng: &mut Rng) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    if rng.below(4) == 0 {
        rng.fill(&mut h[92..]);
    }
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    for &(off, v, len) in fields {
        h[off..off + len].copy_from_slice(&v.to_le_bytes()[..len]);
    }
    let size = u32::from_le_bytes(h[12..16].try_into().expect("4")).min(512) as usize;
    let crc = crc32fast::hash(&h[..size]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

#[test]
fn random_data_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let img = Tmp::new("fuzz", 2 * MIB);
    let total = 2 * MIB / 512;
    // Random sector 0 (with signature, plausible status bytes) and random EBRs.
    for i in 0..300 {
        let mut s = vec![0u8; 512];
        rng.fill(&mut s);
        if i % 2 == 0 {
            for slot in 0..4 {
                s[446 + 16 * slot] = if rng.below(2) == 0 { 0 } else { 0x80 };
                if rng.below(2) == 0 {
                    let start = rng.below(total + 10) as u32;
                    let size = rng.below(total) as u32;
                    put_entry(&mut s, slot, 0, [0x05, 0x0f, 0x83, 0xee][rng.below(4) as usize], start, size);
                }
            }
        }
        img.write_at(&with_sig(s), 0);
        let mut e = vec![0u8; 512];
        for _ in 0..4 {
            rng.fill(&mut e);
            e[446 + 16] = 0x05;
            img.write_at(&with_sig(e.clone()), rng.below(total) * 512);
        }
        let _ = read_layout(&img.open());
    }
    // Random GPT headers with valid CRCs, random entry arrays with valid CRCs.
    let blank = vec![0u8; 2 * MIB as usize];
    let mut outcomes: HashMap<String, u32> = HashMap::new();
    for i in 0..400 {
        img.write_at(&blank, 0);
        let mut mbr = vec![0u8; 512];
        put_entry(&mut mbr, 0, 0, 0xEE, 1, (total - 1) as u32);
        img.write_at(&with_sig(mbr), 0);
        let num = [0, 1, 4, 128, 129, 5000, u32::MAX as u64][rng.below(7) as usize];
        let esize = [0, 64, 128, 128, 128, 256, 200, u32::MAX as u64][rng.below(8) as usize];
        let pick = |rng: &mut Rng, sane: u64| if rng.below(6) == 0 { rng.next() } else { sane };
        let entries_lba = pick(&mut rng, 2);
        let fields = [
            (24, 1, 8),
            (32, pick(&mut rng, total - 1), 8),
            (40, pick(&mut rng, 34), 8),
            (48, pick(&mut rng, total - 34), 8),
            (72, entries_lba, 8),
            (80, num, 4),
            (84, esize, 4),
        ];
        // Entries: random, with a valid CRC when they fit.
        let mut entries = vec![0u8; 16384];
        rng.fill(&mut entries);
        if i % 3 == 0 {
            // Plausible LBAs in some entries.
            for k in 0..128 {
                let first = rng.below(total + 5);
                let last = first + rng.below(total);
                entries[k * 128 + 32..k * 128 + 40].copy_from_slice(&first.to_le_bytes());
                entries[k * 128 + 40..k * 128 + 48].copy_from_slice(&last.to_le_bytes());
            }
        }
        let n = (num.saturating_mul(esize) as usize).min(entries.len());
        let crc = crc32fast::hash(&entries[..n]) as u64;
        let mut all = fields.to_vec();
        all.push((88, crc, 4));
        if rng.below(5) == 0 {
            all.push((12, rng.below(600), 4));
        }
        img.write_at(&gpt_header(&all, &mut rng), 512);
        if entries_lba < total - 40 {
            img.write_at(&entries, entries_lba * 512);
        }
        if rng.below(2) == 0 {
            let mut b = all.clone();
            b[0] = (24, total - 1, 8);
            b[1] = (32, 1, 8);
            b[4] = (72, total - 33, 8);
            img.write_at(&gpt_header(&b, &mut rng), (total - 1) * 512);
            img.write_at(&entries, (total - 33) * 512);
        }
        let result = read_layout(&img.open());
        *outcomes
            .entry(match &result {
                Ok(l) => format!("{:?}", l.kind),
                Err(e) => format!("err {}", e.to_string().split_whitespace().take(2).collect::<Vec<_>>().join(" ")),
            })
            .or_insert(0) += 1;
        if let Ok(layout) = result {
            // Whatever was read can be planned and fixed up without panicking.
            let _ = stale_ranges(&layout, 4 * MIB);
            let _ = layout_for_target(&layout, 4 * MIB, true);
            let dst = copy_to_target(&img, &layout, 4 * MIB);
            let _ = fix_up_for_target(&Disk::open_target(dst.path(), None).expect("open"), &layout, true);
        }
    }
    eprintln!("random GPT outcomes: {outcomes:?}");
    assert!(outcomes.get("Gpt").copied().unwrap_or(0) > 0, "{outcomes:?}");
}

#[test]
fn guid_text_round_trips() {
    let g = gpt::guid_from_string("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").expect("guid");
    assert_eq!(g[..4], [0x28, 0x73, 0x2A, 0xC1]);
    assert_eq!(gpt::guid_to_string(&g), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert!(gpt::guid_from_string("C12A7328F81F11D2BA4B00A0C93EC93B").is_none());
}

#[test]
fn smaller_target_is_refused() {
    let src = make_gpt_512(16 * MIB);
    let layout = read_layout(&src.open()).expect("read");
    let dst = Tmp::new("small", 8 * MIB);
    let d = Disk::open_target(dst.path(), None).expect("open");
    assert!(matches!(fix_up_for_target(&d, &layout, false), Err(Error::Refused(_))));
}

/// Layouts no disk can have, as a forged manifest may carry them, are
/// refused by `DiskLayout::check` with the reason; the real ones (and what
/// they become on a larger target) pass.
#[test]
fn impossible_layouts_fail_the_check() {
    let img = make_gpt_512(64 * MIB);
    let good = read_layout(&img.open()).expect("read");
    good.check().expect("real GPT layout");
    layout_for_target(&good, 96 * MIB, true).check().expect("the layout on a larger target");
    let mbr = make_mbr_logical(64 * MIB);
    let good_mbr = read_layout(&mbr.open()).expect("read");
    good_mbr.check().expect("real MBR layout");

    let fails = |edit: &dyn Fn(&mut DiskLayout), base: &DiskLayout, why: &str| {
        let mut l = base.clone();
        edit(&mut l);
        let e = l.check().expect_err(why);
        assert!(e.contains(why), "{e} (expected {why:?})");
    };
    fails(&|l| l.gpt = None, &good, "GPT layout without its geometry");
    fails(&|l| l.sector_size = 0, &good, "sector size 0");
    fails(&|l| l.sector_size = 3000, &good, "sector size 3000");
    fails(&|l| l.partitions[1].size = 128 * MIB, &good, "partition 2 reaches past the end");
    fails(&|l| l.partitions[1].start += 1, &good, "sector boundaries");
    fails(&|l| l.partitions[1].number = 1, &good, "number 1 is used twice");
    fails(&|l| l.partitions[0].start = 1024, &good, "outside the usable area");
    fails(&|l| l.partitions[1].start = l.partitions[0].start, &good, "overlap");
    fails(
        &|l| {
            let p = l.partitions[0].clone();
            l.partitions = (1..=300).map(|n| Partition { number: n, ..p.clone() }).collect();
        },
        &good,
        "300 partitions",
    );
    fails(&|l| l.gpt.as_mut().unwrap().backup_header_lba = 1 << 40, &good, "backup copy");
    fails(&|l| l.gpt.as_mut().unwrap().last_usable_lba = 1 << 40, &good, "usable sectors");
    fails(&|l| l.gpt.as_mut().unwrap().entry_size = 100, &good, "entry array");
    fails(&|l| l.gpt.as_mut().unwrap().num_entries = 1, &good, "does not fit the entry array");
    fails(&|l| l.kind = TableKind::None, &good, "without a partition table has partitions");
    let logical = good_mbr.partitions.iter().position(|p| p.logical).expect("a logical partition");
    fails(&|l| l.partitions[logical].number = 3, &good_mbr, "cannot be in an MBR");
    fails(&|l| l.extended = None, &good_mbr, "cannot be in an MBR");
}

#[test]
fn partition_types_are_named_as_fdisk_names_them() {
    assert_eq!(type_name("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), Some("EFI System"));
    assert_eq!(type_name("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"), Some("EFI System"));
    assert_eq!(type_name("E6D6D379-F507-44C2-A23C-238F2A3DF928"), Some("Linux LVM"));
    assert_eq!(type_name("0x83"), Some("Linux"));
    assert_eq!(type_name("0x07"), Some("HPFS/NTFS/exFAT"));
    assert_eq!(type_name("0x99"), None);
    assert_eq!(type_name("12345678-1234-1234-1234-123456789ABC"), None);
    assert_eq!(type_name("EFI"), None, "a constant's name is not a type id");
}
