//! A disk shaped like a default Proxmox VE install: BIOS boot partition,
//! ESP, and an LVM2 PV holding `root` (ext4), `swap`, and the thin pool
//! `data` with a VM disk (its own GPT and ext4), a container volume
//! (ext4) and a thin snapshot of the container, with stale random data
//! in unmapped pool blocks, in mapped blocks the filesystems do not use,
//! and in free extents.
//!
//! The fixture is made without device-mapper: the group's metadata with
//! vgcfgrestore, the pool's metadata with thin_restore from XML written
//! here, the data blocks where that XML maps them. The restored disk is
//! checked by oracles that are not klon: lvs and vgcfgbackup read the
//! group, thin_check and thin_dump the pool's metadata, each thin volume
//! is put together from the data blocks thin_dump names and checked by
//! e2fsck and its files.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::disks::*;
use common::loop_device::LoopDevice;
use common::lvm_tools::lvm;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const EXTENT: u64 = 4 * MIB;
const CHUNK: u64 = 64 * 1024;
const PV_SIZE: u64 = 160 * MIB;
/// Data blocks of the pool (its data volume: 16 extents).
const DATA_BLOCKS: u64 = 1024;
/// Filesystem block of the ext4s made here.
const FS_BLOCK: u64 = 4096;

/// Logical volumes: name, first extent on the PV (linear) or None,
/// extents.
const LINEAR: &[(&str, u64, u64, bool)] = &[
    ("root", 0, 6, true),
    ("swap", 6, 1, true),
    ("lvol0_pmspare", 7, 1, false),
    ("data_tmeta", 8, 1, false),
    ("data_tdata", 9, 16, false),
];
/// Thin volumes: name, extents, device id, origin.
const THIN: &[(&str, u64, u64, Option<&str>)] = &[
    ("vm-100-disk-0", 12, 1, None),
    ("vm-101-disk-0", 8, 2, None),
    ("snap_vm-101-disk-0_before", 8, 3, Some("vm-101-disk-0")),
];

