//! Clonezilla images whose partclone checksums are none, CRC32, XXH64 or
//! XXH128 (Clonezilla 5.15.18 and later save with XXH128 by default), from
//! the committed fixtures in tests/fixtures/partclone-xxh/: partclone 0.3.47
//! built with xxhash, run by Debian's ocs-sr (see make-partclone-xxh.sh and
//! PROVENANCE there). Each image verifies, restores byte for byte (against
//! the committed SHA256SUMS of the source disk and its partitions) and
//! passes each filesystem's own checker; a flipped byte in an XXH64 or
//! XXH128 block group is named by file and offset.
//!
//! Needs no root: the targets are files.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;

/// The source disk: p1 ext4 at sector 64 (12288 sectors), p2 FAT at 12352
/// (8192 sectors), as make-partclone-xxh.sh lays them out.
const P1: (u64, u64) = (64 * 512, 12288 * 512);
const P2: (u64, u64) = (12352 * 512, 8192 * 512);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/partclone-xxh")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The image directories, and what `klon info` says of their checksums.
const IMAGES: &[(&str, &str)] = &[
    ("none-zst", "no checksums"),
    ("none-gz", "no checksums"),
    ("crc32-zst", "CRC32 every 10240 blocks"),
    ("crc32-gz", "CRC32 every 100 blocks"),
    ("xxh64-zst", "XXH64 every 10240 blocks"),
    ("xxh64-gz", "XXH64 every 100 blocks"),
    ("xxh64-zst-noreseed", "XXH64 every 100 blocks"),
    ("xxh128-zst", "XXH128 every 10240 blocks"),
    ("xxh128-gz", "XXH128 every 100 blocks"),
    ("xxh128-zst-noreseed", "XXH128 every 100 blocks"),
];

#[test]
fn every_checksum_mode_verifies_and_restores_byte_for_byte() {
    let dir = TempDir::new("pcxxh-restore");
    let listed: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed.len(), IMAGES.len(), "fixture directories {listed:?}");
    for &(name, sums) in IMAGES {
        let image = fixtures().join(name);
        let o = klon(&["info", s(&image)]);
        ok(&o);
        let info = stdout(&o);
        assert!(info.contains("partclone 0.3.47") && info.contains(sums), "{name}: info says\n{info}");
        let o = klon(&["verify", s(&image)]);
        ok(&o);
        let target = dir.join(&format!("{name}.img"));
        ok(&klon(&["restore", "--yes", s(&image), s(&target)]));
        assert_eq!(
            sha256(&target),
            committed_sum(&fixtures(), "source-disk"),
            "{name}: the restored disk differs from the source"
        );
        for (n, (off, len), fs, checker) in
            [(1, P1, "source-p1.ext4", &["e2fsck", "-fn"]), (2, P2, "source-p2.vfat", &["fsck.fat", "-n"])]
        {
            let part = dir.join(&format!("{name}-p{n}"));
            std::fs::write(&part, read_at(&target, off, len)).unwrap();
            assert_eq!(sha256(&part), committed_sum(&fixtures(), fs), "{name}: partition {n} differs from the source");
            run(checker[0], &[checker[1], s(&part)]);
            std::fs::remove_file(&part).unwrap();
        }
        std::fs::remove_file(&target).unwrap();
    }
    // `klon convert` reads the same streams: the klon image of an XXH128
    // image restores the same disk.
    let converted = dir.join("converted");
    ok(&klon(&["convert", s(&fixtures().join("xxh128-gz")), s(&converted)]));
    let target = dir.join("converted.img");
    ok(&klon(&["restore", "--yes", s(&converted), s(&target)]));
    assert_eq!(
        sha256(&target),
        committed_sum(&fixtures(), "source-disk"),
        "the disk restored from the converted image differs"
    );
}

/// The decompressed partclone image of partition 1 (its pieces in order).
fn decompressed_p1(image: &Path) -> Vec<u8> {
    let mut pieces: Vec<PathBuf> = std::fs::read_dir(image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("p1.ext4-ptcl-img."))
        .collect();
    pieces.sort();
    let tool = if pieces[0].to_string_lossy().contains(".gz") { "gzip" } else { "zstd" };
    // The pieces are one stream only when concatenated.
    let whole = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("cat {} | {tool} -dc", pieces.iter().map(|p| format!("'{}'", s(p))).collect::<Vec<_>>().join(" ")))
        .output()
        .unwrap();
    assert!(whole.status.success(), "{tool} -dc of {pieces:?}: {}", String::from_utf8_lossy(&whole.stderr));
    whole.stdout
}

fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A copy of `from` whose partition 1 image is `data`, uncompressed, in
/// pieces of `piece` bytes (`split -b`), or whole when `piece` is 0.
/// Returns the new directory and the pieces' names and lengths.
fn with_uncompressed_p1(from: &Path, to: &Path, data: &[u8], piece: usize) -> Vec<(String, u64)> {
    run("cp", &["-a", s(from), s(to)]);
    let mut base = None;
    for e in std::fs::read_dir(to).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(i) = n.find("p1.ext4-ptcl-img.") {
            base = Some(n[..i + "p1.ext4-ptcl-img.".len()].to_string() + "uncomp");
            std::fs::remove_file(&p).unwrap();
        }
    }
    let base = to.join(base.unwrap());
    std::fs::write(&base, data).unwrap();
    if piece == 0 {
        return vec![(base.file_name().unwrap().to_string_lossy().into_owned(), data.len() as u64)];
    }
    run("split", &["-a", "2", "-b", &piece.to_string(), s(&base), &format!("{}.", s(&base))]);
    std::fs::remove_file(&base).unwrap();
    data.chunks(piece)
        .enumerate()
        .map(|(i, c)| {
            let suffix = format!("{}{}", (b'a' + (i / 26) as u8) as char, (b'a' + (i % 26) as u8) as char);
            (format!("{}.{suffix}", base.file_name().unwrap().to_string_lossy()), c.len() as u64)
        })
        .collect()
}

/// "NAME at byte N" for stream offset `at` in `pieces`.
fn at(pieces: &[(String, u64)], mut at: u64) -> String {
    for (name, len) in pieces {
        if at < *len {
            return format!("{name} at byte {at}");
        }
        at -= len;
    }
    panic!("offset past the pieces");
}

#[test]
fn a_flipped_byte_in_an_xxh_group_is_named_by_file_and_offset() {
    let dir = TempDir::new("pcxxh-damage");
    for (name, algo, piece) in [
        ("xxh64-gz", "XXH64", 65536),
        ("xxh128-gz", "XXH128", 65536),
        ("xxh128-zst", "XXH128", 0),
        ("xxh128-zst-noreseed", "XXH128", 0),
    ] {
        let mut data = decompressed_p1(&fixtures().join(name));
        // partclone 0002: header, bit bitmap and its CRC, then the used
        // blocks with a checksum after every group.
        let (total, bs, sum_len, per_sum) = (le64(&data, 60), le32(&data, 84), data[98] as u64, le32(&data, 100));
        let used = le64(&data, 76);
        assert_eq!(sum_len, if algo == "XXH64" { 8 } else { 16 });
        let data_start = 110 + total.div_ceil(8) + 4;
        // A byte in the middle of the middle used block.
        let block = used / 2;
        let group = block / per_sum;
        let group_start = data_start + group * (per_sum * bs + sum_len);
        let flipped = group_start + (block % per_sum) * bs + bs / 2;
        let blocks_in_group = per_sum.min(used - group * per_sum);
        let stored_at = group_start + blocks_in_group * bs;
        data[flipped as usize] ^= 0x10;
        let copy = dir.join(name);
        let pieces = with_uncompressed_p1(&fixtures().join(name), &copy, &data, piece);
        let o = klon(&["verify", s(&copy)]);
        fails_with(
            &o,
            4,
            &[&format!(
                "{}: {algo} checksum mismatch over the {blocks_in_group} blocks stored from {}",
                at(&pieces, stored_at),
                at(&pieces, group_start)
            )],
        );
        // A restore stops there too, and says so.
        let target = dir.join(&format!("{name}.img"));
        let o = klon(&["restore", "--yes", "--no-verify-after", s(&copy), s(&target)]);
        fails_with(&o, 4, &[&format!("{algo} checksum mismatch"), &at(&pieces, stored_at)]);
        let _ = std::fs::remove_file(&target);
        // Compressed again (gzip, one file): the file and the offsets in the
        // decompressed stream are named.
        if name == "xxh128-gz" {
            let gz = dir.join("xxh128-gz-recompressed");
            let pieces = with_uncompressed_p1(&fixtures().join(name), &gz, &data, 0);
            let raw = gz.join(&pieces[0].0);
            run("gzip", &["-n", s(&raw)]);
            let file = pieces[0].0.replace(".uncomp", ".gz");
            std::fs::rename(gz.join(format!("{}.gz", pieces[0].0)), gz.join(&file)).unwrap();
            let o = klon(&["verify", s(&gz)]);
            fails_with(
                &o,
                4,
                &[
                    &format!("{file} (compressed; read up to byte"),
                    &format!(
                        "at image offset {stored_at}: XXH128 checksum mismatch over the {blocks_in_group} blocks \
                         stored from image offset {group_start}"
                    ),
                ],
            );
        }
        // The undamaged uncompressed stream verifies (so the damage, not the
        // repackaging, was caught).
        data[flipped as usize] ^= 0x10;
        let good = dir.join(&format!("{name}-good"));
        with_uncompressed_p1(&fixtures().join(name), &good, &data, piece);
        ok(&klon(&["verify", s(&good)]));
    }
}
