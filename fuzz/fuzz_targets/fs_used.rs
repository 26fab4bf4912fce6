//! Every filesystem's probe and used-block reader on one partition image:
//! the probe first, then every driver regardless of what it found (so a
//! reader meets superblocks its own probe would have refused); LVM2's
//! reader and its metadata text parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::file_of("part.img", data);
    let disk = klon::device::Disk::open_read_only(&path).unwrap();
    let len = disk.size;
    let _ = klon::fs::probe(&disk, 0, len);
    let vol = klon::fs::Volume::new(&disk, 0, len);
    let _ = klon::fs::lvm::read(&vol);
    // LVM's metadata text on its own (the fuzzer cannot forge its crc).
    if let Ok(vg) = klon::fs::lvm::parse_metadata(&String::from_utf8_lossy(data), "pv") {
        for lv in &vg.lvs {
            for s in &lv.segments {
                let _ = s.linear_on(&vg, "pv0");
            }
        }
    }
    for d in klon::fs::DRIVERS {
        if let Ok(map) = (d.used_map)(&vol) {
            for e in &map.extents {
                assert!(e.0.checked_add(e.1).is_some_and(|end| end <= len), "extent past the partition");
            }
        }
    }
});
