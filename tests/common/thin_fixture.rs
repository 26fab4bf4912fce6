//! A disk shaped like a default Proxmox VE install (tests/thin.rs has the
//! whole story): BIOS boot, ESP, and an LVM2 PV holding `root`, `swap` and
//! the thin pool `data` with a VM disk, a container volume and a thin
//! snapshot, made without device-mapper. Used by tests/thin.rs, and by
//! tests/live.rs to activate a restored one in a guest kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::disks::*;
use super::loop_device::LoopDevice;
use super::lvm_tools::lvm;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub const EXTENT: u64 = 4 * MIB;
pub const CHUNK: u64 = 64 * 1024;
pub const PV_SIZE: u64 = 160 * MIB;
/// Data blocks of the pool (its data volume: 16 extents).
pub const DATA_BLOCKS: u64 = 1024;
/// Filesystem block of the ext4s made here.
pub const FS_BLOCK: u64 = 4096;

/// Logical volumes: name, first extent on the PV (linear) or None,
/// extents.
pub const LINEAR: &[(&str, u64, u64, bool)] = &[
    ("root", 0, 6, true),
    ("swap", 6, 1, true),
    ("lvol0_pmspare", 7, 1, false),
    ("data_tmeta", 8, 1, false),
    ("data_tdata", 9, 16, false),
];
/// Thin volumes: name, extents, device id, origin.
pub const THIN: &[(&str, u64, u64, Option<&str>)] = &[
    ("vm-100-disk-0", 12, 1, None),
    ("vm-101-disk-0", 8, 2, None),
    ("snap_vm-101-disk-0_before", 8, 3, Some("vm-101-disk-0")),
];

pub fn lvs_text() -> String {
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
pub fn lvm_report(pv: &Path, vg: &str) -> (String, u64) {
    let dev = LoopDevice::attach_without_partitions(pv);
    let lvs = lvm(
        "lvs",
        s(&dev.path),
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
    let pe = lvm("pvs", s(&dev.path), &["--noheadings", "--units", "b", "-o", "pe_start", s(&dev.path)]);
    drop(dev);
    // The PE ranges name the loop device; keep the extents.
    let lvs: String = lvs
        .lines()
        .map(|l| l.split_whitespace().map(|w| w.rsplit(':').next().unwrap()).collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    (lvs, pe.trim().trim_end_matches('B').parse().unwrap())
}

/// The 4 KiB blocks an ext4 image uses, by dumpe2fs's free lists.
pub fn used_blocks(img: &Path) -> BTreeSet<u64> {
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

pub fn make_ext4(img: &Path, size: u64, tree: &Path) {
    blank_file(img, size);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-b", "4096", "-E", "nodiscard", "-d", s(tree), s(img)]);
}

pub struct Fixture {
    pub disk: PathBuf,
    pub pv_start: u64,
    pub pe_start: u64,
    pub lvs: String,
    pub thin_dump: String,
    /// The trees each volume's files come from.
    pub trees: BTreeMap<&'static str, PathBuf>,
    /// Bytes the filesystems use, with the PV's metadata and what klon
    /// stores whole: what a backup should store, at most.
    pub expected: u64,
    /// Bytes of stale data in mapped blocks the filesystems do not use.
    pub stale_mapped: u64,
}

pub fn tree(t: &TempDir, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = t.join(name);
    for (f, bytes) in files {
        let p = dir.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    dir
}

pub fn fixture(t: &TempDir, vg: &str) -> Fixture {
    // The PV: stale random data everywhere LVM does not write.
    let pv = t.join("pv.img");
    std::fs::write(&pv, random_bytes(300, PV_SIZE as usize)).unwrap();
    let dev = LoopDevice::attach_without_partitions(&pv);
    lvm("pvcreate", s(&dev.path), &["-q", s(&dev.path)]);
    lvm("vgcreate", s(&dev.path), &["-q", "-s", "4m", vg, s(&dev.path)]);
    let text = t.join("vg.txt");
    lvm("vgcfgbackup", s(&dev.path), &["-q", "-f", s(&text), vg]);
    let base = std::fs::read_to_string(&text).unwrap();
    let end = base.rfind('}').unwrap();
    let edited = t.join("vg-lvs.txt");
    std::fs::write(&edited, format!("{}{}{}", &base[..end], lvs_text(), &base[end..])).unwrap();
    lvm("vgcfgrestore", s(&dev.path), &["-q", "--force", "-f", s(&edited), vg]);
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