fn lvs_text() -> String {
    let mut t = String::from("\n\tlogical_volumes {\n");
    for (i, (name, first, count, visible)) in LINEAR.iter().enumerate() {
        let status = if *visible { r#"["READ", "WRITE", "VISIBLE"]"# } else { r#"["READ", "WRITE"]"# };
        t += &format!(
            "\t\t{name} {{\n\t\t\tid = \"aaaaaa-bbbb-cccc-dddd-eeee-ffff-1000{i:02}\"\n\t\t\tstatus = {status}\n\
             \t\t\tflags = []\n\t\t\tsegment_count = 1\n\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\
             \t\t\t\textent_count = {count}\n\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = 1\n\
             \t\t\t\tstripes = [\n\t\t\t\t\t\"pv0\", {first}\n\t\t\t\t]\n\t\t\t}}\n\t\t}}\n"
        );
    }
    t += "\t\tdata {\n\t\t\tid = \"aaaaaa-bbbb-cccc-dddd-eeee-ffff-200000\"\n\
          \t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n\t\t\tsegment_count = 1\n\
          \t\t\tsegment1 {\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = 16\n\t\t\t\ttype = \"thin-pool\"\n\
          \t\t\t\tmetadata = \"data_tmeta\"\n\t\t\t\tpool = \"data_tdata\"\n\t\t\t\ttransaction_id = 3\n\
          \t\t\t\tchunk_size = 128\n\t\t\t\tdiscards = \"passdown\"\n\t\t\t\tzero_new_blocks = 1\n\t\t\t}\n\t\t}\n";
    for (name, count, dev, origin) in THIN {
        let origin = origin.map(|o| format!("\t\t\t\torigin = \"{o}\"\n")).unwrap_or_default();
        t += &format!(
            "\t\t{name} {{\n\t\t\tid = \"aaaaaa-bbbb-cccc-dddd-eeee-ffff-3000{dev:02}\"\n\
             \t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n\t\t\tsegment_count = 1\n\
             \t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {count}\n\t\t\t\ttype = \"thin\"\n\
             \t\t\t\tthin_pool = \"data\"\n\t\t\t\ttransaction_id = {}\n\t\t\t\tdevice_id = {dev}\n{origin}\
             \t\t\t}}\n\t\t}}\n",
            dev - 1
        );
    }
    t + "\t}\n"
}

/// What LVM's tools say of the group on `pv` (a file holding the PV):
/// every volume's name, attributes, size, pool, origin, thin id and
/// extents, and the first extent's offset.
fn lvm_report(pv: &Path, vg: &str) -> (String, u64) {
    let dev = LoopDevice::attach_without_partitions(pv);
    let lvs = lvm(
        "lvs",
        &[
            "-a",
            "--noheadings",
            "--units",
            "b",
            "-o",
            "lv_name,lv_attr,lv_size,pool_lv,origin,thin_id,seg_pe_ranges,segtype",
            vg,
        ],
    );
    let pe = lvm("pvs", &["--noheadings", "--units", "b", "-o", "pe_start", s(&dev.path)]);
    drop(dev);
    // The PE ranges name the loop device; keep the extents.
    let lvs: String = lvs
        .lines()
        .map(|l| l.split_whitespace().map(|w| w.rsplit(':').next().unwrap()).collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    (lvs, pe.trim().trim_end_matches('B').parse().unwrap())
}

/// The 4 KiB blocks an ext4 image uses, by dumpe2fs's free lists.
fn used_blocks(img: &Path) -> BTreeSet<u64> {
    let out = run("dumpe2fs", &[s(img)]);
    let count: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("dumpe2fs gives the block count");
    let mut used: BTreeSet<u64> = (0..count).collect();
    // Per group (indented; the summary line is not).
    for l in out.lines().filter_map(|l| l.strip_prefix("  Free blocks: ")) {
        for r in l.split(", ").filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            for blk in a.parse::<u64>().unwrap()..=b.parse::<u64>().unwrap() {
                used.remove(&blk);
            }
        }
    }
    used
}

fn make_ext4(img: &Path, size: u64, tree: &Path) {
    blank_file(img, size);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-b", "4096", "-E", "nodiscard", "-d", s(tree), s(img)]);
}

struct Fixture {
    disk: PathBuf,
    pv_start: u64,
    pe_start: u64,
    lvs: String,
    thin_dump: String,
    /// The trees each volume's files come from.
    trees: BTreeMap<&'static str, PathBuf>,
    /// Bytes the filesystems use, with the PV's metadata and what klon
    /// stores whole: what a backup should store, at most.
    expected: u64,
    /// Bytes of stale data in mapped blocks the filesystems do not use.
    stale_mapped: u64,
}

fn tree(t: &TempDir, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = t.join(name);
    for (f, bytes) in files {
        let p = dir.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    dir
}

fn fixture(t: &TempDir, vg: &str) -> Fixture {
    // The PV: stale random data everywhere LVM does not write.
    let pv = t.join("pv.img");
    std::fs::write(&pv, random_bytes(300, PV_SIZE as usize)).unwrap();
    let dev = LoopDevice::attach_without_partitions(&pv);
    lvm("pvcreate", &["-q", s(&dev.path)]);
    lvm("vgcreate", &["-q", "-s", "4m", vg, s(&dev.path)]);
    let text = t.join("vg.txt");
    lvm("vgcfgbackup", &["-q", "-f", s(&text), vg]);
    let base = std::fs::read_to_string(&text).unwrap();
    let end = base.rfind('}').unwrap();
    let edited = t.join("vg-lvs.txt");
    std::fs::write(&edited, format!("{}{}{}", &base[..end], lvs_text(), &base[end..])).unwrap();
    lvm("vgcfgrestore", &["-q", "--force", "-f", s(&edited), vg]);
    drop(dev);
    let (lvs, pe_start) = lvm_report(&pv, vg);
    let at = |extent: u64| pe_start + extent * EXTENT;

    // root: ext4 with files; swap: a swap header.
    let root_tree = tree(
        t,
        "root-tree",
        &[("etc/hostname", b"pve\n".to_vec()), ("var/big.bin", random_bytes(301, 5 * MIB as usize))],
    );
    let root = t.join("root.img");
    make_ext4(&root, 6 * EXTENT, &root_tree);
    let root_used = used_blocks(&root).len() as u64 * FS_BLOCK;
    write_at(&pv, at(0), &std::fs::read(&root).unwrap());
    let swap = t.join("swap.img");
    blank_file(&swap, EXTENT);
    run("mkswap", &["-q", s(&swap)]);
    write_at(&pv, at(6), &std::fs::read(&swap).unwrap());

    // vm-100-disk-0: a VM's disk, GPT with one ext4 partition from 1 MiB.
    let vm_tree = tree(
        t,
        "vm100-tree",
        &[
            ("etc/hostname", b"vm100\n".to_vec()),
            ("srv/db.bin", random_bytes(302, 14 * MIB as usize)),
            ("srv/log.txt", text_bytes(303, 2 * MIB as usize)),
        ],
    );
    let vm_fs = t.join("vm100-fs.img");
    make_ext4(&vm_fs, 46 * MIB, &vm_tree);
    let vm = t.join("vm100.img");
    blank_file(&vm, 12 * EXTENT);
    run("sgdisk", &["-n", "1:2048:+46M", "-t", "1:8300", s(&vm)]);
    write_at(&vm, MIB, &std::fs::read(&vm_fs).unwrap());

    // vm-101-disk-0, a container's ext4, and its snapshot taken before a
    // file was added and one removed.
    let before_tree = tree(
        t,
        "ct101-before-tree",
        &[
            ("etc/hostname", b"ct101\n".to_vec()),
            ("data/a.bin", random_bytes(304, 6 * MIB as usize)),
            ("data/gone.txt", text_bytes(305, MIB as usize)),
        ],
    );
    let before = t.join("ct101-before.img");
    make_ext4(&before, 8 * EXTENT, &before_tree);
    let after = t.join("ct101-after.img");
    std::fs::copy(&before, &after).unwrap();
    let new_file = t.join("new.bin");
    std::fs::write(&new_file, random_bytes(306, 3 * MIB as usize)).unwrap();
    run("debugfs", &["-w", "-R", &format!("write {} data/new.bin", s(&new_file)), s(&after)]);
    run("debugfs", &["-w", "-R", "rm data/gone.txt", s(&after)]);
    let after_tree = tree(
        t,
        "ct101-after-tree",
        &[
            ("etc/hostname", b"ct101\n".to_vec()),
            ("data/a.bin", random_bytes(304, 6 * MIB as usize)),
            ("data/new.bin", random_bytes(306, 3 * MIB as usize)),
        ],
    );
    run("e2fsck", &["-fn", s(&after)]);

    // Mappings, as a thin pool would have them: every chunk a volume
    // wrote (not all zeros) is mapped; the snapshot shares the data
    // block of each chunk that did not change since; data blocks are
    // handed out in a scattered order.
    let images = [
        (1u64, std::fs::read(&vm).unwrap()),
        (2, std::fs::read(&after).unwrap()),
        (3, std::fs::read(&before).unwrap()),
    ];
    let mut next = 0u64;
    let mut alloc = || {
        let b = (next * 389 + 17) % DATA_BLOCKS;
        next += 1;
        b
    };
    let mut maps: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (dev, img) in &images {
        for (c, chunk) in img.chunks(CHUNK as usize).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let c = c as u64;
            // The snapshot (3) shares its origin's (2) unchanged chunks.
            let shared = (*dev == 3).then(|| maps[&2].get(&c).copied()).flatten().filter(|d| blocks[d] == chunk);
            let d = shared.unwrap_or_else(|| {
                let d = alloc();
                blocks.insert(d, chunk.to_vec());
                d
            });
            maps.entry(*dev).or_default().insert(c, d);
        }
    }
    // Stale data in mapped chunks the filesystems do not use (a deleted
    // file's blocks): random, in chunks wholly free, 96 in the
    // container's ext4 and 96 in the VM's partition (from 1 MiB, chunk
    // 16 of its disk).
    let used_after = used_blocks(&after);
    let used_vm = used_blocks(&vm_fs);
    let per_chunk = CHUNK / FS_BLOCK;
    let free = |used: &BTreeSet<u64>, first: u64, chunks: u64, dev: u64| -> Vec<u64> {
        let got: Vec<u64> = (0..chunks)
            .filter(|c| (c * per_chunk..(c + 1) * per_chunk).all(|b| !used.contains(&b)))
            .map(|c| c + first)
            .filter(|c| !maps[&dev].contains_key(c))
            .take(96)
            .collect();
        assert_eq!(got.len(), 96, "too few free chunks in device {dev} for the stale data");
        got
    };
    let stale = [(2, free(&used_after, 0, 8 * EXTENT / CHUNK, 2)), (1, free(&used_vm, 16, 46 * MIB / CHUNK, 1))];
    for (dev, chunks) in stale {
        for c in chunks {
            let d = alloc();
            blocks.insert(d, random_bytes(400 + d, CHUNK as usize));
            maps.get_mut(&dev).unwrap().insert(c, d);
        }
    }
    assert!(blocks.len() < DATA_BLOCKS as usize);
    for (d, bytes) in &blocks {
        write_at(&pv, at(9) + d * CHUNK, bytes);
    }

    // The pool's metadata from XML, by thin-provisioning-tools.
    let mut xml = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"3\" version=\"2\" data_block_size=\"128\" \
         nr_data_blocks=\"{DATA_BLOCKS}\">\n"
    );
    for (dev, m) in &maps {
        xml += &format!(
            "  <device dev_id=\"{dev}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"1\">\n",
            m.len(),
            dev - 1,
            u64::from(*dev == 3)
        );
        for (v, d) in m {
            xml += &format!("    <single_mapping origin_block=\"{v}\" data_block=\"{d}\" time=\"0\"/>\n");
        }
        xml += "  </device>\n";
    }
    xml += "</superblock>\n";
    let xml_path = t.join("pool.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    let meta = t.join("tmeta.img");
    blank_file(&meta, EXTENT);
    run("thin_restore", &["-q", "-i", s(&xml_path), "-o", s(&meta)]);
    run("thin_check", &[s(&meta)]);
    let thin_dump = run("thin_dump", &[s(&meta)]);
    write_at(&pv, at(8), &std::fs::read(&meta).unwrap());

    // What a backup should store: the PV's label and metadata, the pool
    // metadata and its spare whole, root's used blocks, a swap header
    // page, and of the pool's data blocks the 4 KiB blocks some
    // filesystem uses there, or the VM disk's table and gaps.
    let used_before = used_blocks(&before);
    let (part_first, part_end) = (MIB / FS_BLOCK, 47 * MIB / FS_BLOCK);
    let used = |dev: u64, block: u64| match dev {
        1 => block < part_first || block >= part_end || used_vm.contains(&(block - part_first)),
        2 => used_after.contains(&block),
        _ => used_before.contains(&block),
    };
    let mut per_block: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (dev, m) in &maps {
        for (v, d) in m {
            let set = per_block.entry(*d).or_default();
            for i in 0..per_chunk {
                if used(*dev, v * per_chunk + i) {
                    set.insert(i);
                }
            }
        }
    }
    let pool_used: u64 = per_block.values().map(|s| s.len() as u64 * FS_BLOCK).sum();
    let expected = pe_start + 2 * EXTENT + root_used + FS_BLOCK + pool_used;

    // The disk: BIOS boot, ESP (FAT with a file), the PV.
    let esp = t.join("esp.img");
    blank_file(&esp, 32 * MIB);
    run("mkfs.vfat", &["-n", "ESP", s(&esp)]);
    let grub = t.join("grubx64.efi");
    std::fs::write(&grub, random_bytes(307, 300_000)).unwrap();
    let mtools = [("MTOOLS_SKIP_CHECK", "1")];
    run_env("mmd", &["-i", s(&esp), "::/EFI", "::/EFI/proxmox"], &mtools);
    run_env("mcopy", &["-i", s(&esp), s(&grub), "::/EFI/proxmox/grubx64.efi"], &mtools);
    let disk = t.join("disk.img");
    blank_file(&disk, 200 * MIB);
    // The ESP at 2 MiB (assert_restored reads it there).
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+1M",
            "-t",
            "1:EF02",
            "-n",
            "2:0:+32M",
            "-t",
            "2:EF00",
            "-n",
            "3:0:+160M",
            "-t",
            "3:8E00",
            s(&disk),
        ],
    );
    let (parts, sector) = sfdisk_parts(&disk);
    let pv_start = parts[2].start * sector;
    assert_eq!(parts[1].start * sector, 2 * MIB);
    write_at(&disk, parts[1].start * sector, &std::fs::read(&esp).unwrap());
    write_at(&disk, pv_start, &std::fs::read(&pv).unwrap());

    let trees = [("root", root_tree), ("vm-100-disk-0", vm_tree), ("vm-101-disk-0", after_tree), ("snap", before_tree)]
        .into_iter()
        .collect();
    Fixture { disk, pv_start, pe_start, lvs, thin_dump, trees, expected, stale_mapped: 192 * CHUNK }
}

