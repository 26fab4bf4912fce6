//! LVM2 physical volumes: a backup reads the volume group from the PV's
//! newest metadata as LVM's own tools report it (`klon info` shows it),
//! stores the label and metadata whole, a linear logical volume's
//! filesystem by its used blocks, other volumes whole, and no free
//! extent; the restore passes e2fsck, holds the same files, and LVM's
//! tools read the same group from it. A PV whose metadata fails its
//! checksum is copied raw with a warning. --grow-last grows a restored PV
//! with pvresize: LVM reads the larger PV and the new free extents.
//! Fixtures are made without device-mapper: pvcreate and vgcreate on a
//! loop device, the logical volumes written into the metadata with
//! vgcfgrestore (nothing is activated).

mod common;

use std::path::Path;

use common::disks::*;
use common::loop_device::LoopDevice;
use common::lvm_tools::lvm;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const PV_SIZE: u64 = 64 * MIB;
const PV_START: u64 = 9 * MIB;

/// Logical volumes added to the metadata text of volume group `vg` (as
/// vgcfgbackup wrote it): lv_root linear on extents 0-1, lv_data in two
/// segments (extent 5, then extents 2-3), and a two-stripe volume.
fn with_lvs(text: &str) -> String {
    let lvs = r#"
	logical_volumes {
		lv_root {
			id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-000001"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 1
			segment1 {
				start_extent = 0
				extent_count = 2
				type = "striped"
				stripe_count = 1
				stripes = [
					"pv0", 0
				]
			}
		}
		lv_data {
			id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-000002"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 2
			segment1 {
				start_extent = 0
				extent_count = 1
				type = "striped"
				stripe_count = 1
				stripes = [
					"pv0", 5
				]
			}
			segment2 {
				start_extent = 1
				extent_count = 2
				type = "striped"
				stripe_count = 1
				stripes = [
					"pv0", 2
				]
			}
		}
	}
"#;
    let end = text.rfind('}').expect("the VG section's end");
    format!("{}{lvs}{}", &text[..end], &text[end..])
}

