//! Clonezilla images saved encrypted (`ocs-sr -enc`): the image directory
//! made by `gocryptfs -init -plaintextnames`, the image's files saved
//! through the mounted directory (names kept, contents encrypted), and a
//! clear `gocryptfs.info`, as Clonezilla's ocs-functions does. The test
//! makes one with the real gocryptfs from the committed Debian 13 fixture
//! (tests/fixtures/clonezilla-trixie/gpt-zst).
//!
//! With the passphrase klon opens it (a read-only gocryptfs mount, gone
//! again afterwards): info, verify, restore (byte for byte what the
//! unencrypted image restores), convert. Without it, or with a wrong one,
//! it refuses before anything is written (exit 6).
//!
//! Needs gocryptfs and FUSE (CI runs it as root).

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;

fn plain() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clonezilla-trixie/gpt-zst")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const PASSPHRASE: &str = "klon gocryptfs test";

/// The fixture image saved again as Clonezilla's `-enc` saves it.
fn encrypted(t: &TempDir) -> PathBuf {
    let dir = t.join("enc-img");
    common::clonezilla::gocryptfs_image(t, &plain(), &dir, PASSPHRASE);
    dir
}

/// No mount of this test's `image` is left. The other test of this file
/// runs at the same time with its own image mounted now and then, so only
/// mounts whose source is this image count.
fn no_gocryptfs_mounts(image: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|line| line.split(' ').next() == Some(s(image))).collect();
    assert!(left.is_empty(), "a decrypted image is still mounted:\n{}", left.join("\n"));
}

#[test]
fn an_encrypted_clonezilla_image_opens_with_its_passphrase_and_restores_as_the_plain_one() {
    let t = TempDir::new("czenc");
    let image = encrypted(&t);
    let pass = t.join("pass");
    std::fs::write(&pass, format!("{PASSPHRASE}\n")).unwrap();
    let with_pass = |args: &[&str]| {
        let mut all = vec!["--passphrase-file", s(&pass)];
        all.extend_from_slice(args);
        klon(&all)
    };

    let o = with_pass(&["info", s(&image)]);
    ok(&o);
    let info = stdout(&o);
    assert!(
        info.contains("Encrypted:    with gocryptfs")
            && info.contains(&format!("Image:        {} (Clonezilla)", s(&image))),
        "{info}"
    );
    assert!(!info.contains("klon-gocryptfs"), "info names the mount, not the image:\n{info}");
    no_gocryptfs_mounts(&image);
    ok(&with_pass(&["verify", s(&image)]));
    no_gocryptfs_mounts(&image);

    let expected = t.join("plain.img");
    ok(&klon(&["restore", "--yes", s(&plain()), s(&expected)]));
    let target = t.join("target.img");
    ok(&with_pass(&["restore", "--yes", s(&image), s(&target)]));
    assert_eq!(sha256(&target), sha256(&expected), "the encrypted image restores other bytes than the plain one");
    no_gocryptfs_mounts(&image);

    let converted = t.join("converted");
    ok(&with_pass(&["convert", s(&image), s(&converted)]));
    no_gocryptfs_mounts(&image);
    let again = t.join("again.img");
    ok(&klon(&["restore", "--yes", s(&converted), s(&again)]));
    assert_eq!(sha256(&again), sha256(&expected), "the converted image restores other bytes");
}

#[test]
fn an_encrypted_image_without_its_passphrase_is_refused_before_anything_is_written() {
    let t = TempDir::new("czenc-pass");
    let image = encrypted(&t);
    let target = t.join("target.img");
    garbage_file(&target, 48 * MIB);
    let before = sha256(&target);
    fails_with(&klon(&["restore", "--yes", s(&image), s(&target)]), 6, &["encrypted with gocryptfs", "passphrase"]);
    let wrong = t.join("wrong");
    std::fs::write(&wrong, "klon gocryptfs tesT\n").unwrap();
    for args in [&["restore", "--yes", s(&image), s(&target)][..], &["verify", s(&image)], &["info", s(&image)]] {
        let mut all = vec!["--passphrase-file", s(&wrong)];
        all.extend_from_slice(args);
        fails_with(&klon(&all), 6, &["does not unlock the image", "encrypted with gocryptfs"]);
    }
    assert_eq!(sha256(&target), before, "the target was written");
    no_gocryptfs_mounts(&image);
}
