//! Clonezilla layout files as CzImage::open reads them. The input is split
//! at lines "--8<--" into: disk, parts, sda-pt.sf, sda-pt.parted, dev-fs.list
//! (missing pieces are left out, so each file's absence is fuzzed too).
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

const FILES: [&str; 5] = ["disk", "parts", "sda-pt.sf", "sda-pt.parted", "dev-fs.list"];

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("cz");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rest = data;
    for name in FILES {
        let (piece, next) = match find(rest, b"\n--8<--\n") {
            Some(i) => (&rest[..i], Some(&rest[i + 8..])),
            None => (rest, None),
        };
        std::fs::write(dir.join(name), piece).unwrap();
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    let _ = klon::clonezilla::CzImage::open(&dir);
});

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}