/// Each device's mappings (virtual block → data block) as thin_dump
/// prints them.
fn dump_mappings(dump: &str) -> BTreeMap<u64, BTreeMap<u64, u64>> {
    let attr = |l: &str, name: &str| -> u64 {
        let at = l.find(&format!(" {name}=\"")).unwrap_or_else(|| panic!("no {name} in {l}")) + name.len() + 3;
        l[at..].split('"').next().unwrap().parse().unwrap()
    };
    let mut out: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut dev = 0;
    for l in dump.lines().map(str::trim) {
        if l.starts_with("<device ") {
            dev = attr(l, "dev_id");
            out.entry(dev).or_default();
        } else if l.starts_with("<single_mapping ") {
            out.get_mut(&dev).unwrap().insert(attr(l, "origin_block"), attr(l, "data_block"));
        } else if l.starts_with("<range_mapping ") {
            let (o, d, n) = (attr(l, "origin_begin"), attr(l, "data_begin"), attr(l, "length"));
            for i in 0..n {
                out.get_mut(&dev).unwrap().insert(o + i, d + i);
            }
        }
    }
    out
}

/// The bytes of a thin volume of `extents` extents whose blocks `map`
/// (virtual → data block) places in the pool's data volume of the PV in
/// the file `pv` (first extent at `pe_start`); unmapped blocks are zeros.
fn thin_volume(pv: &Path, pe_start: u64, map: &BTreeMap<u64, u64>, extents: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; (extents * EXTENT) as usize];
    for (v, d) in map {
        let at = (v * CHUNK) as usize;
        bytes[at..at + CHUNK as usize].copy_from_slice(&read_at(pv, pe_start + 9 * EXTENT + d * CHUNK, CHUNK));
    }
    bytes
}

