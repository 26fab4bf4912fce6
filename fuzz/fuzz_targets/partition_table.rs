//! GPT, MBR and EBR chains: table::read_layout on a disk image file.
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::file_of("disk.img", data);
    let disk = klon::device::Disk::open_read_only(&path).unwrap();
    if let Ok(layout) = klon::table::read_layout(&disk) {
        let _ = layout.check();
    }
});
