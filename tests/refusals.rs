//! Refusals of the command line: what a refused restore or clone says, its
//! exit code, and that it leaves nothing behind.

mod common;

use std::path::PathBuf;

use common::disks::*;

#[test]
fn a_dev_path_that_is_no_block_device_is_refused_and_nothing_is_created() {
    let t = TempDir::new("devpath");
    let (src, img) = small_image(&t);
    let target = PathBuf::from(format!("/dev/klon-nonexistent-{}", std::process::id()));
    assert!(!target.exists(), "{} exists before the test", target.display());
    let restore = klon(&["restore", "--yes", img.to_str().unwrap(), target.to_str().unwrap()]);
    let created = target.exists();
    let _ = std::fs::remove_file(&target);
    assert!(!created, "restore created {}", target.display());
    fails_with(&restore, 5, &[target.to_str().unwrap(), "not a disk", "klon disks"]);

    let clone = klon(&["clone", "--yes", src.to_str().unwrap(), target.to_str().unwrap()]);
    let created = target.exists();
    let _ = std::fs::remove_file(&target);
    assert!(!created, "clone created {}", target.display());
    fails_with(&clone, 5, &[target.to_str().unwrap(), "not a disk", "klon disks"]);

    // A device that is not a block device is no disk either.
    let o = klon(&["restore", "--yes", img.to_str().unwrap(), "/dev/null"]);
    fails_with(&o, 5, &["/dev/null", "not a disk", "klon disks"]);
}

/// Every refusal after klon created the target file removes that file; a
/// target that was there before stays as it was.
#[test]
fn a_refused_restore_or_clone_leaves_no_file_behind() {
    let t = TempDir::new("leftover");
    let (src, img) = small_image(&t);
    let (img_s, src_s) = (img.to_str().unwrap(), src.to_str().unwrap());

    // Inside the image directory.
    let inside = img.join("target.img");
    let o = klon(&["restore", "--yes", img_s, inside.to_str().unwrap()]);
    fails_with(&o, 5, &["inside the image directory"]);
    assert!(!inside.exists(), "a refused restore left {}", inside.display());

    // No --yes and no terminal: refused after the target was opened.
    let new = t.join("new.img");
    let o = klon(&["restore", img_s, new.to_str().unwrap()]);
    fails_with(&o, 5, &["--yes"]);
    assert!(!new.exists(), "a refused restore left {}", new.display());
    let o = klon(&["clone", src_s, new.to_str().unwrap()]);
    fails_with(&o, 5, &["--yes"]);
    assert!(!new.exists(), "a refused clone left {}", new.display());

    // An existing file that is refused is left alone.
    let small = t.join("small.img");
    blank_file(&small, MIB);
    write_at(&small, 0, &text_bytes(9, MIB as usize));
    let o = klon(&["restore", "--yes", img_s, small.to_str().unwrap()]);
    fails_with(&o, 5, &["too small"]);
    assert_eq!(read_at(&small, 0, MIB), text_bytes(9, MIB as usize), "a refused restore changed an existing file");
    let fits = t.join("fits.img");
    blank_file(&fits, 4 * MIB);
    write_at(&fits, 0, &text_bytes(9, MIB as usize));
    let o = klon(&["restore", img_s, fits.to_str().unwrap()]);
    fails_with(&o, 5, &["--yes"]);
    assert_eq!(read_at(&fits, 0, MIB), text_bytes(9, MIB as usize), "a refused restore changed an existing file");
}