/// An ext4 image is clean and holds the files of `tree`.
fn assert_ext4_holds(t: &TempDir, img: &Path, tree: &Path, tag: &str) {
    run("e2fsck", &["-fn", s(img)]);
    let dir = t.join(&format!("mnt-{tag}"));
    let _m = Mounted::new(img, &dir, "ro,loop");
    run("diff", &["-r", "-x", "lost+found", s(tree), s(&dir)]);
}

/// The restored disk `out` is the fixture's, by the oracles.
fn assert_restored(t: &TempDir, f: &Fixture, out: &Path, vg: &str, tag: &str) {
    let pv = t.join(&format!("{tag}-pv.img"));
    std::fs::write(&pv, read_at(out, f.pv_start, PV_SIZE)).unwrap();
    // LVM reads the same group: every volume, pool, snapshot, extent.
    let (lvs, pe_start) = lvm_report(&pv, vg);
    assert_eq!((lvs.as_str(), pe_start), (f.lvs.as_str(), f.pe_start), "lvs of the restored PV");
    let at = |extent: u64| pe_start + extent * EXTENT;
    // The pool's metadata passes thin_check and holds the same mappings.
    let meta = t.join(&format!("{tag}-tmeta.img"));
    std::fs::write(&meta, read_at(&pv, at(8), EXTENT)).unwrap();
    run("thin_check", &[s(&meta)]);
    let dump = run("thin_dump", &[s(&meta)]);
    assert_eq!(dump, f.thin_dump, "thin_dump of the restored pool");
    // Each thin volume, put together from the data blocks thin_dump
    // names, holds its filesystem and files.
    let maps = dump_mappings(&dump);
    let volume = |dev: u64, extents: u64| thin_volume(&pv, pe_start, &maps[&dev], extents);
    let vm = t.join(&format!("{tag}-vm100.img"));
    std::fs::write(&vm, volume(1, 12)).unwrap();
    let vm_fs = t.join(&format!("{tag}-vm100-p1.img"));
    std::fs::write(&vm_fs, read_at(&vm, MIB, 46 * MIB)).unwrap();
    assert_ext4_holds(t, &vm_fs, &f.trees["vm-100-disk-0"], &format!("{tag}-vm100"));
    for (dev, name, key) in [(2, "ct101", "vm-101-disk-0"), (3, "snap", "snap")] {
        let img = t.join(&format!("{tag}-{name}.img"));
        std::fs::write(&img, volume(dev, 8)).unwrap();
        assert_ext4_holds(t, &img, &f.trees[key], &format!("{tag}-{name}"));
    }
    let root = t.join(&format!("{tag}-root.img"));
    std::fs::write(&root, read_at(&pv, at(0), 6 * EXTENT)).unwrap();
    assert_ext4_holds(t, &root, &f.trees["root"], &format!("{tag}-root"));
    // The BIOS boot partition byte for byte; the ESP clean, with its file.
    assert_same(&f.disk, out, MIB, MIB, "the BIOS boot partition");
    let esp = t.join(&format!("{tag}-esp.img"));
    std::fs::write(&esp, read_at(out, 2 * MIB, 32 * MIB)).unwrap();
    run("fsck.fat", &["-n", s(&esp)]);
    let got = t.join(&format!("{tag}-grubx64.efi"));
    run_env("mcopy", &["-i", s(&esp), "::/EFI/proxmox/grubx64.efi", s(&got)], &[("MTOOLS_SKIP_CHECK", "1")]);
    assert_eq!(std::fs::read(&got).unwrap(), random_bytes(307, 300_000), "the ESP's file");
}

