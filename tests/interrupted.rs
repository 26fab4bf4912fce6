//! A restore that is stopped before it ends: killed (SIGKILL, power lost)
//! or hung up (the terminal closed). Whatever it left must not look like a
//! good disk: the table areas (the first and last MiB, where a partition
//! table or a whole-disk filesystem's superblock lives) are written last,
//! after everything else was written and read back. No root needed.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A disk without a partition table: ext4 on the whole disk, holding a
/// large file of random data, and its klon image.
fn whole_disk_ext4(t: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let (src, img, files) = (t.join("src.img"), t.join("image"), t.join("files"));
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("big.bin"), random_bytes(21, (72 * MIB) as usize)).unwrap();
    std::fs::write(files.join("notes.txt"), text_bytes(22, 100_000)).unwrap();
    blank_file(&src, 96 * MIB);
    run("mkfs.ext4", &["-q", "-F", "-L", "wholedisk", "-d", s(&files), s(&src)]);
    ok(&klon(&["backup", "--quiet", "--level", "1", s(&src), s(&img)]));
    (src, img)
}

/// Starts `klon restore` onto `dst` and waits until it has written data
/// past the first MiB (the disk's first bytes after it are random data of
/// the big file; the target holds zeros there before).
fn restore_until_it_writes(img: &Path, dst: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(["restore", "--yes", "--threads", "1", s(img), s(dst)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let f = std::fs::File::open(dst).unwrap();
    let started = Instant::now();
    let mut probe = vec![0u8; MIB as usize];
    loop {
        // Somewhere in the 2..90 MiB range the ext4 data lands: look at a
        // few places.
        let written = [8, 24, 40, 56].iter().any(|&m| {
            f.read_exact_at(&mut probe, m * MIB).unwrap();
            probe.iter().any(|&b| b != 0)
        });
        if written {
            return child;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the restore ended ({status}) before it was seen writing");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the restore wrote nothing in 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn blkid_sees(path: &Path) -> String {
    let o = Command::new("blkid").args(["-p", "-o", "export", s(path)]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Killed while it writes, a restore of a whole-disk ext4 leaves a disk
/// in which nothing finds a filesystem: its first MiB (the superblock) is
/// still wiped. Before the table areas were held back, blkid saw ext4 and
/// `e2fsck -fn` passed on a disk with wrong contents.
#[test]
fn killed_restore_leaves_no_filesystem_signature() {
    let t = TempDir::new("killed");
    let (src, img) = whole_disk_ext4(&t);
    let dst = t.join("dst.img");
    blank_file(&dst, 96 * MIB);
    // The target held a disk with the same filesystem before.
    std::fs::copy(&src, &dst).unwrap();
    // ... with other contents in its data blocks: zero them so the probe
    // sees when the restore writes.
    let zeros = vec![0u8; MIB as usize];
    let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
    for m in 2..95 {
        f.write_all_at(&zeros, m * MIB).unwrap();
    }
    drop(f);
    assert!(blkid_sees(&dst).contains("TYPE=ext4"), "the target should start out as ext4");

    let mut child = restore_until_it_writes(&img, &dst);
    signal(&child, nix::sys::signal::Signal::SIGKILL);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "the restore was not killed ({status}): it ended before");
    let head = read_at(&dst, 0, MIB);
    assert!(head.iter().all(|&b| b == 0), "the first MiB of a killed restore's target is not wiped");
    let found = blkid_sees(&dst);
    assert!(!found.contains("TYPE="), "blkid finds a signature on the half-written disk: {found}");
    let fsck = Command::new("e2fsck").args(["-fn", s(&dst)]).output().unwrap();
    assert!(!fsck.status.success(), "e2fsck passes on the half-written disk");
}

/// SIGHUP (the terminal was closed) stops a restore as Ctrl-C does: it
/// cleans up (the table areas wiped), says so and exits with 5. Before, it
/// killed klon on the spot.
#[test]
fn hangup_stops_a_restore_and_cleans_up() {
    let t = TempDir::new("hangup");
    let (_src, img) = whole_disk_ext4(&t);
    let dst = t.join("dst.img");
    blank_file(&dst, 96 * MIB);
    let child = restore_until_it_writes(&img, &dst);
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    let o = child.wait_with_output().unwrap();
    fails_with(&o, 5, &["cancelled", "partition table was wiped"]);
    assert!(read_at(&dst, 0, MIB).iter().all(|&b| b == 0), "the head of the target was not wiped");
    assert!(!blkid_sees(&dst).contains("TYPE="));
}

/// A restore that is not stopped writes the held-back areas last and the
/// target is the source byte for byte, e2fsck clean.
#[test]
fn whole_disk_restore_completes_with_held_areas_written() {
    let t = TempDir::new("held");
    let (src, img) = whole_disk_ext4(&t);
    let dst = t.join("dst.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&img), s(&dst)]));
    assert_same(&src, &dst, 0, 96 * MIB, "the whole disk");
    run("e2fsck", &["-fn", s(&dst)]);
}
