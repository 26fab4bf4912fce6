//! Every filesystem's probe and used-block reader on one partition image:
//! the probe first, then every driver regardless of what it found (so a
//! reader meets superblocks its own probe would have refused).
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::file_of("part.img", data);
    let disk = klon::device::Disk::open_read_only(&path).unwrap();
    let len = disk.size;
    let _ = klon::fs::probe(&disk, 0, len);
    let vol = klon::fs::Volume { disk: &disk, start: 0, len };
    for d in klon::fs::DRIVERS {
        if let Ok(map) = (d.used_map)(&vol) {
            for e in &map.extents {
                assert!(e.0.checked_add(e.1).is_some_and(|end| end <= len), "extent past the partition");
            }
        }
    }
});
