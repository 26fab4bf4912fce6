//! Clonezilla images of disks with LUKS volumes, from the committed fixture
//! in tests/fixtures/clonezilla-luks/: Debian 13's clonezilla 5.9.9 (ocs-sr
//! `-luks yes`) saved, in a QEMU guest, a GPT disk with a plain ext4 (p1), a
//! LUKS2 volume (p2: 4096-byte sectors, argon2id) and a LUKS1 volume (p3:
//! PBKDF2), each holding an ext4; Clonezilla saved each volume's header and
//! its filesystem decrypted. The same guest then restored the image with
//! Clonezilla's own restore (header written back, volume opened with
//! dm-crypt, partclone into it) onto a zeroed disk: SHA256SUMS has its LUKS
//! partitions. See make-clonezilla-luks.sh and PROVENANCE there.
//!
//! klon restores the volumes without device-mapper (the header, then the
//! filesystem's blocks encrypted with the key the passphrase unlocks), and
//! onto zeros its LUKS partitions are byte for byte what Clonezilla's
//! restore through the kernel's dm-crypt wrote. Onto stale data, the
//! volumes opened with the key cryptsetup itself derives from the restored
//! header hold the sample's filesystems (e2fsck, file sums). Passphrases
//! that do not unlock, and damaged or incomplete LUKS files, are refused
//! before anything is written.
//!
//! Needs cryptsetup (the host's, which reads headers without
//! device-mapper); no root.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;
use common::terminal::{Terminal, command_line, exit_status};
use klon::fs::luks;

/// The sample disk: 48 MiB; p1 at sector 2048 (16384 sectors), the LUKS2
/// p2 at 18432 (40960), the LUKS1 p3 at 59392 (32768).
const DISK_SIZE: u64 = 48 * MIB;
const P1: (u64, u64) = (2048 * 512, 16384 * 512);
const P2: (u64, u64) = (18432 * 512, 40960 * 512);
const P3: (u64, u64) = (59392 * 512, 32768 * 512);
/// Where each volume's data starts in its partition.
const P2_DATA: u64 = MIB;
const P3_DATA: u64 = 2 * MIB;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clonezilla-luks")
}

fn image() -> PathBuf {
    fixtures().join("luks-zst")
}