/// A GPT disk whose second partition is an LVM2 PV of volume group `vg`
/// with the logical volumes of [`with_lvs`]; returns the disk and what
/// LVM's own tools report of it: `lvs --segments` as (name, first logical
/// extent, extents, first PV extent, type), the extent size and the PV's
/// first extent, in bytes.
#[allow(clippy::type_complexity)]
fn lvm_disk(t: &TempDir, vg: &str) -> (std::path::PathBuf, Vec<(String, u64, u64, u64, String)>, u64, u64) {
    // Stale data everywhere LVM does not write: in free extents too.
    let pv = t.join("pv.img");
    std::fs::write(&pv, random_bytes(90, PV_SIZE as usize)).unwrap();
    let dev = LoopDevice::attach_without_partitions(&pv);
    let d = s(&dev.path);
    lvm("pvcreate", d, &["-q", d]);
    lvm("vgcreate", d, &["-q", vg, d]);
    let text = t.join("vg.txt");
    lvm("vgcfgbackup", d, &["-q", "-f", s(&text), vg]);
    let edited = t.join("vg-lvs.txt");
    std::fs::write(&edited, with_lvs(&std::fs::read_to_string(&text).unwrap())).unwrap();
    lvm("vgcfgrestore", d, &["-q", "-f", s(&edited), vg]);
    let out = lvm(
        "lvs",
        d,
        &["--segments", "-o", "lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges,segtype", "--reportformat", "json", vg],
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let segs: Vec<(String, u64, u64, u64, String)> = report["report"][0]["seg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let num = |k: &str| g[k].as_str().unwrap().trim().parse::<u64>().unwrap();
            let ranges = g["seg_pe_ranges"].as_str().unwrap();
            let first = ranges.rsplit(':').next().unwrap().split('-').next().unwrap().parse().unwrap();
            (
                g["lv_name"].as_str().unwrap().to_string(),
                num("seg_start_pe"),
                num("seg_size_pe"),
                first,
                g["segtype"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let bytes = |s: String| s.trim().trim_end_matches('B').parse::<u64>().unwrap();
    let extent = bytes(lvm("vgs", d, &["--noheadings", "--units", "b", "-o", "vg_extent_size", vg]));
    let pe_start = bytes(lvm("pvs", d, &["--noheadings", "--units", "b", "-o", "pe_start", d]));
    drop(dev);
    // lv_root holds ext4 with files (its free blocks stale random data),
    // at the place LVM's tools give (not klon's reading).
    let (_, _, _, first, _) = segs.iter().find(|s| s.0 == "lv_root").unwrap();
    let fs = t.join("root.img");
    std::fs::write(&fs, random_bytes(91, 8 * MIB as usize)).unwrap();
    let tree = t.join("tree");
    populate(&tree);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", s(&tree), s(&fs)]);
    write_at(&pv, pe_start + first * extent, &std::fs::read(&fs).unwrap());
    // lv_data holds ext4 too, across its two segments (its first extent
    // at PV extent 5, the next two at extents 2-3): each piece where
    // lvs --segments puts it.
    let data = t.join("data.img");
    std::fs::write(&data, random_bytes(94, 12 * MIB as usize)).unwrap();
    let data_tree = t.join("data-tree");
    populate_data(&data_tree);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", s(&data_tree), s(&data)]);
    let data_bytes = std::fs::read(&data).unwrap();
    for (_, start, n, first, _) in segs.iter().filter(|s| s.0 == "lv_data") {
        let piece = &data_bytes[(start * extent) as usize..((start + n) * extent) as usize];
        write_at(&pv, pe_start + first * extent, piece);
    }

    let disk = t.join("disk.img");
    blank_file(&disk, PV_START + PV_SIZE + MIB);
    run("sgdisk", &["-n", "1:2048:+8M", "-t", "1:8300", "-n", "2:0:+64M", "-t", "2:8E00", s(&disk)]);
    let (parts, sector) = sfdisk_parts(&disk);
    assert_eq!(parts[1].start * sector, PV_START);
    write_at(&disk, PV_START, &std::fs::read(&pv).unwrap());
    (disk, segs, extent, pe_start)
}

/// The files of lv_data's ext4: more than one extent's worth, so that
/// they lie in both segments.
fn populate_data(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/vm-100.raw"), random_bytes(95, 5 * MIB as usize)).unwrap();
    std::fs::write(dir.join("notes.txt"), text_bytes(96, 400_000)).unwrap();
}

/// Reads logical volume `lv`'s bytes from the PV inside `disk`, segment by
/// segment, where `lvs --segments` puts them.
fn lv_bytes(disk: &Path, segs: &[(String, u64, u64, u64, String)], lv: &str, extent: u64, pe_start: u64) -> Vec<u8> {
    let mut mine: Vec<&(String, u64, u64, u64, String)> = segs.iter().filter(|s| s.0 == lv).collect();
    mine.sort_by_key(|s| s.1);
    mine.iter()
        .flat_map(|(_, _, n, first, _)| read_at(disk, PV_START + pe_start + first * extent, n * extent))
        .collect()
}

/// An ext4 image is clean and holds the files `populate` makes.
fn assert_ext4_holds(t: &TempDir, img: &Path, populate: fn(&Path), tag: &str) {
    run("e2fsck", &["-fn", s(img)]);
    let expected = t.join(&format!("expected-{tag}"));
    populate(&expected);
    let dir = t.join(&format!("mnt-{tag}"));
    let _m = Mounted::new(img, &dir, "ro,loop");
    run("diff", &["-r", "-x", "lost+found", s(&expected), s(&dir)]);
}

/// The files of lv_root's ext4.
fn populate(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/hostname"), "pve\n").unwrap();
    std::fs::write(dir.join("random.bin"), random_bytes(92, 2 * MIB as usize)).unwrap();
    std::fs::write(dir.join("text.txt"), text_bytes(93, 300_000)).unwrap();
}

#[test]
fn a_pv_is_stored_by_what_its_volumes_use_and_restores_as_lvm_reads_it() {
    require_root!();
    let t = TempDir::new("lvm-vg");
    let vg = format!("klontest{}", std::process::id());
    let (disk, segs, extent, pe_start) = lvm_disk(&t, &vg);
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));
    let o = klon(&["--json", "info", s(&img)]);
    ok(&o);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let st = info["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["partition"] == 2).unwrap().clone();
    let got = &st["lvm"];
    assert_eq!(got["name"], vg.as_str(), "{st}");
    assert_eq!(got["extent_size"], extent, "{st}");
    assert_eq!(got["pvs"][0]["pe_start"], pe_start, "{st}");
    // Every segment LVM lists, as klon read it (no more, no fewer).
    let mut klon_segs = Vec::new();
    for lv in got["lvs"].as_array().unwrap() {
        for g in lv["segments"].as_array().unwrap() {
            klon_segs.push((
                lv["name"].as_str().unwrap().to_string(),
                g["start_extent"].as_u64().unwrap(),
                g["extent_count"].as_u64().unwrap(),
                g["stripes"][0][1].as_u64().unwrap(),
                g["kind"].as_str().unwrap().to_string(),
            ));
        }
    }
    let (mut a, mut b) = (segs.clone(), klon_segs);
    a.sort();
    b.sort();
    assert_eq!(b, a, "klon's segments against lvs --segments");
    // The text report shows the group and its volumes.
    let text = stdout(&klon(&["info", s(&img)]));
    assert!(
        text.contains(&format!("volume group {vg}"))
            && text.contains("LV lv_data 12.0 MiB: linear 1 extents at pv0:5; linear 2 extents at pv0:2")
            && text.contains("filesystem ext4, method ext4"),
        "{text}"
    );

    // Stored: the metadata area and the used blocks of both ext4s (lv_data's
    // across its two segments) — not the stale data of the free extents
    // and of the filesystems' free blocks.
    assert_eq!(st["method"], "lvm", "{st}");
    let stored = st["stored_bytes"].as_u64().unwrap();
    let lv_of = |name: &str| got["lvs"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap().clone();
    let (root, data) = (lv_of("lv_root"), lv_of("lv_data"));
    assert_eq!((root["method"].as_str(), data["method"].as_str()), (Some("ext4"), Some("ext4")), "{got}");
    let (root_used, data_used) = (root["used_bytes"].as_u64().unwrap(), data["used_bytes"].as_u64().unwrap());
    assert!(root_used < 5 * MIB && data_used < 8 * MIB, "{root} {data}");
    let expected = pe_start + root_used + data_used;
    assert!(stored <= expected + expected / 20, "stored {stored} bytes, expected at most about {expected}");

    // Restored onto garbage: the label and metadata, and both ext4s
    // (fsck-clean, same files), each volume read back where LVM's tools
    // place its segments.
    let out = t.join("restored.img");
    garbage_file(&out, std::fs::metadata(&disk).unwrap().len());
    ok(&klon(&["restore", "--yes", s(&img), s(&out)]));
    assert_same(&disk, &out, PV_START, pe_start, "the PV label and metadata");
    for (lv, fill) in [("lv_root", populate as fn(&Path)), ("lv_data", populate_data)] {
        let img = t.join(&format!("restored-{lv}.img"));
        std::fs::write(&img, lv_bytes(&out, &segs, lv, extent, pe_start)).unwrap();
        assert_ext4_holds(&t, &img, fill, lv);
    }
    // LVM's own tools read the same group from the restored PV.
    let pv_back = t.join("restored-pv.img");
    std::fs::write(&pv_back, read_at(&out, PV_START, PV_SIZE)).unwrap();
    let dev = LoopDevice::attach_without_partitions(&pv_back);
    let back = lvm(
        "lvs",
        s(&dev.path),
        &["--segments", "-o", "lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges", "--noheadings", &vg],
    );
    drop(dev);
    for (lv, start, n, first, _) in &segs {
        let want = format!(":{first}-{}", first + n - 1);
        let found = back.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 4 && w[0] == lv && w[1] == start.to_string() && w[3].ends_with(&want)
        });
        assert!(found, "{lv} at {start}: no {want} in the restored PV's lvs:\n{back}");
    }
}

#[test]
fn metadata_that_fails_its_checksum_is_copied_raw_with_a_warning() {
    require_root!();
    let t = TempDir::new("lvm-bad");
    let vg = format!("klonbad{}", std::process::id());
    let (disk, ..) = lvm_disk(&t, &vg);
    // The metadata area's header at 4 KiB of the PV names where the text
    // is: flip a byte in the middle of it.
    let h = read_at(&disk, PV_START + 4096, 512);
    let off = u64::from_le_bytes(h[40..48].try_into().unwrap());
    let len = u64::from_le_bytes(h[48..56].try_into().unwrap());
    let at = PV_START + 4096 + off + len / 2;
    let old = read_at(&disk, at, 1)[0];
    write_at(&disk, at, &[old ^ 0x20]);
    let img = t.join("image");
    let o = klon(&["backup", s(&disk), s(&img)]);
    ok(&o);
    let said = stderr(&o);
    assert!(
        said.contains("LVM2 physical volume") && said.contains("crc does not match") && said.contains("raw"),
        "{said}"
    );
    let info: serde_json::Value = serde_json::from_str(&stdout(&klon(&["--json", "info", s(&img)]))).unwrap();
    let st = info["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["partition"] == 2).unwrap().clone();
    assert!(st.get("lvm").is_none() && st["method"] == "raw", "{st}");
    let out = t.join("restored.img");
    ok(&klon(&["restore", "--yes", s(&img), s(&out)]));
    assert_same(&disk, &out, PV_START, PV_SIZE, "the PV");
}

/// `--grow-last` onto a larger disk grows the last partition, a PV, and
/// then the PV itself (pvresize on the restored partition alone): LVM's
/// tools read a PV of the new size whose volume group has the new room as
/// free extents, the logical volumes where they were, both ext4s intact.
#[test]
fn grow_last_extends_the_physical_volume_and_its_volume_group() {
    require_root!();
    let t = TempDir::new("lvm-grow");
    let vg = format!("klongrow{}", std::process::id());
    let (disk, segs, extent, pe_start) = lvm_disk(&t, &vg);
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));
    let report = |pv: &Path| {
        let dev = LoopDevice::attach_without_partitions(pv);
        let d = s(&dev.path).to_string();
        let b = |x: String| x.trim().trim_end_matches('B').parse::<u64>().unwrap();
        let pv_size = b(lvm("pvs", &d, &["--noheadings", "--units", "b", "-o", "pv_size", &d]));
        let vg_free = b(lvm("vgs", &d, &["--noheadings", "--units", "b", "-o", "vg_free", &vg]));
        // Segments as extent ranges of "PV": the loop device each report
        // attaches is whichever is free (other tests run beside).
        let lvs = lvm("lvs", &d, &["--segments", "--noheadings", "-o", "lv_name,seg_pe_ranges", &vg])
            .replace(&format!("{d}:"), "PV:");
        (pv_size, vg_free, lvs)
    };
    let pv_file = t.join("pv-before.img");
    std::fs::write(&pv_file, read_at(&disk, PV_START, PV_SIZE)).unwrap();
    let before = report(&pv_file);

    // 32 MiB more: the last partition (the PV) grows by that.
    let grow = 32 * MIB;
    let out = t.join("restored.img");
    garbage_file(&out, std::fs::metadata(&disk).unwrap().len() + grow);
    let o = klon(&["--json", "restore", "--yes", "--grow-last", s(&img), s(&out)]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["growth"]["grown"], true, "{v}");
    assert!(v["growth"]["note"].as_str().unwrap().contains("pvresize grew the LVM2 physical volume"), "{v}");
    let new_size = v["growth"]["to"].as_u64().unwrap();
    assert!(new_size >= PV_SIZE + grow - MIB, "{v}");
    let pv_after = t.join("pv-after.img");
    std::fs::write(&pv_after, read_at(&out, PV_START, new_size)).unwrap();
    let after = report(&pv_after);
    // pvs: the PV fills the partition (less LVM's own areas, whole extents).
    assert!(after.0 > before.0 + grow - 2 * extent, "PV size {} -> {}", before.0, after.0);
    assert!(after.0 <= new_size, "PV size {} in a {new_size}-byte partition", after.0);
    // vgs: the new room is free extents of the group.
    assert_eq!(after.1 - before.1, after.0 - before.0, "VG free {} -> {}", before.1, after.1);
    // lvs: every segment where it was.
    assert_eq!(after.2, before.2, "the logical volumes moved");
    for (lv, fill) in [("lv_root", populate as fn(&Path)), ("lv_data", populate_data)] {
        let img = t.join(&format!("grown-{lv}.img"));
        std::fs::write(&img, lv_bytes(&out, &segs, lv, extent, pe_start)).unwrap();
        assert_ext4_holds(&t, &img, fill, &format!("grown-{lv}"));
    }
}
