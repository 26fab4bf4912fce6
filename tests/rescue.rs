//! Backing up a disk with bad sectors: real read errors (EIO) from nbdkit's
//! ddrescue filter, exposed as a file by nbdfuse. Without `--rescue` a read
//! error stops the backup, naming where, and suggests `--rescue`; with it
//! klon reads around the bad sectors, stores them as zeros, records them in
//! the image, and `klon info` and the restore say so (tests/faults.rs
//! shows that bad sectors in a filesystem's free blocks are never read).
//! Needs root (FUSE).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `disk` served by nbdkit with the sectors `bad` (byte ranges) failing
/// every read with EIO, as the file `<dir>/mnt/disk`; unmounted on drop.
struct FailingDisk {
    mnt: PathBuf,
    child: Child,
}

impl FailingDisk {
    fn new(dir: &Path, disk: &Path, bad: &[(u64, u64)]) -> FailingDisk {
        let size = std::fs::metadata(disk).unwrap().len();
        // A ddrescue mapfile: '+' read fine, '-' bad sector.
        let mut map = String::from("# Mapfile\n0x0 +\n");
        let mut pos = 0u64;
        for &(a, l) in bad {
            if a > pos {
                map += &format!("{pos:#x} {:#x} +\n", a - pos);
            }
            map += &format!("{a:#x} {l:#x} -\n");
            pos = a + l;
        }
        if pos < size {
            map += &format!("{pos:#x} {:#x} +\n", size - pos);
        }
        let mapfile = dir.join("map");
        std::fs::write(&mapfile, map).unwrap();
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let child = Command::new("nbdfuse")
            .arg(mnt.join("disk"))
            .args(["--command", "nbdkit", "-s", "--filter=ddrescue", "file"])
            .arg(disk)
            .arg(format!("ddrescue-mapfile={}", mapfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run nbdfuse (package nbdfuse; scripts/test installs it)");
        let d = FailingDisk { mnt, child };
        for _ in 0..100 {
            if d.path().exists() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nbdfuse did not expose {}", d.path().display());
    }

    fn path(&self) -> PathBuf {
        self.mnt.join("disk")
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.mnt).status();
        for _ in 0..50 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MBR disk with one ext4 partition at 1 MiB holding one file of random
/// data; returns the disk, the partition's (start, size), and the disk
/// byte range of the file's data.
fn ext4_disk(t: &TempDir) -> (PathBuf, (u64, u64), (u64, u64)) {
    let (disk, part, files) = (t.join("disk.img"), t.join("part.img"), t.join("files"));
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("data.bin"), random_bytes(31, (6 * MIB) as usize)).unwrap();
    blank_file(&part, 31 * MIB);
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", "-d", s(&files), s(&part)]);
    // Where the file's blocks are, from the filesystem's own tool.
    let stat = run("debugfs", &["-R", "stat /data.bin", s(&part)]);
    let extents = stat.lines().skip_while(|l| !l.starts_with("EXTENTS:")).nth(1).unwrap().to_string();
    // "(0-1535):1234-2769" (maybe more after a comma): the first run.
    let run0 = extents.split(',').next().unwrap();
    let phys = run0.split(':').nth(1).unwrap().trim();
    let (a, b) = phys.split_once('-').unwrap();
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(b - a > 64, "the file's first run is too short: {extents}");
    blank_file(&disk, 33 * MIB);
    run_with_input("sfdisk", &["-q", s(&disk)], "label: dos\nstart=2048, size=63488, type=83\n");
    let start = MIB;
    let bytes = std::fs::read(&part).unwrap();
    write_at(&disk, start, &bytes);
    let file_data = (start + a * 4096, (b - a + 1) * 4096);
    (disk, (start, 31 * MIB), file_data)
}

/// A read error inside used blocks stops a plain backup with an I/O error
/// that names the offset and suggests --rescue; no image is left. With
/// --rescue the backup completes with a warning, the image records the
/// unreadable range, `klon info` lists it, and a restore gives back the
/// partition with zeros there and every other byte equal.
#[test]
fn bad_sectors_in_used_blocks_stop_a_backup_or_are_rescued() {
    require_root!();
    let t = TempDir::new("rescue");
    let (disk, (pstart, plen), (fa, fl)) = ext4_disk(&t);
    // Three bad sectors in the file's data: two 8 KiB apart in one 64 KiB
    // piece (readable data between them, which only reading sector by
    // sector gets back), one in a piece of its own 256 KiB further.
    let bad1 = (fa + fl / 4) / (64 * 1024) * (64 * 1024) + 4096 + 512;
    let bad = [(bad1, 512), (bad1 + 8192, 512), (bad1 + 256 * 1024, 512)];
    assert!(bad1 > fa && bad[2].0 + 512 < fa + fl);
    let failing = FailingDisk::new(&t.0, &disk, &bad);
    let img = t.join("image");

    let o = klon(&["backup", "--quiet", s(&failing.path()), s(&img)]);
    fails_with(&o, 3, &["Input/output error", "--rescue"]);
    assert!(!img.exists(), "a failed backup left an image");

    let o = klon(&["backup", "--rescue", s(&failing.path()), s(&img)]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("could not be read") && err.contains("stored as zeros"), "{err}");
    let info = stdout(&klon(&["info", s(&img)]));
    assert!(info.contains("Unreadable:"), "{info}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&klon(&["info", "--json", s(&img)]))).unwrap();
    assert_eq!(v["manifest"]["format_version"], 2, "a rescued image is format version 2");
    let p1 = v["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["name"] == "p1").unwrap();
    let unreadable: Vec<(u64, u64)> =
        p1["unreadable"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap())).collect();
    // Each bad sector is found, with at most the reading unit around it
    // (the page cache reads this file 4 KiB at a time), and nothing else.
    assert_eq!(unreadable.len(), 3, "{unreadable:?}");
    for (&(a, l), &(b, bl)) in unreadable.iter().zip(&bad) {
        assert!(a <= b && b + bl <= a + l && l <= 4096, "unreadable {a}+{l} does not fit bad sector {b}+{bl}");
    }
    // What the second pass read sector by sector is a stream of its own.
    let kinds: Vec<&str> =
        v["manifest"]["streams"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.last(), Some(&"rescued"), "{kinds:?}");
    ok(&klon(&["verify", s(&img)]));

    let dst = t.join("dst.img");
    let o = klon(&["restore", "--yes", s(&img), s(&dst)]);
    ok(&o);
    assert!(stderr(&o).contains("unreadable"), "the restore does not say the image has unreadable ranges");
    let src = std::fs::read(&disk).unwrap();
    let got = std::fs::read(&dst).unwrap();
    for (i, (x, y)) in src[pstart as usize..(pstart + plen) as usize]
        .iter()
        .zip(&got[pstart as usize..(pstart + plen) as usize])
        .enumerate()
    {
        let at = pstart + i as u64;
        let in_bad = unreadable.iter().any(|&(a, l)| a <= at && at < a + l);
        if in_bad {
            assert_eq!(*y, 0, "unreadable byte {at} not restored as zero");
        } else {
            assert_eq!(x, y, "byte {at} differs");
        }
    }
}