fn passphrase() -> PathBuf {
    fixtures().join("PASSPHRASE")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// klon with the fixture's passphrase.
fn klon_unlocked(args: &[&str]) -> std::process::Output {
    let file = passphrase();
    let mut all = vec!["--passphrase-file", s(&file)];
    all.extend_from_slice(args);
    klon(&all)
}

/// The volume key cryptsetup derives from the LUKS header at the start of
/// `file` with the passphrase in `key_file` (`luksDump --dump-volume-key`).
fn cryptsetup_key(file: &Path, key_file: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["luksDump", "--dump-volume-key", "--batch-mode", "--key-file", s(key_file)];
    args.extend_from_slice(extra);
    args.push(s(file));
    let out = run("cryptsetup", &args);
    let at = out.find("MK dump:").unwrap_or_else(|| panic!("{out}"));
    let hex: String = out[at + 8..]
        .split_whitespace()
        .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// Opens the LUKS volume of the restored partition (`range` of `disk`,
/// data at `data`) with cryptsetup's key, and checks the filesystem in it
/// with e2fsck and the sample's files.
fn check_volume(t: &TempDir, disk: &Path, range: (u64, u64), data: u64, sector: u32, name: &str, files: &[&str]) {
    let part = t.join(&format!("{name}.part"));
    std::fs::write(&part, read_at(disk, range.0, range.1)).unwrap();
    // PASSPHRASE ends with a newline, which is not part of the passphrase.
    let key = luks::VolumeKey::new(&cryptsetup_key(&part, &passphrase(), &["--keyfile-size", "17"]), sector).unwrap();
    let mut plain = read_at(&part, data, range.1 - data);
    key.decrypt(0, &mut plain);
    let fs = t.join(&format!("{name}.ext4"));
    std::fs::write(&fs, plain).unwrap();
    run("e2fsck", &["-fn", s(&fs)]);
    for f in files {
        let out = t.join("file");
        run("debugfs", &["-R", &format!("dump /{f} {}", s(&out)), s(&fs)]);
        assert_eq!(sha256(&out), committed_sum(&fixtures(), &format!("{name}/{f}")), "{name}: /{f} differs");
        std::fs::remove_file(&out).unwrap();
    }
    std::fs::remove_file(&part).unwrap();
    std::fs::remove_file(&fs).unwrap();
}

fn check_volumes(t: &TempDir, disk: &Path) {
    let luks2 = ["etc/readme.txt", "etc/hostname", "home/user/photo.raw", "home/user/notes.txt"];
    check_volume(t, disk, P2, P2_DATA, 4096, "luks2", &luks2);
    check_volume(t, disk, P3, P3_DATA, 512, "luks1", &["data/random.bin", "data/text.txt"]);
}

/// Bytes `range` of `disk`, written to a file named `name` in `t`, as
/// committed SHA256SUMS names them.
fn part_sum(t: &TempDir, disk: &Path, range: (u64, u64), name: &str) -> String {
    let f = t.join(name);
    std::fs::write(&f, read_at(disk, range.0, range.1)).unwrap();
    let sum = sha256(&f);
    std::fs::remove_file(&f).unwrap();
    sum
}

#[test]
fn luks_volumes_restore_byte_for_byte_as_clonezilla_s_own_restore_wrote_them() {
    let t = TempDir::new("czluks");
    // info and verify need no passphrase: they read what is stored.
    let o = klon(&["info", s(&image())]);
    ok(&o);
    let info = stdout(&o);
    for needle in
        ["LUKS2 volume (aes-xts-plain64, 4096-byte sectors)", "LUKS1 volume", "vdb2-luksHeader.bin", "crypto_LUKS"]
    {
        assert!(info.contains(needle), "info lacks {needle:?}:\n{info}");
    }
    let o = klon(&["verify", s(&image())]);
    ok(&o);
    assert!(stderr(&o).contains("MD5SUMS: 24 files match"), "{}", stderr(&o));

    // Onto zeros: what Clonezilla's restore wrote through dm-crypt.
    let target = t.join("zeros.img");
    blank_file(&target, DISK_SIZE);
    ok(&klon_unlocked(&["restore", "--yes", s(&image()), s(&target)]));
    for (range, name) in [(P2, "cz-restored-p2"), (P3, "cz-restored-p3")] {
        assert_eq!(part_sum(&t, &target, range, name), committed_sum(&fixtures(), name), "{name} differs");
    }
    assert_eq!(part_sum(&t, &target, P1, "boot.ext4"), committed_sum(&fixtures(), "boot.ext4"), "p1 differs");
    check_volumes(&t, &target);
    std::fs::remove_file(&target).unwrap();

    // Onto stale data of a larger disk.
    let target = t.join("stale.img");
    garbage_file(&target, DISK_SIZE + 16 * MIB);
    ok(&klon_unlocked(&["restore", "--yes", s(&image()), s(&target)]));
    check_volumes(&t, &target);
    std::fs::remove_file(&target).unwrap();

    // One volume alone, onto a partition-sized file.
    let p2 = t.join("p2.img");
    ok(&klon_unlocked(&["restore", "--yes", "--partition", "2", s(&image()), s(&p2)]));
    assert_eq!(sha256(&p2), committed_sum(&fixtures(), "cz-restored-p2"), "partition 2 restored alone differs");
}

/// The same image as `saveparts` would have it (no `disk` file): its LUKS
/// volumes restore into the partitions of a disk whose table has them.
#[test]
fn saved_partitions_include_the_luks_volumes() {
    let t = TempDir::new("czluks-parts");
    let parts = t.join("parts");
    run("cp", &["-a", s(&image()), s(&parts)]);
    std::fs::remove_file(parts.join("disk")).unwrap();
    std::fs::remove_file(parts.join("MD5SUMS")).unwrap();
    let target = t.join("target.img");
    blank_file(&target, DISK_SIZE);
    ok(&klon_unlocked(&["restore", "--yes", s(&image()), s(&target)]));
    for (start, len) in [P2, P3] {
        write_at(&target, start, &vec![0u8; len as usize]);
    }
    ok(&klon_unlocked(&["restore", "--yes", s(&parts), s(&target)]));
    for (range, name) in [(P2, "cz-restored-p2"), (P3, "cz-restored-p3")] {
        assert_eq!(part_sum(&t, &target, range, name), committed_sum(&fixtures(), name), "{name} differs");
    }
}

/// convert needs the passphrase too (the klon image holds the volumes
/// encrypted, as a restore writes them); its image restores the same with
/// no passphrase.
#[test]
fn a_converted_image_keeps_the_volumes_encrypted() {
    let t = TempDir::new("czluks-convert");
    let converted = t.join("converted");
    fails_with(&klon(&["convert", s(&image()), s(&converted)]), 6, &["LUKS volume vdb2", "passphrase"]);
    assert!(!converted.exists(), "a refused conversion left {}", converted.display());
    ok(&klon_unlocked(&["convert", s(&image()), s(&converted)]));
    ok(&klon(&["verify", s(&converted)]));
    let target = t.join("target.img");
    blank_file(&target, DISK_SIZE);
    ok(&klon(&["restore", "--yes", s(&converted), s(&target)]));
    for (range, name) in [(P2, "cz-restored-p2"), (P3, "cz-restored-p3")] {
        assert_eq!(part_sum(&t, &target, range, name), committed_sum(&fixtures(), name), "{name} differs");
    }
}

#[test]
fn a_passphrase_that_does_not_unlock_is_refused_before_anything_is_written() {
    let t = TempDir::new("czluks-pass");
    let target = t.join("target.img");
    garbage_file(&target, DISK_SIZE);
    let before = sha256(&target);
    // None given, no terminal to ask on.
    fails_with(&klon(&["restore", "--yes", s(&image()), s(&target)]), 6, &["LUKS volume vdb2", "KLON_PASSPHRASE"]);
    // A wrong one.
    let wrong = t.join("wrong");
    std::fs::write(&wrong, "klon luks fixturE\n").unwrap();
    let o = klon(&["--passphrase-file", s(&wrong), "restore", "--yes", s(&image()), s(&target)]);
    fails_with(&o, 6, &["does not unlock LUKS volume vdb2", "nothing was written"]);
    let o = klon(&["--passphrase-file", s(&wrong), "restore", "--yes", "--partition", "3", s(&image()), s(&target)]);
    fails_with(&o, 6, &["does not unlock LUKS volume vdb3"]);
    assert_eq!(sha256(&target), before, "the target was written");
}

/// A copy of the fixture image in `t`, changed by `edit`.
fn edited(t: &TempDir, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = t.join(name);
    run("cp", &["-a", s(&image()), s(&dir)]);
    edit(&dir);
    dir
}

fn flip(file: &Path, at: u64) {
    let b = read_at(file, at, 1)[0];
    write_at(file, at, &[b ^ 0x04]);
}

fn mapper(n: usize) -> String {
    let list = std::fs::read_to_string(image().join("luks-dev.list")).unwrap();
    list.lines().filter(|l| l.starts_with("/dev/")).nth(n).unwrap().split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn damaged_or_incomplete_luks_files_are_refused_before_anything_is_written() {
    let t = TempDir::new("czluks-damaged");
    let luks2_image = format!("{}.ext4-ptcl-img.zst", mapper(0));
    let cases: Vec<(PathBuf, Vec<&str>, i32)> = vec![
        // A byte of LUKS2's JSON text: the primary header's checksum fails.
        (
            edited(&t, "json", |d| flip(&d.join("vdb2-luksHeader.bin"), 4096 + 10)),
            vec!["vdb2-luksHeader.bin", "primary LUKS2 header", "checksum"],
            4,
        ),
        // The secondary copy's.
        (
            edited(&t, "json2", |d| flip(&d.join("vdb2-luksHeader.bin"), 16384 + 4096 + 10)),
            vec!["vdb2-luksHeader.bin", "secondary LUKS2 header"],
            4,
        ),
        // LUKS1 has no checksum: a byte of its keyslot's split key makes the
        // passphrase unlock nothing.
        (
            edited(&t, "keyslot", |d| flip(&d.join("vdb3-luksHeader.bin"), 4096 + 77)),
            vec!["does not unlock LUKS volume vdb3"],
            6,
        ),
        (
            edited(&t, "cut", |d| {
                // Into the active keyslot's split key (the others' areas
                // are not needed).
                let f = d.join("vdb3-luksHeader.bin");
                std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(8192).unwrap();
            }),
            vec!["vdb3-luksHeader.bin", "after its keyslots"],
            4,
        ),
        (
            edited(&t, "no-header", |d| std::fs::remove_file(d.join("vdb2-luksHeader.bin")).unwrap()),
            vec!["vdb2-luksHeader.bin", "missing"],
            4,
        ),
        (
            edited(&t, "no-image", |d| std::fs::remove_file(d.join(&luks2_image)).unwrap()),
            vec!["LUKS volume", "missing", "vdb2"],
            4,
        ),
        (
            edited(&t, "ghost", |d| {
                let list = d.join("luks-dev.list");
                let text = std::fs::read_to_string(&list).unwrap();
                std::fs::write(&list, format!("{text}/dev/vdb7 5eed7a1e-0000-4000-8000-00000000a007 ocs_luks_zzz\n"))
                    .unwrap();
            }),
            vec!["/dev/vdb7", "partition table does not hold"],
            4,
        ),
        (
            edited(&t, "swap", |d| {
                std::fs::write(d.join(format!("swappt-{}.info", mapper(1))), "UUID=\"x\"\n").unwrap()
            }),
            vec!["vdb3", "swap area inside LUKS", "ocs-sr restoredisk"],
            1,
        ),
    ];
    for (dir, needles, code) in cases {
        let _ = std::fs::remove_file(dir.join("MD5SUMS"));
        let target = t.join("target.img");
        garbage_file(&target, DISK_SIZE);
        let before = sha256(&target);
        fails_with(&klon_unlocked(&["restore", "--yes", s(&dir), s(&target)]), code, &needles);
        assert_eq!(sha256(&target), before, "{}: the target was written", dir.display());
        if code != 6 {
            fails_with(&klon(&["verify", s(&dir)]), code, &needles);
        }
    }
    // A flipped byte in a volume's filesystem image is named by verify and
    // by restore.
    let dir = edited(&t, "fs", |d| {
        let f = d.join(&luks2_image);
        flip(&f, std::fs::metadata(&f).unwrap().len() / 2);
        std::fs::remove_file(d.join("MD5SUMS")).unwrap();
    });
    let o = klon(&["verify", s(&dir)]);
    assert!(!o.status.success() && stderr(&o).contains(&luks2_image), "{}", stderr(&o));
    let target = t.join("target.img");
    garbage_file(&target, DISK_SIZE);
    let o = klon_unlocked(&["restore", "--yes", s(&dir), s(&target)]);
    assert!(!o.status.success() && stderr(&o).contains(&luks2_image), "{}", stderr(&o));
}

/// klon's unlock against cryptsetup's own: headers cryptsetup makes (on
/// files: no device-mapper needed) in the kinds klon takes give klon the
/// volume key cryptsetup prints; another passphrase unlocks nothing; kinds
/// klon does not take are refused naming them.
#[test]
fn headers_cryptsetup_makes_unlock_to_the_key_cryptsetup_prints() {
    let t = TempDir::new("czluks-headers");
    let pass = t.join("pass");
    std::fs::write(&pass, "klon luks fixture").unwrap();
    let file = t.join("volume");
    let cases: &[&[&str]] = &[
        &["--type", "luks1", "--hash", "sha1", "--key-size", "256"],
        &["--type", "luks1", "--hash", "sha512", "--key-size", "512"],
        &["--type", "luks2", "--pbkdf", "pbkdf2", "--hash", "sha256", "--key-size", "256"],
        &["--type", "luks2", "--pbkdf", "argon2i", "--pbkdf-memory", "8192", "--key-size", "512"],
        &["--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-memory", "8192", "--sector-size", "4096"],
    ];
    for extra in cases {
        let _ = std::fs::remove_file(&file);
        blank_file(&file, 20 * MIB);
        let mut args = vec!["luksFormat", "-q", "--cipher", "aes-xts-plain64", "--key-file", s(&pass)];
        if !extra.contains(&"pbkdf2") && extra[1] == "luks2" {
            args.extend(["--pbkdf-force-iterations", "4"]);
        } else {
            args.extend(["--pbkdf-force-iterations", "1000"]);
        }
        args.extend_from_slice(extra);
        args.push(s(&file));
        run("cryptsetup", &args);
        let bytes = read_at(&file, 0, 16 * MIB);
        let header = luks::parse(&bytes).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        let sector = header.sector_size;
        let key = header.unlock(&bytes, b"klon luks fixture").unwrap().unwrap_or_else(|| panic!("{extra:?}: locked"));
        let theirs = luks::VolumeKey::new(&cryptsetup_key(&file, &pass, &[]), sector).unwrap();
        let (mut a, mut b) = (vec![0x5au8; 8192], vec![0x5au8; 8192]);
        key.encrypt(8192, &mut a);
        theirs.encrypt(8192, &mut b);
        assert_eq!(a, b, "{extra:?}: klon's volume key is not cryptsetup's");
        assert!(
            header.unlock(&bytes, b"klon luks fixturE").unwrap().is_none(),
            "{extra:?}: a wrong passphrase unlocked"
        );
    }
    let _ = std::fs::remove_file(&file);
    blank_file(&file, 20 * MIB);
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "-q",
            "--type",
            "luks1",
            "--cipher",
            "aes-cbc-essiv:sha256",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            s(&pass),
            s(&file),
        ],
    );
    let e = luks::parse(&read_at(&file, 0, 4 * MIB)).unwrap_err();
    assert!(e.contains("aes-cbc-essiv:sha256") && e.contains("aes-xts-plain64"), "{e}");
}

/// Typed on a terminal, the passphrase is asked once: the one that opened
/// the first volume is tried on the next before asking again.
#[test]
fn a_typed_passphrase_is_asked_once_for_volumes_that_share_it() {
    let t = TempDir::new("czluks-typed");
    let target = t.join("target.img");
    blank_file(&target, DISK_SIZE);
    let out = t.join("out.txt");
    // stdout to a file; stderr, where the passphrase is asked, on the terminal.
    let cmd = command_line(&[env!("CARGO_BIN_EXE_klon"), "restore", "--yes", s(&image()), s(&target)], &out);
    let term = Terminal::start("luks", &cmd);
    term.wait_for("Passphrase for LUKS volume vdb2");
    term.type_line("klon luks fixture");
    let (said, code) = exit_status(&term, &out);
    assert_eq!(code, 0, "{said}\n{}", term.screen());
    assert!(!term.screen().contains("Passphrase for LUKS volume vdb3"), "asked again:\n{}", term.screen());
    assert_eq!(part_sum(&t, &target, P3, "cz-restored-p3"), committed_sum(&fixtures(), "cz-restored-p3"));
}
