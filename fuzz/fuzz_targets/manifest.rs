//! klon.json as Manifest::load reads it (checksum made to match, so the
//! JSON parsing and validation are what is fuzzed).
#![no_main]
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("image");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(klon::image::manifest::MANIFEST_NAME), data).unwrap();
    let sum = format!("{}  klon.json\n", blake3::hash(data).to_hex());
    std::fs::write(dir.join(klon::image::manifest::MANIFEST_SUM_NAME), sum).unwrap();
    let _ = klon::image::manifest::Manifest::load(&dir);
});