#[test]
fn a_proxmox_host_is_stored_by_what_its_thin_volumes_map_and_use_restores_for_lvm_and_thin_tools_and_mounts() {
    require_root!();
    let t = TempDir::new("thin");
    let vg = format!("pvethin{}", std::process::id());
    let f = fixture(&t, &vg);
    let img = t.join("image");
    let o = klon(&["backup", "--quiet", s(&f.disk), s(&img)]);
    ok(&o);
    assert!(stderr(&o).is_empty(), "warnings for a pool klon reads: {}", stderr(&o));

    let o = klon(&["--json", "info", s(&img)]);
    ok(&o);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let st = info["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["partition"] == 3).unwrap().clone();
    assert_eq!(st["method"], "lvm", "{st}");
    let lv = |name: &str| st["lvm"]["lvs"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap().clone();
    assert_eq!(lv("vm-101-disk-0")["method"], "ext4 (thin)", "{st}");
    assert_eq!(lv("vm-100-disk-0")["method"], "GPT table: p1 ext4 (thin)", "{st}");
    assert_eq!(lv("snap_vm-101-disk-0_before")["method"], "ext4 (thin)", "{st}");
    assert_eq!(lv("vm-101-disk-0")["segments"][0]["thin"]["device_id"], 2, "{st}");
    assert_eq!(lv("snap_vm-101-disk-0_before")["segments"][0]["thin"]["origin"], "vm-101-disk-0", "{st}");
    assert_eq!(lv("data")["segments"][0]["pool"]["data"], "data_tdata", "{st}");
    let text = stdout(&klon(&["info", s(&img)]));
    assert!(
        text.contains("device 3 of pool data, a snapshot of vm-101-disk-0")
            && text.contains("data in data_tdata, metadata in data_tmeta")
            && text.contains("GPT table: p1 ext4 (thin)")
            && text.contains(" mapped, "),
        "{text}"
    );
    // A tree: the thin volumes under their pool, LVM's own volumes last.
    let indent = |name: &str| {
        let l = text.lines().find(|l| l.contains(&format!("LV {name} "))).unwrap_or_else(|| panic!("{name}: {text}"));
        l.len() - l.trim_start().len()
    };
    assert!(indent("vm-100-disk-0") > indent("data") && indent("data") == indent("root"), "{text}");
    assert!(text.contains("LV data_tmeta (LVM's own)"), "{text}");

    // Stored: what the filesystems use (and the metadata), not the stale
    // data in unmapped blocks, free extents, or mapped blocks no
    // filesystem uses.
    let stored = st["stored_bytes"].as_u64().unwrap();
    assert!(
        stored <= f.expected + f.expected / 20,
        "stored {stored} bytes, expected at most about {} (stale mapped data: {})",
        f.expected,
        f.stale_mapped
    );

    // Restored onto a larger disk full of garbage: every oracle passes.
    let out = t.join("restored.img");
    garbage_file(&out, std::fs::metadata(&f.disk).unwrap().len() + 64 * MIB);
    ok(&klon(&["restore", "--yes", "--quiet", s(&img), s(&out)]));
    assert_restored(&t, &f, &out, &vg, "restored");
    ok(&klon(&["verify", "--quiet", s(&img)]));

    // Mounted, the image shows each volume as a file named as
    // /dev/mapper names it; each holds its filesystem and files (a VM's
    // disk its GPT and partition), read through the pool's metadata in
    // the image.
    let dir = t.join("mnt-image");
    std::fs::create_dir_all(&dir).unwrap();
    ok(&klon(&["mount", "--quiet", s(&img), s(&dir)]));
    let _unmount = Unmount(dir.clone());
    let file = |lv: &str| dir.join(format!("{}-{}.img", vg, lv.replace('-', "--")));
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for lv in ["root", "swap", "vm-100-disk-0", "vm-101-disk-0", "snap_vm-101-disk-0_before"] {
        assert!(file(lv).is_file(), "no file for {lv} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("tdata") || n.contains("tmeta") || n.contains("-data.img")), "{names:?}");
    assert_eq!(std::fs::metadata(file("vm-100-disk-0")).unwrap().len(), 12 * EXTENT);
    let copy = |lv: &str, at: u64, len: u64, tag: &str| {
        let out = t.join(&format!("mounted-{tag}.img"));
        std::fs::write(&out, read_at(&file(lv), at, len)).unwrap();
        out
    };
    assert_ext4_holds(&t, &copy("root", 0, 6 * EXTENT, "root"), &f.trees["root"], "mounted-root");
    assert_ext4_holds(&t, &copy("vm-101-disk-0", 0, 8 * EXTENT, "ct"), &f.trees["vm-101-disk-0"], "mounted-ct");
    let snap = copy("snap_vm-101-disk-0_before", 0, 8 * EXTENT, "snap");
    assert_ext4_holds(&t, &snap, &f.trees["snap"], "mounted-snap");
    assert_ext4_holds(&t, &copy("vm-100-disk-0", MIB, 46 * MIB, "vm"), &f.trees["vm-100-disk-0"], "mounted-vm");
    drop(_unmount);

    // One volume restored on its own: the container's ext4, the VM's
    // disk with its GPT; unknown names and small targets refused before
    // anything is written.
    let ct = t.join("ct-alone.img");
    ok(&klon(&["restore", "--yes", "--quiet", "--volume", &format!("{vg}/vm-101-disk-0"), s(&img), s(&ct)]));
    assert_eq!(std::fs::metadata(&ct).unwrap().len(), 8 * EXTENT);
    assert_ext4_holds(&t, &ct, &f.trees["vm-101-disk-0"], "alone-ct");
    let vm = t.join("vm-alone.img");
    let o = klon(&["--json", "restore", "--yes", "--volume", "vm-100-disk-0", s(&img), s(&vm)]);
    ok(&o);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((r["bytes_written"].as_u64(), r["verified"].as_bool()), (Some(12 * EXTENT), Some(true)), "{r}");
    assert!(run("sgdisk", &["-v", s(&vm)]).contains("No problems found"));
    let vm_p1 = t.join("vm-alone-p1.img");
    std::fs::write(&vm_p1, read_at(&vm, MIB, 46 * MIB)).unwrap();
    assert_ext4_holds(&t, &vm_p1, &f.trees["vm-100-disk-0"], "alone-vm");
    fails_with(
        &klon(&["restore", "--yes", "--volume", "vm-999-disk-0", s(&img), s(&t.join("x.img"))]),
        2,
        &["no logical volume vm-999-disk-0", "vm--101--disk--0"],
    );
    assert!(!t.join("x.img").exists(), "a refused restore left its target file");
    let small = t.join("small.img");
    garbage_file(&small, 4 * EXTENT);
    let before = std::fs::read(&small).unwrap();
    fails_with(&klon(&["restore", "--yes", "--volume", "vm-101-disk-0", s(&img), s(&small)]), 5, &["too small"]);
    assert!(std::fs::read(&small).unwrap() == before, "a refused restore wrote to its target");
    fails_with(
        &klon(&["restore", "--yes", "--volume", "root", "--partition", "3", s(&img), s(&small)]),
        2,
        &["--volume"],
    );
}

/// Unmounts `klon mount`'s directory when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = klon(&["umount", s(&self.0)]);
    }
}

#[test]
fn a_pool_whose_metadata_fails_its_checksum_is_copied_whole_with_a_warning_and_restores() {
    require_root!();
    let t = TempDir::new("thin-bad");
    let vg = format!("pvebad{}", std::process::id());
    let f = fixture(&t, &vg);
    // Flip a byte inside the node at the root of the mapping tree (its
    // block number at byte 320 of the superblock).
    let meta = f.pv_start + f.pe_start + 8 * EXTENT;
    let root = u64::from_le_bytes(read_at(&f.disk, meta + 320, 8).try_into().unwrap());
    assert!(root > 0 && root < EXTENT / 4096, "mapping root {root}");
    let at = meta + root * 4096 + 1000;
    let old = read_at(&f.disk, at, 1)[0];
    write_at(&f.disk, at, &[old ^ 0x01]);

    let img = t.join("image");
    let o = klon(&["backup", "--quiet", s(&f.disk), s(&img)]);
    ok(&o);
    let said = stderr(&o);
    assert!(
        said.contains("thin pool") && said.contains("fails its checksum") && said.contains("copied whole"),
        "{said}"
    );
    let o = klon(&["--json", "info", s(&img)]);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let st = info["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["partition"] == 3).unwrap().clone();
    let data = st["lvm"]["lvs"].as_array().unwrap().iter().find(|l| l["name"] == "data_tdata").unwrap().clone();
    assert_eq!((data["method"].as_str(), data["used_bytes"].as_u64()), (Some("raw"), Some(16 * EXTENT)), "{data}");
    // The pool's data volume byte for byte, its metadata as it was
    // (with the flipped byte: klon keeps what it found).
    let out = t.join("restored.img");
    garbage_file(&out, std::fs::metadata(&f.disk).unwrap().len());
    ok(&klon(&["restore", "--yes", "--quiet", s(&img), s(&out)]));
    assert_same(&f.disk, &out, meta, 17 * EXTENT, "the pool's metadata and data volumes");
}

#[test]
fn the_disk_list_names_the_volume_group_its_volumes_and_the_thin_volumes_in_its_pool() {
    require_root!();
    let t = TempDir::new("thin-disks");
    let vg = format!("pvelist{}", std::process::id());
    let f = fixture(&t, &vg);
    let dev = LoopDevice::attach(&f.disk, None);
    let o = klon(&["--json", "disks"]);
    ok(&o);
    let disks: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ours = disks["blockdevices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == s(&dev.path))
        .unwrap_or_else(|| panic!("{disks}"));
    let pv = ours["children"].as_array().unwrap().iter().find(|p| p["partn"] == 3).unwrap().clone();
    let want = format!(
        "volume group {vg}: root, swap, data (thin pool: vm-100-disk-0, vm-101-disk-0, snap_vm-101-disk-0_before)"
    );
    assert_eq!(pv["lvm"].as_str(), Some(want.as_str()), "{pv}");
    let text = stdout(&klon(&["disks"]));
    assert!(text.contains(&format!("volume group {vg}: root, swap, data (thin pool: vm-100")), "{text}");
}

#[test]
fn a_thin_volume_whose_filesystem_is_not_clean_is_copied_as_mapped_with_a_warning() {
    require_root!();
    let t = TempDir::new("thin-unclean");
    let vg = format!("pveunclean{}", std::process::id());
    let f = fixture(&t, &vg);
    // The snapshot's ext4 marked as needing its journal replayed (as a
    // snapshot of a running guest is), by debugfs on a copy, its first
    // block written back where the pool maps it.
    let pv = t.join("pv-now.img");
    std::fs::write(&pv, read_at(&f.disk, f.pv_start, PV_SIZE)).unwrap();
    let maps = dump_mappings(&f.thin_dump);
    let snap = t.join("snap-now.img");
    std::fs::write(&snap, thin_volume(&pv, f.pe_start, &maps[&3], 8)).unwrap();
    run("debugfs", &["-w", "-R", "feature needs_recovery", s(&snap)]);
    let d = maps[&3][&0];
    write_at(&f.disk, f.pv_start + f.pe_start + 9 * EXTENT + d * CHUNK, &read_at(&snap, 0, CHUNK));
    std::fs::write(&pv, read_at(&f.disk, f.pv_start, PV_SIZE)).unwrap();

    let img = t.join("image");
    let o = klon(&["backup", "--quiet", s(&f.disk), s(&img)]);
    ok(&o);
    let said = stderr(&o);
    assert!(said.contains("thin volume snap_vm-101-disk-0_before") && said.contains("is not clean"), "{said}");
    let info: serde_json::Value = serde_json::from_str(&stdout(&klon(&["--json", "info", s(&img)]))).unwrap();
    let st = info["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["partition"] == 3).unwrap().clone();
    let lv =
        st["lvm"]["lvs"].as_array().unwrap().iter().find(|l| l["name"] == "snap_vm-101-disk-0_before").unwrap().clone();
    assert!(lv["method"].as_str().unwrap().starts_with("raw (not clean"), "{lv}");
    assert_eq!(lv["used_bytes"], lv["mapped_bytes"], "{lv}");

    // Restored, every block the snapshot maps reads as before.
    let out = t.join("restored.img");
    garbage_file(&out, std::fs::metadata(&f.disk).unwrap().len());
    ok(&klon(&["restore", "--yes", "--quiet", s(&img), s(&out)]));
    let pv_back = t.join("pv-back.img");
    std::fs::write(&pv_back, read_at(&out, f.pv_start, PV_SIZE)).unwrap();
    assert!(
        thin_volume(&pv_back, f.pe_start, &maps[&3], 8) == thin_volume(&pv, f.pe_start, &maps[&3], 8),
        "the snapshot's mapped blocks differ after the restore"
    );
}
