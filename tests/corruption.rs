//! Damaged and incomplete images: verify fails and names the place, restore
//! refuses (and never leaves a table behind on the target).

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;

/// A backed-up GPT disk with split data files, shared by the tests (each
/// test damages its own copy).
fn fresh_image(t: &TempDir) -> (PathBuf, PathBuf) {
    let (src, img) = (t.join("src.img"), t.join("image"));
    blank_file(&src, 64 * MIB);
    write_at(&src, 0, &text_bytes(1, 4 * MIB as usize));
    write_at(&src, 4 * MIB, &random_bytes(2, 40 * MIB as usize));
    // The smallest split (17 MiB: two 8 MiB chunks) gives three data files.
    ok(&klon(&["backup", "--no-verify", "--split", "17M", src.to_str().unwrap(), img.to_str().unwrap()]));
    (src, img)
}

fn flip(path: &Path, off: u64) {
    let mut b = read_at(path, off, 1);
    b[0] ^= 0x01;
    write_at(path, off, &b);
}

/// Verify fails with exit 4 naming `needle`; restore to a new file refuses
/// with exit 4 and leaves no partition table or signature on the target.
fn caught(img: &Path, t: &TempDir, needle: &str) {
    let o = klon(&["verify", img.to_str().unwrap()]);
    fails_with(&o, 4, &[needle]);
    if img.join("klon.json").exists() && img.join("klon.json.b3").exists() {
        let info = stdout(&klon(&["info", img.to_str().unwrap()]));
        assert!(info.contains("Verified:     FAILED") || info.contains("Complete:     no"), "{info}");
    }
    let dst = t.join("dst.img");
    let _ = std::fs::remove_file(&dst);
    let o = klon(&["restore", "--yes", img.to_str().unwrap(), dst.to_str().unwrap()]);
    fails_with(&o, 4, &[needle]);
    if dst.exists() {
        let head = read_at(&dst, 0, MIB);
        assert!(head.iter().all(|&b| b == 0), "a failed restore left data in the table area");
    }
}

#[test]
fn a_flipped_byte_anywhere_in_a_data_file_is_caught() {
    let t = TempDir::new("flip");
    let (_, img) = fresh_image(&t);
    let files = data_files(&img);
    assert!(files.len() >= 3, "{files:?}");
    // Header magic, extent table, payload start, payload middle, last byte: in first and second file.
    for file in &files[..2] {
        let len = std::fs::metadata(file).unwrap().len();
        for off in [0, 30, 85, 200, len / 2, len - 1] {
            flip(file, off);
            caught(&img, &t, file.file_name().unwrap().to_str().unwrap());
            flip(file, off); // undo
            ok(&klon(&["verify", img.to_str().unwrap()]));
        }
    }
}

#[test]
fn truncated_or_missing_split_file_is_caught() {
    let t = TempDir::new("trunc");
    let (_, img) = fresh_image(&t);
    let files = data_files(&img);
    let middle = &files[1];
    let name = middle.file_name().unwrap().to_str().unwrap().to_string();
    let len = std::fs::metadata(middle).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(middle).unwrap();
    f.set_len(len - 1000).unwrap();
    caught(&img, &t, &name);
    f.set_len(len + 10).unwrap(); // longer is as wrong as shorter
    caught(&img, &t, &name);
    std::fs::remove_file(middle).unwrap();
    caught(&img, &t, &name);
}

#[test]
fn damaged_manifest_index_or_checksum_file_is_caught() {
    let t = TempDir::new("manifest");
    let (_, img) = fresh_image(&t);
    let manifest = img.join("klon.json");
    // A digit changed in the manifest: still valid JSON, but the blake3 no longer holds.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let changed = text.replacen("\"level\": 3", "\"level\": 4", 1);
    assert_ne!(text, changed);
    std::fs::write(&manifest, &changed).unwrap();
    caught(&img, &t, "klon.json");
    std::fs::write(&manifest, &text).unwrap();
    ok(&klon(&["verify", img.to_str().unwrap()]));

    let idx = img.join("disk.idx");
    flip(&idx, 100);
    caught(&img, &t, "disk.idx");
    flip(&idx, 100);

    let sum = img.join("klon.json.b3");
    let s = std::fs::read(&sum).unwrap();
    std::fs::remove_file(&sum).unwrap();
    caught(&img, &t, "klon.json.b3");
    std::fs::write(&sum, &s).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    caught(&img, &t, "klon.json");
}

