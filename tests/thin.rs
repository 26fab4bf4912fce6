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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::disks::*;
use common::loop_device::LoopDevice;
use common::thin_fixture::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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