#[test]
fn a_chunk_record_longer_than_klon_writes_is_refused_before_reading_it() {
    // A consistent but forged image (checksums all made to match): the last
    // record claims 9 MiB more payload, and its data file has them.
    let t = TempDir::new("long-record");
    let (_, img) = fresh_image(&t);
    let grow = 9 * MIB;
    let idx_path = img.join("disk.idx");
    let mut idx = std::fs::read(&idx_path).unwrap();
    let last = idx.len() - 64;
    let stored = u32::from_le_bytes(idx[last + 20..last + 24].try_into().unwrap()) + grow as u32;
    idx[last + 20..last + 24].copy_from_slice(&stored.to_le_bytes());
    std::fs::write(&idx_path, &idx).unwrap();
    let last_file = data_files(&img).pop().unwrap();
    let size = std::fs::metadata(&last_file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&last_file).unwrap();
    f.set_len(size + grow).unwrap();
    let manifest = img.join("klon.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let stream = &mut m["streams"][0];
    assert_eq!(stream["name"], "disk");
    stream["index"]["blake3"] = blake3::hash(&idx).to_hex().to_string().into();
    let files = stream["data_files"].as_array_mut().unwrap();
    let n = files.len();
    files[n - 1]["size"] = (size + grow).into();
    stream["compressed_bytes"] = (stream["compressed_bytes"].as_u64().unwrap() + grow).into();
    let text = serde_json::to_string_pretty(&m).unwrap() + "\n";
    std::fs::write(&manifest, &text).unwrap();
    std::fs::write(img.join("klon.json.b3"), format!("{}  klon.json\n", blake3::hash(text.as_bytes()).to_hex()))
        .unwrap();
    caught(&img, &t, "longer than any klon writes");
}

#[test]
fn newer_format_version_is_refused_with_advice() {
    let t = TempDir::new("version");
    let (_, img) = fresh_image(&t);
    let manifest = img.join("klon.json");
    let text =
        std::fs::read_to_string(&manifest).unwrap().replacen("\"format_version\": 1", "\"format_version\": 3", 1);
    std::fs::write(&manifest, &text).unwrap();
    let sum = format!("{}  klon.json\n", blake3::hash(text.as_bytes()).to_hex());
    std::fs::write(img.join("klon.json.b3"), sum).unwrap();
    let o = klon(&["verify", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("version 3"), "{}", stderr(&o));
}

/// Starts a backup slow enough to be interrupted (1.5 GiB of text at zstd
/// level 19) and returns once it has written its first data file.
fn start_slow_backup(t: &TempDir) -> (std::process::Child, PathBuf, PathBuf, PathBuf) {
    let (src, img, partial) = (t.join("src.img"), t.join("image"), t.join("image.klon-partial"));
    blank_file(&src, 1536 * MIB);
    let chunk = text_bytes(3, 8 * MIB as usize);
    for i in 0..192 {
        write_at(&src, i * 8 * MIB, &chunk);
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(["backup", "--quiet", "--level", "19", src.to_str().unwrap(), img.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !partial.join("disk.000").exists() {
        assert!(started.elapsed().as_secs() < 60, "backup did not start writing");
        assert!(child.try_wait().unwrap().is_none(), "backup ended before it could be interrupted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child, src, img, partial)
}

#[test]
fn interrupted_backup_is_reported_incomplete() {
    let t = TempDir::new("interrupt");
    let (mut child, src, img, partial) = start_slow_backup(&t);
    child.kill().unwrap(); // as a power cut or a pulled drive would
    child.wait().unwrap();
    assert!(!img.exists(), "an interrupted backup must not look like a finished image");
    fails_with(&klon(&["info", img.to_str().unwrap()]), 4, &["did not finish"]);
    fails_with(&klon(&["verify", img.to_str().unwrap()]), 4, &["did not finish"]);
    fails_with(&klon(&["verify", partial.to_str().unwrap()]), 4, &["unfinished"]);
    let o = klon(&["restore", "--yes", partial.to_str().unwrap(), t.join("dst.img").to_str().unwrap()]);
    fails_with(&o, 4, &["unfinished"]);
    assert!(!t.join("dst.img").exists());
    // The same name cannot be reused until the leftover is dealt with.
    fails_with(&klon(&["backup", src.to_str().unwrap(), img.to_str().unwrap()]), 5, &["did not finish"]);
}

#[test]
fn cancelled_backup_removes_its_unfinished_image() {
    let t = TempDir::new("cancel");
    let (child, _src, img, partial) = start_slow_backup(&t);
    run("kill", &["-INT", &child.id().to_string()]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("interrupted"));
    assert!(!partial.exists() && !img.exists(), "cancelled backup left files behind");
}

/// Rewrites the manifest of `img` through `edit` and makes its checksum
/// match again: a forged image whose manifest lies but passes its blake3.
fn forge(img: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let manifest = img.join("klon.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    edit(&mut m);
    let text = serde_json::to_string_pretty(&m).unwrap() + "\n";
    std::fs::write(&manifest, &text).unwrap();
    std::fs::write(img.join("klon.json.b3"), format!("{}  klon.json\n", blake3::hash(text.as_bytes()).to_hex()))
        .unwrap();
}

/// Verify fails with exit 4 naming `needle`, and a restore onto an existing
/// target refuses with exit 4 before writing anything: the target, filled
/// with a pattern, is byte for byte what it was.
fn refused_before_writing(img: &Path, target: &Path, needle: &str) {
    let before = std::fs::read(target).unwrap();
    fails_with(&klon(&["verify", img.to_str().unwrap()]), 4, &[needle]);
    let o = klon(&["restore", "--yes", img.to_str().unwrap(), target.to_str().unwrap()]);
    fails_with(&o, 4, &[needle]);
    assert!(std::fs::read(target).unwrap() == before, "a refused restore changed the target ({needle})");
}

/// A manifest that lies about the layout or the streams, or an index that
/// does not match, is refused before the first byte is written, by every
/// check that does not need the data; `verify` runs the same checks. Each
/// of these used to pass `verify` or be found only after the restore had
/// written earlier streams (and, with sector size 0, to panic).
#[test]
fn a_lying_manifest_or_index_is_refused_before_the_first_write() {
    let t = TempDir::new("lies");
    let (src, img, target) = (t.join("src.img"), t.join("image"), t.join("target.img"));
    make_gpt_disk(&src, 48 * MIB);
    ok(&klon(&["backup", "--quiet", "--no-verify", src.to_str().unwrap(), img.to_str().unwrap()]));
    let pattern: Vec<u8> = (0..48 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&target, &pattern).unwrap();
    let manifest = std::fs::read(img.join("klon.json")).unwrap();
    let sum = std::fs::read(img.join("klon.json.b3")).unwrap();
    let undo = || {
        std::fs::write(img.join("klon.json"), &manifest).unwrap();
        std::fs::write(img.join("klon.json.b3"), &sum).unwrap();
    };
    let parts = |m: &mut serde_json::Value| m["layout"]["partitions"].as_array_mut().unwrap().clone();

    forge(&img, |m| m["layout"]["gpt"] = serde_json::Value::Null);
    refused_before_writing(&img, &target, "GPT layout without its geometry");
    undo();

    forge(&img, |m| m["layout"]["partitions"][2]["size"] = (64 * MIB).into());
    refused_before_writing(&img, &target, "partition 3 reaches past the end of the disk");
    undo();

    forge(&img, |m| {
        let first = parts(m)[0].clone();
        let many: Vec<serde_json::Value> = (1..=5000u64)
            .map(|n| {
                let mut p = first.clone();
                p["number"] = n.into();
                p
            })
            .collect();
        m["layout"]["partitions"] = many.into();
    });
    refused_before_writing(&img, &target, "5000 partitions");
    undo();

    forge(&img, |m| m["layout"]["sector_size"] = 0.into());
    refused_before_writing(&img, &target, "sector size 0");
    undo();

    forge(&img, |m| m["layout"]["sector_size"] = 4096.into());
    refused_before_writing(&img, &target, "4096-byte sector");
    undo();
    forge(&img, |m| {
        m["layout"]["sector_size"] = 4096.into();
        m["source"]["logical_sector_size"] = 4096.into();
    });
    refused_before_writing(&img, &target, "4096-byte sector");
    undo();

    // A partition's stream that is not where its partition is.
    forge(&img, |m| {
        let s = m["streams"].as_array_mut().unwrap().iter_mut().find(|s| s["name"] == "p2").unwrap();
        s["start"] = (s["start"].as_u64().unwrap() + 4096).into();
    });
    refused_before_writing(&img, &target, "p2");
    undo();

    // The index of the stream written last (the area outside partitions)
    // damaged: found before any partition is written.
    let idx = img.join("boot.idx");
    flip(&idx, 30);
    refused_before_writing(&img, &target, "boot.idx");
    flip(&idx, 30);

    // An index whose checksum the manifest agrees with, but whose records
    // do not follow each other in the data file.
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = bytes.len();
    bytes[n - 64 + 8] ^= 0x10; // the last record's offset in its data file
    std::fs::write(&idx, &bytes).unwrap();
    forge(&img, |m| {
        let s = m["streams"].as_array_mut().unwrap().iter_mut().find(|s| s["name"] == "boot").unwrap();
        s["index"]["blake3"] = blake3::hash(&bytes).to_hex().to_string().into();
    });
    refused_before_writing(&img, &target, "boot.idx");
    undo();
}
